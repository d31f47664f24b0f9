//! kube-scheduler's VolumeBinding and VolumeRestrictions for claims: a pod whose claim is
//! missing, being deleted, or unbound in a class that binds at once waits; a bound claim's
//! volume must allow the node (its node affinity); a claim whose class waits for its first
//! consumer gets the chosen node as `volume.kubernetes.io/selected-node`, and the pod is bound
//! only once the provisioned volume is bound to the claim.

use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim, Pod};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};

use crate::{
    control::Caches,
    kinds::storage::{LOCAL_PATH_ROOT, PROVISIONER, SELECTED_NODE, bound_to, pv_fits_node},
};

/// What the pod's claims ask of its node.
#[derive(Debug, Default)]
pub struct Needs {
    /// Volumes of bound claims.
    pub bound: Vec<Arc<PersistentVolume>>,
    /// Unbound claims whose class waits for the first consumer.
    pub delayed: Vec<Arc<PersistentVolumeClaim>>,
}

/// The pod's claims as the caches have them, or why no node can take the pod now.
pub fn needs(caches: &Caches, p: &Pod) -> Result<Needs, String> {
    let mut n = Needs::default();
    let ns = p.metadata.namespace.as_deref();
    let vols = p.spec.as_ref().and_then(|s| s.volumes.as_ref());
    for v in vols.into_iter().flatten() {
        let Some(src) = &v.persistent_volume_claim else {
            continue;
        };
        let name = &src.claim_name;
        let Some(c) = caches.claims.get(ns, name) else {
            return Err(format!("persistentvolumeclaim \"{name}\" not found"));
        };
        if c.metadata.deletion_timestamp.is_some() {
            return Err(format!("persistentvolumeclaim \"{name}\" is being deleted"));
        }
        let spec = c.spec.clone().unwrap_or_default();
        if let Some(vn) = spec.volume_name.filter(|v| !v.is_empty()) {
            match caches.volumes.get(None, &vn) {
                Some(pv) if bound_to(&pv, &c) => n.bound.push(pv),
                // Named but not bound back (yet, or it is someone else's volume).
                Some(_) => return Err("pod has unbound immediate PersistentVolumeClaims".into()),
                None => return Err("pvc(s) bound to non-existent pv(s)".into()),
            }
            continue;
        }
        let waits = spec
            .storage_class_name
            .as_deref()
            .and_then(|sc| caches.classes.get(None, sc))
            .is_some_and(|sc| sc.volume_binding_mode.as_deref() == Some("WaitForFirstConsumer"));
        if !waits {
            return Err("pod has unbound immediate PersistentVolumeClaims".into());
        }
        n.delayed.push(c);
    }
    Ok(n)
}

/// Whether node `node` can serve the claims: bound volumes that allow it, and delayed claims
/// that chose it (or none yet) and that keelson's provisioner can serve there.
pub fn fits(needs: &Needs, node: &Node, caches: &Caches) -> Result<(), String> {
    if needs.bound.iter().any(|pv| !pv_fits_node(pv, node)) {
        return Err("node(s) had volume node affinity conflict".into());
    }
    let name = node.metadata.name.as_deref().unwrap_or_default();
    let has_root = node
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(LOCAL_PATH_ROOT));
    for c in &needs.delayed {
        let selected = c
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(SELECTED_NODE));
        let ours = c
            .spec
            .as_ref()
            .and_then(|s| s.storage_class_name.as_deref())
            .and_then(|sc| caches.classes.get(None, sc))
            .is_some_and(|sc| sc.provisioner == PROVISIONER);
        if selected.is_some_and(|s| s != name) || (ours && !has_root) {
            return Err("node(s) didn't find available persistent volumes to bind".into());
        }
    }
    Ok(())
}

/// Names `node` on the delayed claims that have no node yet (the provisioner's cue).
pub async fn select_node(client: &Client, needs: &Needs, node: &str) -> kube::Result<()> {
    for c in &needs.delayed {
        if c.metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(SELECTED_NODE))
        {
            continue;
        }
        let ns = c.metadata.namespace.clone().unwrap_or_default();
        let api: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns);
        api.patch(
            c.metadata.name.as_deref().unwrap_or_default(),
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"annotations": {SELECTED_NODE: node}}})),
        )
        .await?;
    }
    Ok(())
}
