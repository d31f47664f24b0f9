//! `keelson up` as the README's main job runs it: in a network namespace of the test's own
//! (no route out), with a private containerd. It starts, shows progress and the kubeconfig; a
//! Deployment behind a Service answers through the ClusterIP and the NodePort; Ctrl-C stops it;
//! a second `up` on the same directory adopts the running pods; `keelson down --purge` removes
//! everything.
mod common;

use std::{
    io::{BufRead, BufReader, Read},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

fn keelson() -> &'static str {
    env!("CARGO_BIN_EXE_keelson")
}

/// A network namespace made (and deleted) by the test.
struct Netns(String);

impl Netns {
    fn new() -> Netns {
        let mut b = [0u8; 3];
        getrandom::fill(&mut b).unwrap();
        let name = format!("kt-up-{}", hex::encode(b));
        let ok = |args: &[&str]| {
            let o = Command::new("ip").args(args).output().unwrap();
            assert!(
                o.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        };
        ok(&["netns", "add", &name]);
        ok(&["-n", &name, "link", "set", "lo", "up"]);
        Netns(name)
    }

    /// `program` in the namespace (nsenter: unlike `ip netns exec` it keeps /sys and its
    /// cgroup mounts, which runc needs).
    fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.0)).arg(program);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.0])
            .output();
    }
}

/// A running `keelson up`: its stderr collected, the kubeconfig line awaited.
struct Up {
    child: Child,
    stderr: Arc<Mutex<String>>,
}

impl Up {
    fn start(ns: &Netns, dir: &std::path::Path) -> Up {
        let mut child = ns
            .cmd(keelson())
            .args(["up", "--data-dir"])
            .arg(dir)
            .args(["--private-containerd", "--busybox", "/bin/busybox"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut e = child.stderr.take().unwrap();
        let s2 = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 1024];
            while let Ok(n) = e.read(&mut buf) {
                if n == 0 {
                    break;
                }
                s2.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let out = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        let t0 = Instant::now();
        loop {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(l) if l.starts_with("export KUBECONFIG=") => break,
                Ok(_) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(_) => panic!(
                    "keelson up ended before it was ready:\n{}",
                    stderr.lock().unwrap()
                ),
            }
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "keelson up not ready after 120 s:\n{}",
                stderr.lock().unwrap()
            );
        }
        // The "Ready" step went to stderr just before; its reader thread may lag the stdout one.
        let t1 = Instant::now();
        while !stderr.lock().unwrap().contains(" Ready (") && t1.elapsed() < Duration::from_secs(10)
        {
            std::thread::sleep(Duration::from_millis(50));
        }
        Up { child, stderr }
    }

    fn progress(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Ctrl-C; the exit status.
    fn interrupt(mut self) -> (std::process::ExitStatus, String) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        // nsenter execs keelson, so the pid is keelson's.
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
        let t0 = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(100));
                return (st, self.progress());
            }
            if t0.elapsed() > Duration::from_secs(40) {
                let _ = self.child.kill();
                panic!("keelson up did not stop on SIGINT:\n{}", self.progress());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn up_serves_a_service_stops_on_ctrl_c_and_comes_back() {
    assert!(nix::unistd::geteuid().is_root(), "this test needs root");
    let ns = Netns::new();
    let tmp = tempfile::Builder::new()
        .prefix("keelson-up-")
        .tempdir()
        .unwrap();
    let dir = tmp.path().join("data");
    let kubeconfig = dir.join("server/kubeconfig.yaml");
    let kubectl = |args: &[&str], stdin: Option<&str>| {
        let mut c = ns.cmd("kubectl");
        c.args(args)
            .env("KUBECONFIG", &kubeconfig)
            .env("HOME", tmp.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().unwrap();
        if let Some(s) = stdin {
            std::io::Write::write_all(&mut child.stdin.take().unwrap(), s.as_bytes()).unwrap();
        } else {
            drop(child.stdin.take());
        }
        let o = child.wait_with_output().unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).to_string(),
            String::from_utf8_lossy(&o.stderr).to_string(),
        )
    };
    let wget = |url: &str| {
        let o = ns
            .cmd("timeout")
            .args(["5", "/bin/busybox", "wget", "-qO-", url])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).to_string()
    };

    let up = Up::start(&ns, &dir);
    let p = up.progress();
    for want in [
        "containerd: started a private one",
        "API server on",
        "Ready",
    ] {
        assert!(p.contains(want), "progress shows {want:?}:\n{p}");
    }
    // `down` refuses while `up` runs.
    let o = ns
        .cmd(keelson())
        .args(["down", "--data-dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("still running"));

    let (ok, _, err) = kubectl(
        &["apply", "-f", "-"],
        Some(&common::web(2, Some("NodePort"))),
    );
    assert!(ok, "{err}");
    let (ok, _, err) = kubectl(
        &["rollout", "status", "deployment/web", "--timeout=120s"],
        None,
    );
    assert!(ok, "{err}\n{}", up.progress());
    let jp = |args: &[&str], path: &str| {
        let mut a = args.to_vec();
        let p = format!("jsonpath={path}");
        a.extend(["-o", p.as_str()]);
        let (ok, out, err) = kubectl(&a, None);
        assert!(ok, "{err}");
        out
    };
    let cip = jp(&["get", "service", "web"], "{.spec.clusterIP}");
    let port = jp(&["get", "service", "web"], "{.spec.ports[0].nodePort}");
    let node_ip = jp(
        &["get", "nodes"],
        "{.items[0].status.addresses[?(@.type==\"InternalIP\")].address}",
    );
    let pods_before = jp(
        &["get", "pods", "-l", "app=web"],
        "{range .items[*]}{.metadata.name}={.status.containerStatuses[0].containerID}{\"\\n\"}{end}",
    );
    let mut seen = std::collections::BTreeSet::new();
    let t0 = Instant::now();
    while seen.len() < 2 && t0.elapsed() < Duration::from_secs(30) {
        let a = wget(&format!("http://{cip}/"));
        if a.starts_with("hello from web-") {
            seen.insert(a);
        }
    }
    assert_eq!(
        seen.len(),
        2,
        "both replicas answered through the ClusterIP {cip}"
    );
    assert!(wget(&format!("http://{node_ip}:{port}/")).starts_with("hello from web-"));

    // Ctrl-C stops it cleanly.
    let (st, progress) = up.interrupt();
    assert!(st.success(), "exit status {st:?}:\n{progress}");
    assert!(progress.contains("stopped"), "{progress}");

    // Again on the same directory: the same pods, adopted, still serving.
    let up = Up::start(&ns, &dir);
    let (ok, _, err) = kubectl(
        &["rollout", "status", "deployment/web", "--timeout=120s"],
        None,
    );
    assert!(ok, "{err}");
    let t0 = Instant::now();
    let mut after = String::new();
    while t0.elapsed() < Duration::from_secs(30) {
        after = jp(
            &["get", "pods", "-l", "app=web"],
            "{range .items[*]}{.metadata.name}={.status.containerStatuses[0].containerID}{\"\\n\"}{end}",
        );
        if after == pods_before {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(
        after, pods_before,
        "the second up adopted the same containers"
    );
    let t0 = Instant::now();
    let mut a = String::new();
    while t0.elapsed() < Duration::from_secs(30) && !a.starts_with("hello from web-") {
        a = wget(&format!("http://{cip}/"));
    }
    assert!(a.starts_with("hello from web-"), "{a}\n{}", up.progress());
    let (st, progress) = up.interrupt();
    assert!(st.success(), "{progress}");

    // down --purge: no container, no data directory left.
    let o = ns
        .cmd(keelson())
        .args(["down", "--purge", "--data-dir"])
        .arg(&dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("containers removed"), "{err}");
    assert!(!err.contains(" 0 containers removed"), "{err}");
    assert!(!dir.exists(), "the data directory is gone");
}
