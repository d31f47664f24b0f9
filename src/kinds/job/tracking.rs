//! How the Job controller counts its pods, as kube-controller-manager does with the
//! `batch.kubernetes.io/job-tracking` finalizer: every pod it makes carries the finalizer, a
//! finished pod is first recorded in `status.uncountedTerminatedPods`, then its finalizer is
//! lifted, then it moves into `status.succeeded`/`status.failed` — so a pod deleted or
//! collected after it finished is still counted, and never twice. A failed pod first meets the
//! Job's `podFailurePolicy`: its first matching rule fails the Job, ignores the failure (not
//! counted against `backoffLimit`) or counts it.

use std::collections::{BTreeSet, HashSet};

use k8s_openapi::api::{
    batch::v1::{Job, PodFailurePolicyRule, UncountedTerminatedPods},
    core::v1::Pod,
};

use super::{index_of, parse_indexes};

/// The finalizer on every pod a Job makes, until the pod is counted.
pub const TRACKING_FINALIZER: &str = "batch.kubernetes.io/job-tracking";

/// What a failed pod means under the Job's podFailurePolicy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum OnFailure {
    /// Counted against backoffLimit (no rule matched, or a Count rule).
    Count,
    /// Not counted; the pod is replaced.
    Ignore,
    /// The Job fails at once (the rule's message).
    FailJob(String),
    /// The pod's index fails at once (with backoffLimitPerIndex).
    FailIndex,
}

fn uid(p: &Pod) -> &str {
    p.metadata.uid.as_deref().unwrap_or_default()
}

fn tracked(p: &Pod) -> bool {
    super::has_finalizer(&p.metadata, TRACKING_FINALIZER)
}

fn phase(p: &Pod) -> Option<&str> {
    p.status.as_ref().and_then(|s| s.phase.as_deref())
}

/// Whether `rule` matches failed pod `p`: an exit code of a (named) container In or NotIn the
/// values (exit code 0 never matches), or one of the pod's conditions.
fn matches(rule: &PodFailurePolicyRule, p: &Pod) -> Option<String> {
    let full = format!(
        "{}/{}",
        p.metadata.namespace.as_deref().unwrap_or_default(),
        p.metadata.name.as_deref().unwrap_or_default()
    );
    if let Some(codes) = &rule.on_exit_codes {
        let st = p.status.as_ref()?;
        let terminated = st
            .container_statuses
            .iter()
            .flatten()
            .chain(st.init_container_statuses.iter().flatten())
            .filter(|c| codes.container_name.as_ref().is_none_or(|n| *n == c.name))
            .filter_map(|c| {
                Some((
                    c.name.clone(),
                    c.state.as_ref()?.terminated.as_ref()?.exit_code,
                ))
            });
        for (name, code) in terminated {
            let listed = codes.values.contains(&code);
            let hit = code != 0
                && (if codes.operator == "In" {
                    listed
                } else {
                    !listed
                });
            if hit {
                return Some(format!(
                    "Container {name} for pod {full} failed with exit code {code}"
                ));
            }
        }
        return None;
    }
    let conds = p.status.as_ref()?.conditions.as_ref()?;
    rule.on_pod_conditions.iter().flatten().find_map(|want| {
        conds
            .iter()
            .any(|c| c.type_ == want.type_ && c.status == want.status)
            .then(|| format!("Pod {full} has condition {} matching", want.type_))
    })
}

/// The podFailurePolicy's verdict on failed pod `p`.
pub(super) fn on_failure(job: &Job, p: &Pod) -> OnFailure {
    let rules = job
        .spec
        .as_ref()
        .and_then(|s| s.pod_failure_policy.as_ref())
        .map(|pfp| pfp.rules.as_slice())
        .unwrap_or_default();
    for (i, rule) in rules.iter().enumerate() {
        let Some(what) = matches(rule, p) else {
            continue;
        };
        return match rule.action.as_str() {
            "Ignore" => OnFailure::Ignore,
            "FailIndex" => OnFailure::FailIndex,
            "FailJob" => OnFailure::FailJob(if what.ends_with("matching") {
                format!("{what} FailJob rule at index {i}")
            } else {
                format!("{what} matching FailJob rule at index {i}")
            }),
            _ => OnFailure::Count,
        };
    }
    OnFailure::Count
}

/// The Job's pods, counted.
#[derive(Debug, Default, PartialEq)]
pub struct Tally {
    /// Succeeded and counted failed pods in all (persisted, recorded, and seen now).
    pub succeeded: i32,
    pub failed: i32,
    /// The indexes that succeeded (Indexed Jobs), persisted ones included.
    pub done_indexes: BTreeSet<i32>,
    /// The status's persisted counts and uncounted pods after this pass.
    pub status_succeeded: i32,
    pub status_failed: i32,
    pub uncounted: UncountedTerminatedPods,
    /// Pods whose finalizer comes off now.
    pub release: Vec<String>,
    /// Failed pods ignored by the podFailurePolicy (not counted, replaced).
    pub ignored: HashSet<String>,
    /// A FailJob rule matched: the message.
    pub fail_job: Option<String>,
    /// Indexes a FailIndex rule failed.
    pub fail_indexes: BTreeSet<i32>,
}

/// Counts `pods` (the Job's) against its status. With `ended`, the Job has finished: every
/// pod's finalizer goes once what it counts for is recorded.
pub fn tally(job: &Job, pods: &[&Pod], ended: bool) -> Tally {
    let old = job.status.clone().unwrap_or_default();
    let old_unc = old.uncounted_terminated_pods.clone().unwrap_or_default();
    let (was_s, was_f): (HashSet<&str>, HashSet<&str>) = (
        old_unc
            .succeeded
            .iter()
            .flatten()
            .map(String::as_str)
            .collect(),
        old_unc
            .failed
            .iter()
            .flatten()
            .map(String::as_str)
            .collect(),
    );
    let mut t = Tally {
        status_succeeded: old.succeeded.unwrap_or(0),
        status_failed: old.failed.unwrap_or(0),
        done_indexes: parse_indexes(old.completed_indexes.as_deref().unwrap_or("")),
        ..Default::default()
    };
    let (mut unc_s, mut unc_f): (Vec<String>, Vec<String>) = (vec![], vec![]);
    let name = |p: &Pod| p.metadata.name.clone().unwrap_or_default();
    // Recorded before: still holding the finalizer, it comes off now; without it, counted.
    for (was, unc, count) in [
        (&was_s, &mut unc_s, &mut t.status_succeeded),
        (&was_f, &mut unc_f, &mut t.status_failed),
    ] {
        for u in was.iter() {
            match pods.iter().find(|p| uid(p) == *u).filter(|p| tracked(p)) {
                Some(p) => {
                    unc.push(u.to_string());
                    t.release.push(name(p));
                }
                None => *count += 1,
            }
        }
    }
    // A pod deleted before it finished counts as failed at once (kube's default
    // TerminatingOrFailed), unless the Job is suspended or ended, or a podFailurePolicy
    // wants to see how it ends.
    let spec = job.spec.clone().unwrap_or_default();
    let count_terminating =
        !ended && !spec.suspend.unwrap_or(false) && spec.pod_failure_policy.is_none();
    for p in pods {
        if phase(p) == Some("Succeeded")
            && let Some(i) = index_of(p)
        {
            t.done_indexes.insert(i);
        }
        let recorded = was_s.contains(uid(p)) || was_f.contains(uid(p));
        if !tracked(p) || recorded {
            continue;
        }
        let going = p.metadata.deletion_timestamp.is_some() && count_terminating;
        match phase(p) {
            Some("Succeeded") => unc_s.push(uid(p).to_string()),
            Some(ph) if going && ph != "Failed" => unc_f.push(uid(p).to_string()),
            None if going => unc_f.push(uid(p).to_string()),
            Some("Failed") => match on_failure(job, p) {
                OnFailure::Ignore => {
                    t.ignored.insert(name(p));
                    t.release.push(name(p));
                }
                OnFailure::FailJob(msg) => {
                    t.fail_job.get_or_insert(msg);
                    unc_f.push(uid(p).to_string());
                }
                OnFailure::FailIndex => {
                    t.fail_indexes.extend(index_of(p));
                    unc_f.push(uid(p).to_string());
                }
                OnFailure::Count => unc_f.push(uid(p).to_string()),
            },
            // A pod still running when the Job has ended goes uncounted.
            _ if ended => t.release.push(name(p)),
            _ => {}
        }
    }
    t.succeeded = t.status_succeeded + unc_s.len() as i32;
    t.failed = t.status_failed + unc_f.len() as i32;
    t.uncounted = UncountedTerminatedPods {
        succeeded: Some(unc_s),
        failed: Some(unc_f),
    };
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn job(status: serde_json::Value, policy: serde_json::Value) -> Job {
        serde_json::from_value(json!({"metadata": {"name": "j", "namespace": "default"},
            "spec": {"template": {}, "podFailurePolicy": policy}, "status": status}))
        .unwrap()
    }

    fn pod(uid: &str, phase: &str, code: i32, tracked: bool) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": format!("p-{uid}"), "namespace": "default", "uid": uid,
                         "finalizers": if tracked { json!([TRACKING_FINALIZER]) } else { json!([]) }},
            "status": {"phase": phase, "containerStatuses": [{"name": "main", "image": "i", "imageID": "",
                "ready": false, "restartCount": 0, "state": {"terminated": {"exitCode": code}}}]}}))
        .unwrap()
    }

    #[test]
    fn a_finished_pod_is_recorded_then_released_then_counted_once() {
        let j = job(json!({}), json!(null));
        let p = pod("a", "Succeeded", 0, true);
        // Pass 1: recorded as uncounted, finalizer kept.
        let t = tally(&j, &[&p], false);
        assert_eq!((t.succeeded, t.status_succeeded), (1, 0));
        assert_eq!(t.uncounted.succeeded, Some(vec!["a".to_string()]));
        assert!(t.release.is_empty());
        // Pass 2: the status holds it; the finalizer comes off.
        let j = job(
            json!({"uncountedTerminatedPods": {"succeeded": ["a"]}}),
            json!(null),
        );
        let t = tally(&j, &[&p], false);
        assert_eq!(
            (t.succeeded, t.release.clone()),
            (1, vec!["p-a".to_string()])
        );
        // Pass 3: released (or deleted and gone): counted in status.succeeded.
        let released = pod("a", "Succeeded", 0, false);
        for pods in [vec![&released], vec![]] {
            let t = tally(&j, &pods, false);
            assert_eq!((t.succeeded, t.status_succeeded), (1, 1));
            assert_eq!(t.uncounted.succeeded, Some(vec![]));
        }
        // And once counted it is never counted again.
        let j = job(
            json!({"succeeded": 1, "uncountedTerminatedPods": {}}),
            json!(null),
        );
        assert_eq!(tally(&j, &[&released], false).succeeded, 1);
    }

    #[test]
    fn the_pod_failure_policy_ignores_counts_or_fails_the_job() {
        let policy = json!({"rules": [
            {"action": "Ignore", "onExitCodes": {"operator": "In", "values": [42]}},
            {"action": "FailJob", "onExitCodes": {"containerName": "main", "operator": "In", "values": [3]}},
            {"action": "Count", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}]});
        let j = job(json!({}), policy);
        let ignored = pod("i", "Failed", 42, true);
        let counted = pod("c", "Failed", 1, true);
        let t = tally(&j, &[&ignored, &counted], false);
        assert_eq!(t.failed, 1);
        assert!(t.ignored.contains("p-i") && t.release.contains(&"p-i".to_string()));
        let fatal = pod("f", "Failed", 3, true);
        let t = tally(&j, &[&fatal], false);
        assert_eq!(
            t.fail_job.as_deref(),
            Some(
                "Container main for pod default/p-f failed with exit code 3 matching FailJob rule at index 1"
            )
        );
    }
}
