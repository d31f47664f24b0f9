//! The ControllerRevisions of a workload (StatefulSet, DaemonSet) kept as `kinds::history`
//! plans them: the current template's revision made or renumbered, old unused ones pruned.

use std::{collections::HashSet, sync::Arc};

use k8s_openapi::api::{apps::v1::ControllerRevision, core::v1::PodTemplateSpec};
use kube::{
    Api, Client, Resource,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};

use super::{Caches, controller_ref, controller_uid};
use crate::kinds::history::{self, HistoryPlan};

/// The revisions `owner` controls, from the cache.
pub fn owned_by<K: Resource<DynamicType = ()>>(
    caches: &Caches,
    owner: &K,
) -> Vec<Arc<ControllerRevision>> {
    let uid = owner.meta().uid.as_deref().unwrap_or_default();
    let ns = owner.meta().namespace.as_deref();
    caches
        .revisions
        .all()
        .into_iter()
        .filter(|r| {
            r.metadata.namespace.as_deref() == ns && controller_uid(r.as_ref()) == Some(uid)
        })
        .collect()
}

/// Plans and writes `owner`'s history for `template`; returns the plan (the update revision's
/// name and hash) once the current revision exists.
pub async fn sync<K: Resource<DynamicType = ()>>(
    client: &Client,
    owner: &K,
    revisions: &[Arc<ControllerRevision>],
    template: &PodTemplateSpec,
    in_use: &HashSet<String>,
    limit: i32,
) -> kube::Result<HistoryPlan> {
    let refs: Vec<&ControllerRevision> = revisions.iter().map(|r| r.as_ref()).collect();
    let p = history::plan(owner.meta(), template, &refs, in_use, limit);
    let ns = owner.meta().namespace.clone().unwrap_or_default();
    let api: Api<ControllerRevision> = Api::namespaced(client.clone(), &ns);
    if let Some(mut rev) = p.create.clone() {
        rev.metadata.owner_references = controller_ref(owner).map(|r| vec![r]);
        match api.create(&PostParams::default(), &rev).await {
            Ok(_) => {}
            // There already: an orphan of an earlier owner of that name is taken over.
            Err(kube::Error::Api(e)) if e.code == 409 => {
                let name = rev.metadata.name.clone().unwrap_or_default();
                if let Some(old) = api.get_opt(&name).await?
                    && controller_uid(&old).is_none()
                {
                    let mut refs = old.metadata.owner_references.clone().unwrap_or_default();
                    refs.extend(controller_ref(owner));
                    api.patch(
                        &name,
                        &PatchParams::default(),
                        &Patch::Merge(serde_json::json!({"metadata": {
                            "ownerReferences": refs,
                            "resourceVersion": old.metadata.resource_version}})),
                    )
                    .await?;
                }
            }
            Err(e) => return Err(e),
        }
    }
    if let Some((name, n)) = &p.renumber {
        api.patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"revision": n})),
        )
        .await?;
    }
    for name in &p.delete {
        match api.delete(name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(p)
}
