//! Init containers run first and in order, readiness follows its probe, and a pod whose
//! manifest goes away is stopped gracefully (preStop, SIGTERM, grace period) and frees its IP.
mod common;
use std::time::{Duration, Instant};

use common::*;

#[test]
fn init_containers_run_in_order_before_the_app() {
    let mut lab = Lab::start("init");
    lab.start_agent();
    let yaml = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: init}}\nspec:\n  volumes: [{{name: work, emptyDir: {{}}}}]\n  initContainers:\n  - name: first\n    image: {BUSYBOX}\n    command: [sh, -c, 'echo one >> /work/order']\n    volumeMounts: [{{name: work, mountPath: /work}}]\n  - name: second\n    image: {BUSYBOX}\n    command: [sh, -c, 'sleep 1; echo two >> /work/order']\n    volumeMounts: [{{name: work, mountPath: /work}}]\n  containers:\n  - name: main\n    image: {BUSYBOX}\n    command: [sh, -c, 'echo app >> /work/order; cat /work/order; sleep 3600']\n    volumeMounts: [{{name: work, mountPath: /work}}]\n"
    );
    lab.write_manifest("init.yaml", &yaml);
    // While the second init container runs, the app waits with PodInitializing.
    let p = lab.wait_pod(
        "init",
        "second init running",
        Duration::from_secs(30),
        |p| {
            cstatus(p, "second")
                .state
                .is_some_and(|s| s.running.is_some())
        },
    );
    assert_eq!(
        waiting_reason(&p, "main").as_deref(),
        Some("PodInitializing")
    );
    assert_eq!(phase(&p), "Pending");
    assert_eq!(keelson::kinds::print::pod_status(&p), "Init:1/2");
    let p = lab.wait_ready("init");
    for c in ["first", "second"] {
        let t = terminated(&p, c).unwrap();
        assert_eq!((t.exit_code, t.reason.as_deref()), (0, Some("Completed")));
    }
    let uid = p.metadata.uid.clone().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let log_path = lab
        .log_dir()
        .join(format!("default_init-node1_{uid}/main/0.log"));
    loop {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        let lines: Vec<&str> = log
            .lines()
            .filter_map(|l| l.splitn(4, ' ').nth(3))
            .collect();
        if lines == ["one", "two", "app"] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "order in the shared volume: {lines:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_failing_init_container_blocks_the_app() {
    let mut lab = Lab::start("initfail");
    lab.start_agent();
    let yaml = |name: &str, policy: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec:\n  restartPolicy: {policy}\n  initContainers:\n  - name: setup\n    image: {BUSYBOX}\n    command: [sh, -c, 'exit 2']\n  containers:\n  - name: main\n    image: {BUSYBOX}\n    command: [sh, -c, 'sleep 3600']\n"
        )
    };
    lab.write_manifest("always.yaml", &yaml("always", "Always"));
    lab.write_manifest("never.yaml", &yaml("never", "Never"));
    let never = lab.wait_pod("never", "Failed", Duration::from_secs(30), |p| {
        phase(p) == "Failed"
    });
    assert_eq!(terminated(&never, "setup").unwrap().exit_code, 2);
    assert!(
        cstatus(&never, "main").container_id.is_none(),
        "the app never started"
    );
    // Restarted, and failed again: between runs kubectl shows the failure, not Init:0/1.
    let always = lab.wait_pod(
        "always",
        "init restarted and failing",
        Duration::from_secs(30),
        |p| {
            let st = keelson::kinds::print::pod_status(p);
            restarts(p, "setup") >= 1 && (st == "Init:Error" || st == "Init:CrashLoopBackOff")
        },
    );
    assert_eq!(phase(&always), "Pending");
    assert!(
        cstatus(&always, "main").container_id.is_none(),
        "the app never started"
    );
    let st = keelson::kinds::print::pod_status(&always);
    assert!(st == "Init:Error" || st == "Init:CrashLoopBackOff", "{st}");
}

#[test]
fn readiness_follows_the_probe_without_restarts() {
    let mut lab = Lab::start("ready");
    lab.start_agent();
    let script = "sleep 2; touch /tmp/ready; sleep 4; rm /tmp/ready; sleep 3600";
    let probe = "    readinessProbe:\n      exec: {command: [test, -f, /tmp/ready]}\n      periodSeconds: 1\n      failureThreshold: 1\n";
    lab.write_manifest("ready.yaml", &pod_yaml("ready", script, probe, ""));
    let p = lab.wait_pod("ready", "running", Duration::from_secs(30), |p| {
        phase(p) == "Running"
    });
    assert!(!is_ready(&p), "not ready before the probe succeeds");
    let c = p.status.as_ref().unwrap().conditions.clone().unwrap();
    let ready = c.iter().find(|c| c.type_ == "ContainersReady").unwrap();
    assert_eq!(ready.reason.as_deref(), Some("ContainersNotReady"));
    assert_eq!(
        ready.message.as_deref(),
        Some("containers with unready status: [main]")
    );
    lab.wait_pod("ready", "Ready", Duration::from_secs(15), is_ready);
    let p = lab.wait_pod("ready", "not Ready again", Duration::from_secs(15), |p| {
        !is_ready(p)
    });
    assert_eq!(
        restarts(&p, "main"),
        0,
        "readiness never restarts a container"
    );
    assert!(cstatus(&p, "main").state.unwrap().running.is_some());
}

#[test]
fn removing_the_manifest_runs_prestop_then_sigterm_and_frees_the_ip() {
    let mut lab = Lab::start("stop");
    lab.start_agent();
    let marks = lab.dir.path().join("marks");
    std::fs::create_dir_all(&marks).unwrap();
    let vol = format!(
        "  volumes: [{{name: marks, hostPath: {{path: {}}}}}]\n",
        marks.display()
    );
    let mount = "    volumeMounts: [{name: marks, mountPath: /marks}]\n";
    // Traps TERM and records it; preStop records that it ran first.
    let polite = "trap 'echo term >> /marks/polite; exit 0' TERM; while true; do sleep 0.2; done";
    let pre = format!(
        "{mount}    lifecycle:\n      preStop:\n        exec: {{command: [sh, -c, 'echo prestop >> /marks/polite']}}\n"
    );
    lab.write_manifest("polite.yaml", &pod_yaml("polite", polite, &pre, &vol));
    // Ignores TERM: must be killed when its 3 s grace period ends.
    let stubborn = "trap '' TERM; while true; do sleep 0.2; done";
    lab.write_manifest(
        "stubborn.yaml",
        &pod_yaml(
            "stubborn",
            stubborn,
            "",
            "  terminationGracePeriodSeconds: 3\n",
        ),
    );
    let a = lab.wait_ready("polite");
    lab.wait_ready("stubborn");
    assert_eq!(lab.allocated_ips().len(), 2);
    let veth = keelson::net::host_veth_name(a.metadata.uid.as_deref().unwrap());
    assert!(lab.node_links().contains(&veth));
    let before = lab.containers().len();
    assert_eq!(before, 4, "two sandboxes and two app containers");

    lab.remove_manifest("polite.yaml");
    let t0 = Instant::now();
    lab.remove_manifest("stubborn.yaml");
    let mut polite_gone = None;
    while t0.elapsed() < Duration::from_secs(20) {
        let pods = lab.pods();
        if polite_gone.is_none()
            && !pods
                .iter()
                .any(|p| p.metadata.name.as_deref() == Some("polite-node1"))
        {
            polite_gone = Some(t0.elapsed());
        }
        if pods.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let all_gone = t0.elapsed();
    assert!(
        lab.pods().is_empty(),
        "pods still listed: {:?}",
        lab.pods().len()
    );
    assert!(
        polite_gone.unwrap() < Duration::from_secs(3),
        "the polite pod stops at once: {polite_gone:?}"
    );
    assert!(
        all_gone >= Duration::from_millis(2900),
        "the stubborn pod gets its 3 s grace: {all_gone:?}"
    );
    assert!(
        all_gone < Duration::from_secs(10),
        "then it is killed: {all_gone:?}"
    );
    let record = std::fs::read_to_string(marks.join("polite")).unwrap();
    assert_eq!(record, "prestop\nterm\n", "preStop ran before SIGTERM");
    assert!(
        lab.allocated_ips().is_empty(),
        "IPs freed: {:?}",
        lab.allocated_ips()
    );
    assert!(
        lab.containers().is_empty(),
        "containers removed: {:?}",
        lab.containers()
    );
    assert!(!lab.node_links().contains(&veth), "veth removed");
    assert!(
        std::fs::read_dir(lab.log_dir()).unwrap().next().is_none(),
        "pod log dirs removed"
    );
}
