//! Events, as kube's recorder writes them: the first occurrence creates an Event, repeats of
//! the same (object, type, reason, message) bump its `count` and `lastTimestamp`. Writing is
//! asynchronous and best effort: a full queue drops events rather than slowing the caller.

use std::collections::HashMap;

use k8s_openapi::{
    api::core::v1::{Event, EventSource, ObjectReference},
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
};
use kube::{
    Api, Client, Resource,
    api::{Patch, PatchParams, PostParams},
};
use tokio::sync::mpsc;

struct Pending {
    object: ObjectReference,
    type_: &'static str,
    reason: String,
    message: String,
}

/// Sends events for one component (`default-scheduler`, `replicaset-controller`, …).
#[derive(Clone)]
pub struct Recorder {
    tx: mpsc::Sender<Pending>,
}

impl Recorder {
    pub fn new(client: Client, component: &str) -> Recorder {
        let (tx, rx) = mpsc::channel(4096);
        tokio::spawn(writer(client, component.to_string(), rx));
        Recorder { tx }
    }

    /// Records an event about `obj`.
    pub fn event<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        warning: bool,
        reason: &str,
        message: impl Into<String>,
    ) {
        let object = obj.object_ref(&());
        let _ = self.tx.try_send(Pending {
            object,
            type_: if warning { "Warning" } else { "Normal" },
            reason: reason.into(),
            message: message.into(),
        });
    }
}

/// (namespace, object uid, type, reason, message): what makes two events the same.
type EventKey = (String, String, &'static str, String, String);

async fn writer(client: Client, component: String, mut rx: mpsc::Receiver<Pending>) {
    // (namespace, uid, type, reason, message) → (event name, count)
    let mut seen: HashMap<EventKey, (String, i32)> = HashMap::new();
    while let Some(p) = rx.recv().await {
        let ns = p
            .object
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let api: Api<Event> = Api::namespaced(client.clone(), &ns);
        let key = (
            ns.clone(),
            p.object.uid.clone().unwrap_or_default(),
            p.type_,
            p.reason.clone(),
            p.message.clone(),
        );
        let now = Time(jiff::Timestamp::now());
        if let Some((name, count)) = seen.get_mut(&key) {
            *count += 1;
            let patch = serde_json::json!({"count": *count, "lastTimestamp": now});
            match api
                .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => continue,
                Err(e) => tracing::debug!(error = %e, "event update failed; creating anew"),
            }
        }
        let obj_name = p.object.name.clone().unwrap_or_default();
        let mut suffix = [0u8; 8];
        let _ = getrandom::fill(&mut suffix);
        let name = format!("{obj_name}.{}", hex::encode(suffix));
        let ev = Event {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(ns.clone()),
                ..Default::default()
            },
            involved_object: p.object,
            reason: Some(p.reason),
            message: Some(p.message),
            type_: Some(p.type_.into()),
            count: Some(1),
            first_timestamp: Some(now.clone()),
            last_timestamp: Some(now),
            source: Some(EventSource {
                component: Some(component.clone()),
                host: None,
            }),
            reporting_component: Some(component.clone()),
            ..Default::default()
        };
        match api.create(&PostParams::default(), &ev).await {
            Ok(_) => {
                if seen.len() > 10_000 {
                    seen.clear();
                }
                seen.insert(key, (name, 1));
            }
            Err(e) => tracing::debug!(error = %e, "event create failed"),
        }
    }
}
