//! The volume controllers: kube-controller-manager's PersistentVolume binder and the
//! protection controllers, and a local-path provisioner like k3s's, carrying out what
//! `kinds::storage::plan` decides — claims bound to the smallest fitting volume, volumes made
//! for claims of keelson's class (on the node the scheduler chose, for a class that waits for
//! its first consumer), released volumes deleted or kept by their reclaim policy, and the
//! protection finalizers lifted once nothing uses a claim or a volume.

use std::{
    collections::{BTreeMap, HashSet},
    time::Duration,
};

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::{
    Api, Client,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use serde_json::json;
use tokio::sync::watch;

use crate::{
    control::{
        Caches, patch_status,
        recorder::Recorder,
        runner::{self, Controller, PassError},
    },
    kinds::storage::{
        BIND_COMPLETED, BOUND_BY_CONTROLLER, LOCAL_PATH_ROOT, PV_PROTECTION, PVC_PROTECTION,
        StorageWrite, World, plan,
    },
};

pub async fn run(client: Client, caches: Caches, leading: watch::Receiver<bool>) {
    let c = Volumes {
        rec: Recorder::new(client.clone(), "persistentvolume-controller"),
        client,
        caches: caches.clone(),
        told: HashSet::new(),
    };
    runner::run(c, &caches, leading).await;
}

struct Volumes {
    client: Client,
    rec: Recorder,
    caches: Caches,
    /// Claim events already given: (claim uid, reason).
    told: HashSet<(String, &'static str)>,
}

impl Controller for Volumes {
    fn name(&self) -> &'static str {
        "persistentvolume-controller"
    }

    fn signals(&self, caches: &Caches) -> Vec<watch::Receiver<u64>> {
        vec![
            caches.claims.changed.clone(),
            caches.volumes.changed.clone(),
            caches.classes.changed.clone(),
            caches.pods.changed.clone(),
        ]
    }

    fn period(&self) -> Duration {
        Duration::from_secs(5)
    }

    async fn pass(&mut self) -> Result<(), PassError> {
        let claims = self.caches.claims.all();
        let volumes = self.caches.volumes.all();
        let classes = self.caches.classes.all();
        let pods = self.caches.pods.all();
        let nodes = self.caches.nodes.all();
        let node_refs: Vec<&k8s_openapi::api::core::v1::Node> =
            nodes.iter().map(|n| n.as_ref()).collect();
        let roots: BTreeMap<String, String> = nodes
            .iter()
            .filter(|n| crate::kinds::node::node_ready(n))
            .filter_map(|n| {
                let root = n.metadata.annotations.as_ref()?.get(LOCAL_PATH_ROOT)?;
                Some((n.metadata.name.clone()?, root.clone()))
            })
            .collect();
        let c: Vec<&PersistentVolumeClaim> = claims.iter().map(|x| x.as_ref()).collect();
        let v: Vec<&PersistentVolume> = volumes.iter().map(|x| x.as_ref()).collect();
        let s: Vec<&StorageClass> = classes.iter().map(|x| x.as_ref()).collect();
        let p: Vec<&Pod> = pods.iter().map(|x| x.as_ref()).collect();
        let writes = plan(&World {
            claims: &c,
            volumes: &v,
            classes: &s,
            pods: &p,
            roots: &roots,
            nodes: &node_refs,
        });
        for w in writes {
            if let Err(e) = self.apply(w.clone()).await {
                tracing::debug!(write = ?w, error = %e, "volume controller");
            }
        }
        Ok(())
    }
}

fn gone_ok(r: kube::Result<()>) -> kube::Result<()> {
    match r {
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(()),
        other => other,
    }
}

impl Volumes {
    fn claim(&self, ns: &str, name: &str) -> Option<std::sync::Arc<PersistentVolumeClaim>> {
        self.caches.claims.get(Some(ns), name)
    }

    async fn apply(&mut self, w: StorageWrite) -> kube::Result<()> {
        let pvs: Api<PersistentVolume> = Api::all(self.client.clone());
        let pp = PatchParams::default();
        match w {
            StorageWrite::Bind {
                ns,
                claim,
                claim_uid,
                pv,
            } => {
                let claims: Api<PersistentVolumeClaim> = Api::namespaced(self.client.clone(), &ns);
                // Conditional on the volume as the cache saw it free: two claims never both
                // get it (the loser's write conflicts and its claim is planned again).
                let rv = self
                    .caches
                    .volumes
                    .get(None, &pv)
                    .and_then(|v| v.metadata.resource_version.clone());
                pvs.patch(
                    &pv,
                    &pp,
                    &Patch::Merge(json!({
                        "metadata": {"annotations": {BOUND_BY_CONTROLLER: "yes"}, "resourceVersion": rv},
                        "spec": {"claimRef": {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                                              "namespace": ns, "name": claim, "uid": claim_uid}}})),
                )
                .await?;
                claims
                    .patch(
                        &claim,
                        &pp,
                        &Patch::Merge(json!({
                            "metadata": {"annotations": {BIND_COMPLETED: "yes", BOUND_BY_CONTROLLER: "yes"}},
                            "spec": {"volumeName": pv}})),
                    )
                    .await?;
            }
            StorageWrite::ClaimStatus { ns, claim, status } => {
                patch_status::<PersistentVolumeClaim>(&self.client, &ns, &claim, status).await?;
            }
            StorageWrite::VolumeStatus { pv, status } => {
                pvs.patch_status(&pv, &pp, &Patch::Merge(json!({"status": status})))
                    .await?;
            }
            StorageWrite::Provision(pv) => self.provision(&pvs, *pv).await?,
            StorageWrite::DeleteVolume(pv) => {
                gone_ok(pvs.delete(&pv, &DeleteParams::default()).await.map(|_| ()))?;
            }
            StorageWrite::ReleaseClaim { ns, claim } => {
                let Some(c) = self.claim(&ns, &claim) else {
                    return Ok(());
                };
                let rest = without(c.metadata.finalizers.as_ref(), PVC_PROTECTION);
                let claims: Api<PersistentVolumeClaim> = Api::namespaced(self.client.clone(), &ns);
                gone_ok(
                    claims
                        .patch(
                            &claim,
                            &pp,
                            &Patch::Merge(json!({"metadata": {"finalizers": rest}})),
                        )
                        .await
                        .map(|_| ()),
                )?;
            }
            StorageWrite::ReleaseVolume(pv) => {
                let Some(v) = self.caches.volumes.get(None, &pv) else {
                    return Ok(());
                };
                let rest = without(v.metadata.finalizers.as_ref(), PV_PROTECTION);
                gone_ok(
                    pvs.patch(
                        &pv,
                        &pp,
                        &Patch::Merge(json!({"metadata": {"finalizers": rest}})),
                    )
                    .await
                    .map(|_| ()),
                )?;
            }
            StorageWrite::ClaimEvent {
                ns,
                claim,
                warning,
                reason,
                message,
            } => {
                if let Some(c) = self.claim(&ns, &claim) {
                    let uid = c.metadata.uid.clone().unwrap_or_default();
                    if self.told.insert((uid, reason)) {
                        self.rec.event(c.as_ref(), warning, reason, message);
                    }
                }
            }
        }
        Ok(())
    }

    /// Creates a provisioned volume and says so on its claim.
    async fn provision(
        &mut self,
        pvs: &Api<PersistentVolume>,
        pv: PersistentVolume,
    ) -> kube::Result<()> {
        let name = pv.metadata.name.clone().unwrap_or_default();
        let claim = pv
            .spec
            .as_ref()
            .and_then(|s| s.claim_ref.as_ref())
            .and_then(|r| self.claim(r.namespace.as_deref()?, r.name.as_deref()?));
        match pvs.create(&PostParams::default(), &pv).await {
            Ok(_) => {
                if let Some(c) = claim {
                    self.rec.event(
                        c.as_ref(),
                        false,
                        "ProvisioningSucceeded",
                        format!("Successfully provisioned volume {name}"),
                    );
                }
                Ok(())
            }
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
            Err(e) => {
                if let Some(c) = claim {
                    self.rec.event(
                        c.as_ref(),
                        true,
                        "ProvisioningFailed",
                        format!("failed to provision volume with StorageClass: {e}"),
                    );
                }
                Err(e)
            }
        }
    }
}

fn without(fs: Option<&Vec<String>>, f: &str) -> Vec<String> {
    fs.into_iter()
        .flatten()
        .filter(|x| *x != f)
        .cloned()
        .collect()
}
