//! An agent killed with SIGKILL and started again adopts what runs: same container IDs, same
//! restart counts, same pod IPs, and nothing is restarted. A pod removed while the agent was
//! down is cleaned up when it comes back.
mod common;
use std::time::Duration;

use common::*;

#[test]
fn a_killed_agent_adopts_running_pods_on_restart() {
    let mut lab = Lab::start("adopt");
    lab.start_agent();
    let httpd = "echo up > /www/index.html; exec httpd -f -p 80 -h /www";
    let probe = "    readinessProbe:\n      httpGet: {path: /index.html, port: 80}\n      periodSeconds: 1\n";
    lab.write_manifest("web.yaml", &pod_yaml("web", httpd, probe, ""));
    // A container that has already restarted once, so the count must survive too.
    let once = "if [ -f /data/ran ]; then exec sleep 3600; fi; touch /data/ran; exit 1";
    lab.write_manifest(
        "flaky.yaml",
        &pod_yaml(
            "flaky",
            once,
            "    volumeMounts: [{name: data, mountPath: /data}]\n",
            "  volumes: [{name: data, emptyDir: {}}]\n",
        ),
    );
    lab.write_manifest("gone.yaml", &pod_yaml("gone", "exec sleep 3600", "", ""));
    let web = lab.wait_ready("web");
    let flaky = lab.wait_pod(
        "flaky",
        "restarted once and running",
        Duration::from_secs(30),
        |p| restarts(p, "main") == 1 && is_ready(p),
    );
    lab.wait_ready("gone");
    let containers_before = lab.containers();

    lab.kill_agent();
    lab.remove_manifest("gone.yaml");
    lab.start_agent();

    let web2 = lab.wait_ready("web");
    let flaky2 = lab.wait_ready("flaky");
    assert_eq!(
        cstatus(&web2, "main").container_id,
        cstatus(&web, "main").container_id
    );
    assert_eq!(pod_ip(&web2), pod_ip(&web));
    assert_eq!(restarts(&web2, "main"), 0);
    assert_eq!(
        cstatus(&flaky2, "main").container_id,
        cstatus(&flaky, "main").container_id
    );
    assert_eq!(
        restarts(&flaky2, "main"),
        1,
        "restart count survives the agent restart"
    );
    assert_eq!(pod_ip(&flaky2), pod_ip(&flaky));
    assert_eq!(
        cstatus(&flaky2, "main")
            .last_state
            .unwrap()
            .terminated
            .unwrap()
            .exit_code,
        1,
        "lastState survives too"
    );
    assert_eq!(
        lab.node_http(&format!("http://{}/", pod_ip(&web2)))
            .as_deref(),
        Some("up\n")
    );
    // The pod removed while the agent was down is gone (2 s minimum grace), with its address.
    assert!(lab.pod("gone").is_none());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while lab.containers().len() > containers_before.len() - 2
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    let after = lab.containers();
    assert!(
        after.iter().all(|c| containers_before.contains(c)),
        "nothing new was started"
    );
    let tasks = std::process::Command::new("ctr")
        .arg("-a")
        .arg(lab.socket())
        .args(["-n", NS, "t", "ls"])
        .output()
        .unwrap();
    assert_eq!(
        after.len(),
        containers_before.len() - 2,
        "the removed pod's sandbox and container went; tasks:\n{}",
        String::from_utf8_lossy(&tasks.stdout)
    );
    assert_eq!(lab.allocated_ips().len(), 2);
    // Logs keep flowing into the same file after adoption.
    let (code, body) = lab
        .get("/containerLogs/default/flaky-node1/main?previous=true")
        .unwrap();
    assert_eq!(code, 200, "{body}");
}
