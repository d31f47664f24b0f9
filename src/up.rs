//! `keelson up`: a whole single-node cluster in one process — the API server on the embedded
//! store with the scheduler and controllers, and the agent (kubelet + service proxy) joined to
//! it — on the host's containerd, or on one of its own when none answers. Progress goes to the
//! terminal, the daemons' logs to `DATA_DIR/logs/keelson.log`. Ctrl-C stops everything it
//! started (the pods' containers keep running, as with kubelet; the next `up` adopts them).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::Parser;

use crate::{Cli, daemon};

#[derive(clap::Args)]
pub struct UpArgs {
    /// Where everything lives: server/ (store, PKI, kubeconfig), agent/, images/, logs/,
    /// containerd/ (when keelson starts its own).
    #[arg(long, default_value = "/var/lib/keelson")]
    pub data_dir: PathBuf,
    /// containerd's socket (default: the system's if it answers, else a private containerd
    /// under DATA_DIR/containerd).
    #[arg(long, conflicts_with = "private_containerd")]
    pub containerd: Option<PathBuf>,
    /// Always run a private containerd under DATA_DIR/containerd, even when the system's
    /// answers.
    #[arg(long)]
    pub private_containerd: bool,
    /// Where the API server listens.
    #[arg(long, default_value = "0.0.0.0:6443")]
    pub listen: SocketAddr,
    /// This node's name (default: the hostname).
    #[arg(long)]
    pub node_name: Option<String>,
    /// This node's address (default: the pod bridge's).
    #[arg(long)]
    pub node_ip: Option<std::net::Ipv4Addr>,
    /// Pack the host's busybox as keelson.local/busybox:1 for demo workloads (when the file
    /// exists and the image is not in DATA_DIR/images yet; "" to skip).
    #[arg(long, default_value = "/bin/busybox")]
    pub busybox: PathBuf,
    /// The node's registry configuration (k3s's registries.yaml format: mirrors, credentials,
    /// TLS); default: the agent's, /etc/keelson/registries.yaml.
    #[arg(long)]
    pub registry_config: Option<PathBuf>,
    /// Extra flag for the server (repeatable), e.g. --server-arg=--service-cidr=10.43.0.0/16.
    #[arg(long, allow_hyphen_values = true)]
    pub server_arg: Vec<String>,
    /// Extra flag for the agent (repeatable), e.g. --agent-arg=--proxy-mode=iptables.
    #[arg(long, allow_hyphen_values = true)]
    pub agent_arg: Vec<String>,
}

fn step(msg: impl std::fmt::Display) {
    eprintln!("keelson: {msg}");
}

/// runc needs the cgroup filesystem; `ip netns exec` remounts /sys without it.
fn check_cgroups() -> anyhow::Result<()> {
    let mounted = std::fs::read_dir("/sys/fs/cgroup").is_ok_and(|mut d| d.next().is_some());
    if !mounted {
        bail!(
            "/sys/fs/cgroup is empty here, so runc cannot create containers (`ip netns exec` remounts /sys without the cgroup filesystem; enter a network namespace with `nsenter --net=/run/netns/NAME` instead)"
        );
    }
    Ok(())
}

const SYSTEM_CONTAINERD: &str = "/run/containerd/containerd.sock";

/// A private containerd, stopped when dropped.
struct OwnContainerd(std::process::Child);

impl Drop for OwnContainerd {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn answers(socket: &Path) -> bool {
    socket.exists()
        && keelson::agent::connect_containerd(socket, "k8s.keelson.io", Duration::from_millis(300))
            .await
            .is_ok()
}

/// The containerd to use, and the private one started for it (if any).
async fn containerd(a: &UpArgs) -> anyhow::Result<(PathBuf, Option<OwnContainerd>)> {
    if let Some(s) = &a.containerd {
        if !answers(s).await {
            bail!("--containerd {}: nothing answers there", s.display());
        }
        step(format!("containerd: {}", s.display()));
        return Ok((s.clone(), None));
    }
    let system = Path::new(SYSTEM_CONTAINERD);
    if !a.private_containerd && answers(system).await {
        step(format!("containerd: the system's ({SYSTEM_CONTAINERD})"));
        return Ok((system.to_path_buf(), None));
    }
    let paths = keelson::lab::ContainerdPaths::new(&a.data_dir);
    std::fs::create_dir_all(&paths.dir).with_context(|| paths.dir.display().to_string())?;
    std::fs::write(paths.config(), paths.config_text())
        .with_context(|| paths.config().display().to_string())?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(paths.log())
        .with_context(|| paths.log().display().to_string())?;
    let mut cmd = std::process::Command::new("containerd");
    cmd.arg("--config")
        .arg(paths.config())
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // A private containerd goes with `up`, also when `up` is killed outright (its pods' shims
    // stay, and the next `up` reconnects to them).
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .context("starting containerd (is it installed? apt-get install containerd)")?;
    let own = OwnContainerd(child);
    keelson::agent::connect_containerd(&paths.socket(), "k8s.keelson.io", Duration::from_secs(30))
        .await
        .with_context(|| format!("containerd did not come up; see {}", paths.log().display()))?;
    step(format!(
        "containerd: started a private one ({}, log {})",
        paths.socket().display(),
        paths.log().display()
    ));
    Ok((paths.socket(), Some(own)))
}

/// Packs the host's busybox as an image for demo workloads, once.
fn busybox_image(a: &UpArgs, images: &Path) -> anyhow::Result<()> {
    let out = images.join("busybox.tar");
    if a.busybox.as_os_str().is_empty() || out.exists() || !a.busybox.is_file() {
        return Ok(());
    }
    let root = a.data_dir.join("busybox-rootfs");
    for d in ["bin", "tmp", "www", "etc"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    std::fs::copy(&a.busybox, root.join("bin/busybox"))
        .with_context(|| format!("copying {}", a.busybox.display()))?;
    for applet in [
        "sh", "httpd", "echo", "cat", "sleep", "hostname", "wget", "ls", "ps", "env", "tar", "nc",
        "date", "id", "mkdir", "rm", "grep", "head", "tail", "wc", "true", "false", "nslookup",
    ] {
        let link = root.join("bin").join(applet);
        if !link.exists() {
            std::os::unix::fs::symlink("busybox", link)?;
        }
    }
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    )?;
    std::fs::write(root.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n")?;
    let layer = keelson::runtime::pack::layer_from_dir(&root)?;
    let archive = keelson::runtime::pack::pack_oci_archive(
        &keelson::runtime::pack::ImageSettings {
            name: "keelson.local/busybox:1".into(),
            cmd: vec!["sh".into()],
            ..Default::default()
        },
        &layer,
    )?;
    std::fs::write(&out, archive).with_context(|| out.display().to_string())?;
    let _ = std::fs::remove_dir_all(&root);
    step(format!(
        "image keelson.local/busybox:1 packed from {}",
        a.busybox.display()
    ));
    Ok(())
}

fn parse(args: Vec<String>) -> anyhow::Result<Cli> {
    Cli::try_parse_from(args).map_err(|e| anyhow::anyhow!("{e}"))
}

type Daemon = tokio::task::JoinHandle<anyhow::Result<()>>;

fn path_arg(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

pub async fn up(a: UpArgs) -> anyhow::Result<()> {
    let data = &a.data_dir;
    std::fs::create_dir_all(data).with_context(|| data.display().to_string())?;
    let (server_dir, agent_dir, images, logs) = (
        data.join("server"),
        data.join("agent"),
        data.join("images"),
        data.join("logs"),
    );
    for d in [&server_dir, &agent_dir, &images, &logs] {
        std::fs::create_dir_all(d).with_context(|| d.display().to_string())?;
    }
    step(format!(
        "data in {}, logs in {}",
        data.display(),
        logs.join("keelson.log").display()
    ));
    if let Some(pid) = running_up(data) {
        bail!("keelson up already runs on {} (pid {pid})", data.display());
    }
    check_cgroups()?;
    std::fs::write(pid_file(data), std::process::id().to_string())?;
    let (socket, own) = containerd(&a).await?;
    busybox_image(&a, &images)?;

    let (mut server_task, kubeconfig) = start_server(&a, &server_dir).await?;
    let node = match &a.node_name {
        Some(n) => n.clone(),
        None => nix::unistd::gethostname()
            .context("hostname")?
            .to_string_lossy()
            .to_lowercase(),
    };
    let mut agent = vec![
        "keelson".into(),
        "agent".into(),
        "--server".into(),
        format!("https://127.0.0.1:{}", a.listen.port()),
        "--token-file".into(),
        path_arg(&server_dir.join("node-token")),
        "--ca-file".into(),
        path_arg(&server_dir.join("pki/ca.crt")),
        "--data-dir".into(),
        path_arg(&agent_dir),
        "--images".into(),
        path_arg(&images),
        "--containerd".into(),
        path_arg(&socket),
        "--node-name".into(),
        node.clone(),
    ];
    if let Some(ip) = a.node_ip {
        agent.extend(["--node-ip".into(), ip.to_string()]);
    }
    if let Some(r) = &a.registry_config {
        agent.extend(["--registry-config".into(), path_arg(r)]);
    }
    agent.extend(a.agent_arg.iter().cloned());
    let agent = parse(agent)?;
    let mut agent_task = tokio::spawn(daemon(agent.cmd));
    wait_node_ready(&kubeconfig, &node, &server_task, &agent_task).await?;
    let r = stop_both(&mut server_task, &mut agent_task).await;
    drop(own);
    let _ = std::fs::remove_file(pid_file(data));
    step("stopped (the pods' containers are left to the next `up`; `keelson down` removes them)");
    r
}

/// Starts the API server role and waits for its kubeconfig and port.
async fn start_server(a: &UpArgs, server_dir: &Path) -> anyhow::Result<(Daemon, PathBuf)> {
    let mut server = vec![
        "keelson".into(),
        "server".into(),
        "--data-dir".into(),
        path_arg(server_dir),
        "--listen".into(),
        a.listen.to_string(),
    ];
    server.extend(a.server_arg.iter().cloned());
    let server = parse(server)?;
    let port = a.listen.port();
    let server_task = tokio::spawn(daemon(server.cmd));
    let kubeconfig = server_dir.join("kubeconfig.yaml");
    let t0 = Instant::now();
    loop {
        if server_task.is_finished() {
            return match server_task.await {
                Ok(Err(e)) => Err(e.context("the API server stopped")),
                _ => bail!("the API server stopped"),
            };
        }
        if kubeconfig.exists()
            && tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        {
            break;
        }
        if t0.elapsed() > Duration::from_secs(60) {
            bail!("the API server did not start within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    step(format!(
        "API server on https://{} (embedded store)",
        a.listen
    ));
    Ok((server_task, kubeconfig))
}

/// Waits until the node is Ready (or either role ended), then says how to use it.
async fn wait_node_ready(
    kubeconfig: &Path,
    node: &str,
    server_task: &Daemon,
    agent_task: &Daemon,
) -> anyhow::Result<()> {
    let client = keelson::control::client_from(kubeconfig).await?;
    let nodes: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(client);
    let t0 = Instant::now();
    let mut said = false;
    while !agent_task.is_finished() && !server_task.is_finished() {
        let ready = nodes
            .get_opt(node)
            .await
            .ok()
            .flatten()
            .is_some_and(|n| keelson::kinds::node::node_ready(&n));
        if ready {
            step(format!(
                "node {node} Ready ({:.1} s)",
                t0.elapsed().as_secs_f64()
            ));
            println!("export KUBECONFIG={}", kubeconfig.display());
            println!(
                "# then: kubectl get nodes; kubectl create deployment web --image=keelson.local/busybox:1 -- httpd -f -p 8080"
            );
            step("running; Ctrl-C stops it");
            keelson::systemd::notify("READY=1");
            break;
        }
        if !said && t0.elapsed() > Duration::from_secs(5) {
            step(format!("waiting for node {node} to be Ready..."));
            said = true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// Both roles end on SIGINT/SIGTERM (each watches the signals); whichever ends first ends
/// `up`, and the other is given 15 s (told to stop at once after a failure).
async fn stop_both(server_task: &mut Daemon, agent_task: &mut Daemon) -> anyhow::Result<()> {
    let first = tokio::select! {
        r = &mut *server_task => ("API server", r),
        r = &mut *agent_task => ("agent", r),
    };
    step("stopping...");
    let other = if first.0 == "agent" {
        server_task
    } else {
        agent_task
    };
    if !matches!(first.1, Ok(Ok(()))) {
        other.abort();
    }
    if tokio::time::timeout(Duration::from_secs(15), &mut *other)
        .await
        .is_err()
    {
        other.abort();
    }
    match first.1 {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.context(format!("the {} stopped", first.0))),
        Err(e) => Err(anyhow::anyhow!("the {} failed: {e}", first.0)),
    }
}

#[derive(clap::Args)]
pub struct DownArgs {
    /// The data directory `keelson up` used.
    #[arg(long, default_value = "/var/lib/keelson")]
    pub data_dir: PathBuf,
    /// containerd's socket (default: the private one under DATA_DIR if `up` made one, else
    /// the system's).
    #[arg(long)]
    pub containerd: Option<PathBuf>,
    /// Also delete DATA_DIR (the store, certificates, images, logs).
    #[arg(long)]
    pub purge: bool,
}

fn pid_file(data: &Path) -> PathBuf {
    data.join("up.pid")
}

/// Whether a `keelson up` on `data` is running (its pid, if so).
fn running_up(data: &Path) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(pid_file(data))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let cmd = String::from_utf8_lossy(&cmd);
    (cmd.contains("keelson") && cmd.contains("up")).then_some(pid)
}

/// `keelson down`: what `up` leaves behind when it stops — the pods' containers (and their
/// network), the service proxy's rules, the node's routes and chains — removed; with
/// `--purge` the data directory too.
pub async fn down(a: DownArgs) -> anyhow::Result<()> {
    if let Some(pid) = running_up(&a.data_dir) {
        bail!(
            "keelson up is still running on {} (pid {pid}); stop it first (Ctrl-C or kill {pid})",
            a.data_dir.display()
        );
    }
    let private = keelson::lab::ContainerdPaths::new(&a.data_dir);
    let mut temporary = None;
    let socket = match &a.containerd {
        Some(s) => s.clone(),
        None if private.config().exists() => {
            if !answers(&private.socket()).await {
                let log = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(private.log())?;
                let child = std::process::Command::new("containerd")
                    .arg("--config")
                    .arg(private.config())
                    .stdin(std::process::Stdio::null())
                    .stdout(log.try_clone()?)
                    .stderr(log)
                    .spawn()
                    .context("starting containerd")?;
                temporary = Some(OwnContainerd(child));
            }
            private.socket()
        }
        None => PathBuf::from(SYSTEM_CONTAINERD),
    };
    let mut removed = 0;
    match keelson::agent::connect_containerd(&socket, "k8s.keelson.io", Duration::from_secs(20))
        .await
    {
        Ok(rt) => {
            let all = rt
                .list_with_label(keelson::agent::worker::labels::POD_UID)
                .await?;
            for c in &all {
                if let Err(e) = rt.delete(&c.id).await {
                    step(format!("container {}: {e}", c.id));
                } else {
                    removed += 1;
                }
            }
        }
        Err(e) => step(format!(
            "containerd at {}: {e:#}; no containers removed",
            socket.display()
        )),
    }
    drop(temporary);
    step(format!("{removed} containers removed"));
    // A stopped private containerd leaves shims only if something failed; nothing else runs.
    if let Err(e) = keelson::proxy::cleanup() {
        step(format!("service proxy rules: {e:#}"));
    }
    if let Err(e) = keelson::net::hostgw::cleanup("keelson0").await {
        step(format!("routes and chains: {e:#}"));
    }
    if let Err(e) = keelson::net::delete_link("keelson0").await {
        step(format!("bridge keelson0: {e:#}"));
    }
    if let Err(e) = keelson::net::remove_local_addrs().await {
        step(format!("the cluster DNS address: {e:#}"));
    }
    step("service rules, routes, the pod bridge and the cluster DNS address removed");
    if a.purge {
        std::fs::remove_dir_all(&a.data_dir)
            .with_context(|| format!("removing {}", a.data_dir.display()))?;
        step(format!("{} removed", a.data_dir.display()));
    }
    Ok(())
}
