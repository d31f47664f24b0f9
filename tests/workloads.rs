//! Workloads beyond Deployments on a 2-node `keelson lab`, driven with the real kubectl:
//! Jobs — `kubectl create job`, completions with parallelism, the back-off and
//! `backoffLimit`, Indexed completion, `activeDeadlineSeconds`, `ttlSecondsAfterFinished`,
//! kubectl's Job columns, and kube-apiserver's validation; a CronJob on the real clock and by
//! hand (`kubectl create job --from=cronjob/…`), with its history limit, and the concurrency
//! policies on a test clock; StatefulSets with
//! volume claims on the local-path provisioner (ordered start, stable names, host names and
//! data, ordered scale-down, a partitioned roll, `kubectl rollout status|history|undo`), a
//! claim that waits for its first consumer and takes its directory with it, DaemonSet
//! history, and preemption by a higher PriorityClass (`workloads/priority.rs`).
mod common;
#[path = "workloads/priority.rs"]
mod priority;

use priority::a_higher_priority_pod_preempts_a_lower_one;

use std::time::{Duration, Instant};

use common::{BUSYBOX, Kubectl, cluster::Cluster};

/// A pod template running `command` in busybox, never restarted, at `indent`.
fn template(indent: &str, command: &str) -> String {
    format!(
        "template:\n  spec:\n    restartPolicy: Never\n    terminationGracePeriodSeconds: 1\n    containers:\n    - name: c\n      image: {BUSYBOX}\n      command: [\"sh\", \"-c\", {command:?}]\n"
    )
    .lines()
    .map(|l| format!("{indent}{l}\n"))
    .collect()
}

fn job(name: &str, spec: &str, command: &str) -> String {
    format!(
        "apiVersion: batch/v1\nkind: Job\nmetadata:\n  name: {name}\nspec:\n{spec}\n{}",
        template("  ", command)
    )
}

fn status(c: &Cluster, name: &str, field: &str) -> String {
    c.jsonpath(&["get", "job", name], &format!("{{.status.{field}}}"))
}

/// Waits for the Job's condition `ty` (Complete or Failed); its reason.
fn wait_condition(c: &Cluster, name: &str, ty: &str, secs: u64) -> String {
    let path = format!("{{.status.conditions[?(@.type==\"{ty}\")].reason}}");
    let mut reason = String::new();
    c.until(secs, &format!("job {name} {ty}"), || {
        reason = c.jsonpath(&["get", "job", name], &path);
        !reason.is_empty()
    });
    reason
}

#[test]
fn jobs() {
    let c = Cluster::up("jobs", 2, &[]);
    crate::scenarios!(&c;
        kubectl_create_job_runs_to_completion_and_shows_kubectls_columns,
        completions_run_with_bounded_parallelism,
        a_failing_job_backs_off_then_fails_past_its_backoff_limit,
        an_indexed_job_gives_each_pod_its_index,
        active_deadline_and_ttl_after_finished,
        an_invalid_job_is_refused_with_field_paths,
        a_pod_failure_policy_ignores_one_exit_code_and_fails_the_job_on_another,
        a_succeeded_pod_deleted_at_once_is_still_counted,
        an_index_that_fails_past_its_own_limit_fails_alone_then_the_job,
        a_cronjob_starts_jobs_on_its_schedule_and_by_hand,
        a_statefulset_starts_in_order_with_stable_names_claims_and_data,
        a_statefulset_scales_down_from_the_top_and_keeps_its_claims,
        a_statefulset_rolls_to_its_partition_and_rollout_undo_restores_it,
        a_statefulset_made_again_after_an_orphaning_delete_adopts_its_pods,
        a_claim_waits_for_its_first_consumer_and_its_directory_goes_with_it,
        a_daemonset_keeps_revisions_that_rollout_undo_restores,
        an_invalid_statefulset_is_refused_with_field_paths,
        kubectl_drain_waits_for_a_disruption_budget_until_a_replacement_is_ready,
        a_replication_controller_keeps_its_replicas_and_scales,
        a_higher_priority_pod_preempts_a_lower_one,
    );
}

/// CronJob concurrency policies on the controller's test clock (`--cronjob-time-scale=60`:
/// each second a minute, so `*/1` comes due every second); the real clock is
/// `a_cronjob_starts_jobs_on_its_schedule_and_by_hand`'s.
#[test]
fn cronjob_concurrency_policies_on_a_test_clock() {
    let c = Cluster::up_with("cron", 1, &["--cronjob-time-scale=60"], &[]);
    let cron = |name: &str, policy: &str, command: &str| {
        format!(
            "apiVersion: batch/v1\nkind: CronJob\nmetadata:\n  name: {name}\nspec:\n  schedule: \"*/1 * * * *\"\n  concurrencyPolicy: {policy}\n  startingDeadlineSeconds: 120\n  successfulJobsHistoryLimit: 100\n  jobTemplate:\n    spec:\n{}",
            template("      ", command)
        )
    };
    let active = |name: &str| c.sorted_words(&["get", "cronjob", name], "{.status.active[*].name}");
    let made = |name: &str| {
        c.sorted_words(&["get", "jobs"], "{.items[*].metadata.name}")
            .into_iter()
            .filter(|j| j.starts_with(&format!("{name}-")))
            .count()
    };
    // Forbid: while a Job runs (3 s, three scheduled minutes) no other starts; the skipped
    // schedule starts once it is done.
    c.apply(&cron("forbid", "Forbid", "sleep 3"));
    let t0 = Instant::now();
    let mut most = 0;
    let mut jobs = 0;
    c.until(90, "three Forbid Jobs, one after the other", || {
        most = most.max(active("forbid").len());
        jobs = made("forbid");
        jobs >= 3
    });
    c.ok(&[
        "patch",
        "cronjob",
        "forbid",
        "-p",
        "{\"spec\":{\"suspend\":true}}",
    ]);
    let minutes = t0.elapsed().as_secs();
    eprintln!("workloads: Forbid made {jobs} Jobs in {minutes} scheduled minutes");
    assert_eq!(most, 1, "Forbid: one Job at a time");
    // Each Job runs at least three scheduled minutes: the schedules in between are skipped.
    assert!(
        jobs as u64 <= minutes / 3 + 1,
        "Forbid skips while one runs: {jobs} Jobs in {minutes} minutes"
    );
    let events = c.ok(&[
        "get",
        "events",
        "--field-selector",
        "involvedObject.name=forbid",
    ]);
    assert!(events.contains("JobAlreadyActive"), "{events}");
    // Allow: Jobs pile up.
    c.apply(&cron("allow", "Allow", "sleep 300"));
    c.until(30, "three Allow Jobs at once", || {
        active("allow").len() >= 3
    });
    c.ok(&[
        "patch",
        "cronjob",
        "allow",
        "-p",
        "{\"spec\":{\"suspend\":true}}",
    ]);
    // Replace: each schedule's Job replaces the running one.
    c.apply(&cron("replace", "Replace", "sleep 300"));
    let mut seen = std::collections::BTreeSet::new();
    let t0 = Instant::now();
    while seen.len() < 3 {
        let now = active("replace");
        assert!(now.len() <= 1, "Replace: one Job at a time, saw {now:?}");
        seen.extend(now);
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "Replace: Jobs replaced, saw {seen:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let first = seen.iter().next().cloned().unwrap_or_default();
    c.until(30, "the replaced Job deleted", || {
        !c.kubectl(&["get", "job", &first]).status.success()
    });
}

fn kubectl_create_job_runs_to_completion_and_shows_kubectls_columns(c: &Cluster) {
    c.ok(&[
        "create",
        "job",
        "hello",
        "--image",
        BUSYBOX,
        "--",
        "echo",
        "hello from a job",
    ]);
    c.ok(&[
        "wait",
        "--for=condition=complete",
        "job/hello",
        "--timeout=90s",
    ]);
    let table = c.ok(&["get", "job", "hello"]);
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["NAME", "STATUS", "COMPLETIONS", "DURATION", "AGE"],
        "{table}"
    );
    let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(&row[..3], ["hello", "Complete", "1/1"], "{table}");
    assert_eq!(c.ok(&["logs", "job/hello"]).trim(), "hello from a job");
    // The generated selector and the labels kube gives the pods.
    let uid = c.jsonpath(&["get", "job", "hello"], "{.metadata.uid}");
    let pods = c.ok(&[
        "get",
        "pods",
        "-l",
        &format!("batch.kubernetes.io/controller-uid={uid},job-name=hello"),
        "-o",
        "name",
    ]);
    assert_eq!(pods.lines().count(), 1, "{pods}");
}

fn completions_run_with_bounded_parallelism(c: &Cluster) {
    c.apply(&job(
        "par",
        "  completions: 6\n  parallelism: 3",
        "sleep 2; echo done",
    ));
    let mut most = 0;
    let t0 = Instant::now();
    c.until(120, "job par to complete", || {
        most = most.max(status(c, "par", "active").parse::<i32>().unwrap_or(0));
        !status(c, "par", "completionTime").is_empty()
    });
    eprintln!(
        "workloads: 6 completions, parallelism 3, in {:?}",
        t0.elapsed()
    );
    assert_eq!(status(c, "par", "succeeded"), "6");
    assert!(
        (2..=3).contains(&most),
        "at most 3 active at once, saw {most}"
    );
    assert_eq!(
        wait_condition(c, "par", "Complete", 5),
        "CompletionsReached"
    );
    // Spread over both nodes.
    let mut nodes = c.sorted_words(
        &["get", "pods", "-l", "job-name=par"],
        "{.items[*].spec.nodeName}",
    );
    nodes.dedup();
    assert_eq!(
        nodes.len(),
        2,
        "the Job's pods ran on both nodes: {nodes:?}"
    );
}

fn a_failing_job_backs_off_then_fails_past_its_backoff_limit(c: &Cluster) {
    c.apply(&job("fail", "  backoffLimit: 1", "exit 3"));
    let reason = wait_condition(c, "fail", "Failed", 120);
    assert_eq!(reason, "BackoffLimitExceeded");
    assert_eq!(status(c, "fail", "failed"), "2");
    // The second pod started only after the 10 s back-off from the first failure.
    let created = c.sorted_words(
        &["get", "pods", "-l", "job-name=fail"],
        "{.items[*].metadata.creationTimestamp}",
    );
    assert_eq!(created.len(), 2, "{created:?}");
    let t: Vec<jiff::Timestamp> = created.iter().map(|s| s.parse().unwrap()).collect();
    let gap = (t[1].as_second() - t[0].as_second()).abs();
    assert!(
        gap >= 10,
        "the replacement came {gap} s after the first pod"
    );
    let events = c.ok(&[
        "get",
        "events",
        "--field-selector",
        "involvedObject.name=fail",
    ]);
    assert!(events.contains("BackoffLimitExceeded"), "{events}");
}

fn an_indexed_job_gives_each_pod_its_index(c: &Cluster) {
    c.apply(&job(
        "ix",
        "  completionMode: Indexed\n  completions: 3\n  parallelism: 3",
        "echo index=$JOB_COMPLETION_INDEX host=$(hostname)",
    ));
    wait_condition(c, "ix", "Complete", 120);
    assert_eq!(status(c, "ix", "completedIndexes"), "0-2");
    let mut seen = vec![];
    for p in c.sorted_words(
        &["get", "pods", "-l", "job-name=ix"],
        "{.items[*].metadata.name}",
    ) {
        seen.push(c.ok(&["logs", &p]).trim().to_string());
    }
    seen.sort();
    assert_eq!(
        seen,
        [
            "index=0 host=ix-0",
            "index=1 host=ix-1",
            "index=2 host=ix-2"
        ]
    );
}

fn active_deadline_and_ttl_after_finished(c: &Cluster) {
    c.apply(&job("slow", "  activeDeadlineSeconds: 3", "sleep 300"));
    assert_eq!(wait_condition(c, "slow", "Failed", 60), "DeadlineExceeded");
    c.until(60, "the slow job's pod to go", || {
        c.ok(&["get", "pods", "-l", "job-name=slow", "-o", "name"])
            .trim()
            .is_empty()
    });
    c.apply(&job("brief", "  ttlSecondsAfterFinished: 2", "true"));
    wait_condition(c, "brief", "Complete", 90);
    let t0 = Instant::now();
    c.until(60, "the finished job to be deleted after its TTL", || {
        !c.kubectl(&["get", "job", "brief"]).status.success()
    });
    assert!(t0.elapsed() >= Duration::from_secs(1), "{:?}", t0.elapsed());
    c.until(60, "its pod to go with it", || {
        c.ok(&["get", "pods", "-l", "job-name=brief", "-o", "name"])
            .trim()
            .is_empty()
    });
}

fn an_invalid_job_is_refused_with_field_paths(c: &Cluster) {
    let bad = job("bad", "  parallelism: -1", "true")
        .replace("restartPolicy: Never", "restartPolicy: Always");
    let file = c.dir.path().join("bad-job.yaml");
    std::fs::write(&file, bad).unwrap();
    let msg = c.fails(&["apply", "-f", file.to_str().unwrap()]);
    assert!(msg.contains("spec.parallelism: Invalid value: -1"), "{msg}");
    assert!(
        msg.contains("spec.template.spec.restartPolicy: Unsupported value: \"Always\""),
        "{msg}"
    );
    // A Job's template and completion mode are fixed once it exists.
    c.apply(&job("fixed", "  completions: 1", "true"));
    let msg = c.fails(&[
        "patch",
        "job",
        "fixed",
        "-p",
        r#"{"spec":{"completionMode":"Indexed"}}"#,
    ]);
    assert!(
        msg.contains("spec.completionMode: Invalid value: \"Indexed\": field is immutable"),
        "{msg}"
    );
    let msg = c.fails(&["set", "image", "job/fixed", "c=other:1"]);
    assert!(
        msg.contains("spec.template: Invalid value") && msg.contains("field is immutable"),
        "{msg}"
    );
}

fn a_pod_failure_policy_ignores_one_exit_code_and_fails_the_job_on_another(c: &Cluster) {
    // The first pod exits 42 (ignored: not counted against backoffLimit 0), the next one
    // finds its marker on the host and succeeds.
    let marker = c.dir.path().join("pfp");
    std::fs::create_dir_all(&marker).unwrap();
    let dir = marker.to_str().unwrap();
    let policy = "  backoffLimit: 0\n  podFailurePolicy:\n    rules:\n    - action: Ignore\n      onExitCodes:\n        operator: In\n        values: [42]\n    - action: FailJob\n      onExitCodes:\n        containerName: c\n        operator: In\n        values: [3]";
    let with_marker = |name: &str, command: &str| {
        job(name, policy, command).replace(
            "      containers:\n",
            &format!("      volumes:\n      - name: m\n        hostPath:\n          path: {dir}\n      containers:\n"),
        ) + "        volumeMounts:\n        - name: m\n          mountPath: /m\n"
    };
    c.apply(&with_marker(
        "tolerant",
        "if [ -e /m/seen ]; then exit 0; fi; touch /m/seen; exit 42",
    ));
    assert_eq!(
        wait_condition(c, "tolerant", "Complete", 120),
        "CompletionsReached"
    );
    assert_eq!(
        status(c, "tolerant", "failed"),
        "0",
        "the ignored failure is not counted"
    );
    assert_eq!(status(c, "tolerant", "succeeded"), "1");
    c.apply(&with_marker("fatal", "exit 3"));
    assert_eq!(wait_condition(c, "fatal", "Failed", 60), "PodFailurePolicy");
    let msg = c.jsonpath(
        &["get", "job", "fatal"],
        "{.status.conditions[?(@.type==\"Failed\")].message}",
    );
    assert!(
        msg.contains("failed with exit code 3 matching FailJob rule at index 1"),
        "{msg}"
    );
}

fn a_succeeded_pod_deleted_at_once_is_still_counted(c: &Cluster) {
    c.apply(&job(
        "counted",
        "  completions: 2\n  parallelism: 1",
        "echo done",
    ));
    // Delete each pod as soon as it has succeeded.
    let deadline = Instant::now() + Duration::from_secs(120);
    while c.jsonpath(
        &["get", "job", "counted"],
        "{.status.conditions[?(@.type==\"Complete\")].status}",
    ) != "True"
    {
        for p in c.sorted_words(
            &[
                "get",
                "pods",
                "-l",
                "job-name=counted",
                "--field-selector=status.phase=Succeeded",
            ],
            "{.items[*].metadata.name}",
        ) {
            let _ = c.kubectl(&["delete", "pod", &p, "--wait=false"]);
        }
        assert!(Instant::now() < deadline, "job counted did not complete");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(status(c, "counted", "succeeded"), "2");
    let made = c.ok(&[
        "get",
        "events",
        "--field-selector",
        "involvedObject.name=counted,reason=SuccessfulCreate",
        "-o",
        "jsonpath={.items[*].count}",
    ]);
    let total: u32 = made
        .split_whitespace()
        .map(|n| n.parse::<u32>().unwrap())
        .sum();
    assert_eq!(total, 2, "each completion made one pod: {made}");
}

fn an_index_that_fails_past_its_own_limit_fails_alone_then_the_job(c: &Cluster) {
    c.apply(&job(
        "per-index",
        "  completionMode: Indexed\n  completions: 3\n  parallelism: 3\n  backoffLimitPerIndex: 1",
        "test $JOB_COMPLETION_INDEX != 1",
    ));
    assert_eq!(
        wait_condition(c, "per-index", "Failed", 90),
        "FailedIndexes"
    );
    assert_eq!(status(c, "per-index", "failedIndexes"), "1");
    assert_eq!(status(c, "per-index", "completedIndexes"), "0,2");
    // Index 1 ran twice (its limit is one retry), the others once.
    let index_one = c.sorted_words(
        &[
            "get",
            "pods",
            "-l",
            "job-name=per-index,batch.kubernetes.io/job-completion-index=1",
        ],
        "{.items[*].metadata.annotations.batch\\.kubernetes\\.io/job-index-failure-count}",
    );
    assert_eq!(index_one, ["0", "1"]);
}

fn a_cronjob_starts_jobs_on_its_schedule_and_by_hand(c: &Cluster) {
    c.apply(&format!(
        "apiVersion: batch/v1\nkind: CronJob\nmetadata:\n  name: tick\nspec:\n  schedule: \"*/1 * * * *\"\n  timeZone: Etc/UTC\n  successfulJobsHistoryLimit: 1\n  jobTemplate:\n    spec:\n{}",
        template("      ", "echo tick")
    ));
    // By hand, at once.
    c.ok(&["create", "job", "--from=cronjob/tick", "by-hand"]);
    wait_condition(c, "by-hand", "Complete", 60);
    // On the schedule: within the next minute (and a few seconds for the Job to run).
    // The schedule's Jobs are named tick-<minutes since the epoch>.
    let scheduled = || {
        c.sorted_words(&["get", "jobs"], "{.items[*].metadata.name}")
            .into_iter()
            .filter(|n| n.starts_with("tick-"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let mut name = String::new();
    c.until(80, "a Job started by the schedule", || {
        name = scheduled().lines().next().unwrap_or_default().to_string();
        !name.is_empty()
    });
    wait_condition(c, &name, "Complete", 60);
    let table = c.ok(&["get", "cronjob", "tick"]);
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME", "SCHEDULE", "TIMEZONE", "SUSPEND", "ACTIVE", "LAST", "SCHEDULE", "AGE"
        ],
        "{table}"
    );
    assert!(
        !c.jsonpath(&["get", "cronjob", "tick"], "{.status.lastScheduleTime}")
            .is_empty(),
        "{table}"
    );
    // successfulJobsHistoryLimit 1: the older finished Job (the one by hand) goes.
    c.until(30, "the history limit to drop the older Job", || {
        !c.kubectl(&["get", "job", "by-hand"]).status.success()
    });
    c.ok(&["delete", "cronjob", "tick"]);
}

const HEADLESS: &str = "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\nspec:\n  clusterIP: None\n  selector:\n    app: web\n  ports:\n  - port: 80\n";

/// The StatefulSet `web`: busybox pods that are ready two seconds after they start, each with
/// a 1Mi claim `www` on /data.
fn statefulset(replicas: usize, extra_spec: &str) -> String {
    format!(
        "apiVersion: apps/v1\nkind: StatefulSet\nmetadata:\n  name: web\nspec:\n  serviceName: web\n  replicas: {replicas}\n{extra_spec}  selector:\n    matchLabels:\n      app: web\n  template:\n    metadata:\n      labels:\n        app: web\n    spec:\n      terminationGracePeriodSeconds: 1\n      containers:\n      - name: c\n        image: {BUSYBOX}\n        command: [\"sh\", \"-c\", \"exec sleep 3600\"]\n        readinessProbe:\n          exec:\n            command: [\"true\"]\n          initialDelaySeconds: 2\n          periodSeconds: 1\n        volumeMounts:\n        - name: www\n          mountPath: /data\n  volumeClaimTemplates:\n  - metadata:\n      name: www\n    spec:\n      accessModes: [ReadWriteOnce]\n      resources:\n        requests:\n          storage: 1Mi\n"
    )
}

fn wait_sts_ready(c: &Cluster, ready: &str, secs: u64) {
    c.until(secs, &format!("statefulset web {ready} ready"), || {
        c.jsonpath(
            &["get", "sts", "web"],
            "{.status.readyReplicas}/{.spec.replicas}",
        ) == ready
    });
}

fn a_statefulset_starts_in_order_with_stable_names_claims_and_data(c: &Cluster) {
    c.apply(HEADLESS);
    c.apply(&statefulset(3, ""));
    wait_sts_ready(c, "3/3", 120);
    // Ordered: each pod was made only after the one before it was ready.
    for i in 1..3 {
        let made = c.field("pod", &format!("web-{i}"), "{.metadata.creationTimestamp}");
        let ready_before = c.field(
            "pod",
            &format!("web-{}", i - 1),
            "{.status.conditions[?(@.type==\"Ready\")].lastTransitionTime}",
        );
        assert!(
            made >= ready_before,
            "web-{i} made at {made}, web-{} ready at {ready_before}",
            i - 1
        );
    }
    let table = c.ok(&["get", "sts", "web"]);
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAME", "READY", "AGE"], "{table}");
    assert!(table.contains("3/3"), "{table}");
    // Identity: host name, DNS name, the pod labels, and the claim of each pod, bound on its
    // node.
    assert_eq!(c.ok(&["exec", "web-1", "--", "hostname"]).trim(), "web-1");
    let ip = c.field("pod", "web-0", "{.status.podIP}");
    c.until(30, "web-0.web resolves to web-0's address", || {
        let o = c.kubectl(&[
            "exec",
            "web-1",
            "--",
            "nslookup",
            "web-0.web.default.svc.cluster.local",
        ]);
        String::from_utf8_lossy(&o.stdout).contains(&format!("Address: {ip}"))
    });
    assert_eq!(
        c.field(
            "pod",
            "web-2",
            "{.metadata.labels.apps\\.kubernetes\\.io/pod-index}"
        ),
        "2"
    );
    for i in 0..3 {
        let claim = format!("www-web-{i}");
        assert_eq!(c.field("pvc", &claim, "{.status.phase}"), "Bound");
        assert_eq!(
            c.field("pvc", &claim, "{.spec.storageClassName}"),
            "local-path"
        );
        let pv = c.field("pvc", &claim, "{.spec.volumeName}");
        let node = c.field("pod", &format!("web-{i}"), "{.spec.nodeName}");
        let pinned = c.jsonpath(
            &["get", "pv", &pv],
            "{.spec.nodeAffinity.required.nodeSelectorTerms[0].matchExpressions[0].values[0]}",
        );
        assert_eq!(pinned, node, "{claim}'s volume is on the pod's node");
        let path = c.jsonpath(&["get", "pv", &pv], "{.spec.hostPath.path}");
        assert!(std::path::Path::new(&path).is_dir(), "{path}");
    }
    // The data outlives the pod: web-0 comes back with the same name, node and claim.
    c.ok(&["exec", "web-0", "--", "sh", "-c", "echo kept > /data/x"]);
    let (uid, node) = (
        c.field("pod", "web-0", "{.metadata.uid}"),
        c.field("pod", "web-0", "{.spec.nodeName}"),
    );
    c.ok(&["delete", "pod", "web-0", "--wait=false"]);
    c.until(90, "web-0 back and ready", || {
        c.jsonpath(
            &["get", "pod", "web-0", "--ignore-not-found"],
            "{.metadata.uid} {.status.conditions[?(@.type==\"Ready\")].status}",
        )
        .split_once(' ')
        .is_some_and(|(u, r)| !u.is_empty() && u != uid && r == "True")
    });
    assert_eq!(c.field("pod", "web-0", "{.spec.nodeName}"), node);
    assert_eq!(
        c.ok(&["exec", "web-0", "--", "cat", "/data/x"]).trim(),
        "kept"
    );
}

fn a_statefulset_scales_down_from_the_top_and_keeps_its_claims(c: &Cluster) {
    c.ok(&["scale", "sts", "web", "--replicas=1"]);
    // web-2 goes before web-1: at no time is web-1 gone while web-2 is there.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let pods = c.sorted_words(
            &["get", "pods", "-l", "app=web"],
            "{.items[*].metadata.name}",
        );
        let has = |n: &str| pods.iter().any(|p| p == n);
        assert!(
            !has("web-2") || has("web-1"),
            "web-1 went before web-2: {pods:?}"
        );
        if pods == ["web-0"] {
            break;
        }
        assert!(Instant::now() < deadline, "scaling down: {pods:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let claims = c.sorted_words(&["get", "pvc"], "{.items[*].metadata.name}");
    for i in 0..3 {
        assert!(claims.contains(&format!("www-web-{i}")), "{claims:?}");
    }
    c.ok(&["scale", "sts", "web", "--replicas=3"]);
    wait_sts_ready(c, "3/3", 120);
}

fn a_statefulset_rolls_to_its_partition_and_rollout_undo_restores_it(c: &Cluster) {
    let rev = |pod: &str| c.field("pod", pod, "{.metadata.labels.controller-revision-hash}");
    let before = rev("web-0");
    c.ok(&[
        "patch",
        "sts",
        "web",
        "-p",
        r#"{"spec":{"updateStrategy":{"rollingUpdate":{"partition":2}}}}"#,
    ]);
    c.ok(&["set", "env", "sts/web", "COLOUR=green"]);
    let out = c.ok(&["rollout", "status", "sts/web", "--timeout=120s"]);
    assert!(
        out.contains("partitioned roll out complete: 1 new pods have been updated"),
        "{out}"
    );
    let updated = c.field("sts", "web", "{.status.updateRevision}");
    assert_ne!(updated, before);
    assert_eq!(rev("web-2"), updated);
    assert_eq!(rev("web-1"), before, "below the partition nothing changes");
    assert_eq!(rev("web-0"), before);
    c.ok(&[
        "patch",
        "sts",
        "web",
        "-p",
        r#"{"spec":{"updateStrategy":{"rollingUpdate":{"partition":0}}}}"#,
    ]);
    let out = c.ok(&["rollout", "status", "sts/web", "--timeout=120s"]);
    assert!(out.contains("3 new pods have been updated"), "{out}");
    for i in 0..3 {
        assert_eq!(rev(&format!("web-{i}")), updated);
    }
    let env = c.ok(&["exec", "web-0", "--", "sh", "-c", "echo $COLOUR"]);
    assert_eq!(env.trim(), "green");
    let history = c.ok(&["rollout", "history", "sts/web"]);
    let revisions: Vec<&str> = history
        .lines()
        .skip_while(|l| !l.starts_with("REVISION"))
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(revisions, ["1", "2"], "{history}");
    // Undo: the first template again, rolled out, and its revision renumbered to 3.
    let undo = c.ok(&["rollout", "undo", "sts/web"]);
    assert!(undo.contains("rolled back"), "{undo}");
    let out = c.ok(&["rollout", "status", "sts/web", "--timeout=120s"]);
    assert!(out.contains("3 new pods have been updated"), "{out}");
    for i in 0..3 {
        assert_eq!(
            rev(&format!("web-{i}")),
            before,
            "after {undo}: {out}\n{}",
            c.ok(&["get", "controllerrevisions", "-o", "json"])
        );
    }
    assert_eq!(
        c.ok(&["exec", "web-0", "--", "sh", "-c", "echo -n $COLOUR"]),
        ""
    );
    let history = c.ok(&["rollout", "history", "sts/web"]);
    assert!(history.lines().any(|l| l.starts_with("3 ")), "{history}");
    let revs = c.ok(&["get", "controllerrevisions"]);
    assert!(revs.contains("statefulset.apps/web"), "{revs}");
}

fn a_statefulset_made_again_after_an_orphaning_delete_adopts_its_pods(c: &Cluster) {
    let uids = || {
        c.sorted_words(
            &["get", "pods", "-l", "app=web"],
            "{.items[*].metadata.uid}",
        )
    };
    let before = uids();
    assert_eq!(before.len(), 3);
    c.ok(&["delete", "sts", "web", "--cascade=orphan"]);
    assert_eq!(uids(), before, "the pods stay");
    c.apply(&statefulset(3, ""));
    let set = c.field("sts", "web", "{.metadata.uid}");
    c.until(60, "the pods adopted by the new set", || {
        c.sorted_words(
            &["get", "pods", "-l", "app=web"],
            "{.items[*].metadata.ownerReferences[0].uid}",
        ) == [set.as_str(); 3]
    });
    wait_sts_ready(c, "3/3", 60);
    assert_eq!(uids(), before, "adopted, not made again");
}

fn a_claim_waits_for_its_first_consumer_and_its_directory_goes_with_it(c: &Cluster) {
    c.apply("apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata:\n  name: scratch\nspec:\n  accessModes: [ReadWriteOnce]\n  resources:\n    requests:\n      storage: 1Mi\n");
    c.until(30, "the WaitForFirstConsumer event", || {
        c.ok(&[
            "get",
            "events",
            "--field-selector",
            "involvedObject.name=scratch",
        ])
        .contains("WaitForFirstConsumer")
    });
    assert_eq!(c.field("pvc", "scratch", "{.status.phase}"), "Pending");
    let table = c.ok(&["get", "sc"]);
    assert!(
        table.contains("local-path (default)") && table.contains("WaitForFirstConsumer"),
        "{table}"
    );
    c.apply(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: consumer\nspec:\n  terminationGracePeriodSeconds: 1\n  securityContext:\n    fsGroup: 2000\n  containers:\n  - name: c\n    image: {BUSYBOX}\n    command: [\"sh\", \"-c\", \"exec sleep 3600\"]\n    volumeMounts:\n    - name: d\n      mountPath: /d\n    - name: d\n      mountPath: /ro\n      readOnly: true\n  volumes:\n  - name: d\n    persistentVolumeClaim:\n      claimName: scratch\n"
    ));
    c.ok(&[
        "wait",
        "--for=condition=Ready",
        "pod/consumer",
        "--timeout=90s",
    ]);
    assert_eq!(c.field("pvc", "scratch", "{.status.phase}"), "Bound");
    assert_eq!(
        c.field("pvc", "scratch", "{.status.capacity.storage}"),
        "1Mi"
    );
    let pv = c.field("pvc", "scratch", "{.spec.volumeName}");
    assert_eq!(
        c.jsonpath(
            &["get", "pv", &pv],
            "{.metadata.annotations.volume\\.kubernetes\\.io/selected-node}"
        ),
        c.field("pod", "consumer", "{.spec.nodeName}")
    );
    let events = c.ok(&[
        "get",
        "events",
        "--field-selector",
        "involvedObject.name=scratch",
    ]);
    assert!(events.contains("ProvisioningSucceeded"), "{events}");
    let dir = c.jsonpath(&["get", "pv", &pv], "{.spec.hostPath.path}");
    c.ok(&["exec", "consumer", "--", "sh", "-c", "echo x > /d/f"]);
    assert!(std::path::Path::new(&format!("{dir}/f")).is_file());
    // fsGroup owns the directory; the readOnly mount refuses writes.
    assert_eq!(
        c.ok(&["exec", "consumer", "--", "stat", "-c", "%g", "/d"])
            .trim(),
        "2000"
    );
    let o = c.kubectl(&["exec", "consumer", "--", "sh", "-c", "echo y > /ro/g"]);
    assert!(
        !o.status.success(),
        "a write to the readOnly mount succeeded"
    );
    // A claim that names this volume in spec.volumeName does not get it: the volume is bound
    // to scratch, so the thief's pod is never placed (and no node would mount it).
    c.apply(&format!(
        "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata:\n  name: thief\nspec:\n  volumeName: {pv}\n  accessModes: [ReadWriteOnce]\n  resources:\n    requests:\n      storage: 1Mi\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: thief\nspec:\n  containers:\n  - name: c\n    image: {BUSYBOX}\n    command: [\"cat\", \"/d/f\"]\n    volumeMounts:\n    - name: d\n      mountPath: /d\n  volumes:\n  - name: d\n    persistentVolumeClaim:\n      claimName: thief\n"
    ));
    c.until(30, "the thief's pod refused a node", || {
        c.jsonpath(
            &["get", "pod", "thief"],
            "{.status.conditions[?(@.type==\"PodScheduled\")].message}",
        )
        .contains("unbound immediate PersistentVolumeClaims")
    });
    assert_eq!(c.field("pod", "thief", "{.spec.nodeName}"), "");
    assert_eq!(c.field("pvc", "thief", "{.status.phase}"), "Pending");
    c.ok(&["delete", "pod", "thief", "--grace-period=0"]);
    c.ok(&["delete", "pvc", "thief"]);
    // The claim is held while its pod runs (pvc-protection), then goes with its volume and
    // directory (reclaim Delete).
    c.ok(&["delete", "pvc", "scratch", "--wait=false"]);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        c.ok(&["get", "pvc", "scratch", "-o", "name"]).trim(),
        "persistentvolumeclaim/scratch"
    );
    c.ok(&["delete", "pod", "consumer"]);
    c.until(60, "the claim, its volume and its directory gone", || {
        c.ok(&["get", "pvc", "scratch", "--ignore-not-found"])
            .is_empty()
            && c.ok(&["get", "pv", &pv, "--ignore-not-found"]).is_empty()
            && !std::path::Path::new(&dir).exists()
    });
}

fn a_daemonset_keeps_revisions_that_rollout_undo_restores(c: &Cluster) {
    c.apply(&format!(
        "apiVersion: apps/v1\nkind: DaemonSet\nmetadata:\n  name: agentd\nspec:\n  selector:\n    matchLabels:\n      app: agentd\n  template:\n    metadata:\n      labels:\n        app: agentd\n    spec:\n      terminationGracePeriodSeconds: 1\n      containers:\n      - name: c\n        image: {BUSYBOX}\n        command: [\"sh\", \"-c\", \"exec sleep 3600\"]\n"
    ));
    c.ok(&["rollout", "status", "ds/agentd", "--timeout=90s"]);
    c.ok(&["set", "env", "ds/agentd", "MODE=two"]);
    c.ok(&["rollout", "status", "ds/agentd", "--timeout=90s"]);
    let history = c.ok(&["rollout", "history", "ds/agentd"]);
    assert!(
        history.lines().any(|l| l.starts_with("1 "))
            && history.lines().any(|l| l.starts_with("2 ")),
        "{history}"
    );
    let detail = c.ok(&["rollout", "history", "ds/agentd", "--revision=2"]);
    assert!(
        detail.contains("MODE:") && detail.contains("two"),
        "{detail}"
    );
    c.ok(&["rollout", "undo", "ds/agentd"]);
    c.ok(&["rollout", "status", "ds/agentd", "--timeout=90s"]);
    assert_eq!(
        c.field("ds", "agentd", "{.spec.template.spec.containers[0].env}"),
        "",
        "the undo restored the template without MODE"
    );
    c.until(60, "daemon pods back on the first template", || {
        c.sorted_words(
            &["get", "pods", "-l", "app=agentd"],
            "{.items[*].spec.containers[0].env}",
        )
        .is_empty()
            && c.jsonpath(&["get", "ds", "agentd"], "{.status.updatedNumberScheduled}") == "2"
    });
    c.ok(&["delete", "ds", "agentd"]);
}

fn an_invalid_statefulset_is_refused_with_field_paths(c: &Cluster) {
    let bad = statefulset(1, "  podManagementPolicy: Sometimes\n")
        .replace("name: web\nspec", "name: bad\nspec");
    let file = c.dir.path().join("bad-sts.yaml");
    std::fs::write(&file, bad).unwrap();
    let msg = c.fails(&["apply", "-f", file.to_str().unwrap()]);
    assert!(
        msg.contains("spec.podManagementPolicy: Unsupported value: \"Sometimes\""),
        "{msg}"
    );
    let msg = c.fails(&[
        "patch",
        "sts",
        "web",
        "-p",
        r#"{"spec":{"serviceName":"other"}}"#,
    ]);
    assert!(
        msg.contains("updates to statefulset spec for fields other than"),
        "{msg}"
    );
}

fn kubectl_drain_waits_for_a_disruption_budget_until_a_replacement_is_ready(c: &Cluster) {
    let nodes = c.sorted_words(&["get", "nodes"], "{.items[*].metadata.name}");
    let (a, b) = (nodes[0].as_str(), nodes[1].as_str());
    // Both replicas on node a (b cordoned while they start), then b open again.
    c.ok(&["cordon", b]);
    c.apply(&format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: held\nspec:\n  replicas: 2\n  selector:\n    matchLabels:\n      app: held\n  template:\n    metadata:\n      labels:\n        app: held\n    spec:\n      terminationGracePeriodSeconds: 1\n      containers:\n      - name: c\n        image: {BUSYBOX}\n        command: [\"sh\", \"-c\", \"exec sleep 3600\"]\n        readinessProbe:\n          exec:\n            command: [\"true\"]\n          initialDelaySeconds: 3\n          periodSeconds: 1\n"
    ));
    c.ok(&["rollout", "status", "deploy/held", "--timeout=90s"]);
    c.ok(&["uncordon", b]);
    let on = c.sorted_words(
        &["get", "pods", "-l", "app=held"],
        "{.items[*].spec.nodeName}",
    );
    assert_eq!(on, [a, a]);
    c.apply("apiVersion: policy/v1\nkind: PodDisruptionBudget\nmetadata:\n  name: held\nspec:\n  minAvailable: 1\n  selector:\n    matchLabels:\n      app: held\n");
    c.until(30, "the budget allows one disruption", || {
        c.jsonpath(&["get", "pdb", "held"], "{.status.disruptionsAllowed}") == "1"
    });
    let table = c.ok(&["get", "pdb", "held"]);
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME",
            "MIN",
            "AVAILABLE",
            "MAX",
            "UNAVAILABLE",
            "ALLOWED",
            "DISRUPTIONS",
            "AGE"
        ],
        "{table}"
    );
    // The first eviction spends the budget; the second waits (429) for the first pod's
    // replacement on b to be ready, and kubectl drain retries until it is.
    let o = c.kubectl(&[
        "drain",
        a,
        "--pod-selector=app=held",
        "--ignore-daemonsets",
        "--timeout=120s",
    ]);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    let _ = c.kubectl(&["uncordon", a]);
    assert!(o.status.success(), "drain: {err}");
    assert!(
        err.contains("Cannot evict pod as it would violate the pod's disruption budget."),
        "the budget never held the drain: {err}"
    );
    c.until(60, "both replicas ready on b", || {
        c.sorted_words(
            &[
                "get",
                "pods",
                "-l",
                "app=held",
                "--field-selector=status.phase=Running",
            ],
            "{.items[*].spec.nodeName}",
        ) == [b, b]
            && c.jsonpath(&["get", "deploy", "held"], "{.status.readyReplicas}") == "2"
    });
    c.ok(&["delete", "pdb", "held"]);
    c.ok(&["delete", "deploy", "held"]);
}

fn a_replication_controller_keeps_its_replicas_and_scales(c: &Cluster) {
    c.apply(&format!(
        "apiVersion: v1\nkind: ReplicationController\nmetadata:\n  name: old\nspec:\n  replicas: 2\n  template:\n    metadata:\n      labels:\n        app: old\n    spec:\n      terminationGracePeriodSeconds: 1\n      containers:\n      - name: c\n        image: {BUSYBOX}\n        command: [\"sh\", \"-c\", \"exec sleep 3600\"]\n"
    ));
    // The selector defaulted from the template's labels.
    assert_eq!(c.field("rc", "old", "{.spec.selector.app}"), "old");
    let ready = |n: &str| {
        c.until(90, &format!("rc old {n} ready"), || {
            c.jsonpath(&["get", "rc", "old"], "{.status.readyReplicas}") == n
        })
    };
    ready("2");
    let table = c.ok(&["get", "rc", "old"]);
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["NAME", "DESIRED", "CURRENT", "READY", "AGE"],
        "{table}"
    );
    c.ok(&["scale", "rc", "old", "--replicas=3"]);
    ready("3");
    let pods = c.sorted_words(
        &["get", "pods", "-l", "app=old"],
        "{.items[*].metadata.name}",
    );
    c.ok(&["delete", "pod", &pods[0], "--wait=false"]);
    c.until(60, "the deleted pod replaced", || {
        let now = c.sorted_words(
            &["get", "pods", "-l", "app=old"],
            "{.items[*].metadata.name}",
        );
        !now.contains(&pods[0]) && now.len() == 3
    });
    ready("3");
    let owner = c.jsonpath(
        &["get", "pods", "-l", "app=old"],
        "{.items[0].metadata.ownerReferences[0].kind}",
    );
    assert_eq!(owner, "ReplicationController");
    c.ok(&["delete", "rc", "old"]);
    c.until(60, "the controller's pods gone", || {
        c.ok(&["get", "pods", "-l", "app=old", "-o", "name"])
            .trim()
            .is_empty()
    });
}
