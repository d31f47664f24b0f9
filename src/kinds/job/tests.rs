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
    let mut v = serde_json::json!({"metadata": {"name": name, "uid": name, "creationTimestamp": "2026-01-01T00:00:00Z",
            "finalizers": [TRACKING_FINALIZER]},
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

/// Passes as the controller makes them (the status written, finalizers lifted) until the
/// Job's status stops changing: the last status and the last plan.
fn settle(j: &Job, pods: &[&Pod], now: Timestamp) -> (JobStatus, JobPlan) {
    let mut j = j.clone();
    let mut pods: Vec<Pod> = pods.iter().map(|p| (*p).clone()).collect();
    for _ in 0..5 {
        let refs: Vec<&Pod> = pods.iter().collect();
        let p = plan(&j, &refs, now);
        for x in pods.iter_mut() {
            if p.release.contains(x.metadata.name.as_ref().unwrap()) {
                x.metadata.finalizers = None;
            }
        }
        match &p.status {
            Some(st) => j.status = Some(st.clone()),
            None if p.release.is_empty() => return (j.status.unwrap_or_default(), p),
            None => {}
        }
    }
    panic!("the Job did not settle: {:?}", j.status)
}

#[test]
fn an_index_past_its_own_backoff_limit_fails_and_the_job_with_it_at_the_end() {
    let j = job(
        serde_json::json!({"completionMode": "Indexed", "completions": 3, "parallelism": 3,
        "backoffLimitPerIndex": 1, "template": template()}),
    );
    assert_eq!(j.spec.as_ref().unwrap().backoff_limit, Some(i32::MAX));
    let mut f0 = pod("f0", "Failed", Some("2026-01-01T00:00:00Z"), Some(0));
    let ok1 = pod("ok1", "Succeeded", Some("2026-01-01T00:00:00Z"), Some(1));
    let run2 = pod("run2", "Running", None, Some(2));
    // Index 0 failed once: its replacement waits out its own back-off, then says so.
    let p = plan(&j, &[&f0, &ok1, &run2], at("2026-01-01T00:00:05Z"));
    assert!(p.create.is_empty());
    let p = plan(&j, &[&f0, &ok1, &run2], at("2026-01-01T00:00:11Z"));
    assert_eq!(
        (p.create.clone(), p.failures.get(&0)),
        (vec![Some(0)], Some(&1))
    );
    let again = pod_for(&j, Some(0), 1);
    assert_eq!(
        again.metadata.annotations.unwrap()[INDEX_FAILURE_COUNT],
        "1"
    );
    // The second failure (annotation 1, failed) passes the limit: index 0 fails for good.
    let mut f0b = pod("f0b", "Failed", Some("2026-01-01T00:00:20Z"), Some(0));
    f0b.metadata
        .annotations
        .as_mut()
        .unwrap()
        .insert(INDEX_FAILURE_COUNT.into(), "1".into());
    f0.metadata.finalizers = None;
    let ok2 = pod("ok2", "Succeeded", Some("2026-01-01T00:00:21Z"), Some(2));
    let (st, p) = settle(&j, &[&f0, &f0b, &ok1, &ok2], at("2026-01-01T00:00:30Z"));
    assert!(p.create.is_empty());
    assert_eq!(st.failed_indexes.as_deref(), Some("0"));
    assert_eq!(st.completed_indexes.as_deref(), Some("1-2"));
    let failed = st
        .conditions
        .unwrap()
        .into_iter()
        .find(|c| c.type_ == "Failed")
        .unwrap();
    assert_eq!(failed.reason.as_deref(), Some("FailedIndexes"));
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
    let j = job(serde_json::json!({"completions": 3, "parallelism": 2, "template": template()}));
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
    // The criteria are met at once; Complete once every pod is counted.
    let p = plan(&j, &[&a, &c, &d], now);
    let st = p.status.unwrap();
    assert!(has(&st, "SuccessCriteriaMet") && !has(&st, "Complete"));
    let (st, _) = settle(&j, &[&a, &c, &d], now);
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
    assert_eq!(p.delete, ["r"]);
    let (st, _) = settle(&j, &[&f1, &f2, &f3], at("2026-01-01T00:01:01Z"));
    assert!(has(&st, "Failed"));
    assert_eq!(
        st.conditions.as_ref().unwrap()[1].reason.as_deref(),
        Some("BackoffLimitExceeded")
    );
    assert_eq!(st.failed, Some(3));
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
    let mut done = job(serde_json::json!({"ttlSecondsAfterFinished": 5, "template": template()}));
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
    let pod = pod_for(&ix, Some(1), 0);
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
