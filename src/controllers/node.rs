//! Node lifecycle and node IPAM.
//!
//! Lifecycle: a node is heard from through its Lease in `kube-node-lease` (or its Ready
//! condition's heartbeat). When neither moved within the grace period (default 50 s), its
//! conditions turn Unknown (`NodeStatusUnknown`, "Kubelet stopped posting node status.") and it
//! gets the `node.kubernetes.io/unreachable` taints; a node reporting Ready=False gets the
//! `not-ready` ones. Pods on a node with a NoExecute taint they do not tolerate are deleted — at
//! once, or when their toleration's `tolerationSeconds` have passed since the taint was added —
//! and their controllers replace them elsewhere. Taints go when the node is back.
//!
//! IPAM: each Node without `spec.podCIDR` gets the lowest free block of `--cluster-cidr`
//! (default 10.244.0.0/16, /24 per node); a deleted node's block is free again.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::{Node, Pod, Taint};
use kube::{
    Api, Client,
    api::{DeleteParams, Patch, PatchParams},
};
use serde_json::json;
use tokio::sync::watch;

use crate::control::{
    Caches,
    recorder::Recorder,
    runner::{self, Controller, PassError},
};

const UNREACHABLE: &str = "node.kubernetes.io/unreachable";
const NOT_READY: &str = "node.kubernetes.io/not-ready";

/// Settings of the node controllers.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// How long a node may stay silent before it is Unknown.
    pub grace: Duration,
    /// The pod network, cut into per-node blocks.
    pub cluster_cidr: Ipv4Net,
    /// Prefix length of a node's block.
    pub node_prefix: u8,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            grace: Duration::from_secs(50),
            cluster_cidr: "10.244.0.0/16".parse().unwrap_or_default(),
            node_prefix: 24,
        }
    }
}

pub async fn run(client: Client, caches: Caches, leading: watch::Receiver<bool>, opts: Options) {
    let c = NodeLifecycle {
        rec: Recorder::new(client.clone(), "node-controller"),
        client,
        caches: caches.clone(),
        opts,
        probes: Probes::default(),
    };
    runner::run(c, &caches, leading).await;
}

struct NodeLifecycle {
    client: Client,
    rec: Recorder,
    caches: Caches,
    opts: Options,
    probes: Probes,
}

impl Controller for NodeLifecycle {
    fn name(&self) -> &'static str {
        "node-controller"
    }

    fn signals(&self, caches: &Caches) -> Vec<watch::Receiver<u64>> {
        vec![
            caches.nodes.changed.clone(),
            caches.node_leases.changed.clone(),
            caches.pods.changed.clone(),
        ]
    }

    fn period(&self) -> Duration {
        Duration::from_secs(1)
    }

    async fn pass(&mut self) -> Result<(), PassError> {
        Ok(pass(
            &self.client,
            &self.caches,
            &self.rec,
            &self.opts,
            &mut self.probes,
        )
        .await?)
    }

    /// A new term starts with fresh observations.
    fn demoted(&mut self) {
        self.probes.0.clear();
    }
}

fn ts(t: jiff::Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// The next free block of the cluster CIDR.
pub fn next_cidr(opts: &Options, used: &HashSet<Ipv4Net>) -> Option<Ipv4Net> {
    opts.cluster_cidr
        .subnets(opts.node_prefix)
        .ok()?
        .find(|n| !used.contains(n))
}

/// When the node was last heard from: its Lease, its Ready heartbeat, or its creation.
fn last_heard(n: &Node, caches: &Caches) -> Option<jiff::Timestamp> {
    let name = n.metadata.name.as_deref().unwrap_or("");
    let lease = caches
        .node_leases
        .get(Some("kube-node-lease"), name)
        .and_then(|l| l.spec.as_ref()?.renew_time.as_ref().map(|t| t.0));
    let heartbeat = n
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
        .and_then(|c| c.last_heartbeat_time.as_ref().map(|t| t.0));
    let created = n.metadata.creation_timestamp.as_ref().map(|t| t.0);
    [lease, heartbeat, created].into_iter().flatten().max()
}

/// kube-controller-manager's probe timestamps: when this controller (on its own clock) last saw
/// each node's heartbeat move. A node is judged silent by how long it has not moved *as seen
/// from here*, so a control plane that was itself away for a while gives every node a full
/// grace period instead of condemning them all by their stale timestamps.
#[derive(Default)]
struct Probes(HashMap<String, (Option<jiff::Timestamp>, Instant)>);

impl Probes {
    fn silent_for(&mut self, name: &str, heard: Option<jiff::Timestamp>) -> Duration {
        let now = Instant::now();
        let e = self.0.entry(name.to_string()).or_insert((heard, now));
        if e.0 != heard {
            *e = (heard, now);
        }
        now - e.1
    }
}

/// The tolerationSeconds of the pod's toleration for the taint: `None` if not tolerated,
/// `Some(None)` if tolerated forever.
fn tolerates(p: &Pod, t: &Taint) -> Option<Option<i64>> {
    let tols = p.spec.as_ref()?.tolerations.as_deref()?;
    crate::kinds::scheduling::toleration_for(tols, t).map(|tol| tol.toleration_seconds)
}

/// The taint a node's Ready condition calls for: none when Ready, unreachable when its kubelet
/// went silent (or Ready is Unknown from the start), not-ready when it says not ready.
fn wanted_taint(ready_now: &str, ready_before: &str, silent: bool) -> Option<&'static str> {
    match ready_now {
        "True" => None,
        "Unknown" if silent || ready_before == "Unknown" => Some(UNREACHABLE),
        "Unknown" => None,
        _ => Some(NOT_READY),
    }
}

/// The node's taints with the lifecycle ones as `want` says (NoSchedule and NoExecute, the
/// latter stamped `now` when added), and whether that is a change.
fn lifecycle_taints(
    taints: &[Taint],
    want: Option<&str>,
    now: jiff::Timestamp,
) -> (Vec<Taint>, bool) {
    let mut current: Vec<Taint> = taints
        .iter()
        .filter(|t| t.key != UNREACHABLE && t.key != NOT_READY)
        .cloned()
        .collect();
    let ours: Vec<Taint> = taints
        .iter()
        .filter(|t| Some(t.key.as_str()) == want)
        .cloned()
        .collect();
    let has_all = want.is_none_or(|_| ours.len() == 2);
    let has_other = taints
        .iter()
        .any(|t| (t.key == UNREACHABLE || t.key == NOT_READY) && Some(t.key.as_str()) != want);
    if let Some(k) = want {
        if has_all {
            current.extend(ours);
        } else {
            for effect in ["NoSchedule", "NoExecute"] {
                current.push(Taint {
                    key: k.into(),
                    effect: effect.into(),
                    time_added: (effect == "NoExecute")
                        .then_some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now)),
                    value: None,
                });
            }
        }
    }
    (current, !has_all || has_other)
}

/// Pods on `node` that do not tolerate its NoExecute `taints` (or whose tolerationSeconds ran
/// out by `now`): to evict.
fn evictions<'a>(
    pods: &'a [Arc<Pod>],
    node: &str,
    taints: &[&Taint],
    now: jiff::Timestamp,
) -> Vec<&'a Arc<Pod>> {
    pods.iter()
        .filter(|p| {
            p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node)
                && p.metadata.deletion_timestamp.is_none()
        })
        .filter(|p| {
            taints.iter().any(|t| match tolerates(p, t) {
                None => true,
                Some(None) => false,
                Some(Some(secs)) => {
                    let added = t.time_added.as_ref().map(|x| x.0).unwrap_or(now);
                    now.as_second() >= added.as_second() + secs
                }
            })
        })
        .collect()
}

async fn pass(
    client: &Client,
    caches: &Caches,
    rec: &Recorder,
    opts: &Options,
    probes: &mut Probes,
) -> kube::Result<()> {
    let nodes = caches.nodes.all();
    let silent: HashMap<String, bool> = nodes
        .iter()
        .map(|n| {
            let name = n.metadata.name.clone().unwrap_or_default();
            let quiet = probes.silent_for(&name, last_heard(n, caches)) > opts.grace;
            (name, quiet)
        })
        .collect();
    probes.0.retain(|k, _| silent.contains_key(k));
    // Full disruption (no node is Ready): the fault is more likely the control plane's or the
    // network's than every node's, so pods are not evicted (kube's zone FullDisruption state).
    let full_disruption = !nodes.is_empty()
        && nodes.iter().all(|n| {
            !crate::kinds::node::node_ready(n)
                || silent
                    .get(n.metadata.name.as_deref().unwrap_or(""))
                    .copied()
                    .unwrap_or(false)
        });
    let now = jiff::Timestamp::now();
    let mut used: HashSet<Ipv4Net> = nodes
        .iter()
        .filter_map(|n| n.spec.as_ref()?.pod_cidr.as_ref()?.parse().ok())
        .collect();
    let pods = caches.pods.all();
    for n in &nodes {
        if n.metadata.deletion_timestamp.is_some() {
            continue;
        }
        assign_cidr(client, rec, opts, n, &mut used).await?;
        let name = n.metadata.name.clone().unwrap_or_default();
        let silent = silent.get(&name).copied().unwrap_or(false);
        let (ready_before, ready_now) = mark_unknown(client, rec, n, silent, now).await?;
        let want = wanted_taint(&ready_now, &ready_before, silent);
        let taints = n
            .spec
            .as_ref()
            .and_then(|s| s.taints.clone())
            .unwrap_or_default();
        let (current, changed) = lifecycle_taints(&taints, want, now);
        if changed {
            tracing::info!(node = %name, ready = %ready_now, silent, taint = ?want, "node taints change");
            let taints = if current.is_empty() {
                json!(null)
            } else {
                json!(current)
            };
            let patch = json!({"spec": {"taints": taints}});
            Api::<Node>::all(client.clone())
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
        }
        // Eviction of pods that do not tolerate the node's NoExecute taints.
        let no_exec: Vec<&Taint> = current.iter().filter(|t| t.effect == "NoExecute").collect();
        if no_exec.is_empty() || full_disruption {
            continue;
        }
        for p in evictions(&pods, &name, &no_exec, now) {
            evict(client, rec, &name, p).await?;
        }
    }
    Ok(())
}

/// Node IPAM: a node without a pod CIDR gets the next free block (or an event saying none).
async fn assign_cidr(
    client: &Client,
    rec: &Recorder,
    opts: &Options,
    n: &Node,
    used: &mut HashSet<Ipv4Net>,
) -> kube::Result<()> {
    if n.spec.as_ref().and_then(|s| s.pod_cidr.as_ref()).is_some() {
        return Ok(());
    }
    let name = n.metadata.name.clone().unwrap_or_default();
    match next_cidr(opts, used) {
        Some(cidr) => {
            used.insert(cidr);
            let patch =
                json!({"spec": {"podCIDR": cidr.to_string(), "podCIDRs": [cidr.to_string()]}});
            Api::<Node>::all(client.clone())
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
        }
        None => rec.event(
            n,
            true,
            "CIDRNotAvailable",
            format!("Node {name} status is now: CIDRNotAvailable"),
        ),
    }
    Ok(())
}

/// A silent node's conditions turn Unknown (kube's NodeStatusUnknown); its Ready status
/// before and after.
async fn mark_unknown(
    client: &Client,
    rec: &Recorder,
    n: &Node,
    silent: bool,
    now: jiff::Timestamp,
) -> kube::Result<(String, String)> {
    let name = n.metadata.name.clone().unwrap_or_default();
    let conds = n
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default();
    let ready = conds
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| c.status.clone())
        .unwrap_or_else(|| "Unknown".into());
    if !silent || ready == "Unknown" {
        return Ok((ready.clone(), ready));
    }
    let mut list: Vec<serde_json::Value> = conds
        .iter()
        .filter(|c| {
            ["Ready", "MemoryPressure", "DiskPressure", "PIDPressure"].contains(&c.type_.as_str())
        })
        .map(|c| {
            json!({"type": c.type_, "status": "Unknown", "reason": "NodeStatusUnknown",
                   "message": "Kubelet stopped posting node status.", "lastTransitionTime": ts(now),
                   "lastHeartbeatTime": c.last_heartbeat_time})
        })
        .collect();
    if !conds.iter().any(|c| c.type_ == "Ready") {
        list.push(json!({"type": "Ready", "status": "Unknown", "reason": "NodeStatusNeverUpdated",
                         "message": "Kubelet never posted node status.", "lastTransitionTime": ts(now)}));
    }
    Api::<Node>::all(client.clone())
        .patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Strategic(&json!({"status": {"conditions": list}})),
        )
        .await?;
    rec.event(
        n,
        false,
        "NodeNotReady",
        format!("Node {name} status is now: NodeNotReady"),
    );
    Ok((ready, "Unknown".into()))
}

/// Deletes pod `p` from node `node` (kube's TaintManagerEviction).
async fn evict(client: &Client, rec: &Recorder, node: &str, p: &Pod) -> kube::Result<()> {
    let ns = p.metadata.namespace.clone().unwrap_or_default();
    let pname = p.metadata.name.clone().unwrap_or_default();
    tracing::info!(node = %node, pod = %format!("{ns}/{pname}"), "evicting a pod that does not tolerate the node's taints");
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    match pods.delete(&pname, &DeleteParams::default()).await {
        Ok(_) => {
            rec.event(
                p,
                false,
                "TaintManagerEviction",
                format!("Marking for deletion Pod {ns}/{pname}"),
            );
            Ok(())
        }
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_handed_out_lowest_first() {
        let opts = Options::default();
        let mut used = HashSet::new();
        let a = next_cidr(&opts, &used).unwrap();
        assert_eq!(a.to_string(), "10.244.0.0/24");
        used.insert(a);
        used.insert("10.244.2.0/24".parse().unwrap());
        assert_eq!(
            next_cidr(&opts, &used).unwrap().to_string(),
            "10.244.1.0/24"
        );
        let tiny = Options {
            cluster_cidr: "10.0.0.0/24".parse().unwrap(),
            node_prefix: 24,
            ..Default::default()
        };
        let full: HashSet<Ipv4Net> = ["10.0.0.0/24".parse().unwrap()].into();
        assert_eq!(next_cidr(&tiny, &full), None);
    }

    fn taint(key: &str, effect: &str) -> Taint {
        Taint {
            key: key.into(),
            effect: effect.into(),
            ..Default::default()
        }
    }

    #[test]
    fn node_conditions_call_for_kubes_lifecycle_taints() {
        assert_eq!(wanted_taint("True", "True", false), None);
        assert_eq!(wanted_taint("False", "False", false), Some(NOT_READY));
        assert_eq!(wanted_taint("Unknown", "True", true), Some(UNREACHABLE));
        assert_eq!(wanted_taint("Unknown", "Unknown", false), Some(UNREACHABLE));
        let now = jiff::Timestamp::from_second(1000).unwrap();
        let other = taint("dedicated", "NoSchedule");
        // Not ready: both effects added, the NoExecute one stamped; the user's taint kept.
        let (t, changed) = lifecycle_taints(std::slice::from_ref(&other), Some(NOT_READY), now);
        assert!(changed);
        assert_eq!(t.len(), 3);
        let exec = t.iter().find(|x| x.effect == "NoExecute").unwrap();
        assert_eq!(exec.time_added.as_ref().map(|x| x.0), Some(now));
        // Already there: no change. Ready again: ours go, the user's stays.
        assert!(!lifecycle_taints(&t, Some(NOT_READY), now).1);
        let (back, changed) = lifecycle_taints(&t, None, now);
        assert!(changed);
        assert_eq!(back, [other]);
    }

    #[test]
    fn pods_are_evicted_unless_they_tolerate_and_only_after_their_seconds() {
        let now = jiff::Timestamp::from_second(1000).unwrap();
        let mut t = taint(UNREACHABLE, "NoExecute");
        t.time_added = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            jiff::Timestamp::from_second(900).unwrap(),
        ));
        let pod = |name: &str, tolerations: serde_json::Value| -> Arc<Pod> {
            Arc::new(
                serde_json::from_value(serde_json::json!({
                    "metadata": {"name": name, "namespace": "default"},
                    "spec": {"nodeName": "n1", "containers": [], "tolerations": tolerations},
                }))
                .unwrap(),
            )
        };
        let tol = |secs: Option<i64>| {
            let mut v = serde_json::json!({"key": UNREACHABLE, "operator": "Exists", "effect": "NoExecute"});
            if let Some(s) = secs {
                v["tolerationSeconds"] = s.into();
            }
            serde_json::json!([v])
        };
        let pods = [
            pod("intolerant", serde_json::json!([])),
            pod("forever", tol(None)),
            pod("expired", tol(Some(60))),
            pod("still-ok", tol(Some(300))),
        ];
        let names: Vec<&str> = evictions(&pods, "n1", &[&t], now)
            .iter()
            .map(|p| p.metadata.name.as_deref().unwrap_or(""))
            .collect();
        assert_eq!(names, ["intolerant", "expired"]);
        assert!(evictions(&pods, "n2", &[&t], now).is_empty());
    }
}
