//! What the scheduler and the controllers share: a client to the API server, watched caches of
//! the kinds they read (kube-rs reflectors) with a change signal per kind, an event recorder
//! that aggregates repeats as kube's does, leader election on a Lease, and label selectors.
//!
//! Every actor only talks to the API server: it reads its caches, writes through the API with
//! optimistic concurrency, and reports what it sees in `status`.

pub mod expect;
pub mod history;
pub mod leader;
pub mod metrics;
pub mod pods;
pub mod recorder;
pub mod runner;

use std::{sync::Arc, time::Duration};

use futures::StreamExt;
use k8s_openapi::api::{
    apps::v1::{ControllerRevision, DaemonSet, Deployment, ReplicaSet, StatefulSet},
    coordination::v1::Lease,
    core::v1::{
        Namespace, Node, PersistentVolume, PersistentVolumeClaim, Pod, Service, ServiceAccount,
    },
    discovery::v1::EndpointSlice,
    storage::v1::StorageClass,
};
use kube::{
    Api, Client, Resource,
    runtime::{WatchStreamExt, reflector, watcher},
};
use serde::de::DeserializeOwned;
use tokio::sync::watch;

/// A watched cache of one kind and a signal that ticks on every change.
#[derive(Clone)]
pub struct Cache<K: Resource<DynamicType = ()> + Clone + 'static> {
    pub store: reflector::Store<K>,
    pub changed: watch::Receiver<u64>,
}

impl<K> Cache<K>
where
    K: Resource<DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    /// Starts watching `api` into a new cache.
    pub fn start(api: Api<K>, cfg: watcher::Config) -> Self {
        let (store, writer) = reflector::store();
        let (tx, changed) = watch::channel(0u64);
        let stream = reflector(writer, watcher(api, cfg).default_backoff());
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(ev) = stream.next().await {
                if let Err(e) = ev {
                    tracing::debug!(kind = %K::kind(&()), error = %e, "watch error; retrying");
                    continue;
                }
                tx.send_modify(|n| *n += 1);
            }
        });
        Cache { store, changed }
    }

    pub fn all(&self) -> Vec<Arc<K>> {
        self.store.state()
    }

    pub fn get(&self, ns: Option<&str>, name: &str) -> Option<Arc<K>> {
        let mut r = reflector::ObjectRef::new(name);
        if let Some(ns) = ns {
            r = r.within(ns);
        }
        self.store.get(&r)
    }
}

/// The caches of every kind an actor may read.
#[derive(Clone)]
pub struct Caches {
    pub pods: Cache<Pod>,
    pub nodes: Cache<Node>,
    pub replicasets: Cache<ReplicaSet>,
    pub deployments: Cache<Deployment>,
    pub daemonsets: Cache<DaemonSet>,
    pub jobs: Cache<k8s_openapi::api::batch::v1::Job>,
    pub cronjobs: Cache<k8s_openapi::api::batch::v1::CronJob>,
    pub statefulsets: Cache<StatefulSet>,
    pub revisions: Cache<ControllerRevision>,
    pub claims: Cache<PersistentVolumeClaim>,
    pub volumes: Cache<PersistentVolume>,
    pub classes: Cache<StorageClass>,
    pub budgets: Cache<k8s_openapi::api::policy::v1::PodDisruptionBudget>,
    pub replication_controllers: Cache<k8s_openapi::api::core::v1::ReplicationController>,
    pub services: Cache<Service>,
    pub slices: Cache<EndpointSlice>,
    pub namespaces: Cache<Namespace>,
    pub serviceaccounts: Cache<ServiceAccount>,
    pub node_leases: Cache<Lease>,
}

impl Caches {
    pub fn start(client: &Client) -> Caches {
        let cfg = watcher::Config::default;
        Caches {
            pods: Cache::start(Api::all(client.clone()), cfg()),
            nodes: Cache::start(Api::all(client.clone()), cfg()),
            replicasets: Cache::start(Api::all(client.clone()), cfg()),
            deployments: Cache::start(Api::all(client.clone()), cfg()),
            daemonsets: Cache::start(Api::all(client.clone()), cfg()),
            jobs: Cache::start(Api::all(client.clone()), cfg()),
            cronjobs: Cache::start(Api::all(client.clone()), cfg()),
            statefulsets: Cache::start(Api::all(client.clone()), cfg()),
            revisions: Cache::start(Api::all(client.clone()), cfg()),
            claims: Cache::start(Api::all(client.clone()), cfg()),
            volumes: Cache::start(Api::all(client.clone()), cfg()),
            classes: Cache::start(Api::all(client.clone()), cfg()),
            budgets: Cache::start(Api::all(client.clone()), cfg()),
            replication_controllers: Cache::start(Api::all(client.clone()), cfg()),
            services: Cache::start(Api::all(client.clone()), cfg()),
            slices: Cache::start(Api::all(client.clone()), cfg()),
            namespaces: Cache::start(Api::all(client.clone()), cfg()),
            serviceaccounts: Cache::start(Api::all(client.clone()), cfg()),
            node_leases: Cache::start(Api::namespaced(client.clone(), "kube-node-lease"), cfg()),
        }
    }

    /// Waits until every cache has its first list.
    pub async fn ready(&self) {
        let _ = self.pods.store.wait_until_ready().await;
        let _ = self.nodes.store.wait_until_ready().await;
        let _ = self.replicasets.store.wait_until_ready().await;
        let _ = self.deployments.store.wait_until_ready().await;
        let _ = self.daemonsets.store.wait_until_ready().await;
        let _ = self.jobs.store.wait_until_ready().await;
        let _ = self.cronjobs.store.wait_until_ready().await;
        let _ = self.statefulsets.store.wait_until_ready().await;
        let _ = self.revisions.store.wait_until_ready().await;
        let _ = self.claims.store.wait_until_ready().await;
        let _ = self.volumes.store.wait_until_ready().await;
        let _ = self.classes.store.wait_until_ready().await;
        let _ = self.budgets.store.wait_until_ready().await;
        let _ = self.replication_controllers.store.wait_until_ready().await;
        let _ = self.services.store.wait_until_ready().await;
        let _ = self.slices.store.wait_until_ready().await;
        let _ = self.namespaces.store.wait_until_ready().await;
        let _ = self.serviceaccounts.store.wait_until_ready().await;
        let _ = self.node_leases.store.wait_until_ready().await;
    }
}

/// Waits for any of `signals` to tick or for `period` to pass, then lets a short burst of
/// further changes settle (so a burst becomes one pass).
pub async fn next_pass(signals: &mut [&mut watch::Receiver<u64>], period: Duration) {
    let changed = futures::future::select_all(signals.iter_mut().map(|s| Box::pin(s.changed())));
    let _ = tokio::time::timeout(period, changed).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    for s in signals.iter_mut() {
        s.borrow_and_update();
    }
}

/// Merge-patches `status` into the status subresource of the namespaced object `name`, as a
/// controller writes the status it worked out.
pub async fn patch_status<K>(
    client: &Client,
    ns: &str,
    name: &str,
    status: serde_json::Value,
) -> kube::Result<()>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    Api::<K>::namespaced(client.clone(), ns)
        .patch_status(
            name,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&serde_json::json!({ "status": status })),
        )
        .await
        .map(|_| ())
}

/// The owner reference that marks `owner` as the controller of an object.
pub fn controller_ref<K: Resource<DynamicType = ()>>(
    owner: &K,
) -> Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference> {
    let mut r = owner.controller_owner_ref(&())?;
    r.block_owner_deletion = Some(true);
    Some(r)
}

/// The uid of the object's controlling owner, if any.
pub fn controller_uid<K: Resource>(obj: &K) -> Option<&str> {
    obj.meta()
        .owner_references
        .iter()
        .flatten()
        .find(|r| r.controller == Some(true))
        .map(|r| r.uid.as_str())
}

/// A client from a kubeconfig file.
pub async fn client_from(kubeconfig: &std::path::Path) -> anyhow::Result<Client> {
    use anyhow::Context;
    let kc = kube::config::Kubeconfig::read_from(kubeconfig)
        .with_context(|| format!("reading {}", kubeconfig.display()))?;
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .with_context(|| format!("using {}", kubeconfig.display()))?;
    Ok(Client::try_from(cfg)?)
}
