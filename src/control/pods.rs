//! The pod writes every workload controller makes, with the events kube's controllers give
//! them: a pod created for its owner (SuccessfulCreate, or FailedCreate with the error) and a
//! pod deleted (SuccessfulDelete; one already gone is no error).

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
