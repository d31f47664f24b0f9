//! `keelson lab`: a multi-node cluster on one Linux host whose nodes are network namespaces.
//!
//! Layout (see DESIGN.md, "Test lab"): a bridge namespace `NAME-bridge` holding the lab bridge
//! `lab0` (10.250.0.1/24, the API server's address), and one namespace per node `NAME-nodeI`
//! joined to the bridge by a veth (`eth0`, 10.250.0.(10+I)/24). No namespace of the lab has a
//! default route, so nothing in it can reach the machine's network. One private containerd
//! (its own root, state and socket under the lab's directory) serves every node, each node's
//! containers in its own containerd namespace (the node's name). The API server runs in the
//! bridge namespace and is also served on the host's loopback through a socket the lab opens
//! there and hands over (`--listen-fd`), so kubectl on the host reaches it without a single
//! route or address being added to the host's namespace. `DIR/lab.json` records everything
//! the lab made, so `lab down` removes it all, also after a crash.

use std::{
    ffi::OsString,
    fs::{File, OpenOptions},
    net::Ipv4Addr,
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::Node;
use kube::{Api, api::ListParams};
use serde::{Deserialize, Serialize};

/// The lab network (inside the lab's namespaces only).
pub const SUBNET: &str = "10.250.0.0/24";
/// The API server's address on the lab bridge.
pub const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 1);
/// The API server's port on the lab bridge.
pub const SERVER_PORT: u16 = 6443;
/// The lab bridge's name (in the bridge namespace).
pub const BRIDGE: &str = "lab0";

/// The address of node `i` (1-based).
pub fn node_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 250, 0, 10 + i as u8)
}

/// Where a lab keeps its files unless told otherwise.
pub fn default_dir(name: &str) -> PathBuf {
    PathBuf::from("/var/lib/keelson/lab").join(name)
}

/// What `lab up` is asked for.
#[derive(Debug, Clone)]
pub struct UpOptions {
    pub name: String,
    pub nodes: usize,
    pub data_dir: PathBuf,
    /// Image tarballs every node imports.
    pub images: Option<PathBuf>,
    /// Port of the API server on the host's loopback (0: any free port).
    pub port: u16,
    /// Extra flags for the server and for every agent.
    pub server_args: Vec<String>,
    pub agent_args: Vec<String>,
    /// The upstream DNS servers of every node's cluster DNS (and of pods with dnsPolicy
    /// Default): the lab's own resolv.conf names only these, never the machine's resolver.
    pub dns_upstreams: Vec<std::net::IpAddr>,
    /// How long to wait for every node to be Ready.
    pub timeout: Duration,
}

/// A process the lab runs: enough to start it again (`lab start`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Proc {
    pub netns: String,
    pub args: Vec<String>,
    pub log: PathBuf,
    pub pid: Option<u32>,
}

impl Proc {
    /// Whether it runs (and is the process the lab started).
    pub fn running(&self, marker: &Path) -> bool {
        self.pid.is_some_and(|p| ours(p, marker))
    }
}

/// One node of the lab.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabNode {
    pub name: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    pub agent: Proc,
}

/// Everything a lab made (`DIR/lab.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    pub name: String,
    pub data_dir: PathBuf,
    pub bridge_netns: String,
    pub containerd_pid: Option<u32>,
    pub server: Proc,
    /// The API server as the host reaches it.
    pub url: String,
    pub nodes: Vec<LabNode>,
}

impl State {
    pub fn file(dir: &Path) -> PathBuf {
        dir.join("lab.json")
    }
    pub fn load(dir: &Path) -> anyhow::Result<Option<State>> {
        let f = Self::file(dir);
        match std::fs::read(&f) {
            Ok(b) => Ok(Some(
                serde_json::from_slice(&b).with_context(|| format!("{}", f.display()))?,
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", f.display())),
        }
    }
    /// The lab in `dir`, which must exist.
    pub fn require(dir: &Path) -> anyhow::Result<State> {
        Self::load(dir)?.with_context(|| format!("{}: no lab here (no lab.json)", dir.display()))
    }
    fn save(&self) -> anyhow::Result<()> {
        let f = Self::file(&self.data_dir);
        let tmp = f.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &f).with_context(|| format!("writing {}", f.display()))?;
        Ok(())
    }
    pub fn kubeconfig(&self) -> PathBuf {
        self.data_dir.join("kubeconfig.yaml")
    }
}

/// The lab's private containerd.
pub struct ContainerdPaths {
    pub dir: PathBuf,
}

impl ContainerdPaths {
    pub fn new(lab_dir: &Path) -> Self {
        Self {
            dir: lab_dir.join("containerd"),
        }
    }
    pub fn socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }
    pub fn config(&self) -> PathBuf {
        self.dir.join("config.toml")
    }
    pub fn log(&self) -> PathBuf {
        self.dir.join("containerd.log")
    }
    /// A containerd config with its own root, state and sockets, and no CRI plugin.
    pub fn config_text(&self) -> String {
        format!(
            "version = 2\nroot = \"{0}/root\"\nstate = \"{0}/state\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[grpc]\n  address = \"{0}/containerd.sock\"\n[ttrpc]\n  address = \"{0}/containerd.sock.ttrpc\"\n[debug]\n  address = \"{0}/debug.sock\"\n",
            self.dir.display()
        )
    }
}

/// Checks a lab name: it prefixes namespace and node names, so a short DNS label.
pub fn check_name(name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 20
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    anyhow::ensure!(
        ok,
        "--name {name:?}: a lab name is 1-20 characters of a-z, 0-9 and '-' (it prefixes node and namespace names)"
    );
    Ok(())
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running `ip` (is iproute2 installed?)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

/// Starts `program` as a daemon (own session, stdio to `log`) inside network namespace
/// `netns`. `pass` is a descriptor handed over as fd 3.
fn spawn_in(
    netns: &str,
    program: &Path,
    args: &[OsString],
    log: &Path,
    pass: Option<i32>,
) -> anyhow::Result<u32> {
    let ns = File::open(Path::new("/run/netns").join(netns))
        .with_context(|| format!("network namespace {netns}"))?;
    let out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("{}", log.display()))?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    let ns_fd = ns.as_raw_fd();
    // SAFETY: between fork and exec only async-signal-safe calls are made (setsid, setns,
    // dup2, fcntl), on descriptors this process owns and keeps open until spawn returns.
    unsafe {
        cmd.pre_exec(move || {
            let check = |r: i32| {
                if r < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(())
                }
            };
            check(libc::setsid())?;
            check(libc::setns(ns_fd, libc::CLONE_NEWNET))?;
            if let Some(fd) = pass {
                if fd == 3 {
                    check(libc::fcntl(3, libc::F_SETFD, 0))?;
                } else {
                    check(libc::dup2(fd, 3))?;
                }
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {}", program.display()))?;
    Ok(child.id())
}

/// Whether `pid` is alive and its command line mentions `marker` (not a recycled pid).
fn ours(pid: u32, marker: &Path) -> bool {
    let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // A zombie (state Z) is gone for our purposes.
    let zombie = stat
        .rsplit_once(')')
        .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
    !zombie && String::from_utf8_lossy(&cmd).contains(&*marker.to_string_lossy())
}

/// SIGTERM, then SIGKILL after `grace`.
fn stop(pid: u32, marker: &Path, grace: Duration) {
    use nix::sys::signal::{Signal, kill};
    let p = nix::unistd::Pid::from_raw(pid as i32);
    if !ours(pid, marker) {
        return;
    }
    let _ = kill(p, Signal::SIGTERM);
    let t0 = Instant::now();
    while t0.elapsed() < grace {
        if !ours(pid, marker) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = kill(p, Signal::SIGKILL);
    let t0 = Instant::now();
    while ours(pid, marker) && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> anyhow::Result<()> {
    let t0 = Instant::now();
    while !f() {
        if t0.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn progress(msg: impl std::fmt::Display) {
    eprintln!("lab: {msg}");
}

/// Brings a lab up and returns when every node is Ready. On failure, everything made so far
/// is removed again.
pub async fn up(o: &UpOptions) -> anyhow::Result<State> {
    check_name(&o.name)?;
    anyhow::ensure!(
        (1..=50).contains(&o.nodes),
        "--nodes {}: between 1 and 50",
        o.nodes
    );
    if let Some(s) = State::load(&o.data_dir)? {
        if s.server.running(&s.data_dir) {
            bail!(
                "lab {} is already up (data dir {}); `keelson lab down --data-dir {}` first",
                s.name,
                s.data_dir.display(),
                s.data_dir.display()
            );
        }
        progress(format!("removing the remains of an earlier lab {}", s.name));
        down(&o.data_dir).await?;
    } else if o.data_dir.read_dir().is_ok_and(|mut d| d.next().is_some()) {
        bail!(
            "--data-dir {}: not empty and not a lab's directory; give a new or empty directory",
            o.data_dir.display()
        );
    }
    let taken: Vec<String> = std::iter::once(format!("{}-bridge", o.name))
        .chain((1..=o.nodes).map(|i| format!("{}-node{i}", o.name)))
        .filter(|n| netns_exists(n))
        .collect();
    anyhow::ensure!(
        taken.is_empty(),
        "network namespaces {taken:?} exist already: another lab named {:?}? (`keelson lab down --name {}`)",
        o.name,
        o.name
    );
    std::fs::create_dir_all(&o.data_dir)
        .with_context(|| format!("creating {}", o.data_dir.display()))?;
    let data_dir = o
        .data_dir
        .canonicalize()
        .with_context(|| format!("{}", o.data_dir.display()))?;
    let mut st = State {
        name: o.name.clone(),
        data_dir: data_dir.clone(),
        bridge_netns: format!("{}-bridge", o.name),
        containerd_pid: None,
        server: Proc::default(),
        url: String::new(),
        nodes: (1..=o.nodes)
            .map(|i| LabNode {
                name: format!("{}-node{i}", o.name),
                netns: format!("{}-node{i}", o.name),
                ip: node_ip(i),
                agent: Proc::default(),
            })
            .collect(),
    };
    st.save()?;
    match build(o, &mut st).await {
        Ok(()) => Ok(st),
        Err(e) => {
            progress(format!("failed: {e:#}; removing what was made"));
            let logs = st.data_dir.join("logs");
            if let Err(d) = down(&st.data_dir).await {
                progress(format!("cleaning up: {d:#}"));
            }
            Err(e.context(format!(
                "lab {} did not come up (logs were in {})",
                o.name,
                logs.display()
            )))
        }
    }
}

async fn build(o: &UpOptions, st: &mut State) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let dir = st.data_dir.clone();
    std::fs::create_dir_all(dir.join("logs"))?;
    build_network(st)?;
    let sock = start_containerd(st, &dir)?;
    start_lab_server(o, st, &dir)?;
    start_agents(o, st, &dir, &sock)?;
    wait_ready(o, st, &dir, t0).await?;
    progress(format!(
        "lab {} up: {} nodes Ready in {:.1} s",
        st.name,
        st.nodes.len(),
        t0.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// The bridge namespace with the lab bridge, and one namespace per node wired to it by a
/// veth pair (no default route anywhere).
fn build_network(st: &State) -> anyhow::Result<()> {
    let br = st.bridge_netns.clone();
    ip(&["netns", "add", &br])?;
    ip(&["-n", &br, "link", "set", "lo", "up"])?;
    ip(&["-n", &br, "link", "add", BRIDGE, "type", "bridge"])?;
    ip(&[
        "-n",
        &br,
        "addr",
        "add",
        &format!("{SERVER_IP}/24"),
        "dev",
        BRIDGE,
    ])?;
    ip(&["-n", &br, "link", "set", BRIDGE, "up"])?;
    for (i, n) in st.nodes.iter().enumerate() {
        let port = format!("node{}", i + 1);
        ip(&["netns", "add", &n.netns])?;
        ip(&["-n", &n.netns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n", &br, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
            &n.netns,
        ])?;
        ip(&["-n", &br, "link", "set", &port, "master", BRIDGE, "up"])?;
        ip(&[
            "-n",
            &n.netns,
            "addr",
            "add",
            &format!("{}/24", n.ip),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &n.netns, "link", "set", "eth0", "up"])?;
    }
    progress(format!(
        "network: {br} with bridge {BRIDGE} ({SUBNET}), {} node namespaces, no default route",
        st.nodes.len()
    ));

    Ok(())
}

/// containerd, in the bridge namespace (it needs no network); its socket.
fn start_containerd(st: &mut State, dir: &Path) -> anyhow::Result<PathBuf> {
    let br = st.bridge_netns.clone();
    let cd = ContainerdPaths::new(dir);
    std::fs::create_dir_all(&cd.dir)?;
    std::fs::write(cd.config(), cd.config_text())?;
    let pid = spawn_in(
        &br,
        Path::new("containerd"),
        &["--config".into(), cd.config().into()],
        &cd.log(),
        None,
    )
    .context("containerd (is it installed?)")?;
    st.containerd_pid = Some(pid);
    st.save()?;
    let sock = cd.socket();
    wait_for("containerd's socket", Duration::from_secs(30), || {
        sock.exists()
    })
    .with_context(|| format!("see {}", cd.log().display()))?;
    progress(format!(
        "containerd running (pid {pid}, socket {})",
        sock.display()
    ));

    Ok(sock)
}

/// The API server, in the bridge namespace, also served on the host's loopback; the lab's
/// kubeconfig names the loopback address.
fn start_lab_server(o: &UpOptions, st: &mut State, dir: &Path) -> anyhow::Result<()> {
    let br = st.bridge_netns.clone();
    let logs = dir.join("logs");
    let host = std::net::TcpListener::bind(("127.0.0.1", o.port))
        .with_context(|| format!("listening on 127.0.0.1:{}", o.port))?;
    let host_addr = host.local_addr()?;
    let sdir = dir.join("server");
    std::fs::create_dir_all(&sdir)?;
    let _ = std::fs::remove_file(sdir.join("kubeconfig.yaml"));
    let d = |p: &Path| p.to_string_lossy().to_string();
    let mut args: Vec<String> = vec![
        "server".into(),
        "--data-dir".into(),
        d(&sdir),
        "--listen".into(),
        format!("{SERVER_IP}:{SERVER_PORT}"),
        "--listen-fd".into(),
        "3".into(),
    ];
    args.extend(o.server_args.iter().cloned());
    st.server = Proc {
        netns: br.clone(),
        args,
        log: logs.join("server.log"),
        pid: None,
    };
    st.url = format!("https://{host_addr}");
    let pid = start_server(st, host)?;
    let server_kc = sdir.join("kubeconfig.yaml");
    wait_for("the API server", Duration::from_secs(30), || {
        server_kc.exists() || !ours(pid, dir)
    })?;
    anyhow::ensure!(
        ours(pid, dir),
        "the API server exited; see {}",
        st.server.log.display()
    );
    let kc = std::fs::read_to_string(&server_kc)?
        .replace(&format!("https://{SERVER_IP}:{SERVER_PORT}"), &st.url);
    crate::api::pki::write_private(&st.kubeconfig(), &kc)?;
    progress(format!("API server serving at {} (pid {pid})", st.url));

    Ok(())
}

/// The lab's resolv.conf (DIR/resolv.conf): its DNS upstreams only (none by default, so that
/// names outside the cluster fail fast instead of reaching for the machine's resolver).
fn resolv_conf(o: &UpOptions, dir: &Path) -> anyhow::Result<PathBuf> {
    let p = dir.join("resolv.conf");
    let mut text = String::from(
        "# keelson lab: the nodes' upstream DNS servers (keelson lab up --dns-upstream)\n",
    );
    for ip in &o.dns_upstreams {
        text += &format!("nameserver {ip}\n");
    }
    std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))?;
    Ok(p)
}

/// One agent per node, joined with the node token.
fn start_agents(o: &UpOptions, st: &mut State, dir: &Path, sock: &Path) -> anyhow::Result<()> {
    let logs = dir.join("logs");
    let sdir = dir.join("server");
    let d = |p: &Path| p.to_string_lossy().to_string();
    for n in &mut st.nodes {
        let ndir = dir.join("nodes").join(&n.name);
        std::fs::create_dir_all(&ndir)?;
        let mut args: Vec<String> = vec![
            "agent".into(),
            "--server".into(),
            format!("https://{SERVER_IP}:{SERVER_PORT}"),
            "--token-file".into(),
            d(&sdir.join("node-token")),
            "--ca-file".into(),
            d(&sdir.join("pki/ca.crt")),
            "--node-name".into(),
            n.name.clone(),
            "--node-ip".into(),
            n.ip.to_string(),
            "--containerd".into(),
            d(sock),
            "--containerd-namespace".into(),
            n.name.clone(),
            "--data-dir".into(),
            d(&ndir),
            "--log-dir".into(),
            d(&ndir.join("logs")),
        ];
        if let Some(images) = &o.images {
            let images = images
                .canonicalize()
                .with_context(|| format!("--images {}", images.display()))?;
            args.extend(["--images".into(), d(&images)]);
        }
        if !o.agent_args.iter().any(|a| a.starts_with("--resolv-conf")) {
            args.extend(["--resolv-conf".into(), d(&resolv_conf(o, dir)?)]);
        }
        args.extend(o.agent_args.iter().cloned());
        n.agent = Proc {
            netns: n.netns.clone(),
            args,
            log: logs.join(format!("{}.log", n.name)),
            pid: None,
        };
        n.agent.pid = Some(spawn_proc(&n.agent, None)?);
    }
    st.save()?;
    progress(format!("{} agents started", st.nodes.len()));

    Ok(())
}

/// Waits until every node is Ready (an agent that exits is an error at once).
async fn wait_ready(o: &UpOptions, st: &State, dir: &Path, t0: Instant) -> anyhow::Result<()> {
    let client = crate::control::client_from(&st.kubeconfig()).await?;
    let nodes: Api<Node> = Api::all(client);
    let deadline = Instant::now() + o.timeout;
    let mut shown = std::collections::HashSet::new();
    loop {
        for n in &st.nodes {
            anyhow::ensure!(
                n.agent.running(dir),
                "the agent of {} exited; see {}",
                n.name,
                n.agent.log.display()
            );
        }
        let list = nodes.list(&ListParams::default()).await.ok();
        let ready: Vec<String> = list
            .iter()
            .flat_map(|l| &l.items)
            .filter(|n| crate::kinds::node::node_ready(n))
            .filter_map(|n| n.metadata.name.clone())
            .collect();
        for r in &ready {
            if shown.insert(r.clone()) {
                progress(format!(
                    "node {r} Ready ({:.1} s)",
                    t0.elapsed().as_secs_f64()
                ));
            }
        }
        if st.nodes.iter().all(|n| ready.contains(&n.name)) {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "nodes not Ready after {:?}: {:?}",
                o.timeout,
                st.nodes
                    .iter()
                    .filter(|n| !ready.contains(&n.name))
                    .map(|n| &n.name)
                    .collect::<Vec<_>>()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

fn spawn_proc(p: &Proc, pass: Option<i32>) -> anyhow::Result<u32> {
    let me = std::env::current_exe().context("locating the keelson binary")?;
    let args: Vec<OsString> = p.args.iter().map(OsString::from).collect();
    spawn_in(&p.netns, &me, &args, &p.log, pass)
}

/// Starts the API server, serving the host's loopback on `host` as well; records its pid.
fn start_server(st: &mut State, host: std::net::TcpListener) -> anyhow::Result<u32> {
    let pid = spawn_proc(&st.server, Some(host.as_raw_fd()))?;
    drop(host);
    st.server.pid = Some(pid);
    st.save()?;
    Ok(pid)
}

/// What `lab stop` / `lab start` act on.
#[derive(Debug, Clone)]
pub enum Member {
    Server,
    Agent(String),
}

impl std::str::FromStr for Member {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(if s == "server" {
            Member::Server
        } else {
            Member::Agent(s.to_string())
        })
    }
}

/// Kills the server or a node's agent (SIGKILL, like a crash: pods keep running).
pub fn stop_member(dir: &Path, m: &Member) -> anyhow::Result<()> {
    let st = State::require(dir)?;
    let p = member(&st, m)?;
    if let Some(pid) = p.pid.filter(|_| p.running(&st.data_dir)) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let dir = st.data_dir.clone();
        wait_for("the process to exit", Duration::from_secs(10), || {
            !ours(pid, &dir)
        })?;
    }
    Ok(())
}

/// Starts the server or a node's agent again with the flags it had.
pub fn start_member(dir: &Path, m: &Member) -> anyhow::Result<u32> {
    let mut st = State::require(dir)?;
    let p = member(&st, m)?;
    anyhow::ensure!(!p.running(&st.data_dir), "{m:?} is running already");
    match m {
        Member::Server => {
            let port = st
                .url
                .rsplit_once(':')
                .and_then(|(_, p)| p.parse::<u16>().ok())
                .context("lab.json: no server port")?;
            let host = std::net::TcpListener::bind(("127.0.0.1", port))
                .with_context(|| format!("listening on 127.0.0.1:{port}"))?;
            start_server(&mut st, host)
        }
        Member::Agent(name) => {
            let i = st
                .nodes
                .iter()
                .position(|n| &n.name == name)
                .context("no such node")?;
            let pid = spawn_proc(&st.nodes[i].agent, None)?;
            st.nodes[i].agent.pid = Some(pid);
            st.save()?;
            Ok(pid)
        }
    }
}

fn member<'a>(st: &'a State, m: &Member) -> anyhow::Result<&'a Proc> {
    match m {
        Member::Server => Ok(&st.server),
        Member::Agent(n) => st
            .nodes
            .iter()
            .find(|x| &x.name == n)
            .map(|x| &x.agent)
            .with_context(|| {
                format!(
                    "lab {} has no node {n:?} (nodes: {})",
                    st.name,
                    st.nodes
                        .iter()
                        .map(|x| x.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }),
    }
}

/// Removes everything a lab made: agents and server, every container of every node,
/// containerd and its shims, the namespaces, mounts, and the lab's directory.
pub async fn down(dir: &Path) -> anyhow::Result<()> {
    let st = State::load(dir)?.with_context(|| {
        format!(
            "{}: no lab here (no lab.json); `keelson lab down --name NAME` removes a lab's namespaces by name",
            dir.display()
        )
    })?;
    let dir = st.data_dir.clone();
    for pid in st.nodes.iter().filter_map(|n| n.agent.pid) {
        stop(pid, &dir, Duration::from_secs(5));
    }
    if let Some(pid) = st.server.pid {
        stop(pid, &dir, Duration::from_secs(5));
    }
    let cd = ContainerdPaths::new(&dir);
    let mut containerd = st.containerd_pid.filter(|p| ours(*p, &dir));
    // Containers outlive a crashed lab: bring containerd back to remove them properly.
    if containerd.is_none() && cd.config().exists() && netns_exists(&st.bridge_netns) {
        let _ = std::fs::remove_file(cd.socket());
        if let Ok(pid) = spawn_in(
            &st.bridge_netns,
            Path::new("containerd"),
            &["--config".into(), cd.config().into()],
            &cd.log(),
            None,
        ) {
            containerd = Some(pid);
            let sock = cd.socket();
            let _ = wait_for("containerd", Duration::from_secs(20), || sock.exists());
        }
    }
    if containerd.is_some() {
        let mut removed = 0;
        // Every namespace, not only the nodes': agents the lab's pods ran (keelson's agent
        // DaemonSet) have their own.
        let mut namespaces: Vec<String> = st.nodes.iter().map(|n| n.name.clone()).collect();
        if let Ok(rt) = crate::runtime::Containerd::connect(&cd.socket(), "default").await
            && let Ok(all) = rt.namespaces().await
        {
            for n in all {
                if !namespaces.contains(&n) {
                    namespaces.push(n);
                }
            }
        }
        for ns in &namespaces {
            removed += remove_containers(&cd.socket(), ns).await;
        }
        if removed > 0 {
            progress(format!("removed {removed} containers"));
        }
    }
    if let Some(pid) = containerd {
        stop(pid, &dir, Duration::from_secs(10));
    }
    for _ in 0..2 {
        kill_shims_of(&cd.socket());
        std::thread::sleep(Duration::from_millis(200));
    }
    for ns in st
        .nodes
        .iter()
        .map(|n| n.netns.as_str())
        .chain([st.bridge_netns.as_str()])
    {
        if netns_exists(ns) {
            ip(&["netns", "delete", ns])?;
        }
    }
    unmount_under(&dir);
    std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    progress(format!("lab {} removed", st.name));
    Ok(())
}

/// Removes the namespaces of lab `name` when its directory is gone (the last resort).
pub fn down_by_name(name: &str) -> anyhow::Result<usize> {
    check_name(name)?;
    let mut n = 0;
    for e in std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
    {
        let f = e.file_name().to_string_lossy().to_string();
        let Some(rest) = f.strip_prefix(&format!("{name}-")) else {
            continue;
        };
        let ours = rest == "bridge"
            || rest
                .strip_prefix("node")
                .is_some_and(|i| !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()));
        if ours {
            ip(&["netns", "delete", &f])?;
            n += 1;
        }
    }
    Ok(n)
}

async fn remove_containers(socket: &Path, namespace: &str) -> usize {
    let Ok(rt) = crate::runtime::Containerd::connect(socket, namespace).await else {
        return 0;
    };
    let Ok(all) = rt
        .list_with_label(crate::agent::worker::labels::POD_UID)
        .await
    else {
        return 0;
    };
    let n = all.len();
    futures::future::join_all(all.iter().map(|c| async {
        let _ = rt.kill(&c.id, 9).await;
        let _ = rt.delete(&c.id).await;
    }))
    .await;
    n
}

/// SIGKILLs every containerd shim started for the containerd at `socket`.
pub fn kill_shims_of(socket: &Path) {
    let sock = socket.to_string_lossy().to_string();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return;
    };
    for p in procs.flatten() {
        let Ok(pid) = p.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmd = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd);
        if cmd.contains("containerd-shim") && cmd.contains(sock.as_str()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Unmounts everything mounted below `dir` (deepest first): snapshots, tmpfs volumes.
pub fn unmount_under(dir: &Path) {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return;
    };
    let root = dir.to_string_lossy().to_string();
    let mut targets: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|m| m.starts_with(&root))
        .collect();
    targets.sort_by_key(|t| std::cmp::Reverse(t.len()));
    for t in targets {
        let _ = nix::mount::umount2(t, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// One line per node: name, namespace, address, agent, Ready.
pub async fn status(dir: &Path) -> anyhow::Result<String> {
    let st = State::require(dir)?;
    let mut ready = std::collections::HashMap::new();
    let server_up = st.server.running(&st.data_dir);
    if server_up && let Ok(c) = crate::control::client_from(&st.kubeconfig()).await {
        let nodes: Api<Node> = Api::all(c);
        if let Ok(Ok(l)) =
            tokio::time::timeout(Duration::from_secs(5), nodes.list(&ListParams::default())).await
        {
            for n in l.items {
                let r = if crate::kinds::node::node_ready(&n) {
                    "Ready"
                } else {
                    "NotReady"
                };
                ready.insert(n.metadata.name.unwrap_or_default(), r);
            }
        }
    }
    let mut out = format!(
        "lab {}  dir {}  server {} ({})  kubeconfig {}\n",
        st.name,
        st.data_dir.display(),
        st.url,
        if server_up { "running" } else { "down" },
        st.kubeconfig().display()
    );
    out += &format!(
        "{:<20} {:<20} {:<15} {:<10} {}\n",
        "NODE", "NAMESPACE", "ADDRESS", "AGENT", "STATUS"
    );
    for n in &st.nodes {
        let agent = match n.agent.pid {
            Some(p) if n.agent.running(&st.data_dir) => format!("pid {p}"),
            _ => "stopped".into(),
        };
        out += &format!(
            "{:<20} {:<20} {:<15} {:<10} {}\n",
            n.name,
            n.netns,
            n.ip,
            agent,
            ready.get(&n.name).copied().unwrap_or("Unknown")
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lab_names_are_short_dns_labels() {
        assert!(check_name("lab").is_ok());
        assert!(check_name("kt-3a9f").is_ok());
        for bad in ["", "Lab", "a_b", "-x", "x-", "averyveryverylongname123"] {
            let e = check_name(bad).unwrap_err().to_string();
            assert!(e.contains("--name"), "{e}");
        }
    }

    #[test]
    fn node_addresses_stay_in_the_lab_subnet_and_off_the_server() {
        let net: ipnet::Ipv4Net = SUBNET.parse().unwrap();
        for i in 1..=50 {
            assert!(net.contains(&node_ip(i)));
            assert_ne!(node_ip(i), SERVER_IP);
        }
        // Not inside the default Service or cluster ranges (those are unreachable / routed).
        let services: ipnet::Ipv4Net = "10.96.0.0/12".parse().unwrap();
        let pods: ipnet::Ipv4Net = "10.244.0.0/16".parse().unwrap();
        assert!(!services.contains(&net) && !pods.contains(&net));
    }

    #[test]
    fn containerd_config_keeps_everything_under_the_lab() {
        let c = ContainerdPaths::new(Path::new("/tmp/x"));
        let t = c.config_text();
        assert!(t.contains("root = \"/tmp/x/containerd/root\""));
        assert!(t.contains("address = \"/tmp/x/containerd/containerd.sock\""));
        assert!(t.contains("io.containerd.grpc.v1.cri"));
    }
}
