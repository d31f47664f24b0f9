//! `cargo bench --bench cluster`: a 3-node `keelson lab` — how long `lab up` takes, how fast
//! 30 pods of a Deployment go from creation to Ready (each pod's creation and its Ready
//! transition observed through a watch on this process's clock, which is what Kubernetes' pod
//! startup SLO measures, at better than the API's one-second timestamp resolution), and each
//! agent's RSS. The floor, measured in the same run on the lab's containerd: the same number of
//! pause + app pairs started directly through containerd, as many at a time per node.
//! Prints lines beginning `cluster`. Needs root. `CLUSTER_PODS` changes the pod count,
//! `CLUSTER_AGENT_ARGS` adds agent flags (e.g. `--shim-group node`).
#[path = "../tests/common/mod.rs"]
mod common;

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use common::{
    BUSYBOX, Kubectl,
    cluster::Cluster,
    floor::{cpu_ticks, floor_once, machine_busy_ticks, pct, pids_named, pss_kib, rss_kib},
};
use futures::StreamExt;
use k8s_openapi::api::{apps::v1::Deployment, core::v1::Pod};
use kube::{
    Api,
    api::PostParams,
    runtime::{WatchStreamExt, watcher},
};

fn ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// CPU ticks so far: the machine, the agents, the server, containerd, and the shims with the
/// runc processes they waited for (a shim that started since is counted from zero).
fn cpu_split(c: &Cluster) -> Vec<(&'static str, u64)> {
    let agents: u64 = c.agent_pids().iter().map(|(_, p)| cpu_ticks(*p)).sum();
    let st: serde_json::Value =
        serde_json::from_slice(&std::fs::read(c.lab_dir().join("lab.json")).unwrap()).unwrap();
    let pid = |v: &serde_json::Value| v.as_u64().map_or(0, |p| cpu_ticks(p as u32));
    let shims: u64 = pids_named("containerd-shim")
        .into_iter()
        .map(cpu_ticks)
        .sum();
    vec![
        ("machine", machine_busy_ticks()),
        ("agents", agents),
        ("server", pid(&st["server"]["pid"])),
        ("containerd+shim-start", pid(&st["containerd_pid"])),
        ("shims+runc", shims),
    ]
}

fn main() {
    let pods: usize = std::env::var("CLUSTER_PODS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let nodes = 3;
    // CLUSTER_AGENT_ARGS: extra agent flags, e.g. "--shim-group node".
    let extra = std::env::var("CLUSTER_AGENT_ARGS").unwrap_or_default();
    let agent_args: Vec<&str> = extra.split_whitespace().collect();
    let c = Cluster::up_with("bench", nodes, &[], &agent_args);
    if !agent_args.is_empty() {
        println!("cluster agent-args {agent_args:?}");
    }
    println!(
        "cluster lab-up nodes={nodes} up_s={:.2} (namespaces, containerd, server, agents, all Ready)",
        c.up_secs
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut lat: Vec<f64> = rt.block_on(async {
        let client = keelson::control::client_from(&c.kubeconfig())
            .await
            .unwrap();
        let api: Api<Pod> = Api::namespaced(client.clone(), "default");
        // The watch first, so that every pod's creation is seen.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let w = tokio::spawn(async move {
            let mut s = std::pin::pin!(
                watcher(api, watcher::Config::default().labels("app=bench")).applied_objects()
            );
            while let Some(Ok(p)) = s.next().await {
                let _ = tx.send((Instant::now(), p));
            }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let deploy: Deployment = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "bench"},
            "spec": {
                "replicas": pods,
                "selector": {"matchLabels": {"app": "bench"}},
                "template": {
                    "metadata": {"labels": {"app": "bench"}},
                    "spec": {"containers": [{
                        "name": "app", "image": BUSYBOX, "command": ["sleep", "3600"]
                    }]}
                }
            }
        }))
        .unwrap();
        let cpu0 = cpu_split(&c);
        let t0 = Instant::now();
        Api::<Deployment>::namespaced(client, "default")
            .create(&PostParams::default(), &deploy)
            .await
            .unwrap();
        let mut seen: HashMap<String, Instant> = HashMap::new();
        let mut done: HashMap<String, f64> = HashMap::new();
        while done.len() < pods {
            let Ok(Some((at, p))) = tokio::time::timeout(Duration::from_secs(120), rx.recv()).await
            else {
                panic!("pods not Ready: {} of {pods}", done.len());
            };
            let name = p.metadata.name.clone().unwrap_or_default();
            let first = *seen.entry(name.clone()).or_insert(at);
            if ready(&p) && !done.contains_key(&name) {
                done.insert(name, (at - first).as_secs_f64() * 1000.0);
            }
        }
        let wall = t0.elapsed();
        let cpu1 = cpu_split(&c);
        println!(
            "cluster apply-to-all-ready pods={pods} nodes={nodes} all_ready_ms={:.0}",
            wall.as_secs_f64() * 1000.0
        );
        let tick = 100.0; // USER_HZ
        let d = |i: usize| (cpu1[i].1 - cpu0[i].1) as f64 / tick;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        println!(
            "cluster cpu-during-startup wall_s={:.2} machine_busy_s={:.2} ({:.0}% of {cores} cores) {}",
            wall.as_secs_f64(),
            d(0),
            100.0 * d(0) / (wall.as_secs_f64() * cores),
            (1..cpu0.len())
                .map(|i| format!("{}={:.2}s", cpu0[i].0, d(i)))
                .collect::<Vec<_>>()
                .join(" ")
        );
        w.abort();
        let mut slow: Vec<(&String, &f64)> = done.iter().collect();
        slow.sort_by(|a, b| b.1.total_cmp(a.1));
        println!(
            "cluster slowest pods: {:?}",
            slow.iter()
                .take(3)
                .map(|(n, t)| format!("{n}={t:.0}ms"))
                .collect::<Vec<_>>()
        );
        if let Some((slowest, t)) = slow.first()
            && **t > 5000.0
        {
            for n in &c.nodes {
                for l in c.log(n).lines().filter(|l| l.contains(slowest.as_str())) {
                    println!("cluster slow-pod-log {n}: {l}");
                }
            }
        }
        done.into_values().collect()
    });
    let (p50, p99) = (pct(&mut lat, 0.5), pct(&mut lat, 0.99));
    println!(
        "cluster pod-startup pods={pods} nodes={nodes} p50_ms={p50:.0} p99_ms={p99:.0} (created → Ready, through a watch; target p99 ≤ 1500)"
    );
    std::thread::sleep(Duration::from_secs(2));
    for (name, pid) in c.agent_pids() {
        println!(
            "cluster agent node={name} rss_mib={:.1} pss_mib={:.1} pods={} (target rss ≤ 30; pss shares the binary's pages among the lab's keelson processes)",
            rss_kib(pid) as f64 / 1024.0,
            pss_kib(pid) as f64 / 1024.0,
            c.pods("app=bench").iter().filter(|p| p.1 == name).count()
        );
    }

    let shims = pids_named("containerd-shim");
    println!(
        "cluster shims count={} rss_mib_total={:.1} pss_mib_total={:.1} (containerd's shim processes for the {pods} pods)",
        shims.len(),
        shims.iter().map(|p| rss_kib(*p)).sum::<u64>() as f64 / 1024.0,
        shims.iter().map(|p| pss_kib(*p)).sum::<u64>() as f64 / 1024.0,
    );

    // The floor on the same containerd: pods/nodes pairs per node, the nodes side by side.
    let sock = keelson::lab::ContainerdPaths::new(&c.lab_dir()).socket();
    let archive = c.dir.path().join("images/busybox.tar");
    let per_node = pods / nodes;
    let mut floor: Vec<f64> = rt.block_on(async {
        let mut all = vec![];
        let mut tasks = vec![];
        // Images first, one namespace after the other (the agents imported theirs at start,
        // before any pod), then the pods of all nodes at once.
        let mut ready = vec![];
        for n in 0..nodes {
            let rt = keelson::runtime::Containerd::connect(&sock, &format!("floor{n}"))
                .await
                .unwrap();
            rt.import_archive("busybox", &std::fs::read(&archive).unwrap())
                .await
                .unwrap();
            let pause = keelson::agent::ensure_pause(&rt).await.unwrap();
            let app = rt.image_info(BUSYBOX).await.unwrap();
            ready.push((rt, pause, app));
        }
        for (rt, pause, app) in ready {
            tasks.push(tokio::spawn(async move {
                let runs = (0..per_node).map(|_| floor_once(&rt, &pause, &app));
                futures::future::join_all(runs).await
            }));
        }
        for t in tasks {
            all.extend(
                t.await
                    .unwrap()
                    .into_iter()
                    .map(|d| d.as_secs_f64() * 1000.0),
            );
        }
        all
    });
    let (f50, f99) = (pct(&mut floor, 0.5), pct(&mut floor, 0.99));
    println!(
        "cluster floor containerd-direct pods={} ({per_node} at once on each of {nodes} nodes, no network, no API) p50_ms={f50:.0} p99_ms={f99:.0}; pod-startup p99 / floor p99 = {:.2}",
        floor.len(),
        p99 / f99
    );
}
