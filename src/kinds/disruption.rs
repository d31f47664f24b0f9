//! What a policy/v1 PodDisruptionBudget means: kube-apiserver's validation, the disruption
//! controller's status (how many matching pods are healthy, how many must stay, how many may
//! go), and the eviction subresource's decision for one pod — pure over the objects.

use std::collections::BTreeMap;

use jiff::Timestamp;
use k8s_openapi::{
    api::{
        core::v1::Pod,
        policy::v1::{PodDisruptionBudget, PodDisruptionBudgetStatus},
    },
    apimachinery::pkg::{
        apis::meta::v1::{Condition, Time},
        util::intstr::IntOrString,
    },
};

use super::{
    pod::pod_ready,
    selector::selector_matches,
    validate::{FieldError, err},
};

/// How long an eviction's pod counts as disrupted before the controller sees it go.
pub const DISRUPTED_TTL_SECS: i64 = 120;

fn percent(v: &IntOrString) -> Option<Result<i64, ()>> {
    match v {
        IntOrString::Int(_) => None,
        IntOrString::String(s) => Some(
            s.strip_suffix('%')
                .and_then(|p| p.parse::<i64>().ok())
                .filter(|p| (0..=100).contains(p))
                .ok_or(()),
        ),
    }
}

/// kube-apiserver's validation of a budget.
pub fn validate_pdb(pdb: &PodDisruptionBudget) -> Vec<FieldError> {
    let mut errs = vec![];
    let spec = pdb.spec.clone().unwrap_or_default();
    if spec.min_available.is_some() && spec.max_unavailable.is_some() {
        err(
            &mut errs,
            "spec",
            "Invalid value: \"\": minAvailable and maxUnavailable cannot be both set",
        );
    }
    for (path, v) in [
        ("spec.minAvailable", &spec.min_available),
        ("spec.maxUnavailable", &spec.max_unavailable),
    ] {
        match v {
            Some(IntOrString::Int(i)) if *i < 0 => err(
                &mut errs,
                path,
                format!("Invalid value: {i}: must be greater than or equal to 0"),
            ),
            Some(s @ IntOrString::String(text)) if percent(s) == Some(Err(())) => err(
                &mut errs,
                path,
                format!(
                    "Invalid value: \"{text}\": must be an integer or a percentage between 0% and 100%"
                ),
            ),
            _ => {}
        }
    }
    if let Some(p) = spec
        .unhealthy_pod_eviction_policy
        .as_deref()
        .filter(|p| !["IfHealthyBudget", "AlwaysAllow"].contains(p))
    {
        err(
            &mut errs,
            "spec.unhealthyPodEvictionPolicy",
            format!(
                "Unsupported value: \"{p}\": supported values: \"AlwaysAllow\", \"IfHealthyBudget\""
            ),
        );
    }
    errs
}

/// Whether the budget covers `pod` (same namespace, its selector; in policy/v1 an empty
/// selector matches every pod and a missing one none).
pub fn covers(pdb: &PodDisruptionBudget, pod: &Pod) -> bool {
    pdb.metadata.namespace == pod.metadata.namespace
        && pdb
            .spec
            .as_ref()
            .and_then(|s| s.selector.as_ref())
            .is_some_and(|sel| selector_matches(sel, pod.metadata.labels.as_ref()))
}

/// A pod that counts as healthy: ready and not going away.
pub fn healthy(p: &Pod) -> bool {
    p.metadata.deletion_timestamp.is_none() && pod_ready(p)
}

fn resolve(v: &IntOrString, total: i64) -> i64 {
    i64::from(super::quantity::int_or_percent(
        Some(v),
        i32::try_from(total).unwrap_or(i32::MAX),
        "0",
        true,
    ))
}

/// The budget's status from the pods it covers (`pods`, none terminated) and the number its
/// controllers want (`expected`; for an integer minAvailable, the pods themselves), at `now`.
pub fn status(
    pdb: &PodDisruptionBudget,
    pods: &[&Pod],
    expected: i64,
    now: Timestamp,
) -> PodDisruptionBudgetStatus {
    let spec = pdb.spec.clone().unwrap_or_default();
    let old = pdb.status.clone().unwrap_or_default();
    // Evicted pods not yet seen going are kept as disrupted for a while.
    let disrupted: BTreeMap<String, Time> = old
        .disrupted_pods
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter(|(name, t)| {
            now.as_second() - t.0.as_second() < DISRUPTED_TTL_SECS
                && pods.iter().any(|p| {
                    p.metadata.name.as_deref() == Some(name.as_str())
                        && p.metadata.deletion_timestamp.is_none()
                })
        })
        .collect();
    let current = pods
        .iter()
        .filter(|p| healthy(p) && !disrupted.contains_key(p.metadata.name.as_deref().unwrap_or("")))
        .count() as i64;
    let desired = match (&spec.min_available, &spec.max_unavailable) {
        (Some(m), _) => resolve(m, expected),
        (None, Some(u)) => (expected - resolve(u, expected)).max(0),
        (None, None) => expected,
    };
    let allowed = (current - desired).max(0);
    let (cstatus, reason) = if allowed > 0 {
        ("True", "SufficientPods")
    } else {
        ("False", "InsufficientPods")
    };
    let last = old
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "DisruptionAllowed" && c.status == cstatus)
        .map(|c| c.last_transition_time.clone());
    PodDisruptionBudgetStatus {
        observed_generation: pdb.metadata.generation,
        current_healthy: current as i32,
        desired_healthy: desired as i32,
        expected_pods: expected as i32,
        disruptions_allowed: allowed as i32,
        disrupted_pods: (!disrupted.is_empty()).then_some(disrupted),
        conditions: Some(vec![Condition {
            type_: "DisruptionAllowed".into(),
            status: cstatus.into(),
            reason: reason.into(),
            message: String::new(),
            observed_generation: pdb.metadata.generation,
            last_transition_time: last.unwrap_or(Time(now)),
        }]),
    }
}

/// What the eviction subresource does with `pod` under `pdb`.
#[derive(Debug, PartialEq, Eq)]
pub enum Eviction {
    /// Delete it, nothing counted (unhealthy under AlwaysAllow or a healthy budget).
    Allow,
    /// Delete it and count it against the budget (status written first).
    Spend,
    /// 429: the budget allows no disruption now (the cause's message).
    Refuse(String),
}

/// The eviction subresource's decision for `pod` under the budget that covers it.
pub fn evict(pdb: &PodDisruptionBudget, pod: &Pod) -> Eviction {
    let st = pdb.status.clone().unwrap_or_default();
    let name = pdb.metadata.name.clone().unwrap_or_default();
    if st.observed_generation.unwrap_or(0) < pdb.metadata.generation.unwrap_or(0) {
        return Eviction::Refuse(format!(
            "The disruption budget {name} is still being processed by the server."
        ));
    }
    if !healthy(pod) {
        let policy = pdb
            .spec
            .as_ref()
            .and_then(|s| s.unhealthy_pod_eviction_policy.as_deref())
            .unwrap_or("IfHealthyBudget");
        if policy == "AlwaysAllow"
            || (st.current_healthy >= st.desired_healthy && st.desired_healthy > 0)
        {
            return Eviction::Allow;
        }
    }
    if st.disruptions_allowed <= 0 {
        return Eviction::Refuse(format!(
            "The disruption budget {name} needs {} healthy pods and has {} currently",
            st.desired_healthy, st.current_healthy
        ));
    }
    Eviction::Spend
}

/// The budget's status once `pod` is evicted: one disruption fewer, the pod recorded.
pub fn spent(pdb: &PodDisruptionBudget, pod: &str, now: Timestamp) -> PodDisruptionBudgetStatus {
    let mut st = pdb.status.clone().unwrap_or_default();
    st.disruptions_allowed = (st.disruptions_allowed - 1).max(0);
    st.disrupted_pods
        .get_or_insert_default()
        .insert(pod.to_string(), Time(now));
    st
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pdb(spec: serde_json::Value) -> PodDisruptionBudget {
        serde_json::from_value(
            json!({"metadata": {"name": "web", "namespace": "default", "generation": 1},
            "spec": spec}),
        )
        .unwrap()
    }

    fn pod(name: &str, ready: bool) -> Pod {
        serde_json::from_value(json!({"metadata": {"name": name, "namespace": "default", "labels": {"app": "web"}},
            "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]}}))
        .unwrap()
    }

    fn now() -> Timestamp {
        "2026-01-01T00:00:00Z".parse().unwrap()
    }

    #[test]
    fn the_status_counts_healthy_pods_against_the_budget() {
        let p = pdb(json!({"minAvailable": 2, "selector": {"matchLabels": {"app": "web"}}}));
        let pods = [pod("a", true), pod("b", true), pod("c", false)];
        let refs: Vec<&Pod> = pods.iter().collect();
        let st = status(&p, &refs, 3, now());
        assert_eq!(
            (
                st.current_healthy,
                st.desired_healthy,
                st.disruptions_allowed
            ),
            (2, 2, 0)
        );
        assert_eq!(st.conditions.unwrap()[0].reason, "InsufficientPods");
        let p = pdb(json!({"maxUnavailable": "50%", "selector": {"matchLabels": {"app": "web"}}}));
        let st = status(&p, &refs, 4, now());
        assert_eq!((st.desired_healthy, st.disruptions_allowed), (2, 0));
    }

    #[test]
    fn an_eviction_spends_the_budget_then_is_refused() {
        let mut p = pdb(json!({"minAvailable": 1, "selector": {"matchLabels": {"app": "web"}}}));
        let pods = [pod("a", true), pod("b", true)];
        let refs: Vec<&Pod> = pods.iter().collect();
        p.status = Some(status(&p, &refs, 2, now()));
        assert_eq!(evict(&p, &pods[0]), Eviction::Spend);
        p.status = Some(spent(&p, "a", now()));
        assert!(
            matches!(evict(&p, &pods[1]), Eviction::Refuse(m) if m == "The disruption budget web needs 1 healthy pods and has 2 currently")
        );
        // The evicted pod stays disrupted until it goes: the recomputed status agrees.
        let st = status(&p, &refs, 2, now());
        assert_eq!((st.current_healthy, st.disruptions_allowed), (1, 0));
        // An unready pod may go when the budget is healthy.
        let unready = pod("c", false);
        p.status = Some(status(&p, &refs, 2, now()));
        assert_eq!(evict(&p, &unready), Eviction::Allow);
    }

    #[test]
    fn validation_names_the_field() {
        let p = pdb(json!({"minAvailable": 1, "maxUnavailable": "150%"}));
        let errs: Vec<String> = validate_pdb(&p).iter().map(|e| e.to_string()).collect();
        assert!(
            errs.iter()
                .any(|e| e.contains("minAvailable and maxUnavailable cannot be both set")),
            "{errs:?}"
        );
        assert!(
            errs.iter()
                .any(|e| e.starts_with("spec.maxUnavailable: Invalid value: \"150%\"")),
            "{errs:?}"
        );
    }
}
