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

use super::{
    has_finalizer,
    validate::{FieldError, err},
};

mod tracking;
pub use tracking::TRACKING_FINALIZER;

/// The label the generated selector uses (and its legacy twin), and the Job name labels.
pub const CONTROLLER_UID: &str = "batch.kubernetes.io/controller-uid";
pub const JOB_NAME: &str = "batch.kubernetes.io/job-name";
const LEGACY_CONTROLLER_UID: &str = "controller-uid";
const LEGACY_JOB_NAME: &str = "job-name";
/// How many times an index failed before this pod (backoffLimitPerIndex).
pub const INDEX_FAILURE_COUNT: &str = "batch.kubernetes.io/job-index-failure-count";
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
    // With a limit per index the Job-wide one is kube's "unlimited".
    let per_index = spec
        .get("backoffLimitPerIndex")
        .is_some_and(|v| !v.is_null());
    spec.entry("backoffLimit")
        .or_insert(if per_index { i32::MAX.into() } else { 6.into() });
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
    if let Some(pfp) = &spec.pod_failure_policy {
        validate_failure_policy(&mut errs, pfp, &spec);
    }
    let indexed = spec.completion_mode.as_deref() == Some("Indexed");
    if let Some(v) = spec.backoff_limit_per_index {
        if v < 0 {
            err(
                &mut errs,
                "spec.backoffLimitPerIndex",
                format!("Invalid value: {v}: must be greater than or equal to 0"),
            );
        }
        if !indexed {
            err(
                &mut errs,
                "spec.backoffLimitPerIndex",
                format!("Invalid value: {v}: requires indexed completion mode"),
            );
        }
    }
    if let Some(m) = spec.max_failed_indexes {
        if spec.backoff_limit_per_index.is_none() {
            err(
                &mut errs,
                "spec.backoffLimitPerIndex",
                "Required value: when maxFailedIndexes is specified",
            );
        }
        if spec.completions.is_some_and(|c| m > c) {
            err(
                &mut errs,
                "spec.maxFailedIndexes",
                format!("Invalid value: {m}: must be less than or equal to completions"),
            );
        }
    }
    errs
}

/// kube-apiserver's checks of a podFailurePolicy.
fn validate_failure_policy(
    errs: &mut Vec<FieldError>,
    pfp: &k8s_openapi::api::batch::v1::PodFailurePolicy,
    spec: &k8s_openapi::api::batch::v1::JobSpec,
) {
    let restart = spec
        .template
        .spec
        .as_ref()
        .and_then(|s| s.restart_policy.as_deref())
        .unwrap_or("Always");
    if restart != "Never" {
        err(
            errs,
            "spec.template.spec.restartPolicy",
            format!(
                "Invalid value: \"{restart}\": only \"Never\" is supported when podFailurePolicy is specified"
            ),
        );
    }
    for (i, r) in pfp.rules.iter().enumerate() {
        let at = format!("spec.podFailurePolicy.rules[{i}]");
        if !["FailJob", "Ignore", "Count", "FailIndex"].contains(&r.action.as_str()) {
            err(
                errs,
                format!("{at}.action"),
                format!(
                    "Unsupported value: \"{}\": supported values: \"Count\", \"FailIndex\", \"FailJob\", \"Ignore\"",
                    r.action
                ),
            );
        }
        match (&r.on_exit_codes, &r.on_pod_conditions) {
            (Some(_), Some(c)) if !c.is_empty() => err(
                errs,
                at.clone(),
                "Invalid value: specifying both OnExitCodes and OnPodConditions is not supported",
            ),
            (None, None) => err(
                errs,
                at.clone(),
                "Invalid value: specifying one of OnExitCodes and OnPodConditions is required",
            ),
            _ => {}
        }
        if let Some(codes) = &r.on_exit_codes {
            if !["In", "NotIn"].contains(&codes.operator.as_str()) {
                err(
                    errs,
                    format!("{at}.onExitCodes.operator"),
                    format!(
                        "Unsupported value: \"{}\": supported values: \"In\", \"NotIn\"",
                        codes.operator
                    ),
                );
            }
            if codes.operator == "In" && codes.values.contains(&0) {
                err(
                    errs,
                    format!("{at}.onExitCodes.values"),
                    "Invalid value: 0: must not be 0 for the In operator",
                );
            }
        }
    }
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

/// The indexes `completedIndexes` names (`0-2,5`); malformed parts are skipped.
pub fn parse_indexes(s: &str) -> BTreeSet<i32> {
    let mut out = BTreeSet::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        if let (Ok(a), Ok(b)) = (a.parse::<i32>(), b.parse::<i32>())
            && a >= 0
            && b >= a
            && b - a < 1_000_000
        {
            out.extend(a..=b);
        }
    }
    out
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
    /// Pods whose tracking finalizer comes off (counted, or no longer the Job's concern).
    pub release: Vec<String>,
    /// How often each index failed so far (backoffLimitPerIndex): its new pod says so.
    pub failures: std::collections::BTreeMap<i32, i32>,
    /// The new status, when it differs.
    pub status: Option<JobStatus>,
    /// `ttlSecondsAfterFinished` has passed: the Job goes, its pods with it.
    pub delete_job: bool,
    /// Events: (warning, reason, message).
    pub events: Vec<(bool, std::borrow::Cow<'static, str>, String)>,
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
    let ending = has(&old, "SuccessCriteriaMet") || has(&old, "FailureTarget");
    let t = tracking::tally(job, pods, ending || finished_time(&old).is_some());
    p.release = t.release.clone();
    st.succeeded = Some(t.status_succeeded);
    st.failed = Some(t.status_failed);
    st.uncounted_terminated_pods = Some(t.uncounted.clone());
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
        p.status = (st != old).then_some(st);
        return p;
    }
    let indexed = spec.completion_mode.as_deref() == Some("Indexed");
    let completions = spec.completions;
    st.active = Some(active.len() as i32);
    st.ready = Some(active.iter().filter(|x| super::pod::pod_ready(x)).count() as i32);
    st.terminating = Some(by(Outcome::Terminating).count() as i32);
    if indexed {
        st.completed_indexes = Some(compress(&t.done_indexes));
    }
    let failed_indexes = failed_indexes(job, pods, &t);
    if spec.backoff_limit_per_index.is_some() {
        st.failed_indexes = Some(compress(&failed_indexes));
    }
    let suspended = spec.suspend.unwrap_or(false);
    let running: Vec<String> = active.iter().map(|x| name(x)).collect();
    suspend_or_start(&mut p, &mut st, suspended, &running, now);
    let start = st.start_time.as_ref().map(|t| t.0);
    let deadline = spec
        .active_deadline_seconds
        .zip(start)
        .map(|(d, s)| s + jiff::SignedDuration::from_secs(d));
    let failure = failure(
        job,
        &t,
        &failed_indexes,
        deadline.filter(|d| now >= *d && !suspended).is_some(),
    );
    let ttl = spec.ttl_seconds_after_finished;
    let counted = t.uncounted.succeeded.as_ref().is_none_or(Vec::is_empty)
        && t.uncounted.failed.as_ref().is_none_or(Vec::is_empty)
        && t.release.is_empty();
    if let Some((reason, message)) = failure {
        let end = Ending {
            target: "FailureTarget",
            last: "Failed",
            reason,
            message,
            warning: true,
        };
        finish(&mut p, &mut st, running, end, (ttl, counted), now);
        p.status = (st != old).then_some(st);
        return p;
    }
    let complete = match (indexed, completions) {
        _ if has(&old, "SuccessCriteriaMet") => true,
        (true, Some(c)) => (0..c).all(|i| t.done_indexes.contains(&i)),
        (false, Some(c)) => t.succeeded >= c,
        // No completions: done once a pod succeeded and none is left running.
        (_, None) => t.succeeded > 0 && active.is_empty(),
    };
    if complete && !suspended {
        let end = Ending {
            target: "SuccessCriteriaMet",
            last: "Complete",
            reason: "CompletionsReached".into(),
            message: "Reached expected number of succeeded pods".into(),
            warning: false,
        };
        finish(&mut p, &mut st, running, end, (ttl, counted), now);
        p.status = (st != old).then_some(st);
        return p;
    }
    if !suspended {
        start_or_stop(&mut p, job, pods, (&active, &failed_indexes), &t, now);
        if let Some(d) = deadline {
            let left = secs(d.as_second() - now.as_second()).max(Duration::from_secs(1));
            p.requeue = Some(p.requeue.map_or(left, |r| r.min(left)));
        }
    }
    p.status = (st != old).then_some(st);
    p
}

/// Why the Job fails now, if it does: a failure found in an earlier pass (kept while the pods
/// are counted), a FailJob rule, too many failed indexes, failed indexes once all are done, too
/// many failed pods, or its deadline (`past_deadline`).
fn failure(
    job: &Job,
    t: &tracking::Tally,
    failed_indexes: &BTreeSet<i32>,
    past_deadline: bool,
) -> Option<(String, String)> {
    let spec = job.spec.clone().unwrap_or_default();
    let old = job.status.clone().unwrap_or_default();
    let indexed = spec.completion_mode.as_deref() == Some("Indexed");
    let pair = |r: &str, m: &str| Some((r.to_string(), m.to_string()));
    // Success found in an earlier pass stands while the pods are counted.
    if has(&old, "SuccessCriteriaMet") {
        return None;
    }
    if let Some(c) = old
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "FailureTarget" && c.status == "True")
    {
        return Some((
            c.reason.clone().unwrap_or_default(),
            c.message.clone().unwrap_or_default(),
        ));
    }
    if let Some(msg) = &t.fail_job {
        return pair("PodFailurePolicy", msg);
    }
    if spec
        .max_failed_indexes
        .is_some_and(|m| failed_indexes.len() as i32 > m)
    {
        return pair(
            "MaxFailedIndexesExceeded",
            "Job has exceeded the specified maximal number of failed indexes",
        );
    }
    let all_ended = spec.completions.is_some_and(|c| {
        (0..c).all(|i| t.done_indexes.contains(&i) || failed_indexes.contains(&i))
    });
    if indexed && !failed_indexes.is_empty() && all_ended {
        return pair("FailedIndexes", "Job has failed indexes");
    }
    if t.failed > spec.backoff_limit.unwrap_or(6) {
        return pair(
            "BackoffLimitExceeded",
            "Job has reached the specified backoff limit",
        );
    }
    if past_deadline {
        return pair(
            "DeadlineExceeded",
            "Job was active longer than specified deadline",
        );
    }
    None
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
            p.events
                .push((false, "Suspended".into(), "Job suspended".into()));
        }
        return;
    }
    if has(st, "Suspended") {
        let mut c = condition("Suspended", "JobResumed", "Job resumed", now);
        c.status = "False".into();
        set_condition(st, c);
        p.events
            .push((false, "Resumed".into(), "Job resumed".into()));
        st.start_time = None;
    }
    if st.start_time.is_none() {
        st.start_time = Some(Time(now));
    }
}

/// How a Job ends: its two conditions (the target first, as kube sets them), their reason and
/// message, and whether its event is a warning.
struct Ending {
    target: &'static str,
    last: &'static str,
    reason: String,
    message: String,
    warning: bool,
}

/// The Job ends: its running pods stop and the target condition is set at once; the final
/// one (Complete or Failed, with the completion time and the TTL's start) only once every
/// pod is counted (`counted`), as kube does.
fn finish(
    p: &mut JobPlan,
    st: &mut JobStatus,
    running: Vec<String>,
    e: Ending,
    (ttl, counted): (Option<i32>, bool),
    now: Timestamp,
) {
    p.delete = running;
    st.active = Some(0);
    if !has(st, e.target) {
        set_condition(st, condition(e.target, &e.reason, &e.message, now));
    }
    if !counted {
        p.requeue = Some(Duration::from_secs(1));
        return;
    }
    if e.last == "Complete" {
        st.completion_time = Some(Time(now));
    }
    set_condition(st, condition(e.last, &e.reason, &e.message, now));
    // kube's events: Completed "Job completed", or the failure's reason and message.
    let (reason, message): (std::borrow::Cow<'static, str>, String) = if e.last == "Complete" {
        ("Completed".into(), "Job completed".into())
    } else {
        (e.reason.into(), e.message)
    };
    p.events.push((e.warning, reason, message));
    p.requeue = ttl.map(|t| secs(t.into()));
}

/// How many pods should run now, after the back-off, and which to start or stop.
fn start_or_stop(
    p: &mut JobPlan,
    job: &Job,
    pods: &[&Pod],
    (active, failed_indexes): (&[&&Pod], &BTreeSet<i32>),
    t: &tracking::Tally,
    now: Timestamp,
) {
    let spec = job.spec.clone().unwrap_or_default();
    let parallelism = spec.parallelism.unwrap_or(1).max(0) as usize;
    let succeeded: Vec<&&Pod> = pods
        .iter()
        .filter(|x| outcome(x) == Outcome::Succeeded)
        .collect();
    // Failures since the last success count for the back-off (ignored ones do not).
    let last_success = succeeded.iter().filter_map(|x| finished_at(x)).max();
    let failures: Vec<Timestamp> = pods
        .iter()
        .filter(|x| counted_failure(job, x))
        .filter_map(|x| finished_at(x))
        .filter(|t| last_success.is_none_or(|s| *t > s))
        .collect();
    let wait_until = failures.iter().max().map(|last| {
        *last + jiff::SignedDuration::try_from(backoff(failures.len() as u32)).unwrap_or_default()
    });
    let indexed = spec.completion_mode.as_deref() == Some("Indexed");
    let want: Vec<Option<i32>> = if indexed {
        let c = spec.completions.unwrap_or(0);
        let mut taken = t.done_indexes.clone();
        taken.extend(active.iter().filter_map(|x| index_of(x)));
        taken.extend(failed_indexes.iter().copied());
        let room = parallelism.saturating_sub(active.len());
        if spec.backoff_limit_per_index.is_some() {
            // Each index backs off on its own failures.
            let counts = index_failures(job, pods);
            let mut next: Option<Timestamp> = None;
            let ready: Vec<Option<i32>> = (0..c)
                .filter(|i| !taken.contains(i))
                .filter(|i| match counts.get(i) {
                    Some(&(n, last)) => {
                        let due = last
                            + jiff::SignedDuration::try_from(backoff(n as u32)).unwrap_or_default();
                        if due > now {
                            next = Some(next.map_or(due, |x: Timestamp| x.min(due)));
                        }
                        due <= now
                    }
                    None => true,
                })
                .take(room)
                .map(Some)
                .collect();
            p.failures = counts.iter().map(|(i, (n, _))| (*i, *n)).collect();
            if let Some(t) = next {
                p.requeue = Some(secs(t.as_second() - now.as_second()).max(Duration::from_secs(1)));
            }
            p.create = ready;
            return;
        }
        (0..c)
            .filter(|i| !taken.contains(i))
            .take(room)
            .map(Some)
            .collect()
    } else {
        let remaining = match spec.completions {
            Some(c) => (c - t.succeeded).max(0) as usize,
            None if t.succeeded == 0 => parallelism,
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

/// Each index's failures (not ignored) and the last one's time: a failed pod counts once
/// more than the failures its annotation says came before it.
fn index_failures(job: &Job, pods: &[&Pod]) -> std::collections::BTreeMap<i32, (i32, Timestamp)> {
    let mut out: std::collections::BTreeMap<i32, (i32, Timestamp)> = Default::default();
    for p in pods {
        let Some(i) = index_of(p) else { continue };
        let before: i32 = p
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(INDEX_FAILURE_COUNT))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let failed = counted_failure(job, p);
        let n = before + i32::from(failed);
        if n == 0 {
            continue;
        }
        let at = finished_at(p).unwrap_or(Timestamp::UNIX_EPOCH);
        let e = out.entry(i).or_insert((0, at));
        if n > e.0 {
            e.0 = n;
        }
        if failed && at > e.1 {
            e.1 = at;
        }
    }
    out
}

/// Whether `p` failed and the podFailurePolicy does not ignore it.
fn counted_failure(job: &Job, p: &Pod) -> bool {
    outcome(p) == Outcome::Failed && tracking::on_failure(job, p) != tracking::OnFailure::Ignore
}

/// The indexes that failed for good: past backoffLimitPerIndex, or by a FailIndex rule (and
/// those the status already names).
fn failed_indexes(job: &Job, pods: &[&Pod], t: &tracking::Tally) -> BTreeSet<i32> {
    let spec = job.spec.clone().unwrap_or_default();
    let Some(limit) = spec.backoff_limit_per_index else {
        return BTreeSet::new();
    };
    let old = job.status.clone().unwrap_or_default();
    let mut out = parse_indexes(old.failed_indexes.as_deref().unwrap_or(""));
    out.extend(t.fail_indexes.iter().copied());
    for (i, (n, _)) in index_failures(job, pods) {
        if n > limit {
            out.insert(i);
        }
    }
    out
}

/// The pod the Job starts (for `index`, in an Indexed Job): its template with the Job as
/// controller; an Indexed pod also gets its index as annotation, label, `JOB_COMPLETION_INDEX`
/// and host name `<job>-<index>`.
pub fn pod_for(job: &Job, index: Option<i32>, failures: i32) -> Pod {
    let spec = job.spec.clone().unwrap_or_default();
    let PodTemplateSpec {
        metadata,
        spec: pod_spec,
    } = spec.template;
    let mut meta = metadata.unwrap_or_default();
    let name = job.metadata.name.clone().unwrap_or_default();
    meta.finalizers = Some(vec![TRACKING_FINALIZER.into()]);
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
        if spec.backoff_limit_per_index.is_some() {
            meta.annotations
                .get_or_insert_default()
                .insert(INDEX_FAILURE_COUNT.into(), failures.to_string());
        }
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
mod tests;
