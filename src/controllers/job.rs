//! The Job controller: what `kinds::job::plan` decides for each Job from its pods — start
//! pods up to `parallelism` until `completions` succeeded (by index for Indexed Jobs), replace
//! failed ones after kube's back-off, fail the Job past `backoffLimit` or
//! `activeDeadlineSeconds`, stop its pods while suspended, delete it `ttlSecondsAfterFinished`
//! after it finished — carried out through the API, with kube's events, and expectations so a
//! lagging cache never starts a pod twice.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use k8s_openapi::api::{batch::v1::Job, core::v1::Pod};
use kube::{
    Api, Client,
    api::{DeleteParams, PropagationPolicy},
};
use tokio::sync::watch;

use crate::{
    control::{
        Caches, controller_ref, controller_uid, patch_status,
        pods::{self, PodControl},
        runner::{self, Controller, PassError},
    },
    kinds::job::{JobPlan, TRACKING_FINALIZER, plan, pod_for},
};

pub async fn run(client: Client, caches: Caches, leading: watch::Receiver<bool>) {
    let c = Jobs {
        c: PodControl::new(client, &caches, "job-controller"),
    };
    runner::run(c, &caches, leading).await;
}

struct Jobs {
    c: PodControl,
}

impl Controller for Jobs {
    fn name(&self) -> &'static str {
        "job-controller"
    }

    fn signals(&self, caches: &Caches) -> Vec<watch::Receiver<u64>> {
        vec![caches.jobs.changed.clone(), caches.pods.changed.clone()]
    }

    /// Back-offs, deadlines and TTLs come due without an event: looked at every second.
    fn period(&self) -> Duration {
        Duration::from_secs(1)
    }

    async fn pass(&mut self) -> Result<(), PassError> {
        let pods = self.c.caches.pods.all();
        let mut owned: HashMap<&str, Vec<&Arc<Pod>>> = HashMap::new();
        for p in &pods {
            if let Some(uid) = controller_uid(p.as_ref()) {
                owned.entry(uid).or_default().push(p);
            }
        }
        let jobs = self.c.caches.jobs.all();
        let live: HashSet<String> = jobs.iter().filter_map(|j| j.metadata.uid.clone()).collect();
        self.c.expect.retain(&live);
        let now = jiff::Timestamp::now();
        // Pods whose Job is gone or going are no longer counted: their finalizer comes off.
        let counting: HashSet<&str> = jobs
            .iter()
            .filter(|j| j.metadata.deletion_timestamp.is_none())
            .filter_map(|j| j.metadata.uid.as_deref())
            .collect();
        for p in &pods {
            let held = crate::kinds::has_finalizer(&p.metadata, TRACKING_FINALIZER);
            if held && controller_uid(p.as_ref()).is_none_or(|u| !counting.contains(u)) {
                self.release(p).await;
            }
        }
        for job in jobs {
            if job.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let uid = job.metadata.uid.as_deref().unwrap_or_default();
            let mine = owned.get(uid).map(Vec::as_slice).unwrap_or(&[]);
            if self.c.expect.waiting(uid, mine) {
                continue;
            }
            let refs: Vec<&Pod> = mine.iter().map(|p| p.as_ref()).collect();
            let p = plan(&job, &refs, now);
            if let Err(e) = self.apply(&job, p).await {
                tracing::debug!(job = ?job.metadata.name, error = %e, "job sync");
            }
        }
        Ok(())
    }
}

impl Jobs {
    /// Takes the tracking finalizer off a pod (guarded by its resourceVersion).
    async fn release(&self, p: &Pod) {
        let ns = p.metadata.namespace.clone().unwrap_or_default();
        let rest: Vec<&String> = p
            .metadata
            .finalizers
            .iter()
            .flatten()
            .filter(|f| *f != TRACKING_FINALIZER)
            .collect();
        let patch = serde_json::json!({"metadata": {"finalizers": rest, "resourceVersion": p.metadata.resource_version}});
        let api: Api<Pod> = Api::namespaced(self.c.client.clone(), &ns);
        if let Err(e) = api
            .patch(
                p.metadata.name.as_deref().unwrap_or_default(),
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(&patch),
            )
            .await
        {
            tracing::debug!(pod = ?p.metadata.name, error = %e, "removing the job-tracking finalizer");
        }
    }

    async fn apply(&mut self, job: &Arc<Job>, p: JobPlan) -> kube::Result<()> {
        let ns = job.metadata.namespace.clone().unwrap_or_default();
        let name = job.metadata.name.clone().unwrap_or_default();
        let uid = job.metadata.uid.clone().unwrap_or_default();
        if p.delete_job {
            tracing::info!(job = %format!("{ns}/{name}"), "ttlSecondsAfterFinished passed; deleting the Job");
            let dp = DeleteParams {
                propagation_policy: Some(PropagationPolicy::Background),
                ..Default::default()
            };
            return match Api::<Job>::namespaced(self.c.client.clone(), &ns)
                .delete(&name, &dp)
                .await
            {
                Ok(_) => Ok(()),
                Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
                Err(e) => Err(e),
            };
        }
        for (warning, reason, message) in &p.events {
            self.c
                .rec
                .event(job.as_ref(), *warning, reason, message.clone());
        }
        let api: Api<Pod> = Api::namespaced(self.c.client.clone(), &ns);
        let (mut created, mut deleted) = (HashSet::new(), HashSet::new());
        for index in &p.create {
            let failures = index.and_then(|i| p.failures.get(&i).copied()).unwrap_or(0);
            let mut pod = pod_for(job, *index, failures);
            pod.metadata.owner_references = controller_ref(job.as_ref()).map(|r| vec![r]);
            match pods::create(&api, &self.c.rec, job.as_ref(), &pod).await {
                Ok(n) => {
                    created.insert(n);
                }
                Err(_) => break,
            }
        }
        for n in &p.delete {
            match pods::delete(&api, &self.c.rec, job.as_ref(), n).await {
                Ok(true) => {
                    deleted.insert(n.clone());
                }
                Ok(false) => {}
                Err(e) => tracing::debug!(pod = %n, error = %e, "deleting a job's pod"),
            }
        }
        self.c.expect.record(&uid, created, deleted);
        // The status records the pods before their finalizers come off.
        if let Some(st) = &p.status {
            let v = serde_json::to_value(st).unwrap_or_default();
            patch_status::<Job>(&self.c.client, &ns, &name, v).await?;
        }
        let mine = self.c.caches.pods.all();
        for n in &p.release {
            if let Some(pod) = mine.iter().find(|x| {
                x.metadata.namespace.as_deref() == Some(ns.as_str())
                    && x.metadata.name.as_deref() == Some(n.as_str())
            }) {
                self.release(pod).await;
            }
        }
        Ok(())
    }
}
