//! `cargo bench --bench image_pull`: registry pulls against the floor measured in the same run.
//! A 5-layer image of about 200 MiB (busybox and four layers of random bytes) is pushed to a
//! real registry (Debian's `docker-registry`) in the lab's namespace, then pulled and unpacked
//! cold, in turns, by `ctr image pull` (the floor) and by `keelson image pull`; last, 20 pods
//! of one new image start at once on a standalone agent (time to all Running, and how many
//! times the registry served the manifest and each blob). Needs root. Prints lines beginning
//! `image-pull`. `IMAGE_PULL_ROUNDS` (default 3) and `IMAGE_PULL_LAYER_MIB` (default 50).
#[path = "../tests/common/mod.rs"]
mod common;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use common::{registry::Registry, *};

const REG: &str = "127.0.0.1:5000";

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs `cmd` inside the lab namespace; panics with its output on failure.
fn in_lab(lab: &Lab, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", &lab.netns])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// The bench image: the lab's busybox root and `n` layers of `mib` MiB of random bytes.
fn pack_big(lab: &Lab, name: &str, n: usize, mib: usize) -> PathBuf {
    let mut args: Vec<String> = vec![
        "image".into(),
        "pack".into(),
        "--rootfs".into(),
        lab.dir.path().join("busybox-rootfs").display().to_string(),
    ];
    for i in 0..n {
        let root = lab
            .dir
            .path()
            .join(format!("{}-layer{i}", name.replace(['/', ':'], "-")));
        std::fs::create_dir_all(&root).unwrap();
        let mut data = vec![0u8; mib << 20];
        getrandom::fill(&mut data).unwrap();
        std::fs::write(root.join(format!("data{i}")), data).unwrap();
        args.extend(["--rootfs".into(), root.display().to_string()]);
    }
    let file = name.replace(['/', ':'], "-");
    let out_file = lab.dir.path().join(format!("{file}.tar"));
    args.extend([
        "--name".into(),
        name.into(),
        "--cmd".into(),
        "sh".into(),
        "-o".into(),
        out_file.display().to_string(),
    ]);
    let out = Command::new(env!("CARGO_BIN_EXE_keelson"))
        .args(&args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out_file
}

/// Removes every image of containerd namespace `ns` and waits for containerd's collection,
/// so that the next pull is cold.
fn clear(lab: &Lab, ns: &str) {
    let ctr = |args: &[&str]| {
        Command::new("ctr")
            .arg("-a")
            .arg(lab.socket())
            .args(["-n", ns])
            .args(args)
            .output()
            .unwrap()
    };
    let names = String::from_utf8_lossy(&ctr(&["images", "ls", "-q"]).stdout).to_string();
    for n in names.lines().filter(|n| n.contains(REG)) {
        let _ = ctr(&["images", "rm", "--sync", n]);
    }
    let _ = ctr(&["content", "prune", "references"]);
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let rounds = env_or("IMAGE_PULL_ROUNDS", 3);
    let mib = env_or("IMAGE_PULL_LAYER_MIB", 50);
    let mut lab = Lab::start("pullbench");
    let reg = Registry::plain(&lab.netns, &lab.dir.path().join("reg"), REG);
    let yaml = lab.dir.path().join("registries.yaml");
    std::fs::write(
        &yaml,
        format!("mirrors:\n  \"{REG}\":\n    endpoint: [\"http://{REG}\"]\n"),
    )
    .unwrap();
    let big = pack_big(&lab, "bench/big:1", 4, mib);
    let size_mib = std::fs::metadata(&big).unwrap().len() as f64 / (1 << 20) as f64;
    reg.push(&format!("oci-archive:{}", big.display()), "bench/big:1");
    let image = format!("{REG}/bench/big:1");
    let sock = lab.socket().display().to_string();
    let (mut floor, mut ours) = (vec![], vec![]);
    for _ in 0..rounds {
        clear(&lab, "bench-floor");
        let t = Instant::now();
        in_lab(
            &lab,
            &[
                "ctr",
                "-a",
                &sock,
                "-n",
                "bench-floor",
                "images",
                "pull",
                "--plain-http",
                &image,
            ],
        );
        floor.push(t.elapsed().as_secs_f64());
        clear(&lab, "bench-floor");
        clear(&lab, NS);
        let t = Instant::now();
        in_lab(
            &lab,
            &[
                env!("CARGO_BIN_EXE_keelson"),
                "image",
                "pull",
                "--containerd",
                &sock,
                "--registry-config",
                yaml.to_str().unwrap(),
                &image,
            ],
        );
        ours.push(t.elapsed().as_secs_f64());
        clear(&lab, NS);
    }
    let (f, k) = (median(&mut floor), median(&mut ours));
    println!(
        "image-pull 5 layers {size_mib:.0} MiB cold (median of {rounds}): keelson {k:.2} s, ctr floor {f:.2} s ({:.2}x the floor)",
        k / f
    );
    twenty_pods(&mut lab, &reg, &yaml, mib);
}

/// 20 pods of one new image at once: time to all Running, and the registry's requests.
fn twenty_pods(lab: &mut Lab, reg: &Registry, yaml: &Path, mib: usize) {
    let pods = 20;
    let img = pack_big(lab, "bench/fleet:1", 4, mib);
    reg.push(&format!("oci-archive:{}", img.display()), "bench/fleet:1");
    lab.start_agent_with(&["--standalone", "--registry-config", yaml.to_str().unwrap()]);
    let before = (
        reg.gets("bench/fleet", "manifests"),
        reg.gets("bench/fleet", "blobs"),
    );
    let t = Instant::now();
    for i in 0..pods {
        lab.write_manifest(
            &format!("fleet{i}.yaml"),
            &format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: fleet{i}}}\nspec:\n  containers:\n  - name: c\n    image: {REG}/bench/fleet:1\n    command: [sleep, \"3600\"]\n"),
        );
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let running = lab
            .pods()
            .iter()
            .filter(|p| {
                p.metadata
                    .name
                    .as_deref()
                    .is_some_and(|n| n.starts_with("fleet"))
                    && phase(p) == "Running"
            })
            .count();
        if running == pods {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{running}/{pods} Running:\n{}",
            lab.agent_log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let secs = t.elapsed().as_secs_f64();
    let manifests = reg.gets("bench/fleet", "manifests") - before.0;
    let blobs = reg.gets("bench/fleet", "blobs") - before.1;
    // The busybox layer is one the node has (its own busybox archive): 4 layers and the
    // config are new.
    println!(
        "image-pull {pods} pods of one new image: all Running in {secs:.2} s; the registry served its manifest {manifests} time(s) and {blobs} blob(s) ({})",
        if manifests == 1 && blobs <= 5 {
            "one pull"
        } else {
            "MORE THAN ONE PULL"
        }
    );
}
