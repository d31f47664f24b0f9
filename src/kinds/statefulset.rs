//! What an apps/v1 StatefulSet means: kube-apiserver's defaults and validation (on create and
//! on update, where only replicas, ordinals, template, updateStrategy, the claim retention
//! policy and minReadySeconds may change), and the StatefulSet controller's decision for one
//! set from its pods and claims — pure, so the controller only carries it out.
//!
//! Pods are `<set>-<ordinal>` with that host name under the set's `serviceName`, each with a
//! claim `<template>-<set>-<ordinal>` per volume claim template that outlives it. Under
//! `OrderedReady` pods start one at a time in ordinal order, each once the one before is
//! running and ready, and go in reverse order; `Parallel` starts and stops them all at once. A
//! `RollingUpdate` replaces pods at or above `partition` from the highest ordinal down, at most
//! `maxUnavailable` (default 1) unavailable at a time; `OnDelete` only gives pods deleted by
//! someone else the new template.

use std::collections::{BTreeMap, HashSet};

use jiff::Timestamp;
use k8s_openapi::{
    api::{
        apps::v1::{StatefulSet, StatefulSetSpec, StatefulSetStatus},
        core::v1::{
            PersistentVolumeClaim, PersistentVolumeClaimVolumeSource, Pod, PodTemplateSpec, Volume,
        },
    },
    apimachinery::pkg::{
        apis::meta::v1::{ObjectMeta, OwnerReference},
        util::intstr::IntOrString,
    },
};
use serde_json::{Value, json};

use super::{
    history::HASH_LABEL,
    pod::{pod_available, pod_ready},
    validate::{FieldError, err, is_dns1123_label, validate_template},
};

/// The pod labels the controller adds: its name and its ordinal.
pub const POD_NAME_LABEL: &str = "statefulset.kubernetes.io/pod-name";
pub const POD_INDEX_LABEL: &str = "apps.kubernetes.io/pod-index";

/// kube-apiserver's defaults for a StatefulSet (as JSON): one replica, `OrderedReady`,
/// `RollingUpdate` with partition 0, ten revisions kept, claims retained, and each claim
/// template's own defaults (Filesystem volumes, phase Pending).
pub fn default_statefulset(obj: &mut Value) {
    let Some(spec) = obj.get_mut("spec").and_then(Value::as_object_mut) else {
        return;
    };
    spec.entry("replicas").or_insert(1.into());
    spec.entry("revisionHistoryLimit").or_insert(10.into());
    spec.entry("podManagementPolicy")
        .or_insert("OrderedReady".into());
    let st = spec
        .entry("updateStrategy")
        .or_insert_with(|| json!({}))
        .as_object_mut();
    if let Some(st) = st {
        let ty = st.entry("type").or_insert("RollingUpdate".into()).clone();
        if ty == "RollingUpdate" {
            let ru = st.entry("rollingUpdate").or_insert_with(|| json!({}));
            if let Some(ru) = ru.as_object_mut() {
                ru.entry("partition").or_insert(0.into());
            }
        }
    }
    let retention = spec
        .entry("persistentVolumeClaimRetentionPolicy")
        .or_insert_with(|| json!({}));
    if let Some(r) = retention.as_object_mut() {
        r.entry("whenDeleted").or_insert("Retain".into());
        r.entry("whenScaled").or_insert("Retain".into());
    }
    if let Some(ts) = spec
        .get_mut("volumeClaimTemplates")
        .and_then(Value::as_array_mut)
    {
        for t in ts.iter_mut().filter_map(Value::as_object_mut) {
            t.insert("apiVersion".into(), "v1".into());
            t.insert("kind".into(), "PersistentVolumeClaim".into());
            if let Some(s) = t.get_mut("spec").and_then(Value::as_object_mut) {
                s.entry("volumeMode").or_insert("Filesystem".into());
            }
            t.entry("status")
                .or_insert_with(|| json!({"phase": "Pending"}));
        }
    }
}

fn one_of(errs: &mut Vec<FieldError>, path: &str, v: Option<&str>, allowed: &[&str]) {
    if let Some(v) = v.filter(|v| !allowed.contains(v)) {
        let list: Vec<String> = allowed.iter().map(|a| format!("\"{a}\"")).collect();
        err(
            errs,
            path,
            format!(
                "Unsupported value: \"{v}\": supported values: {}",
                list.join(", ")
            ),
        );
    }
}

fn not_negative(errs: &mut Vec<FieldError>, path: &str, v: Option<i32>) {
    if let Some(v) = v.filter(|v| *v < 0) {
        err(
            errs,
            path,
            format!("Invalid value: {v}: must be greater than or equal to 0"),
        );
    }
}

/// kube-apiserver's validation of a (defaulted) StatefulSet.
pub fn validate_statefulset(set: &StatefulSet) -> Vec<FieldError> {
    let mut errs = vec![];
    let spec = set.spec.clone().unwrap_or_default();
    one_of(
        &mut errs,
        "spec.podManagementPolicy",
        spec.pod_management_policy.as_deref(),
        &["OrderedReady", "Parallel"],
    );
    let strategy = spec.update_strategy.clone().unwrap_or_default();
    one_of(
        &mut errs,
        "spec.updateStrategy.type",
        strategy.type_.as_deref(),
        &["RollingUpdate", "OnDelete"],
    );
    if strategy.type_.as_deref() == Some("OnDelete") && strategy.rolling_update.is_some() {
        err(
            &mut errs,
            "spec.updateStrategy.rollingUpdate",
            "Invalid value: \"OnDelete\": only allowed for updateStrategy 'RollingUpdate'",
        );
    }
    if let Some(ru) = &strategy.rolling_update {
        not_negative(
            &mut errs,
            "spec.updateStrategy.rollingUpdate.partition",
            ru.partition,
        );
        if let Some(IntOrString::Int(v)) = ru
            .max_unavailable
            .as_ref()
            .filter(|v| matches!(v, IntOrString::Int(i) if *i < 1))
        {
            err(
                &mut errs,
                "spec.updateStrategy.rollingUpdate.maxUnavailable",
                format!("Invalid value: {v}: must be greater than 0"),
            );
        }
    }
    if let Some(r) = &spec.persistent_volume_claim_retention_policy {
        for (path, v) in [
            ("whenDeleted", r.when_deleted.as_deref()),
            ("whenScaled", r.when_scaled.as_deref()),
        ] {
            one_of(
                &mut errs,
                &format!("spec.persistentVolumeClaimRetentionPolicy.{path}"),
                v,
                &["Retain", "Delete"],
            );
        }
    }
    not_negative(&mut errs, "spec.replicas", spec.replicas);
    not_negative(&mut errs, "spec.minReadySeconds", spec.min_ready_seconds);
    not_negative(
        &mut errs,
        "spec.ordinals.start",
        spec.ordinals.as_ref().and_then(|o| o.start),
    );
    if let Some(s) = spec.service_name.as_deref().filter(|s| !s.is_empty())
        && !is_dns1123_label(s)
    {
        err(
            &mut errs,
            "spec.serviceName",
            format!(
                "Invalid value: \"{s}\": {}",
                super::validate::DNS1123_LABEL_MSG
            ),
        );
    }
    for (i, t) in spec.volume_claim_templates.iter().flatten().enumerate() {
        if t.metadata.name.as_deref().unwrap_or_default().is_empty() {
            err(
                &mut errs,
                format!("spec.volumeClaimTemplates[{i}].metadata.name"),
                "Required value: name or generateName is required",
            );
        }
    }
    let template = with_claim_volumes(&spec);
    validate_template(
        &mut errs,
        Some(&spec.selector),
        &template,
        &["Always"],
        "statefulset",
    );
    if spec
        .template
        .spec
        .as_ref()
        .and_then(|s| s.active_deadline_seconds)
        .is_some()
    {
        err(
            &mut errs,
            "spec.template.spec.activeDeadlineSeconds",
            "Forbidden: activeDeadlineSeconds in StatefulSet is not Supported",
        );
    }
    errs
}

/// The pod template as the set's pods get it (for validation): a volume for each claim
/// template.
fn with_claim_volumes(spec: &StatefulSetSpec) -> PodTemplateSpec {
    let mut template = spec.template.clone();
    if let Some(ps) = template.spec.as_mut() {
        for t in spec.volume_claim_templates.iter().flatten() {
            let name = name_of(&t.metadata).to_string();
            let vols = ps.volumes.get_or_insert_default();
            vols.retain(|v| v.name != name);
            vols.push(Volume {
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: claim_name(&name, "set", 0),
                    read_only: None,
                }),
                name,
                ..Default::default()
            });
        }
    }
    template
}

/// kube-apiserver's check of an update: only some of the spec may change.
pub fn validate_update(old: &StatefulSet, new: &StatefulSet) -> Vec<FieldError> {
    let mutable = |s: &Option<StatefulSetSpec>| {
        let mut s = s.clone().unwrap_or_default();
        s.replicas = None;
        s.ordinals = None;
        s.revision_history_limit = None;
        s.template = PodTemplateSpec::default();
        s.update_strategy = None;
        s.persistent_volume_claim_retention_policy = None;
        s.min_ready_seconds = None;
        // Status is no part of a claim template's identity.
        for t in s.volume_claim_templates.iter_mut().flatten() {
            t.status = None;
        }
        s
    };
    let mut errs = vec![];
    if mutable(&old.spec) != mutable(&new.spec) {
        err(
            &mut errs,
            "spec",
            "Forbidden: updates to statefulset spec for fields other than 'replicas', 'ordinals', 'template', 'updateStrategy', 'revisionHistoryLimit', 'persistentVolumeClaimRetentionPolicy' and 'minReadySeconds' are forbidden",
        );
    }
    errs
}

/// The ordinal of `pod` in the set named `set` (`<set>-<ordinal>`).
pub fn ordinal_of(set: &str, pod: &str) -> Option<i32> {
    let n = pod.strip_prefix(set)?.strip_prefix('-')?;
    if n.is_empty() || (n.len() > 1 && n.starts_with('0')) {
        return None;
    }
    n.parse().ok().filter(|o: &i32| *o >= 0)
}

/// The name of the claim of template `tpl` for the pod at `ordinal`.
pub fn claim_name(tpl: &str, set: &str, ordinal: i32) -> String {
    format!("{tpl}-{set}-{ordinal}")
}

/// The revisions a set's pods are made from: the one its status calls current and the one
/// of its present template.
#[derive(Debug, Clone)]
pub struct Revisions {
    pub current: String,
    pub current_template: PodTemplateSpec,
    pub update: String,
    pub update_template: PodTemplateSpec,
}

/// What a StatefulSet needs now.
#[derive(Debug, Default)]
pub struct SetPlan {
    /// Claims to create before the pods that use them.
    pub claims: Vec<PersistentVolumeClaim>,
    pub create: Vec<Pod>,
    pub delete: Vec<String>,
    /// Claims that get an owner (retention `Delete`): the set, or a pod scaled away.
    pub claim_owners: Vec<(String, OwnerReference)>,
    pub status: Option<StatefulSetStatus>,
}

fn name_of(m: &ObjectMeta) -> &str {
    m.name.as_deref().unwrap_or_default()
}

fn revision_of(p: &Pod) -> Option<&str> {
    p.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(HASH_LABEL))
        .map(String::as_str)
}

fn terminating(p: &Pod) -> bool {
    p.metadata.deletion_timestamp.is_some()
}

fn finished(p: &Pod) -> bool {
    matches!(
        p.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Failed" | "Succeeded")
    )
}

/// Running, ready and (past `minReadySeconds`) available, not going away.
fn healthy(p: &Pod, min_ready: i32, now: Timestamp) -> bool {
    !terminating(p)
        && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
        && pod_available(p, min_ready, now)
}

fn owner_ref(api_version: &str, kind: &str, meta: &ObjectMeta) -> OwnerReference {
    OwnerReference {
        api_version: api_version.into(),
        kind: kind.into(),
        name: name_of(meta).into(),
        uid: meta.uid.clone().unwrap_or_default(),
        controller: Some(false),
        block_owner_deletion: Some(true),
    }
}

/// The pod at `ordinal` of `set`, from `template` (revision `rev`).
pub fn pod_for(set: &StatefulSet, ordinal: i32, rev: &str, template: &PodTemplateSpec) -> Pod {
    let set_name = name_of(&set.metadata);
    let spec = set.spec.clone().unwrap_or_default();
    let name = format!("{set_name}-{ordinal}");
    let mut meta = template.metadata.clone().unwrap_or_default();
    meta.name = Some(name.clone());
    meta.generate_name = None;
    meta.namespace = set.metadata.namespace.clone();
    let labels = meta.labels.get_or_insert_default();
    labels.insert(HASH_LABEL.into(), rev.into());
    labels.insert(POD_NAME_LABEL.into(), name.clone());
    labels.insert(POD_INDEX_LABEL.into(), ordinal.to_string());
    let mut ps = template.spec.clone().unwrap_or_default();
    ps.hostname = Some(name);
    if let Some(svc) = spec.service_name.filter(|s| !s.is_empty()) {
        ps.subdomain = Some(svc);
    }
    for t in spec.volume_claim_templates.iter().flatten() {
        let vname = name_of(&t.metadata).to_string();
        let vols = ps.volumes.get_or_insert_default();
        vols.retain(|v| v.name != vname);
        vols.push(Volume {
            name: vname.clone(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: claim_name(&vname, set_name, ordinal),
                read_only: None,
            }),
            ..Default::default()
        });
    }
    Pod {
        metadata: meta,
        spec: Some(ps),
        status: None,
    }
}

/// Whether one of the claims of the pod at `ordinal` is being deleted.
fn claims_going(
    set: &StatefulSet,
    ordinal: i32,
    existing: &BTreeMap<String, &PersistentVolumeClaim>,
) -> bool {
    let set_name = name_of(&set.metadata);
    set.spec
        .iter()
        .flat_map(|s| s.volume_claim_templates.iter().flatten())
        .filter_map(|t| existing.get(&claim_name(name_of(&t.metadata), set_name, ordinal)))
        .any(|c| c.metadata.deletion_timestamp.is_some())
}

/// The claims the pod at `ordinal` needs that `existing` lacks.
fn claims_for(
    set: &StatefulSet,
    ordinal: i32,
    existing: &BTreeMap<String, &PersistentVolumeClaim>,
) -> Vec<PersistentVolumeClaim> {
    let set_name = name_of(&set.metadata);
    let spec = set.spec.clone().unwrap_or_default();
    let selector_labels = spec.selector.match_labels.clone().unwrap_or_default();
    let delete_with_set = spec
        .persistent_volume_claim_retention_policy
        .as_ref()
        .and_then(|r| r.when_deleted.as_deref())
        == Some("Delete");
    let mut out = vec![];
    for t in spec.volume_claim_templates.iter().flatten() {
        let name = claim_name(name_of(&t.metadata), set_name, ordinal);
        if existing.contains_key(&name) {
            continue;
        }
        let mut labels = t.metadata.labels.clone().unwrap_or_default();
        labels.extend(selector_labels.clone());
        out.push(PersistentVolumeClaim {
            metadata: ObjectMeta {
                name: Some(name),
                namespace: set.metadata.namespace.clone(),
                labels: Some(labels),
                annotations: t.metadata.annotations.clone(),
                owner_references: delete_with_set
                    .then(|| vec![owner_ref("apps/v1", "StatefulSet", &set.metadata)]),
                ..Default::default()
            },
            spec: t.spec.clone(),
            status: None,
        });
    }
    out
}

/// What `set` needs given the pods it controls, the claims of its namespace and its
/// revisions, at `now`.
pub fn plan(
    set: &StatefulSet,
    pods: &[&Pod],
    claims: &BTreeMap<String, &PersistentVolumeClaim>,
    revs: &Revisions,
    now: Timestamp,
) -> SetPlan {
    let set_name = name_of(&set.metadata);
    let spec = set.spec.clone().unwrap_or_default();
    let start = spec.ordinals.as_ref().and_then(|o| o.start).unwrap_or(0);
    let n = spec.replicas.unwrap_or(1).max(0);
    let min_ready = spec.min_ready_seconds.unwrap_or(0);
    let monotonic = spec.pod_management_policy.as_deref() != Some("Parallel");
    let mut slots: Vec<Option<&Pod>> = vec![None; n as usize];
    let mut condemned: Vec<(i32, &Pod)> = vec![];
    for p in pods {
        let Some(ord) = ordinal_of(set_name, name_of(&p.metadata)) else {
            continue;
        };
        if (start..start.saturating_add(n)).contains(&ord) {
            slots[(ord - start) as usize] = Some(p);
        } else {
            condemned.push((ord, p));
        }
    }
    condemned.sort_by_key(|(o, _)| std::cmp::Reverse(*o));
    let mut p = SetPlan {
        status: status(set, pods, revs, min_ready, now),
        ..Default::default()
    };
    let strategy = spec.update_strategy.clone().unwrap_or_default();
    let rolling = strategy.type_.as_deref() != Some("OnDelete");
    let partition = strategy
        .rolling_update
        .as_ref()
        .and_then(|r| r.partition)
        .unwrap_or(0);
    if !ensure_replicas(
        &mut p,
        set,
        &slots,
        claims,
        revs,
        (start, partition, rolling),
        now,
    ) && monotonic
    {
        return p;
    }
    if !scale_down(&mut p, set, &slots, &condemned, claims, now) && monotonic {
        return p;
    }
    if rolling {
        roll(&mut p, &spec, &slots, revs, partition, now);
    }
    p
}

/// Creates the missing pods (and their claims) and deletes finished ones; false when an
/// ordered set must wait (a pod just made, going or not yet healthy).
fn ensure_replicas(
    p: &mut SetPlan,
    set: &StatefulSet,
    slots: &[Option<&Pod>],
    claims: &BTreeMap<String, &PersistentVolumeClaim>,
    revs: &Revisions,
    (start, partition, rolling): (i32, i32, bool),
    now: Timestamp,
) -> bool {
    let spec = set.spec.clone().unwrap_or_default();
    let min_ready = spec.min_ready_seconds.unwrap_or(0);
    let monotonic = spec.pod_management_policy.as_deref() != Some("Parallel");
    let mut ok = true;
    for (i, slot) in slots.iter().enumerate() {
        let ord = start.saturating_add(i as i32);
        match slot {
            // A claim still being deleted must go before the pod is made again.
            None if claims_going(set, ord, claims) => ok = false,
            None => {
                p.claims.extend(claims_for(set, ord, claims));
                let (rev, template) = if rolling && (i as i32) < partition {
                    (&revs.current, &revs.current_template)
                } else {
                    (&revs.update, &revs.update_template)
                };
                p.create.push(pod_for(set, ord, rev, template));
                ok = false;
            }
            Some(pod) if finished(pod) && !terminating(pod) => {
                p.delete.push(name_of(&pod.metadata).into());
                ok = false;
            }
            Some(pod) => {
                if !terminating(pod) {
                    // A claim deleted under a living pod is made again.
                    p.claims.extend(claims_for(set, ord, claims));
                }
                if !healthy(pod, min_ready, now) {
                    ok = false;
                }
            }
        }
        if !ok && monotonic {
            return false;
        }
    }
    ok
}

/// Deletes the pods past the replica count, highest ordinal first (one at a time, and only
/// once the rest are healthy, when ordered); false when an ordered set must wait.
fn scale_down(
    p: &mut SetPlan,
    set: &StatefulSet,
    slots: &[Option<&Pod>],
    condemned: &[(i32, &Pod)],
    claims: &BTreeMap<String, &PersistentVolumeClaim>,
    now: Timestamp,
) -> bool {
    let spec = set.spec.clone().unwrap_or_default();
    let min_ready = spec.min_ready_seconds.unwrap_or(0);
    let monotonic = spec.pod_management_policy.as_deref() != Some("Parallel");
    let delete_when_scaled = spec
        .persistent_volume_claim_retention_policy
        .as_ref()
        .and_then(|r| r.when_scaled.as_deref())
        == Some("Delete");
    let set_name = name_of(&set.metadata);
    for (i, (ord, pod)) in condemned.iter().enumerate() {
        if terminating(pod) {
            if monotonic {
                return false;
            }
            continue;
        }
        // Ordered: only the first unhealthy pod (counting the condemned, highest first) may go.
        let unhealthy_before = slots.iter().flatten().any(|s| !healthy(s, min_ready, now))
            || condemned[..i]
                .iter()
                .any(|(_, c)| !healthy(c, min_ready, now));
        if monotonic && unhealthy_before {
            return false;
        }
        if delete_when_scaled {
            for t in spec.volume_claim_templates.iter().flatten() {
                let cn = claim_name(name_of(&t.metadata), set_name, *ord);
                let owned = claims.get(&cn).is_some_and(|c| {
                    c.metadata
                        .owner_references
                        .iter()
                        .flatten()
                        .any(|r| Some(&r.uid) == pod.metadata.uid.as_ref())
                });
                if claims.contains_key(&cn) && !owned {
                    p.claim_owners
                        .push((cn, owner_ref("v1", "Pod", &pod.metadata)));
                }
            }
        }
        p.delete.push(name_of(&pod.metadata).into());
        if monotonic {
            return false;
        }
    }
    true
}

/// The rolling update: outdated pods at or above the partition are deleted from the highest
/// ordinal down while fewer than `maxUnavailable` pods are unavailable (they come back with
/// the new template).
fn roll(
    p: &mut SetPlan,
    spec: &StatefulSetSpec,
    slots: &[Option<&Pod>],
    revs: &Revisions,
    partition: i32,
    now: Timestamp,
) {
    let min_ready = spec.min_ready_seconds.unwrap_or(0);
    let max_unavailable = spec
        .update_strategy
        .as_ref()
        .and_then(|s| s.rolling_update.as_ref())
        .and_then(|r| r.max_unavailable.as_ref());
    let max_unavailable =
        super::quantity::int_or_percent(max_unavailable, slots.len() as i32, "1", false).max(1);
    let unavailable = slots
        .iter()
        .filter(|s| !s.is_some_and(|pod| healthy(pod, min_ready, now)))
        .count() as i32
        + p.delete.len() as i32;
    let mut budget = max_unavailable - unavailable;
    for slot in slots.iter().skip(partition.max(0) as usize).rev() {
        if budget <= 0 {
            break;
        }
        let Some(pod) = slot else { continue };
        if revision_of(pod) != Some(revs.update.as_str()) && !terminating(pod) {
            p.delete.push(name_of(&pod.metadata).into());
            budget -= 1;
        }
    }
}

/// The status the set's pods show, when it differs from the object's.
fn status(
    set: &StatefulSet,
    pods: &[&Pod],
    revs: &Revisions,
    min_ready: i32,
    now: Timestamp,
) -> Option<StatefulSetStatus> {
    let mut st = StatefulSetStatus {
        observed_generation: set.metadata.generation,
        current_revision: Some(revs.current.clone()),
        update_revision: Some(revs.update.clone()),
        collision_count: Some(0),
        ..Default::default()
    };
    let (mut ready, mut available, mut current, mut updated) = (0, 0, 0, 0);
    for p in pods {
        if pod_ready(p) && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running") {
            ready += 1;
            if pod_available(p, min_ready, now) {
                available += 1;
            }
        }
        if !terminating(p) {
            if revision_of(p) == Some(revs.current.as_str()) {
                current += 1;
            }
            if revision_of(p) == Some(revs.update.as_str()) {
                updated += 1;
            }
        }
    }
    st.replicas = pods.len() as i32;
    st.ready_replicas = Some(ready);
    st.available_replicas = Some(available);
    st.current_replicas = Some(current);
    st.updated_replicas = Some(updated);
    let rolling = set
        .spec
        .as_ref()
        .and_then(|s| s.update_strategy.as_ref())
        .and_then(|s| s.type_.as_deref())
        != Some("OnDelete");
    if rolling && updated == st.replicas && ready == st.replicas {
        st.current_revision = Some(revs.update.clone());
        st.current_replicas = Some(updated);
    }
    let old = set.status.clone().unwrap_or_default();
    let same = StatefulSetStatus {
        conditions: None,
        ..old.clone()
    } == st;
    (!same).then_some(st)
}

/// The revision names the set's status and pods still use (kept when history is pruned).
pub fn revisions_in_use(set: &StatefulSet, pods: &[&Pod]) -> HashSet<String> {
    let mut out: HashSet<String> = pods
        .iter()
        .filter_map(|p| revision_of(p).map(str::to_string))
        .collect();
    if let Some(st) = &set.status {
        out.extend(st.current_revision.clone());
        out.extend(st.update_revision.clone());
    }
    out
}

#[cfg(test)]
mod tests;
