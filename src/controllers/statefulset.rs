//! The StatefulSet controller: what `kinds::statefulset::plan` decides for each set from its
//! pods, claims and revisions — claims and pods made in ordinal order, pods past the replica
//! count removed from the top, outdated pods replaced from the top down to the partition —
//! carried out through the API with kube's events, its ControllerRevisions kept as
//! `control::history` plans them, and expectations so a lagging cache never acts twice.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use k8s_openapi::api::{
    apps::v1::StatefulSet,
    core::v1::{PersistentVolumeClaim, Pod},
};
use kube::{
    Api, Client,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use tokio::sync::watch;

use crate::{
    control::{
        Caches, controller_ref, controller_uid, history, patch_status,
        pods::{self, PodControl},
        runner::{self, Controller, PassError},
    },
    kinds::{
        history::template_of,
        selector::selector_matches,
        statefulset::{Revisions, SetPlan, plan, revisions_in_use},
    },
};

pub async fn run(client: Client, caches: Caches, leading: watch::Receiver<bool>) {
    let c = Sets {
        c: PodControl::new(client, &caches, "statefulset-controller"),
    };
    runner::run(c, &caches, leading).await;
}

struct Sets {
    c: PodControl,
}

impl Controller for Sets {
    fn name(&self) -> &'static str {
        "statefulset-controller"
    }

    fn signals(&self, caches: &Caches) -> Vec<watch::Receiver<u64>> {
        vec![
            caches.statefulsets.changed.clone(),
            caches.pods.changed.clone(),
            caches.claims.changed.clone(),
        ]
    }

    /// minReadySeconds comes due without an event.
    fn period(&self) -> Duration {
        Duration::from_secs(2)
    }

    async fn pass(&mut self) -> Result<(), PassError> {
        let pods = self.c.caches.pods.all();
        let mut owned: HashMap<&str, Vec<&Pod>> = HashMap::new();
        for p in &pods {
            if let Some(uid) = controller_uid(p.as_ref()) {
                owned.entry(uid).or_default().push(p);
            }
        }
        let all_claims = self.c.caches.claims.all();
        let sets = self.c.caches.statefulsets.all();
        let live: HashSet<String> = sets.iter().filter_map(|s| s.metadata.uid.clone()).collect();
        self.c.expect.retain(&live);
        for set in sets {
            if set.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let uid = set.metadata.uid.as_deref().unwrap_or_default();
            let mine = owned.get(uid).map(Vec::as_slice).unwrap_or(&[]);
            let arcs: Vec<&Arc<Pod>> = pods
                .iter()
                .filter(|p| controller_uid(p.as_ref()) == Some(uid))
                .collect();
            if self.c.expect.waiting(uid, &arcs) {
                continue;
            }
            // Orphans that match (a set deleted with --cascade=orphan and made again) are taken
            // back before anything is planned.
            let orphans: Vec<&Arc<Pod>> = pods
                .iter()
                .filter(|p| {
                    p.metadata.namespace == set.metadata.namespace
                        && controller_uid(p.as_ref()).is_none()
                        && p.metadata.deletion_timestamp.is_none()
                        && set.spec.as_ref().is_some_and(|s| {
                            selector_matches(&s.selector, p.metadata.labels.as_ref())
                        })
                })
                .collect();
            if !orphans.is_empty() {
                let ns = set.metadata.namespace.clone().unwrap_or_default();
                let api: Api<Pod> = Api::namespaced(self.c.client.clone(), &ns);
                for p in orphans {
                    if let Err(e) = pods::adopt(&api, set.as_ref(), p).await {
                        tracing::debug!(pod = ?p.metadata.name, error = %e, "adopting a pod");
                    }
                }
                continue;
            }
            let claims: BTreeMap<String, &PersistentVolumeClaim> = all_claims
                .iter()
                .filter(|c| c.metadata.namespace == set.metadata.namespace)
                .map(|c| (c.metadata.name.clone().unwrap_or_default(), c.as_ref()))
                .collect();
            if let Err(e) = self.sync(&set, mine, &claims).await {
                tracing::debug!(sts = ?set.metadata.name, error = %e, "statefulset sync");
            }
        }
        Ok(())
    }
}

impl Sets {
    async fn sync(
        &mut self,
        set: &Arc<StatefulSet>,
        pods: &[&Pod],
        claims: &BTreeMap<String, &PersistentVolumeClaim>,
    ) -> kube::Result<()> {
        let spec = set.spec.clone().unwrap_or_default();
        let revisions = history::owned_by(&self.c.caches, set.as_ref());
        let in_use = revisions_in_use(set, pods);
        let hp = history::sync(
            &self.c.client,
            set.as_ref(),
            &revisions,
            &spec.template,
            &in_use,
            spec.revision_history_limit.unwrap_or(10),
        )
        .await?;
        // The current revision is the status's while its revision exists.
        let current = set
            .status
            .as_ref()
            .and_then(|s| s.current_revision.as_deref())
            .and_then(|n| {
                revisions
                    .iter()
                    .find(|r| r.metadata.name.as_deref() == Some(n))
            })
            .and_then(|r| Some((r.metadata.name.clone()?, template_of(r)?)));
        let (current, current_template) =
            current.unwrap_or_else(|| (hp.update.clone(), spec.template.clone()));
        let revs = Revisions {
            current,
            current_template,
            update: hp.update,
            update_template: spec.template.clone(),
        };
        let p = plan(set, pods, claims, &revs, jiff::Timestamp::now());
        self.apply(set, p, claims).await
    }

    async fn apply(
        &mut self,
        set: &Arc<StatefulSet>,
        p: SetPlan,
        claims: &BTreeMap<String, &PersistentVolumeClaim>,
    ) -> kube::Result<()> {
        let ns = set.metadata.namespace.clone().unwrap_or_default();
        let name = set.metadata.name.clone().unwrap_or_default();
        let uid = set.metadata.uid.clone().unwrap_or_default();
        let rec = &self.c.rec;
        let claim_api: Api<PersistentVolumeClaim> = Api::namespaced(self.c.client.clone(), &ns);
        for c in &p.claims {
            let cn = c.metadata.name.clone().unwrap_or_default();
            let pod = p
                .create
                .first()
                .and_then(|p| p.metadata.name.clone())
                .unwrap_or_default();
            match claim_api.create(&PostParams::default(), c).await {
                Ok(_) => rec.event(
                    set.as_ref(),
                    false,
                    "SuccessfulCreate",
                    format!("create Claim {cn} Pod {pod} in StatefulSet {name} success"),
                ),
                Err(kube::Error::Api(e)) if e.code == 409 => {}
                Err(e) => {
                    rec.event(
                        set.as_ref(),
                        true,
                        "FailedCreate",
                        format!("create Claim {cn} for Pod {pod} in StatefulSet {name} failed error: {e}"),
                    );
                    return Err(e);
                }
            }
        }
        for (cn, owner) in &p.claim_owners {
            let mut refs = claims
                .get(cn)
                .and_then(|c| c.metadata.owner_references.clone())
                .unwrap_or_default();
            refs.push(owner.clone());
            claim_api
                .patch(
                    cn,
                    &PatchParams::default(),
                    &Patch::Merge(serde_json::json!({"metadata": {"ownerReferences": refs}})),
                )
                .await?;
        }
        let api: Api<Pod> = Api::namespaced(self.c.client.clone(), &ns);
        let (mut created, mut deleted) = (HashSet::new(), HashSet::new());
        for pod in &p.create {
            let mut pod = pod.clone();
            let pn = pod.metadata.name.clone().unwrap_or_default();
            pod.metadata.owner_references = controller_ref(set.as_ref()).map(|r| vec![r]);
            match api.create(&PostParams::default(), &pod).await {
                Ok(_) => {
                    rec.event(
                        set.as_ref(),
                        false,
                        "SuccessfulCreate",
                        format!("create Pod {pn} in StatefulSet {name} successful"),
                    );
                    created.insert(pn);
                }
                Err(e) => {
                    rec.event(
                        set.as_ref(),
                        true,
                        "FailedCreate",
                        format!("create Pod {pn} in StatefulSet {name} failed error: {e}"),
                    );
                    break;
                }
            }
        }
        for pn in &p.delete {
            match api.delete(pn, &DeleteParams::default()).await {
                Ok(_) => {
                    rec.event(
                        set.as_ref(),
                        false,
                        "SuccessfulDelete",
                        format!("delete Pod {pn} in StatefulSet {name} successful"),
                    );
                    deleted.insert(pn.clone());
                }
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => tracing::debug!(pod = %pn, error = %e, "deleting a stateful pod"),
            }
        }
        self.c.expect.record(&uid, created, deleted);
        if let Some(st) = p.status {
            let v = serde_json::to_value(&st).unwrap_or_default();
            patch_status::<StatefulSet>(&self.c.client, &ns, &name, v).await?;
        }
        Ok(())
    }
}
