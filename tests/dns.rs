//! Cluster DNS on a 2-node `keelson lab`, asked with the real `dig` (Debian's bind9-dnsutils)
//! in the node namespaces and busybox `nslookup`/`wget` in pods: each record type of the
//! Kubernetes DNS specification, the pods' resolv.conf, hostname and /etc/hosts, search-path
//! resolution of a short name, a hostNetwork pod with ClusterFirstWithHostNet, forwarding to a
//! fake upstream on the lab bridge (cache, TCP after truncation), a Service answering within a
//! second of its creation, and names still answered while the API server is away.
mod common;

use std::time::{Duration, Instant};

use common::{
    BUSYBOX, Kubectl,
    cluster::Cluster,
    dns::{BIG, FakeUpstream, WWW, dig, status},
};

const DNS: &str = "@10.96.0.10";
/// The lab's bridge namespace address, where the fake upstream listens.
const UPSTREAM: &str = "10.250.0.1";

fn workloads() -> String {
    let sleeper = |name: &str, node: usize, extra: &str| {
        format!(
            r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}
  labels: {{app: {name}}}
spec:
  nodeName: NODE{node}
  terminationGracePeriodSeconds: 1
{extra}
  containers:
  - name: c
    image: {BUSYBOX}
    command: ["sleep", "3600"]
---
"#
        )
    };
    let db = |i: usize| {
        format!(
            r#"apiVersion: v1
kind: Pod
metadata:
  name: db-{i}
  labels: {{app: db}}
spec:
  nodeName: NODE{node}
  hostname: db-{i}
  subdomain: db
  terminationGracePeriodSeconds: 1
  containers:
  - name: c
    image: {BUSYBOX}
    command: ["sh", "-c", "echo db-{i} > /www/index.html; exec httpd -f -p 5432 -h /www"]
    ports: [{{name: pg, containerPort: 5432}}]
---
"#,
            node = i + 1
        )
    };
    let mut y = String::new();
    y += &sleeper(
        "client",
        1,
        "  hostAliases:\n  - ip: 10.1.2.3\n    hostnames: [foo.local, bar.local]",
    );
    y += &sleeper("client2", 2, "");
    y += &sleeper(
        "hostnet",
        2,
        "  hostNetwork: true\n  dnsPolicy: ClusterFirstWithHostNet",
    );
    y += &db(0);
    y += &db(1);
    y += &format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  replicas: 2
  selector:
    matchLabels: {{app: web}}
  template:
    metadata:
      labels: {{app: web}}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
      - name: httpd
        image: {BUSYBOX}
        command: ["sh", "-c", "echo web > /www/index.html; exec httpd -f -p 8080 -h /www"]
        ports: [{{name: http, containerPort: 8080}}]
---
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  selector: {{app: web}}
  ports:
  - {{name: http, port: 80, targetPort: http}}
---
apiVersion: v1
kind: Service
metadata:
  name: db
spec:
  clusterIP: None
  selector: {{app: db}}
  ports:
  - {{name: pg, port: 5432, targetPort: pg}}
---
apiVersion: v1
kind: Service
metadata:
  name: ext
spec:
  type: ExternalName
  externalName: www.example.com
"#
    );
    y
}

struct Lab {
    c: Cluster,
    up: FakeUpstream,
    web_ip: String,
    /// (pod, ip) of db-0 and db-1.
    db: Vec<(String, String)>,
}

impl Lab {
    /// `dig @10.96.0.10 ARGS +short` from node `i`'s namespace, as sorted lines.
    fn short(&self, node: usize, args: &[&str]) -> Vec<String> {
        let mut a = vec![DNS];
        a.extend_from_slice(args);
        a.push("+short");
        let mut v: Vec<String> = dig(&self.c.nodes[node], &a)
            .lines()
            .map(str::to_string)
            .collect();
        v.sort();
        v
    }
    fn full(&self, node: usize, args: &[&str]) -> String {
        let mut a = vec![DNS];
        a.extend_from_slice(args);
        dig(&self.c.nodes[node], &a)
    }
    fn exec(&self, pod: &str, cmd: &[&str]) -> String {
        let mut a = vec!["exec", pod, "--"];
        a.extend_from_slice(cmd);
        self.c.ok(&a)
    }
}

#[test]
fn cluster_dns_on_every_node() {
    let c = Cluster::up_lab("dns", 2, &[&format!("--dns-upstream={UPSTREAM}")], &[], &[]);
    let up = FakeUpstream::start(&format!("{}-bridge", c.name), UPSTREAM);
    let y = workloads()
        .replace("NODE1", &c.nodes[0])
        .replace("NODE2", &c.nodes[1]);
    c.apply(&y);
    c.wait_ready("app=web", 2, 90);
    c.wait_ready("app=db", 2, 90);
    for p in ["client", "client2", "hostnet"] {
        c.wait_ready(&format!("app={p}"), 1, 90);
    }
    let web_ip = c.jsonpath(&["get", "svc", "web"], "{.spec.clusterIP}");
    let db = ["db-0", "db-1"]
        .iter()
        .map(|p| {
            (
                p.to_string(),
                c.jsonpath(&["get", "pod", p], "{.status.podIP}"),
            )
        })
        .collect();
    let lab = Lab { c, up, web_ip, db };
    crate::scenarios!(&lab;
        the_kube_dns_service_exists_on_the_tenth_address,
        pods_on_both_nodes_resolve_a_service_and_its_short_name,
        cluster_ip_service_a_srv_ptr_and_negative_answers,
        headless_service_names_its_endpoints_by_hostname,
        external_name_and_pod_records,
        pods_get_kubelets_resolv_conf_hostname_and_hosts,
        a_host_network_pod_with_cluster_first_with_host_net_uses_the_cluster_dns,
        other_names_go_to_the_upstream_cached_and_over_tcp_when_truncated,
        a_new_service_answers_within_a_second_and_is_gone_after_deletion,
        the_metrics_count_requests_and_cache_hits,
        names_still_resolve_while_the_api_server_is_away,
    );
}

fn the_kube_dns_service_exists_on_the_tenth_address(l: &Lab) {
    let ip = l.c.jsonpath(
        &["get", "svc", "-n", "kube-system", "kube-dns"],
        "{.spec.clusterIP}",
    );
    assert_eq!(ip, "10.96.0.10");
}

fn pods_on_both_nodes_resolve_a_service_and_its_short_name(l: &Lab) {
    for pod in ["client", "client2"] {
        let out = l.exec(pod, &["nslookup", "web.default.svc.cluster.local"]);
        assert!(out.contains(&l.web_ip), "{pod}: {out}");
        // The short name through the search path, and the Service answering by it.
        assert_eq!(l.exec(pod, &["wget", "-qO-", "http://web/"]).trim(), "web");
    }
}

fn cluster_ip_service_a_srv_ptr_and_negative_answers(l: &Lab) {
    for node in 0..2 {
        assert_eq!(
            l.short(node, &["web.default.svc.cluster.local"]),
            vec![l.web_ip.clone()]
        );
    }
    // Case-insensitive.
    assert_eq!(
        l.short(0, &["WEB.Default.SVC.cluster.LOCAL"]),
        vec![l.web_ip.clone()]
    );
    assert_eq!(
        l.short(0, &["_http._tcp.web.default.svc.cluster.local", "SRV"]),
        ["0 100 80 web.default.svc.cluster.local."]
    );
    assert_eq!(
        l.short(0, &["-x", &l.web_ip]),
        ["web.default.svc.cluster.local."]
    );
    let nx = l.full(0, &["nope.default.svc.cluster.local"]);
    assert_eq!(status(&nx), "NXDOMAIN", "{nx}");
    assert!(nx.contains("SOA"), "negative answers carry the SOA: {nx}");
    // The name exists, without an AAAA: NOERROR with no answer.
    let nodata = l.full(0, &["web.default.svc.cluster.local", "AAAA"]);
    assert_eq!(status(&nodata), "NOERROR", "{nodata}");
    assert!(nodata.contains("ANSWER: 0"), "{nodata}");
    assert_eq!(
        l.short(0, &["dns-version.cluster.local", "TXT"]),
        ["\"1.1.0\""]
    );
    // Over TCP too.
    assert_eq!(
        l.short(1, &["+tcp", "web.default.svc.cluster.local"]),
        vec![l.web_ip.clone()]
    );
}

fn headless_service_names_its_endpoints_by_hostname(l: &Lab) {
    let mut ips: Vec<String> = l.db.iter().map(|d| d.1.clone()).collect();
    ips.sort();
    assert_eq!(l.short(1, &["db.default.svc.cluster.local"]), ips);
    for (pod, ip) in &l.db {
        assert_eq!(
            l.short(1, &[&format!("{pod}.db.default.svc.cluster.local")]),
            vec![ip.clone()]
        );
        assert_eq!(
            l.short(0, &["-x", ip]),
            [format!("{pod}.db.default.svc.cluster.local.")]
        );
    }
    assert_eq!(
        l.short(0, &["_pg._tcp.db.default.svc.cluster.local", "SRV"]),
        [
            "0 50 5432 db-0.db.default.svc.cluster.local.",
            "0 50 5432 db-1.db.default.svc.cluster.local."
        ]
    );
    // From a pod, by the pod's own FQDN.
    let out = l.exec("client2", &["wget", "-qO-", "http://db-0.db:5432/"]);
    assert_eq!(out.trim(), "db-0");
}

fn external_name_and_pod_records(l: &Lab) {
    // The CNAME, and its target resolved through the upstream.
    assert_eq!(
        l.short(0, &["ext.default.svc.cluster.local"]),
        [WWW.to_string(), "www.example.com.".to_string()]
    );
    let (_, ip) = &l.db[0];
    let dashed = ip.replace('.', "-");
    assert_eq!(
        l.short(0, &[&format!("{dashed}.default.pod.cluster.local")]),
        vec![ip.clone()]
    );
}

fn pods_get_kubelets_resolv_conf_hostname_and_hosts(l: &Lab) {
    let r = l.exec("client", &["cat", "/etc/resolv.conf"]);
    assert_eq!(
        r,
        "search default.svc.cluster.local svc.cluster.local cluster.local\nnameserver 10.96.0.10\noptions ndots:5\n"
    );
    let hosts = l.exec("client", &["cat", "/etc/hosts"]);
    assert!(hosts.contains("10.1.2.3\tfoo.local\tbar.local"), "{hosts}");
    assert_eq!(l.exec("db-0", &["hostname"]).trim(), "db-0");
    let hosts = l.exec("db-0", &["cat", "/etc/hosts"]);
    assert!(
        hosts.contains(&format!(
            "{}\tdb-0.db.default.svc.cluster.local\tdb-0",
            l.db[0].1
        )),
        "{hosts}"
    );
}

fn a_host_network_pod_with_cluster_first_with_host_net_uses_the_cluster_dns(l: &Lab) {
    let r = l.exec("hostnet", &["cat", "/etc/resolv.conf"]);
    assert!(r.contains("nameserver 10.96.0.10"), "{r}");
    let out = l.exec("hostnet", &["nslookup", "web.default.svc.cluster.local"]);
    assert!(out.contains(&l.web_ip), "{out}");
}

fn other_names_go_to_the_upstream_cached_and_over_tcp_when_truncated(l: &Lab) {
    let before = l.up.asked();
    assert_eq!(l.short(0, &["fwd.example.com"]), [WWW]);
    let after_first = l.up.asked();
    assert!(after_first > before, "the upstream was asked");
    // Cached: the upstream is not asked again.
    assert_eq!(l.short(0, &["fwd.example.com"]), [WWW]);
    assert_eq!(l.up.asked(), after_first);
    // NXDOMAIN from upstream is passed on.
    assert_eq!(status(&l.full(0, &["nothing.example.org"])), "NXDOMAIN");
    // Truncated over UDP: the node asks again over TCP and has the whole answer.
    let tcp_before = l.up.tcp.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(l.short(1, &["big.example.com"]).len(), BIG);
    assert!(l.up.tcp.load(std::sync::atomic::Ordering::Relaxed) > tcp_before);
    // A pod resolves an outside name through its node.
    let out = l.exec("client", &["nslookup", "pod.example.com"]);
    assert!(out.contains(WWW), "{out}");
}

fn a_new_service_answers_within_a_second_and_is_gone_after_deletion(l: &Lab) {
    l.c.apply(
        "apiVersion: v1\nkind: Service\nmetadata: {name: fresh}\nspec:\n  ports: [{port: 80}]\n",
    );
    let t0 = Instant::now();
    let ip = l.c.jsonpath(&["get", "svc", "fresh"], "{.spec.clusterIP}");
    let q = ["+time=1", "fresh.default.svc.cluster.local"];
    while l.short(1, &q) != [ip.clone()] {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "fresh never resolved"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = t0.elapsed();
    eprintln!("dns: Service create → resolvable on node2 in {took:?}");
    assert!(took < Duration::from_secs(1), "{took:?}");
    l.c.ok(&["delete", "svc", "fresh"]);
    let t0 = Instant::now();
    while status(&l.full(1, &q)) != "NXDOMAIN" {
        assert!(t0.elapsed() < Duration::from_secs(5), "fresh still answers");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
}

fn the_metrics_count_requests_and_cache_hits(l: &Lab) {
    let out = l.c.node_exec(
        &l.c.nodes[0],
        &["wget", "-qO-", "http://10.96.0.10:9153/metrics"],
    );
    let m = String::from_utf8_lossy(&out.stdout);
    let value = |prefix: &str| -> f64 {
        m.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{prefix} not in metrics:\n{m}"))
    };
    assert!(
        value(
            "coredns_dns_requests_total{server=\"dns://:53\",zone=\".\",proto=\"udp\",type=\"A\"}"
        ) >= 5.0
    );
    assert!(
        value("coredns_dns_responses_total{server=\"dns://:53\",zone=\".\",rcode=\"NXDOMAIN\"}")
            >= 1.0
    );
    assert!(value("coredns_cache_hits_total{type=\"success\"}") >= 1.0);
    assert!(value("coredns_forward_requests_total{to=\"10.250.0.1:53\"}") >= 1.0);
    assert!(value("keelson_dns_services") >= 4.0);
}

fn names_still_resolve_while_the_api_server_is_away(l: &Lab) {
    l.c.lab("stop", "server");
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(30) {
        for node in 0..2 {
            assert_eq!(
                l.short(node, &["web.default.svc.cluster.local"]),
                vec![l.web_ip.clone()],
                "after {:?} without the server",
                t0.elapsed()
            );
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    l.c.lab("start", "server");
    l.c.until(30, "the API server back", || {
        l.c.kubectl(&["get", "nodes"]).status.success()
    });
}
