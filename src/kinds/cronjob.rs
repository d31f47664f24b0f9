//! What a batch/v1 CronJob means: kube-apiserver's defaults and validation, and the CronJob
//! controller's decision at a moment — which scheduled time is due (the latest unmet one,
//! within `startingDeadlineSeconds`; too many missed ones said in an event), what
//! `concurrencyPolicy` allows, the Job to create, the finished Jobs past the history limits,
//! and the status (`active`, `lastScheduleTime`, `lastSuccessfulTime`).

use jiff::{Timestamp, tz::TimeZone};
use k8s_openapi::{
    api::{
        batch::v1::{CronJob, CronJobStatus, Job},
        core::v1::ObjectReference,
    },
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
};
use serde_json::Value;

use super::{
    cron::Schedule,
    validate::{FieldError, err},
};

/// The annotation with the time a Job was scheduled for.
pub const SCHEDULED_TIMESTAMP: &str = "batch.kubernetes.io/cronjob-scheduled-timestamp";
/// Beyond this many missed start times the controller says so and starts only the latest.
pub const MAX_MISSED: usize = 100;
/// A CronJob's name leaves room for the Job suffix (kube's limit).
const MAX_NAME: usize = 52;

/// kube-apiserver's defaults: Allow, not suspended, history limits 3 and 1.
pub fn default_cronjob(obj: &mut Value) {
    let Some(spec) = obj.get_mut("spec").and_then(Value::as_object_mut) else {
        return;
    };
    spec.entry("concurrencyPolicy").or_insert("Allow".into());
    spec.entry("suspend").or_insert(false.into());
    spec.entry("successfulJobsHistoryLimit").or_insert(3.into());
    spec.entry("failedJobsHistoryLimit").or_insert(1.into());
}

/// The zone the schedule is read in: `timeZone`, else this process's (as kube-controller-
/// manager reads it in its own).
pub fn time_zone(cj: &CronJob) -> Result<TimeZone, String> {
    match cj.spec.as_ref().and_then(|s| s.time_zone.as_deref()) {
        Some(z) => TimeZone::get(z).map_err(|_| format!("unknown time zone {z}")),
        None => Ok(TimeZone::system()),
    }
}

/// kube-apiserver's validation of a CronJob.
pub fn validate_cronjob(cj: &CronJob) -> Vec<FieldError> {
    let mut errs = vec![];
    let name = cj.metadata.name.as_deref().unwrap_or_default();
    if name.len() > MAX_NAME {
        err(
            &mut errs,
            "metadata.name",
            format!("Invalid value: \"{name}\": must be no more than {MAX_NAME} characters"),
        );
    }
    let spec = cj.spec.clone().unwrap_or_default();
    if spec.schedule.is_empty() {
        err(&mut errs, "spec.schedule", "Required value");
    } else if let Err(e) = Schedule::parse(&spec.schedule) {
        err(
            &mut errs,
            "spec.schedule",
            format!("Invalid value: \"{}\": {e}", spec.schedule),
        );
    }
    if let (Some(z), Err(e)) = (&spec.time_zone, time_zone(cj)) {
        err(
            &mut errs,
            "spec.timeZone",
            format!("Invalid value: \"{z}\": {e}"),
        );
    }
    match spec.concurrency_policy.as_deref() {
        None | Some("Allow" | "Forbid" | "Replace") => {}
        Some(o) => err(
            &mut errs,
            "spec.concurrencyPolicy",
            format!(
                "Unsupported value: \"{o}\": supported values: \"Allow\", \"Forbid\", \"Replace\""
            ),
        ),
    }
    for (path, v) in [
        (
            "spec.startingDeadlineSeconds",
            spec.starting_deadline_seconds,
        ),
        (
            "spec.successfulJobsHistoryLimit",
            spec.successful_jobs_history_limit.map(i64::from),
        ),
        (
            "spec.failedJobsHistoryLimit",
            spec.failed_jobs_history_limit.map(i64::from),
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
    // The Job template as a Job (its selector comes when each Job is made).
    let mut job = job_for(cj, Timestamp::UNIX_EPOCH, &TimeZone::UTC);
    if let Some(s) = job.spec.as_mut() {
        s.selector = Some(Default::default());
    }
    for mut e in super::job::validate_job(&job) {
        if e.path.starts_with("spec.template.metadata.labels") && e.message.contains("`selector`") {
            continue;
        }
        e.path = format!("spec.jobTemplate.{}", e.path);
        errs.push(e);
    }
    errs
}

/// The Job for the time `t`: named `<cronjob>-<minutes since the epoch>`, the template's
/// labels and annotations plus the scheduled time, the CronJob its controller.
pub fn job_for(cj: &CronJob, t: Timestamp, tz: &TimeZone) -> Job {
    let spec = cj.spec.clone().unwrap_or_default();
    let tmpl = spec.job_template;
    let mut meta: ObjectMeta = tmpl.metadata.unwrap_or_default();
    let name = cj.metadata.name.clone().unwrap_or_default();
    meta.name = Some(format!("{name}-{}", t.as_second() / 60));
    meta.namespace = cj.metadata.namespace.clone();
    meta.annotations.get_or_insert_default().insert(
        SCHEDULED_TIMESTAMP.into(),
        t.to_zoned(tz.clone())
            .strftime("%Y-%m-%dT%H:%M:%S%:z")
            .to_string(),
    );
    Job {
        metadata: meta,
        spec: Some(tmpl.spec.unwrap_or_default()),
        status: None,
    }
}

/// What the controller should do for one CronJob.
#[derive(Debug, Default, PartialEq)]
pub struct CronPlan {
    /// The Job to create.
    pub create: Option<Job>,
    /// Jobs to delete: active ones a Replace supersedes, finished ones past the history limits.
    pub delete: Vec<String>,
    pub status: Option<CronJobStatus>,
    /// Events: (warning, reason, message).
    pub events: Vec<(bool, &'static str, String)>,
}

fn finished(j: &Job) -> Option<&'static str> {
    let conds = j.status.as_ref()?.conditions.as_ref()?;
    conds
        .iter()
        .filter(|c| c.status == "True")
        .find_map(|c| match c.type_.as_str() {
            "Complete" => Some("Complete"),
            "Failed" => Some("Failed"),
            _ => None,
        })
}

/// A reference to a Job, as `status.active` lists them.
pub fn reference(j: &Job) -> ObjectReference {
    ObjectReference {
        api_version: Some("batch/v1".into()),
        kind: Some("Job".into()),
        name: j.metadata.name.clone(),
        namespace: j.metadata.namespace.clone(),
        uid: j.metadata.uid.clone(),
        resource_version: j.metadata.resource_version.clone(),
        ..Default::default()
    }
}

/// When a Job started (its status' start, else its creation).
fn started(j: &Job) -> Option<Timestamp> {
    j.status
        .as_ref()
        .and_then(|s| s.start_time.as_ref())
        .or(j.metadata.creation_timestamp.as_ref())
        .map(|t| t.0)
}

/// The finished Jobs of `kind` beyond the newest `keep`, oldest first.
fn over_limit(jobs: &[&Job], kind: &str, keep: i32) -> Vec<String> {
    let mut done: Vec<&&Job> = jobs.iter().filter(|j| finished(j) == Some(kind)).collect();
    done.sort_by_key(|j| started(j));
    let extra = done.len().saturating_sub(keep.max(0) as usize);
    done[..extra]
        .iter()
        .filter_map(|j| j.metadata.name.clone())
        .collect()
}

/// The CronJob controller's decision for `cj` given the Jobs it controls, at `now`.
pub fn plan(cj: &CronJob, jobs: &[&Job], now: Timestamp) -> Result<CronPlan, String> {
    let spec = cj.spec.clone().unwrap_or_default();
    let schedule = Schedule::parse(&spec.schedule)?;
    let tz = time_zone(cj)?;
    let old = cj.status.clone().unwrap_or_default();
    let mut st = old.clone();
    let mut p = CronPlan::default();
    let active: Vec<&&Job> = jobs.iter().filter(|j| finished(j).is_none()).collect();
    st.last_successful_time = jobs
        .iter()
        .filter(|j| finished(j) == Some("Complete"))
        .filter_map(|j| j.status.as_ref()?.completion_time.clone())
        .max_by_key(|t| t.0)
        .or(old.last_successful_time.clone());
    p.delete.extend(over_limit(
        jobs,
        "Complete",
        spec.successful_jobs_history_limit.unwrap_or(3),
    ));
    p.delete.extend(over_limit(
        jobs,
        "Failed",
        spec.failed_jobs_history_limit.unwrap_or(1),
    ));
    let mut active_refs: Vec<ObjectReference> = active.iter().map(|j| reference(j)).collect();
    let due = if spec.suspend.unwrap_or(false) {
        None
    } else {
        let mut earliest = old
            .last_schedule_time
            .as_ref()
            .or(cj.metadata.creation_timestamp.as_ref())
            .map_or(now, |t| t.0);
        if let Some(d) = spec.starting_deadline_seconds {
            earliest = earliest.max(now - jiff::SignedDuration::from_secs(d));
        }
        let times = schedule.times(earliest, now, &tz, MAX_MISSED);
        if times.len() > MAX_MISSED {
            p.events.push((
                true,
                "TooManyMissedTimes",
                format!("too many missed start times: > {MAX_MISSED}. Set or decrease .spec.startingDeadlineSeconds or check clock skew"),
            ));
        }
        times.last().copied()
    };
    if let Some(t) = due {
        let job = job_for(cj, t, &tz);
        let exists = jobs.iter().any(|j| j.metadata.name == job.metadata.name);
        match spec.concurrency_policy.as_deref() {
            _ if exists => st.last_schedule_time = Some(Time(t)),
            Some("Forbid") if !active.is_empty() => p.events.push((
                false,
                "JobAlreadyActive",
                "Not starting job because prior execution is running and concurrency policy is Forbid".into(),
            )),
            policy => {
                if policy == Some("Replace") {
                    p.delete.extend(active.iter().filter_map(|j| j.metadata.name.clone()));
                    active_refs.clear();
                }
                st.last_schedule_time = Some(Time(t));
                p.create = Some(job);
            }
        }
    }
    st.active = (!active_refs.is_empty()).then_some(active_refs);
    p.delete.dedup();
    p.status = (st != old).then_some(st);
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cj(spec: Value) -> CronJob {
        let mut obj = serde_json::json!({"metadata": {"name": "tick", "namespace": "default", "uid": "c1",
            "creationTimestamp": "2026-12-05T12:00:00Z"}, "spec": spec});
        default_cronjob(&mut obj);
        serde_json::from_value(obj).unwrap()
    }

    fn spec(extra: Value) -> Value {
        let mut s = serde_json::json!({"schedule": "*/5 * * * *", "timeZone": "UTC", "jobTemplate": {"spec": {"template": {"spec": {
            "restartPolicy": "Never", "containers": [{"name": "c", "image": "i"}]}}}}});
        if let (Some(s), Some(e)) = (s.as_object_mut(), extra.as_object()) {
            s.extend(e.clone());
        }
        s
    }

    fn job(name: &str, state: Option<&str>, start: &str) -> Job {
        let mut v = serde_json::json!({"metadata": {"name": name, "creationTimestamp": start},
            "status": {"startTime": start}});
        if let Some(s) = state {
            v["status"]["conditions"] = serde_json::json!([{"type": s, "status": "True"}]);
            v["status"]["completionTime"] = serde_json::json!(start);
        }
        serde_json::from_value(v).unwrap()
    }

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn the_latest_due_time_makes_one_job_once() {
        let c = cj(spec(serde_json::json!({})));
        assert!(
            validate_cronjob(&c).is_empty(),
            "{:?}",
            validate_cronjob(&c)
        );
        assert!(
            plan(&c, &[], at("2026-12-05T12:04:00Z"))
                .unwrap()
                .create
                .is_none()
        );
        let p = plan(&c, &[], at("2026-12-05T12:11:00Z")).unwrap();
        let j = p.create.unwrap();
        // 12:10 is the latest of 12:05 and 12:10.
        assert_eq!(
            j.metadata.name.as_deref(),
            Some(&*format!(
                "tick-{}",
                at("2026-12-05T12:10:00Z").as_second() / 60
            ))
        );
        assert_eq!(
            j.metadata.annotations.unwrap()[SCHEDULED_TIMESTAMP],
            "2026-12-05T12:10:00+00:00"
        );
        assert_eq!(
            p.status.unwrap().last_schedule_time.unwrap().0,
            at("2026-12-05T12:10:00Z")
        );
    }

    #[test]
    fn concurrency_policies_history_and_deadline() {
        let running = job("tick-1", None, "2026-12-05T12:05:00Z");
        let now = at("2026-12-05T12:10:30Z");
        let forbid = cj(spec(serde_json::json!({"concurrencyPolicy": "Forbid"})));
        let p = plan(&forbid, &[&running], now).unwrap();
        assert!(p.create.is_none());
        assert_eq!(p.events[0].1, "JobAlreadyActive");
        let replace = cj(spec(serde_json::json!({"concurrencyPolicy": "Replace"})));
        let p = plan(&replace, &[&running], now).unwrap();
        assert!(p.create.is_some());
        assert_eq!(p.delete, ["tick-1"]);
        let allow = cj(spec(serde_json::json!({})));
        let p = plan(&allow, &[&running], now).unwrap();
        assert!(p.create.is_some() && p.delete.is_empty());
        assert_eq!(p.status.unwrap().active.unwrap().len(), 1);
        // History: 3 successful and 1 failed kept, the oldest go.
        let ok: Vec<Job> = (0..5)
            .map(|i| {
                job(
                    &format!("ok{i}"),
                    Some("Complete"),
                    &format!("2026-12-05T1{i}:00:00Z"),
                )
            })
            .collect();
        let bad: Vec<Job> = (0..2)
            .map(|i| {
                job(
                    &format!("bad{i}"),
                    Some("Failed"),
                    &format!("2026-12-05T1{i}:30:00Z"),
                )
            })
            .collect();
        let all: Vec<&Job> = ok.iter().chain(&bad).collect();
        let p = plan(&allow, &all, now).unwrap();
        let mut gone = p.delete.clone();
        gone.sort();
        assert_eq!(gone, ["bad0", "ok0", "ok1"]);
        assert_eq!(
            p.status.unwrap().last_successful_time.unwrap().0,
            at("2026-12-05T14:00:00Z")
        );
        // A start missed by more than startingDeadlineSeconds is not made up.
        let late = cj(spec(serde_json::json!({"startingDeadlineSeconds": 10})));
        assert!(
            plan(&late, &[], at("2026-12-05T12:05:30Z"))
                .unwrap()
                .create
                .is_none()
        );
        assert!(
            plan(&late, &[], at("2026-12-05T12:05:05Z"))
                .unwrap()
                .create
                .is_some()
        );
        // Suspended: nothing starts.
        let s = cj(spec(serde_json::json!({"suspend": true})));
        assert!(plan(&s, &[], now).unwrap().create.is_none());
    }

    #[test]
    fn too_many_missed_times_and_bad_input() {
        let every = cj(spec(serde_json::json!({"schedule": "* * * * *"})));
        let p = plan(&every, &[], at("2026-12-06T12:00:00Z")).unwrap();
        assert_eq!(p.events[0].1, "TooManyMissedTimes");
        assert_eq!(
            p.status.unwrap().last_schedule_time.unwrap().0,
            at("2026-12-06T12:00:00Z")
        );
        let bad = cj(spec(
            serde_json::json!({"schedule": "99 * * * *", "timeZone": "Mars/Base",
            "concurrencyPolicy": "Sometimes"}),
        ));
        let errs: Vec<String> = validate_cronjob(&bad)
            .iter()
            .map(|e| e.to_string())
            .collect();
        assert!(
            errs.iter()
                .any(|e| e.starts_with("spec.schedule: Invalid value: \"99 * * * *\"")),
            "{errs:?}"
        );
        assert!(
            errs.iter().any(|e| e.starts_with("spec.timeZone")),
            "{errs:?}"
        );
        assert!(
            errs.iter().any(|e| e.starts_with("spec.concurrencyPolicy")),
            "{errs:?}"
        );
        let always = cj(
            serde_json::json!({"schedule": "@hourly", "jobTemplate": {"spec": {"template": {"spec": {
            "containers": [{"name": "c", "image": "i"}]}}}}}),
        );
        let errs: Vec<String> = validate_cronjob(&always)
            .iter()
            .map(|e| e.to_string())
            .collect();
        assert!(
            errs.iter()
                .any(|e| e.starts_with("spec.jobTemplate.spec.template.spec.restartPolicy")),
            "{errs:?}"
        );
    }
}
