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
        apps::v1::{Deployment, ReplicaSet, ReplicaSetSpec},
        core::v1::Pod,
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};
use kube::{
    Api, Client,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use sha2::Digest;
use tokio::sync::watch;

use crate::control::{
    Caches, controller_ref, controller_uid,
    recorder::Recorder,
    runner::{self, Controller, PassError},
};
use crate::kinds::pod::pod_active;
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

/// kube's pod-template-hash alphabet (no vowels, no confusable characters).
const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";

/// A short, stable hash of a pod template.
pub fn template_hash(template: &serde_json::Value) -> String {
    let digest = sha2::Sha256::digest(template.to_string().as_bytes());
    let mut n = u64::from_be_bytes(digest[..8].try_into().unwrap_or([0; 8]));
    let mut out = String::new();
    for _ in 0..10 {
        out.push(ALPHABET[(n % ALPHABET.len() as u64) as usize] as char);
        n /= ALPHABET.len() as u64;
    }
    out
}

/// An IntOrString against a total: percentages rounded up or down.
pub fn resolve(v: Option<&IntOrString>, total: i32, default: &str, round_up: bool) -> i32 {
    let s = match v {
        Some(IntOrString::Int(i)) => return *i,
        Some(IntOrString::String(s)) => s.clone(),
        None => default.to_string(),
    };
    match s.strip_suffix('%').and_then(|p| p.parse::<i64>().ok()) {
        Some(p) => {
            let x = p * i64::from(total);
            (if round_up { (x + 99) / 100 } else { x / 100 }) as i32
        }
        None => s.parse().unwrap_or(0),
    }
}

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

/// Available pods of each ReplicaSet (by uid), counted from the pod cache: alive, ready for
/// minReadySeconds. Fresher than the ReplicaSets' status, which trails the pods.
fn available_pods(pods: &[Arc<Pod>], min_ready: i32) -> std::collections::HashMap<String, i32> {
    let now = jiff::Timestamp::now();
    let mut m = std::collections::HashMap::new();
    for p in pods {
        if let Some(o) = controller_uid(p.as_ref())
            && pod_active(p)
            && crate::kinds::pod::pod_available(p, min_ready, now)
        {
            *m.entry(o.to_string()).or_insert(0) += 1;
        }
    }
    m
}

async fn sync(
    client: &Client,
    rec: &Recorder,
    d: &Arc<Deployment>,
    mut owned: Vec<Arc<ReplicaSet>>,
    pods: &[Arc<Pod>],
    waits: &mut std::collections::HashMap<String, Vec<(String, i64)>>,
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
    let mut wrote: Vec<(String, i64)> = vec![];
    let ns = d.metadata.namespace.clone().unwrap_or_default();
    let name = d.metadata.name.clone().unwrap_or_default();
    let spec = d.spec.clone().unwrap_or_default();
    let want = spec.replicas.unwrap_or(1);
    let rs_api: Api<ReplicaSet> = Api::namespaced(client.clone(), &ns);

    // The template without the hash label decides which ReplicaSet is new.
    let template = spec.template.clone();
    let hash = template_hash(&serde_json::to_value(&template).unwrap_or_default());
    let new_name = format!("{name}-{hash}");
    owned.sort_by_key(|r| revision(r));
    let max_rev = owned.iter().map(|r| revision(r)).max().unwrap_or(0);
    let mut new_rs = owned.iter().find(|r| rs_name(r) == new_name).cloned();
    let paused = spec.paused.unwrap_or(false);
    if new_rs.is_none() && !paused {
        let mut t = template.clone();
        let meta = t.metadata.get_or_insert_with(Default::default);
        meta.labels
            .get_or_insert_with(Default::default)
            .insert(HASH_LABEL.into(), hash.clone());
        let mut selector = spec.selector.clone();
        selector
            .match_labels
            .get_or_insert_with(Default::default)
            .insert(HASH_LABEL.into(), hash.clone());
        let mut labels = template
            .metadata
            .as_ref()
            .and_then(|m| m.labels.clone())
            .unwrap_or_default();
        labels.insert(HASH_LABEL.into(), hash.clone());
        let rs = ReplicaSet {
            metadata: ObjectMeta {
                name: Some(new_name.clone()),
                namespace: Some(ns.clone()),
                labels: Some(labels),
                annotations: Some(BTreeMap::from([(
                    REVISION.to_string(),
                    (max_rev + 1).to_string(),
                )])),
                owner_references: controller_ref(d.as_ref()).map(|r| vec![r]),
                ..Default::default()
            },
            spec: Some(ReplicaSetSpec {
                replicas: Some(0),
                min_ready_seconds: spec.min_ready_seconds,
                selector,
                template: Some(t),
            }),
            status: None,
        };
        match rs_api.create(&PostParams::default(), &rs).await {
            Ok(created) => {
                new_rs = Some(Arc::new(created));
            }
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

    let strategy = spec.strategy.clone().unwrap_or_default();
    let recreate = strategy.type_.as_deref() == Some("Recreate");
    let ru = strategy.rolling_update.clone().unwrap_or_default();
    let mut surge = resolve(ru.max_surge.as_ref(), want, "25%", true);
    let mut unavailable = resolve(ru.max_unavailable.as_ref(), want, "25%", false);
    if recreate {
        (surge, unavailable) = (0, want);
    }
    if surge == 0 && unavailable == 0 {
        unavailable = 1;
    }

    let min_ready = spec.min_ready_seconds.unwrap_or(0);
    let by_rs = available_pods(pods, min_ready);
    // A ReplicaSet's available pods, never more than it is scaled to (extra ones are going).
    let available = |r: &ReplicaSet| {
        by_rs
            .get(r.metadata.uid.as_deref().unwrap_or(""))
            .copied()
            .unwrap_or(0)
            .min(replicas(r))
    };
    let mut alive_by_rs: std::collections::HashMap<&str, i32> = std::collections::HashMap::new();
    for p in pods {
        if let Some(o) = controller_uid(p.as_ref())
            && pod_active(p)
        {
            *alive_by_rs.entry(o).or_insert(0) += 1;
        }
    }
    let alive = |r: &ReplicaSet| {
        alive_by_rs
            .get(r.metadata.uid.as_deref().unwrap_or(""))
            .copied()
            .unwrap_or(0)
    };
    if !paused && let Some(n) = &new_rs {
        let old_active: i32 = old.iter().map(|r| replicas(r)).sum();
        if recreate {
            for r in &old {
                wrote.extend(scale(&rs_api, rec, d, r, 0).await?);
            }
            let old_uids: Vec<&str> = old
                .iter()
                .filter_map(|r| r.metadata.uid.as_deref())
                .collect();
            let old_pods = pods
                .iter()
                .any(|p| controller_uid(p.as_ref()).is_some_and(|u| old_uids.contains(&u)));
            if old_active == 0 && !old_pods {
                wrote.extend(scale(&rs_api, rec, d, n, want).await?);
            }
        } else if old_active == 0 {
            wrote.extend(scale(&rs_api, rec, d, n, want).await?);
        } else {
            // kube's rolling update: scale the new ReplicaSet up within the surge; if that
            // wrote nothing, scale old ones down within the availability floor — first the
            // replicas that are not available anyway, then available ones, oldest first.
            // Pods not yet deleted count against the surge until they are gone.
            let total: i32 = owned.iter().map(|r| replicas(r).max(alive(r))).sum();
            let room = want + surge - total;
            let cur = replicas(n);
            let up = if room > 0 && cur < want {
                scale(&rs_api, rec, d, n, (cur + room).min(want)).await?
            } else if cur > want {
                scale(&rs_api, rec, d, n, want).await?
            } else {
                None
            };
            if let Some(w) = up {
                wrote.push(w);
            } else {
                let min_available = want - unavailable;
                let new_unavailable = (replicas(n) - available(n)).max(0);
                let spec_total: i32 = owned.iter().map(|r| replicas(r)).sum();
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
                    let avail_all: i32 = owned.iter().map(|r| available(r)).sum();
                    let mut budget = (avail_all - min_available).max(0);
                    for (k, r) in old.iter().enumerate() {
                        let c = counts[k].min(budget).min(available(r));
                        counts[k] -= c;
                        budget -= c;
                    }
                }
                for (k, r) in old.iter().enumerate() {
                    wrote.extend(scale(&rs_api, rec, d, r, counts[k]).await?);
                }
            }
        }
        // History: old ReplicaSets at zero beyond revisionHistoryLimit, oldest first.
        let limit = spec.revision_history_limit.unwrap_or(10).max(0) as usize;
        let idle: Vec<&Arc<ReplicaSet>> = old
            .iter()
            .filter(|r| replicas(r) == 0 && r.status.as_ref().map(|s| s.replicas).unwrap_or(0) == 0)
            .collect();
        if idle.len() > limit {
            for r in &idle[..idle.len() - limit] {
                let _ = rs_api.delete(&rs_name(r), &DeleteParams::default()).await;
            }
        }
    }

    if !wrote.is_empty() {
        waits.insert(duid.clone(), wrote);
    }
    // Status, from the ReplicaSets' own status.
    let sum = |f: &dyn Fn(&ReplicaSet) -> i32| owned.iter().map(|r| f(r)).sum::<i32>();
    let total = sum(&|r| r.status.as_ref().map(|s| s.replicas).unwrap_or(0));
    let ready = sum(&|r| {
        r.status
            .as_ref()
            .and_then(|s| s.ready_replicas)
            .unwrap_or(0)
    });
    let avail = sum(&|r| {
        r.status
            .as_ref()
            .and_then(|s| s.available_replicas)
            .unwrap_or(0)
    });
    let updated = new_rs
        .as_ref()
        .and_then(|n| n.status.as_ref().map(|s| s.replicas))
        .unwrap_or(0);
    let new_name = new_rs.as_ref().map(|n| rs_name(n)).unwrap_or(new_name);
    let complete = updated == want && total == want && avail >= want;
    let now = jiff::Timestamp::now();
    let ts = now.strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
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
            _ if stalled => (
                "False",
                "ProgressDeadlineExceeded",
                format!("ReplicaSet \"{new_name}\" has timed out progressing."),
            ),
            Some(t) if now.as_second() - t.as_second() > i64::from(deadline) => (
                "False",
                "ProgressDeadlineExceeded",
                format!("ReplicaSet \"{new_name}\" has timed out progressing."),
            ),
            _ => (
                "True",
                "ReplicaSetUpdated",
                format!("ReplicaSet \"{new_name}\" is progressing."),
            ),
        }
    };
    let keep = |prev: Option<k8s_openapi::api::apps::v1::DeploymentCondition>,
                status: &str,
                reason: &str| {
        prev.filter(|c| c.status == status && c.reason.as_deref() == Some(reason))
    };
    let av_prev = keep(cond("Available"), av_status, av_reason);
    let pr_prev = keep(prev_prog, pr_status, pr_reason);
    let pr_update = match &pr_prev {
        Some(c) if !moved || pr_reason == "ProgressDeadlineExceeded" => c
            .last_update_time
            .as_ref()
            .map(|t| t.0.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()),
        _ => None,
    }
    .unwrap_or_else(|| ts.clone());
    let when = |c: &Option<k8s_openapi::api::apps::v1::DeploymentCondition>| {
        c.as_ref()
            .and_then(|c| c.last_transition_time.as_ref())
            .map(|t| t.0.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
            .unwrap_or_else(|| ts.clone())
    };
    let av_update = av_prev
        .as_ref()
        .and_then(|c| c.last_update_time.as_ref())
        .map(|t| t.0.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_else(|| ts.clone());
    let status = serde_json::json!({
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
    });
    let mut old_status = serde_json::to_value(&cur).unwrap_or_default();
    if let Some(o) = old_status.as_object_mut() {
        o.entry("unavailableReplicas").or_insert(0.into());
        for k in [
            "replicas",
            "updatedReplicas",
            "readyReplicas",
            "availableReplicas",
        ] {
            o.entry(k).or_insert(0.into());
        }
    }
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
    if old_status != status {
        d_api
            .patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(&serde_json::json!({ "status": status })),
            )
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn surge_rounds_up_and_unavailability_down() {
        let pct = IntOrString::String("25%".into());
        assert_eq!(resolve(Some(&pct), 10, "25%", true), 3);
        assert_eq!(resolve(Some(&pct), 10, "25%", false), 2);
        assert_eq!(resolve(Some(&IntOrString::Int(1)), 10, "25%", false), 1);
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
        assert!(a.bytes().all(|c| ALPHABET.contains(&c)));
    }
}
