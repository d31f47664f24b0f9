//! What the container spec asks for is what the process gets: user, read-only root,
//! capabilities, env and field refs, emptyDir (disk and memory), hostPath; a changed manifest
//! replaces the pod; a startup probe gates readiness; followed logs end when the container does.
mod common;
use std::time::Duration;

use common::*;

fn log_of(lab: &Lab, pod: &k8s_openapi::api::core::v1::Pod, container: &str) -> String {
    let name = pod.metadata.name.clone().unwrap();
    let (code, body) = lab
        .get(&format!("/containerLogs/default/{name}/{container}"))
        .unwrap();
    assert_eq!(code, 200, "{body}");
    body
}

#[test]
fn security_context_env_and_volumes_reach_the_process() {
    let mut lab = Lab::start("spec");
    lab.start_agent();
    let host = lab.dir.path().join("hostdir");
    std::fs::create_dir_all(&host).unwrap();
    std::fs::write(host.join("greeting"), "from-the-host").unwrap();
    let script = "id -u; id -g; touch /rootfs-file 2>/dev/null && echo rw || echo ro; \
                  grep CapBnd /proc/self/status; echo \"$MY_POD $MY_IP $COMBINED\"; \
                  cat /host/greeting; echo; mount | grep ' /cache ' | cut -d' ' -f1,3; \
                  touch /scratch/ok && echo scratch-writable; cat /etc/hostname";
    let container = "    env:\n    - {name: BASE, value: base}\n    - {name: COMBINED, value: \"$(BASE)-plus\"}\n    - name: MY_POD\n      valueFrom: {fieldRef: {fieldPath: metadata.name}}\n    - name: MY_IP\n      valueFrom: {fieldRef: {fieldPath: status.podIP}}\n    securityContext:\n      runAsUser: 1234\n      runAsGroup: 4321\n      readOnlyRootFilesystem: true\n      capabilities: {drop: [ALL], add: [NET_BIND_SERVICE]}\n    volumeMounts:\n    - {name: host, mountPath: /host, readOnly: true}\n    - {name: cache, mountPath: /cache}\n    - {name: scratch, mountPath: /scratch}\n";
    let spec = format!(
        "  restartPolicy: Never\n  securityContext: {{fsGroup: 4321}}\n  volumes:\n  - {{name: host, hostPath: {{path: {}, type: Directory}}}}\n  - {{name: cache, emptyDir: {{medium: Memory, sizeLimit: 16Mi}}}}\n  - {{name: scratch, emptyDir: {{}}}}\n",
        host.display()
    );
    lab.write_manifest("spec.yaml", &pod_yaml("spec", script, container, &spec));
    let p = lab.wait_pod("spec", "Succeeded", Duration::from_secs(30), |p| {
        phase(p) == "Succeeded"
    });
    let log = log_of(&lab, &p, "main");
    let lines: Vec<&str> = log.lines().collect();
    let ip = pod_ip(&p);
    assert_eq!(lines[0], "1234", "{log}");
    assert_eq!(lines[1], "4321", "{log}");
    assert_eq!(lines[2], "ro", "read-only root filesystem: {log}");
    // The bounding set is exactly NET_BIND_SERVICE (bit 10); a non-root process has no effective caps.
    assert_eq!(
        lines[3].split_whitespace().nth(1),
        Some("0000000000000400"),
        "{log}"
    );
    assert_eq!(lines[4], format!("spec-node1 {ip} base-plus"));
    assert_eq!(lines[5], "from-the-host");
    assert_eq!(lines[6], "tmpfs /cache", "medium: Memory is a tmpfs: {log}");
    assert_eq!(
        lines[7], "scratch-writable",
        "fsGroup makes the emptyDir writable: {log}"
    );
    assert_eq!(lines[8], "spec-node1");
}

#[test]
fn a_changed_manifest_replaces_the_pod() {
    let mut lab = Lab::start("change");
    lab.start_agent();
    let grace = "  terminationGracePeriodSeconds: 3\n";
    lab.write_manifest(
        "app.yaml",
        &pod_yaml("app", "echo v1; exec sleep 3600", "", grace),
    );
    let v1 = lab.wait_ready("app");
    lab.write_manifest(
        "app.yaml",
        &pod_yaml("app", "echo v2; exec sleep 3600", "", grace),
    );
    // The old instance is Terminating for its grace period (`sleep` as PID 1 ignores TERM) and
    // the new one starts only after it is gone: never two pods of one name, as kubelet does.
    let old = lab.wait_pod("app", "Terminating", Duration::from_secs(10), |p| {
        p.metadata.deletion_timestamp.is_some()
    });
    assert_eq!(old.metadata.uid, v1.metadata.uid);
    assert_eq!(keelson::kinds::print::pod_status(&old), "Terminating");
    let t0 = std::time::Instant::now();
    let mut most_listed = 0;
    let v2 = loop {
        let pods = lab.pods();
        most_listed = most_listed.max(pods.len());
        if let Some(p) = pods
            .into_iter()
            .find(|p| p.metadata.uid != v1.metadata.uid && is_ready(p))
        {
            break p;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the new version did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(most_listed, 1, "old and new never listed together");
    assert!(
        t0.elapsed() >= Duration::from_secs(1),
        "the new one waited for the old one's grace"
    );
    assert_eq!(log_of(&lab, &v2, "main"), "v2\n");
    assert_ne!(
        cstatus(&v2, "main").container_id,
        cstatus(&v1, "main").container_id
    );
    assert_eq!(
        lab.containers().len(),
        2,
        "only the new sandbox and container remain"
    );
    assert_eq!(lab.pods().len(), 1);
}

#[test]
fn a_startup_probe_gates_started_and_ready() {
    let mut lab = Lab::start("startup");
    lab.start_agent();
    let script = "sleep 3; touch /tmp/started; exec sleep 3600";
    let probes = "    startupProbe:\n      exec: {command: [test, -f, /tmp/started]}\n      periodSeconds: 1\n      failureThreshold: 30\n    livenessProbe:\n      exec: {command: [test, -f, /tmp/started]}\n      periodSeconds: 1\n      failureThreshold: 1\n";
    lab.write_manifest("slow.yaml", &pod_yaml("slow", script, probes, ""));
    let p = lab.wait_pod("slow", "running", Duration::from_secs(30), |p| {
        phase(p) == "Running"
    });
    let cs = cstatus(&p, "main");
    assert_eq!(
        cs.started,
        Some(false),
        "not started before the startup probe passes"
    );
    assert!(!cs.ready);
    let p = lab.wait_ready("slow");
    assert_eq!(cstatus(&p, "main").started, Some(true));
    assert_eq!(restarts(&p, "main"), 0, "liveness waited for startup");
}

#[test]
fn followed_logs_stream_until_the_container_exits() {
    let mut lab = Lab::start("follow");
    lab.start_agent();
    lab.write_manifest(
        "talk.yaml",
        &pod_yaml(
            "talk",
            "for i in 1 2 3 4 5; do echo line$i; sleep 0.5; done",
            "",
            "  restartPolicy: Never\n",
        ),
    );
    lab.wait_pod("talk", "running", Duration::from_secs(30), |p| {
        phase(p) == "Running"
    });
    let t0 = std::time::Instant::now();
    let (code, body) = lab
        .get("/containerLogs/default/talk-node1/main?follow=true&timestamps=true")
        .unwrap();
    assert_eq!(code, 200);
    let lines: Vec<&str> = body.lines().collect();
    assert_eq!(lines.len(), 5, "{body}");
    for (i, l) in lines.iter().enumerate() {
        let (ts, msg) = l.split_once(' ').unwrap();
        assert!(ts.parse::<jiff::Timestamp>().is_ok(), "{ts}");
        assert_eq!(msg, format!("line{}", i + 1));
    }
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "the stream ended with the container"
    );
}

#[test]
fn probe_timing_fields_are_honoured() {
    let mut lab = Lab::start("timing");
    lab.start_agent();
    // tcpSocket readiness that would pass at once, delayed by initialDelaySeconds.
    let delayed = "    readinessProbe:\n      tcpSocket: {port: 80}\n      initialDelaySeconds: 3\n      periodSeconds: 1\n";
    lab.write_manifest(
        "delayed.yaml",
        &pod_yaml("delayed", "exec httpd -f -p 80 -h /www", delayed, ""),
    );
    // An exec liveness probe slower than its timeoutSeconds fails and restarts the container.
    let slow = "    livenessProbe:\n      exec: {command: [sleep, \"3\"]}\n      timeoutSeconds: 1\n      periodSeconds: 1\n      failureThreshold: 2\n      terminationGracePeriodSeconds: 1\n";
    lab.write_manifest(
        "slow.yaml",
        &pod_yaml("slowprobe", "exec sleep 3600", slow, ""),
    );
    let running = lab.wait_pod("delayed", "running", Duration::from_secs(30), |p| {
        phase(p) == "Running"
    });
    let started_at = cstatus(&running, "main")
        .state
        .unwrap()
        .running
        .unwrap()
        .started_at
        .unwrap()
        .0;
    let ready = lab.wait_ready("delayed");
    let became_ready = ready
        .status
        .unwrap()
        .conditions
        .unwrap()
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .unwrap()
        .last_transition_time
        .unwrap()
        .0;
    let waited = became_ready.duration_since(started_at).as_secs_f64();
    assert!(
        waited >= 2.5,
        "readiness waited for initialDelaySeconds: {waited}s"
    );
    assert!(waited < 8.0, "then passed promptly: {waited}s");
    lab.wait_pod(
        "slowprobe",
        "restart after probe timeouts",
        Duration::from_secs(30),
        |p| restarts(p, "main") >= 1,
    );
    assert!(
        lab.agent_log()
            .contains("Liveness probe failed: command \"sleep 3\" timed out"),
        "{}",
        lab.agent_log()
    );
}
