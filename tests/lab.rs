//! Multi-node clusters made with `keelson lab up`, driven with the real kubectl: workloads
//! spread over the nodes and reach each other across them (host-gw routes), logs, replacement
//! of deleted pods, preStop on graceful deletion, ConfigMap/Secret volumes and env with updates
//! reaching running containers, and the failure cases: an agent restart adopts its pods, the
//! server away for a minute leaves pods untouched, a lost node's pods come back elsewhere.
mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{BUSYBOX, Kubectl, cluster::Cluster};

fn web(replicas: usize) -> String {
    common::web(replicas, None)
}

/// A 3-node lab running the `web` Deployment's six ready pods.
struct Work {
    c: Cluster,
    /// The web pods as they were first ready: (name, node, ip, ready).
    pods: Vec<(String, String, String, bool)>,
}

#[test]
fn workloads_spread_over_nodes_talk_across_them_and_log() {
    let c = Cluster::up("work", 3, &[]);
    c.apply(&web(6));
    let pods = c.wait_ready("app=web", 6, 90);
    let w = Work { c, pods };
    crate::scenarios!(&w;
        three_nodes_register_and_the_pods_spread_over_all_of_them,
        node1_routes_the_other_nodes_pod_cidrs_and_rejects_untranslated_service_traffic,
        a_pod_on_node1_reaches_every_web_pod_across_nodes,
        logs_f_follows_a_pod_on_another_node_as_it_writes,
        a_deleted_pod_is_replaced,
        the_kubelet_metrics_count_pod_starts_and_probes_for_the_api_server_only,
    );
}

/// Three nodes registered, and the six web pods spread over all of them.
fn three_nodes_register_and_the_pods_spread_over_all_of_them(w: &Work) {
    let (c, pods) = (&w.c, &w.pods);
    let nodes = c.ok(&["get", "nodes", "-o", "name"]);
    assert_eq!(nodes.lines().count(), 3, "{nodes}");
    let on: BTreeSet<&str> = pods.iter().map(|p| p.1.as_str()).collect();
    assert_eq!(on.len(), 3, "the pods spread over all nodes: {pods:?}");
}

/// Node routes: node1 has a route to every other node's pod CIDR, the Service range on its
/// bridge, and rejects what is still addressed to that range after translation.
fn node1_routes_the_other_nodes_pod_cidrs_and_rejects_untranslated_service_traffic(w: &Work) {
    let c = &w.c;
    let routes = String::from_utf8_lossy(
        &Command::new("ip")
            .args(["-n", &c.nodes[0], "route", "show", "proto", "75"])
            .output()
            .unwrap()
            .stdout,
    )
    .to_string();
    assert!(routes.contains("10.96.0.0/12 dev keelson0"), "{routes}");
    let rules = String::from_utf8_lossy(
        &Command::new("ip")
            .args([
                "netns",
                "exec",
                &c.nodes[0],
                "nft",
                "list",
                "table",
                "ip",
                "keelson-node-keelson0",
            ])
            .output()
            .unwrap()
            .stdout,
    )
    .to_string();
    assert!(rules.contains("ip daddr 10.96.0.0/12 reject"), "{rules}");
    assert!(rules.contains(" masquerade"), "{rules}");
    assert_eq!(routes.matches(" via 10.250.0.").count(), 2, "{routes}");
}

/// A pod on node1 fetches from every web pod (two of three nodes are remote).
fn a_pod_on_node1_reaches_every_web_pod_across_nodes(w: &Work) {
    let (c, pods) = (&w.c, &w.pods);
    let ips: Vec<&str> = pods.iter().map(|p| p.2.as_str()).collect();
    let script = format!(
        "for ip in {}; do timeout 5 wget -qO- $ip:8080; done; echo done",
        ips.join(" ")
    );
    c.ok(&[
        "run",
        "client",
        &format!("--image={BUSYBOX}"),
        "--restart=Never",
        &format!(
            "--overrides={{\"spec\":{{\"nodeName\":\"{}\"}}}}",
            c.nodes[0]
        ),
        "--",
        "sh",
        "-c",
        &script,
    ]);
    c.until(60, "the client pod to finish", || {
        c.jsonpath(&["get", "pod", "client"], "{.status.phase}") == "Succeeded"
    });
    let out = c.ok(&["logs", "client"]);
    for p in pods {
        assert!(
            out.contains(&format!("hello from {}", p.0)),
            "no answer from {} on {}: {out}",
            p.0,
            p.1
        );
    }
}

/// kubectl logs -f follows a pod on another node as it writes.
fn logs_f_follows_a_pod_on_another_node_as_it_writes(w: &Work) {
    let c = &w.c;
    c.ok(&[
        "run",
        "ticker",
        &format!("--image={BUSYBOX}"),
        "--restart=Never",
        &format!(
            "--overrides={{\"spec\":{{\"nodeName\":\"{}\"}}}}",
            c.nodes[2]
        ),
        "--",
        "sh",
        "-c",
        "i=0; while true; do i=$((i+1)); echo tick $i; sleep 0.2; done",
    ]);
    c.until(60, "the ticker to run", || {
        c.jsonpath(&["get", "pod", "ticker"], "{.status.phase}") == "Running"
    });
    let mut f = Command::new("kubectl")
        .args(["logs", "-f", "ticker"])
        .env("KUBECONFIG", c.kubeconfig())
        .env("HOME", c.dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(f.stdout.take().unwrap()).lines();
    let t0 = Instant::now();
    let mut seen = vec![];
    while seen.len() < 10 && t0.elapsed() < Duration::from_secs(20) {
        match lines.next() {
            Some(Ok(l)) => seen.push(l),
            _ => break,
        }
    }
    let _ = f.kill();
    let _ = f.wait();
    assert_eq!(seen.len(), 10, "kubectl logs -f delivered {seen:?}");
    let n: Vec<u32> = seen
        .iter()
        .filter_map(|l| l.strip_prefix("tick ")?.parse().ok())
        .collect();
    assert!(
        n.windows(2).all(|w| w[1] == w[0] + 1),
        "lines in order: {seen:?}"
    );
}

/// A deleted pod is replaced.
fn a_deleted_pod_is_replaced(w: &Work) {
    let c = &w.c;
    let victim = w.pods[0].0.clone();
    c.ok(&["delete", "pod", &victim, "--wait=false"]);
    c.until(60, "the deleted pod to be replaced", || {
        let now = c.pods("app=web");
        now.len() == 6 && now.iter().all(|p| p.3 && p.0 != victim)
    });
    c.until(30, "the deleted pod to disappear", || {
        !c.ok(&["get", "pods", "-o", "name"]).contains(&victim)
    });
}

/// The kubelet API's /metrics: pod start latency and sync histograms, probe counters; only for
/// the API server's credential.
fn the_kubelet_metrics_count_pod_starts_and_probes_for_the_api_server_only(w: &Work) {
    let c = &w.c;
    let pki = c.lab_dir().join("server/pki");
    let pki = pki.to_string_lossy();
    let curl = |auth: Option<&str>| {
        let mut cmd = Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            &c.nodes[0],
            "curl",
            "-s",
            "--cacert",
            &format!("{pki}/ca.crt"),
            "-w",
            "\n%{http_code}",
        ]);
        if let Some(who) = auth {
            cmd.args([
                "--cert",
                &format!("{pki}/{who}.crt"),
                "--key",
                &format!("{pki}/{who}.key"),
            ]);
        }
        // The kubelet's serving certificate is the cluster CA's, for the node's address.
        let o = cmd
            .arg("https://10.250.0.11:10250/metrics")
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).to_string()
    };
    assert!(curl(None).ends_with("401"), "anonymous: {}", curl(None));
    let m = curl(Some("kubelet-client"));
    assert!(m.ends_with("200"), "{m}");
    let count = |name: &str| -> u64 {
        m.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{m}"))
    };
    assert!(
        count("kubelet_pod_start_duration_seconds_count") >= 2,
        "{m}"
    );
    assert!(
        count("kubelet_pod_worker_duration_seconds_count") >= 2,
        "{m}"
    );
    assert!(
        m.contains("prober_probe_total{probe_type=\"Readiness\",result=\"successful\"}"),
        "{m}"
    );
}

/// A 2-node lab running the pod `app` on node2: the ConfigMap `settings` and Secret `creds` in
/// its env and volumes, a preStop hook writing into `marker_dir` (a hostPath).
struct Config {
    c: Cluster,
    marker_dir: std::path::PathBuf,
}

#[test]
fn graceful_deletion_runs_prestop_and_config_reaches_containers() {
    let c = Cluster::up("cfg", 2, &[]);
    let marker_dir = c.dir.path().join("marker");
    std::fs::create_dir_all(&marker_dir).unwrap();
    c.ok(&[
        "create",
        "configmap",
        "settings",
        "--from-literal=colour=blue",
    ]);
    c.ok(&[
        "create",
        "secret",
        "generic",
        "creds",
        "--from-literal=password=s3cret",
    ]);
    c.apply(&format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: app
spec:
  nodeName: {node}
  terminationGracePeriodSeconds: 20
  containers:
  - name: main
    image: {BUSYBOX}
    command: ["sh", "-c", "trap 'exit 0' TERM; echo env $COLOUR $PASSWORD; while true; do echo now $(cat /etc/settings/colour) $(cat /etc/creds/password); sleep 0.5; done"]
    env:
    - name: COLOUR
      valueFrom: {{configMapKeyRef: {{name: settings, key: colour}}}}
    - name: PASSWORD
      valueFrom: {{secretKeyRef: {{name: creds, key: password}}}}
    volumeMounts:
    - {{name: settings, mountPath: /etc/settings}}
    - {{name: creds, mountPath: /etc/creds}}
    - {{name: marker, mountPath: /marker}}
    lifecycle:
      preStop:
        exec:
          command: ["sh", "-c", "echo prestop ran > /marker/prestop"]
  volumes:
  - name: settings
    configMap: {{name: settings}}
  - name: creds
    secret: {{secretName: creds}}
  - name: marker
    hostPath: {{path: {marker}, type: Directory}}
"#,
        node = c.nodes[1],
        marker = marker_dir.display()
    ));
    let cfg = Config { c, marker_dir };
    crate::scenarios!(&cfg;
        the_app_sees_its_configmap_and_secret_in_env_and_volumes,
        a_configmap_update_reaches_the_running_containers_volume_without_a_restart,
        graceful_deletion_runs_prestop_then_sigterm_within_the_grace_period,
    );
}

/// `kubectl logs app` with extra `args`: its stdout.
fn app_logs(c: &Cluster, args: &[&str]) -> String {
    String::from_utf8_lossy(&c.kubectl(&[&["logs", "app"][..], args].concat()).stdout).to_string()
}

/// The app runs, with the ConfigMap and Secret values in its env and its volumes.
fn the_app_sees_its_configmap_and_secret_in_env_and_volumes(x: &Config) {
    let c = &x.c;
    c.until(60, "the app to run", || {
        app_logs(c, &[]).contains("now blue s3cret")
    });
    assert!(c.ok(&["logs", "app"]).contains("env blue s3cret"));
}

/// Updates reach the running container's volumes (env stays as it was started).
fn a_configmap_update_reaches_the_running_containers_volume_without_a_restart(x: &Config) {
    let c = &x.c;
    c.apply(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\ndata:\n  colour: green\n",
    );
    c.until(40, "the ConfigMap update in the volume", || {
        app_logs(c, &["--tail=2"]).contains("now green s3cret")
    });
    let restarts = c.jsonpath(
        &["get", "pod", "app"],
        "{.status.containerStatuses[0].restartCount}",
    );
    assert_eq!(restarts, "0", "an update does not restart the container");
}

/// Graceful deletion: preStop runs, then SIGTERM (which the script traps to exit), so the pod
/// goes well within its 20 s grace.
fn graceful_deletion_runs_prestop_then_sigterm_within_the_grace_period(x: &Config) {
    let c = &x.c;
    let t0 = Instant::now();
    c.ok(&["delete", "pod", "app", "--wait=false"]);
    c.until(30, "the pod to disappear", || {
        !c.ok(&["get", "pods", "-o", "name"]).contains("pod/app")
    });
    let took = t0.elapsed();
    assert_eq!(
        std::fs::read_to_string(x.marker_dir.join("prestop"))
            .unwrap_or_default()
            .trim(),
        "prestop ran"
    );
    assert!(
        took < Duration::from_secs(15),
        "deleted within its grace period ({took:?})"
    );
    let events = c.ok(&[
        "get",
        "events",
        "--field-selector",
        "involvedObject.name=app",
    ]);
    assert!(events.contains("Killing"), "{events}");
}

/// (container ID, restarts) of every container of the pods with `selector`, by pod name.
fn containers(c: &Cluster, selector: &str) -> BTreeMap<String, String> {
    c.ok(&[
        "get",
        "pods",
        "-l",
        selector,
        "-o",
        "jsonpath={range .items[*]}{.metadata.name}={.status.containerStatuses[0].containerID}/{.status.containerStatuses[0].restartCount}{\"\\n\"}{end}",
    ])
    .lines()
    .filter_map(|l| l.split_once('=').map(|(a, b)| (a.to_string(), b.to_string())))
    .collect()
}

fn node_ready(c: &Cluster, node: &str) -> String {
    c.jsonpath(
        &["get", "node", node],
        "{.status.conditions[?(@.type==\"Ready\")].status}",
    )
}

#[test]
fn restarts_and_lost_nodes() {
    // A short grace period needs a lease renewed more often than kubelet's every 10 s (as
    // in kube: the grace period must exceed the renew interval): 8 s lease, renewed every 2 s.
    let c = Cluster::up_with(
        "fail",
        2,
        &[
            "--node-monitor-grace-period=6s",
            "--default-not-ready-toleration-seconds=2",
            "--default-unreachable-toleration-seconds=2",
        ],
        &["--node-lease-duration=8s"],
    );
    c.apply(&web(4));
    let pods = c.wait_ready("app=web", 4, 90);
    assert!(pods.iter().any(|p| p.1 == c.nodes[0]) && pods.iter().any(|p| p.1 == c.nodes[1]));
    let before = containers(&c, "app=web");

    // An agent killed and started again adopts its pods: same containers, no restarts.
    c.lab("stop", &c.nodes[0]);
    std::thread::sleep(Duration::from_secs(1));
    c.lab("start", &c.nodes[0]);
    std::thread::sleep(Duration::from_secs(3));
    c.wait_ready("app=web", 4, 60);
    assert_eq!(
        containers(&c, "app=web"),
        before,
        "the restarted agent adopted its pods"
    );
    assert!(
        c.log(&c.nodes[0]).contains("adopt"),
        "the agent log says it adopted"
    );

    // The server away for a minute: pods keep running untouched; the agents reconnect.
    c.lab("stop", "server");
    let answer = |ip: &str| {
        let o = c.node_exec(
            &c.nodes[0],
            &[
                "timeout",
                "5",
                "/bin/busybox",
                "wget",
                "-qO-",
                &format!("{ip}:8080"),
            ],
        );
        String::from_utf8_lossy(&o.stdout).to_string()
    };
    std::thread::sleep(Duration::from_secs(60));
    for p in &pods {
        assert!(
            answer(&p.2).contains("hello from"),
            "{} still serves while the server is away",
            p.0
        );
    }
    c.lab("start", "server");
    c.until(60, "both nodes Ready again", || {
        c.nodes.iter().all(|n| node_ready(&c, n) == "True")
    });
    c.wait_ready("app=web", 4, 60);
    assert_eq!(containers(&c, "app=web"), before, "nothing restarted");
    // The agents converge on changes made after the server came back.
    c.ok(&["scale", "deployment", "web", "--replicas=6"]);
    c.wait_ready("app=web", 6, 60);

    // A node whose agent stops turns NotReady; its pods come back on the other node.
    c.lab("stop", &c.nodes[1]);
    c.until(40, "node2 to turn NotReady", || {
        node_ready(&c, &c.nodes[1]) != "True"
    });
    c.until(90, "six ready pods, all on node1", || {
        let now = c.pods("app=web");
        now.len() == 6 && now.iter().all(|p| p.3 && p.1 == c.nodes[0])
    });
}
