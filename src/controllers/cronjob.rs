//! The CronJob controller: what `kinds::cronjob::plan` decides for each CronJob from the Jobs
//! it controls — the Job for the latest due time, Jobs a Replace supersedes or the history
//! limits drop, the status — carried out through the API with kube's events.

use std::{collections::HashMap, sync::Arc, time::Duration};

use k8s_openapi::api::batch::v1::{CronJob, Job};
use kube::{
    Api, Client,
    api::{DeleteParams, PostParams, PropagationPolicy},
};
use tokio::sync::watch;

use crate::{
    control::{
        Caches, controller_ref, controller_uid, patch_status,
        recorder::Recorder,
        runner::{self, Controller, PassError},
    },
    kinds::cronjob::{CronPlan, plan, reference},
};

pub async fn run(client: Client, caches: Caches, leading: watch::Receiver<bool>, clock: Clock) {
    let c = CronJobs {
        rec: Recorder::new(client.clone(), "cronjob-controller"),
        client,
        caches: caches.clone(),
        clock,
    };
    runner::run(c, &caches, leading).await;
}

struct CronJobs {
    client: Client,
    rec: Recorder,
    caches: Caches,
    clock: Clock,
}

/// The time schedules are due by: the real clock, or a test clock that runs `scale` times
/// faster from the moment the controller started (`--cronjob-time-scale`; 60 makes every
/// second a minute, so a `*/1` schedule comes due each second).
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    scale: u32,
    origin: jiff::Timestamp,
}

impl Default for Clock {
    fn default() -> Self {
        Clock::scaled(1)
    }
}

impl Clock {
    pub fn scaled(scale: u32) -> Self {
        Clock {
            scale: scale.max(1),
            origin: jiff::Timestamp::now(),
        }
    }

    pub fn now(&self) -> jiff::Timestamp {
        let real = jiff::Timestamp::now();
        if self.scale == 1 {
            return real;
        }
        let gone = real.duration_since(self.origin);
        self.origin
            .checked_add(gone * self.scale as i32)
            .unwrap_or(real)
    }
}

impl Controller for CronJobs {
    fn name(&self) -> &'static str {
        "cronjob-controller"
    }

    fn signals(&self, caches: &Caches) -> Vec<watch::Receiver<u64>> {
        vec![caches.cronjobs.changed.clone(), caches.jobs.changed.clone()]
    }

    /// Schedules come due without an event: looked at every second.
    fn period(&self) -> Duration {
        Duration::from_secs(1)
    }

    async fn pass(&mut self) -> Result<(), PassError> {
        let jobs = self.caches.jobs.all();
        let mut owned: HashMap<&str, Vec<&Job>> = HashMap::new();
        for j in &jobs {
            if let Some(uid) = controller_uid(j.as_ref()) {
                owned.entry(uid).or_default().push(j.as_ref());
            }
        }
        let now = self.clock.now();
        for cj in self.caches.cronjobs.all() {
            if cj.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let uid = cj.metadata.uid.as_deref().unwrap_or_default();
            let mine = owned.get(uid).map(Vec::as_slice).unwrap_or(&[]);
            match plan(&cj, mine, now) {
                Ok(p) => {
                    if let Err(e) = self.apply(&cj, p).await {
                        tracing::debug!(cronjob = ?cj.metadata.name, error = %e, "cronjob sync");
                    }
                }
                // Validation keeps bad schedules out; one that slipped in is said once a pass.
                Err(e) => {
                    tracing::debug!(cronjob = ?cj.metadata.name, error = %e, "cronjob schedule")
                }
            }
        }
        Ok(())
    }
}

impl CronJobs {
    async fn apply(&mut self, cj: &Arc<CronJob>, p: CronPlan) -> kube::Result<()> {
        let ns = cj.metadata.namespace.clone().unwrap_or_default();
        let name = cj.metadata.name.clone().unwrap_or_default();
        let api: Api<Job> = Api::namespaced(self.client.clone(), &ns);
        for (warning, reason, message) in &p.events {
            self.rec
                .event(cj.as_ref(), *warning, reason, message.clone());
        }
        let dp = DeleteParams {
            propagation_policy: Some(PropagationPolicy::Background),
            ..Default::default()
        };
        for j in &p.delete {
            match api.delete(j, &dp).await {
                Ok(_) => self.rec.event(
                    cj.as_ref(),
                    false,
                    "SuccessfulDelete",
                    format!("Deleted job {j}"),
                ),
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
        let mut status = p.status;
        if let Some(mut job) = p.create {
            job.metadata.owner_references = controller_ref(cj.as_ref()).map(|r| vec![r]);
            let jn = job.metadata.name.clone().unwrap_or_default();
            match api.create(&PostParams::default(), &job).await {
                Ok(made) => {
                    self.rec.event(
                        cj.as_ref(),
                        false,
                        "SuccessfulCreate",
                        format!("Created job {jn}"),
                    );
                    if let Some(st) = status.as_mut() {
                        st.active.get_or_insert_default().push(reference(&made));
                    }
                }
                // Made by an earlier pass whose status write was lost: nothing to do.
                Err(kube::Error::Api(e)) if e.code == 409 => {}
                Err(e) => {
                    self.rec.event(
                        cj.as_ref(),
                        true,
                        "FailedCreate",
                        format!("Error creating job: {e}"),
                    );
                    return Err(e);
                }
            }
        }
        if let Some(st) = status {
            let mut v = serde_json::to_value(&st).unwrap_or_default();
            // No active Job: the list goes (a merge patch keeps what it does not name).
            if st.active.is_none() {
                v["active"] = serde_json::Value::Null;
            }
            patch_status::<CronJob>(&self.client, &ns, &name, v).await?;
        }
        Ok(())
    }
}
