//! `cargo bench --bench scheduler`: pods bound per second for 5,000 pods over 100 nodes (nodes
//! made by the benchmark), and the creation-to-bound latency (p50/p99), against the floor
//! measured in the same run: how fast the same 5,000 pods can merely be created (the scheduler
//! cannot bind faster than pods arrive). Prints lines beginning `scheduler`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::{Server, floor::pct};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::{
    Api,
    api::{PostParams, WatchEvent, WatchParams},
};

const NODES: usize = 100;
const PODS: usize = 5000;

fn pod(i: usize) -> Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": format!("p{i:05}")},
        "spec": {"containers": [{"name": "c", "image": "busybox:1.36",
                 "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}}]},
    }))
    .unwrap()
}

/// Creates the pods 16-way; returns when each create returned (by name).
async fn create_all(pods: Api<Pod>) -> HashMap<String, Instant> {
    let created = Arc::new(Mutex::new(HashMap::new()));
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let (pods, next, created) = (pods.clone(), next.clone(), created.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= PODS {
                        return;
                    }
                    let t = Instant::now();
                    pods.create(&PostParams::default(), &pod(i)).await.unwrap();
                    created.lock().unwrap().insert(format!("p{i:05}"), t);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    created.lock().unwrap().clone()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // Floor: the same pods created on a server without a scheduler.
    let server = Server::builder()
        .args(&["--no-controllers"])
        .env("RUST_LOG", "warn")
        .start();
    let c = server.client().await;
    let t0 = Instant::now();
    create_all(Api::namespaced(c, "default")).await;
    let floor = PODS as f64 / t0.elapsed().as_secs_f64();
    drop(server);

    let server = Server::builder().env("RUST_LOG", "warn").start();
    let c = server.client().await;
    let nodes: Api<Node> = Api::all(c.clone());
    for i in 0..NODES {
        let n: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": format!("node{i:03}"), "labels": {"kubernetes.io/hostname": format!("node{i:03}")}},
            "status": {"allocatable": {"cpu": "64", "memory": "256Gi", "pods": "110"},
                       "conditions": [{"type": "Ready", "status": "True"}]},
        }))
        .unwrap();
        nodes.create(&PostParams::default(), &n).await.unwrap();
    }
    // Give the scheduler's node cache a moment to see all nodes.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pods: Api<Pod> = Api::namespaced(c.clone(), "default");
    let rv = pods
        .list(&Default::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let mut stream = pods
        .watch(&WatchParams::default().timeout(290), &rv)
        .await
        .unwrap()
        .boxed();
    let bound: Arc<Mutex<HashMap<String, (Instant, String)>>> = Arc::default();
    let b = bound.clone();
    let watcher = tokio::spawn(async move {
        while let Ok(Some(ev)) = stream.try_next().await {
            if let WatchEvent::Modified(p) | WatchEvent::Added(p) = ev
                && let Some(n) = p.spec.as_ref().and_then(|s| s.node_name.clone())
            {
                let mut b = b.lock().unwrap();
                b.entry(p.metadata.name.clone().unwrap_or_default())
                    .or_insert((Instant::now(), n));
                if b.len() >= PODS {
                    return;
                }
            }
        }
    });
    let t0 = Instant::now();
    let created = create_all(pods.clone()).await;
    tokio::time::timeout(Duration::from_secs(120), watcher)
        .await
        .expect("all pods bound within 120 s")
        .unwrap();
    let bound = bound.lock().unwrap().clone();
    let last = bound.values().map(|(t, _)| *t).max().unwrap();
    let rate = PODS as f64 / (last - t0).as_secs_f64();
    let mut lat: Vec<f64> = bound
        .iter()
        .map(|(name, (t, _))| (*t - created[name]).as_secs_f64() * 1000.0)
        .collect();
    let mut per_node: HashMap<&str, usize> = HashMap::new();
    for (_, n) in bound.values() {
        *per_node.entry(n.as_str()).or_default() += 1;
    }
    let (min, max) = (
        per_node.values().min().copied().unwrap_or(0),
        per_node.values().max().copied().unwrap_or(0),
    );
    println!(
        "scheduler {PODS} pods over {NODES} nodes: bound {rate:.0} pods/s (floor: created {floor:.0} pods/s) | creation-to-bound p50 {:.0} ms p99 {:.0} ms | pods per node {min}..{max}",
        pct(&mut lat, 0.5),
        pct(&mut lat, 0.99)
    );
}
