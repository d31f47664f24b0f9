//! A multi-node lab made with `keelson lab up` (node namespaces behind a bridge namespace, one
//! private containerd, the server on the host's loopback), driven with the real kubectl.
//! `lab down` runs on drop, also when a test fails, after printing the logs' tails.

use std::{
    path::PathBuf,
    process::{Command, Output},
    time::Instant,
};

use super::kubectl::{Kubectl, tail};

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub name: String,
    pub nodes: Vec<String>,
    /// How long `keelson lab up` took (seconds).
    pub up_secs: f64,
}

fn keelson() -> Command {
    Command::new(env!("CARGO_BIN_EXE_keelson"))
}

impl Cluster {
    /// `keelson lab up` with `nodes` nodes, the busybox image, and extra server flags.
    pub fn up(hint: &str, nodes: usize, server_args: &[&str]) -> Cluster {
        Self::up_with(hint, nodes, server_args, &[])
    }

    /// `up` with extra flags for every agent too.
    pub fn up_with(hint: &str, nodes: usize, server_args: &[&str], agent_args: &[&str]) -> Cluster {
        Self::up_lab(hint, nodes, &[], server_args, agent_args)
    }

    /// `up_with` and extra flags for `keelson lab up` itself (e.g. --dns-upstream).
    pub fn up_lab(
        hint: &str,
        nodes: usize,
        lab_args: &[&str],
        server_args: &[&str],
        agent_args: &[&str],
    ) -> Cluster {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the lab tests need root (network namespaces, containerd)"
        );
        let dir = tempfile::Builder::new()
            .prefix(&format!("keelson-lab-{hint}-"))
            .tempdir()
            .unwrap();
        let images = dir.path().join("images");
        std::fs::create_dir_all(&images).unwrap();
        let ar = super::busybox_archive(dir.path());
        std::fs::rename(ar, images.join("busybox.tar")).unwrap();
        let mut b = [0u8; 2];
        getrandom::fill(&mut b).unwrap();
        let name = format!("kt-{}-{}", &hint[..hint.len().min(8)], hex::encode(b));
        let c = Cluster {
            nodes: (1..=nodes).map(|i| format!("{name}-node{i}")).collect(),
            dir,
            name,
            up_secs: 0.0,
        };
        let mut cmd = keelson();
        cmd.args([
            "lab",
            "up",
            "--name",
            &c.name,
            "--nodes",
            &nodes.to_string(),
        ])
        .arg("--data-dir")
        .arg(c.lab_dir())
        .arg("--images")
        .arg(&images)
        .env(
            "RUST_LOG",
            std::env::var("KEELSON_TEST_LOG").unwrap_or_else(|_| "info".into()),
        );
        cmd.args(lab_args);
        for a in server_args {
            cmd.arg(format!("--server-arg={a}"));
        }
        for a in agent_args {
            cmd.arg(format!("--agent-arg={a}"));
        }
        let t0 = Instant::now();
        let out = cmd.output().unwrap();
        let mut c = c;
        c.up_secs = t0.elapsed().as_secs_f64();
        assert!(
            out.status.success(),
            "lab up failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        c
    }

    pub fn lab_dir(&self) -> PathBuf {
        self.dir.path().join("lab")
    }

    /// A kubeconfig acting as node `node`: the client certificate its agent got through the
    /// TLS bootstrap (kept in the node's data directory).
    pub fn node_kubeconfig(&self, node: &str) -> PathBuf {
        let pki = self.lab_dir().join("nodes").join(node).join("pki");
        let read = |f: &str| {
            let p = pki.join(f);
            std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        };
        let out = self.dir.path().join(format!("{node}.kubeconfig"));
        let text = super::client_cert_kubeconfig(
            &self.kubeconfig(),
            &read("node-client.crt"),
            &read("node-client.key"),
        );
        std::fs::write(&out, text).unwrap();
        out
    }

    /// Pids of the agents (from the lab's state file).
    pub fn agent_pids(&self) -> Vec<(String, u32)> {
        let st: serde_json::Value =
            serde_json::from_slice(&std::fs::read(self.lab_dir().join("lab.json")).unwrap())
                .unwrap();
        st["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| {
                (
                    n["name"].as_str().unwrap().to_string(),
                    n["agent"]["pid"].as_u64().unwrap() as u32,
                )
            })
            .collect()
    }

    pub fn log(&self, member: &str) -> String {
        std::fs::read_to_string(self.lab_dir().join("logs").join(format!("{member}.log")))
            .unwrap_or_default()
    }

    fn tails(&self) -> String {
        let mut s = String::new();
        for m in std::iter::once("server".to_string()).chain(self.nodes.iter().cloned()) {
            let log = self.log(&m);
            // Warnings first: the start of a failure is rarely in the last lines.
            let warnings: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                .collect();
            s += &format!(
                "--- {m} (last 20 warnings) ---\n{}",
                tail(&warnings.join("\n"), 20)
            );
            s += &format!("--- {m} (last 25 lines) ---\n{}", tail(&log, 25));
        }
        s
    }

    /// A failed test's whole logs and the cluster's events, kept under
    /// `target/lab-failures/<lab>/` (CI prints the tails; the rest is there to read after).
    fn keep_logs(&self) {
        let keep = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("target/lab-failures")
            .join(&self.name);
        if std::fs::create_dir_all(&keep).is_err() {
            return;
        }
        if let Ok(rd) = std::fs::read_dir(self.lab_dir().join("logs")) {
            for e in rd.flatten() {
                let _ = std::fs::copy(e.path(), keep.join(e.file_name()));
            }
        }
        let events = self.kubectl(&[
            "get",
            "events",
            "-A",
            "-o",
            "wide",
            "--sort-by=.lastTimestamp",
        ]);
        let _ = std::fs::write(keep.join("events.txt"), &events.stdout);
        // Every pod's container logs, the previous instance's too (a crash loop's reason).
        let pods = self.kubectl(&[
            "get",
            "pods",
            "-A",
            "-o",
            "jsonpath={range .items[*]}{.metadata.namespace} {.metadata.name}{\"\\n\"}{end}",
        ]);
        for l in String::from_utf8_lossy(&pods.stdout).lines() {
            let Some((ns, name)) = l.split_once(' ') else {
                continue;
            };
            let mut text = Vec::new();
            for prev in ["--previous=false", "--previous=true"] {
                let o = self.kubectl(&["-n", ns, "logs", name, "--all-containers", prev]);
                text.extend_from_slice(format!("--- {prev}\n").as_bytes());
                text.extend_from_slice(&o.stdout);
                text.extend_from_slice(&o.stderr);
            }
            let _ = std::fs::write(keep.join(format!("pod-{ns}-{name}.log")), text);
        }
        eprintln!("whole logs kept in {}", keep.display());
    }

    /// `keelson lab stop|start MEMBER` (`server` or a node name).
    pub fn lab(&self, verb: &str, member: &str) {
        let out = keelson()
            .args(["lab", verb, member, "--name", &self.name, "--data-dir"])
            .arg(self.lab_dir())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "lab {verb} {member}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Runs a busybox applet in a node's namespace (the host's busybox-static).
    pub fn node_exec(&self, node: &str, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", node, "/bin/busybox"])
            .args(args)
            .output()
            .unwrap()
    }

    /// Pods of `selector` as (name, node, ip, ready) from kubectl.
    pub fn pods(&self, selector: &str) -> Vec<(String, String, String, bool)> {
        let out = self.ok(&[
            "get",
            "pods",
            "-l",
            selector,
            "-o",
            "jsonpath={range .items[*]}{.metadata.name} {.spec.nodeName} {.status.podIP} {.status.conditions[?(@.type==\"Ready\")].status} {.metadata.deletionTimestamp}{\"\\n\"}{end}",
        ]);
        out.lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                // Terminating pods (a deletionTimestamp) are left out, as kubectl's READY would.
                (f.len() >= 5 && f[4].is_empty()).then(|| {
                    (
                        f[0].to_string(),
                        f[1].to_string(),
                        f[2].to_string(),
                        f[3] == "True",
                    )
                })
            })
            .collect()
    }

    /// Waits until `n` pods of `selector` are Ready; returns them.
    pub fn wait_ready(
        &self,
        selector: &str,
        n: usize,
        secs: u64,
    ) -> Vec<(String, String, String, bool)> {
        let mut pods = vec![];
        self.until(secs, &format!("{n} ready pods with {selector}"), || {
            pods = self.pods(selector);
            pods.len() == n && pods.iter().all(|p| p.3)
        });
        pods
    }
}

impl Kubectl for Cluster {
    fn kubeconfig(&self) -> PathBuf {
        self.lab_dir().join("kubeconfig.yaml")
    }
    fn home(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }
    fn diagnostics(&self) -> String {
        self.tails()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.tails());
            self.keep_logs();
        }
        let out = keelson()
            .args(["lab", "down", "--name", &self.name, "--data-dir"])
            .arg(self.lab_dir())
            .output();
        if let Ok(o) = &out
            && !o.status.success()
        {
            eprintln!("lab down: {}", String::from_utf8_lossy(&o.stderr));
        }
    }
}
