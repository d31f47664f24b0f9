//! The DaemonSet controller: one pod per eligible node.
//!
//! A node is eligible when it matches the template's nodeSelector and required node affinity
//! and the pod tolerates its NoSchedule/NoExecute taints (with the tolerations kube adds to
//! every daemon pod: not-ready and unreachable NoExecute, memory/disk/pid pressure and
//! unschedulable NoSchedule). Daemon pods are created bound to their node. Pods on nodes that
//! are no longer eligible, and extra pods on a node, are deleted. `RollingUpdate` replaces pods
//! of an older template (`controller-revision-hash`) while at most `maxUnavailable` are
//! unavailable; `OnDelete` replaces them only when they are deleted.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use k8s_openapi::{
    api::{
        apps::v1::{ControllerRevision, DaemonSet},
        core::v1::{Node, Pod, PodSpec, Taint, Toleration},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{Api, Client};
use tokio::sync::watch;

use crate::{
    control::{
        Caches, controller_ref, controller_uid,
        expect::Expectations,
        history, patch_status,
        pods::{self, PodControl},
        recorder::Recorder,
        runner::{self, Controller, PassError},
    },
    controllers::deployment::resolve,
    kinds::history::template_hash,
    kinds::pod::{pod_active, pod_available, pod_ready},
    kinds::scheduling::{affinity_matches, tolerates},
};

use crate::kinds::history::HASH_LABEL;

pub async fn run(client: Client, caches: Caches, leading: watch::Receiver<bool>) {
    let c = DaemonSets {
        c: PodControl::new(client, &caches, "daemonset-controller"),
    };
    runner::run(c, &caches, leading).await;
}

struct DaemonSets {
    c: PodControl,
}

impl Controller for DaemonSets {
    fn name(&self) -> &'static str {
        "daemonset-controller"
    }

    fn signals(&self, caches: &Caches) -> Vec<watch::Receiver<u64>> {
        vec![
            caches.daemonsets.changed.clone(),
            caches.pods.changed.clone(),
            caches.nodes.changed.clone(),
        ]
    }

    fn period(&self) -> Duration {
        Duration::from_secs(2)
    }

    async fn pass(&mut self) -> Result<(), PassError> {
        let nodes = self.c.caches.nodes.all();
        let pods = self.c.caches.pods.all();
        for ds in self.c.caches.daemonsets.all() {
            if ds.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let revisions = history::owned_by(&self.c.caches, ds.as_ref());
            if let Err(e) = sync(
                &self.c.client,
                &self.c.rec,
                (&ds, &revisions),
                &nodes,
                &pods,
                &mut self.c.expect,
            )
            .await
            {
                tracing::debug!(ds = ?ds.metadata.name, error = %e, "daemonset sync");
            }
        }
        Ok(())
    }
}

/// The tolerations kube's DaemonSet controller adds to every daemon pod.
fn daemon_tolerations(mut tols: Vec<Toleration>) -> Vec<Toleration> {
    let add = [
        ("node.kubernetes.io/not-ready", "NoExecute"),
        ("node.kubernetes.io/unreachable", "NoExecute"),
        ("node.kubernetes.io/disk-pressure", "NoSchedule"),
        ("node.kubernetes.io/memory-pressure", "NoSchedule"),
        ("node.kubernetes.io/pid-pressure", "NoSchedule"),
        ("node.kubernetes.io/unschedulable", "NoSchedule"),
    ];
    for (key, effect) in add {
        if !tols
            .iter()
            .any(|t| t.key.as_deref() == Some(key) && t.effect.as_deref() == Some(effect))
        {
            tols.push(Toleration {
                key: Some(key.into()),
                operator: Some("Exists".into()),
                effect: Some(effect.into()),
                ..Default::default()
            });
        }
    }
    tols
}

fn eligible(template: &Pod, n: &Node) -> bool {
    if n.metadata.deletion_timestamp.is_some() || !affinity_matches(template, n) {
        return false;
    }
    let tols = template
        .spec
        .as_ref()
        .and_then(|s| s.tolerations.clone())
        .unwrap_or_default();
    let taints: Vec<Taint> = n
        .spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default();
    taints
        .iter()
        .filter(|t| t.effect == "NoSchedule" || t.effect == "NoExecute")
        .all(|t| tolerates(&tols, t))
}

fn name_of<K: kube::Resource>(k: &K) -> String {
    k.meta().name.clone().unwrap_or_default()
}

/// What a DaemonSet wants, worked out from the cache alone.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// Nodes that need a daemon pod.
    pub create_on: Vec<String>,
    /// Pods to delete: on nodes that are gone or no longer eligible, duplicates, and outdated
    /// pods the rolling update replaces now.
    pub delete: Vec<String>,
    /// The status, when it differs from the object's.
    pub status: Option<serde_json::Value>,
}

/// The daemon pod template for `ds`: its tolerations extended as kube's controller does.
fn daemon_template(ds: &DaemonSet) -> (ObjectMeta, PodSpec) {
    let spec = ds.spec.clone().unwrap_or_default();
    let meta = spec.template.metadata.clone().unwrap_or_default();
    let mut pod_spec = spec.template.spec.clone().unwrap_or_default();
    pod_spec.tolerations = Some(daemon_tolerations(pod_spec.tolerations.unwrap_or_default()));
    (meta, pod_spec)
}

/// What `ds` wants on `nodes` given its `pods` (those it controls) at `now`: one pod on each
/// eligible node (the newest template's oldest kept), none elsewhere, outdated ones replaced
/// within maxUnavailable (unavailable ones first, as they cost nothing), and its status.
pub fn plan(ds: &DaemonSet, nodes: &[Arc<Node>], pods: &[&Arc<Pod>], now: jiff::Timestamp) -> Plan {
    let spec = ds.spec.clone().unwrap_or_default();
    let hash = template_hash(&serde_json::to_value(&spec.template).unwrap_or_default());
    let (meta, pod_spec) = daemon_template(ds);
    let probe = Pod {
        metadata: meta,
        spec: Some(pod_spec),
        status: None,
    };
    let mut by_node: HashMap<String, Vec<&Arc<Pod>>> = HashMap::new();
    for p in pods.iter().filter(|p| pod_active(p)) {
        let node = p
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default();
        by_node.entry(node).or_default().push(p);
    }
    let min_ready = spec.min_ready_seconds.unwrap_or(0);
    let (mut desired, mut current, mut ready, mut updated, mut available, mut misscheduled) =
        (0, 0, 0, 0, 0, 0);
    let mut plan = Plan::default();
    let mut outdated: Vec<&Arc<Pod>> = vec![];
    let mut unavailable = 0;
    let current_template =
        |p: &Pod| p.metadata.labels.as_ref().and_then(|l| l.get(HASH_LABEL)) == Some(&hash);
    for n in nodes {
        let node = name_of(n.as_ref());
        let mut here = by_node.remove(&node).unwrap_or_default();
        if !eligible(&probe, n) {
            misscheduled += here.len();
            plan.delete.extend(here.iter().map(|p| name_of(p.as_ref())));
            continue;
        }
        desired += 1;
        if here.is_empty() {
            plan.create_on.push(node);
            unavailable += 1;
            continue;
        }
        current += 1;
        // Keep the newest-template, oldest pod; delete the rest.
        here.sort_by_key(|p| {
            (
                !current_template(p),
                p.metadata.creation_timestamp.as_ref().map(|t| t.0),
            )
        });
        let keep = here[0];
        plan.delete
            .extend(here[1..].iter().map(|p| name_of(p.as_ref())));
        if current_template(keep) {
            updated += 1;
        } else {
            outdated.push(keep);
        }
        if pod_ready(keep) {
            ready += 1;
        }
        if pod_available(keep, min_ready, now) {
            available += 1;
        } else {
            unavailable += 1;
        }
    }
    // Pods on nodes that no longer exist.
    let mut gone: Vec<(String, Vec<&Arc<Pod>>)> = by_node.into_iter().collect();
    gone.sort_by(|a, b| a.0.cmp(&b.0));
    for (_, rest) in gone {
        misscheduled += rest.len();
        plan.delete.extend(rest.iter().map(|p| name_of(p.as_ref())));
    }
    // Rolling update: replace outdated pods while few enough are unavailable.
    let strategy = spec.update_strategy.clone().unwrap_or_default();
    if strategy.type_.as_deref() != Some("OnDelete") {
        let ru = strategy.rolling_update.clone().unwrap_or_default();
        let max_unavailable = resolve(ru.max_unavailable.as_ref(), desired, "1", false).max(1);
        let mut budget = (max_unavailable - unavailable).max(0) as usize;
        // Unavailable outdated pods first: replacing them costs nothing.
        outdated.sort_by_key(|p| pod_available(p, min_ready, now));
        for p in outdated {
            if !pod_available(p, min_ready, now) {
                plan.delete.push(name_of(p.as_ref()));
            } else if budget > 0 {
                budget -= 1;
                plan.delete.push(name_of(p.as_ref()));
            }
        }
    }
    let status = serde_json::json!({
        "desiredNumberScheduled": desired,
        "currentNumberScheduled": current,
        "numberMisscheduled": misscheduled,
        "numberReady": ready,
        "updatedNumberScheduled": updated,
        "numberAvailable": available,
        "numberUnavailable": (desired - available).max(0),
        "observedGeneration": ds.metadata.generation.unwrap_or(0),
    });
    let mut old = serde_json::to_value(ds.status.clone().unwrap_or_default()).unwrap_or_default();
    if let Some(o) = old.as_object_mut() {
        for k in [
            "numberAvailable",
            "numberUnavailable",
            "updatedNumberScheduled",
            "observedGeneration",
        ] {
            o.entry(k).or_insert(0.into());
        }
        o.remove("conditions");
        o.remove("collisionCount");
    }
    plan.status = (old != status).then_some(status);
    plan
}

/// Keeps `ds`'s revisions (the ControllerRevisions `kubectl rollout history|undo` read) and
/// carries out its plan.
async fn sync(
    client: &Client,
    rec: &Recorder,
    (ds, revisions): (&Arc<DaemonSet>, &[Arc<ControllerRevision>]),
    nodes: &[Arc<Node>],
    pods: &[Arc<Pod>],
    expect: &mut Expectations,
) -> kube::Result<()> {
    let uid = ds.metadata.uid.clone().unwrap_or_default();
    let ns = ds.metadata.namespace.clone().unwrap_or_default();
    let owned: Vec<&Arc<Pod>> = pods
        .iter()
        .filter(|p| controller_uid(p.as_ref()) == Some(uid.as_str()))
        .collect();
    if expect.waiting(&uid, &owned) {
        return Ok(());
    }
    let ds_name = name_of(ds.as_ref());
    let in_use: HashSet<String> = owned
        .iter()
        .filter_map(|p| p.metadata.labels.as_ref()?.get(HASH_LABEL))
        .map(|h| format!("{ds_name}-{h}"))
        .collect();
    let spec0 = ds.spec.clone().unwrap_or_default();
    history::sync(
        client,
        ds.as_ref(),
        revisions,
        &spec0.template,
        &in_use,
        spec0.revision_history_limit.unwrap_or(10),
    )
    .await?;
    let plan = plan(ds, nodes, &owned, jiff::Timestamp::now());
    let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let spec = ds.spec.clone().unwrap_or_default();
    let hash = template_hash(&serde_json::to_value(&spec.template).unwrap_or_default());
    let (mut meta, pod_spec) = daemon_template(ds);
    meta.labels
        .get_or_insert_with(Default::default)
        .insert(HASH_LABEL.into(), hash);
    meta.name = None;
    meta.generate_name = Some(format!("{}-", name_of(ds.as_ref())));
    meta.namespace = Some(ns.clone());
    meta.owner_references = controller_ref(ds.as_ref()).map(|r| vec![r]);
    let mut created = HashSet::new();
    for node in plan.create_on {
        let mut s = pod_spec.clone();
        s.node_name = Some(node);
        let pod = Pod {
            metadata: meta.clone(),
            spec: Some(s),
            status: None,
        };
        if let Ok(n) = pods::create(&api, rec, ds.as_ref(), &pod).await {
            created.insert(n);
        }
    }
    expect.record(&uid, created, HashSet::new());
    for n in plan.delete {
        pods::delete(&api, rec, ds.as_ref(), &n).await?;
    }
    if let Some(status) = plan.status {
        patch_status::<DaemonSet>(client, &ns, &name_of(ds.as_ref()), status).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ds(update: serde_json::Value) -> DaemonSet {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "agent", "namespace": "kube-system", "uid": "ds1", "generation": 1},
            "spec": {"selector": {"matchLabels": {"app": "agent"}}, "updateStrategy": update,
                     "template": {"metadata": {"labels": {"app": "agent"}},
                                  "spec": {"containers": [{"name": "c", "image": "busybox"}]}}},
        }))
        .unwrap()
    }

    fn node(name: &str, taint: Option<&str>) -> Arc<Node> {
        let mut v = serde_json::json!({"metadata": {"name": name}});
        if let Some(key) = taint {
            v["spec"] = serde_json::json!({"taints": [{"key": key, "effect": "NoSchedule"}]});
        }
        Arc::new(serde_json::from_value(v).unwrap())
    }

    /// A Ready daemon pod of `ds1` on `node`, of template `hash`, created at `age` seconds.
    fn pod(name: &str, node: &str, hash: &str, age: i64) -> Arc<Pod> {
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "namespace": "kube-system",
                    "labels": {"app": "agent", HASH_LABEL: hash},
                    "creationTimestamp": jiff::Timestamp::from_second(age).unwrap().to_string(),
                    "ownerReferences": [{"apiVersion": "apps/v1", "kind": "DaemonSet",
                        "name": "agent", "uid": "ds1", "controller": true}]},
                "spec": {"nodeName": node, "containers": [{"name": "c"}]},
                "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True",
                    "lastTransitionTime": "1970-01-01T00:00:00Z"}]},
            }))
            .unwrap(),
        )
    }

    fn now() -> jiff::Timestamp {
        jiff::Timestamp::from_second(1_000_000).unwrap()
    }

    fn current_hash(d: &DaemonSet) -> String {
        template_hash(&serde_json::to_value(&d.spec.as_ref().unwrap().template).unwrap())
    }

    #[test]
    fn one_pod_per_eligible_node_and_none_elsewhere() {
        let d = ds(serde_json::json!({"type": "RollingUpdate"}));
        let h = current_hash(&d);
        let nodes = [
            node("n1", None),
            node("n2", None),
            node("tainted", Some("dedicated")),
        ];
        let pods = [
            pod("a", "n1", &h, 1),
            pod("a-dup", "n1", &h, 2),
            pod("t", "tainted", &h, 1),
            pod("ghost", "gone-node", &h, 1),
        ];
        let refs: Vec<&Arc<Pod>> = pods.iter().collect();
        let p = plan(&d, &nodes, &refs, now());
        assert_eq!(p.create_on, ["n2"]);
        // The younger duplicate, the pod on a node it may not run on, the one on a lost node.
        assert_eq!(p.delete, ["a-dup", "t", "ghost"]);
        let st = p.status.expect("status");
        assert_eq!(st["desiredNumberScheduled"], 2);
        assert_eq!(st["currentNumberScheduled"], 1);
        assert_eq!(st["numberMisscheduled"], 2);
    }

    #[test]
    fn a_rolling_update_replaces_one_available_pod_at_a_time_and_on_delete_none() {
        let d = ds(serde_json::json!({"type": "RollingUpdate"}));
        let nodes = [node("n1", None), node("n2", None)];
        let pods = [pod("a", "n1", "old", 1), pod("b", "n2", "old", 2)];
        let refs: Vec<&Arc<Pod>> = pods.iter().collect();
        // maxUnavailable 1: one of the two outdated (available) pods goes this pass.
        assert_eq!(plan(&d, &nodes, &refs, now()).delete.len(), 1);
        let d = ds(serde_json::json!({"type": "OnDelete"}));
        assert!(plan(&d, &nodes, &refs, now()).delete.is_empty());
    }
}
