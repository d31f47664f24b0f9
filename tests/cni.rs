//! `keelson agent --network cni` in a lab, with Debian's containernetworking-plugins and the
//! shipped `cni/10-keelson.conflist` (its host-local state kept in the test's directory): pods
//! get addresses from their node's pod CIDR on the plugins' `cni0` bridge, reach each other
//! across nodes and through a Service, and give their address back when deleted; an agent
//! restart adopts its pods (CNI CHECK passes) with the same addresses.
mod common;

use std::process::Command;

use common::{Kubectl, cluster::Cluster};

#[test]
fn pods_are_networked_by_cni_plugins() {
    let tmp = tempfile::tempdir().unwrap();
    let conf_dir = tmp.path().join("net.d");
    let ipam_dir = tmp.path().join("ipam");
    std::fs::create_dir_all(&conf_dir).unwrap();
    let shipped = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("cni/10-keelson.conflist"),
    )
    .unwrap();
    let mut conf: serde_json::Value = serde_json::from_str(&shipped).unwrap();
    conf["plugins"][0]["ipam"]["dataDir"] = ipam_dir.to_string_lossy().into();
    std::fs::write(conf_dir.join("10-keelson.conflist"), conf.to_string()).unwrap();
    let c = Cluster::up_with(
        "cni",
        2,
        &[],
        &[
            "--network=cni",
            &format!("--cni-conf-dir={}", conf_dir.display()),
        ],
    );
    c.apply(&common::web(4, Some("ClusterIP")));
    let pods = c.wait_ready("app=web", 4, 120);
    // Addresses from each node's pod CIDR, on the plugins' bridge.
    for (name, node, ip, _) in &pods {
        let cidr = c.jsonpath(&["get", "node", node], "{.spec.podCIDR}");
        let net: ipnet::Ipv4Net = cidr.parse().unwrap();
        assert!(
            net.contains(&ip.parse::<std::net::Ipv4Addr>().unwrap()),
            "{name} on {node}: {ip} is in {cidr}"
        );
        assert!(
            ipam_dir.join("keelson").join(ip).exists(),
            "host-local holds {ip} for {name}"
        );
    }
    for n in &c.nodes {
        let o = Command::new("ip")
            .args(["-n", n, "-o", "link", "show", "cni0"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{n} has the cni0 bridge");
    }
    // Pod to pod across nodes, and through the Service.
    let (a, b) = (
        pods.iter()
            .find(|p| p.1 == c.nodes[0])
            .expect("a pod on node1"),
        pods.iter()
            .find(|p| p.1 == c.nodes[1])
            .expect("a pod on node2"),
    );
    let fetch = |from: &str, url: &str| {
        c.kubectl(&["exec", from, "--", "timeout", "5", "wget", "-qO-", url])
    };
    let o = fetch(&a.0, &format!("http://{}:8080/", b.2));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains(&format!("hello from {}", b.0)),
        "{} reaches {} across nodes: {}",
        a.0,
        b.0,
        String::from_utf8_lossy(&o.stderr)
    );
    let vip = c.jsonpath(&["get", "service", "web"], "{.spec.clusterIP}");
    let o = fetch(&b.0, &format!("http://{vip}/"));
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("hello from web-"));

    // An agent restart adopts its pods (CNI CHECK of each) with the same addresses.
    let ids = || {
        c.sorted_words(
            &["get", "pods", "-l", "app=web"],
            "{.items[*].status.containerStatuses[0].containerID}",
        )
    };
    let ids_before = ids();
    let before = c.pods("app=web");
    c.lab("stop", &c.nodes[0]);
    c.lab("start", &c.nodes[0]);
    std::thread::sleep(std::time::Duration::from_secs(3));
    let after = c.wait_ready("app=web", 4, 60);
    let mut b1: Vec<_> = before.iter().map(|p| (&p.0, &p.2)).collect();
    let mut a1: Vec<_> = after.iter().map(|p| (&p.0, &p.2)).collect();
    b1.sort();
    a1.sort();
    assert_eq!(a1, b1, "same pods, same addresses");
    assert_eq!(
        ids(),
        ids_before,
        "the same containers, adopted, not recreated"
    );
    let held = std::fs::read_dir(ipam_dir.join("keelson"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("10."))
        .count();
    assert_eq!(
        held, 4,
        "host-local holds the four pods' addresses, no more"
    );

    // Scaled down: the deleted pods' addresses go back to host-local.
    c.ok(&["scale", "deployment", "web", "--replicas=1"]);
    c.until(60, "three addresses released", || {
        std::fs::read_dir(ipam_dir.join("keelson"))
            .map(|d| {
                d.flatten()
                    .filter(|e| e.file_name().to_string_lossy().starts_with("10."))
                    .count()
            })
            .unwrap_or(0)
            == 1
    });
}
