//! deploy/keelson-proxy.yaml in a lab whose agents run no proxy of their own: the DaemonSet
//! controller places one proxy pod per node, each talks to the API server with the in-cluster
//! configuration (its service account's projected token, the cluster CA, the namespace), RBAC
//! lets it read exactly Services and EndpointSlices, and it programs the node so that a
//! Service's ClusterIP answers.
mod common;

use std::{path::Path, process::Command};

use common::cluster::Cluster;

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

#[test]
fn the_proxy_daemonset_runs_with_in_cluster_config() {
    let c = Cluster::up_with("ds", 2, &[], &["--proxy-mode=none"]);
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

    // A Service, programmed by the DaemonSet's proxies only.
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
    assert!(
        String::from_utf8_lossy(&o.stdout).contains(&ip),
        "node2's table holds the Service"
    );

    // RBAC: the proxy's account reads Services but not Pods or Secrets.
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
