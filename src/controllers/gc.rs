//! Garbage collection by ownerReferences, and the default ServiceAccount of every namespace.
//!
//! - Background: a dependent (pod, ReplicaSet, EndpointSlice, …) whose owners are all gone is
//!   deleted. "Gone" is confirmed with a read from the API server, so a cache that has not seen a
//!   new owner yet never costs a dependent.
//! - Foreground: an owner deleted with `propagationPolicy: Foreground` carries the
//!   `foregroundDeletion` finalizer; its dependents are deleted (foreground too), and the
//!   finalizer is removed once none is left, which completes the owner's deletion.
//! - Orphan: an owner carrying the `orphan` finalizer has its reference removed from every
//!   dependent, then the finalizer.

use std::{collections::HashSet, sync::Arc, time::Duration};

use k8s_openapi::{
    api::{
        apps::v1::{DaemonSet, Deployment, ReplicaSet},
        core::v1::{Node, Pod, Service, ServiceAccount},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
};
use kube::{
    Api, Client, Resource,
    api::{ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PostParams},
};
use serde_json::json;
use tokio::sync::watch;

use crate::control::{
    Caches,
    runner::{self, Controller, PassError},
};

const FOREGROUND: &str = "foregroundDeletion";
const ORPHAN: &str = "orphan";

pub async fn run(client: Client, caches: Caches, leading: watch::Receiver<bool>) {
    let c = GarbageCollector {
        client,
        caches: caches.clone(),
    };
    runner::run(c, &caches, leading).await;
}

struct GarbageCollector {
    client: Client,
    caches: Caches,
}

impl Controller for GarbageCollector {
    fn name(&self) -> &'static str {
        "garbage-collector-controller"
    }

    fn signals(&self, caches: &Caches) -> Vec<watch::Receiver<u64>> {
        vec![
            caches.pods.changed.clone(),
            caches.replicasets.changed.clone(),
            caches.deployments.changed.clone(),
            caches.daemonsets.changed.clone(),
            caches.namespaces.changed.clone(),
            caches.services.changed.clone(),
        ]
    }

    fn period(&self) -> Duration {
        Duration::from_secs(5)
    }

    async fn pass(&mut self) -> Result<(), PassError> {
        Ok(pass(&self.client, &self.caches).await?)
    }
}

/// A dependent, type-erased: its metadata and how to write it.
struct Dependent {
    meta: ObjectMeta,
    kind: &'static str,
}

fn dependents(caches: &Caches) -> Vec<Dependent> {
    fn of<K: Resource<DynamicType = ()> + Clone>(
        all: Vec<Arc<K>>,
        kind: &'static str,
        out: &mut Vec<Dependent>,
    ) {
        out.extend(
            all.into_iter()
                .filter(|o| {
                    o.meta()
                        .owner_references
                        .as_ref()
                        .is_some_and(|r| !r.is_empty())
                })
                .map(|o| Dependent {
                    meta: o.meta().clone(),
                    kind,
                }),
        );
    }
    let mut out = vec![];
    of(caches.pods.all(), "Pod", &mut out);
    of(caches.replicasets.all(), "ReplicaSet", &mut out);
    of(caches.slices.all(), "EndpointSlice", &mut out);
    of(caches.deployments.all(), "Deployment", &mut out);
    of(caches.daemonsets.all(), "DaemonSet", &mut out);
    out
}

/// Owners that are being deleted with a GC finalizer: (kind, namespace, name, uid, finalizer).
fn finalizing(caches: &Caches) -> Vec<(ObjectMeta, &'static str, &'static str)> {
    fn of<K: Resource<DynamicType = ()> + Clone>(
        all: Vec<Arc<K>>,
        kind: &'static str,
        out: &mut Vec<(ObjectMeta, &'static str, &'static str)>,
    ) {
        for o in all {
            let m = o.meta();
            if m.deletion_timestamp.is_none() {
                continue;
            }
            for f in [FOREGROUND, ORPHAN] {
                if m.finalizers.iter().flatten().any(|x| x == f) {
                    out.push((m.clone(), kind, f));
                }
            }
        }
    }
    let mut out = vec![];
    of(caches.deployments.all(), "Deployment", &mut out);
    of(caches.replicasets.all(), "ReplicaSet", &mut out);
    of(caches.daemonsets.all(), "DaemonSet", &mut out);
    of(caches.services.all(), "Service", &mut out);
    of(caches.pods.all(), "Pod", &mut out);
    out
}

/// The API of a kind this collector handles, as dynamic objects.
fn api(client: &Client, kind: &str, ns: &str) -> Option<Api<DynamicObject>> {
    let ar = match kind {
        "Deployment" => ApiResource::erase::<Deployment>(&()),
        "ReplicaSet" => ApiResource::erase::<ReplicaSet>(&()),
        "DaemonSet" => ApiResource::erase::<DaemonSet>(&()),
        "Service" => ApiResource::erase::<Service>(&()),
        "Pod" => ApiResource::erase::<Pod>(&()),
        "EndpointSlice" => ApiResource::erase::<EndpointSlice>(&()),
        "Node" => {
            return Some(Api::all_with(
                client.clone(),
                &ApiResource::erase::<Node>(&()),
            ));
        }
        _ => return None,
    };
    Some(Api::namespaced_with(client.clone(), ns, &ar))
}

/// Whether the owner still exists with that uid, asked of the API server.
async fn owner_exists(client: &Client, ns: &str, r: &OwnerReference) -> kube::Result<bool> {
    let known = matches!(
        (r.api_version.as_str(), r.kind.as_str()),
        ("apps/v1", "Deployment" | "ReplicaSet" | "DaemonSet") | ("v1", "Service" | "Pod" | "Node")
    );
    // Owners of kinds this collector does not know are assumed present.
    let Some(api) = api(client, &r.kind, ns).filter(|_| known) else {
        return Ok(true);
    };
    Ok(api
        .get_opt(&r.name)
        .await?
        .is_some_and(|o| o.metadata.uid.as_deref() == Some(r.uid.as_str())))
}

fn gone_ok(r: kube::Result<()>) -> kube::Result<()> {
    match r {
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(()),
        other => other,
    }
}

async fn delete_dep(client: &Client, d: &Dependent, foreground: bool) -> kube::Result<()> {
    let ns = d.meta.namespace.clone().unwrap_or_default();
    let Some(api) = api(client, d.kind, &ns) else {
        return Ok(());
    };
    let dp = if foreground {
        DeleteParams::foreground()
    } else {
        DeleteParams::background()
    };
    let name = d.meta.name.clone().unwrap_or_default();
    gone_ok(api.delete(&name, &dp).await.map(|_| ()))
}

/// Merge-patches an object's metadata (guarded by its resourceVersion); an empty list is
/// removed rather than stored empty.
async fn patch_meta(
    client: &Client,
    kind: &str,
    m: &ObjectMeta,
    field: &str,
    list: serde_json::Value,
) -> kube::Result<()> {
    let ns = m.namespace.clone().unwrap_or_default();
    let Some(api) = api(client, kind, &ns) else {
        return Ok(());
    };
    let list = match list {
        serde_json::Value::Array(a) if a.is_empty() => serde_json::Value::Null,
        other => other,
    };
    let patch = json!({"metadata": {field: list, "resourceVersion": m.resource_version}});
    let name = m.name.clone().unwrap_or_default();
    gone_ok(
        api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map(|_| ()),
    )
}

/// Replaces the dependent's ownerReferences.
async fn set_owners(client: &Client, d: &Dependent, refs: Vec<OwnerReference>) -> kube::Result<()> {
    patch_meta(client, d.kind, &d.meta, "ownerReferences", json!(refs)).await
}

async fn remove_finalizer(
    client: &Client,
    m: &ObjectMeta,
    kind: &str,
    f: &str,
) -> kube::Result<()> {
    let rest: Vec<&String> = m.finalizers.iter().flatten().filter(|x| *x != f).collect();
    patch_meta(client, kind, m, "finalizers", json!(rest)).await
}

async fn pass(client: &Client, caches: &Caches) -> kube::Result<()> {
    let deps = dependents(caches);
    // Owners being deleted with a policy.
    for (m, kind, f) in finalizing(caches) {
        let uid = m.uid.clone().unwrap_or_default();
        let mine: Vec<&Dependent> = deps
            .iter()
            .filter(|d| {
                d.meta
                    .owner_references
                    .iter()
                    .flatten()
                    .any(|r| r.uid == uid)
            })
            .collect();
        if f == ORPHAN {
            for d in &mine {
                let rest: Vec<OwnerReference> = d
                    .meta
                    .owner_references
                    .iter()
                    .flatten()
                    .filter(|r| r.uid != uid)
                    .cloned()
                    .collect();
                set_owners(client, d, rest).await?;
            }
        } else {
            for d in &mine {
                if d.meta.deletion_timestamp.is_none() {
                    delete_dep(client, d, true).await?;
                }
            }
        }
        if mine.is_empty() {
            remove_finalizer(client, &m, kind, f).await?;
        }
    }
    // Background: dependents whose owners are all gone.
    let live: HashSet<String> = [
        caches
            .pods
            .all()
            .iter()
            .filter_map(|o| o.metadata.uid.clone())
            .collect::<Vec<_>>(),
        caches
            .replicasets
            .all()
            .iter()
            .filter_map(|o| o.metadata.uid.clone())
            .collect(),
        caches
            .deployments
            .all()
            .iter()
            .filter_map(|o| o.metadata.uid.clone())
            .collect(),
        caches
            .daemonsets
            .all()
            .iter()
            .filter_map(|o| o.metadata.uid.clone())
            .collect(),
        caches
            .services
            .all()
            .iter()
            .filter_map(|o| o.metadata.uid.clone())
            .collect(),
        caches
            .nodes
            .all()
            .iter()
            .filter_map(|o| o.metadata.uid.clone())
            .collect(),
    ]
    .concat()
    .into_iter()
    .collect();
    for d in &deps {
        if d.meta.deletion_timestamp.is_some() {
            continue;
        }
        let refs: Vec<&OwnerReference> = d.meta.owner_references.iter().flatten().collect();
        if refs.iter().any(|r| live.contains(&r.uid)) {
            continue;
        }
        let ns = d.meta.namespace.clone().unwrap_or_default();
        let mut any = false;
        for r in &refs {
            if owner_exists(client, &ns, r).await? {
                any = true;
                break;
            }
        }
        if !any {
            tracing::debug!(kind = d.kind, name = ?d.meta.name, "owner gone: deleting");
            delete_dep(client, d, false).await?;
        }
    }
    // Every active namespace has a default ServiceAccount.
    for ns in caches.namespaces.all() {
        let name = ns.metadata.name.clone().unwrap_or_default();
        if ns.metadata.deletion_timestamp.is_some()
            || caches.serviceaccounts.get(Some(&name), "default").is_some()
        {
            continue;
        }
        let api: Api<ServiceAccount> = Api::namespaced(client.clone(), &name);
        let sa = ServiceAccount {
            metadata: ObjectMeta {
                name: Some("default".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        match api.create(&PostParams::default(), &sa).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 || e.code == 403 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
