//! The scheduler: binds pending pods to nodes through `pods/binding`.
//!
//! Each pass takes the unbound pods (`spec.nodeName` empty, `schedulerName` default or keelson,
//! not in back-off) and runs kube-scheduler's filters on every node, in its order, the first
//! failure naming the node's reason: NodeUnschedulable, TaintToleration (NoSchedule/NoExecute;
//! a node that is not Ready counts as tainted `node.kubernetes.io/not-ready`), NodeAffinity
//! (nodeSelector and required node affinity), NodePorts, NodeResourcesFit (cpu, memory, pods
//! against allocatable minus what bound and just-bound pods request), VolumeBinding (claims
//! present and bound, their volumes' node affinity; see `volumes`). Feasible nodes are scored
//! by least-allocated resources plus spreading of pods with the same owner; the best one wins.
//!
//! Bound pods are "assumed" on their node at once, so the next pod in the same pass sees the
//! capacity taken, until the cache shows the binding. A pod that fits nowhere gets a
//! PodScheduled=False condition and a FailedScheduling event in kube-scheduler's words, and is
//! retried with back-off (1 s doubling to 10 s) and whenever nodes change. A pod that fits
//! nowhere may preempt pods of lower priority (`preemption`).

mod preemption;
mod volumes;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use k8s_openapi::api::core::v1::{Node, Pod, Taint};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};
use tokio::{sync::watch, time::Instant};

use crate::{
    control::{
        Caches, controller_uid,
        recorder::Recorder,
        runner::{self, Controller, PassError},
    },
    kinds::node::node_ready,
    kinds::quantity,
    kinds::scheduling::{affinity_matches, tolerates},
};

/// Scheduler names this scheduler serves.
const NAMES: [&str; 2] = ["default-scheduler", "keelson"];
const BIND_CONCURRENCY: usize = 32;
const INITIAL_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// How soon a pod whose volumes are being provisioned is looked at again.
const VOLUME_WAIT: Duration = Duration::from_millis(500);

/// Unbound pods with a nominated node, by the node's index.
type Nominated = Vec<(usize, Arc<Pod>)>;

/// What a pod asks of a node.
#[derive(Debug, Default, Clone, Copy)]
pub struct Request {
    pub milli_cpu: i64,
    pub memory: i64,
}

/// Requests of a pod: the larger of the sum over app containers and any one init container.
pub fn pod_request(p: &Pod) -> Request {
    let Some(spec) = &p.spec else {
        return Request::default();
    };
    let one = |c: &k8s_openapi::api::core::v1::Container| {
        let r = c.resources.as_ref();
        let get = |k: &str| {
            r.and_then(|r| r.requests.as_ref().and_then(|m| m.get(k)))
                .or_else(|| r.and_then(|r| r.limits.as_ref().and_then(|m| m.get(k))))
                .map(|q| q.0.clone())
        };
        Request {
            milli_cpu: get("cpu")
                .and_then(|q| quantity::millicores(&q))
                .unwrap_or(0),
            memory: get("memory").and_then(|q| quantity::bytes(&q)).unwrap_or(0),
        }
    };
    let mut sum = Request::default();
    for c in &spec.containers {
        let r = one(c);
        sum.milli_cpu += r.milli_cpu;
        sum.memory += r.memory;
    }
    for c in spec.init_containers.iter().flatten() {
        let r = one(c);
        sum.milli_cpu = sum.milli_cpu.max(r.milli_cpu);
        sum.memory = sum.memory.max(r.memory);
    }
    sum
}

/// A node as the filters see it.
#[derive(Debug, Clone)]
struct NodeInfo {
    node: Arc<Node>,
    alloc_cpu: i64,
    alloc_mem: i64,
    alloc_pods: i64,
    used: Request,
    pods: i64,
    ports: HashSet<(String, String, i32)>,
    /// Pods per controlling owner uid, for spreading.
    owners: HashMap<String, i64>,
    /// The pods counted here (what preemption may choose victims from).
    members: Vec<Arc<Pod>>,
}

impl NodeInfo {
    fn new(node: Arc<Node>) -> NodeInfo {
        let alloc = node
            .status
            .as_ref()
            .and_then(|s| s.allocatable.as_ref().or(s.capacity.as_ref()).cloned());
        let get = |k: &str| alloc.as_ref().and_then(|m| m.get(k)).map(|q| q.0.clone());
        NodeInfo {
            alloc_cpu: get("cpu")
                .and_then(|q| quantity::millicores(&q))
                .unwrap_or(i64::MAX / 4),
            alloc_mem: get("memory")
                .and_then(|q| quantity::bytes(&q))
                .unwrap_or(i64::MAX / 4),
            alloc_pods: get("pods").and_then(|q| q.parse().ok()).unwrap_or(110),
            node,
            used: Request::default(),
            pods: 0,
            ports: HashSet::new(),
            owners: HashMap::new(),
            members: vec![],
        }
    }

    fn add_member(&mut self, p: Arc<Pod>) {
        self.add(&p);
        self.members.push(p);
    }

    /// The node as it would be without the pods of `uids`.
    fn without(&self, uids: &[String]) -> NodeInfo {
        let mut ni = NodeInfo::new(self.node.clone());
        for p in &self.members {
            if !uids.iter().any(|u| p.metadata.uid.as_deref() == Some(u)) {
                ni.add_member(p.clone());
            }
        }
        ni
    }

    fn add(&mut self, p: &Pod) {
        let r = pod_request(p);
        self.used.milli_cpu += r.milli_cpu;
        self.used.memory += r.memory;
        self.pods += 1;
        self.ports.extend(host_ports(p));
        if let Some(o) = controller_uid(p) {
            *self.owners.entry(o.to_string()).or_default() += 1;
        }
    }
}

fn host_ports(p: &Pod) -> Vec<(String, String, i32)> {
    let Some(spec) = &p.spec else { return vec![] };
    spec.containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .filter(|cp| cp.host_port.unwrap_or(0) > 0)
        .map(|cp| {
            (
                cp.host_ip.clone().unwrap_or_else(|| "0.0.0.0".into()),
                cp.protocol.clone().unwrap_or_else(|| "TCP".into()),
                cp.host_port.unwrap_or(0),
            )
        })
        .collect()
}

/// Runs the filters; `Err` holds the reasons this node does not fit (usually one).
fn filter(
    p: &Pod,
    req: Request,
    ni: &NodeInfo,
    vols: Option<(&volumes::Needs, &Caches)>,
) -> Result<(), Vec<String>> {
    let n = &ni.node;
    let spec = p.spec.as_ref();
    let tols = spec.and_then(|s| s.tolerations.as_deref()).unwrap_or(&[]);
    let unschedulable = n
        .spec
        .as_ref()
        .and_then(|s| s.unschedulable)
        .unwrap_or(false);
    if unschedulable
        && !tolerates(
            tols,
            &Taint {
                key: "node.kubernetes.io/unschedulable".into(),
                effect: "NoSchedule".into(),
                ..Default::default()
            },
        )
    {
        return Err(vec!["node(s) were unschedulable".into()]);
    }
    let mut taints: Vec<Taint> = n
        .spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default();
    if !node_ready(n)
        && !taints
            .iter()
            .any(|t| t.key.starts_with("node.kubernetes.io/"))
    {
        taints.push(Taint {
            key: "node.kubernetes.io/not-ready".into(),
            effect: "NoSchedule".into(),
            ..Default::default()
        });
    }
    if let Some(t) = taints
        .iter()
        .filter(|t| t.effect == "NoSchedule" || t.effect == "NoExecute")
        .find(|t| !tolerates(tols, t))
    {
        return Err(vec![format!(
            "node(s) had untolerated taint {{{}: {}}}",
            t.key,
            t.value.as_deref().unwrap_or("")
        )]);
    }
    if !affinity_matches(p, n) {
        return Err(vec![
            "node(s) didn't match Pod's node affinity/selector".into(),
        ]);
    }
    let wanted = host_ports(p);
    let clash = wanted.iter().any(|(ip, proto, port)| {
        ni.ports.iter().any(|(hip, hproto, hport)| {
            hport == port && hproto == proto && (hip == ip || hip == "0.0.0.0" || ip == "0.0.0.0")
        })
    });
    if clash {
        return Err(vec![
            "node(s) didn't have free ports for the requested pod ports".into(),
        ]);
    }
    if let Some((needs, caches)) = vols {
        volumes::fits(needs, n, caches).map_err(|e| vec![e])?;
    }
    let mut why = vec![];
    if ni.pods + 1 > ni.alloc_pods {
        why.push("Too many pods".to_string());
    }
    if req.milli_cpu > 0 && ni.used.milli_cpu + req.milli_cpu > ni.alloc_cpu {
        why.push("Insufficient cpu".into());
    }
    if req.memory > 0 && ni.used.memory + req.memory > ni.alloc_mem {
        why.push("Insufficient memory".into());
    }
    if why.is_empty() { Ok(()) } else { Err(why) }
}

/// Higher is better: least-allocated (0–100) plus spreading of the owner's pods (0–100).
fn score(p: &Pod, req: Request, ni: &NodeInfo, max_same_owner: i64) -> i64 {
    let frac = |used: i64, want: i64, alloc: i64| {
        if alloc <= 0 || alloc >= i64::MAX / 8 {
            return 100;
        }
        ((alloc - used - want).max(0) * 100) / alloc
    };
    let least = (frac(ni.used.milli_cpu, req.milli_cpu, ni.alloc_cpu)
        + frac(ni.used.memory, req.memory, ni.alloc_mem)
        + frac(ni.pods, 1, ni.alloc_pods))
        / 3;
    let same = controller_uid(p)
        .and_then(|o| ni.owners.get(o).copied())
        .unwrap_or(0);
    let spread = if max_same_owner == 0 {
        100
    } else {
        100 - (same * 100) / (max_same_owner + 1)
    };
    least + spread
}

/// kube-scheduler's summary: `0/3 nodes are available: 1 Insufficient cpu, 2 node(s) ...`.
pub fn unschedulable_message(total: usize, reasons: &BTreeMap<String, usize>) -> String {
    if total == 0 {
        return "no nodes available to schedule pods".into();
    }
    let parts: Vec<String> = reasons.iter().map(|(r, n)| format!("{n} {r}")).collect();
    format!("0/{total} nodes are available: {}.", parts.join(", "))
}

fn serves(p: &Pod) -> bool {
    let spec = p.spec.as_ref();
    let name = spec
        .and_then(|s| s.scheduler_name.as_deref())
        .unwrap_or("default-scheduler");
    spec.and_then(|s| s.node_name.as_deref())
        .unwrap_or("")
        .is_empty()
        && p.metadata.deletion_timestamp.is_none()
        && NAMES.contains(&name)
        && !matches!(
            p.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        )
}

fn uid(p: &Pod) -> String {
    p.metadata.uid.clone().unwrap_or_default()
}

/// Runs the scheduler while `leading` is true.
pub async fn run(client: Client, caches: Caches, leading: watch::Receiver<bool>) {
    let s = Scheduler {
        recorder: Recorder::new(client.clone(), "default-scheduler"),
        client,
        node_version: *caches.nodes.changed.borrow(),
        caches: caches.clone(),
        assumed: HashMap::new(),
        waiting: HashMap::new(),
        bound_before: HashSet::new(),
        held_before: HashSet::new(),
        rotate: 0,
        nominations: HashMap::new(),
    };
    runner::run(s, &caches, leading).await;
}

/// Where an unschedulable pod stands: its next try, its back-off, the last message reported.
type Waiting = (Instant, Duration, String);

struct Scheduler {
    client: Client,
    recorder: Recorder,
    caches: Caches,
    /// Pods bound by us that the cache does not show bound yet: uid → (pod, node).
    assumed: HashMap<String, (Arc<Pod>, String)>,
    /// Unschedulable pods by uid.
    waiting: HashMap<String, Waiting>,
    node_version: u64,
    /// Bound pods seen in the previous pass: when one goes, its capacity is free again.
    bound_before: HashSet<String>,
    /// Bound pods, terminating ones too, seen in the previous pass: when one is gone for good,
    /// what it held is free (a preemptor waits for that).
    held_before: HashSet<String>,
    /// Where the next pod's node search starts (spreads equal scores).
    rotate: usize,
    /// Nodes nominated for pods that preempted (uid → node), known here before the cache
    /// shows the pods' `nominatedNodeName`, so that one pod never preempts twice for one place.
    nominations: HashMap<String, String>,
}

impl Controller for Scheduler {
    fn name(&self) -> &'static str {
        "default-scheduler"
    }

    fn signals(&self, caches: &Caches) -> Vec<watch::Receiver<u64>> {
        vec![
            caches.pods.changed.clone(),
            caches.nodes.changed.clone(),
            caches.claims.changed.clone(),
            caches.volumes.changed.clone(),
        ]
    }

    fn period(&self) -> Duration {
        Duration::from_millis(500)
    }

    async fn pass(&mut self) -> Result<(), PassError> {
        // Pods that preempted keep the room made for them on their nominated node: pods of
        // lower or equal priority are placed as if they were there (kube-scheduler's
        // nominated pods).
        let (mut infos, pending, mut nominated) = self.snapshot();
        let mut binds = tokio::task::JoinSet::new();
        for p in pending {
            let needs = match volumes::needs(&self.caches, &p) {
                Ok(n) => n,
                Err(why) => {
                    let msg = format!("0/{} nodes are available: {why}.", infos.len());
                    self.unschedulable(&p, msg);
                    continue;
                }
            };
            let ahead: Vec<&(usize, Arc<Pod>)> = nominated
                .iter()
                .filter(|(_, q)| {
                    uid(q) != uid(&p) && preemption::priority(q) >= preemption::priority(&p)
                })
                .collect();
            let picked = if ahead.is_empty() {
                self.pick_node(&p, &infos, &needs)
            } else {
                let mut view = infos.clone();
                for (i, q) in ahead {
                    view[*i].add(q);
                }
                self.pick_node(&p, &view, &needs)
            };
            match picked {
                Ok(i) => {
                    nominated.retain(|(_, q)| uid(q) != uid(&p));
                    self.nominations.remove(&uid(&p));
                    let node = infos[i].node.metadata.name.clone().unwrap_or_default();
                    if !needs.delayed.is_empty() {
                        // The claims' volumes come first; the pod is bound once they are.
                        if let Err(e) = volumes::select_node(&self.client, &needs, &node).await {
                            tracing::debug!(pod = ?p.metadata.name, error = %e, "selecting the claims' node");
                        }
                        self.waiting.insert(
                            uid(&p),
                            (
                                Instant::now() + VOLUME_WAIT,
                                INITIAL_BACKOFF / 2,
                                String::new(),
                            ),
                        );
                        continue;
                    }
                    infos[i].add_member(p.clone());
                    self.assumed.insert(uid(&p), (p.clone(), node.clone()));
                    self.waiting.remove(&uid(&p));
                    if binds.len() >= BIND_CONCURRENCY {
                        handle_bind(binds.join_next().await, &mut self.assumed);
                    }
                    binds.spawn(bind_and_report(
                        self.client.clone(),
                        self.recorder.clone(),
                        p,
                        node,
                    ));
                }
                Err(reasons) => {
                    if preemption::eligible(&p, self.nominated_node(&p).as_deref(), &infos) {
                        let req = pod_request(&p);
                        let fits = |ni: &NodeInfo| {
                            filter(&p, req, ni, Some((&needs, &self.caches))).is_ok()
                        };
                        if let Some((i, victims)) = preemption::plan(&p, &infos, fits) {
                            self.preempt(&p, &infos[i], victims);
                        }
                    }
                    let msg = unschedulable_message(infos.len(), &reasons);
                    self.unschedulable(&p, msg);
                }
            }
        }
        while let Some(r) = binds.join_next().await {
            handle_bind(Some(r), &mut self.assumed);
        }
        Ok(())
    }
}

impl Scheduler {
    /// The nodes with what is bound or assumed on them, the pods to schedule now (highest
    /// priority, then oldest, first), and the unbound pods with a nominated node (its index).
    /// Waiting pods are let go early when nodes changed or a bound pod went.
    fn snapshot(&mut self) -> (Vec<NodeInfo>, Vec<Arc<Pod>>, Nominated) {
        let nv = *self.caches.nodes.changed.borrow();
        if nv != self.node_version {
            // Nodes changed: every waiting pod may fit now.
            self.node_version = nv;
            self.retry_waiting();
        }
        let nodes = self.caches.nodes.all();
        let mut infos: Vec<NodeInfo> = nodes.iter().cloned().map(NodeInfo::new).collect();
        let index: HashMap<String, usize> = infos
            .iter()
            .enumerate()
            .map(|(i, ni)| (ni.node.metadata.name.clone().unwrap_or_default(), i))
            .collect();
        let all = self.caches.pods.all();
        let mut pending = vec![];
        let mut nominated = vec![];
        let mut live: HashSet<String> = HashSet::with_capacity(all.len());
        let mut bound_now: HashSet<String> = HashSet::new();
        let mut held_now: HashSet<String> = HashSet::new();
        for p in &all {
            live.insert(uid(p));
            let node = p
                .spec
                .as_ref()
                .and_then(|s| s.node_name.as_deref())
                .unwrap_or("");
            if node.is_empty() {
                if serves(p)
                    && let Some(&i) = self.nominated_node(p).and_then(|n| index.get(&n))
                {
                    nominated.push((i, p.clone()));
                }
                if serves(p) && !self.assumed.contains_key(&uid(p)) {
                    pending.push(p.clone());
                }
                continue;
            }
            self.assumed.remove(&uid(p));
            if p.metadata.deletion_timestamp.is_none() {
                bound_now.insert(uid(p));
            }
            held_now.insert(uid(p));
            let finished = matches!(
                p.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            );
            if let (false, Some(&i)) = (finished, index.get(node)) {
                infos[i].add_member(p.clone());
            }
        }
        if self.bound_before.iter().any(|u| !bound_now.contains(u))
            || self.held_before.iter().any(|u| !held_now.contains(u))
        {
            // A bound pod went away (or is going): waiting pods may fit now.
            self.retry_waiting();
        }
        self.bound_before = bound_now;
        self.held_before = held_now;
        self.assumed.retain(|u, _| live.contains(u));
        self.waiting.retain(|u, _| live.contains(u));
        let held = &self.held_before;
        self.nominations
            .retain(|u, _| live.contains(u) && !held.contains(u));
        for (p, node) in self.assumed.values() {
            if let Some(&i) = index.get(node) {
                infos[i].add_member(p.clone());
            }
        }
        let now = Instant::now();
        pending.retain(|p| self.waiting.get(&uid(p)).is_none_or(|w| w.0 <= now));
        pending.sort_by_key(|p| {
            (
                -p.spec.as_ref().and_then(|s| s.priority).unwrap_or(0),
                p.metadata.creation_timestamp.as_ref().map(|t| t.0),
                p.metadata.name.clone(),
            )
        });
        (infos, pending, nominated)
    }

    fn retry_waiting(&mut self) {
        for w in self.waiting.values_mut() {
            w.0 = Instant::now();
        }
    }

    /// The best node for `p` (filters, then scores; equal scores spread by a rotating
    /// start), or why no node fits: each reason with the number of nodes it ruled out.
    fn pick_node(
        &mut self,
        p: &Pod,
        infos: &[NodeInfo],
        needs: &volumes::Needs,
    ) -> Result<usize, BTreeMap<String, usize>> {
        let req = pod_request(p);
        let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
        let max_same = controller_uid(p)
            .map(|o| {
                infos
                    .iter()
                    .filter_map(|ni| ni.owners.get(o))
                    .copied()
                    .max()
                    .unwrap_or(0)
            })
            .unwrap_or(0);
        let mut best: Option<(i64, usize)> = None;
        let n = infos.len();
        for k in 0..n {
            let i = (k + self.rotate) % n;
            match filter(p, req, &infos[i], Some((needs, &self.caches))) {
                Ok(()) => {
                    let s = score(p, req, &infos[i], max_same);
                    if best.is_none_or(|(b, _)| s > b) {
                        best = Some((s, i));
                    }
                }
                Err(why) => {
                    for w in why {
                        *reasons.entry(w).or_default() += 1;
                    }
                }
            }
        }
        self.rotate = self.rotate.wrapping_add(1);
        best.map(|(_, i)| i).ok_or(reasons)
    }

    /// The node `p` preempted for: this scheduler's record, else the pod's status.
    fn nominated_node(&self, p: &Pod) -> Option<String> {
        self.nominations.get(&uid(p)).cloned().or_else(|| {
            p.status
                .as_ref()?
                .nominated_node_name
                .clone()
                .filter(|n| !n.is_empty())
        })
    }

    /// Evicts `victims` from `ni`'s node for `p` (each marked with kube's DisruptionTarget
    /// condition, a Preempted event, then deleted with its grace period) and nominates the
    /// node for `p`, which is bound there once they are gone.
    fn preempt(&mut self, p: &Arc<Pod>, ni: &NodeInfo, victims: Vec<Arc<Pod>>) {
        let node = ni.node.metadata.name.clone().unwrap_or_default();
        self.nominations.insert(uid(p), node.clone());
        let scheduler = p
            .spec
            .as_ref()
            .and_then(|s| s.scheduler_name.clone())
            .unwrap_or_else(|| "default-scheduler".into());
        tracing::info!(pod = ?p.metadata.name, node, victims = victims.len(), "preempting");
        for v in &victims {
            self.recorder.event(
                v.as_ref(),
                false,
                "Preempted",
                format!("Preempted by pod {} on node {node}", uid(p)),
            );
        }
        let client = self.client.clone();
        let (ns, name) = (
            p.metadata.namespace.clone().unwrap_or_default(),
            p.metadata.name.clone().unwrap_or_default(),
        );
        tokio::spawn(async move {
            let now = jiff::Timestamp::now()
                .strftime("%Y-%m-%dT%H:%M:%SZ")
                .to_string();
            for v in victims {
                let api: Api<Pod> = Api::namespaced(
                    client.clone(),
                    v.metadata.namespace.as_deref().unwrap_or(""),
                );
                let vname = v.metadata.name.clone().unwrap_or_default();
                let cond = serde_json::json!({"status": {"conditions": [{
                    "type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler",
                    "message": format!("{scheduler}: preempting to accommodate a higher priority pod"),
                    "lastTransitionTime": now}]}});
                if let Err(e) = api
                    .patch_status(&vname, &PatchParams::default(), &Patch::Strategic(&cond))
                    .await
                {
                    tracing::debug!(pod = %vname, error = %e, "DisruptionTarget condition");
                }
                if let Err(e) = api.delete(&vname, &Default::default()).await {
                    tracing::debug!(pod = %vname, error = %e, "deleting a preempted pod");
                }
            }
            let api: Api<Pod> = Api::namespaced(client, &ns);
            let nominate = serde_json::json!({"status": {"nominatedNodeName": node}});
            if let Err(e) = api
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(&nominate))
                .await
            {
                tracing::debug!(pod = %name, error = %e, "nominating a node");
            }
        });
    }

    /// `p` fits nowhere: back off (1 s doubling to 10 s), a FailedScheduling event, and the
    /// PodScheduled=False condition when the message changed.
    fn unschedulable(&mut self, p: &Arc<Pod>, msg: String) {
        let now = Instant::now();
        let entry = self
            .waiting
            .entry(uid(p))
            .or_insert((now, INITIAL_BACKOFF / 2, String::new()));
        entry.1 = (entry.1 * 2).clamp(INITIAL_BACKOFF, MAX_BACKOFF);
        entry.0 = now + entry.1;
        let first = entry.2 != msg;
        entry.2 = msg.clone();
        self.recorder
            .event(p.as_ref(), true, "FailedScheduling", msg.clone());
        if !first {
            return;
        }
        let pods: Api<Pod> = Api::namespaced(
            self.client.clone(),
            p.metadata.namespace.as_deref().unwrap_or("default"),
        );
        let name = p.metadata.name.clone().unwrap_or_default();
        tokio::spawn(async move {
            let patch = serde_json::json!({"status": {"conditions": [{
                "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                "message": msg, "lastTransitionTime": jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
            }]}});
            if let Err(e) = pods
                .patch_status(&name, &PatchParams::default(), &Patch::Strategic(&patch))
                .await
            {
                tracing::debug!(pod = %name, error = %e, "PodScheduled condition");
            }
        });
    }
}

/// Binds `p` to `node` and records the Scheduled event; the pod's uid and the outcome.
async fn bind_and_report(
    client: Client,
    recorder: Recorder,
    p: Arc<Pod>,
    node: String,
) -> (String, kube::Result<()>) {
    let r = bind(&client, &p, &node).await;
    if r.is_ok() {
        let ns = p.metadata.namespace.as_deref().unwrap_or("default");
        let name = p.metadata.name.as_deref().unwrap_or("");
        recorder.event(
            p.as_ref(),
            false,
            "Scheduled",
            format!("Successfully assigned {ns}/{name} to {node}"),
        );
    }
    (uid(&p), r)
}

fn handle_bind(
    r: Option<Result<(String, kube::Result<()>), tokio::task::JoinError>>,
    assumed: &mut HashMap<String, (Arc<Pod>, String)>,
) {
    if let Some(Ok((uid, Err(e)))) = r {
        tracing::debug!(%uid, error = %e, "binding failed; the pod goes back to the queue");
        assumed.remove(&uid);
    }
}

async fn bind(client: &Client, p: &Pod, node: &str) -> kube::Result<()> {
    let ns = p.metadata.namespace.as_deref().unwrap_or("default");
    let name = p.metadata.name.as_deref().unwrap_or("");
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let binding = serde_json::json!({
        "apiVersion": "v1", "kind": "Binding",
        "metadata": {"name": name, "namespace": ns, "uid": p.metadata.uid},
        "target": {"apiVersion": "v1", "kind": "Node", "name": node},
    });
    api.create_subresource::<_, serde_json::Value>(
        "binding",
        name,
        &PostParams::default(),
        &binding,
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, cpu: &str, ready: bool) -> Arc<Node> {
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "labels": {"disk": "ssd"}},
                "status": {"allocatable": {"cpu": cpu, "memory": "1Gi", "pods": "3"},
                           "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]},
            }))
            .unwrap(),
        )
    }

    fn pod(cpu: &str, extra: serde_json::Value) -> Pod {
        let mut p = serde_json::json!({
            "metadata": {"name": "p", "uid": "u"},
            "spec": {"containers": [{"name": "c", "image": "x", "resources": {"requests": {"cpu": cpu}}}]},
        });
        if let (Some(s), Some(e)) = (p["spec"].as_object_mut(), extra.as_object()) {
            s.extend(e.clone());
        }
        serde_json::from_value(p).unwrap()
    }

    #[test]
    fn filters_give_kube_schedulers_reasons() {
        let ni = NodeInfo::new(node("n1", "1", true));
        let p = pod("1500m", serde_json::json!({}));
        assert_eq!(
            filter(&p, pod_request(&p), &ni, None),
            Err(vec!["Insufficient cpu".to_string()])
        );
        let p = pod("500m", serde_json::json!({"nodeSelector": {"disk": "hdd"}}));
        assert_eq!(
            filter(&p, pod_request(&p), &ni, None),
            Err(vec![
                "node(s) didn't match Pod's node affinity/selector".to_string()
            ])
        );
        let p = pod("500m", serde_json::json!({"nodeSelector": {"disk": "ssd"}}));
        assert_eq!(filter(&p, pod_request(&p), &ni, None), Ok(()));
        let not_ready = NodeInfo::new(node("n2", "1", false));
        assert_eq!(
            filter(&p, pod_request(&p), &not_ready, None),
            Err(vec![
                "node(s) had untolerated taint {node.kubernetes.io/not-ready: }".to_string()
            ])
        );
        let tolerant = pod(
            "500m",
            serde_json::json!({"tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists"}]}),
        );
        assert_eq!(
            filter(&tolerant, pod_request(&tolerant), &not_ready, None),
            Ok(())
        );
        let mut full = NodeInfo::new(node("n3", "4", true));
        for _ in 0..3 {
            full.add(&pod("100m", serde_json::json!({})));
        }
        assert_eq!(
            filter(&p, pod_request(&p), &full, None),
            Err(vec!["Too many pods".to_string()])
        );
    }

    #[test]
    fn the_summary_reads_like_kube_schedulers() {
        let reasons: BTreeMap<String, usize> = [
            ("Insufficient cpu".to_string(), 1),
            (
                "node(s) had untolerated taint {node.kubernetes.io/unreachable: }".to_string(),
                2,
            ),
        ]
        .into();
        assert_eq!(
            unschedulable_message(3, &reasons),
            "0/3 nodes are available: 1 Insufficient cpu, 2 node(s) had untolerated taint {node.kubernetes.io/unreachable: }."
        );
    }

    #[test]
    fn init_containers_count_by_their_maximum() {
        let p: Pod = serde_json::from_value(serde_json::json!({
            "spec": {"containers": [{"name": "a", "resources": {"requests": {"cpu": "100m", "memory": "10Mi"}}},
                                    {"name": "b", "resources": {"limits": {"cpu": "200m"}}}],
                     "initContainers": [{"name": "i", "resources": {"requests": {"cpu": "1"}}}]}
        }))
        .unwrap();
        let r = pod_request(&p);
        assert_eq!((r.milli_cpu, r.memory), (1000, 10 << 20));
    }
}
