//! The Deployment controller: owns ReplicaSets by pod-template hash and rolls between them.
//!
//! The new ReplicaSet is `<deployment>-<hash of the template>` with the `pod-template-hash`
//! label added to its selector and template; every other owned ReplicaSet is old. RollingUpdate
//! scales the new one up while the total stays within `replicas + maxSurge`, and the old ones
//! down while the available pods stay at or above `replicas - maxUnavailable` (absolute or
//! percent, surge rounded up, unavailability down). Recreate scales the old ones to zero, waits
//! for their pods to go, then scales the new one. Revisions are the
//! `deployment.kubernetes.io/revision` annotation (so `kubectl rollout history/undo` work),
//! `revisionHistoryLimit` old ReplicaSets at zero are kept, `paused` stops the rollout, and the
//! status carries the counts and the Available / Progressing conditions kubectl reads.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use k8s_openapi::{
    api::{
        apps::v1::{Deployment, DeploymentCondition, DeploymentSpec, ReplicaSet, ReplicaSetSpec},
        core::v1::Pod,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Client,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use tokio::sync::watch;

use crate::control::{
    Caches, controller_ref, controller_uid, patch_status,
    recorder::Recorder,
    runner::{self, Controller, PassError},
};
use crate::kinds::{history::template_hash, pod::pod_active};
use std::collections::HashMap;

const REVISION: &str = "deployment.kubernetes.io/revision";
const HASH_LABEL: &str = "pod-template-hash";

pub async fn run(client: Client, caches: Caches, leading: watch::Receiver<bool>) {
    let c = Deployments {
        rec: Recorder::new(client.clone(), "deployment-controller"),
        client,
        caches: caches.clone(),
        waits: HashMap::new(),
    };
    runner::run(c, &caches, leading).await;
}

struct Deployments {
    client: Client,
    rec: Recorder,
    caches: Caches,
    /// Per Deployment uid, the ReplicaSet scalings it waits to see.
    waits: HashMap<String, Vec<(String, i64)>>,
}

impl Controller for Deployments {
    fn name(&self) -> &'static str {
        "deployment-controller"
    }

    fn signals(&self, caches: &Caches) -> Vec<watch::Receiver<u64>> {
        vec![
            caches.deployments.changed.clone(),
            caches.replicasets.changed.clone(),
            caches.pods.changed.clone(),
        ]
    }

    fn period(&self) -> Duration {
        Duration::from_secs(2)
    }

    async fn pass(&mut self) -> Result<(), PassError> {
        let sets = self.caches.replicasets.all();
        let pods = self.caches.pods.all();
        for d in self.caches.deployments.all() {
            if d.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let uid = d.metadata.uid.as_deref().unwrap_or("");
            let owned: Vec<Arc<ReplicaSet>> = sets
                .iter()
                .filter(|r| controller_uid(r.as_ref()) == Some(uid))
                .cloned()
                .collect();
            if let Err(e) = sync(&self.client, &self.rec, &d, owned, &pods, &mut self.waits).await {
                tracing::debug!(deployment = ?d.metadata.name, error = %e, "deployment sync");
            }
        }
        Ok(())
    }
}

pub use crate::kinds::quantity::int_or_percent as resolve;

fn revision(rs: &ReplicaSet) -> i64 {
    rs.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(REVISION))
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

fn replicas(rs: &ReplicaSet) -> i32 {
    rs.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0)
}

fn rs_name(rs: &ReplicaSet) -> String {
    rs.metadata.name.clone().unwrap_or_default()
}

/// Scales `rs` to `to`; returns the ReplicaSet's new resourceVersion when it wrote.
async fn scale(
    api: &Api<ReplicaSet>,
    rec: &Recorder,
    d: &Deployment,
    rs: &ReplicaSet,
    to: i32,
) -> kube::Result<Option<(String, i64)>> {
    let from = replicas(rs);
    if from == to {
        return Ok(None);
    }
    let patch = serde_json::json!({"spec": {"replicas": to}, "metadata": {"resourceVersion": rs.metadata.resource_version}});
    let updated = api
        .patch(&rs_name(rs), &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    let dir = if to > from { "up" } else { "down" };
    rec.event(
        d,
        false,
        "ScalingReplicaSet",
        format!(
            "Scaled {dir} replica set {} from {from} to {to}",
            rs_name(rs)
        ),
    );
    Ok(Some((rs_name(rs), rv(&updated))))
}

fn rv<K: kube::Resource>(k: &K) -> i64 {
    k.meta()
        .resource_version
        .as_deref()
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

/// Alive pods of each ReplicaSet (by uid) that also pass `counted`, from the pod cache
/// (fresher than the ReplicaSets' status, which trails the pods).
fn owned_pods(pods: &[Arc<Pod>], counted: impl Fn(&Pod) -> bool) -> HashMap<String, i32> {
    let mut m = HashMap::new();
    for p in pods {
        if let Some(o) = controller_uid(p.as_ref())
            && pod_active(p)
            && counted(p)
        {
            *m.entry(o.to_string()).or_insert(0) += 1;
        }
    }
    m
}

/// The new ReplicaSet of `d` for the template with hash `hash`: `<name>-<hash>`, the hash
/// label on its selector and template, revision `revision`, at zero replicas.
fn new_replica_set(d: &Deployment, hash: &str, revision: i64) -> ReplicaSet {
    let spec = d.spec.clone().unwrap_or_default();
    let name = d.metadata.name.clone().unwrap_or_default();
    let mut t = spec.template.clone();
    let meta = t.metadata.get_or_insert_with(Default::default);
    meta.labels
        .get_or_insert_with(Default::default)
        .insert(HASH_LABEL.into(), hash.to_string());
    let labels = meta.labels.clone();
    let mut selector = spec.selector.clone();
    selector
        .match_labels
        .get_or_insert_with(Default::default)
        .insert(HASH_LABEL.into(), hash.to_string());
    ReplicaSet {
        metadata: ObjectMeta {
            name: Some(format!("{name}-{hash}")),
            namespace: d.metadata.namespace.clone(),
            labels,
            annotations: Some(BTreeMap::from([(
                REVISION.to_string(),
                revision.to_string(),
            )])),
            owner_references: controller_ref(d).map(|r| vec![r]),
            ..Default::default()
        },
        spec: Some(ReplicaSetSpec {
            replicas: Some(0),
            min_ready_seconds: spec.min_ready_seconds,
            selector,
            template: Some(t),
        }),
        status: None,
    }
}

/// maxSurge and maxUnavailable resolved against `want` (Recreate: no surge, all may go; never
/// both zero).
fn surge_and_unavailable(spec: &DeploymentSpec, want: i32) -> (i32, i32) {
    let strategy = spec.strategy.clone().unwrap_or_default();
    let ru = strategy.rolling_update.clone().unwrap_or_default();
    let (surge, unavailable) = if strategy.type_.as_deref() == Some("Recreate") {
        (0, want)
    } else {
        (
            resolve(ru.max_surge.as_ref(), want, "25%", true),
            resolve(ru.max_unavailable.as_ref(), want, "25%", false),
        )
    };
    if surge == 0 && unavailable == 0 {
        (0, 1)
    } else {
        (surge, unavailable)
    }
}

/// One rollout step: the ReplicaSets to scale, and to what. Recreate scales the old ones to
/// zero and the new one up once their pods are gone; RollingUpdate scales the new one up
/// within the surge, or else the old ones down within the availability floor — first the
/// replicas that are not available anyway, then available ones, oldest first. Pods not yet
/// deleted count against the surge until they are gone.
fn rollout(
    spec: &DeploymentSpec,
    new: &ReplicaSet,
    old: &[Arc<ReplicaSet>],
    pods: &[Arc<Pod>],
    now: jiff::Timestamp,
) -> Vec<(String, i32)> {
    let want = spec.replicas.unwrap_or(1);
    let (surge, unavailable) = surge_and_unavailable(spec, want);
    let recreate = spec.strategy.as_ref().and_then(|s| s.type_.as_deref()) == Some("Recreate");
    let min_ready = spec.min_ready_seconds.unwrap_or(0);
    // Available: ready for minReadySeconds at `now`.
    let by_rs = owned_pods(pods, |p| {
        crate::kinds::pod::pod_available(p, min_ready, now)
    });
    let alive_by_rs = owned_pods(pods, |_| true);
    let uid = |r: &ReplicaSet| r.metadata.uid.clone().unwrap_or_default();
    // A ReplicaSet's available pods, never more than it is scaled to (extra ones are going).
    let available = |r: &ReplicaSet| by_rs.get(&uid(r)).copied().unwrap_or(0).min(replicas(r));
    let alive = |r: &ReplicaSet| alive_by_rs.get(&uid(r)).copied().unwrap_or(0);
    let to = |r: &ReplicaSet, n: i32| (replicas(r) != n).then(|| (rs_name(r), n));
    let old_active: i32 = old.iter().map(|r| replicas(r)).sum();
    if recreate {
        let mut steps: Vec<(String, i32)> = old.iter().filter_map(|r| to(r, 0)).collect();
        let old_pods = pods
            .iter()
            .any(|p| controller_uid(p.as_ref()).is_some_and(|u| old.iter().any(|r| uid(r) == u)));
        if old_active == 0 && !old_pods {
            steps.extend(to(new, want));
        }
        return steps;
    }
    if old_active == 0 {
        return to(new, want).into_iter().collect();
    }
    let all = || std::iter::once(new).chain(old.iter().map(|r| r.as_ref()));
    let total: i32 = all().map(|r| replicas(r).max(alive(r))).sum();
    let room = want + surge - total;
    let cur = replicas(new);
    let up = if room > 0 && cur < want {
        to(new, (cur + room).min(want))
    } else if cur > want {
        to(new, want)
    } else {
        None
    };
    if let Some(step) = up {
        return vec![step];
    }
    let min_available = want - unavailable;
    let new_unavailable = (replicas(new) - available(new)).max(0);
    let spec_total: i32 = all().map(replicas).sum();
    let max_down = spec_total - min_available - new_unavailable;
    let mut counts: Vec<i32> = old.iter().map(|r| replicas(r)).collect();
    if max_down > 0 {
        let mut cleaned = 0;
        for (k, r) in old.iter().enumerate() {
            let unhealthy = (counts[k] - available(r)).max(0);
            let c = unhealthy.min(max_down - cleaned);
            counts[k] -= c;
            cleaned += c;
        }
        let avail_all: i32 = all().map(available).sum();
        let mut budget = (avail_all - min_available).max(0);
        for (k, r) in old.iter().enumerate() {
            let c = counts[k].min(budget).min(available(r));
            counts[k] -= c;
            budget -= c;
        }
    }
    old.iter()
        .zip(counts)
        .filter_map(|(r, n)| to(r, n))
        .collect()
}

/// Old ReplicaSets at zero beyond revisionHistoryLimit, oldest first: to delete.
fn pruned(spec: &DeploymentSpec, old: &[Arc<ReplicaSet>]) -> Vec<String> {
    let limit = spec.revision_history_limit.unwrap_or(10).max(0) as usize;
    let idle: Vec<&Arc<ReplicaSet>> = old
        .iter()
        .filter(|r| replicas(r) == 0 && r.status.as_ref().map(|s| s.replicas).unwrap_or(0) == 0)
        .collect();
    idle[..idle.len().saturating_sub(limit)]
        .iter()
        .map(|r| rs_name(r))
        .collect()
}

fn rfc3339(t: jiff::Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// The Deployment's status from its ReplicaSets' own status at `now`: the counts and the
/// Available and Progressing conditions (kept, with their times, while they hold).
fn deployment_status(
    d: &Deployment,
    owned: &[Arc<ReplicaSet>],
    new_rs: Option<&ReplicaSet>,
    new_name: &str,
    now: jiff::Timestamp,
) -> serde_json::Value {
    let spec = d.spec.clone().unwrap_or_default();
    let want = spec.replicas.unwrap_or(1);
    let (_, unavailable) = surge_and_unavailable(&spec, want);
    let paused = spec.paused.unwrap_or(false);
    let sum = |f: &dyn Fn(&ReplicaSet) -> Option<i32>| {
        owned.iter().map(|r| f(r).unwrap_or(0)).sum::<i32>()
    };
    let total = sum(&|r| r.status.as_ref().map(|s| s.replicas));
    let ready = sum(&|r| r.status.as_ref().and_then(|s| s.ready_replicas));
    let avail = sum(&|r| r.status.as_ref().and_then(|s| s.available_replicas));
    let updated = new_rs
        .and_then(|n| n.status.as_ref().map(|s| s.replicas))
        .unwrap_or(0);
    let complete = updated == want && total == want && avail >= want;
    let ts = rfc3339(now);
    let cur = d.status.clone().unwrap_or_default();
    let cond = |t: &str| {
        cur.conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == t)
            .cloned()
    };
    let (av_status, av_reason, av_msg) = if avail >= want - unavailable {
        (
            "True",
            "MinimumReplicasAvailable",
            "Deployment has minimum availability.",
        )
    } else {
        (
            "False",
            "MinimumReplicasUnavailable",
            "Deployment does not have minimum availability.",
        )
    };
    // The progress clock restarts when the new ReplicaSet's count moves.
    let moved = cur.updated_replicas.unwrap_or(0) != updated
        || cur.available_replicas.unwrap_or(0) != avail;
    let prev_prog = cond("Progressing");
    let deadline = spec.progress_deadline_seconds.unwrap_or(600);
    let timed_out = (
        "False",
        "ProgressDeadlineExceeded",
        format!("ReplicaSet \"{new_name}\" has timed out progressing."),
    );
    let (pr_status, pr_reason, pr_msg) = if complete {
        (
            "True",
            "NewReplicaSetAvailable",
            format!("ReplicaSet \"{new_name}\" has successfully progressed."),
        )
    } else if paused {
        (
            "Unknown",
            "DeploymentPaused",
            "Deployment is paused".to_string(),
        )
    } else {
        let reason = prev_prog.as_ref().and_then(|c| c.reason.as_deref());
        let last = prev_prog
            .as_ref()
            .filter(|_| reason == Some("ReplicaSetUpdated"))
            .and_then(|c| c.last_update_time.as_ref().map(|t| t.0));
        let stalled = reason == Some("ProgressDeadlineExceeded") && !moved;
        match last {
            _ if stalled => timed_out,
            Some(t) if now.as_second() - t.as_second() > i64::from(deadline) => timed_out,
            _ => (
                "True",
                "ReplicaSetUpdated",
                format!("ReplicaSet \"{new_name}\" is progressing."),
            ),
        }
    };
    let keep = |prev: Option<DeploymentCondition>, status: &str, reason: &str| {
        prev.filter(|c| c.status == status && c.reason.as_deref() == Some(reason))
    };
    let av_prev = keep(cond("Available"), av_status, av_reason);
    let pr_prev = keep(prev_prog, pr_status, pr_reason);
    let pr_update = match &pr_prev {
        Some(c) if !moved || pr_reason == "ProgressDeadlineExceeded" => {
            c.last_update_time.as_ref().map(|t| rfc3339(t.0))
        }
        _ => None,
    }
    .unwrap_or_else(|| ts.clone());
    let when = |c: &Option<DeploymentCondition>| {
        c.as_ref()
            .and_then(|c| c.last_transition_time.as_ref())
            .map(|t| rfc3339(t.0))
            .unwrap_or_else(|| ts.clone())
    };
    let av_update = av_prev
        .as_ref()
        .and_then(|c| c.last_update_time.as_ref())
        .map(|t| rfc3339(t.0))
        .unwrap_or_else(|| ts.clone());
    serde_json::json!({
        "observedGeneration": d.metadata.generation.unwrap_or(0),
        "replicas": total,
        "updatedReplicas": updated,
        "readyReplicas": ready,
        "availableReplicas": avail,
        "unavailableReplicas": (want - avail).max(0),
        "conditions": [
            {"type": "Available", "status": av_status, "reason": av_reason, "message": av_msg,
             "lastUpdateTime": av_update, "lastTransitionTime": when(&av_prev)},
            {"type": "Progressing", "status": pr_status, "reason": pr_reason, "message": pr_msg,
             "lastUpdateTime": pr_update, "lastTransitionTime": when(&pr_prev)},
        ],
    })
}

/// Whether `status` differs from the Deployment's current one (absent counts read as 0).
fn status_changed(d: &Deployment, status: &serde_json::Value) -> bool {
    let mut old = serde_json::to_value(d.status.clone().unwrap_or_default()).unwrap_or_default();
    if let Some(o) = old.as_object_mut() {
        for k in [
            "unavailableReplicas",
            "replicas",
            "updatedReplicas",
            "readyReplicas",
            "availableReplicas",
        ] {
            o.entry(k).or_insert(0.into());
        }
    }
    &old != status
}

async fn sync(
    client: &Client,
    rec: &Recorder,
    d: &Arc<Deployment>,
    mut owned: Vec<Arc<ReplicaSet>>,
    pods: &[Arc<Pod>],
    waits: &mut HashMap<String, Vec<(String, i64)>>,
) -> kube::Result<()> {
    let duid = d.metadata.uid.clone().unwrap_or_default();
    // Writes of the previous pass must be visible before deciding again.
    if let Some(w) = waits.get(&duid) {
        let seen = w.iter().all(|(name, want)| {
            owned
                .iter()
                .find(|r| &rs_name(r) == name)
                .is_none_or(|r| rv(r.as_ref()) >= *want)
        });
        if !seen {
            return Ok(());
        }
        waits.remove(&duid);
    }
    let ns = d.metadata.namespace.clone().unwrap_or_default();
    let name = d.metadata.name.clone().unwrap_or_default();
    let spec = d.spec.clone().unwrap_or_default();
    let rs_api: Api<ReplicaSet> = Api::namespaced(client.clone(), &ns);
    let now = jiff::Timestamp::now();

    // The template without the hash label decides which ReplicaSet is new.
    let hash = template_hash(&serde_json::to_value(&spec.template).unwrap_or_default());
    let new_name = format!("{name}-{hash}");
    owned.sort_by_key(|r| revision(r));
    let max_rev = owned.iter().map(|r| revision(r)).max().unwrap_or(0);
    let mut new_rs = owned.iter().find(|r| rs_name(r) == new_name).cloned();
    let paused = spec.paused.unwrap_or(false);
    if new_rs.is_none() && !paused {
        let rs = new_replica_set(d, &hash, max_rev + 1);
        match rs_api.create(&PostParams::default(), &rs).await {
            Ok(created) => new_rs = Some(Arc::new(created)),
            Err(kube::Error::Api(e)) if e.code == 409 => return Ok(()), // the cache lags
            Err(e) => return Err(e),
        }
    }
    // A rollback to an older template makes that ReplicaSet new again: it gets the next revision.
    if let Some(n) = &new_rs
        && revision(n) < max_rev
        && !paused
    {
        let patch =
            serde_json::json!({"metadata": {"annotations": {REVISION: (max_rev + 1).to_string()}}});
        let updated = rs_api
            .patch(&rs_name(n), &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        new_rs = Some(Arc::new(updated));
    }
    let old: Vec<Arc<ReplicaSet>> = owned
        .iter()
        .filter(|r| Some(rs_name(r)) != new_rs.as_ref().map(|n| rs_name(n)))
        .cloned()
        .collect();
    if !paused && let Some(n) = &new_rs {
        let mut wrote: Vec<(String, i64)> = vec![];
        for (rs, to) in rollout(&spec, n, &old, pods, now) {
            // The new one as just written (its revision may have moved), else the cached ones.
            if let Some(r) = std::iter::once(n)
                .chain(old.iter())
                .find(|r| rs_name(r) == rs)
            {
                wrote.extend(scale(&rs_api, rec, d, r, to).await?);
            }
        }
        for r in pruned(&spec, &old) {
            let _ = rs_api.delete(&r, &DeleteParams::default()).await;
        }
        if !wrote.is_empty() {
            waits.insert(duid.clone(), wrote);
        }
    }

    let new_name = new_rs.as_ref().map(|n| rs_name(n)).unwrap_or(new_name);
    let status = deployment_status(d, &owned, new_rs.as_deref(), &new_name, now);
    let new_rev = new_rs.as_ref().map(|n| revision(n)).unwrap_or(0);
    let d_rev: i64 = d
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(REVISION))
        .and_then(|r| r.parse().ok())
        .unwrap_or(0);
    let d_api: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    if new_rev > 0 && d_rev != new_rev {
        let patch =
            serde_json::json!({"metadata": {"annotations": {REVISION: new_rev.to_string()}}});
        d_api
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
    }
    if status_changed(d, &status) {
        patch_status::<Deployment>(client, &ns, &name, status).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn surge_rounds_up_and_unavailability_down() {
        let pct = k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String("25%".into());
        assert_eq!(resolve(Some(&pct), 10, "25%", true), 3);
        assert_eq!(resolve(Some(&pct), 10, "25%", false), 2);
        assert_eq!(
            resolve(
                Some(&k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(1)),
                10,
                "25%",
                false
            ),
            1
        );
        assert_eq!(resolve(None, 4, "25%", true), 1);
    }

    #[test]
    fn template_hashes_are_stable_and_short() {
        let a = template_hash(&serde_json::json!({"spec": {"containers": [{"image": "a"}]}}));
        let b = template_hash(&serde_json::json!({"spec": {"containers": [{"image": "b"}]}}));
        assert_eq!(a.len(), 10);
        assert_ne!(a, b);
        assert_eq!(
            a,
            template_hash(&serde_json::json!({"spec": {"containers": [{"image": "a"}]}}))
        );
        assert!(a.bytes().all(|c| c.is_ascii_alphanumeric()));
    }
    fn deployment(replicas: i32, strategy: serde_json::Value) -> Deployment {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "default", "uid": "d1", "generation": 1},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "web"}},
                     "strategy": strategy, "revisionHistoryLimit": 1,
                     "template": {"metadata": {"labels": {"app": "web"}},
                                  "spec": {"containers": [{"name": "c", "image": "busybox"}]}}},
        }))
        .unwrap()
    }

    fn replica_set(name: &str, replicas: i32, revision: i64) -> Arc<ReplicaSet> {
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}"),
                             "annotations": {REVISION: revision.to_string()}},
                "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "web"}}},
                "status": {"replicas": replicas},
            }))
            .unwrap(),
        )
    }

    /// `n` running pods of ReplicaSet `rs`, Ready (so available) when `ready`.
    fn pods_of(rs: &str, n: usize, ready: bool) -> Vec<Arc<Pod>> {
        (0..n)
            .map(|i| {
                Arc::new(
                    serde_json::from_value(serde_json::json!({
                        "metadata": {"name": format!("{rs}-{i}"), "namespace": "default",
                            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                "name": rs, "uid": format!("uid-{rs}"), "controller": true}]},
                        "spec": {"containers": [{"name": "c"}]},
                        "status": {"phase": "Running", "conditions": [{"type": "Ready",
                            "status": if ready { "True" } else { "False" },
                            "lastTransitionTime": "1970-01-01T00:00:00Z"}]},
                    }))
                    .unwrap(),
                )
            })
            .collect()
    }

    fn now() -> jiff::Timestamp {
        jiff::Timestamp::from_second(1_000_000).unwrap()
    }

    fn rolling() -> serde_json::Value {
        serde_json::json!({"type": "RollingUpdate",
                           "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}})
    }

    #[test]
    fn a_rolling_update_surges_first_then_scales_old_down_within_the_floor() {
        let d = deployment(4, rolling());
        let spec = d.spec.clone().unwrap();
        // Old at 4, all available; the new one at 0: one surge pod (25% of 4, rounded up).
        let (old, new) = (replica_set("web-old", 4, 1), replica_set("web-new", 0, 2));
        let pods = pods_of("web-old", 4, true);
        assert_eq!(
            rollout(&spec, &new, std::slice::from_ref(&old), &pods, now()),
            [("web-new".to_string(), 1)]
        );
        // The surge is used and the new pod is not available yet: one old pod may go (the
        // floor is 4 − 1 available).
        let new = replica_set("web-new", 1, 2);
        let mut pods = pods_of("web-old", 4, true);
        pods.extend(pods_of("web-new", 1, false));
        assert_eq!(
            rollout(&spec, &new, std::slice::from_ref(&old), &pods, now()),
            [("web-old".to_string(), 3)]
        );
        // Nothing old left: the new one goes to the full count.
        let old0 = replica_set("web-old", 0, 1);
        assert_eq!(
            rollout(&spec, &new, &[old0], &pods_of("web-new", 1, true), now()),
            [("web-new".to_string(), 4)]
        );
    }

    #[test]
    fn unavailable_old_replicas_go_first_and_the_floor_holds() {
        let d = deployment(4, rolling());
        let spec = d.spec.clone().unwrap();
        // New at 1 (available), old at 4 of which 2 are not ready: the unready ones go even
        // though the surge is used up, and no available one goes below the floor of 3.
        let (old, new) = (replica_set("web-old", 4, 1), replica_set("web-new", 1, 2));
        let mut pods = pods_of("web-old", 2, true);
        let mut unready = pods_of("web-old", 2, false);
        for (i, p) in unready.iter_mut().enumerate() {
            Arc::make_mut(p).metadata.name = Some(format!("web-old-u{i}"));
        }
        pods.extend(unready);
        pods.extend(pods_of("web-new", 1, true));
        assert_eq!(
            rollout(&spec, &new, std::slice::from_ref(&old), &pods, now()),
            [("web-old".to_string(), 2)]
        );
    }

    #[test]
    fn recreate_stops_every_old_pod_before_the_new_replica_set_grows() {
        let d = deployment(3, serde_json::json!({"type": "Recreate"}));
        let spec = d.spec.clone().unwrap();
        let (old, new) = (replica_set("web-old", 3, 1), replica_set("web-new", 0, 2));
        assert_eq!(
            rollout(
                &spec,
                &new,
                std::slice::from_ref(&old),
                &pods_of("web-old", 3, true),
                now()
            ),
            [("web-old".to_string(), 0)]
        );
        // Scaled to zero but its pods are still there: wait.
        let old0 = replica_set("web-old", 0, 1);
        assert!(
            rollout(
                &spec,
                &new,
                std::slice::from_ref(&old0),
                &pods_of("web-old", 1, false),
                now()
            )
            .is_empty()
        );
        assert_eq!(
            rollout(&spec, &new, &[old0], &[], now()),
            [("web-new".to_string(), 3)]
        );
    }

    #[test]
    fn idle_old_replica_sets_beyond_the_history_limit_are_pruned_oldest_first() {
        let d = deployment(1, rolling());
        let spec = d.spec.clone().unwrap();
        let old = [
            replica_set("web-a", 0, 1),
            replica_set("web-b", 0, 2),
            replica_set("web-c", 1, 3),
            replica_set("web-d", 0, 4),
        ];
        // Limit 1: of the three idle ones, the two oldest go; the scaled one stays.
        assert_eq!(pruned(&spec, &old), ["web-a", "web-b"]);
    }

    #[test]
    fn a_complete_rollout_reports_available_and_progressed() {
        let mut d = deployment(2, rolling());
        let mut new = (*replica_set("web-new", 2, 1)).clone();
        new.status = Some(
            serde_json::from_value(serde_json::json!(
            {"replicas": 2, "readyReplicas": 2, "availableReplicas": 2}))
            .unwrap(),
        );
        let new = Arc::new(new);
        let st = deployment_status(&d, std::slice::from_ref(&new), Some(&new), "web-new", now());
        assert_eq!(st["availableReplicas"], 2);
        assert_eq!(st["unavailableReplicas"], 0);
        assert_eq!(st["conditions"][0]["reason"], "MinimumReplicasAvailable");
        assert_eq!(st["conditions"][1]["reason"], "NewReplicaSetAvailable");
        assert!(status_changed(&d, &st));
        // Written back, the same pass later changes nothing (times kept).
        d.status = Some(serde_json::from_value(st.clone()).unwrap());
        let later = now() + jiff::SignedDuration::from_secs(30);
        let again = deployment_status(&d, std::slice::from_ref(&new), Some(&new), "web-new", later);
        assert!(!status_changed(&d, &again), "{again}");
    }
}
