//! A pod gets its own network namespace on the node bridge: it answers on its pod IP from the
//! node, pods on one node reach each other, and its logs are served in the CRI format.
mod common;
use common::*;

const HTTPD: &str =
    "echo hello-from-$(hostname) > /www/index.html; echo serving; exec httpd -f -p 80 -h /www";

#[test]
fn an_httpd_pod_becomes_ready_and_answers_on_its_pod_ip() {
    let mut lab = Lab::start("web");
    lab.start_agent();
    lab.write_manifest(
        "web.yaml",
        &pod_yaml("web", HTTPD, "    readinessProbe:\n      httpGet: {path: /index.html, port: 80}\n      periodSeconds: 1\n", ""),
    );
    let p = lab.wait_ready("web");
    let ip = pod_ip(&p);
    assert!(
        ip.starts_with("10.77.0."),
        "pod IP {ip} is from the pod CIDR"
    );
    assert_eq!(
        lab.node_http(&format!("http://{ip}/")).as_deref(),
        Some("hello-from-web-node1\n")
    );
    let st = p.status.as_ref().unwrap();
    assert_eq!(st.phase.as_deref(), Some("Running"));
    assert!(st.start_time.is_some());
    let cs = cstatus(&p, "main");
    assert!(cs.container_id.unwrap().starts_with("containerd://"));
    assert!(
        cs.image_id.starts_with("keelson.local/busybox@sha256:"),
        "{}",
        cs.image_id
    );
    assert_eq!(cs.started, Some(true));
    // Logs: the CRI file on disk and the agent's containerLogs endpoint.
    let uid = p.metadata.uid.clone().unwrap();
    let file = lab
        .log_dir()
        .join(format!("default_web-node1_{uid}/main/0.log"));
    let content = std::fs::read_to_string(&file).expect("CRI log file");
    assert!(
        content.lines().any(|l| l.ends_with(" stdout F serving")),
        "{content}"
    );
    let (code, body) = lab
        .get("/containerLogs/default/web-node1/main?tailLines=1")
        .unwrap();
    assert_eq!((code, body.as_str()), (200, "serving\n"));
    let (code, body) = lab
        .get("/containerLogs/default/web-node1/main?previous=true")
        .unwrap();
    assert_eq!(code, 400);
    assert!(
        body.contains(
            "previous terminated container \\\"main\\\" in pod \\\"web-node1\\\" not found"
        ),
        "{body}"
    );
    // The pod's hostname is its name, and its default route goes via the bridge.
    let table = std::process::Command::new(env!("CARGO_BIN_EXE_keelson"))
        .args(["pods", "--data-dir"])
        .arg(lab.data_dir())
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("web-node1") && table.contains("1/1") && table.contains("Running"),
        "{table}"
    );
}

#[test]
fn two_pods_on_one_node_reach_each_other() {
    let mut lab = Lab::start("twopods");
    lab.start_agent();
    lab.write_manifest("a.yaml", &pod_yaml("a", HTTPD, "", ""));
    lab.write_manifest("b.yaml", &pod_yaml("b", HTTPD, "", ""));
    let a = lab.wait_ready("a");
    let b = lab.wait_ready("b");
    let (ipa, ipb) = (pod_ip(&a), pod_ip(&b));
    assert_ne!(ipa, ipb);
    // From inside pod a, fetch pod b (exec through a probe-less one-shot pod would be heavier;
    // a third pod that fetches b and exits reports the body in its log).
    // (A few tries: the servers have no readiness probe, so "Ready" may precede listen().)
    let fetch = |ip: &str| {
        format!("for i in 1 2 3 4 5; do timeout 5 wget -qO- http://{ip}/ && break; sleep 0.5; done")
    };
    let script = format!("{} && {}", fetch(&ipb), fetch(&ipa));
    lab.write_manifest(
        "client.yaml",
        &pod_yaml("client", &script, "", "  restartPolicy: Never\n"),
    );
    let c = lab.wait_pod(
        "client",
        "Succeeded",
        std::time::Duration::from_secs(60),
        |p| phase(p) == "Succeeded",
    );
    let uid = c.metadata.uid.clone().unwrap();
    let log = std::fs::read_to_string(
        lab.log_dir()
            .join(format!("default_client-node1_{uid}/main/0.log")),
    )
    .unwrap();
    assert!(log.contains("hello-from-b-node1"), "{log}");
    assert!(log.contains("hello-from-a-node1"), "{log}");
    let t = terminated(&c, "main").unwrap();
    assert_eq!((t.exit_code, t.reason.as_deref()), (0, Some("Completed")));
}

#[test]
fn a_host_network_pod_shares_the_nodes_namespace() {
    let mut lab = Lab::start("hostnet");
    lab.start_agent();
    lab.write_manifest(
        "host.yaml",
        &pod_yaml(
            "host",
            "echo on-the-node > /www/index.html; exec httpd -f -p 127.0.0.1:8089 -h /www",
            "",
            "  hostNetwork: true\n",
        ),
    );
    let p = lab.wait_ready("host");
    assert_eq!(
        pod_ip(&p),
        "10.77.0.1",
        "a host-network pod has the node's address"
    );
    // Bound to the node namespace's loopback: reachable from the node, not via any pod IP.
    let mut body = None;
    for _ in 0..50 {
        body = lab.node_http("http://127.0.0.1:8089/");
        if body.is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(body.as_deref(), Some("on-the-node\n"));
    assert!(
        lab.allocated_ips().is_empty(),
        "no pod address is allocated"
    );
}
