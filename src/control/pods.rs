//! The pod writes every workload controller makes, with the events kube's controllers give
//! them: a pod created for its owner (SuccessfulCreate, or FailedCreate with the error) and a
//! pod deleted (SuccessfulDelete; one already gone is no error); an orphan adopted and a pod
//! that stopped matching released.

use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client, Resource,
    api::{DeleteParams, PostParams},
};

use super::{Caches, expect::Expectations, recorder::Recorder};

/// What a controller of pods holds: its client, its event recorder (as `component`), the
/// shared caches, and its expectations.
pub struct PodControl {
    pub client: Client,
    pub rec: Recorder,
    pub caches: Caches,
    pub expect: Expectations,
}

impl PodControl {
    pub fn new(client: Client, caches: &Caches, component: &'static str) -> Self {
        PodControl {
            rec: Recorder::new(client.clone(), component),
            client,
            caches: caches.clone(),
            expect: Expectations::default(),
        }
    }
}

/// Creates `pod` for `owner`; the new pod's name. A failure is a FailedCreate event on the
/// owner as well as the error.
pub async fn create<K: Resource<DynamicType = ()>>(
    api: &Api<Pod>,
    rec: &Recorder,
    owner: &K,
    pod: &Pod,
) -> kube::Result<String> {
    match api.create(&PostParams::default(), pod).await {
        Ok(made) => {
            let n = made.metadata.name.unwrap_or_default();
            rec.event(
                owner,
                false,
                "SuccessfulCreate",
                format!("Created pod: {n}"),
            );
            Ok(n)
        }
        Err(e) => {
            rec.event(owner, true, "FailedCreate", format!("Error creating: {e}"));
            Err(e)
        }
    }
}

/// Deletes `owner`'s pod `name`; false when it was gone already.
pub async fn delete<K: Resource<DynamicType = ()>>(
    api: &Api<Pod>,
    rec: &Recorder,
    owner: &K,
    name: &str,
) -> kube::Result<bool> {
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => {
            rec.event(
                owner,
                false,
                "SuccessfulDelete",
                format!("Deleted pod: {name}"),
            );
            Ok(true)
        }
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Replaces a pod's ownerReferences (guarded by its resourceVersion; a pod that changed or
/// went meanwhile is left to the next pass).
async fn set_owners(
    api: &Api<Pod>,
    p: &Pod,
    refs: Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference>,
) -> kube::Result<()> {
    let refs = if refs.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::json!(refs)
    };
    let patch = serde_json::json!({"metadata": {"ownerReferences": refs, "resourceVersion": p.metadata.resource_version}});
    match api
        .patch(
            p.metadata.name.as_deref().unwrap_or_default(),
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

pub async fn adopt<K: Resource<DynamicType = ()>>(
    api: &Api<Pod>,
    owner: &K,
    p: &Pod,
) -> kube::Result<()> {
    let mut refs = p.metadata.owner_references.clone().unwrap_or_default();
    refs.extend(super::controller_ref(owner));
    set_owners(api, p, refs).await
}

pub async fn release(api: &Api<Pod>, p: &Pod, uid: &str) -> kube::Result<()> {
    let refs = p
        .metadata
        .owner_references
        .iter()
        .flatten()
        .filter(|r| r.uid != uid)
        .cloned()
        .collect();
    set_owners(api, p, refs).await
}
