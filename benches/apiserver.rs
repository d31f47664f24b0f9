//! `cargo bench --bench apiserver`: the API server under load through kube-rs, on both storage
//! engines, against the floor measured in the same run (the same writes straight into the
//! storage engine, no HTTP, no API semantics). Prints lines beginning `apiserver`.
//!
//! Figures: sequential and 16-way concurrent creates per second, p50/p99 of a single-object
//! write, time for one event to reach 100 watchers, list latency at 10,000 pods, and the server's
//! RSS at 10,000 pods.

#[path = "../tests/common/mod.rs"]
mod common;

use std::{
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use common::{
    KillOnDrop, Server,
    floor::{pct, rss_kib},
};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use keelson::store::{Precondition, Store};
use kube::{
    Api,
    api::{ListParams, PostParams, WatchEvent, WatchParams},
};

const SEQUENTIAL: usize = 1000;
const CONCURRENT: usize = 4000;
const WATCHERS: usize = 100;
const PODS: usize = 10_000;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_etcd(dir: &std::path::Path) -> (KillOnDrop, String) {
    let (c, p) = (free_port(), free_port());
    let url = format!("http://127.0.0.1:{c}");
    let purl = format!("http://127.0.0.1:{p}");
    let child = Command::new("etcd")
        .args(["--name", "b0", "--data-dir"])
        .arg(dir.join("etcd"))
        .args([
            "--listen-client-urls",
            &url,
            "--advertise-client-urls",
            &url,
        ])
        .args([
            "--listen-peer-urls",
            &purl,
            "--initial-advertise-peer-urls",
            &purl,
        ])
        .args(["--initial-cluster", &format!("b0={purl}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("etcd is installed");
    (KillOnDrop(child), url)
}

/// A server logging warnings only (its log is not what is measured).
fn quiet_server(args: &[&str]) -> Server {
    Server::builder().args(args).env("RUST_LOG", "warn").start()
}

fn cm(name: &str) -> ConfigMap {
    serde_json::from_value(serde_json::json!({"metadata": {"name": name}, "data": {"k": "v"}}))
        .unwrap()
}

fn pod(i: usize) -> Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": format!("p{i:05}"), "labels": {"app": "bench"}},
        "spec": {"nodeName": format!("n{}", i % 100),
                 "containers": [{"name": "c", "image": "busybox:1.36", "command": ["sleep", "3600"]}]},
    }))
    .unwrap()
}

/// `n` creates over `width` concurrent tasks; creates per second.
async fn concurrent<F, Fut>(n: usize, width: usize, f: F) -> f64
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    let f = Arc::new(f);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..width)
        .map(|_| {
            let (f, next) = (f.clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= n {
                        return;
                    }
                    f(i).await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    n as f64 / t0.elapsed().as_secs_f64()
}

/// The same writes straight into the engine: sequential p50/p99 (ms) and 16-way creates/s.
async fn floor(store: Arc<dyn Store>) -> (f64, f64, f64) {
    let value = serde_json::to_vec(&cm("floor")).unwrap();
    let mut lat = vec![];
    for i in 0..SEQUENTIAL {
        let t = Instant::now();
        store
            .put(
                &format!("/floor/seq/{i}"),
                value.clone(),
                Precondition::Absent,
            )
            .await
            .unwrap();
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let s = store.clone();
    let rate = concurrent(CONCURRENT, 16, move |i| {
        let (s, v) = (s.clone(), value.clone());
        async move {
            s.put(&format!("/floor/par/{i}"), v, Precondition::Absent)
                .await
                .unwrap();
        }
    })
    .await;
    (pct(&mut lat, 0.5), pct(&mut lat, 0.99), rate)
}

async fn run(engine: &str, server: &Server, floor: (f64, f64, f64)) {
    let client = server.client().await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    // Warm up the connection pool.
    cms.list(&ListParams::default().limit(1)).await.unwrap();

    let mut lat = vec![];
    let t0 = Instant::now();
    for i in 0..SEQUENTIAL {
        let t = Instant::now();
        cms.create(&PostParams::default(), &cm(&format!("s{i}")))
            .await
            .unwrap();
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let seq_rate = SEQUENTIAL as f64 / t0.elapsed().as_secs_f64();
    let (p50, p99) = (pct(&mut lat, 0.5), pct(&mut lat, 0.99));
    let api = cms.clone();
    let par_rate = concurrent(CONCURRENT, 16, move |i| {
        let api = api.clone();
        async move {
            api.create(&PostParams::default(), &cm(&format!("c{i}")))
                .await
                .unwrap();
        }
    })
    .await;
    let (fp50, fp99, frate) = floor;
    println!(
        "apiserver {engine} sequential creates/s {seq_rate:.0} | write p50 {p50:.2} ms p99 {p99:.2} ms | floor (store only) p50 {fp50:.2} ms p99 {fp99:.2} ms"
    );
    println!("apiserver {engine} 16-way creates/s {par_rate:.0} | floor (store only) {frate:.0}/s");

    // One event, 100 watchers.
    let rv = cms
        .list(&ListParams::default().limit(1))
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let mut streams = vec![];
    for _ in 0..WATCHERS {
        let s = cms
            .watch(&WatchParams::default().fields("metadata.name=fanout"), &rv)
            .await
            .unwrap()
            .boxed();
        streams.push(s);
    }
    let t0 = Instant::now();
    cms.create(&PostParams::default(), &cm("fanout"))
        .await
        .unwrap();
    let waits = streams.into_iter().map(|mut s| async move {
        loop {
            match s.try_next().await {
                Ok(Some(WatchEvent::Added(_))) => return Instant::now(),
                Ok(Some(_)) => continue,
                other => panic!("watch ended: {other:?}"),
            }
        }
    });
    let last = futures::future::join_all(waits)
        .await
        .into_iter()
        .max()
        .unwrap();
    println!(
        "apiserver {engine} one event to {WATCHERS} watchers {:.1} ms",
        (last - t0).as_secs_f64() * 1000.0
    );

    // 10,000 pods.
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let p = pods.clone();
    let pod_rate = concurrent(PODS, 16, move |i| {
        let p = p.clone();
        async move {
            p.create(&PostParams::default(), &pod(i)).await.unwrap();
        }
    })
    .await;
    let rss_created = rss_kib(server.pid()) as f64 / 1024.0;
    let mut lists = vec![];
    for _ in 0..5 {
        let t = Instant::now();
        let l = pods.list(&ListParams::default()).await.unwrap();
        assert_eq!(l.items.len(), PODS);
        lists.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let mut node = vec![];
    for i in 0..5 {
        let t = Instant::now();
        let l = pods
            .list(&ListParams::default().fields(&format!("spec.nodeName=n{i}")))
            .await
            .unwrap();
        assert_eq!(l.items.len(), PODS / 100);
        node.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    println!(
        "apiserver {engine} {PODS} pods: created at {pod_rate:.0}/s | list all p50 {:.0} ms | list one node's pods p50 {:.0} ms | server RSS {rss_created:.0} MiB after the creates, {:.0} MiB after the lists",
        pct(&mut lists, 0.5),
        pct(&mut node, 0.5),
        rss_kib(server.pid()) as f64 / 1024.0
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // Embedded engine.
    let floor_dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(
        keelson::store::embedded::Embedded::open(&floor_dir.path().join("f.redb")).unwrap(),
    );
    let f = floor(store).await;
    // The API server alone (the scheduler and controllers would also cache every pod).
    let server = quiet_server(&["--no-controllers"]);
    run("embedded", &server, f).await;
    drop(server);

    // etcd engine (one member on loopback, data in a temp dir).
    let edir = tempfile::tempdir().unwrap();
    let (_etcd, url) = start_etcd(edir.path());
    let t0 = Instant::now();
    let store: Arc<dyn Store> = loop {
        match keelson::store::etcd::EtcdStore::connect(std::slice::from_ref(&url)).await {
            Ok(s) => break Arc::new(s),
            Err(e) => {
                assert!(
                    t0.elapsed() < Duration::from_secs(30),
                    "etcd did not start: {e}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    let f = floor(store).await;
    let server = quiet_server(&[
        "--no-controllers",
        "--store",
        "etcd",
        "--etcd-endpoints",
        &url,
    ]);
    run("etcd", &server, f).await;
}
