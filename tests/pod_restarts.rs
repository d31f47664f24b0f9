//! Containers restart as kubelet restarts them: on liveness failure, with CrashLoopBackOff
//! delays, per restartPolicy; an OOM kill is reported as OOMKilled.
mod common;
use std::time::{Duration, Instant};

use common::*;

#[test]
fn a_liveness_failure_restarts_the_container_and_counts_it() {
    let mut lab = Lab::start("live");
    lab.start_agent();
    // Healthy for ~2 s, then the health file disappears.
    let script = "mkdir -p /www && echo ok > /www/healthz && (sleep 2; rm /www/healthz) & exec httpd -f -p 80 -h /www";
    let probe = "    livenessProbe:\n      httpGet: {path: /healthz, port: 80}\n      periodSeconds: 1\n      failureThreshold: 2\n      terminationGracePeriodSeconds: 1\n";
    lab.write_manifest("live.yaml", &pod_yaml("live", script, probe, ""));
    let first = lab.wait_ready("live");
    let first_id = cstatus(&first, "main").container_id.unwrap();
    let p = lab.wait_pod("live", "a restart", Duration::from_secs(30), |p| {
        restarts(p, "main") >= 1
    });
    let cs = cstatus(&p, "main");
    let last = cs
        .last_state
        .and_then(|l| l.terminated)
        .expect("lastState.terminated");
    assert_eq!(last.container_id.as_deref(), Some(first_id.as_str()));
    assert_ne!(
        cs.container_id.as_deref(),
        Some(first_id.as_str()),
        "a new container instance"
    );
    assert!(
        lab.agent_log()
            .contains("failed liveness probe, will be restarted")
    );
    assert!(
        lab.agent_log()
            .contains("Liveness probe failed: HTTP probe failed with statuscode: 404"),
        "{}",
        lab.agent_log()
    );
}

#[test]
fn a_crashing_container_backs_off_10_then_20_seconds() {
    let mut lab = Lab::start("crash");
    lab.start_agent();
    lab.write_manifest(
        "crash.yaml",
        &pod_yaml("crash", "echo boom; exit 3", "", ""),
    );
    let t0 = Instant::now();
    let mut seen: Vec<(i32, Duration)> = vec![];
    let mut reason_seen = None;
    while t0.elapsed() < Duration::from_secs(45) && seen.last().is_none_or(|(n, _)| *n < 3) {
        if let Some(p) = lab.pod("crash") {
            let n = restarts(&p, "main");
            if seen.last().is_none_or(|(m, _)| *m != n) {
                seen.push((n, t0.elapsed()));
            }
            if let Some(r) = waiting_reason(&p, "main") {
                let msg = cstatus(&p, "main")
                    .state
                    .unwrap()
                    .waiting
                    .unwrap()
                    .message
                    .unwrap_or_default();
                if r == "CrashLoopBackOff" && msg.starts_with("back-off 20s") {
                    reason_seen = Some(msg);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let at = |n: i32| {
        seen.iter()
            .find(|(m, _)| *m == n)
            .map(|(_, t)| *t)
            .unwrap_or_else(|| panic!("restart {n} not seen: {seen:?}"))
    };
    let (r1, r2, r3) = (at(1), at(2), at(3));
    assert!(
        r1 < Duration::from_secs(3),
        "first restart is immediate: {seen:?}"
    );
    let g2 = r2 - r1;
    let g3 = r3 - r2;
    assert!(
        g2 >= Duration::from_secs(9) && g2 < Duration::from_secs(14),
        "second restart after ~10 s: {seen:?}"
    );
    assert!(
        g3 >= Duration::from_secs(19) && g3 < Duration::from_secs(25),
        "third restart after ~20 s: {seen:?}"
    );
    let msg = reason_seen.expect("CrashLoopBackOff with a 20 s back-off was reported");
    assert!(
        msg.contains("restarting failed container=main pod=crash-node1_default("),
        "{msg}"
    );
    let p = lab.pod("crash").unwrap();
    assert_eq!(
        phase(&p),
        "Running",
        "a crash-looping Always pod stays Running"
    );
    let last = cstatus(&p, "main").last_state.unwrap().terminated.unwrap();
    assert_eq!((last.exit_code, last.reason.as_deref()), (3, Some("Error")));
}

#[test]
fn restart_policy_never_and_on_failure() {
    let mut lab = Lab::start("policy");
    lab.start_agent();
    lab.write_manifest(
        "never.yaml",
        &pod_yaml("never", "exit 3", "", "  restartPolicy: Never\n"),
    );
    // Fails on its first run, succeeds on the second (the emptyDir survives restarts).
    let once = "if [ -f /data/ran ]; then echo second; exit 0; fi; touch /data/ran; exit 1";
    lab.write_manifest(
        "onfail.yaml",
        &pod_yaml(
            "onfail",
            once,
            "    volumeMounts: [{name: data, mountPath: /data}]\n",
            "  restartPolicy: OnFailure\n  volumes: [{name: data, emptyDir: {}}]\n",
        ),
    );
    lab.write_manifest(
        "done.yaml",
        &pod_yaml("done", "exit 0", "", "  restartPolicy: OnFailure\n"),
    );
    let never = lab.wait_pod("never", "Failed", Duration::from_secs(30), |p| {
        phase(p) == "Failed"
    });
    let t = terminated(&never, "main").unwrap();
    assert_eq!(
        (t.exit_code, t.reason.as_deref(), restarts(&never, "main")),
        (3, Some("Error"), 0)
    );
    let onfail = lab.wait_pod("onfail", "Succeeded", Duration::from_secs(30), |p| {
        phase(p) == "Succeeded"
    });
    assert_eq!(restarts(&onfail, "main"), 1);
    assert_eq!(
        cstatus(&onfail, "main")
            .last_state
            .unwrap()
            .terminated
            .unwrap()
            .exit_code,
        1
    );
    let done = lab.wait_pod("done", "Succeeded", Duration::from_secs(30), |p| {
        phase(p) == "Succeeded"
    });
    assert_eq!(restarts(&done, "main"), 0);
    let ready = done
        .status
        .unwrap()
        .conditions
        .unwrap()
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_deref()),
        ("False", Some("PodCompleted"))
    );
    // A finished pod gives its address back.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !lab.allocated_ips().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        lab.allocated_ips().is_empty(),
        "terminal pods keep no IP: {:?}",
        lab.allocated_ips()
    );
}

#[test]
fn a_memory_hog_over_its_limit_is_oom_killed() {
    let mut lab = Lab::start("oom");
    lab.start_agent();
    lab.write_manifest(
        "oom.yaml",
        &pod_yaml(
            "oom",
            "exec dd if=/dev/zero of=/dev/null bs=256M count=1",
            "    resources: {limits: {memory: 32Mi}}\n",
            "  restartPolicy: Never\n",
        ),
    );
    let p = lab.wait_pod("oom", "Failed", Duration::from_secs(30), |p| {
        phase(p) == "Failed"
    });
    let t = terminated(&p, "main").unwrap();
    assert_eq!((t.exit_code, t.reason.as_deref()), (137, Some("OOMKilled")));
}
