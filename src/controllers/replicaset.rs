//! The ReplicaSet controller: keeps `replicas` active pods matching the selector.
//!
//! It adopts orphans that match (adding its controller reference), releases pods that stopped
//! matching, creates missing pods from the template and deletes extras in kube's order
//! (unscheduled, then pending, then not ready, then the newest). Writes it made and has not yet
//! seen in its cache are "expectations": a ReplicaSet with outstanding ones is skipped, so a
//! lagging cache never doubles a pod. Status: replicas, fullyLabeledReplicas, readyReplicas,
//! availableReplicas (ready for minReadySeconds), observedGeneration.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use k8s_openapi::api::{
    apps::v1::{ReplicaSet, ReplicaSetStatus},
    core::v1::{Pod, ReplicationController},
};
use kube::{Api, Client, Resource};
use tokio::sync::watch;

use crate::control::{
    Caches, controller_ref, controller_uid, patch_status,
    pods::{self, PodControl},
    runner::{self, Controller, PassError},
};
use crate::kinds::{
    pod::{pod_active, pod_available, pod_ready},
    selector::selector_matches,
};

pub async fn run(client: Client, caches: Caches, leading: watch::Receiver<bool>) {
    let c = ReplicaSets {
        c: PodControl::new(client, &caches, "replicaset-controller"),
    };
    runner::run(c, &caches, leading).await;
}

struct ReplicaSets {
    c: PodControl,
}

impl Controller for ReplicaSets {
    fn name(&self) -> &'static str {
        "replicaset-controller"
    }

    fn signals(&self, caches: &Caches) -> Vec<watch::Receiver<u64>> {
        vec![
            caches.replicasets.changed.clone(),
            caches.replication_controllers.changed.clone(),
            caches.pods.changed.clone(),
        ]
    }

    /// The periodic pass also notices pods that became available (minReadySeconds).
    fn period(&self) -> Duration {
        Duration::from_secs(1)
    }

    async fn pass(&mut self) -> Result<(), PassError> {
        let pods = self.c.caches.pods.all();
        let mut by_ns: HashMap<&str, Vec<&Arc<Pod>>> = HashMap::new();
        for p in &pods {
            by_ns
                .entry(p.metadata.namespace.as_deref().unwrap_or(""))
                .or_default()
                .push(p);
        }
        let sets = self.c.caches.replicasets.all();
        let rcs = self.c.caches.replication_controllers.all();
        let live: HashSet<String> = sets
            .iter()
            .filter_map(|r| r.metadata.uid.clone())
            .chain(rcs.iter().filter_map(|r| r.metadata.uid.clone()))
            .collect();
        self.c.expect.retain(&live);
        for rs in sets {
            let ns = rs.metadata.namespace.as_deref().unwrap_or("");
            let in_ns = by_ns.get(ns).map(Vec::as_slice).unwrap_or(&[]);
            self.sync(&rs, rs.as_ref(), in_ns).await;
        }
        // A ReplicationController is a ReplicaSet with an equality selector: the same rules,
        // its own object as owner.
        for rc in rcs {
            let ns = rc.metadata.namespace.as_deref().unwrap_or("");
            let in_ns = by_ns.get(ns).map(Vec::as_slice).unwrap_or(&[]);
            self.sync(&as_replica_set(&rc), rc.as_ref(), in_ns).await;
        }
        Ok(())
    }
}

/// The ReplicaSet a ReplicationController amounts to (same identity, its selector as
/// matchLabels).
pub fn as_replica_set(rc: &ReplicationController) -> ReplicaSet {
    let spec = rc.spec.clone().unwrap_or_default();
    let status = rc.status.clone().unwrap_or_default();
    ReplicaSet {
        metadata: rc.metadata.clone(),
        spec: Some(k8s_openapi::api::apps::v1::ReplicaSetSpec {
            replicas: spec.replicas,
            min_ready_seconds: spec.min_ready_seconds,
            selector: k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector {
                match_labels: spec.selector,
                match_expressions: None,
            },
            template: spec.template,
        }),
        status: Some(ReplicaSetStatus {
            replicas: status.replicas,
            fully_labeled_replicas: status.fully_labeled_replicas,
            ready_replicas: status.ready_replicas,
            available_replicas: status.available_replicas,
            observed_generation: status.observed_generation,
            ..Default::default()
        }),
    }
}

fn pod_name(p: &Pod) -> String {
    p.metadata.name.clone().unwrap_or_default()
}

/// Deletion preference: lower sorts first (deleted first).
fn delete_rank(p: &Pod) -> (u8, u8, u8, std::cmp::Reverse<Option<jiff::Timestamp>>) {
    let unscheduled = p
        .spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .unwrap_or("")
        .is_empty();
    let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
    (
        u8::from(!unscheduled),
        match phase {
            Some("Pending") | None => 0,
            Some("Unknown") => 1,
            _ => 2,
        },
        u8::from(pod_ready(p)),
        std::cmp::Reverse(p.metadata.creation_timestamp.as_ref().map(|t| t.0)),
    )
}

/// The writes one ReplicaSet wants, worked out from the cache alone.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// Matching orphans to take (a controller reference added).
    pub adopt: Vec<String>,
    /// Owned pods that no longer match, to let go.
    pub release: Vec<String>,
    /// How many pods to create from the template.
    pub create: usize,
    /// Surplus pods to delete, in kube's order.
    pub delete: Vec<String>,
    /// The status to write, when it differs from the object's.
    pub status: Option<serde_json::Value>,
}

/// What `rs` wants done with `pods` (its namespace's) at `now`: kube's ReplicaSet rules.
pub fn plan(rs: &ReplicaSet, pods: &[&Arc<Pod>], now: jiff::Timestamp) -> Plan {
    let uid = rs.metadata.uid.as_deref().unwrap_or_default();
    let spec = rs.spec.clone().unwrap_or_default();
    let deleting = rs.metadata.deletion_timestamp.is_some();
    let mut plan = Plan::default();
    let mut owned: Vec<&Arc<Pod>> = vec![];
    for p in pods {
        let matches = selector_matches(&spec.selector, p.metadata.labels.as_ref());
        match controller_uid(p.as_ref()) {
            Some(o) if o == uid && matches => owned.push(p),
            Some(o) if o == uid => plan.release.push(pod_name(p)),
            None if matches && !deleting && pod_active(p) => {
                plan.adopt.push(pod_name(p));
                owned.push(p);
            }
            _ => {}
        }
    }
    let mut active: Vec<&Arc<Pod>> = owned.iter().copied().filter(|p| pod_active(p)).collect();
    let want = if deleting {
        0
    } else {
        spec.replicas.unwrap_or(1).max(0) as usize
    };
    if active.len() < want {
        plan.create = want - active.len();
    } else if active.len() > want {
        active.sort_by_key(|p| delete_rank(p));
        let extra = active.len() - want;
        plan.delete = active[..extra].iter().map(|p| pod_name(p)).collect();
    }
    // Status, from what the cache shows now (the next pass reports the writes).
    let status = status(rs, &active_of(&owned), now);
    let counts = |s: &ReplicaSetStatus| {
        (
            s.replicas,
            s.fully_labeled_replicas.unwrap_or(0),
            s.ready_replicas.unwrap_or(0),
            s.available_replicas.unwrap_or(0),
            s.observed_generation.unwrap_or(0),
        )
    };
    if rs.status.as_ref().map(counts) != Some(counts(&status)) {
        plan.status = Some(serde_json::json!({
            "replicas": status.replicas,
            "fullyLabeledReplicas": status.fully_labeled_replicas.unwrap_or(0),
            "readyReplicas": status.ready_replicas.unwrap_or(0),
            "availableReplicas": status.available_replicas.unwrap_or(0),
            "observedGeneration": status.observed_generation.unwrap_or(0),
        }));
    }
    plan
}

fn active_of<'a>(owned: &[&'a Arc<Pod>]) -> Vec<&'a Arc<Pod>> {
    owned.iter().copied().filter(|p| pod_active(p)).collect()
}

/// The ReplicaSet's status over its active pods: replicas, fullyLabeledReplicas,
/// readyReplicas, availableReplicas (ready for minReadySeconds), observedGeneration.
fn status(rs: &ReplicaSet, live: &[&Arc<Pod>], now: jiff::Timestamp) -> ReplicaSetStatus {
    let spec = rs.spec.clone().unwrap_or_default();
    let min_ready = spec.min_ready_seconds.unwrap_or(0);
    let template_labels = spec
        .template
        .as_ref()
        .and_then(|t| t.metadata.as_ref())
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    let fully = live
        .iter()
        .filter(|p| {
            let l = p.metadata.labels.clone().unwrap_or_default();
            template_labels.iter().all(|(k, v)| l.get(k) == Some(v))
        })
        .count();
    let count = |n: usize| i32::try_from(n).unwrap_or(i32::MAX);
    ReplicaSetStatus {
        replicas: count(live.len()),
        fully_labeled_replicas: Some(count(fully)),
        ready_replicas: Some(count(live.iter().filter(|p| pod_ready(p)).count())),
        available_replicas: Some(count(
            live.iter()
                .filter(|p| pod_available(p, min_ready, now))
                .count(),
        )),
        observed_generation: Some(rs.metadata.generation.unwrap_or(0)),
        ..Default::default()
    }
}

impl ReplicaSets {
    /// Whether `rs` still waits for its earlier writes to show in the cache (so a lagging
    /// cache never doubles a pod); expectations expire after `EXPECT_TIMEOUT`.
    fn waiting(&mut self, rs: &ReplicaSet, pods: &[&Arc<Pod>]) -> bool {
        let uid = rs.metadata.uid.as_deref().unwrap_or_default();
        self.c.expect.waiting(uid, pods)
    }

    /// Plans `view` (a ReplicaSet, or a ReplicationController as one) and carries the plan
    /// out with `owner` as the pods' controller.
    async fn sync<K>(&mut self, view: &ReplicaSet, owner: &K, pods: &[&Arc<Pod>])
    where
        K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
    {
        if self.waiting(view, pods) {
            return;
        }
        let plan = plan(view, pods, jiff::Timestamp::now());
        if let Err(e) = self.apply(view, owner, pods, plan).await {
            tracing::debug!(owner = ?view.metadata.name, error = %e, "replica sync");
        }
    }

    /// Carries `plan` out for `rs` (its pods controlled by `owner`), recording what it wrote
    /// as expectations.
    async fn apply<K>(
        &mut self,
        rs: &ReplicaSet,
        owner: &K,
        pods: &[&Arc<Pod>],
        plan: Plan,
    ) -> kube::Result<()>
    where
        K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
    {
        let uid = rs.metadata.uid.clone().unwrap_or_default();
        let ns = rs.metadata.namespace.clone().unwrap_or_default();
        let name = rs.metadata.name.clone().unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(self.c.client.clone(), &ns);
        let by_name = |n: &str| pods.iter().find(|p| pod_name(p) == n);
        for n in &plan.release {
            if let Some(p) = by_name(n) {
                pods::release(&api, p, &uid).await?;
            }
        }
        for n in &plan.adopt {
            if let Some(p) = by_name(n) {
                pods::adopt(&api, owner, p).await?;
            }
        }
        let (mut created, mut deleted) = (HashSet::new(), HashSet::new());
        if plan.create > 0 {
            tracing::info!(rs = %format!("{ns}/{name}"), create = plan.create, "creating missing pods");
            let pod = pod_from_template(rs, owner);
            for _ in 0..plan.create {
                match pods::create(&api, &self.c.rec, owner, &pod).await {
                    Ok(n) => {
                        created.insert(n);
                    }
                    Err(_) => break,
                }
            }
        }
        if !plan.delete.is_empty() {
            tracing::info!(rs = %format!("{ns}/{name}"), delete = plan.delete.len(), "deleting surplus pods");
        }
        let mut failed = None;
        for n in plan.delete {
            match pods::delete(&api, &self.c.rec, owner, &n).await {
                Ok(true) => {
                    deleted.insert(n);
                }
                Ok(false) => {}
                Err(err) => {
                    failed = Some(err);
                    break;
                }
            }
        }
        self.c.expect.record(&uid, created, deleted);
        if let Some(err) = failed {
            return Err(err);
        }
        if let Some(status) = plan.status {
            patch_status::<K>(&self.c.client, &ns, &name, status).await?;
        }
        Ok(())
    }
}

/// A new pod from the ReplicaSet's template: named `<rs>-<random>`, controlled by `owner`.
fn pod_from_template<K: Resource<DynamicType = ()>>(rs: &ReplicaSet, owner: &K) -> Pod {
    let template = rs
        .spec
        .as_ref()
        .and_then(|s| s.template.clone())
        .unwrap_or_default();
    let mut meta = template.metadata.clone().unwrap_or_default();
    meta.name = None;
    meta.generate_name = Some(format!("{}-", rs.metadata.name.as_deref().unwrap_or("")));
    meta.namespace = rs.metadata.namespace.clone();
    meta.owner_references = controller_ref(owner).map(|r| vec![r]);
    Pod {
        metadata: meta,
        spec: template.spec,
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rs(replicas: i32) -> ReplicaSet {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "default", "uid": "rs1", "generation": 2},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "web"}},
                     "template": {"metadata": {"labels": {"app": "web"}},
                                  "spec": {"containers": [{"name": "c", "image": "busybox"}]}}},
        }))
        .unwrap()
    }

    /// A pod labelled `app=web`, owned by `rs1` when `owned`, in `phase`, Ready or not,
    /// created `age` seconds after the epoch.
    fn pod(name: &str, owned: bool, phase: &str, ready: bool, node: bool, age: i64) -> Arc<Pod> {
        let mut v = serde_json::json!({
            "metadata": {"name": name, "namespace": "default", "labels": {"app": "web"},
                         "creationTimestamp": jiff::Timestamp::from_second(age).unwrap().to_string()},
            "spec": {"containers": [{"name": "c"}]},
            "status": {"phase": phase, "conditions": [
                {"type": "Ready", "status": if ready { "True" } else { "False" },
                 "lastTransitionTime": "1970-01-01T00:00:00Z"}]},
        });
        if owned {
            v["metadata"]["ownerReferences"] = serde_json::json!([{"apiVersion": "apps/v1",
                "kind": "ReplicaSet", "name": "web", "uid": "rs1", "controller": true}]);
        }
        if node {
            v["spec"]["nodeName"] = "n1".into();
        }
        Arc::new(serde_json::from_value(v).unwrap())
    }

    fn now() -> jiff::Timestamp {
        jiff::Timestamp::from_second(1_000_000).unwrap()
    }

    #[test]
    fn missing_pods_are_created_and_the_status_counts_what_runs() {
        let a = pod("a", true, "Running", true, true, 1);
        let p = plan(&rs(3), &[&a], now());
        assert_eq!(p.create, 2);
        assert!(p.delete.is_empty() && p.adopt.is_empty() && p.release.is_empty());
        let st = p.status.expect("a new status");
        assert_eq!(st["replicas"], 1);
        assert_eq!(st["readyReplicas"], 1);
        assert_eq!(st["availableReplicas"], 1);
        assert_eq!(st["observedGeneration"], 2);
    }

    #[test]
    fn surplus_pods_go_unscheduled_then_pending_then_unready_then_newest_first() {
        let pods = [
            pod("old-ready", true, "Running", true, true, 1),
            pod("new-ready", true, "Running", true, true, 5),
            pod("unready", true, "Running", false, true, 2),
            pod("pending", true, "Pending", false, true, 3),
            pod("unscheduled", true, "Pending", false, false, 4),
        ];
        let refs: Vec<&Arc<Pod>> = pods.iter().collect();
        let p = plan(&rs(1), &refs, now());
        assert_eq!(p.create, 0);
        assert_eq!(p.delete, ["unscheduled", "pending", "unready", "new-ready"]);
    }

    #[test]
    fn matching_orphans_are_adopted_and_owned_pods_that_stopped_matching_released() {
        let orphan = pod("orphan", false, "Running", true, true, 1);
        let mut relabelled = (*pod("moved", true, "Running", true, true, 2)).clone();
        relabelled.metadata.labels = Some([("app".to_string(), "other".to_string())].into());
        let relabelled = Arc::new(relabelled);
        let done = pod("done", false, "Succeeded", false, true, 3);
        let p = plan(&rs(1), &[&orphan, &relabelled, &done], now());
        assert_eq!(p.adopt, ["orphan"], "finished orphans are not adopted");
        assert_eq!(p.release, ["moved"]);
        assert_eq!((p.create, p.delete.len()), (0, 0), "the adopted pod counts");
    }

    #[test]
    fn a_deleted_replica_set_adopts_nothing_and_scales_to_zero() {
        let mut r = rs(2);
        r.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now()));
        let owned = pod("a", true, "Running", true, true, 1);
        let orphan = pod("b", false, "Running", true, true, 1);
        let p = plan(&r, &[&owned, &orphan], now());
        assert!(p.adopt.is_empty());
        assert_eq!(p.delete, ["a"]);
    }

    #[test]
    fn an_unchanged_status_is_not_written_again() {
        let mut r = rs(1);
        let a = pod("a", true, "Running", true, true, 1);
        let first = plan(&r, &[&a], now()).status.expect("first status");
        r.status = Some(serde_json::from_value(first).unwrap());
        assert_eq!(plan(&r, &[&a], now()).status, None);
    }
}
