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
    let api: Api<Node> = Api::all(client.clone());
    let now = jiff::Timestamp::now();
    let mut used: HashSet<Ipv4Net> = nodes
        .iter()
        .filter_map(|n| n.spec.as_ref()?.pod_cidr.as_ref()?.parse().ok())
        .collect();
    for n in &nodes {
        let name = n.metadata.name.clone().unwrap_or_default();
        if n.metadata.deletion_timestamp.is_some() {
            continue;
        }
        // IPAM.
        if n.spec.as_ref().and_then(|s| s.pod_cidr.as_ref()).is_none() {
            match next_cidr(opts, &used) {
                Some(cidr) => {
                    used.insert(cidr);
                    let patch = json!({"spec": {"podCIDR": cidr.to_string(), "podCIDRs": [cidr.to_string()]}});
                    api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                        .await?;
                }
                None => rec.event(
                    n.as_ref(),
                    true,
                    "CIDRNotAvailable",
                    format!("Node {name} status is now: CIDRNotAvailable"),
                ),
            }
        }
        // Lifecycle.
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
        let silent = silent.get(&name).copied().unwrap_or(false);
        let mut ready_now = ready.clone();
        if silent && ready != "Unknown" {
            let mut list: Vec<serde_json::Value> = conds
                .iter()
                .filter(|c| ["Ready", "MemoryPressure", "DiskPressure", "PIDPressure"].contains(&c.type_.as_str()))
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
            api.patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Strategic(&json!({"status": {"conditions": list}})),
            )
            .await?;
            rec.event(
                n.as_ref(),
                false,
                "NodeNotReady",
                format!("Node {name} status is now: NodeNotReady"),
            );
            ready_now = "Unknown".into();
        }
        let want_key = match ready_now.as_str() {
            "True" => None,
            "Unknown" if silent || ready == "Unknown" => Some(UNREACHABLE),
            "Unknown" => None,
            _ => Some(NOT_READY),
        };
        let taints = n
            .spec
            .as_ref()
            .and_then(|s| s.taints.clone())
            .unwrap_or_default();
        let mut kept: Vec<Taint> = taints
            .iter()
            .filter(|t| t.key != UNREACHABLE && t.key != NOT_READY)
            .cloned()
            .collect();
        let ours: Vec<Taint> = taints
            .iter()
            .filter(|t| Some(t.key.as_str()) == want_key)
            .cloned()
            .collect();
        let has_all = want_key.is_none_or(|_| ours.len() == 2);
        let has_other = taints.iter().any(|t| {
            (t.key == UNREACHABLE || t.key == NOT_READY) && Some(t.key.as_str()) != want_key
        });
        let mut current = kept.clone();
        if let Some(k) = want_key {
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
        if !has_all || has_other {
            tracing::info!(node = %name, ready = %ready_now, silent, taint = ?want_key, "node taints change");
            kept = current.clone();
            let taints = if kept.is_empty() {
                json!(null)
            } else {
                json!(kept)
            };
            let patch = json!({"spec": {"taints": taints}});
            api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
        }
        // Eviction of pods that do not tolerate the node's NoExecute taints.
        let no_exec: Vec<&Taint> = current.iter().filter(|t| t.effect == "NoExecute").collect();
        if no_exec.is_empty() || full_disruption {
            continue;
        }
        for p in caches.pods.all() {
            if p.spec.as_ref().and_then(|s| s.node_name.as_deref()) != Some(name.as_str())
                || p.metadata.deletion_timestamp.is_some()
            {
                continue;
            }
            let evict = no_exec.iter().any(|t| match tolerates(&p, t) {
                None => true,
                Some(None) => false,
                Some(Some(secs)) => {
                    let added = t.time_added.as_ref().map(|x| x.0).unwrap_or(now);
                    now.as_second() >= added.as_second() + secs
                }
            });
            if evict {
                let ns = p.metadata.namespace.clone().unwrap_or_default();
                let pname = p.metadata.name.clone().unwrap_or_default();
                tracing::info!(node = %name, pod = %format!("{ns}/{pname}"), "evicting a pod that does not tolerate the node's taints");
                let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
                match pods.delete(&pname, &DeleteParams::default()).await {
                    Ok(_) => rec.event(
                        p.as_ref(),
                        false,
                        "TaintManagerEviction",
                        format!("Marking for deletion Pod {ns}/{pname}"),
                    ),
                    Err(kube::Error::Api(e)) if e.code == 404 => {}
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
}
