//! `cargo bench --bench pod_start`: how fast the standalone agent turns manifests into Ready
//! pods, against the floor measured in the same run (the same pause + app containers created
//! and started directly through containerd, no keelson in between). Needs root.
//! Prints lines beginning `pod-start`.
//!
//! Last, the agent's memory at `POD_START_BURST` pods for both builds: the all-in-one binary
//! and the lean node build (`--no-default-features --features agent`, built here into
//! `target/lean` unless `KEELSON_LEAN_BIN` names one), each joined to a `keelson server` in a
//! fresh lab namespace with its service proxy on, running a Deployment behind a Service.
#[path = "../tests/common/mod.rs"]
mod common;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use common::{
    floor::{floor_once, pct, rss_by_mapping, rss_kib, rss_parts_kib},
    *,
};
use keelson::runtime::Containerd;

fn sleeper(name: &str) -> String {
    pod_yaml(name, "exec sleep 3600", "", "")
}

fn main() {
    if std::env::var_os("POD_START_MEMORY_ONLY").is_some() {
        let pods = std::env::var("POD_START_BURST")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(50);
        return memory(pods);
    }
    let sequential: usize = std::env::var("POD_START_SEQUENTIAL")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let burst: usize = std::env::var("POD_START_BURST")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let mut lab = Lab::start("bench");
    lab.start_agent();

    // Floor, measured first (the agent is idle; its images are imported).
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut floor: Vec<f64> = runtime.block_on(async {
        let rt = Containerd::connect(&lab.socket(), "keelson-bench-floor")
            .await
            .unwrap();
        let archive = std::fs::read(lab.data_dir().join("images/busybox.tar")).unwrap();
        rt.import_archive("busybox", &archive).await.unwrap();
        let pause = keelson::agent::ensure_pause(&rt).await.unwrap();
        let app = rt.image_info(BUSYBOX).await.unwrap();
        let _ = floor_once(&rt, &pause, &app).await; // warm-up
        let mut v = vec![];
        for _ in 0..sequential {
            v.push(floor_once(&rt, &pause, &app).await.as_secs_f64() * 1000.0);
        }
        v
    });

    // One pod at a time: manifest written → Ready in the agent's status.
    lab.write_manifest("warm.yaml", &sleeper("warm"));
    lab.wait_ready("warm");
    let mut seq = vec![];
    for i in 0..sequential {
        let name = format!("seq{i}");
        let t0 = Instant::now();
        lab.write_manifest(&format!("{name}.yaml"), &sleeper(&name));
        loop {
            if lab.pod(&name).is_some_and(|p| is_ready(&p)) {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "pod {name} not Ready"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        seq.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    for i in 0..sequential {
        lab.remove_manifest(&format!("seq{i}.yaml"));
    }
    lab.remove_manifest("warm.yaml");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !lab.pods().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }

    // A burst: `burst` manifests at once, time until every pod is Ready.
    let t0 = Instant::now();
    for i in 0..burst {
        lab.write_manifest(&format!("b{i}.yaml"), &sleeper(&format!("b{i}")));
    }
    loop {
        let pods = lab.pods();
        if pods.len() == burst && pods.iter().all(is_ready) {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(300), "burst not Ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    let burst_ms = t0.elapsed().as_secs_f64() * 1000.0;
    std::thread::sleep(Duration::from_secs(2));
    let agent_pid = lab.agent_pid().expect("agent pid");
    let rss = rss_kib(agent_pid);

    let (f50, s50, s99) = (
        pct(&mut floor, 0.5),
        pct(&mut seq.clone(), 0.5),
        pct(&mut seq, 0.99),
    );
    println!(
        "pod-start floor containerd-direct (pause+app, no network) p50_ms={f50:.1} p99_ms={:.1} n={sequential}",
        pct(&mut floor, 0.99)
    );
    println!(
        "pod-start sequential manifest-to-Ready p50_ms={s50:.1} p99_ms={s99:.1} n={sequential} ratio_p50_vs_floor={:.2}",
        s50 / f50
    );
    println!(
        "pod-start burst pods={burst} all_ready_ms={burst_ms:.0} per_pod_ms={:.1}",
        burst_ms / burst as f64
    );
    println!(
        "pod-start agent rss_mib={:.1} pods={burst}",
        rss as f64 / 1024.0
    );
    for i in 0..burst {
        lab.remove_manifest(&format!("b{i}.yaml"));
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while !lab.pods().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(lab);

    memory(burst);
}

/// The joined agent's memory, per build (`POD_START_BUILDS`, default both), over
/// `POD_START_ROUNDS` rounds of `pods` pods (default 3).
fn memory(pods: usize) {
    let rounds: usize = std::env::var("POD_START_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let wanted = std::env::var("POD_START_BUILDS").unwrap_or_else(|_| "all-in-one,lean".into());
    let builds: Vec<(&str, PathBuf)> = wanted
        .split(',')
        .map(|b| match b {
            "lean" => ("lean", lean_binary()),
            _ => ("all-in-one", PathBuf::from(env!("CARGO_BIN_EXE_keelson"))),
        })
        .collect();
    for (build, bin) in builds {
        let AgentMemory {
            anon,
            file,
            maps,
            threads,
            before,
            idle,
        } = joined_agent_rss(&bin, pods, rounds);
        let top: Vec<String> = maps
            .iter()
            .take(5)
            .map(|(m, kib)| format!("{m}={:.1}", *kib as f64 / 1024.0))
            .collect();
        println!(
            "pod-start agent-with-proxy build={build} pods={pods} rss_mib={:.1} rss_anon_mib={:.1} rss_file_mib={:.1} binary_mib={:.1}",
            (anon + file) as f64 / 1024.0,
            anon as f64 / 1024.0,
            file as f64 / 1024.0,
            std::fs::metadata(&bin).map(|m| m.len()).unwrap_or(0) as f64 / (1024.0 * 1024.0)
        );
        println!(
            "pod-start agent-with-proxy build={build} threads={threads} largest_mappings_mib {}",
            top.join(" ")
        );
        let idle = idle
            .iter()
            .enumerate()
            .map(|(i, m)| (format!("after round {} is deleted", i + 1), *m));
        for (when, (a, f)) in [("joined, before any pod".to_string(), before)]
            .into_iter()
            .chain(idle)
        {
            println!(
                "pod-start agent-with-proxy build={build} pods=0 ({when}) rss_anon_mib={:.1} rss_file_mib={:.1}",
                a as f64 / 1024.0,
                f as f64 / 1024.0
            );
        }
    }
}

/// The lean node build: `KEELSON_LEAN_BIN`, or built now (the `node` profile: release with
/// LTO) into `target/lean`.
fn lean_binary() -> PathBuf {
    if let Ok(p) = std::env::var("KEELSON_LEAN_BIN") {
        return p.into();
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let target = repo.join("target/lean");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(repo)
        .args([
            "build",
            "--profile",
            "node",
            "--no-default-features",
            "--features",
            "agent",
        ])
        .args(["--bin", "keelson", "--target-dir"])
        .arg(&target)
        .status()
        .expect("run cargo");
    assert!(status.success(), "building the lean agent failed");
    target.join("node/keelson")
}

/// Starts a server and the agent from `bin` (joined, proxy on) in a fresh lab, runs `pods`
/// pods of a Deployment behind a Service, and reads the agent's RssAnon and RssFile in KiB
/// and its resident memory by mapping, and its thread count; then (RssAnon, RssFile) once the
/// pods are deleted again.
fn joined_agent_rss(bin: &Path, pods: usize, rounds: usize) -> AgentMemory {
    let mut lab = Lab::start("rss");
    let server = Server::builder()
        .netns(&lab.netns)
        .dir(lab.dir.path().join("server"))
        .listen("127.0.0.1:6443")
        .env("RUST_LOG", "warn")
        .start();
    lab.set_agent_bin(bin);
    lab.join(&server, &[]);
    server.until(60, "the node Ready", || {
        server.jsonpath(
            &["get", "node", "node1"],
            "{.status.conditions[?(@.type==\"Ready\")].status}",
        ) == "True"
    });
    std::thread::sleep(Duration::from_secs(3));
    let before = rss_parts_kib(lab.agent_pid().expect("agent pid"));
    run_web(&server, pods);
    std::thread::sleep(Duration::from_secs(3));
    let pid = lab.agent_pid().expect("agent pid");
    let (anon, file) = rss_parts_kib(pid);
    let maps = rss_by_mapping(pid);
    let threads = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|n| n.trim().parse().ok())
        })
        .unwrap_or(0);
    delete_web(&server);
    let mut idle = vec![rss_parts_kib(pid)];
    // More rounds: growth per round is a leak, a plateau is the allocator keeping pages.
    for _ in 1..rounds {
        run_web(&server, pods);
        delete_web(&server);
        idle.push(rss_parts_kib(pid));
    }
    AgentMemory {
        anon,
        file,
        maps,
        threads,
        before,
        idle,
    }
}

/// The agent's memory at `pods` pods (KiB): RssAnon, RssFile, resident KiB by mapping, its
/// thread count, and (RssAnon, RssFile) joined before any pod and after each round's pods
/// were deleted.
struct AgentMemory {
    anon: u64,
    file: u64,
    maps: Vec<(String, u64)>,
    threads: u64,
    before: (u64, u64),
    idle: Vec<(u64, u64)>,
}

/// Runs `pods` pods of the web Deployment behind a Service and waits until they are Ready
/// and the proxy's EndpointSlice lists them all.
fn run_web(server: &Server, pods: usize) {
    server.apply(&web(pods, Some("ClusterIP")));
    server.until(300, &format!("{pods} Ready pods"), || {
        let ready = server.jsonpath(
            &["get", "pods", "-l", "app=web"],
            "{.items[*].status.conditions[?(@.type==\"Ready\")].status}",
        );
        ready.split_whitespace().filter(|s| *s == "True").count() == pods
    });
    // The proxy has the Service's endpoints once the slice lists every pod.
    server.until(60, "the EndpointSlice to list every pod", || {
        server
            .jsonpath(
                &[
                    "get",
                    "endpointslices",
                    "-l",
                    "kubernetes.io/service-name=web",
                ],
                "{.items[*].endpoints[*].addresses[0]}",
            )
            .split_whitespace()
            .count()
            == pods
    });
    std::thread::sleep(Duration::from_secs(3));
}

/// Deletes the web Deployment and waits until its pods are gone.
fn delete_web(server: &Server) {
    server.ok(&["delete", "deployment", "web"]);
    server.until(120, "the pods to go", || {
        server
            .jsonpath(&["get", "pods"], "{.items[*].metadata.name}")
            .trim()
            .is_empty()
    });
    std::thread::sleep(Duration::from_secs(3));
}
