//! The seeds' blue/green exercise, end to end in a 2-node `keelson lab` with kubectl: two
//! Deployments answer their colour, a NodePort Service selecting `version: blue` answers blue
//! through its ClusterIP and its node port; patching the selector to green turns every new
//! request green within a couple of seconds; blue scaled to zero leaves green serving. A pod
//! reaches the app by the Service's name too (`http://web/`, through the cluster DNS).
mod common;

use std::time::Instant;

use common::{BUSYBOX, Kubectl, cluster::Cluster};

fn deployment(colour: &str) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: {colour}
spec:
  replicas: 2
  selector:
    matchLabels: {{app: web, version: {colour}}}
  template:
    metadata:
      labels: {{app: web, version: {colour}}}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
      - name: httpd
        image: {BUSYBOX}
        command: ["sh", "-c", "echo {colour} > /www/index.html; exec httpd -f -p 8080 -h /www"]
        readinessProbe:
          httpGet: {{path: /, port: 8080}}
          periodSeconds: 1
"#
    )
}

const SERVICE: &str = r#"apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  type: NodePort
  selector: {app: web, version: blue}
  ports:
  - {port: 80, targetPort: 8080, nodePort: 30090}
"#;

/// Ten GETs from node1's namespace: the answers (failures left out).
fn answers(c: &Cluster, url: &str) -> Vec<String> {
    (0..10)
        .filter_map(|_| {
            let o = c.node_exec(
                &c.nodes[0],
                &["timeout", "5", "/bin/busybox", "wget", "-qO-", url],
            );
            o.status
                .success()
                .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
        })
        .collect()
}

/// Ten GETs of `http://web/` from the `client` pod: the Service by its DNS name.
fn answers_by_name(c: &Cluster) -> Vec<String> {
    let out = c.kubectl(&[
        "exec",
        "client",
        "--",
        "sh",
        "-c",
        "for i in 1 2 3 4 5 6 7 8 9 10; do timeout 5 wget -qO- http://web/; done",
    ]);
    if !out.status.success() {
        eprintln!("by name: {}", String::from_utf8_lossy(&out.stderr));
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().to_string())
        .collect()
}

const CLIENT: &str = r#"apiVersion: v1
kind: Pod
metadata:
  name: client
  labels: {app: client}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: c
    image: BUSYBOX
    command: ["sleep", "3600"]
"#;

fn all(v: &[String], colour: &str) -> bool {
    v.len() == 10 && v.iter().all(|a| a == colour)
}

#[test]
fn blue_green_switch_through_the_service() {
    let c = Cluster::up("bluegreen", 2, &[]);
    c.apply(&deployment("blue"));
    c.apply(&deployment("green"));
    c.apply(SERVICE);
    c.apply(&CLIENT.replace("BUSYBOX", BUSYBOX));
    c.wait_ready("app=web", 4, 90);
    c.wait_ready("app=client", 1, 90);
    let vip = c.jsonpath(&["get", "svc", "web"], "{.spec.clusterIP}");
    let cluster_ip = format!("http://{vip}/");
    // node2's address: the node port answers on every node.
    let node_port = "http://10.250.0.12:30090/";
    c.until(30, "the Service to answer blue", || {
        all(&answers(&c, &cluster_ip), "blue")
    });
    assert!(
        all(&answers(&c, node_port), "blue"),
        "the NodePort answers blue"
    );
    let by_name = answers_by_name(&c);
    assert!(all(&by_name, "blue"), "by name: {by_name:?}");

    // Switch: every new request is green shortly after the patch.
    c.ok(&[
        "patch",
        "svc",
        "web",
        "-p",
        r#"{"spec":{"selector":{"app":"web","version":"green"}}}"#,
    ]);
    let t0 = Instant::now();
    c.until(10, "the Service to answer green", || {
        all(&answers(&c, &cluster_ip), "green")
    });
    eprintln!(
        "blue → green through the ClusterIP after {:?}",
        t0.elapsed()
    );
    assert!(all(&answers(&c, node_port), "green"));
    c.until(10, "the Service to answer green by name", || {
        all(&answers_by_name(&c), "green")
    });

    // Blue goes away; green keeps serving.
    c.ok(&["scale", "deployment", "blue", "--replicas=0"]);
    c.until(40, "blue's pods to be gone", || {
        c.ok(&["get", "pods", "-l", "version=blue", "-o", "name"])
            .trim()
            .is_empty()
    });
    assert!(all(&answers(&c, &cluster_ip), "green"));
    assert!(all(&answers(&c, node_port), "green"));
}
