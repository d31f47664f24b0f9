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
            caches.statefulsets.changed.clone(),
            caches.namespaces.changed.clone(),
            caches.services.changed.clone(),
        ]
    }

    fn period(&self) -> Duration {
        Duration::from_secs(5)
    }

    async fn pass(&mut self) -> Result<(), PassError> {
        Ok(apply(&self.client, plan(&snapshot(&self.caches))).await?)
    }
}

/// A dependent, type-erased: its metadata and how to write it.
#[derive(Debug, Clone, PartialEq)]
struct Dependent {
    meta: ObjectMeta,
    kind: &'static str,
}

impl Dependent {
    fn owners(&self) -> impl Iterator<Item = &OwnerReference> {
        self.meta.owner_references.iter().flatten()
    }
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
    of(caches.jobs.all(), "Job", &mut out);
    of(caches.revisions.all(), "ControllerRevision", &mut out);
    of(caches.claims.all(), "PersistentVolumeClaim", &mut out);
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
    of(caches.jobs.all(), "Job", &mut out);
    of(caches.cronjobs.all(), "CronJob", &mut out);
    of(caches.statefulsets.all(), "StatefulSet", &mut out);
    of(
        caches.replication_controllers.all(),
        "ReplicationController",
        &mut out,
    );
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
        "StatefulSet" => ApiResource::erase::<k8s_openapi::api::apps::v1::StatefulSet>(&()),
        "ControllerRevision" => {
            ApiResource::erase::<k8s_openapi::api::apps::v1::ControllerRevision>(&())
        }
        "ReplicationController" => {
            ApiResource::erase::<k8s_openapi::api::core::v1::ReplicationController>(&())
        }
        "PersistentVolumeClaim" => {
            ApiResource::erase::<k8s_openapi::api::core::v1::PersistentVolumeClaim>(&())
        }
        "Job" => ApiResource::erase::<k8s_openapi::api::batch::v1::Job>(&()),
        "CronJob" => ApiResource::erase::<k8s_openapi::api::batch::v1::CronJob>(&()),
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
        (
            "apps/v1",
            "Deployment" | "ReplicaSet" | "DaemonSet" | "StatefulSet"
        ) | ("batch/v1", "Job" | "CronJob")
            | ("v1", "Service" | "Pod" | "Node" | "ReplicationController")
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

/// What the collector reads: dependents, owners finalizing, the UIDs the caches hold, the
/// namespaces without their default ServiceAccount.
struct Snapshot {
    deps: Vec<Dependent>,
    finalizing: Vec<(ObjectMeta, &'static str, &'static str)>,
    live: HashSet<String>,
    without_default_sa: Vec<String>,
}

fn snapshot(caches: &Caches) -> Snapshot {
    fn uids<K: Resource<DynamicType = ()>>(all: Vec<Arc<K>>) -> impl Iterator<Item = String> {
        all.into_iter().filter_map(|o| o.meta().uid.clone())
    }
    let live = uids(caches.pods.all())
        .chain(uids(caches.replicasets.all()))
        .chain(uids(caches.deployments.all()))
        .chain(uids(caches.daemonsets.all()))
        .chain(uids(caches.services.all()))
        .chain(uids(caches.nodes.all()))
        .collect();
    let without_default_sa = caches
        .namespaces
        .all()
        .iter()
        .filter(|ns| ns.metadata.deletion_timestamp.is_none())
        .filter_map(|ns| ns.metadata.name.clone())
        .filter(|name| caches.serviceaccounts.get(Some(name), "default").is_none())
        .collect();
    Snapshot {
        deps: dependents(caches),
        finalizing: finalizing(caches),
        live,
        without_default_sa,
    }
}

/// A write the collector wants.
#[derive(Debug, PartialEq)]
enum Write {
    /// Orphaning: the dependent keeps its other owners.
    SetOwners(Dependent, Vec<OwnerReference>),
    /// A foreground owner's dependent goes, foreground too.
    DeleteForeground(Dependent),
    /// Nothing depends on the finalizing owner any more.
    RemoveFinalizer(ObjectMeta, &'static str, &'static str),
    /// No owner in the caches: deleted once the API server confirms they are all gone.
    DeleteIfOwnersGone(Dependent),
    DefaultServiceAccount(String),
}

fn plan(s: &Snapshot) -> Vec<Write> {
    let mut out = vec![];
    // Owners being deleted with a policy.
    for (m, kind, f) in &s.finalizing {
        let uid = m.uid.clone().unwrap_or_default();
        let mine: Vec<&Dependent> = s
            .deps
            .iter()
            .filter(|d| d.owners().any(|r| r.uid == uid))
            .collect();
        for d in &mine {
            if *f == ORPHAN {
                let rest = d.owners().filter(|r| r.uid != uid).cloned().collect();
                out.push(Write::SetOwners((*d).clone(), rest));
            } else if d.meta.deletion_timestamp.is_none() {
                out.push(Write::DeleteForeground((*d).clone()));
            }
        }
        if mine.is_empty() {
            out.push(Write::RemoveFinalizer(m.clone(), kind, f));
        }
    }
    // Background: dependents whose owners are all gone.
    for d in &s.deps {
        if d.meta.deletion_timestamp.is_none() && !d.owners().any(|r| s.live.contains(&r.uid)) {
            out.push(Write::DeleteIfOwnersGone(d.clone()));
        }
    }
    // Every active namespace has a default ServiceAccount.
    for ns in &s.without_default_sa {
        out.push(Write::DefaultServiceAccount(ns.clone()));
    }
    out
}

async fn apply(client: &Client, writes: Vec<Write>) -> kube::Result<()> {
    for w in writes {
        match w {
            Write::SetOwners(d, refs) => set_owners(client, &d, refs).await?,
            Write::DeleteForeground(d) => delete_dep(client, &d, true).await?,
            Write::RemoveFinalizer(m, kind, f) => remove_finalizer(client, &m, kind, f).await?,
            Write::DeleteIfOwnersGone(d) => {
                let ns = d.meta.namespace.clone().unwrap_or_default();
                let mut any = false;
                for r in d.owners() {
                    if owner_exists(client, &ns, r).await? {
                        any = true;
                        break;
                    }
                }
                if !any {
                    tracing::debug!(kind = d.kind, name = ?d.meta.name, "owner gone: deleting");
                    delete_dep(client, &d, false).await?;
                }
            }
            Write::DefaultServiceAccount(ns) => {
                let api: Api<ServiceAccount> = Api::namespaced(client.clone(), &ns);
                let sa = ServiceAccount {
                    metadata: ObjectMeta {
                        name: Some("default".into()),
                        ..Default::default()
                    },
                    ..Default::default()
                };
                match api.create(&PostParams::default(), &sa).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(e)) if matches!(e.code, 403 | 404 | 409) => {}
                    Err(e) => return Err(e),
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(uid: &str) -> OwnerReference {
        OwnerReference {
            api_version: "apps/v1".into(),
            kind: "ReplicaSet".into(),
            name: format!("rs-{uid}"),
            uid: uid.into(),
            ..Default::default()
        }
    }

    fn dep(name: &str, owners: &[&str], deleting: bool) -> Dependent {
        Dependent {
            meta: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("default".into()),
                owner_references: Some(owners.iter().map(|u| owner(u)).collect()),
                deletion_timestamp: deleting.then(|| {
                    k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Default::default())
                }),
                ..Default::default()
            },
            kind: "Pod",
        }
    }

    fn owner_meta(uid: &str) -> ObjectMeta {
        ObjectMeta {
            name: Some(format!("rs-{uid}")),
            uid: Some(uid.into()),
            ..Default::default()
        }
    }

    fn snap(deps: Vec<Dependent>, live: &[&str]) -> Snapshot {
        Snapshot {
            deps,
            finalizing: vec![],
            live: live.iter().map(|s| s.to_string()).collect(),
            without_default_sa: vec![],
        }
    }

    #[test]
    fn a_dependent_with_a_live_owner_stays_and_one_without_is_checked_for_deletion() {
        let s = snap(
            vec![
                dep("a", &["u1"], false),
                dep("b", &["gone"], false),
                dep("c", &["gone", "u1"], false),
            ],
            &["u1"],
        );
        assert_eq!(
            plan(&s),
            vec![Write::DeleteIfOwnersGone(dep("b", &["gone"], false))]
        );
    }

    #[test]
    fn a_dependent_already_being_deleted_is_left_alone() {
        let s = snap(vec![dep("a", &["gone"], true)], &[]);
        assert_eq!(plan(&s), vec![]);
    }

    #[test]
    fn orphaning_removes_the_owner_from_each_dependent_then_the_finalizer() {
        let mut s = snap(vec![dep("a", &["o", "u1"], false)], &["o", "u1"]);
        s.finalizing = vec![(owner_meta("o"), "ReplicaSet", ORPHAN)];
        assert_eq!(
            plan(&s),
            vec![Write::SetOwners(
                dep("a", &["o", "u1"], false),
                vec![owner("u1")]
            )]
        );
        s.deps = vec![dep("a", &["u1"], false)];
        assert_eq!(
            plan(&s),
            vec![Write::RemoveFinalizer(
                owner_meta("o"),
                "ReplicaSet",
                ORPHAN
            )]
        );
    }

    #[test]
    fn foreground_deletes_dependents_not_yet_deleting_and_finishes_when_none_is_left() {
        let mut s = snap(
            vec![dep("a", &["o"], false), dep("b", &["o"], true)],
            &["o"],
        );
        s.finalizing = vec![(owner_meta("o"), "ReplicaSet", FOREGROUND)];
        assert_eq!(
            plan(&s),
            vec![Write::DeleteForeground(dep("a", &["o"], false))]
        );
        s.deps.clear();
        assert_eq!(
            plan(&s),
            vec![Write::RemoveFinalizer(
                owner_meta("o"),
                "ReplicaSet",
                FOREGROUND
            )]
        );
    }

    #[test]
    fn namespaces_without_a_default_service_account_get_one() {
        let mut s = snap(vec![], &[]);
        s.without_default_sa = vec!["team".into()];
        assert_eq!(plan(&s), vec![Write::DefaultServiceAccount("team".into())]);
    }
}
