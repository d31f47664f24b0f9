//! Workloads beyond Deployments on a 2-node `keelson lab`, driven with the real kubectl:
//! Jobs — `kubectl create job`, completions with parallelism, the back-off and
//! `backoffLimit`, Indexed completion, `activeDeadlineSeconds`, `ttlSecondsAfterFinished`,
//! kubectl's Job columns, and kube-apiserver's validation; a CronJob on the real clock and by
//! hand (`kubectl create job --from=cronjob/…`), with its history limit.
mod common;

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
        a_cronjob_starts_jobs_on_its_schedule_and_by_hand,
    );
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
        "  completions: 5\n  parallelism: 2",
        "sleep 1; echo done",
    ));
    let mut most = 0;
    let t0 = Instant::now();
    c.until(120, "job par to complete", || {
        most = most.max(status(c, "par", "active").parse::<i32>().unwrap_or(0));
        !status(c, "par", "completionTime").is_empty()
    });
    eprintln!(
        "workloads: 5 completions, parallelism 2, in {:?}",
        t0.elapsed()
    );
    assert_eq!(status(c, "par", "succeeded"), "5");
    assert!(most <= 2, "at most 2 active, saw {most}");
    assert_eq!(
        wait_condition(c, "par", "Complete", 5),
        "CompletionsReached"
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
