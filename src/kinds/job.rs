//! What a batch/v1 Job means: its defaults and the selector kube-apiserver generates, the
//! validation kube-apiserver does, and the Job controller's decision for one Job from its
//! pods (how many to start or stop, the back-off after failures, completion, failure by
//! `backoffLimit` or `activeDeadlineSeconds`, `suspend`, `ttlSecondsAfterFinished`, Indexed
//! completion) — pure, so the controller only carries it out.

use std::{collections::BTreeSet, time::Duration};

use jiff::Timestamp;
use k8s_openapi::{
    api::{
        batch::v1::{Job, JobCondition, JobStatus},
        core::v1::{EnvVar, EnvVarSource, ObjectFieldSelector, Pod, PodTemplateSpec},
    },
    apimachinery::pkg::apis::meta::v1::Time,
};
use serde_json::Value;

use super::validate::{FieldError, err};

/// The label the generated selector uses (and its legacy twin), and the Job name labels.
pub const CONTROLLER_UID: &str = "batch.kubernetes.io/controller-uid";
pub const JOB_NAME: &str = "batch.kubernetes.io/job-name";
const LEGACY_CONTROLLER_UID: &str = "controller-uid";
const LEGACY_JOB_NAME: &str = "job-name";
/// An Indexed Job's pod's index (annotation and label).
pub const COMPLETION_INDEX: &str = "batch.kubernetes.io/job-completion-index";

/// The first back-off after a pod failure, doubled per failure, at most [`MAX_BACKOFF`].
pub const BACKOFF: Duration = Duration::from_secs(10);
pub const MAX_BACKOFF: Duration = Duration::from_secs(360);

/// kube-apiserver's defaults for a Job (JSON, as the API server holds it): completions and
/// parallelism 1 when neither is set, backoffLimit 6, NonIndexed, not suspended, the Job's
/// labels from its template's when it has none, and — unless `manualSelector` — the selector
/// on the generated controller-uid label, which the template's labels then carry too.
pub fn default_job(obj: &mut Value) {
    let uid = obj
        .pointer("/metadata/uid")
        .and_then(Value::as_str)
        .map(str::to_string);
    let name = obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let template_labels = obj.pointer("/spec/template/metadata/labels").cloned();
    if let (Some(meta), Some(Value::Object(tl))) = (
        obj.get_mut("metadata").and_then(Value::as_object_mut),
        template_labels,
    ) {
        let empty = meta
            .get("labels")
            .and_then(Value::as_object)
            .is_none_or(|l| l.is_empty());
        if empty && !tl.is_empty() {
            meta.insert("labels".into(), Value::Object(tl));
        }
    }
    let Some(spec) = obj.get_mut("spec").and_then(Value::as_object_mut) else {
        return;
    };
    if !spec.contains_key("completions") && !spec.contains_key("parallelism") {
        spec.insert("completions".into(), 1.into());
    }
    spec.entry("parallelism").or_insert(1.into());
    spec.entry("backoffLimit").or_insert(6.into());
    spec.entry("completionMode").or_insert("NonIndexed".into());
    spec.entry("suspend").or_insert(false.into());
    spec.entry("podReplacementPolicy")
        .or_insert("TerminatingOrFailed".into());
    let manual = spec.get("manualSelector") == Some(&Value::Bool(true));
    let (Some(uid), false) = (uid, manual) else {
        return;
    };
    if !spec.contains_key("selector") {
        spec.insert(
            "selector".into(),
            serde_json::json!({"matchLabels": {CONTROLLER_UID: uid}}),
        );
    }
    let template = spec
        .entry("template")
        .or_insert_with(|| serde_json::json!({}));
    if let Some(t) = template.as_object_mut() {
        let meta = t.entry("metadata").or_insert_with(|| serde_json::json!({}));
        if let Some(m) = meta.as_object_mut() {
            let labels = m.entry("labels").or_insert_with(|| serde_json::json!({}));
            if let Some(l) = labels.as_object_mut() {
                for (k, v) in [
                    (CONTROLLER_UID, &uid),
                    (LEGACY_CONTROLLER_UID, &uid),
                    (JOB_NAME, &name),
                    (LEGACY_JOB_NAME, &name),
                ] {
                    l.entry(k).or_insert_with(|| v.clone().into());
                }
            }
        }
    }
}

/// kube-apiserver's validation of a (defaulted) Job.
pub fn validate_job(job: &Job) -> Vec<FieldError> {
    let mut errs = vec![];
    let spec = job.spec.clone().unwrap_or_default();
    for (path, v) in [
        ("spec.parallelism", spec.parallelism.map(i64::from)),
        ("spec.completions", spec.completions.map(i64::from)),
        ("spec.backoffLimit", spec.backoff_limit.map(i64::from)),
        (
            "spec.ttlSecondsAfterFinished",
            spec.ttl_seconds_after_finished.map(i64::from),
        ),
    ] {
        if let Some(v) = v.filter(|v| *v < 0) {
            err(
                &mut errs,
                path,
                format!("Invalid value: {v}: must be greater than or equal to 0"),
            );
        }
    }
    if let Some(v) = spec.active_deadline_seconds.filter(|v| *v <= 0) {
        err(
            &mut errs,
            "spec.activeDeadlineSeconds",
            format!("Invalid value: {v}: must be greater than 0"),
        );
    }
    match spec.completion_mode.as_deref() {
        None | Some("NonIndexed") => {}
        Some("Indexed") if spec.completions.is_none() => err(
            &mut errs,
            "spec.completions",
            "Required value: when completion mode is Indexed",
        ),
        Some("Indexed") => {}
        Some(o) => err(
            &mut errs,
            "spec.completionMode",
            format!("Unsupported value: \"{o}\": supported values: \"NonIndexed\", \"Indexed\""),
        ),
    }
    super::validate::validate_template(
        &mut errs,
        spec.selector.as_ref(),
        &spec.template,
        &["OnFailure", "Never"],
        "job",
    );
    errs
}

/// How a pod of the Job stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Active,
    /// Being deleted, not finished.
    Terminating,
    Succeeded,
    Failed,
}

fn outcome(p: &Pod) -> Outcome {
    match p.status.as_ref().and_then(|s| s.phase.as_deref()) {
        Some("Succeeded") => Outcome::Succeeded,
        Some("Failed") => Outcome::Failed,
        _ if p.metadata.deletion_timestamp.is_some() => Outcome::Terminating,
        _ => Outcome::Active,
    }
}

/// When a finished pod finished: its containers' last finishedAt, else its creation.
fn finished_at(p: &Pod) -> Option<Timestamp> {
    let st = p.status.as_ref();
    st.into_iter()
        .flat_map(|s| s.container_statuses.iter().flatten())
        .filter_map(|c| c.state.as_ref()?.terminated.as_ref()?.finished_at.as_ref())
        .map(|t| t.0)
        .max()
        .or_else(|| p.metadata.creation_timestamp.as_ref().map(|t| t.0))
}

/// An Indexed Job's pod's index.
pub fn index_of(p: &Pod) -> Option<i32> {
    p.metadata
        .annotations
        .as_ref()?
        .get(COMPLETION_INDEX)?
        .parse()
        .ok()
}

/// Indexes as kube writes `completedIndexes`: sorted ranges, `0-2,5`.
pub fn compress(indexes: &BTreeSet<i32>) -> String {
    let mut out: Vec<String> = vec![];
    let mut it = indexes.iter().copied().peekable();
    while let Some(start) = it.next() {
        let mut end = start;
        while it.peek() == Some(&(end + 1)) {
            end = it.next().unwrap_or(end);
        }
        out.push(if end == start {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
    }
    out.join(",")
}

/// The back-off before replacing a failed pod: 10 s, doubled per further failure, ≤ 6 min.
pub fn backoff(failures: u32) -> Duration {
    if failures == 0 {
        return Duration::ZERO;
    }
    BACKOFF
        .saturating_mul(1u32 << (failures - 1).min(16))
        .min(MAX_BACKOFF)
}

/// What the controller should do for one Job.
#[derive(Debug, Default, PartialEq)]
pub struct JobPlan {
    /// Pods to create, each with its completion index (Indexed Jobs).
    pub create: Vec<Option<i32>>,
    /// Pods to delete, by name.
    pub delete: Vec<String>,
    /// The new status, when it differs.
    pub status: Option<JobStatus>,
    /// `ttlSecondsAfterFinished` has passed: the Job goes, its pods with it.
    pub delete_job: bool,
    /// Events: (warning, reason, message).
    pub events: Vec<(bool, &'static str, String)>,
    /// Look again after this long (a back-off, a deadline, a TTL ahead).
    pub requeue: Option<Duration>,
}

fn has(st: &JobStatus, ty: &str) -> bool {
    st.conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == ty && c.status == "True")
}

fn condition(ty: &str, reason: &str, message: &str, now: Timestamp) -> JobCondition {
    JobCondition {
        type_: ty.into(),
        status: "True".into(),
        reason: Some(reason.into()),
        message: Some(message.into()),
        last_probe_time: Some(Time(now)),
        last_transition_time: Some(Time(now)),
    }
}

/// Sets condition `ty` to `status` (a new transition time only when it changes).
fn set_condition(st: &mut JobStatus, c: JobCondition) {
    let list = st.conditions.get_or_insert_default();
    match list.iter_mut().find(|x| x.type_ == c.type_) {
        Some(x) if x.status == c.status => {}
        Some(x) => *x = c,
        None => list.push(c),
    }
}

/// When the Job finished (Complete or Failed), if it did.
fn finished_time(st: &JobStatus) -> Option<Timestamp> {
    st.conditions
        .iter()
        .flatten()
        .find(|c| (c.type_ == "Complete" || c.type_ == "Failed") && c.status == "True")
        .and_then(|c| c.last_transition_time.as_ref().map(|t| t.0))
        .or_else(|| st.completion_time.as_ref().map(|t| t.0))
}

fn secs(d: i64) -> Duration {
    Duration::from_secs(d.max(0) as u64)
}

/// The Job controller's decision for `job` given its pods (those it controls), at `now`.
pub fn plan(job: &Job, pods: &[&Pod], now: Timestamp) -> JobPlan {
    let spec = job.spec.clone().unwrap_or_default();
    let old = job.status.clone().unwrap_or_default();
    let mut st = old.clone();
    let mut p = JobPlan::default();
    let name = |x: &Pod| x.metadata.name.clone().unwrap_or_default();
    let by = |o: Outcome| pods.iter().filter(move |x| outcome(x) == o);
    let active: Vec<&&Pod> = by(Outcome::Active).collect();
    let succeeded = by(Outcome::Succeeded).count() as i32;
    let failed = by(Outcome::Failed).count() as i32;
    if let Some(at) = finished_time(&old) {
        // Finished: only the TTL is left to act on (and pods still running, to stop).
        p.delete = active.iter().map(|x| name(x)).collect();
        if let Some(ttl) = spec.ttl_seconds_after_finished {
            let due = at + jiff::SignedDuration::from_secs(ttl.into());
            match now >= due {
                true => p.delete_job = true,
                false => {
                    p.requeue =
                        Some(secs(due.as_second() - now.as_second()).max(Duration::from_secs(1)))
                }
            }
        }
        return p;
    }
    let indexed = spec.completion_mode.as_deref() == Some("Indexed");
    let completions = spec.completions;
    let done_indexes: BTreeSet<i32> = by(Outcome::Succeeded).filter_map(|x| index_of(x)).collect();
    st.active = Some(active.len() as i32);
    st.succeeded = Some(succeeded);
    st.failed = Some(failed);
    st.ready = Some(active.iter().filter(|x| super::pod::pod_ready(x)).count() as i32);
    st.terminating = Some(by(Outcome::Terminating).count() as i32);
    if indexed {
        st.completed_indexes = Some(compress(&done_indexes));
    }
    let suspended = spec.suspend.unwrap_or(false);
    let running: Vec<String> = active.iter().map(|x| name(x)).collect();
    suspend_or_start(&mut p, &mut st, suspended, &running, now);
    let start = st.start_time.as_ref().map(|t| t.0);
    // Failure: too many failed pods, or past the deadline.
    let backoff_limit = spec.backoff_limit.unwrap_or(6);
    let deadline = spec
        .active_deadline_seconds
        .zip(start)
        .map(|(d, s)| s + jiff::SignedDuration::from_secs(d));
    let failure = if failed > backoff_limit {
        Some((
            "BackoffLimitExceeded",
            "Job has reached the specified backoff limit",
        ))
    } else if deadline.is_some_and(|d| now >= d) && !suspended {
        Some((
            "DeadlineExceeded",
            "Job was active longer than specified deadline",
        ))
    } else {
        None
    };
    let ttl = spec.ttl_seconds_after_finished;
    if let Some((reason, message)) = failure {
        let end = Ending {
            target: "FailureTarget",
            last: "Failed",
            reason,
            message,
            event: (true, reason, message),
        };
        finish(&mut p, &mut st, running, end, ttl, now);
        p.status = (st != old).then_some(st);
        return p;
    }
    let complete = match (indexed, completions) {
        (true, Some(c)) => (0..c).all(|i| done_indexes.contains(&i)),
        (false, Some(c)) => succeeded >= c,
        // No completions: done once a pod succeeded and none is left running.
        (_, None) => succeeded > 0 && active.is_empty(),
    };
    if complete && !suspended {
        st.completion_time = Some(Time(now));
        let end = Ending {
            target: "SuccessCriteriaMet",
            last: "Complete",
            reason: "CompletionsReached",
            message: "Reached expected number of succeeded pods",
            event: (false, "Completed", "Job completed"),
        };
        finish(&mut p, &mut st, running, end, ttl, now);
        p.status = (st != old).then_some(st);
        return p;
    }
    if !suspended {
        start_or_stop(&mut p, job, pods, &active, now);
        if let Some(d) = deadline {
            let left = secs(d.as_second() - now.as_second()).max(Duration::from_secs(1));
            p.requeue = Some(p.requeue.map_or(left, |r| r.min(left)));
        }
    }
    p.status = (st != old).then_some(st);
    p
}

/// `suspend`: the running pods stop and the Suspended condition says so; a resumed (or new)
/// Job gets its start time.
fn suspend_or_start(
    p: &mut JobPlan,
    st: &mut JobStatus,
    suspended: bool,
    running: &[String],
    now: Timestamp,
) {
    if suspended {
        p.delete = running.to_vec();
        st.active = Some(0);
        if !has(st, "Suspended") {
            set_condition(
                st,
                condition("Suspended", "JobSuspended", "Job suspended", now),
            );
            p.events.push((false, "Suspended", "Job suspended".into()));
        }
        return;
    }
    if has(st, "Suspended") {
        let mut c = condition("Suspended", "JobResumed", "Job resumed", now);
        c.status = "False".into();
        set_condition(st, c);
        p.events.push((false, "Resumed", "Job resumed".into()));
        st.start_time = None;
    }
    if st.start_time.is_none() {
        st.start_time = Some(Time(now));
    }
}

/// How a Job ends: its two conditions (the target first, as kube sets them), their reason and
/// message, and the event that says so.
struct Ending {
    target: &'static str,
    last: &'static str,
    reason: &'static str,
    message: &'static str,
    event: (bool, &'static str, &'static str),
}

/// The Job ends: its running pods stop, the conditions are set, the TTL (if any) starts.
fn finish(
    p: &mut JobPlan,
    st: &mut JobStatus,
    running: Vec<String>,
    e: Ending,
    ttl: Option<i32>,
    now: Timestamp,
) {
    p.delete = running;
    st.active = Some(0);
    set_condition(st, condition(e.target, e.reason, e.message, now));
    set_condition(st, condition(e.last, e.reason, e.message, now));
    p.events.push((e.event.0, e.event.1, e.event.2.into()));
    p.requeue = ttl.map(|t| secs(t.into()));
}

/// How many pods should run now, after the back-off, and which to start or stop.
fn start_or_stop(p: &mut JobPlan, job: &Job, pods: &[&Pod], active: &[&&Pod], now: Timestamp) {
    let spec = job.spec.clone().unwrap_or_default();
    let parallelism = spec.parallelism.unwrap_or(1).max(0) as usize;
    let succeeded: Vec<&&Pod> = pods
        .iter()
        .filter(|x| outcome(x) == Outcome::Succeeded)
        .collect();
    // Failures since the last success count for the back-off.
    let last_success = succeeded.iter().filter_map(|x| finished_at(x)).max();
    let failures: Vec<Timestamp> = pods
        .iter()
        .filter(|x| outcome(x) == Outcome::Failed)
        .filter_map(|x| finished_at(x))
        .filter(|t| last_success.is_none_or(|s| *t > s))
        .collect();
    let wait_until = failures.iter().max().map(|last| {
        *last + jiff::SignedDuration::try_from(backoff(failures.len() as u32)).unwrap_or_default()
    });
    let indexed = spec.completion_mode.as_deref() == Some("Indexed");
    let want: Vec<Option<i32>> = if indexed {
        let c = spec.completions.unwrap_or(0);
        let taken: BTreeSet<i32> = succeeded
            .iter()
            .chain(active.iter())
            .filter_map(|x| index_of(x))
            .collect();
        let room = parallelism.saturating_sub(active.len());
        (0..c)
            .filter(|i| !taken.contains(i))
            .take(room)
            .map(Some)
            .collect()
    } else {
        let remaining = match spec.completions {
            Some(c) => (c - succeeded.len() as i32).max(0) as usize,
            None if succeeded.is_empty() => parallelism,
            None => 0,
        };
        let target = parallelism.min(remaining);
        if active.len() > target {
            // Too many (parallelism lowered): the newest go.
            let mut extra: Vec<&&&Pod> = active.iter().collect();
            extra.sort_by_key(|x| {
                std::cmp::Reverse(x.metadata.creation_timestamp.as_ref().map(|t| t.0))
            });
            p.delete = extra
                .iter()
                .take(active.len() - target)
                .map(|x| x.metadata.name.clone().unwrap_or_default())
                .collect();
        }
        vec![None; target.saturating_sub(active.len())]
    };
    if want.is_empty() {
        return;
    }
    match wait_until {
        Some(t) if t > now => {
            p.requeue = Some(secs(t.as_second() - now.as_second()).max(Duration::from_secs(1)))
        }
        _ => p.create = want,
    }
}

/// The pod the Job starts (for `index`, in an Indexed Job): its template with the Job as
/// controller; an Indexed pod also gets its index as annotation, label, `JOB_COMPLETION_INDEX`
/// and host name `<job>-<index>`.
pub fn pod_for(job: &Job, index: Option<i32>) -> Pod {
    let spec = job.spec.clone().unwrap_or_default();
    let PodTemplateSpec {
        metadata,
        spec: pod_spec,
    } = spec.template;
    let mut meta = metadata.unwrap_or_default();
    let name = job.metadata.name.clone().unwrap_or_default();
    meta.name = None;
    meta.namespace = job.metadata.namespace.clone();
    meta.generate_name = Some(match index {
        Some(i) => format!("{name}-{i}-"),
        None => format!("{name}-"),
    });
    let mut ps = pod_spec.unwrap_or_default();
    if let Some(i) = index {
        meta.annotations
            .get_or_insert_default()
            .insert(COMPLETION_INDEX.into(), i.to_string());
        meta.labels
            .get_or_insert_default()
            .insert(COMPLETION_INDEX.into(), i.to_string());
        if ps.hostname.is_none() {
            ps.hostname = Some(format!("{name}-{i}"));
        }
        let env = EnvVar {
            name: "JOB_COMPLETION_INDEX".into(),
            value: None,
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    api_version: Some("v1".into()),
                    field_path: format!("metadata.annotations['{COMPLETION_INDEX}']"),
                }),
                ..Default::default()
            }),
        };
        for c in ps
            .containers
            .iter_mut()
            .chain(ps.init_containers.iter_mut().flatten())
        {
            c.env.get_or_insert_default().push(env.clone());
        }
    }
    Pod {
        metadata: meta,
        spec: Some(ps),
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(spec: Value) -> Job {
        let mut obj = serde_json::json!({"metadata": {"name": "pi", "namespace": "default", "uid": "u1"},
            "spec": spec});
        default_job(&mut obj);
        serde_json::from_value(obj).unwrap()
    }

    fn template() -> Value {
        serde_json::json!({"spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "i"}]}})
    }

    fn pod(name: &str, phase: &str, finished: Option<&str>, index: Option<i32>) -> Pod {
        let mut v = serde_json::json!({"metadata": {"name": name, "creationTimestamp": "2026-01-01T00:00:00Z"},
            "status": {"phase": phase}});
        if let Some(f) = finished {
            v["status"]["containerStatuses"] = serde_json::json!([{"name": "c", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"terminated": {"exitCode": 1, "finishedAt": f}}}]);
        }
        if let Some(i) = index {
            v["metadata"]["annotations"] = serde_json::json!({COMPLETION_INDEX: i.to_string()});
        }
        serde_json::from_value(v).unwrap()
    }

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn defaults_generate_the_selector_and_validation_wants_never_or_on_failure() {
        let j = job(serde_json::json!({"template": template()}));
        let s = j.spec.clone().unwrap();
        assert_eq!(
            (s.completions, s.parallelism, s.backoff_limit),
            (Some(1), Some(1), Some(6))
        );
        assert_eq!(
            s.selector.unwrap().match_labels.unwrap()[CONTROLLER_UID],
            "u1"
        );
        let labels = s.template.metadata.unwrap().labels.unwrap();
        assert_eq!(labels[JOB_NAME], "pi");
        assert!(validate_job(&j).is_empty(), "{:?}", validate_job(&j));
        let bad = job(
            serde_json::json!({"parallelism": -1, "template": {"spec": {"containers": [{"name": "c", "image": "i"}]}}}),
        );
        let errs: Vec<String> = validate_job(&bad).iter().map(|e| e.to_string()).collect();
        assert!(
            errs.iter().any(|e| e.starts_with("spec.parallelism")),
            "{errs:?}"
        );
        assert!(
            errs.iter()
                .any(|e| e.contains("restartPolicy") && e.contains("\"Always\"")),
            "{errs:?}"
        );
        // Only parallelism given: completions stays unset (a work queue).
        let wq = job(serde_json::json!({"parallelism": 3, "template": template()}));
        assert_eq!(wq.spec.unwrap().completions, None);
    }

    #[test]
    fn runs_up_to_parallelism_until_completions_then_completes() {
        let j =
            job(serde_json::json!({"completions": 3, "parallelism": 2, "template": template()}));
        let now = at("2026-01-01T00:01:00Z");
        let p = plan(&j, &[], now);
        assert_eq!(p.create, vec![None, None]);
        let st = p.status.unwrap();
        assert_eq!((st.active, st.start_time.is_some()), (Some(0), true));
        let (a, b) = (
            pod("a", "Succeeded", None, None),
            pod("b", "Running", None, None),
        );
        let p = plan(&j, &[&a, &b], now);
        assert_eq!(
            p.create.len(),
            1,
            "one more beside b for the last completion"
        );
        let (c, d) = (
            pod("c", "Succeeded", None, None),
            pod("d", "Succeeded", None, None),
        );
        let p = plan(&j, &[&a, &c, &d], now);
        let st = p.status.unwrap();
        assert!(has(&st, "Complete") && st.completion_time.is_some());
        assert_eq!(st.succeeded, Some(3));
    }

    #[test]
    fn failures_back_off_then_exceed_the_backoff_limit() {
        let j = job(serde_json::json!({"backoffLimit": 2, "template": template()}));
        let f1 = pod("f1", "Failed", Some("2026-01-01T00:00:00Z"), None);
        // 5 s after the first failure: wait the 10 s back-off.
        let p = plan(&j, &[&f1], at("2026-01-01T00:00:05Z"));
        assert!(p.create.is_empty());
        assert_eq!(p.requeue, Some(Duration::from_secs(5)));
        let p = plan(&j, &[&f1], at("2026-01-01T00:00:11Z"));
        assert_eq!(p.create.len(), 1);
        // Second failure: 20 s.
        let f2 = pod("f2", "Failed", Some("2026-01-01T00:00:20Z"), None);
        assert!(
            plan(&j, &[&f1, &f2], at("2026-01-01T00:00:30Z"))
                .create
                .is_empty()
        );
        assert_eq!(backoff(3), Duration::from_secs(40));
        assert_eq!(backoff(10), MAX_BACKOFF);
        // A third failure passes backoffLimit 2: Failed.
        let f3 = pod("f3", "Failed", Some("2026-01-01T00:01:00Z"), None);
        let run = pod("r", "Running", None, None);
        let p = plan(&j, &[&f1, &f2, &f3, &run], at("2026-01-01T00:01:01Z"));
        let st = p.status.unwrap();
        assert!(has(&st, "Failed"));
        assert_eq!(
            st.conditions.as_ref().unwrap()[1].reason.as_deref(),
            Some("BackoffLimitExceeded")
        );
        assert_eq!(p.delete, ["r"]);
    }

    #[test]
    fn deadline_suspend_ttl_and_indexed_completion() {
        let j = job(serde_json::json!({"activeDeadlineSeconds": 30, "template": template()}));
        let mut started = j.clone();
        started.status = Some(JobStatus {
            start_time: Some(Time(at("2026-01-01T00:00:00Z"))),
            ..Default::default()
        });
        let run = pod("r", "Running", None, None);
        let p = plan(&started, &[&run], at("2026-01-01T00:00:31Z"));
        assert_eq!(
            p.status.unwrap().conditions.unwrap()[1].reason.as_deref(),
            Some("DeadlineExceeded")
        );
        assert_eq!(p.delete, ["r"]);
        // Suspended: running pods go, the condition says so.
        let s = job(serde_json::json!({"suspend": true, "template": template()}));
        let p = plan(&s, &[&run], at("2026-01-01T00:00:01Z"));
        assert_eq!(p.delete, ["r"]);
        assert!(has(&p.status.unwrap(), "Suspended"));
        // Finished with a TTL: deleted once it has passed.
        let mut done =
            job(serde_json::json!({"ttlSecondsAfterFinished": 5, "template": template()}));
        let mut st = JobStatus::default();
        set_condition(
            &mut st,
            condition(
                "Complete",
                "CompletionsReached",
                "",
                at("2026-01-01T00:00:00Z"),
            ),
        );
        done.status = Some(st);
        assert_eq!(
            plan(&done, &[], at("2026-01-01T00:00:02Z")).requeue,
            Some(Duration::from_secs(3))
        );
        assert!(plan(&done, &[], at("2026-01-01T00:00:05Z")).delete_job);
        // Indexed: the missing indexes, lowest first, up to parallelism.
        let ix = job(
            serde_json::json!({"completionMode": "Indexed", "completions": 4, "parallelism": 2, "template": template()}),
        );
        let i0 = pod("i0", "Succeeded", None, Some(0));
        let i2 = pod("i2", "Running", None, Some(2));
        let p = plan(&ix, &[&i0, &i2], at("2026-01-01T00:00:01Z"));
        assert_eq!(p.create, vec![Some(1)]);
        assert_eq!(p.status.unwrap().completed_indexes.as_deref(), Some("0"));
        let pod = pod_for(&ix, Some(1));
        assert_eq!(pod.metadata.annotations.unwrap()[COMPLETION_INDEX], "1");
        let ps = pod.spec.unwrap();
        assert_eq!(ps.hostname.as_deref(), Some("pi-1"));
        assert_eq!(
            ps.containers[0].env.as_ref().unwrap()[0].name,
            "JOB_COMPLETION_INDEX"
        );
        let set: BTreeSet<i32> = [0, 1, 2, 5, 7, 8].into();
        assert_eq!(compress(&set), "0-2,5,7-8");
    }
}
