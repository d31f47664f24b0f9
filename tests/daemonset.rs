//! deploy/keelson-proxy.yaml in a lab whose agents run no proxy of their own: the DaemonSet
//! controller places one proxy pod per node, each talks to the API server with the in-cluster
//! configuration (its service account's projected token, the cluster CA, the namespace), RBAC
//! lets it read exactly Services and EndpointSlices, and it programs the node so that a
//! Service's ClusterIP answers.
//!
//! deploy/keelson-agent.yaml in a lab: the agent pod beside node1's agent registers
//! `node1-keelson` with the in-cluster configuration and runs a pod bound to it on its own
//! containerd namespace and bridge; the pod answers across nodes and through a Service, and
//! `kubectl logs`/`exec` reach it through the extra kubelet API with the API server's client
//! certificate.
mod common;

use std::{path::Path, process::Command};

use common::{Kubectl, cluster::Cluster};

/// The debug binary without its debug sections, packed as keelson.local/keelson:0.1.
fn keelson_image(dir: &Path) -> std::path::PathBuf {
    let small = dir.join("keelson");
    let o = Command::new("objcopy")
        .args(["--strip-debug", env!("CARGO_BIN_EXE_keelson")])
        .arg(&small)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "objcopy: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let ar = dir.join("keelson-image.tar");
    let o = Command::new(env!("CARGO_BIN_EXE_keelson"))
        .args(["image", "self", "--binary"])
        .arg(&small)
        .arg("-o")
        .arg(&ar)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "image self: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    ar
}

/// Imports keelson's image into every node's containerd namespace.
fn import_keelson(c: &Cluster) {
    let ar = keelson_image(c.dir.path());
    let sock = c.lab_dir().join("containerd/containerd.sock");
    for n in &c.nodes {
        let o = Command::new(env!("CARGO_BIN_EXE_keelson"))
            .args(["image", "import", "--containerd"])
            .arg(&sock)
            .args(["--containerd-namespace", n])
            .arg(&ar)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "import: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

#[test]
fn the_proxy_daemonset_runs_with_in_cluster_config() {
    let c = Cluster::up_with("ds", 2, &[], &["--proxy-mode=none"]);
    import_keelson(&c);
    crate::scenarios!(&c;
        the_proxy_daemonset_places_a_ready_pod_with_a_projected_token_on_each_node,
        a_service_is_programmed_by_the_daemonsets_proxies_only,
        the_proxys_account_reads_services_but_not_pods_or_secrets,
    );
}

/// deploy/keelson-proxy.yaml places a ready proxy pod on each node, with the projected service
/// account volume the admission added.
fn the_proxy_daemonset_places_a_ready_pod_with_a_projected_token_on_each_node(c: &Cluster) {
    let manifest = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/keelson-proxy.yaml"),
    )
    .unwrap();
    c.apply(&manifest);
    // No proxy serves the `kubernetes` Service before this one runs: it talks to the server
    // directly, as a kube-proxy bootstrap does.
    c.ok(&[
        "-n",
        "kube-system",
        "set",
        "env",
        "daemonset/keelson-proxy",
        "KUBERNETES_SERVICE_HOST=10.250.0.1",
        "KUBERNETES_SERVICE_PORT=6443",
    ]);
    c.until(120, "a ready proxy pod on each node", || {
        c.jsonpath(
            &["-n", "kube-system", "get", "daemonset", "keelson-proxy"],
            "{.status.numberReady}/{.status.desiredNumberScheduled}",
        ) == "2/2"
    });
    // The pod got the projected service account volume the admission added.
    let vols = c.jsonpath(
        &[
            "-n",
            "kube-system",
            "get",
            "pods",
            "-l",
            "app.kubernetes.io/name=keelson-proxy",
        ],
        "{.items[0].spec.volumes[*].name}",
    );
    assert!(vols.contains("kube-api-access-"), "{vols}");
}

/// A Service, programmed by the DaemonSet's proxies only (the agents run none). Builds on the
/// proxy DaemonSet.
fn a_service_is_programmed_by_the_daemonsets_proxies_only(c: &Cluster) {
    c.apply(&common::web(2, Some("ClusterIP")));
    c.wait_ready("app=web", 2, 90);
    let ip = c.jsonpath(&["get", "service", "web"], "{.spec.clusterIP}");
    c.until(30, "the ClusterIP to answer from node1", || {
        let o = c.node_exec(
            &c.nodes[0],
            &[
                "timeout",
                "3",
                "/bin/busybox",
                "wget",
                "-qO-",
                &format!("http://{ip}/"),
            ],
        );
        String::from_utf8_lossy(&o.stdout).starts_with("hello from web-")
    });
    // node2's proxy programs it too — in its own time: `set env` rolled the DaemonSet, and a
    // hostNetwork replacement can start while the old pod still holds the health check port
    // (kube's DaemonSet controller does not wait either), so it may be in back-off for a while.
    c.until(90, "node2's table to hold the Service", || {
        let o = Command::new("ip")
            .args([
                "netns",
                "exec",
                &c.nodes[1],
                "nft",
                "list",
                "table",
                "ip",
                "keelson",
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).contains(&ip)
    });
}

/// RBAC: the proxy's account reads Services but not Pods or Secrets. (Builds on the proxy
/// DaemonSet's service account.)
fn the_proxys_account_reads_services_but_not_pods_or_secrets(c: &Cluster) {
    let req = c.dir.path().join("token-request.json");
    std::fs::write(
        &req,
        r#"{"apiVersion":"authentication.k8s.io/v1","kind":"TokenRequest","spec":{"expirationSeconds":3600}}"#,
    )
    .unwrap();
    let out = c.ok(&[
        "create",
        "--raw",
        "/api/v1/namespaces/kube-system/serviceaccounts/keelson-proxy/token",
        "-f",
        req.to_str().unwrap(),
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let token = v["status"]["token"].as_str().unwrap().to_string();
    let as_proxy = |args: &[&str]| {
        let mut a = vec!["--token", token.as_str()];
        a.extend_from_slice(args);
        c.kubectl(&a)
    };
    let o = as_proxy(&["get", "services", "-A"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = as_proxy(&["get", "pods"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains(
            "User \"system:serviceaccount:kube-system:keelson-proxy\" cannot list resource \"pods\""
        ),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = as_proxy(&["-n", "kube-system", "delete", "service", "kube-dns"]);
    assert!(!o.status.success());
}

/// A lab with deploy/keelson-agent.yaml applied: an extra agent pod beside node1's agent,
/// registering `node1-keelson`.
struct Extra {
    c: Cluster,
    /// The extra node's name.
    extra: String,
}

impl Extra {
    /// node1's InternalIP.
    fn node1_ip(&self) -> String {
        self.c.jsonpath(
            &["get", "node", &self.c.nodes[0]],
            r#"{.status.addresses[?(@.type=="InternalIP")].address}"#,
        )
    }

    /// The extra node's pod CIDR.
    fn cidr(&self) -> String {
        self.c
            .jsonpath(&["get", "node", &self.extra], "{.spec.podCIDR}")
    }
}

#[test]
fn the_agent_daemonset_runs_an_extra_node() {
    let c = Cluster::up("dsa", 2, &[]);
    import_keelson(&c);
    // The extra agent's host paths live in the test's directory; its data directory carries
    // the busybox image, imported at start into its containerd namespace.
    let sock = c.lab_dir().join("containerd/containerd.sock");
    // Under the lab's directory, so that `lab down` also unmounts whatever a failed run leaves.
    let data = c.lab_dir().join("extra-data");
    let logs = c.lab_dir().join("extra-logs");
    std::fs::create_dir_all(data.join("images")).unwrap();
    std::fs::copy(
        c.dir.path().join("images/busybox.tar"),
        data.join("images/busybox.tar"),
    )
    .unwrap();
    let manifest = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/keelson-agent.yaml"),
    )
    .unwrap()
    .replace("/run/containerd/containerd.sock", sock.to_str().unwrap())
    .replace("/var/lib/keelson-x", data.to_str().unwrap())
    .replace("/var/log/pods", logs.to_str().unwrap())
    // One extra node, beside node1, from the start.
    .replace(
        "      hostNetwork: true\n",
        &format!(
            "      hostNetwork: true\n      nodeSelector:\n        kubernetes.io/hostname: {}\n",
            c.nodes[0]
        ),
    );
    assert!(manifest.contains("nodeSelector"));
    c.apply(&manifest);
    let extra = format!("{}-keelson", c.nodes[0]);
    let x = Extra { c, extra };
    crate::scenarios!(&x;
        the_extra_node_becomes_ready_with_its_hosts_address_and_a_pod_cidr,
        the_extra_agent_acts_as_its_node_and_its_token_cannot_touch_another,
        the_agent_daemonset_avoids_the_extra_node_and_is_ready,
        a_pod_bound_to_the_extra_node_gets_an_address_in_its_cidr,
        the_extra_nodes_cidr_is_routed_via_node1_and_on_its_own_bridge,
        the_extra_pod_answers_from_node2_at_its_address_and_through_its_service,
        logs_and_exec_reach_the_extra_pod_through_the_extra_kubelet_api,
        the_extra_kubelet_api_accepts_only_the_api_servers_client_certificate,
        the_deleted_pod_goes_and_so_does_the_agent_pod,
    );
}

/// The extra node registers and turns Ready, with its host's address, the extra label and a
/// pod CIDR.
fn the_extra_node_becomes_ready_with_its_hosts_address_and_a_pod_cidr(x: &Extra) {
    let (c, extra) = (&x.c, x.extra.as_str());
    c.until(120, "the extra node to be Ready", || {
        let o = c.kubectl(&[
            "get",
            "node",
            extra,
            "-o",
            r#"jsonpath={.status.conditions[?(@.type=="Ready")].status}"#,
        ]);
        o.status.success() && String::from_utf8_lossy(&o.stdout) == "True"
    });
    let node1_ip = x.node1_ip();
    assert_eq!(
        c.jsonpath(
            &["get", "node", extra],
            r#"{.status.addresses[?(@.type=="InternalIP")].address}"#,
        ),
        node1_ip,
        "the extra node has its host's address"
    );
    assert_eq!(
        c.jsonpath(
            &["get", "node", extra],
            r#"{.metadata.labels.node\.keelson\.dev/extra}"#
        ),
        "true"
    );
    let cidr = x.cidr();
    assert!(!cidr.is_empty(), "the extra node got a pod CIDR");
}

/// The agent acts as its node (a certificate from its TLS bootstrap); its service account may
/// only ask for that certificate, so a stolen token cannot touch any node.
fn the_extra_agent_acts_as_its_node_and_its_token_cannot_touch_another(x: &Extra) {
    let c = &x.c;
    assert!(
        c.ok(&["get", "csr"])
            .contains("system:serviceaccount:kube-system:keelson-agent"),
        "{}",
        c.ok(&["get", "csr"])
    );
    let req = c.dir.path().join("agent-token.json");
    std::fs::write(
        &req,
        r#"{"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {"expirationSeconds": 600}}"#,
    )
    .unwrap();
    let out = c.ok(&[
        "create",
        "--raw",
        "/api/v1/namespaces/kube-system/serviceaccounts/keelson-agent/token",
        "-f",
        req.to_str().unwrap(),
    ]);
    let token: serde_json::Value = serde_json::from_str(&out).unwrap();
    let token = format!("--token={}", token["status"]["token"].as_str().unwrap());
    let o = c.kubectl(&[&token, "label", "node", &c.nodes[1], "owned=yes"]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("forbidden"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// The DaemonSet avoids the extra node (no agent for the agent), and its pod is ready.
fn the_agent_daemonset_avoids_the_extra_node_and_is_ready(x: &Extra) {
    let c = &x.c;
    c.until(60, "the agent DaemonSet ready on node1 only", || {
        c.jsonpath(
            &["-n", "kube-system", "get", "daemonset", "keelson-agent"],
            "{.status.numberReady}/{.status.desiredNumberScheduled}",
        ) == "1/1"
    });
}

/// A pod bound to the extra node, and a Service in front of it: the pod's address is in the
/// extra node's CIDR. (The later scenarios build on this pod.)
fn a_pod_bound_to_the_extra_node_gets_an_address_in_its_cidr(x: &Extra) {
    let (c, extra) = (&x.c, x.extra.as_str());
    c.apply(&format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: extra
  labels: {{app: extra}}
spec:
  nodeSelector: {{kubernetes.io/hostname: {extra}}}
  terminationGracePeriodSeconds: 2
  containers:
  - name: httpd
    image: {busybox}
    command: ["sh", "-c", "echo hello from $(hostname) > /www/index.html; echo serving; exec httpd -f -p 8080 -h /www"]
    readinessProbe:
      tcpSocket: {{port: 8080}}
      periodSeconds: 1
---
apiVersion: v1
kind: Service
metadata:
  name: extra
spec:
  selector: {{app: extra}}
  ports:
  - port: 80
    targetPort: 8080
"#,
        busybox = common::BUSYBOX
    ));
    c.wait_ready("app=extra", 1, 90);
    let pod_ip = c.jsonpath(&["get", "pod", "extra"], "{.status.podIP}");
    let cidr = x.cidr();
    let net: ipnet::Ipv4Net = cidr.parse().unwrap();
    assert!(
        net.contains(&pod_ip.parse::<std::net::Ipv4Addr>().unwrap()),
        "{pod_ip} in {cidr}"
    );
}

/// node2 routes the extra node's CIDR via node1; node1 has it on the extra bridge (and one
/// Service route still).
fn the_extra_nodes_cidr_is_routed_via_node1_and_on_its_own_bridge(x: &Extra) {
    let c = &x.c;
    let (cidr, node1_ip) = (x.cidr(), x.node1_ip());
    let routes = |n: &str| {
        String::from_utf8_lossy(
            &Command::new("ip")
                .args(["-n", n, "route", "show"])
                .output()
                .unwrap()
                .stdout,
        )
        .to_string()
    };
    assert!(
        routes(&c.nodes[1]).contains(&format!("{cidr} via {node1_ip}")),
        "{}",
        routes(&c.nodes[1])
    );
    let r1 = routes(&c.nodes[0]);
    assert!(r1.contains(&format!("{cidr} dev keelson-x0")), "{r1}");
    assert_eq!(
        r1.matches("10.96.0.0/12").count(),
        1,
        "one Service route: {r1}"
    );
}

/// The extra pod answers from node2, at its own address and through its Service.
fn the_extra_pod_answers_from_node2_at_its_address_and_through_its_service(x: &Extra) {
    let c = &x.c;
    let pod_ip = c.jsonpath(&["get", "pod", "extra"], "{.status.podIP}");
    let svc = c.jsonpath(&["get", "service", "extra"], "{.spec.clusterIP}");
    for to in [format!("{pod_ip}:8080"), svc] {
        c.until(30, &format!("{to} to answer from node2"), || {
            let o = c.node_exec(
                &c.nodes[1],
                &[
                    "timeout",
                    "3",
                    "/bin/busybox",
                    "wget",
                    "-qO-",
                    &format!("http://{to}/"),
                ],
            );
            String::from_utf8_lossy(&o.stdout).starts_with("hello from extra")
        });
    }
}

/// The extra kubelet API, reached with the API server's client certificate.
fn logs_and_exec_reach_the_extra_pod_through_the_extra_kubelet_api(x: &Extra) {
    let c = &x.c;
    assert!(c.ok(&["logs", "extra"]).contains("serving"));
    assert_eq!(
        c.ok(&["exec", "extra", "--", "cat", "/www/index.html"])
            .trim(),
        "hello from extra"
    );
}

/// Client certificates from the cluster CA: the API server's kubelet client passes, another
/// identity the same CA signed (a node's) does not; without a credential the extra kubelet API
/// answers only /healthz.
fn the_extra_kubelet_api_accepts_only_the_api_servers_client_certificate(x: &Extra) {
    let c = &x.c;
    let node1_ip = x.node1_ip();
    let pki = c.lab_dir().join("server/pki");
    let node_cert = c.lab_dir().join("node-client");
    let sh = |cmd: &str| {
        let o = Command::new("sh").args(["-c", cmd]).output().unwrap();
        assert!(
            o.status.success(),
            "{cmd}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    sh(&format!(
        "openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
           -subj '/O=system:nodes/CN=system:node:{n}' -keyout {k}.key -out {k}.csr && \
         printf 'extendedKeyUsage=clientAuth\n' > {k}.ext && \
         openssl x509 -req -in {k}.csr -CA {p}/ca.crt -CAkey {p}/ca.key -CAcreateserial \
           -days 1 -extfile {k}.ext -out {k}.crt",
        n = c.nodes[1],
        k = node_cert.display(),
        p = pki.display()
    ));
    // The extra kubelet API's answer to /pods from node2, with curl's extra arguments.
    let status = |extra: &[&str]| {
        let url = format!("https://{node1_ip}:10251/pods");
        let mut args = vec!["timeout", "5", "curl", "-sk"];
        args.extend_from_slice(extra);
        args.extend(["-o", "/dev/null", "-w", "%{http_code}", url.as_str()]);
        String::from_utf8_lossy(&c.node_exec(&c.nodes[1], &args).stdout).to_string()
    };
    let with_cert = |crt: &str, key: &str| status(&["--cert", crt, "--key", key]);
    assert_eq!(
        with_cert(
            pki.join("kubelet-client.crt").to_str().unwrap(),
            pki.join("kubelet-client.key").to_str().unwrap()
        ),
        "200"
    );
    let nc = node_cert.display().to_string();
    assert_eq!(with_cert(&format!("{nc}.crt"), &format!("{nc}.key")), "401");
    // Without a credential the extra kubelet API answers only /healthz.
    assert_eq!(status(&[]), "401");
}

/// Deleted, the pod goes (the extra agent finishes the delete), and so does its container;
/// the agent DaemonSet deleted, its pod goes.
fn the_deleted_pod_goes_and_so_does_the_agent_pod(x: &Extra) {
    let c = &x.c;
    c.ok(&["delete", "pod", "extra", "--wait=true", "--timeout=60s"]);
    c.ok(&["-n", "kube-system", "delete", "daemonset", "keelson-agent"]);
    c.until(60, "the agent pod to go", || {
        c.ok(&[
            "-n",
            "kube-system",
            "get",
            "pods",
            "-l",
            "app.kubernetes.io/name=keelson-agent",
            "-o",
            "name",
        ])
        .trim()
        .is_empty()
    });
}
