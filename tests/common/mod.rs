//! The integration-test lab: a private containerd (own root, state and socket under a temp
//! dir), a node network namespace with no route out, a busybox image packed from Debian's
//! busybox-static with `keelson image pack`, and the agent started inside the node namespace.
//! Everything it starts is stopped and removed on drop, also when a test fails.
#![allow(dead_code)]

use std::{
    io::{Read, Write},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Pod;

pub mod cluster;
pub mod dns;
pub mod floor;
pub mod kubectl;
pub mod registry;
pub mod scenario;
pub mod server;

pub use kubectl::Kubectl;
pub use server::Server;

/// An agent in a [`Lab`] joined to a [`Server`] there: kubectl goes to the server, failures
/// show both logs.
pub struct Joined {
    pub lab: Lab,
    pub server: Server,
}

impl Kubectl for Joined {
    fn kubeconfig(&self) -> PathBuf {
        self.server.kubeconfig()
    }
    fn home(&self) -> PathBuf {
        self.server.home()
    }
    fn netns(&self) -> Option<String> {
        self.server.netns()
    }
    fn diagnostics(&self) -> String {
        format!(
            "agent log tail:\n{}\n{}",
            kubectl::tail(&self.lab.agent_log(), 25),
            self.server.diagnostics()
        )
    }
}

pub const BUSYBOX: &str = "keelson.local/busybox:1";
pub const NS: &str = "k8s.keelson.io";

/// A child process killed (SIGKILL) and reaped when dropped, also when a test fails.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn keelson_bin() -> &'static str {
    env!("CARGO_BIN_EXE_keelson")
}

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "keelson's integration tests need root (containerd, runc, network namespaces); run them with sudo"
    );
}

pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Builds the busybox image archive (once per test binary) and returns its path.
pub fn busybox_archive(dir: &Path) -> PathBuf {
    let rootfs = dir.join("busybox-rootfs");
    for d in ["bin", "tmp", "etc", "www", "proc", "sys", "dev", "root"] {
        std::fs::create_dir_all(rootfs.join(d)).unwrap();
    }
    std::fs::set_permissions(
        rootfs.join("tmp"),
        std::os::unix::fs::PermissionsExt::from_mode(0o1777),
    )
    .unwrap();
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox"))
        .expect("busybox-static is installed at /bin/busybox");
    for applet in [
        "sh",
        "httpd",
        "nc",
        "wget",
        "sleep",
        "echo",
        "cat",
        "ls",
        "true",
        "false",
        "env",
        "id",
        "hostname",
        "ip",
        "kill",
        "ps",
        "touch",
        "mkdir",
        "rm",
        "dd",
        "head",
        "tail",
        "date",
        "grep",
        "seq",
        "test",
        "[",
        "printf",
        "yes",
        "wc",
        "stat",
        "mount",
        "tr",
        "timeout",
        "tar",
        "sha256sum",
        "stty",
        "sed",
        "nslookup",
    ] {
        let _ = std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet));
    }
    std::fs::write(
        rootfs.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    )
    .unwrap();
    std::fs::write(rootfs.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n").unwrap();
    let out = dir.join("busybox.tar");
    run(Command::new(keelson_bin())
        .args(["image", "pack", "--rootfs"])
        .arg(&rootfs)
        .args(["--name", BUSYBOX, "--cmd", "sh", "-o"])
        .arg(&out));
    out
}

/// A Deployment `web` of busybox httpd pods answering `hello from <pod name>` on 8080, Ready
/// once they listen; with a Service `web` (port 80, of `service_type`) in front when given.
pub fn web(replicas: usize, service_type: Option<&str>) -> String {
    let mut y = format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  replicas: {replicas}
  selector:
    matchLabels: {{app: web}}
  template:
    metadata:
      labels: {{app: web}}
    spec:
      terminationGracePeriodSeconds: 2
      containers:
      - name: httpd
        image: {BUSYBOX}
        command: ["sh", "-c", "echo hello from $(hostname) > /www/index.html; exec httpd -f -p 8080 -h /www"]
        readinessProbe:
          tcpSocket: {{port: 8080}}
          periodSeconds: 1
"#
    );
    if let Some(t) = service_type {
        y += &format!(
            r#"---
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  type: {t}
  selector: {{app: web}}
  ports:
  - port: 80
    targetPort: 8080
"#
        );
    }
    y
}

/// A private containerd, a node namespace and (optionally) a running agent.
pub struct Lab {
    pub dir: tempfile::TempDir,
    pub netns: String,
    pub pod_cidr: String,
    containerd: Option<Child>,
    agent: Option<Child>,
    /// The keelson binary the agent runs (default: the one cargo built for this test).
    agent_bin: PathBuf,
}

impl Lab {
    pub fn socket(&self) -> PathBuf {
        keelson::lab::ContainerdPaths::new(self.dir.path()).socket()
    }
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }
    /// The node's resolv.conf: no upstream DNS (never the machine's resolver).
    pub fn resolv_conf(&self) -> PathBuf {
        let p = self.dir.path().join("resolv.conf");
        if !p.exists() {
            std::fs::write(&p, "# no upstream DNS in tests\n").unwrap();
        }
        p
    }

    pub fn manifests(&self) -> PathBuf {
        self.dir.path().join("manifests")
    }
    pub fn log_dir(&self) -> PathBuf {
        self.dir.path().join("logs")
    }

    /// Starts containerd and the node namespace; packs busybox into the agent's images dir.
    pub fn start(name: &str) -> Lab {
        Self::start_with(name, None)
    }

    /// A lab whose containerd keeps its content and snapshots on a tmpfs of `mib` MiB (a small
    /// image filesystem, for image GC).
    pub fn start_with_image_fs(name: &str, mib: u32) -> Lab {
        Self::start_with(name, Some(mib))
    }

    fn start_with(name: &str, image_fs_mib: Option<u32>) -> Lab {
        require_root();
        let dir = tempfile::Builder::new()
            .prefix(&format!("keelson-{name}-"))
            .tempdir()
            .unwrap();
        let p = dir.path().to_path_buf();
        let p = p.as_path();
        let cd = keelson::lab::ContainerdPaths::new(p);
        std::fs::create_dir_all(&cd.dir).unwrap();
        std::fs::write(cd.config(), cd.config_text()).unwrap();
        if let Some(mib) = image_fs_mib {
            let root = cd.dir.join("root");
            std::fs::create_dir_all(&root).unwrap();
            run(Command::new("mount")
                .args([
                    "-t",
                    "tmpfs",
                    "-o",
                    &format!("size={mib}m"),
                    "keelson-imagefs",
                ])
                .arg(&root));
        }
        let log = std::fs::File::create(cd.log()).unwrap();
        let containerd = Command::new("containerd")
            .arg("--config")
            .arg(cd.config())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("containerd is installed");
        let suffix = &hex::encode(rand_bytes())[..6];
        let netns = format!("kt-{}-{suffix}", &name[..name.len().min(6)]);
        run(Command::new("ip").args(["netns", "add", &netns]));
        run(Command::new("ip").args(["-n", &netns, "link", "set", "lo", "up"]));
        for d in ["data/images", "manifests", "logs"] {
            std::fs::create_dir_all(p.join(d)).unwrap();
        }
        let lab = Lab {
            dir,
            netns,
            pod_cidr: "10.77.0.0/24".into(),
            containerd: Some(containerd),
            agent: None,
            agent_bin: keelson_bin().into(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !lab.socket().exists() {
            assert!(
                Instant::now() < deadline,
                "containerd did not start; see {}",
                keelson::lab::ContainerdPaths::new(p).log().display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let ar = busybox_archive(p);
        std::fs::rename(ar, lab.data_dir().join("images/busybox.tar")).unwrap();
        lab
    }

    /// Starts (or restarts) the agent inside the node namespace.
    pub fn start_agent(&mut self) {
        self.start_agent_with(&["--standalone"]);
    }

    /// Starts the agent with `mode` (`--standalone`, or the flags that join a cluster).
    pub fn start_agent_with(&mut self, mode: &[&str]) {
        assert!(self.agent.is_none(), "agent already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("agent.log"))
            .unwrap();
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.netns))
            .arg(&self.agent_bin)
            .arg("agent")
            .args(mode)
            .args(["--node-name", "node1", "--pod-cidr", &self.pod_cidr])
            .arg("--manifests")
            .arg(self.manifests())
            .arg("--containerd")
            .arg(self.socket())
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--log-dir")
            .arg(self.log_dir())
            .args(["--rescan-seconds", "2", "--resync-seconds", "2"])
            .arg("--resolv-conf")
            .arg(self.resolv_conf())
            .env(
                "RUST_LOG",
                std::env::var("KEELSON_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start agent");
        self.agent = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.get("/healthz").is_err() {
            assert!(
                Instant::now() < deadline,
                "agent did not come up:\n{}",
                self.agent_log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs the agent from `bin` (another build of keelson) from its next start on.
    pub fn set_agent_bin(&mut self, bin: &Path) {
        self.agent_bin = bin.into();
    }

    /// Starts the agent joined to `server` (which listens in this lab's namespace) with its
    /// join token and CA, plus `extra` flags.
    pub fn join(&mut self, server: &Server, extra: &[&str]) {
        let (url, token, ca) = (server.url(), server.node_token_file(), server.ca_file());
        let mut args = vec![
            "--server",
            url.as_str(),
            "--token-file",
            token.to_str().unwrap(),
            "--ca-file",
            ca.to_str().unwrap(),
        ];
        args.extend(extra);
        self.start_agent_with(&args);
    }

    /// Kills the agent with SIGKILL (pods keep running).
    pub fn kill_agent(&mut self) {
        if let Some(mut a) = self.agent.take() {
            let _ = a.kill();
            let _ = a.wait();
        }
    }

    /// The agent's pid (the process nsenter became).
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(|a| a.id())
    }

    pub fn agent_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    pub fn write_manifest(&self, file: &str, yaml: &str) {
        // Write then rename, as editors and config tools do.
        let tmp = self.manifests().join(format!(".{file}.tmp"));
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(tmp, self.manifests().join(file)).unwrap();
    }

    pub fn remove_manifest(&self, file: &str) {
        std::fs::remove_file(self.manifests().join(file)).unwrap();
    }

    /// GET on the agent's unix socket: (status, body).
    pub fn get(&self, path: &str) -> std::io::Result<(u16, String)> {
        let mut s = std::os::unix::net::UnixStream::connect(self.data_dir().join("agent.sock"))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
        let mut resp = Vec::new();
        s.read_to_end(&mut resp)?;
        let text = String::from_utf8_lossy(&resp).to_string();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let code = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        Ok((code, body.to_string()))
    }

    pub fn pods(&self) -> Vec<Pod> {
        let Ok((200, body)) = self.get("/pods") else {
            return vec![];
        };
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        serde_json::from_value(v["items"].clone()).unwrap()
    }

    /// The pod named `name` (without the node suffix).
    pub fn pod(&self, name: &str) -> Option<Pod> {
        let full = format!("{name}-node1");
        self.pods()
            .into_iter()
            .find(|p| p.metadata.name.as_deref() == Some(&full))
    }

    /// Waits until `cond` holds for the pod, or panics with the pod and the agent log.
    pub fn wait_pod(
        &self,
        name: &str,
        what: &str,
        timeout: Duration,
        cond: impl Fn(&Pod) -> bool,
    ) -> Pod {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(p) = self.pod(name)
                && cond(&p)
            {
                return p;
            }
            if Instant::now() > deadline {
                panic!(
                    "pod {name}: timed out waiting for {what}; pod = {}\nagent log:\n{}",
                    serde_json::to_string_pretty(&self.pod(name)).unwrap(),
                    self.agent_log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for the pod to be Ready.
    pub fn wait_ready(&self, name: &str) -> Pod {
        self.wait_pod(name, "Ready", Duration::from_secs(60), is_ready)
    }

    /// Runs a command in the node namespace (busybox applets from the host's busybox-static).
    pub fn node_exec(&self, args: &[&str]) -> std::process::Output {
        Command::new("ip")
            .args(["netns", "exec", &self.netns, "/bin/busybox"])
            .args(args)
            .output()
            .unwrap()
    }

    /// HTTP GET from the node namespace; the body, or None if the connection failed.
    pub fn node_http(&self, url: &str) -> Option<String> {
        // (busybox-static's `wget -T` crashes; bound the time with `timeout` instead.)
        let out = self.node_exec(&["timeout", "5", "/bin/busybox", "wget", "-qO-", url]);
        if !out.status.success() {
            eprintln!("wget {url}: {}", String::from_utf8_lossy(&out.stderr));
        }
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).to_string())
    }

    /// The IPAM allocations on disk (address files).
    pub fn allocated_ips(&self) -> Vec<String> {
        let dir = self
            .data_dir()
            .join("ipam")
            .join(self.pod_cidr.replace('/', "_"));
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().to_string())
                    .filter(|n| n.parse::<std::net::Ipv4Addr>().is_ok())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// containerd's view: container IDs in the agent's namespace.
    pub fn containers(&self) -> Vec<String> {
        let out = Command::new("ctr")
            .arg("-a")
            .arg(self.socket())
            .args(["-n", NS, "containers", "ls", "-q"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Links in the node namespace.
    pub fn node_links(&self) -> String {
        String::from_utf8_lossy(
            &Command::new("ip")
                .args(["-n", &self.netns, "-o", "link"])
                .output()
                .unwrap()
                .stdout,
        )
        .to_string()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Ok(c) =
                std::fs::read_to_string(keelson::lab::ContainerdPaths::new(self.dir.path()).log())
            {
                eprintln!(
                    "--- containerd log (last 30 lines) ---\n{}",
                    kubectl::tail(&c, 30)
                );
            }
            eprintln!(
                "--- agent log (last 80 lines) ---\n{}",
                kubectl::tail(&self.agent_log(), 80)
            );
        }
        self.kill_agent();
        // Stop every task and container this lab's containerd runs, then containerd itself.
        let ctr = |args: &[&str]| {
            Command::new("ctr")
                .arg("-a")
                .arg(self.socket())
                .args(["-n", NS])
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
        };
        for id in self.containers() {
            let _ = ctr(&["tasks", "kill", "-s", "SIGKILL", &id]);
        }
        std::thread::sleep(Duration::from_millis(300));
        for id in self.containers() {
            let _ = ctr(&["tasks", "delete", "-f", &id]);
            let _ = ctr(&["containers", "delete", &id]);
        }
        if let Some(mut c) = self.containerd.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        // Last resort: shims of this lab's containerd that outlived it (their tasks are gone). A
        // shim being started while containerd stopped can appear a moment later: look twice.
        for _ in 0..2 {
            keelson::lab::kill_shims_of(&self.socket());
            std::thread::sleep(Duration::from_millis(300));
        }
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.netns])
            .status();
        // tmpfs emptyDirs and snapshot mounts under the lab dir, if anything was left mounted.
        keelson::lab::unmount_under(self.dir.path());
    }
}

/// Runs `f` on a thread that entered the network namespace `/run/netns/NAME`.
pub fn in_netns<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> T {
    use std::os::fd::AsFd;
    std::thread::scope(|s| {
        s.spawn(|| {
            let ns = std::fs::File::open(format!("/run/netns/{name}")).unwrap();
            nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
        .join()
        .unwrap()
    })
}

fn rand_bytes() -> [u8; 8] {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).unwrap();
    b
}

pub fn is_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

pub fn phase(p: &Pod) -> String {
    p.status
        .as_ref()
        .and_then(|s| s.phase.clone())
        .unwrap_or_default()
}

pub fn pod_ip(p: &Pod) -> String {
    p.status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .expect("pod has an IP")
}

/// The status of container `name` (app or init).
pub fn cstatus(p: &Pod, name: &str) -> k8s_openapi::api::core::v1::ContainerStatus {
    let st = p.status.as_ref().expect("status");
    st.container_statuses
        .iter()
        .flatten()
        .chain(st.init_container_statuses.iter().flatten())
        .find(|c| c.name == name)
        .cloned()
        .unwrap_or_else(|| panic!("no status for container {name}"))
}

pub fn restarts(p: &Pod, name: &str) -> i32 {
    cstatus(p, name).restart_count
}

pub fn waiting_reason(p: &Pod, name: &str) -> Option<String> {
    cstatus(p, name)
        .state
        .and_then(|s| s.waiting)
        .and_then(|w| w.reason)
}

pub fn terminated(
    p: &Pod,
    name: &str,
) -> Option<k8s_openapi::api::core::v1::ContainerStateTerminated> {
    cstatus(p, name).state.and_then(|s| s.terminated)
}

/// A minimal pod manifest with one busybox container running `script`.
pub fn pod_yaml(name: &str, script: &str, extra_container: &str, extra_spec: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n{extra_spec}  containers:\n  - name: main\n    image: {BUSYBOX}\n    command: [\"sh\", \"-c\", {script:?}]\n{extra_container}"
    )
}

/// A private key and a certificate request for `subject` (`/O=.../CN=...`), made with
/// openssl as an outside client would (`extra`: more `openssl req` arguments, e.g. SANs).
pub fn openssl_request(key: &Path, csr: &Path, subject: &str, extra: &[&str]) {
    let o = Command::new("openssl")
        .args([
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-keyout"])
        .arg(key)
        .arg("-out")
        .arg(csr)
        .args(["-subj", subject])
        .args(extra)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// A kubeconfig for the cluster of `admin` (a kubeconfig file: its server and CA) whose user is
/// the client certificate `cert_pem` with `key_pem`.
pub fn client_cert_kubeconfig(admin: &Path, cert_pem: &[u8], key_pem: &[u8]) -> String {
    use base64::Engine;
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let admin = std::fs::read_to_string(admin).unwrap();
    let field = |k: &str| {
        admin
            .lines()
            .find_map(|l| l.trim().strip_prefix(k))
            .unwrap()
            .trim()
            .to_string()
    };
    format!(
        "apiVersion: v1\nkind: Config\nclusters: [{{name: c, cluster: {{server: \"{}\", certificate-authority-data: {}}}}}]\nusers: [{{name: node, user: {{client-certificate-data: {}, client-key-data: {}}}}}]\ncontexts: [{{name: node, context: {{cluster: c, user: node}}}}]\ncurrent-context: node\n",
        field("server:"),
        field("certificate-authority-data:"),
        b64(cert_pem),
        b64(key_pem),
    )
}
