//! `keelson up` as the README's main job runs it: in a network namespace of the test's own
//! (no route out), with a private containerd. It starts, shows progress and the kubeconfig; a
//! Deployment behind a Service answers through the ClusterIP and the NodePort; Ctrl-C stops it;
//! a second `up` on the same directory adopts the running pods; `keelson down --purge` removes
//! everything.
mod common;

use std::{
    cell::{OnceCell, RefCell},
    io::{BufRead, BufReader, Read},
    path::PathBuf,
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
/// A resolv.conf naming no server: the node's cluster DNS forwards nowhere (never to the
/// machine's resolver).
fn no_upstream(dir: &std::path::Path) -> std::path::PathBuf {
    let p = dir.with_extension("resolv.conf");
    std::fs::write(&p, "# no upstream DNS in tests\n").unwrap();
    p
}

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
            .arg(format!(
                "--agent-arg=--resolv-conf={}",
                no_upstream(dir).display()
            ))
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

/// `keelson up` in a network namespace of the test's own, on a data directory in a temporary
/// directory. (Fields drop in order: `up` stops before the directory and the namespace go.)
struct UpLab {
    /// The first `keelson up`, until Ctrl-C takes it.
    up: RefCell<Option<Up>>,
    /// What the first `up` served, recorded for the second.
    first: OnceCell<Served>,
    dir: PathBuf,
    kubeconfig: PathBuf,
    tmp: tempfile::TempDir,
    ns: Netns,
}

/// The web Service's ClusterIP and the web pods' containers under the first `up`.
struct Served {
    cip: String,
    pods_before: String,
}

impl UpLab {
    /// kubectl in the namespace, with `stdin` if any: (success, stdout, stderr).
    fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
        let mut c = self.ns.cmd("kubectl");
        c.args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("HOME", self.tmp.path())
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
    }

    /// kubectl's `-o jsonpath=PATH` for `args`, which must succeed.
    fn jp(&self, args: &[&str], path: &str) -> String {
        let mut a = args.to_vec();
        let p = format!("jsonpath={path}");
        a.extend(["-o", p.as_str()]);
        let (ok, out, err) = self.kubectl(&a, None);
        assert!(ok, "{err}");
        out
    }

    /// What `url` answers in the namespace ("" if nothing within 5 s).
    fn wget(&self, url: &str) -> String {
        let o = self
            .ns
            .cmd("timeout")
            .args(["5", "/bin/busybox", "wget", "-qO-", url])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).to_string()
    }

    /// The web pods' names and container IDs.
    fn web_containers(&self) -> String {
        self.jp(
            &["get", "pods", "-l", "app=web"],
            "{range .items[*]}{.metadata.name}={.status.containerStatuses[0].containerID}{\"\\n\"}{end}",
        )
    }

    /// The first `up`'s progress so far.
    fn progress(&self) -> String {
        self.up
            .borrow()
            .as_ref()
            .expect("the first keelson up runs")
            .progress()
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
    let up = Up::start(&ns, &dir);
    let lab = UpLab {
        up: RefCell::new(Some(up)),
        first: OnceCell::new(),
        dir,
        kubeconfig,
        tmp,
        ns,
    };
    crate::scenarios!(&lab;
        up_shows_its_progress_and_down_refuses_while_it_runs,
        a_deployment_answers_through_the_cluster_ip_and_the_node_port,
        ctrl_c_stops_up_cleanly,
        a_second_up_on_the_same_directory_adopts_the_pods_still_serving,
        down_purge_leaves_no_container_and_no_data_directory,
    );
}

/// `up` shows its progress (a private containerd, the API server, Ready); `down` refuses while
/// `up` runs.
fn up_shows_its_progress_and_down_refuses_while_it_runs(lab: &UpLab) {
    let p = lab.progress();
    for want in [
        "containerd: started a private one",
        "API server on",
        "Ready",
    ] {
        assert!(p.contains(want), "progress shows {want:?}:\n{p}");
    }
    // `down` refuses while `up` runs.
    let o = lab
        .ns
        .cmd(keelson())
        .args(["down", "--data-dir"])
        .arg(&lab.dir)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("still running"));
}

/// A Deployment behind a NodePort Service: both replicas answer through the ClusterIP, and the
/// NodePort answers. Records the ClusterIP and the pods' containers for the second `up`.
fn a_deployment_answers_through_the_cluster_ip_and_the_node_port(lab: &UpLab) {
    let (ok, _, err) = lab.kubectl(
        &["apply", "-f", "-"],
        Some(&common::web(2, Some("NodePort"))),
    );
    assert!(ok, "{err}");
    let (ok, _, err) = lab.kubectl(
        &["rollout", "status", "deployment/web", "--timeout=120s"],
        None,
    );
    assert!(ok, "{err}\n{}", lab.progress());
    let cip = lab.jp(&["get", "service", "web"], "{.spec.clusterIP}");
    let port = lab.jp(&["get", "service", "web"], "{.spec.ports[0].nodePort}");
    let node_ip = lab.jp(
        &["get", "nodes"],
        "{.items[0].status.addresses[?(@.type==\"InternalIP\")].address}",
    );
    let pods_before = lab.web_containers();
    let mut seen = std::collections::BTreeSet::new();
    let t0 = Instant::now();
    while seen.len() < 2 && t0.elapsed() < Duration::from_secs(30) {
        let a = lab.wget(&format!("http://{cip}/"));
        if a.starts_with("hello from web-") {
            seen.insert(a);
        }
    }
    assert_eq!(
        seen.len(),
        2,
        "both replicas answered through the ClusterIP {cip}"
    );
    assert!(
        lab.wget(&format!("http://{node_ip}:{port}/"))
            .starts_with("hello from web-")
    );
    let served = Served { cip, pods_before };
    assert!(lab.first.set(served).is_ok(), "recorded once");
}

/// Ctrl-C stops it cleanly.
fn ctrl_c_stops_up_cleanly(lab: &UpLab) {
    let up = lab.up.take().expect("the first keelson up runs");
    let (st, progress) = up.interrupt();
    assert!(st.success(), "exit status {st:?}:\n{progress}");
    assert!(progress.contains("stopped"), "{progress}");
}

/// Again on the same directory: the same pods, adopted, still serving. (Builds on the
/// Deployment of the first `up`, stopped by Ctrl-C.)
fn a_second_up_on_the_same_directory_adopts_the_pods_still_serving(lab: &UpLab) {
    let Served { cip, pods_before } = lab.first.get().expect("the first up's Service recorded");
    let up = Up::start(&lab.ns, &lab.dir);
    let (ok, _, err) = lab.kubectl(
        &["rollout", "status", "deployment/web", "--timeout=120s"],
        None,
    );
    assert!(ok, "{err}");
    let t0 = Instant::now();
    let mut after = String::new();
    while t0.elapsed() < Duration::from_secs(30) {
        after = lab.web_containers();
        if after == *pods_before {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(
        after, *pods_before,
        "the second up adopted the same containers"
    );
    let t0 = Instant::now();
    let mut a = String::new();
    while t0.elapsed() < Duration::from_secs(30) && !a.starts_with("hello from web-") {
        a = lab.wget(&format!("http://{cip}/"));
    }
    assert!(a.starts_with("hello from web-"), "{a}\n{}", up.progress());
    let (st, progress) = up.interrupt();
    assert!(st.success(), "{progress}");
}

/// down --purge: no container, no data directory left.
fn down_purge_leaves_no_container_and_no_data_directory(lab: &UpLab) {
    let o = lab
        .ns
        .cmd(keelson())
        .args(["down", "--purge", "--data-dir"])
        .arg(&lab.dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("containers removed"), "{err}");
    assert!(!err.contains(" 0 containers removed"), "{err}");
    assert!(!lab.dir.exists(), "the data directory is gone");
}
