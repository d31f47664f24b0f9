//! What the scheduler and the controllers share: a client to the API server, watched caches of
//! the kinds they read (kube-rs reflectors) with a change signal per kind, an event recorder
//! that aggregates repeats as kube's does, leader election on a Lease, and label selectors.
//!
//! Every actor only talks to the API server: it reads its caches, writes through the API with
//! optimistic concurrency, and reports what it sees in `status`.

pub mod leader;
pub mod recorder;

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use futures::StreamExt;
use k8s_openapi::{
    api::{
        apps::v1::{DaemonSet, Deployment, ReplicaSet},
        coordination::v1::Lease,
        core::v1::{Namespace, Node, Pod, Service, ServiceAccount},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::LabelSelector,
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

/// Whether `labels` satisfy a LabelSelector (matchLabels and matchExpressions). An empty
/// selector matches everything, as Kubernetes' workload selectors do.
pub fn selector_matches(sel: &LabelSelector, labels: Option<&BTreeMap<String, String>>) -> bool {
    let empty = BTreeMap::new();
    let labels = labels.unwrap_or(&empty);
    if let Some(ml) = &sel.match_labels
        && ml.iter().any(|(k, v)| labels.get(k) != Some(v))
    {
        return false;
    }
    for e in sel.match_expressions.iter().flatten() {
        let have = labels.get(&e.key);
        let vals = e.values.as_deref().unwrap_or(&[]);
        let ok = match e.operator.as_str() {
            "In" => have.is_some_and(|v| vals.contains(v)),
            "NotIn" => !have.is_some_and(|v| vals.contains(v)),
            "Exists" => have.is_some(),
            "DoesNotExist" => have.is_none(),
            _ => false,
        };
        if !ok {
            return false;
        }
    }
    true
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

/// Whether a pod counts as alive for its controller: not terminating, not finished.
pub fn pod_active(p: &Pod) -> bool {
    p.metadata.deletion_timestamp.is_none()
        && !matches!(
            p.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        )
}

/// Whether the pod's Ready condition is True.
pub fn pod_ready(p: &Pod) -> bool {
    ready_since(p).is_some()
}

/// Whether the node's Ready condition is True.
pub fn node_ready(n: &Node) -> bool {
    n.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
        .is_some_and(|c| c.status == "True")
}

/// When the pod's Ready condition last turned True.
pub fn ready_since(p: &Pod) -> Option<jiff::Timestamp> {
    let c = p
        .status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready" && c.status == "True")?;
    Some(
        c.last_transition_time
            .as_ref()
            .map(|t| t.0)
            .unwrap_or(jiff::Timestamp::UNIX_EPOCH),
    )
}

/// Whether the pod has been ready for at least `min_ready` seconds (kube's "available").
pub fn pod_available(p: &Pod, min_ready: i32, now: jiff::Timestamp) -> bool {
    match ready_since(p) {
        Some(t) => min_ready <= 0 || now.as_second() - t.as_second() >= i64::from(min_ready),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    use super::*;

    #[test]
    fn label_selectors_match_labels_and_expressions() {
        let labels: BTreeMap<String, String> = [
            ("app".to_string(), "web".to_string()),
            ("tier".into(), "front".into()),
        ]
        .into();
        let mut sel = LabelSelector {
            match_labels: Some([("app".to_string(), "web".to_string())].into()),
            ..Default::default()
        };
        assert!(selector_matches(&sel, Some(&labels)));
        sel.match_expressions = Some(vec![LabelSelectorRequirement {
            key: "tier".into(),
            operator: "In".into(),
            values: Some(vec!["back".into()]),
        }]);
        assert!(!selector_matches(&sel, Some(&labels)));
        sel.match_expressions = Some(vec![LabelSelectorRequirement {
            key: "canary".into(),
            operator: "DoesNotExist".into(),
            values: None,
        }]);
        assert!(selector_matches(&sel, Some(&labels)));
        assert!(!selector_matches(&sel, None));
        assert!(selector_matches(&LabelSelector::default(), None));
    }
}

/// Which actors a process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Actors {
    Scheduler,
    Controllers,
    Both,
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

/// Runs the chosen actors, each under its own leader-election lease.
pub async fn run(
    client: Client,
    actors: Actors,
    election: leader::Config,
    node_opts: crate::controllers::node::Options,
) {
    let host = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().to_string())
        .unwrap_or_default();
    let mut id = [0u8; 4];
    let _ = getrandom::fill(&mut id);
    let identity = format!("{host}_{}_{}", std::process::id(), hex::encode(id));
    let caches = Caches::start(&client);
    let sched = async {
        if actors != Actors::Controllers {
            let leading = leader::elect(
                client.clone(),
                "kube-scheduler".into(),
                identity.clone(),
                election,
            );
            crate::scheduler::run(client.clone(), caches.clone(), leading).await;
        }
    };
    let ctrl = async {
        if actors != Actors::Scheduler {
            let leading = leader::elect(
                client.clone(),
                "kube-controller-manager".into(),
                identity.clone(),
                election,
            );
            crate::controllers::run(client.clone(), caches.clone(), leading, node_opts).await;
        }
    };
    tokio::join!(sched, ctrl);
}
