//! `cargo bench --bench proxy_sync -- N`: the service proxy's cost at N Services (3 endpoints
//! each) in a scratch network namespace made for the run (no route out, removed at the end).
//! Prints one `proxy-sync` line per backend: a full sync, and one endpoint change (iptables:
//! from the model to the kernel; nftables: from the EndpointSlice watch event to the kernel,
//! through the proxy's index and incremental table state); the baseline measured in the same run, kube-proxy's iptables layout
//! for the same Services loaded whole with one iptables-restore; and connection setup latency
//! to a Service with 10 and with N Services installed. Needs root.

#[path = "../tests/common/mod.rs"]
mod common;

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, TcpListener, TcpStream},
    process::Command,
    time::{Duration, Instant},
};

use common::floor::pct;

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use keelson::proxy::{
    index, iptables,
    model::{Endpoint, Model, Proto, SERVICE_NAME, ServicePort},
    nftables,
};
use kube::runtime::watcher::Event;

const NETNS: &str = "keelson-bench-proxy";
const PORT: u16 = 18080;

/// When a connection first reached the endpoint a change introduced (10.201.0.4).
static SEEN_NEW: std::sync::Mutex<Option<Instant>> = std::sync::Mutex::new(None);

fn sh(args: &[&str]) {
    let ok = Command::new(args[0])
        .args(&args[1..])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "{args:?} failed");
}

/// N Services with 3 endpoints each; the endpoints are the scratch namespace's own
/// addresses 10.201.0.1-3 (a listener answers on all), so every connection completes.
fn model(n: usize) -> Model {
    let eps: Vec<Endpoint> = (1..=3u8)
        .map(|k| Endpoint {
            ip: Ipv4Addr::new(10, 201, 0, k),
            port: PORT,
            local: true,
        })
        .collect();
    let mut ports = BTreeMap::new();
    for i in 0..n {
        let vip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + 10 + i as u32);
        let name = format!("bench/svc{i}:http");
        ports.insert(
            format!("{name}/TCP"),
            ServicePort {
                name,
                proto: Proto::Tcp,
                cluster_ip: Some(vip),
                port: 80,
                node_port: None,
                external_ips: vec![],
                cluster_endpoints: eps.clone(),
                external_endpoints: eps.clone(),
                external_local: false,
                affinity_seconds: None,
                health_check_node_port: None,
            },
        );
    }
    Model { ports }
}

fn vip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + 10 + i as u32)
}

/// Service `i`'s EndpointSlice, its third endpoint being 10.201.0.`third`.
fn slice(i: usize, third: u8) -> EndpointSlice {
    let eps: Vec<serde_json::Value> = [1, 2, third]
        .iter()
        .map(|k| {
            serde_json::json!({
                "addresses": [format!("10.201.0.{k}")], "conditions": {"ready": true},
                "nodeName": "bench-node"})
        })
        .collect();
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": format!("svc{i}-abcde"), "namespace": "bench",
                     "labels": {SERVICE_NAME: format!("svc{i}")}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": PORT, "protocol": "TCP"}],
        "endpoints": eps,
    }))
    .expect("a valid EndpointSlice")
}

/// The API objects behind [`model`]: N Services and their EndpointSlices.
fn objects(n: usize) -> (Vec<Service>, Vec<EndpointSlice>) {
    let svcs = (0..n)
        .map(|i| {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": format!("svc{i}"), "namespace": "bench"},
                "spec": {"clusterIP": vip(i).to_string(),
                         "ports": [{"name": "http", "port": 80, "targetPort": PORT}]},
            }))
            .expect("a valid Service")
        })
        .collect();
    (svcs, (0..n).map(|i| slice(i, 3)).collect())
}

/// Runs `f` inside the scratch namespace (on a thread of its own).
fn in_ns<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    common::in_netns(NETNS, f)
}

/// The VIP whose rule comes last in KUBE-SERVICES (rules follow the model's key order): the
/// worst case of a linear rule list.
fn last_vip(services: usize) -> Ipv4Addr {
    let m = model(services);
    m.ports
        .values()
        .last()
        .and_then(|p| p.cluster_ip)
        .expect("a service")
}

/// Connection setup to `vip`: p50 over `n` connects (µs).
fn connect_latency(vip: Ipv4Addr, n: usize) -> f64 {
    in_ns(|| {
        let mut v = vec![];
        for _ in 0..n {
            let t0 = Instant::now();
            TcpStream::connect_timeout(&(vip, 80).into(), Duration::from_secs(2))
                .expect("connection to the VIP");
            v.push(t0.elapsed().as_secs_f64() * 1e6);
        }
        pct(&mut v, 0.5)
    })
}

fn main() {
    assert!(nix::unistd::geteuid().is_root(), "proxy_sync needs root");
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(10_000);
    // `-- N nftables`: the nftables backend alone (no iptables runs and no baseline), for
    // working on it; the full run is what the README reports.
    let only_nft = std::env::args().any(|a| a == "nftables");
    let _ = Command::new("ip").args(["netns", "delete", NETNS]).status();
    sh(&["ip", "netns", "add", NETNS]);
    sh(&["ip", "-n", NETNS, "link", "set", "lo", "up"]);
    sh(&[
        "ip", "-n", NETNS, "link", "add", "bench0", "type", "veth", "peer", "name", "bench1",
    ]);
    sh(&["ip", "-n", NETNS, "link", "set", "bench1", "up"]);
    for k in 1..=4 {
        sh(&[
            "ip",
            "-n",
            NETNS,
            "addr",
            "add",
            &format!("10.201.0.{k}/24"),
            "dev",
            "bench0",
        ]);
    }
    sh(&["ip", "-n", NETNS, "link", "set", "bench0", "up"]);
    // Connections to VIPs need a route to leave the socket layer (the proxy translates them in
    // nat OUTPUT).
    sh(&[
        "ip",
        "-n",
        NETNS,
        "route",
        "add",
        "10.96.0.0/12",
        "dev",
        "bench0",
    ]);
    let listener = in_ns(|| TcpListener::bind((Ipv4Addr::UNSPECIFIED, PORT)).unwrap());
    std::thread::spawn(move || {
        for s in listener.incoming() {
            if let Ok(s) = s
                && s.local_addr()
                    .is_ok_and(|a| a.ip() == Ipv4Addr::new(10, 201, 0, 4))
                && let Ok(mut seen) = SEEN_NEW.lock()
            {
                seen.get_or_insert_with(Instant::now);
            }
        }
    });
    let cidr = "10.244.0.0/16".parse().unwrap();

    let ipt = (!only_nft).then(|| {
        // Baseline: kube-proxy's layout for N Services loaded whole with one iptables-restore
        // (the text rendered beforehand, so only the kernel load is timed).
        let full = iptables::render(&model(n), cidr);
        let text = iptables::restore_input(None, &full);
        let baseline = in_ns(|| {
            let t0 = Instant::now();
            iptables::restore(&text).unwrap();
            t0.elapsed()
        });
        in_ns(|| iptables::cleanup().unwrap());

        // keelson's iptables backend: render + delta restore, full sync from empty.
        let (full_ms, one_ms) = in_ns(|| {
            let t0 = Instant::now();
            let r = iptables::render(&model(n), cidr);
            iptables::restore(&iptables::restore_input(None, &r)).unwrap();
            iptables::ensure_jumps().unwrap();
            let full_ms = t0.elapsed().as_secs_f64() * 1000.0;
            // One endpoint changes in one Service: model → rendered → only changed chains loaded.
            let mut m = model(n);
            let p = m.ports.values_mut().nth(n / 2).unwrap();
            p.cluster_endpoints[2].ip = Ipv4Addr::new(10, 201, 0, 4);
            p.external_endpoints = p.cluster_endpoints.clone();
            let t0 = Instant::now();
            let r2 = iptables::render(&m, cidr);
            iptables::restore(&iptables::restore_input(Some(&r), &r2)).unwrap();
            (full_ms, t0.elapsed().as_secs_f64() * 1000.0)
        });
        let conn_n = connect_latency(last_vip(n), 300);
        // The same with 10 Services installed.
        in_ns(|| {
            iptables::cleanup().unwrap();
            let r = iptables::render(&model(10), cidr);
            iptables::restore(&iptables::restore_input(None, &r)).unwrap();
            iptables::ensure_jumps().unwrap();
        });
        let conn_10 = connect_latency(last_vip(10), 300);
        in_ns(|| iptables::cleanup().unwrap());
        // The baseline again: iptables' cost drifts during a run on this machine, so the backend is
        // judged against the baseline on both sides of it.
        let baseline_after = in_ns(|| {
            let t0 = Instant::now();
            iptables::restore(&text).unwrap();
            let t = t0.elapsed();
            iptables::cleanup().unwrap();
            t
        });
        (baseline, full_ms, one_ms, conn_n, conn_10, baseline_after)
    });

    // The nftables backend fed the way the proxy is: watch events into the index, the dirty
    // Services' ports into the incremental table state, one transaction.
    let (nft_full_ms, mut nft_one, mut nft_kernel, mut nft_floor, mut nft_effect) = in_ns(|| {
        nftables::cleanup().unwrap();
        let mut ix = index::Index::new("bench-node", &[]);
        let (svcs, slices) = objects(n);
        ix.service_event(Event::Init);
        for s in svcs {
            ix.service_event(Event::InitApply(s));
        }
        ix.service_event(Event::InitDone);
        ix.slice_event(Event::Init);
        for s in slices {
            ix.slice_event(Event::InitApply(s));
        }
        ix.slice_event(Event::InitDone);
        let t0 = Instant::now();
        let _ = ix.sync();
        let t_index = t0.elapsed();
        let mut st = nftables::State::new(cidr);
        st.reset(&ix.model);
        let t_state = t0.elapsed();
        let batch = st.load(false);
        let t_encode = t0.elapsed();
        batch.commit().unwrap();
        let full_ms = t0.elapsed().as_secs_f64() * 1000.0;
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        println!(
            "proxy-sync services={n} backend=nftables full-sync parts: index_ms={:.0} table_state_ms={:.0} encode_ms={:.0} kernel_ms={:.0}",
            ms(t_index),
            ms(t_state - t_index),
            ms(t_encode - t_state),
            full_ms - ms(t_encode)
        );
        // One endpoint of one Service changes: the EndpointSlice event, as the watch gives it.
        // 21 such changes (different Services), to report the median and the worst.
        let mut total = vec![];
        let mut kernel = vec![];
        let mut effect = vec![];
        for k in 0..21 {
            let i = n / 2 + k * (n / 50).max(1) % n;
            if let Ok(mut seen) = SEEN_NEW.lock() {
                *seen = None;
            }
            let t0 = Instant::now();
            ix.slice_event(Event::Apply(slice(i, 4)));
            let ch = ix.sync();
            let tx = st.update_keys(&ix.model, &ch.keys);
            let t1 = Instant::now();
            // The transaction on a thread of its own (same namespace), while this one connects
            // to the Service until a connection reaches the new endpoint: when the change took
            // effect, as opposed to when the kernel acknowledged it.
            let commit = std::thread::spawn(move || {
                tx.commit().unwrap();
                (Instant::now() - t0, Instant::now() - t1)
            });
            let deadline = Instant::now() + Duration::from_secs(3);
            let seen = loop {
                let _ = TcpStream::connect_timeout(&(vip(i), 80).into(), Duration::from_secs(1));
                if let Some(t) = SEEN_NEW.lock().ok().and_then(|s| *s) {
                    break t;
                }
                assert!(Instant::now() < deadline, "the new endpoint never answered");
            };
            let (acked, tx_time) = commit.join().unwrap();
            total.push(acked.as_secs_f64() * 1000.0);
            kernel.push(tx_time.as_secs_f64() * 1000.0);
            effect.push(seen.duration_since(t0).as_secs_f64() * 1000.0);
        }
        // The kernel's floor for a change: a transaction removing one element of an unused
        // set (a changed endpoint is a removed element plus an added one; nf_tables makes a
        // transaction that removes anything wait a few scheduler ticks, while one that only
        // adds returns at once). The element is added untimed first.
        let mut floor = vec![];
        for k in 0..21u8 {
            let key = vec![99, 0, 0, 0, 0, k, 0, 0];
            let mut b = keelson::net::nft::Batch::new();
            b.add_elems(nftables::TABLE, "no-endpoint-nps", &[(key.clone(), None)]);
            b.commit().unwrap();
            let mut b = keelson::net::nft::Batch::new();
            b.del_elems(nftables::TABLE, "no-endpoint-nps", &[key]);
            let t0 = Instant::now();
            b.commit().unwrap();
            floor.push(t0.elapsed().as_secs_f64() * 1000.0);
        }
        (full_ms, total, kernel, floor, effect)
    });
    let nft_conn_n = connect_latency(last_vip(n), 300);
    in_ns(|| {
        nftables::cleanup().unwrap();
        let r = nftables::render(&model(10), cidr);
        nftables::load(&r, false).commit().unwrap();
    });
    let nft_conn_10 = connect_latency(last_vip(10), 300);
    in_ns(|| nftables::cleanup().unwrap());
    println!(
        "proxy-sync services={n} backend=nftables full_sync_ms={nft_full_ms:.0} one_endpoint_ms={:.1} (EndpointSlice event to the first connection reaching the new endpoint, p50 of 21, max {:.1}; to the kernel's acknowledgement p50 {:.1}, the transaction alone {:.1}; kernel floor, a one-element removal acknowledged, p50 {:.1})",
        pct(&mut nft_effect, 0.5),
        pct(&mut nft_effect, 1.0),
        pct(&mut nft_one, 0.5),
        pct(&mut nft_kernel, 0.5),
        pct(&mut nft_floor, 0.5)
    );
    if let Some((baseline, full_ms, one_ms, conn_n, conn_10, baseline_after)) = ipt {
        println!(
            "proxy-sync services={n} backend=iptables full_sync_ms={full_ms:.0} one_endpoint_ms={one_ms:.1}"
        );
        println!(
            "proxy-sync services={n} baseline=kube-proxy-layout-iptables-restore full_load_ms={:.0} (before the backends) {:.0} (after)",
            baseline.as_secs_f64() * 1000.0,
            baseline_after.as_secs_f64() * 1000.0
        );
        println!(
            "proxy-sync backend=iptables connect_p50_us (to the Service matched last) services=10:{conn_10:.0} services={n}:{conn_n:.0} ratio={:.2}",
            conn_n / conn_10
        );
    }
    println!(
        "proxy-sync backend=nftables connect_p50_us services=10:{nft_conn_10:.0} services={n}:{nft_conn_n:.0} ratio={:.2}",
        nft_conn_n / nft_conn_10
    );
    let _ = Command::new("ip").args(["netns", "delete", NETNS]).status();
}
