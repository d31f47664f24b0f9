//! Benchmark helpers: percentiles, RSS, and the pod-start floor (pause + one app container
//! created and started directly through containerd, no keelson in between).

use std::time::{Duration, Instant};

use keelson::runtime::{
    Containerd,
    container::CreateOpts,
    random_hex,
    spec::{self, Ns, ProcessConfig, RuntimeConfig},
};

pub fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

/// A `Field:  N kB` line of a /proc/PID file, in KiB (0 if absent).
fn proc_kib(pid: u32, file: &str, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/{file}"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

pub fn rss_kib(pid: u32) -> u64 {
    proc_kib(pid, "status", "VmRSS:")
}

/// Resident memory split as the kernel counts it: (RssAnon, RssFile + RssShmem) in KiB. The
/// file part is mostly the binary's code pages; the anonymous part the heap and stacks.
pub fn rss_parts_kib(pid: u32) -> (u64, u64) {
    (
        proc_kib(pid, "status", "RssAnon:"),
        proc_kib(pid, "status", "RssFile:") + proc_kib(pid, "status", "RssShmem:"),
    )
}

/// Resident KiB by mapping, summed by what is mapped: `[heap]`, `[anon]` (unnamed: thread
/// stacks and malloc's other arenas), `[stack]`, or the file (binary, libraries); largest first.
pub fn rss_by_mapping(pid: u32) -> Vec<(String, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut sums: std::collections::HashMap<String, u64> = Default::default();
    let mut current = String::new();
    for l in text.lines() {
        let mut f = l.split_whitespace();
        let first = f.next().unwrap_or("");
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            let name = f.nth(4).unwrap_or("[anon]");
            current = name.rsplit('/').next().unwrap_or(name).to_string();
        } else if first == "Rss:" {
            let kib: u64 = f.next().and_then(|n| n.parse().ok()).unwrap_or(0);
            *sums.entry(current.clone()).or_default() += kib;
        }
    }
    let mut v: Vec<(String, u64)> = sums.into_iter().collect();
    v.sort_by_key(|b| std::cmp::Reverse(b.1));
    v
}

/// Proportional set size: shared pages divided among the processes that map them.
pub fn pss_kib(pid: u32) -> u64 {
    proc_kib(pid, "smaps_rollup", "Pss:")
}

/// The floor: pause (new namespaces) + one app container joining them, through containerd.
pub async fn floor_once(
    rt: &Containerd,
    pause: &keelson::runtime::image::ImageInfo,
    app: &keelson::runtime::image::ImageInfo,
) -> Duration {
    let t0 = Instant::now();
    let sid = random_hex(16);
    let sandbox = RuntimeConfig {
        process: ProcessConfig {
            args: vec!["/pause".into()],
            ..Default::default()
        },
        hostname: "floor".into(),
        readonly_rootfs: true,
        mounts: vec![],
        net: Ns::New,
        ipc: Ns::New,
        uts: Ns::New,
        pid: Ns::New,
        cgroups_path: format!("/keelson/{sid}"),
        memory_limit: None,
        cpu_quota: None,
        cpu_period: None,
        cpu_shares: Some(2),
        oom_score_adj: None,
        seccomp: Default::default(),
    };
    let s = spec::build(&sandbox).unwrap();
    rt.create(CreateOpts {
        id: &sid,
        image: pause,
        spec: &s,
        labels: Default::default(),
        stdio: Default::default(),
    })
    .await
    .unwrap();
    let pid = rt.start(&sid).await.unwrap();
    let aid = random_hex(16);
    let ns = |k: &str| Ns::Join(format!("/proc/{pid}/ns/{k}"));
    let appc = RuntimeConfig {
        process: ProcessConfig {
            args: vec!["sleep".into(), "3600".into()],
            env: vec!["PATH=/bin".into()],
            ..Default::default()
        },
        net: ns("net"),
        ipc: ns("ipc"),
        uts: ns("uts"),
        cgroups_path: format!("/keelson/{aid}"),
        readonly_rootfs: false,
        ..sandbox.clone()
    };
    let a = spec::build(&appc).unwrap();
    rt.create(CreateOpts {
        id: &aid,
        image: app,
        spec: &a,
        labels: Default::default(),
        stdio: Default::default(),
    })
    .await
    .unwrap();
    rt.start(&aid).await.unwrap();
    let took = t0.elapsed();
    for id in [aid, sid] {
        rt.delete(&id).await.unwrap();
    }
    took
}

/// CPU time (user + system, in clock ticks) of process `pid` and of the children it has
/// waited for; 0 if it is gone.
pub fn cpu_ticks(pid: u32) -> u64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // Fields after the command name (which may hold spaces) start at state (field 3).
    let Some(rest) = s.rsplit_once(')').map(|r| r.1) else {
        return 0;
    };
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(4)
        .filter_map(|v| v.parse().ok())
        .collect();
    f.iter().sum()
}

/// Busy CPU time of the whole machine, in clock ticks (all CPUs).
pub fn machine_busy_ticks() -> u64 {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let line = s.lines().next().unwrap_or_default();
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal: all but idle and iowait.
    v.iter()
        .enumerate()
        .filter(|(i, _)| *i < 8 && *i != 3 && *i != 4)
        .map(|(_, t)| t)
        .sum()
}

/// The PIDs of processes whose command name starts with `prefix`.
pub fn pids_named(prefix: &str) -> Vec<u32> {
    let mut v = vec![];
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .is_ok_and(|c| c.trim_end().starts_with(prefix))
        {
            v.push(pid);
        }
    }
    v
}
