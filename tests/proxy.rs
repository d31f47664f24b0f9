//! The service proxy in a 2-node `keelson lab`, the same suite of scenarios on both backends
//! (iptables and nftables), driven with kubectl, in this order: a ClusterIP balances over every
//! ready endpoint, from a node and from a pod; a NodePort answers on the other node; external
//! traffic policy Local keeps traffic on the node, and a Local LoadBalancer's health check port
//! counts the node's endpoints; internal traffic policy Local keeps a node's own traffic on its
//! pods; external IPs, ingress IPs, named target ports and SCTP are programmed; session
//! affinity sticks; readiness loss removes an endpoint; flushed rules are repaired, an agent
//! restart keeps them; a removed endpoint's UDP flows leave conntrack; scaling to zero makes
//! connections fail at once; and `keelson proxy --cleanup` removes them all.
mod common;

use std::{
    collections::BTreeSet,
    process::Command,
    time::{Duration, Instant},
};

use common::{BUSYBOX, Kubectl, cluster::Cluster};

const WEB: &str = r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  replicas: 4
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
      - name: httpd
        image: IMAGE
        command: ["sh", "-c", "echo $(hostname) > /www/index.html; touch /tmp/ready; exec httpd -f -p 8080 -h /www"]
        ports:
        - {name: http-alt, containerPort: 8080}
        readinessProbe:
          exec: {command: ["test", "-f", "/tmp/ready"]}
          periodSeconds: 1
---
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  type: NodePort
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: 8080, nodePort: 30080}
"#;

/// GET from a node's namespace: (answer, how long it took); None if it failed.
fn get(c: &Cluster, node: &str, url: &str) -> (Option<String>, Duration) {
    let t0 = Instant::now();
    let o = c.node_exec(node, &["timeout", "5", "/bin/busybox", "wget", "-qO-", url]);
    let took = t0.elapsed();
    (
        o.status
            .success()
            .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string()),
        took,
    )
}

fn answers(c: &Cluster, node: &str, url: &str, n: usize) -> Vec<String> {
    (0..n).filter_map(|_| get(c, node, url).0).collect()
}

fn in_node(node: &str, cmd: &[&str]) -> (bool, String) {
    let o = Command::new("ip")
        .args(["netns", "exec", node])
        .args(cmd)
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).to_string(),
    )
}

fn iptables_save(node: &str) -> String {
    in_node(node, &["iptables-save"]).1
}

/// The elements of the nftables `vip-dispatch` map (Services with endpoints; those without
/// are in `no-endpoint-vips`).
fn dispatch(rules: &str) -> &str {
    let Some(start) = rules.find("map vip-dispatch {") else {
        return "";
    };
    let rest = &rules[start..];
    &rest[..rest.find("\n\t}").unwrap_or(rest.len())]
}

/// What differs between the backends: where the rules are read, how they look, how someone
/// breaks them.
#[derive(Clone, Copy, PartialEq)]
enum Backend {
    Iptables,
    Nftables,
}

impl Backend {
    fn rules(self, node: &str) -> String {
        match self {
            Backend::Iptables => iptables_save(node),
            Backend::Nftables => in_node(node, &["nft", "list", "table", "ip", "keelson"]).1,
        }
    }
    /// The rules send the ClusterIP somewhere.
    fn programmed(self, rules: &str, vip: &str) -> bool {
        match self {
            Backend::Iptables => rules.contains(&format!("-A KUBE-SERVICES -d {vip}/32")),
            Backend::Nftables => {
                rules.contains("vmap @vip-dispatch")
                    && dispatch(rules).contains(&format!("{vip} . tcp . 80"))
            }
        }
    }
    fn affinity(self, rules: &str) -> bool {
        match self {
            Backend::Iptables => rules.contains("--rcheck --seconds 10800"),
            Backend::Nftables => rules.contains("update @affinity-"),
        }
    }
    fn udp(self, rules: &str, vip: std::net::Ipv4Addr) -> bool {
        match self {
            Backend::Iptables => rules.contains(&format!("-d {vip}/32 -p udp")),
            Backend::Nftables => dispatch(rules).contains(&format!("{vip} . udp . 53")),
        }
    }
    /// Someone flushes the chain that dispatches Service traffic.
    /// Flushes the Service dispatch chain and returns the rules read right after it (in the
    /// same shell, so the proxy's periodic resync rarely gets in between).
    fn flush(self, node: &str) -> String {
        let cmd = match self {
            Backend::Iptables => "iptables -w -t nat -F KUBE-SERVICES && iptables-save",
            Backend::Nftables => "nft flush chain ip keelson services && nft list table ip keelson",
        };
        let (ok, rules) = in_node(node, &["sh", "-c", cmd]);
        assert!(ok, "{cmd}");
        rules
    }
    /// The hooks into the kernel's chains appear once each.
    fn hooks_once(self, node: &str) {
        let rules = self.rules(node);
        match self {
            Backend::Iptables => assert_eq!(
                rules
                    .matches("-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES")
                    .count(),
                1,
                "{rules}"
            ),
            Backend::Nftables => {
                assert_eq!(rules.matches("jump services").count(), 2, "{rules}");
                assert_eq!(rules.matches("hook prerouting").count(), 1, "{rules}");
            }
        }
    }
    fn mode(self) -> &'static str {
        match self {
            Backend::Iptables => "--proxy-mode=iptables",
            Backend::Nftables => "--proxy-mode=nftables",
        }
    }
}

/// A raw HTTP GET to `ip:port` from namespace `from`: the whole response, or "" if refused.
fn http_raw(from: &str, ip: &str, port: u16) -> String {
    let to: std::net::SocketAddr = format!("{ip}:{port}").parse().unwrap();
    common::in_netns(from, || {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(2)) else {
            return String::new();
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
        let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nHost: lb\r\n\r\n");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    })
}

/// Sends `n` datagrams to `ip:port` from the namespace `node`, each from a fresh socket.
fn send_udp(node: &str, ip: std::net::Ipv4Addr, port: u16, n: usize) {
    common::in_netns(node, || {
        for _ in 0..n {
            let sock = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
            let _ = sock.send_to(b"query", (ip, port));
        }
    });
}

#[test]
fn services_on_iptables() {
    suite(Backend::Iptables, "pxipt");
}

#[test]
fn services_on_nftables() {
    suite(Backend::Nftables, "pxnft");
}

/// node2's NodePort, asked from node1.
const NODE_PORT: &str = "http://10.250.0.12:30080/";

/// The lab the suite runs on: the `web` Deployment's four ready pods behind the NodePort
/// Service `web`, and the backend the agents program.
struct Proxy {
    c: Cluster,
    be: Backend,
    /// The web pods as they were first ready: (name, node, ip, ready).
    pods: Vec<(String, String, String, bool)>,
    names: BTreeSet<String>,
    vip: String,
    /// The ClusterIP's URL.
    url: String,
}

impl Proxy {
    fn n1(&self) -> &str {
        &self.c.nodes[0]
    }

    fn n2(&self) -> &str {
        &self.c.nodes[1]
    }

    /// The first web pods that run on node2.
    fn local(&self) -> BTreeSet<String> {
        self.pods
            .iter()
            .filter(|p| p.1 == self.n2())
            .map(|p| p.0.clone())
            .collect()
    }

    /// The `lb` Service's health check node port.
    fn hc(&self) -> u16 {
        self.c
            .jsonpath(&["get", "svc", "lb"], "{.spec.healthCheckNodePort}")
            .parse()
            .expect("a health check node port is allocated")
    }
}

fn suite(be: Backend, hint: &str) {
    let c = Cluster::up_with(hint, 2, &[], &["--sync-period=3s", be.mode()]);
    c.apply(&WEB.replace("IMAGE", BUSYBOX));
    let pods = c.wait_ready("app=web", 4, 90);
    let names: BTreeSet<String> = pods.iter().map(|p| p.0.clone()).collect();
    let vip = c.jsonpath(&["get", "svc", "web"], "{.spec.clusterIP}");
    let url = format!("http://{vip}:80/");
    let p = Proxy {
        c,
        be,
        pods,
        names,
        vip,
        url,
    };
    crate::scenarios!(&p;
        the_cluster_ip_balances_over_the_pods_from_a_node,
        a_pod_on_node2_reaches_the_cluster_ip,
        a_node_port_answers_on_the_other_node,
        external_traffic_policy_local_answers_only_with_the_nodes_pods,
        a_local_load_balancer_reports_local_endpoints_on_its_health_check_port,
        internal_traffic_policy_local_keeps_a_nodes_traffic_on_its_pods,
        external_ips_ingress_ips_named_ports_and_sctp_are_programmed,
        session_affinity_sends_one_client_to_one_pod,
        a_pod_that_loses_readiness_leaves_the_service,
        flushed_rules_are_repaired_by_the_periodic_sync,
        an_agent_restart_keeps_the_service_and_does_not_duplicate_rules,
        udp_flows_to_a_removed_endpoint_are_deleted_from_conntrack,
        scaled_to_zero_connections_fail_at_once,
        proxy_cleanup_removes_everything_the_proxy_installed,
    );
}

/// ClusterIP from a node: every answer is one of the pods, and several pods answer; only one
/// backend programs the node.
fn the_cluster_ip_balances_over_the_pods_from_a_node(p: &Proxy) {
    let (c, be, n1, url) = (&p.c, p.be, p.n1(), p.url.as_str());
    let mut seen = BTreeSet::new();
    c.until(30, "the ClusterIP to answer", || {
        get(c, n1, url).0.is_some()
    });
    for a in answers(c, n1, url, 40) {
        assert!(p.names.contains(&a), "{a} is not a web pod");
        seen.insert(a);
    }
    assert!(seen.len() >= 3, "40 requests reached only {seen:?}");
    let rules = be.rules(n1);
    assert!(be.programmed(&rules, &p.vip), "{rules}");
    let other = match be {
        Backend::Iptables => in_node(n1, &["nft", "list", "table", "ip", "keelson"]).0,
        Backend::Nftables => iptables_save(n1).contains("KUBE-SVC-"),
    };
    assert!(!other, "only one backend programs the node");
}

/// From a pod on node2 (pod → node → DNAT → maybe the other node).
fn a_pod_on_node2_reaches_the_cluster_ip(p: &Proxy) {
    let (c, n2, url) = (&p.c, p.n2(), p.url.as_str());
    c.ok(&[
        "run",
        "client",
        &format!("--image={BUSYBOX}"),
        "--restart=Never",
        &format!("--overrides={{\"spec\":{{\"nodeName\":\"{n2}\"}}}}"),
        "--",
        "sh",
        "-c",
        &format!("for i in $(seq 20); do timeout 5 wget -qO- {url}; done"),
    ]);
    c.until(60, "the client pod to finish", || {
        c.jsonpath(&["get", "pod", "client"], "{.status.phase}") == "Succeeded"
    });
    let from_pod: BTreeSet<String> = c
        .ok(&["logs", "client"])
        .lines()
        .map(str::to_string)
        .collect();
    assert!(
        from_pod.len() >= 2 && from_pod.is_subset(&p.names),
        "from a pod: {from_pod:?}"
    );
}

/// NodePort: node1 asks node2's address.
fn a_node_port_answers_on_the_other_node(p: &Proxy) {
    let a = answers(&p.c, p.n1(), NODE_PORT, 10);
    assert_eq!(a.len(), 10, "every NodePort request is answered: {a:?}");
}

/// externalTrafficPolicy: Local: node2's NodePort answers only with node2's pods. (The policy
/// stays Local until the session affinity scenario.)
fn external_traffic_policy_local_answers_only_with_the_nodes_pods(p: &Proxy) {
    let (c, n1) = (&p.c, p.n1());
    c.ok(&[
        "patch",
        "svc",
        "web",
        "-p",
        "{\"spec\":{\"externalTrafficPolicy\":\"Local\"}}",
    ]);
    let local = p.local();
    let pods = &p.pods;
    assert!(!local.is_empty(), "some pod runs on node2: {pods:?}");
    c.until(20, "NodePort answers only from node2's pods", || {
        let a: BTreeSet<String> = answers(c, n1, NODE_PORT, 10).into_iter().collect();
        !a.is_empty() && a.is_subset(&local)
    });
}

/// A LoadBalancer with externalTrafficPolicy: Local gets a health check node port on which
/// every node tells whether (and how many) local endpoints it has. (The Service `lb` stays for
/// the scale-to-zero scenario.)
fn a_local_load_balancer_reports_local_endpoints_on_its_health_check_port(p: &Proxy) {
    let (c, n1, n2) = (&p.c, p.n1(), p.n2());
    c.apply(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: lb\nspec:\n  type: LoadBalancer\n  externalTrafficPolicy: Local\n  selector: {app: web}\n  ports:\n  - {name: http, port: 81, targetPort: 8080}\n",
    );
    let hc = p.hc();
    // Counted against node1's pods that are ready at the moment (a readiness flap under load
    // changes the count); the last answer goes into the failure message.
    let t0 = Instant::now();
    loop {
        let on_n1 = c
            .pods("app=web")
            .iter()
            .filter(|p| p.1 == n1 && p.3)
            .count();
        let r = http_raw(n2, "10.250.0.11", hc);
        if on_n1 > 0
            && r.starts_with("HTTP/1.1 200")
            && r.contains(&format!("\"localEndpoints\":{on_n1}"))
        {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "node1's health check port {hc} never counted its {on_n1} ready pods; last answer: {r:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(http_raw(n1, "10.250.0.12", hc).contains("\"name\":\"lb\""));
}

/// internalTrafficPolicy: Local: node2's own ClusterIP traffic reaches only node2's pods.
fn internal_traffic_policy_local_keeps_a_nodes_traffic_on_its_pods(p: &Proxy) {
    let (c, n2, url) = (&p.c, p.n2(), p.url.as_str());
    let local = p.local();
    c.ok(&[
        "patch",
        "svc",
        "web",
        "-p",
        "{\"spec\":{\"internalTrafficPolicy\":\"Local\"}}",
    ]);
    c.until(
        20,
        "the ClusterIP from node2 answers only from node2's pods",
        || {
            let a: BTreeSet<String> = answers(c, n2, url, 10).into_iter().collect();
            !a.is_empty() && a.is_subset(&local)
        },
    );
    c.ok(&[
        "patch",
        "svc",
        "web",
        "-p",
        "{\"spec\":{\"internalTrafficPolicy\":\"Cluster\"}}",
    ]);
}

/// externalIPs and a LoadBalancer's status.loadBalancer.ingress IP are external addresses
/// (lab-only, unowned addresses on the lab's subnet); a named target port is resolved through
/// the EndpointSlice's ports; an SCTP port is programmed (this kernel has SCTP conntrack but no
/// SCTP sockets, so only the rules can be checked).
fn external_ips_ingress_ips_named_ports_and_sctp_are_programmed(p: &Proxy) {
    let (c, be, n1) = (&p.c, p.be, p.n1());
    c.apply(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: ext\nspec:\n  type: LoadBalancer\n  selector: {app: web}\n  externalIPs: [10.250.0.201]\n  ports:\n  - {name: http, port: 82, targetPort: http-alt}\n---\napiVersion: v1\nkind: Service\nmetadata:\n  name: sctp\nspec:\n  selector: {app: web}\n  ports:\n  - {name: s, port: 9999, protocol: SCTP}\n",
    );
    c.ok(&[
        "patch",
        "svc",
        "ext",
        "--subresource=status",
        "--type=merge",
        "-p",
        "{\"status\":{\"loadBalancer\":{\"ingress\":[{\"ip\":\"10.250.0.202\"}]}}}",
    ]);
    for ip in ["10.250.0.201", "10.250.0.202"] {
        let ext = format!("http://{ip}:82/");
        let mut seen = BTreeSet::new();
        c.until(30, &format!("{ip}:82 to answer from several pods"), || {
            seen.extend(answers(c, n1, &ext, 4));
            seen.len() >= 2
        });
        assert!(seen.is_subset(&p.names), "{ip}: {seen:?}");
    }
    let sctp_vip = c.jsonpath(&["get", "svc", "sctp"], "{.spec.clusterIP}");
    c.until(20, "the SCTP port to be programmed", || {
        let rules = be.rules(n1);
        match be {
            Backend::Iptables => rules.lines().any(|l| {
                l.contains(&format!("-d {sctp_vip}/32 -p sctp"))
                    && l.contains("-m sctp --dport 9999")
            }),
            Backend::Nftables => dispatch(&rules).contains(&format!("{sctp_vip} . sctp . 9999")),
        }
    });
    c.ok(&["delete", "svc", "ext", "sctp"]);
}

/// Session affinity: one client, one pod. (Also sets externalTrafficPolicy back to Cluster.)
fn session_affinity_sends_one_client_to_one_pod(p: &Proxy) {
    let (c, be, n1, url) = (&p.c, p.be, p.n1(), p.url.as_str());
    c.ok(&[
        "patch",
        "svc",
        "web",
        "-p",
        "{\"spec\":{\"sessionAffinity\":\"ClientIP\",\"externalTrafficPolicy\":\"Cluster\"}}",
    ]);
    c.until(20, "affinity to be programmed", || {
        be.affinity(&be.rules(n1))
    });
    let a: BTreeSet<String> = answers(c, n1, url, 15).into_iter().collect();
    assert_eq!(a.len(), 1, "with ClientIP affinity one pod answers: {a:?}");
    c.ok(&[
        "patch",
        "svc",
        "web",
        "-p",
        "{\"spec\":{\"sessionAffinity\":\"None\"}}",
    ]);
}

/// Readiness loss removes an endpoint.
fn a_pod_that_loses_readiness_leaves_the_service(p: &Proxy) {
    let (c, n1, url) = (&p.c, p.n1(), p.url.as_str());
    let victim = p.pods[0].0.clone();
    let rm = c.kubectl(&["exec", &victim, "--", "rm", "/tmp/ready"]);
    if !rm.status.success() {
        // Without exec (issue 7), take the pod out by deleting it instead.
        c.ok(&["delete", "pod", &victim, "--wait=false"]);
    }
    c.until(30, "the victim to leave the Service", || {
        let a: BTreeSet<String> = answers(c, n1, url, 12).into_iter().collect();
        !a.is_empty() && !a.contains(&victim)
    });
}

/// Someone flushes the Service chain: the periodic full sync puts it back.
fn flushed_rules_are_repaired_by_the_periodic_sync(p: &Proxy) {
    let (c, be, n1, url) = (&p.c, p.be, p.n1(), p.url.as_str());
    // (The resync runs every 3 s: should it land between the flush and the read, flush again.)
    let flushed = (0..3).any(|_| !be.programmed(&be.flush(n1), &p.vip));
    assert!(flushed, "flushed: the VIP's rule is gone");
    c.until(45, "the flushed rules to be repaired", || {
        get(c, n1, url).0.is_some()
    });
}

/// An agent restart keeps the Service working and does not duplicate rules.
fn an_agent_restart_keeps_the_service_and_does_not_duplicate_rules(p: &Proxy) {
    let (c, be, n1, url) = (&p.c, p.be, p.n1(), p.url.as_str());
    c.lab("stop", n1);
    assert!(get(c, n1, url).0.is_some(), "rules outlive the agent");
    c.lab("start", n1);
    std::thread::sleep(Duration::from_secs(3));
    be.hooks_once(n1);
    assert!(get(c, n1, url).0.is_some());
}

/// UDP: when an endpoint goes, the conntrack entries of flows to it are deleted, so a DNS-like
/// client does not keep sending into a dead pod.
fn udp_flows_to_a_removed_endpoint_are_deleted_from_conntrack(p: &Proxy) {
    let (c, be, n1) = (&p.c, p.be, p.n1());
    c.apply(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: udp\nspec:\n  selector: {app: web}\n  ports:\n  - {name: dns, port: 53, targetPort: 5353, protocol: UDP}\n",
    );
    let uvip: std::net::Ipv4Addr = c
        .jsonpath(&["get", "svc", "udp"], "{.spec.clusterIP}")
        .parse()
        .unwrap();
    c.until(30, "the UDP Service's rules", || {
        be.udp(&be.rules(n1), uvip)
    });
    let conntrack = || {
        String::from_utf8_lossy(
            &Command::new("ip")
                .args(["netns", "exec", n1, "conntrack", "-L", "-p", "udp"])
                .output()
                .unwrap()
                .stdout,
        )
        .to_string()
    };
    let flows_to = |ip: &str| {
        conntrack()
            .lines()
            .filter(|l| l.contains(&format!("dst={uvip} ")) && l.contains(&format!("src={ip} ")))
            .count()
    };
    // Datagrams from node1, each from a new socket (a new flow, a new DNAT choice).
    send_udp(n1, uvip, 53, 24);
    let now = c.pods("app=web");
    let target = now
        .iter()
        .find(|p| flows_to(&p.2) > 0)
        .unwrap_or_else(|| panic!("no UDP flow to any pod:\n{}", conntrack()))
        .clone();
    c.ok(&["delete", "pod", &target.0, "--wait=false"]);
    c.until(30, "the dead endpoint's UDP flows to be deleted", || {
        flows_to(&target.2) == 0
    });
}

/// Scaled to zero: a connection fails at once (no hanging until a timeout), and the health
/// check port of the `lb` Service (made by an earlier scenario) reports no local endpoint.
fn scaled_to_zero_connections_fail_at_once(p: &Proxy) {
    let (c, n1, n2, url) = (&p.c, p.n1(), p.n2(), p.url.as_str());
    let hc = p.hc();
    c.ok(&["scale", "deployment", "web", "--replicas=0"]);
    // Terminating pods still serve (kube-proxy's fallback) until they are gone.
    c.until(40, "every web pod to be gone", || {
        c.ok(&["get", "pods", "-l", "app=web", "-o", "name"])
            .trim()
            .is_empty()
    });
    c.until(20, "the Service to have no endpoints", || {
        get(c, n1, url).0.is_none()
    });
    c.until(20, "the health check to report no local endpoint", || {
        http_raw(n2, "10.250.0.11", hc).starts_with("HTTP/1.1 503")
    });
    let (answer, took) = get(c, n1, url);
    assert!(answer.is_none());
    assert!(
        took < Duration::from_secs(2),
        "rejected at once, took {took:?}"
    );
    let (answer, took) = get(c, n1, NODE_PORT);
    assert!(answer.is_none());
    assert!(
        took < Duration::from_secs(2),
        "NodePort rejected at once, took {took:?}"
    );
}

/// --cleanup removes everything the proxy installed. (Stops node1's agent: runs last.)
fn proxy_cleanup_removes_everything_the_proxy_installed(p: &Proxy) {
    let (c, n1) = (&p.c, p.n1());
    c.lab("stop", n1);
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            n1,
            env!("CARGO_BIN_EXE_keelson"),
            "proxy",
            "--cleanup",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rules = iptables_save(n1);
    assert!(!rules.contains("KUBE-"), "left behind:\n{rules}");
    let (_, ruleset) = in_node(n1, &["nft", "list", "ruleset"]);
    // The proxy's table is gone (the agent's own node table, keelson-node-*, is not the
    // proxy's).
    assert!(
        !ruleset.contains("table ip keelson {"),
        "left behind:\n{ruleset}"
    );
}
