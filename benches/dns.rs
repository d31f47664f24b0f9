//! `cargo bench --bench dns`: the node's cluster DNS with DNS_SERVICES (10,000) Services, in a
//! 1-node `keelson lab` (its namespaces, removed at the end) with a fake upstream on the lab
//! bridge. The agent runs on core 1, Debian's `dnsperf` on core 0. Prints `dns` lines:
//! queries per second and p50/p99 latency for cluster names and for cached forwarded names,
//! against a floor measured in the same run (a UDP responder on the same core that copies
//! the question into a canned answer: the socket cost with no DNS work); the time from a
//! Service's creation through the API to its first answer; the agent's RSS growth.

#[path = "../tests/common/mod.rs"]
mod common;

use std::{
    net::UdpSocket,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use common::{
    Kubectl,
    cluster::Cluster,
    dns::FakeUpstream,
    floor::{pct, rss_kib},
};
use k8s_openapi::api::core::v1::Service;
use kube::{Api, api::PostParams};

const DNS: &str = "10.96.0.10";
const NS: &str = "dnsbench";

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// dnsperf in the node's namespace on core 0; its stdout.
fn dnsperf(node: &str, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", node, "taskset", "-c", "0", "dnsperf"])
        .args(args)
        .output()
        .expect("dnsperf (Debian's dnsperf package) runs");
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// (queries per second, queries lost) from dnsperf's summary.
fn qps(out: &str) -> (f64, String) {
    let field = |label: &str| {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(label))
            .unwrap_or("?")
            .trim()
            .to_string()
    };
    let q = field("Queries per second:").parse().unwrap_or(0.0);
    (q, field("Queries lost:"))
}

/// p50/p99 (ms) of the latencies `dnsperf -v` reports per query.
fn latency(out: &str) -> (f64, f64) {
    let mut v: Vec<f64> = out
        .lines()
        .filter(|l| l.starts_with("> "))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|s| s * 1000.0)
        .collect();
    assert!(
        !v.is_empty(),
        "no per-query latencies from dnsperf -v:\n{out}"
    );
    (pct(&mut v, 0.5), pct(&mut v, 0.99))
}

/// Throughput and latency of one query file against `server:port`.
fn measure(
    node: &str,
    file: &str,
    server: &str,
    port: &str,
    secs: usize,
) -> (f64, String, f64, f64) {
    let s = secs.to_string();
    let base = ["-s", server, "-p", port, "-d", file];
    let out = dnsperf(
        node,
        &[&base[..], &["-l", &s, "-c", "4", "-q", "256"]].concat(),
    );
    let (q, lost) = qps(&out);
    // Latency at a fixed, moderate load (a saturated server's latency is its queue).
    let out = dnsperf(
        node,
        &[&base[..], &["-l", "3", "-Q", "20000", "-v"]].concat(),
    );
    let (p50, p99) = latency(&out);
    (q, lost, p50, p99)
}

/// The floor: on core 1 in the node's namespace, a UDP loop answering every query with its
/// own question and one A record, without parsing anything.
fn floor(node: &str) -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let (node, stop2) = (node.to_string(), stop.clone());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::os::fd::AsFd;
        let f = std::fs::File::open(format!("/run/netns/{node}")).unwrap();
        nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let mut cpus = nix::sched::CpuSet::new();
        cpus.set(1).unwrap();
        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &cpus).unwrap();
        let s = UdpSocket::bind("127.0.0.1:5353").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        tx.send(()).unwrap();
        let mut buf = [0u8; 512];
        while !stop2.load(Ordering::Relaxed) {
            let Ok((n, peer)) = s.recv_from(&mut buf) else {
                continue;
            };
            if n < 12 || n + 16 > buf.len() {
                continue;
            }
            // QR, RA; one answer: a pointer to the question's name, A IN, TTL 5, 10.96.0.20.
            buf[2] |= 0x80;
            buf[3] = 0x80;
            buf[6..8].copy_from_slice(&1u16.to_be_bytes());
            buf[8..12].fill(0);
            let rr = [0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 5, 0, 4, 10, 96, 0, 20];
            buf[n..n + 16].copy_from_slice(&rr);
            let _ = s.send_to(&buf[..n + 16], peer);
        }
    });
    rx.recv_timeout(Duration::from_secs(5)).unwrap();
    stop
}

/// A UDP query from the node's namespace until `name` answers with `ip` (or `gone`: NXDOMAIN);
/// polled every millisecond, at most 3 s.
fn until_answer(node: &str, name: &str, want_answer: bool) -> Duration {
    use hickory_proto::{
        op::{Message, Query, ResponseCode},
        rr::{Name, RecordType},
    };
    common::in_netns(node, || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        let mut q = Message::query();
        q.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
        let b = q.to_vec().unwrap();
        let t0 = Instant::now();
        let mut buf = [0u8; 1024];
        while t0.elapsed() < Duration::from_secs(3) {
            s.send_to(&b, (DNS, 53)).unwrap();
            if let Ok(n) = s.recv(&mut buf)
                && let Ok(r) = Message::from_vec(&buf[..n])
            {
                let answered = r.response_code == ResponseCode::NoError && !r.answers.is_empty();
                if answered == want_answer {
                    return t0.elapsed();
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        panic!(
            "{name} never {}",
            if want_answer { "answered" } else { "went" }
        );
    })
}

fn service(name: &str) -> Service {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "namespace": NS},
        "spec": {"ports": [{"name": "http", "port": 80}]},
    }))
    .unwrap()
}

/// Creates `n` Services, 16 at a time.
async fn create_services(api: &Api<Service>, n: usize) {
    use futures::StreamExt;
    futures::stream::iter(0..n)
        .map(|i| {
            let api = api.clone();
            async move {
                api.create(&PostParams::default(), &service(&format!("svc{i}")))
                    .await
                    .unwrap()
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
}

/// The zone's Service count from the node's metrics.
fn zone_services(c: &Cluster) -> usize {
    let out = c.node_exec(
        &c.nodes[0],
        &["wget", "-qO-", &format!("http://{DNS}:9153/metrics")],
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("keelson_dns_services "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn main() {
    let n = env_or("DNS_SERVICES", 10_000);
    let secs = env_or("DNS_SECONDS", 10);
    // DNS_AGENT_ARGS, e.g. "--proxy-mode=none": the DNS's own memory without the proxy's.
    let extra = std::env::var("DNS_AGENT_ARGS").unwrap_or_default();
    let agent_args: Vec<&str> = extra.split_whitespace().collect();
    let c = Cluster::up_lab(
        "dnsbench",
        1,
        &["--dns-upstream=10.250.0.1"],
        &[],
        &agent_args,
    );
    let _up = FakeUpstream::start(&format!("{}-bridge", c.name), "10.250.0.1");
    let node = c.nodes[0].clone();
    let agent = c.agent_pids()[0].1;
    let pinned = Command::new("taskset")
        .args(["-a", "-p", "-c", "1", &agent.to_string()])
        .output()
        .unwrap();
    assert!(pinned.status.success(), "taskset the agent");
    c.ok(&["create", "namespace", NS]);
    std::thread::sleep(Duration::from_secs(2));
    let base = zone_services(&c);
    let rss0 = rss_kib(agent);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let api: Api<Service> = rt.block_on(async {
        Api::namespaced(
            keelson::control::client_from(&c.kubeconfig())
                .await
                .unwrap(),
            NS,
        )
    });
    let t0 = Instant::now();
    rt.block_on(create_services(&api, n));
    c.until(120, "the zone to hold every Service", || {
        zone_services(&c) >= base + n
    });
    eprintln!(
        "dns: {n} Services created and in the zone in {:?}",
        t0.elapsed()
    );
    std::thread::sleep(Duration::from_secs(2));
    let rss1 = rss_kib(agent);

    let dir = c.dir.path();
    let cluster_file = dir.join("cluster-names.txt");
    let names: String = (0..n)
        .map(|i| format!("svc{i}.{NS}.svc.cluster.local A\n"))
        .collect();
    std::fs::write(&cluster_file, names).unwrap();
    let fwd_file = dir.join("forwarded-names.txt");
    let names: String = (0..1000)
        .map(|i| format!("host{i}.example.com A\n"))
        .collect();
    std::fs::write(&fwd_file, names).unwrap();
    let (cf, ff) = (
        cluster_file.to_str().unwrap().to_string(),
        fwd_file.to_str().unwrap().to_string(),
    );

    let stop = floor(&node);
    let (fq, flost, f50, f99) = measure(&node, &cf, "127.0.0.1", "5353", secs);
    stop.store(true, Ordering::Relaxed);
    let (q, lost, p50, p99) = measure(&node, &cf, DNS, "53", secs);
    println!(
        "dns cluster names ({n} Services, server on one core): {q:.0} queries/s (lost {lost}), p50 {p50:.3} ms, p99 {p99:.3} ms at 20k q/s; floor (canned UDP answers) {fq:.0} queries/s (lost {flost}), p50 {f50:.3} ms, p99 {f99:.3} ms; {:.2}x the floor's rate",
        q / fq.max(1.0)
    );
    // Forwarded names: one pass fills the cache, then the cached names are measured.
    dnsperf(&node, &["-s", DNS, "-d", &ff, "-n", "1"]);
    let (q, lost, p50, p99) = measure(&node, &ff, DNS, "53", secs);
    println!(
        "dns forwarded names (1000, cached): {q:.0} queries/s (lost {lost}), p50 {p50:.3} ms, p99 {p99:.3} ms at 20k q/s"
    );

    let rounds = env_or("DNS_CREATE_ROUNDS", 50);
    let mut create = vec![];
    let mut delete = vec![];
    for i in 0..rounds {
        let name = format!("fresh{i}");
        let fqdn = format!("{name}.{NS}.svc.cluster.local.");
        let t0 = Instant::now();
        rt.block_on(api.create(&PostParams::default(), &service(&name)))
            .unwrap();
        let posted = t0.elapsed();
        create.push((posted + until_answer(&node, &fqdn, true)).as_secs_f64() * 1000.0);
        let t0 = Instant::now();
        rt.block_on(api.delete(&name, &Default::default())).unwrap();
        let posted = t0.elapsed();
        delete.push((posted + until_answer(&node, &fqdn, false)).as_secs_f64() * 1000.0);
    }
    println!(
        "dns Service create → first answer (through the API, {rounds} Services): p50 {:.1} ms, p99 {:.1} ms; delete → NXDOMAIN p50 {:.1} ms, p99 {:.1} ms",
        pct(&mut create, 0.5),
        pct(&mut create, 0.99),
        pct(&mut delete, 0.5),
        pct(&mut delete, 0.99)
    );
    println!(
        "dns agent RSS with {n} Services: {:.1} MiB → {:.1} MiB (+{:.1} MiB{})",
        rss0 as f64 / 1024.0,
        rss1 as f64 / 1024.0,
        (rss1 as f64 - rss0 as f64) / 1024.0,
        if extra.is_empty() {
            "; proxy and DNS together".to_string()
        } else {
            format!("; agent flags {extra}")
        }
    );
}
