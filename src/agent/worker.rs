//! The pod worker: one task per pod that owns its sandbox and containers. Each wake-up runs
//! `sync` (compare spec with what runs, take the next actions, as kubelet's SyncPod does) and
//! publishes the pod's status. Exits arrive from containerd's event stream; a periodic relist
//! repairs anything missed. Termination runs preStop, SIGTERM, the grace period, then SIGKILL.

use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use jiff::Timestamp;
use k8s_openapi::{
    api::core::v1::{
        Container, ContainerStatus, HostIP, LifecycleHandler, Pod, PodCondition, PodIP, PodStatus,
    },
    apimachinery::pkg::apis::meta::v1::Time,
};
use tokio::{
    sync::{Mutex, mpsc},
    task::JoinHandle,
    time::Instant,
};

use super::{
    AgentCtx,
    build::{self, SandboxInfo},
    logs::{self, LogFile},
    probe::{self, ProbeEvent, ProbeKind, ProbeTarget},
    state::{ContainerRecord, InstState, Instance, exit_reason, phase},
};
use crate::{
    net,
    runtime::{
        container::{CreateOpts, Listed, TaskState},
        image::ImageInfo,
        random_hex,
        spec::{self, Ns, ProcessConfig, RuntimeConfig},
    },
};

/// Container labels that let a restarted agent adopt what runs.
pub mod labels {
    pub const POD_UID: &str = "io.keelson.pod.uid";
    pub const POD_NAME: &str = "io.keelson.pod.name";
    pub const POD_NAMESPACE: &str = "io.keelson.pod.namespace";
    pub const NAME: &str = "io.keelson.container.name";
    pub const KIND: &str = "io.keelson.container.kind";
    pub const RESTART: &str = "io.keelson.container.restart-count";
    pub const STARTED_AT: &str = "io.keelson.container.started-at";
    pub const POD_STARTED: &str = "io.keelson.pod.start-time";
}

/// Messages a pod worker reacts to.
#[derive(Debug)]
pub enum Msg {
    Exit {
        cid: String,
        code: u32,
        at: Option<Timestamp>,
    },
    Oom {
        cid: String,
    },
    Probe {
        cid: String,
        ev: ProbeEvent,
    },
    /// Stop the pod (grace override in seconds) and end the worker.
    Terminate {
        grace: Option<i64>,
    },
}

#[derive(Debug, Clone)]
struct Sandbox {
    id: String,
    pid: u32,
    ip: Option<Ipv4Addr>,
}

/// Which list a container belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Init,
    App,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Init => "init",
            Kind::App => "app",
        }
    }
}

struct Running {
    probes: Option<JoinHandle<()>>,
    pumps: Vec<JoinHandle<()>>,
    /// Tells the log pumps that the process exited (drain, then stop).
    exited: tokio::sync::watch::Sender<bool>,
    /// The container's process (user, env), for exec probes and hooks.
    process: ProcessConfig,
}

pub struct PodWorker {
    ctx: Arc<AgentCtx>,
    pod: Pod,
    uid: String,
    name: String,
    namespace: String,
    sandbox: Option<Sandbox>,
    sandbox_dead: bool,
    sandbox_error: Option<String>,
    init: Vec<ContainerRecord>,
    app: Vec<ContainerRecord>,
    tasks: HashMap<String, Running>,
    tx: mpsc::UnboundedSender<Msg>,
    rx: mpsc::UnboundedReceiver<Msg>,
    start_time: Option<Timestamp>,
    conditions: Vec<PodCondition>,
    wake: Option<Instant>,
    terminal: bool,
}

fn spec_of(pod: &Pod) -> &k8s_openapi::api::core::v1::PodSpec {
    static EMPTY: std::sync::OnceLock<k8s_openapi::api::core::v1::PodSpec> =
        std::sync::OnceLock::new();
    pod.spec
        .as_ref()
        .unwrap_or_else(|| EMPTY.get_or_init(Default::default))
}

impl PodWorker {
    pub fn new(ctx: Arc<AgentCtx>, pod: Pod) -> (Self, mpsc::UnboundedSender<Msg>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let s = spec_of(&pod);
        let n_init = s.init_containers.as_ref().map_or(0, Vec::len);
        let n_app = s.containers.len();
        let w = Self {
            uid: pod.metadata.uid.clone().unwrap_or_default(),
            name: pod.metadata.name.clone().unwrap_or_default(),
            namespace: pod
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into()),
            ctx,
            pod,
            sandbox: None,
            sandbox_dead: false,
            sandbox_error: None,
            init: vec![ContainerRecord::default(); n_init],
            app: vec![ContainerRecord::default(); n_app],
            tasks: HashMap::new(),
            tx: tx.clone(),
            rx,
            start_time: None,
            conditions: vec![],
            wake: None,
            terminal: false,
        };
        (w, tx)
    }

    fn pod_dir(&self) -> PathBuf {
        self.ctx.cfg.pods_dir().join(&self.uid)
    }

    fn log_dir(&self) -> PathBuf {
        self.ctx
            .cfg
            .log_dir
            .join(format!("{}_{}_{}", self.namespace, self.name, self.uid))
    }

    fn container(&self, kind: Kind, i: usize) -> &Container {
        let s = spec_of(&self.pod);
        match kind {
            Kind::Init => &s.init_containers.as_ref().expect("index from the spec")[i],
            Kind::App => &s.containers[i],
        }
    }

    fn rec(&mut self, kind: Kind, i: usize) -> &mut ContainerRecord {
        match kind {
            Kind::Init => &mut self.init[i],
            Kind::App => &mut self.app[i],
        }
    }

    fn find_cid(&mut self, cid: &str) -> Option<(Kind, usize)> {
        for (i, r) in self.init.iter().enumerate() {
            if r.current.as_ref().is_some_and(|c| c.id == cid) {
                return Some((Kind::Init, i));
            }
        }
        for (i, r) in self.app.iter().enumerate() {
            if r.current.as_ref().is_some_and(|c| c.id == cid) {
                return Some((Kind::App, i));
            }
        }
        None
    }

    fn restart_policy(&self) -> String {
        spec_of(&self.pod)
            .restart_policy
            .clone()
            .unwrap_or_else(|| "Always".into())
    }

    /// Runs the worker until the pod is terminated.
    pub async fn run(mut self, adopted: Vec<Listed>) {
        self.adopt(adopted).await;
        loop {
            self.sync().await;
            self.publish();
            let resync = Instant::now() + self.ctx.cfg.resync;
            let wake = self.wake.take().map_or(resync, |w| w.min(resync));
            let msg = tokio::select! {
                m = self.rx.recv() => m,
                _ = tokio::time::sleep_until(wake) => { self.relist().await; continue; }
            };
            let Some(msg) = msg else { break };
            if let Msg::Terminate { grace } = msg {
                self.terminate(grace).await;
                break;
            }
            self.handle(msg).await;
            while let Ok(m) = self.rx.try_recv() {
                if let Msg::Terminate { grace } = m {
                    self.terminate(grace).await;
                    return;
                }
                self.handle(m).await;
            }
        }
    }

    async fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Exit { cid, code, at } => {
                if self.sandbox.as_ref().is_some_and(|s| s.id == cid) {
                    tracing::warn!(pod = %self.name, "sandbox exited");
                    self.sandbox_dead = true;
                    return;
                }
                self.mark_exited(&cid, code as i32, at.unwrap_or_else(Timestamp::now));
            }
            Msg::Oom { cid } => {
                if let Some((k, i)) = self.find_cid(&cid) {
                    self.rec(k, i).oom = true;
                }
            }
            Msg::Probe { cid, ev } => self.on_probe(&cid, ev).await,
            Msg::Terminate { .. } => {}
        }
    }

    async fn on_probe(&mut self, cid: &str, ev: ProbeEvent) {
        let Some((k, i)) = self.find_cid(cid) else {
            return;
        };
        let cname = self.container(k, i).name.clone();
        match ev {
            ProbeEvent::Started => self.rec(k, i).started = true,
            ProbeEvent::Ready(r) => self.rec(k, i).ready = r,
            ProbeEvent::Unhealthy { kind, output } => {
                tracing::info!(pod = %self.name, container = %cname, event = "Unhealthy", "{} probe failed: {}", kind.label(), output.trim());
            }
            ProbeEvent::Failed { kind } => {
                let c = self.container(k, i);
                let probe = match kind {
                    ProbeKind::Liveness => c.liveness_probe.as_ref(),
                    _ => c.startup_probe.as_ref(),
                };
                let grace = probe
                    .and_then(|p| p.termination_grace_period_seconds)
                    .unwrap_or_else(|| self.grace(None));
                tracing::info!(pod = %self.name, container = %cname, event = "Killing", "Container {cname} failed {} probe, will be restarted", kind.label().to_lowercase());
                self.stop_container(k, i, grace, true).await;
            }
        }
    }

    fn grace(&self, over: Option<i64>) -> i64 {
        over.or(spec_of(&self.pod).termination_grace_period_seconds)
            .unwrap_or(30)
            .max(0)
    }

    /// Records an exit of the instance `cid` (idempotent).
    fn mark_exited(&mut self, cid: &str, code: i32, at: Timestamp) {
        let Some((k, i)) = self.find_cid(cid) else {
            return;
        };
        let c = self.container(k, i).clone();
        let tlog = self.termination_log(&c.name, cid);
        let log_path = self.log_dir().join(&c.name);
        let rec = self.rec(k, i);
        let Some(cur) = rec.current.as_mut() else {
            return;
        };
        if !cur.is_running() {
            return;
        }
        let oom = std::mem::take(&mut rec.oom);
        let mut message = std::fs::read(&tlog)
            .ok()
            .filter(|m| !m.is_empty())
            .map(|m| String::from_utf8_lossy(&m[..m.len().min(4096)]).to_string());
        if message.is_none()
            && code != 0
            && c.termination_message_policy.as_deref() == Some("FallbackToLogsOnError")
        {
            let file = log_path.join(format!("{}.log", cur.restart_count));
            if let Ok(content) = std::fs::read_to_string(file) {
                let mut tail = logs::render(
                    &content,
                    &logs::ReadOpts {
                        tail_lines: Some(80),
                        timestamps: false,
                    },
                );
                if tail.len() > 2048 {
                    tail = tail[tail.len() - 2048..].to_string();
                }
                message = Some(tail);
            }
        }
        cur.state = InstState::Exited {
            code,
            reason: exit_reason(code, oom).to_string(),
            message,
            finished_at: at,
        };
        rec.exited_mono = Some(std::time::Instant::now());
        rec.started = false;
        rec.ready = false;
        if let Some(r) = self.tasks.remove(cid) {
            let _ = r.exited.send(true);
            if let Some(p) = r.probes {
                p.abort();
            }
        }
    }

    fn termination_log(&self, cname: &str, cid: &str) -> PathBuf {
        self.pod_dir()
            .join("containers")
            .join(cname)
            .join(format!("{cid}.termlog"))
    }

    /// Rebuilds state from containers found in containerd (agent restart).
    async fn adopt(&mut self, listed: Vec<Listed>) {
        let rt = self.ctx.rt.clone();
        let mut by_name: BTreeMap<(String, String), Vec<(i32, Listed)>> = BTreeMap::new();
        for l in listed {
            let kind = l.labels.get(labels::KIND).cloned().unwrap_or_default();
            if kind == "sandbox" {
                if self.sandbox.is_none()
                    && let Ok(TaskState::Running { pid }) = rt.task_state(&l.id).await
                {
                    self.start_time = l
                        .labels
                        .get(labels::POD_STARTED)
                        .and_then(|t| t.parse().ok());
                    let ip = self.ctx.ipam.owned_by(&self.uid).ok().flatten();
                    self.sandbox = Some(Sandbox {
                        id: l.id.clone(),
                        pid,
                        ip,
                    });
                    self.register(&l.id);
                    continue;
                }
                remove_container(&rt, &l.id).await;
                continue;
            }
            let name = l.labels.get(labels::NAME).cloned().unwrap_or_default();
            let rc = l
                .labels
                .get(labels::RESTART)
                .and_then(|r| r.parse().ok())
                .unwrap_or(0);
            by_name.entry((kind, name)).or_default().push((rc, l));
        }
        for ((kind, name), mut insts) in by_name {
            insts.sort_by_key(|(rc, _)| -*rc);
            let k = if kind == "init" {
                Kind::Init
            } else {
                Kind::App
            };
            let list = match k {
                Kind::Init => spec_of(&self.pod)
                    .init_containers
                    .clone()
                    .unwrap_or_default(),
                Kind::App => spec_of(&self.pod).containers.clone(),
            };
            let Some(i) = list.iter().position(|c| c.name == name) else {
                for (_, l) in insts {
                    remove_container(&rt, &l.id).await;
                }
                continue;
            };
            let mut found = vec![];
            for (n, (rc, l)) in insts.into_iter().enumerate() {
                if n >= 2 {
                    remove_container(&rt, &l.id).await;
                    continue;
                }
                let started_at = l
                    .labels
                    .get(labels::STARTED_AT)
                    .and_then(|t| t.parse().ok());
                let state = match rt.task_state(&l.id).await {
                    Ok(TaskState::Running { .. }) | Ok(TaskState::Created) => InstState::Running,
                    Ok(TaskState::Stopped {
                        exit_code,
                        exited_at,
                    }) => InstState::Exited {
                        code: exit_code as i32,
                        reason: exit_reason(exit_code as i32, false).into(),
                        message: std::fs::read_to_string(self.termination_log(&name, &l.id))
                            .ok()
                            .filter(|m| !m.is_empty()),
                        finished_at: exited_at.unwrap_or_else(Timestamp::now),
                    },
                    _ => InstState::Exited {
                        code: 255,
                        reason: "Error".into(),
                        message: Some("container task not found after agent restart".into()),
                        finished_at: Timestamp::now(),
                    },
                };
                let image_id = rt
                    .image_info(&l.image)
                    .await
                    .map(|i| i.image_id)
                    .unwrap_or_default();
                found.push(Instance {
                    id: l.id.clone(),
                    restart_count: rc,
                    started_at,
                    state,
                    image_id,
                });
            }
            let mut it = found.into_iter();
            let current = it.next();
            let previous = it.next();
            let rec = self.rec(k, i);
            rec.previous = previous;
            rec.current = current.clone();
            if let Some(cur) = current {
                self.register(&cur.id);
                if cur.is_running() {
                    let process = self.adopted_process(k, i, &cur).await;
                    if let Err(e) = self.attach(k, i, &cur, process) {
                        tracing::warn!(pod = %self.name, error = %e, "re-attaching logs");
                    }
                    self.resume_probes(k, i, &cur);
                } else {
                    self.rec(k, i).exited_mono = Some(std::time::Instant::now());
                }
            }
        }
        if self.sandbox.is_some() {
            tracing::info!(pod = %self.name, "adopted running pod");
        }
    }

    /// The process config of an adopted container, rebuilt from its spec and image.
    async fn adopted_process(&self, kind: Kind, i: usize, inst: &Instance) -> ProcessConfig {
        let c = self.container(kind, i);
        let Ok(img) = self
            .ctx
            .rt
            .image_info(c.image.as_deref().unwrap_or(""))
            .await
        else {
            return ProcessConfig::default();
        };
        let tlog = self.termination_log(&c.name, &inst.id);
        build::runtime_config(&self.pod, c, &img, &self.sandbox_info(), &inst.id, &tlog)
            .map(|rc| rc.process)
            .unwrap_or_default()
    }

    fn register(&self, cid: &str) {
        if let Ok(mut r) = self.ctx.routes.lock() {
            r.insert(cid.to_string(), self.tx.clone());
        }
    }

    fn unregister(&self, cid: &str) {
        if let Ok(mut r) = self.ctx.routes.lock() {
            r.remove(cid);
        }
    }

    /// Checks every running instance against containerd (repairs missed events).
    async fn relist(&mut self) {
        if let Some(sb) = &self.sandbox
            && !matches!(
                self.ctx.rt.task_state(&sb.id).await,
                Ok(TaskState::Running { .. })
            )
        {
            self.sandbox_dead = true;
        }
        let mut exits = vec![];
        for r in self.init.iter().chain(self.app.iter()) {
            if let Some(cur) = r.current.as_ref().filter(|c| c.is_running()) {
                match self.ctx.rt.task_state(&cur.id).await {
                    Ok(TaskState::Stopped {
                        exit_code,
                        exited_at,
                    }) => exits.push((
                        cur.id.clone(),
                        exit_code as i32,
                        exited_at.unwrap_or_else(Timestamp::now),
                    )),
                    Ok(TaskState::Missing) => exits.push((cur.id.clone(), 255, Timestamp::now())),
                    _ => {}
                }
            }
        }
        for (cid, code, at) in exits {
            self.mark_exited(&cid, code, at);
        }
    }

    fn set_wake(&mut self, at: Instant) {
        self.wake = Some(self.wake.map_or(at, |w| w.min(at)));
    }

    /// One reconciliation pass.
    async fn sync(&mut self) {
        if self.terminal {
            let running = self
                .init
                .iter()
                .chain(self.app.iter())
                .any(|r| r.current.as_ref().is_some_and(|c| c.is_running()));
            if !running && self.sandbox.is_some() {
                self.teardown_sandbox().await;
            }
            return;
        }
        if self.sandbox_dead {
            self.replace_sandbox().await;
        }
        if self.sandbox.is_none() {
            if let Err(e) = self.create_sandbox().await {
                tracing::warn!(pod = %self.name, error = %e, "creating pod sandbox failed");
                self.sandbox_error = Some(e);
                self.set_wake(Instant::now() + Duration::from_secs(5));
                return;
            }
            self.sandbox_error = None;
        }
        let policy = self.restart_policy();
        // Init containers, one at a time, in order.
        for i in 0..self.init.len() {
            let rec = &self.init[i];
            match rec
                .current
                .as_ref()
                .map(|c| (c.is_running(), c.exit_code()))
            {
                None => {
                    if rec.retry_at.is_none_or(|t| t <= std::time::Instant::now()) {
                        self.start(Kind::Init, i).await;
                    }
                    return;
                }
                Some((true, _)) => return,
                Some((false, Some(0))) => continue,
                Some((false, _)) => {
                    if policy != "Never" {
                        self.restart_with_backoff(Kind::Init, i).await;
                    }
                    return;
                }
            }
        }
        for i in 0..self.app.len() {
            let rec = &self.app[i];
            match rec
                .current
                .as_ref()
                .map(|c| (c.is_running(), c.exit_code()))
            {
                None => {
                    if rec.retry_at.is_none_or(|t| t <= std::time::Instant::now()) {
                        self.start(Kind::App, i).await;
                    }
                }
                Some((true, _)) => {}
                Some((false, code)) => {
                    let restart = match policy.as_str() {
                        "Always" => true,
                        "OnFailure" => code != Some(0),
                        _ => false,
                    };
                    if restart {
                        self.restart_with_backoff(Kind::App, i).await;
                    }
                }
            }
        }
    }

    async fn restart_with_backoff(&mut self, kind: Kind, i: usize) {
        let now = std::time::Instant::now();
        let name = self.container(kind, i).name.clone();
        let (pod, ns, uid) = (self.name.clone(), self.namespace.clone(), self.uid.clone());
        let rec = self.rec(kind, i);
        let finished = rec.exited_mono.unwrap_or(now);
        if let Some(until) = rec.backoff.wait_until(finished, now) {
            let delay = rec.backoff.current();
            let msg = format!(
                "back-off {} restarting failed container={name} pod={pod}_{ns}({uid})",
                humantime(delay)
            );
            if rec
                .waiting
                .as_ref()
                .is_none_or(|(r, _)| r != "CrashLoopBackOff")
            {
                tracing::info!(pod = %pod, container = %name, event = "BackOff", "Back-off restarting failed container {name} in pod {pod}_{ns}({uid})");
            }
            rec.waiting = Some(("CrashLoopBackOff".into(), msg));
            let wake = Instant::now() + until.saturating_duration_since(now);
            self.set_wake(wake);
            return;
        }
        rec.backoff.next(now);
        self.start(kind, i).await;
    }

    /// Kills every container and the old sandbox; the next sync makes a new one.
    async fn replace_sandbox(&mut self) {
        tracing::info!(pod = %self.name, event = "SandboxChanged", "Pod sandbox changed, it will be killed and re-created.");
        for k in [Kind::Init, Kind::App] {
            let n = if k == Kind::Init {
                self.init.len()
            } else {
                self.app.len()
            };
            for i in 0..n {
                if self
                    .rec(k, i)
                    .current
                    .as_ref()
                    .is_some_and(|c| c.is_running())
                {
                    self.stop_container(k, i, 0, false).await;
                }
            }
        }
        if let Some(sb) = self.sandbox.take() {
            self.unregister(&sb.id);
            remove_container(&self.ctx.rt, &sb.id).await;
            let _ = net::teardown_pod(&net::host_veth_name(&self.uid)).await;
        }
        self.sandbox_dead = false;
    }

    fn sandbox_info(&self) -> SandboxInfo {
        let sb = self.sandbox.as_ref();
        let host_network = spec_of(&self.pod).host_network.unwrap_or(false);
        SandboxInfo {
            pause_pid: sb.map_or(0, |s| s.pid),
            pod_ip: if host_network {
                Some(self.ctx.cfg.node_ip.to_string())
            } else {
                sb.and_then(|s| s.ip).map(|i| i.to_string())
            },
            host_ip: self.ctx.cfg.node_ip.to_string(),
            node_name: self.ctx.cfg.node_name.clone(),
            pod_dir: self.pod_dir(),
            host_network,
        }
    }

    async fn create_sandbox(&mut self) -> Result<(), String> {
        let host_network = spec_of(&self.pod).host_network.unwrap_or(false);
        let ip = if host_network {
            None
        } else {
            Some(
                self.ctx
                    .ipam
                    .allocate(&self.uid)
                    .map_err(|e| e.to_string())?,
            )
        };
        let dir = self.pod_dir();
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let shown_ip = ip.unwrap_or(self.ctx.cfg.node_ip);
        let hosts = format!(
            "# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{shown_ip}\t{}\n",
            self.name
        );
        let resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        for (f, content) in [
            ("etc-hosts", hosts),
            ("hostname", format!("{}\n", self.name)),
            ("resolv.conf", resolv),
        ] {
            std::fs::write(dir.join(f), content).map_err(|e| format!("{f}: {e}"))?;
        }
        let id = random_hex(16);
        let agent_net = format!("/proc/{}/ns/net", std::process::id());
        let cfg = RuntimeConfig {
            process: ProcessConfig {
                args: vec!["/pause".into()],
                cap_drop: vec!["ALL".into()],
                ..Default::default()
            },
            hostname: self.name.clone(),
            readonly_rootfs: true,
            mounts: vec![],
            net: if host_network {
                Ns::Join(agent_net)
            } else {
                Ns::New
            },
            ipc: Ns::New,
            uts: if host_network { Ns::Host } else { Ns::New },
            pid: Ns::New,
            cgroups_path: format!("/keelson/{id}"),
            memory_limit: None,
            cpu_quota: None,
            cpu_period: None,
            cpu_shares: Some(2),
            oom_score_adj: None,
        };
        let spec = spec::build(&cfg).map_err(|e| e.to_string())?;
        let now = Timestamp::now();
        let start = self.start_time.unwrap_or(now);
        let labels = self.labels(
            "sandbox",
            "POD",
            0,
            [(labels::POD_STARTED, start.to_string())],
        );
        let pause = self.ctx.pause.clone();
        self.ctx
            .rt
            .create(CreateOpts {
                id: &id,
                image: &pause,
                spec: &spec,
                labels,
                stdout: String::new(),
                stderr: String::new(),
            })
            .await
            .map_err(|e| e.to_string())?;
        self.register(&id);
        let pid = match self.ctx.rt.start(&id).await {
            Ok(p) => p,
            Err(e) => {
                self.unregister(&id);
                remove_container(&self.ctx.rt, &id).await;
                return Err(e.to_string());
            }
        };
        if let Some(ip) = ip {
            let pn = net::PodNet {
                host_veth: net::host_veth_name(&self.uid),
                ip,
                prefix: self.ctx.ipam.cidr().prefix_len(),
                gateway: self.ctx.ipam.gateway(),
                bridge: self.ctx.cfg.bridge.clone(),
            };
            if let Err(e) = net::setup_pod(pid, &pn).await {
                self.unregister(&id);
                remove_container(&self.ctx.rt, &id).await;
                let _ = net::teardown_pod(&pn.host_veth).await;
                return Err(format!("pod network: {e}"));
            }
        }
        self.start_time = Some(start);
        self.sandbox = Some(Sandbox { id, pid, ip });
        Ok(())
    }

    fn labels<const N: usize>(
        &self,
        kind: &str,
        name: &str,
        restart: i32,
        extra: [(&str, String); N],
    ) -> HashMap<String, String> {
        let mut l: HashMap<String, String> = [
            (labels::POD_UID, self.uid.clone()),
            (labels::POD_NAME, self.name.clone()),
            (labels::POD_NAMESPACE, self.namespace.clone()),
            (labels::NAME, name.to_string()),
            (labels::KIND, kind.to_string()),
            (labels::RESTART, restart.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        for (k, v) in extra {
            l.insert(k.to_string(), v);
        }
        l
    }

    /// Marks a container as failing to start, with kubelet's waiting reason.
    fn fail_start(&mut self, kind: Kind, i: usize, reason: &str, message: String, retry: Duration) {
        tracing::warn!(pod = %self.name, container = %self.container(kind, i).name, reason, "{message}");
        let rec = self.rec(kind, i);
        rec.waiting = Some((reason.to_string(), message));
        rec.retry_at = Some(std::time::Instant::now() + retry);
        self.set_wake(Instant::now() + retry);
    }

    /// Starts a new instance of a container.
    async fn start(&mut self, kind: Kind, i: usize) {
        let c = self.container(kind, i).clone();
        let image_ref = c.image.clone().unwrap_or_default();
        let img: ImageInfo = match self.ctx.rt.image_info(&image_ref).await {
            Ok(img) => img,
            Err(crate::runtime::Error::ImageNotFound(_)) => {
                let never = c.image_pull_policy.as_deref() == Some("Never");
                let (reason, msg) = if never {
                    (
                        "ErrImageNeverPull",
                        format!(
                            "Container image \"{image_ref}\" is not present with pull policy of Never"
                        ),
                    )
                } else {
                    let prev = self.rec(kind, i).waiting.as_ref().map(|w| w.0.clone());
                    let reason = if prev.as_deref() == Some("ErrImagePull")
                        || prev.as_deref() == Some("ImagePullBackOff")
                    {
                        "ImagePullBackOff"
                    } else {
                        "ErrImagePull"
                    };
                    (
                        reason,
                        format!(
                            "image \"{image_ref}\" is not present on the node and keelson does not pull images; import it with `keelson image import`"
                        ),
                    )
                };
                self.fail_start(kind, i, reason, msg, Duration::from_secs(10));
                return;
            }
            Err(e) => {
                self.fail_start(
                    kind,
                    i,
                    "ErrImagePull",
                    e.to_string(),
                    Duration::from_secs(10),
                );
                return;
            }
        };
        let rec = self.rec(kind, i);
        let restart = rec
            .current
            .as_ref()
            .map(|c| c.restart_count + 1)
            .unwrap_or_else(|| rec.previous.as_ref().map_or(0, |p| p.restart_count + 1));
        let id = random_hex(16);
        let tlog = self.termination_log(&c.name, &id);
        if let Some(d) = tlog.parent() {
            let _ = std::fs::create_dir_all(d);
        }
        if let Err(e) = std::fs::write(&tlog, b"") {
            self.fail_start(
                kind,
                i,
                "CreateContainerError",
                format!("termination log: {e}"),
                Duration::from_secs(10),
            );
            return;
        }
        let sb = self.sandbox_info();
        let rc = match build::runtime_config(&self.pod, &c, &img, &sb, &id, &tlog) {
            Ok(rc) => rc,
            Err(e) => {
                self.fail_start(
                    kind,
                    i,
                    "CreateContainerConfigError",
                    e.0,
                    Duration::from_secs(10),
                );
                return;
            }
        };
        let spec = match spec::build(&rc) {
            Ok(s) => s,
            Err(e) => {
                self.fail_start(
                    kind,
                    i,
                    "CreateContainerError",
                    e.to_string(),
                    Duration::from_secs(10),
                );
                return;
            }
        };
        let fifo_dir = self.ctx.cfg.fifo_dir();
        let (out, err) = (
            fifo_dir.join(format!("{id}.out")),
            fifo_dir.join(format!("{id}.err")),
        );
        let inst = Instance {
            id: id.clone(),
            restart_count: restart,
            started_at: None,
            state: InstState::Running,
            image_id: img.image_id.clone(),
        };
        if let Err(e) = self.attach(kind, i, &inst, rc.process.clone()) {
            self.fail_start(kind, i, "CreateContainerError", e, Duration::from_secs(10));
            return;
        }
        let labels = self.labels(kind.label(), &c.name, restart, []);
        let created = self
            .ctx
            .rt
            .create(CreateOpts {
                id: &id,
                image: &img,
                spec: &spec,
                labels,
                stdout: out.to_string_lossy().into(),
                stderr: err.to_string_lossy().into(),
            })
            .await;
        self.register(&id);
        // The older of the kept instances goes; the current one becomes lastState.
        let rec = self.rec(kind, i);
        let dropped = rec.previous.take();
        rec.previous = rec.current.take().filter(|c| !c.is_running());
        rec.current = Some(inst.clone());
        rec.waiting = None;
        rec.retry_at = None;
        rec.started = false;
        rec.ready = false;
        rec.oom = false;
        if let Some(d) = dropped {
            self.unregister(&d.id);
            remove_container(&self.ctx.rt, &d.id).await;
            let _ = std::fs::remove_file(self.termination_log(&c.name, &d.id));
        }
        if let Err(e) = created {
            // runc refused the container (e.g. executable not found): kubelet's StartError.
            self.start_error(kind, i, &id, e.to_string());
            return;
        }
        match self.ctx.rt.start(&id).await {
            Ok(_) => {
                let now = Timestamp::now();
                let rec = self.rec(kind, i);
                if let Some(cur) = rec.current.as_mut() {
                    cur.started_at = Some(now);
                }
                let _ = self
                    .ctx
                    .rt
                    .set_labels(
                        &id,
                        [(labels::STARTED_AT.to_string(), now.to_string())].into(),
                    )
                    .await;
                tracing::info!(pod = %self.name, container = %c.name, restart, event = "Started", "Started container {}", c.name);
                let inst = self.rec(kind, i).current.clone();
                if let Some(inst) = inst {
                    self.start_probes(kind, i, &inst, tokio::time::Instant::now());
                }
                if let Some(h) = c.lifecycle.as_ref().and_then(|l| l.post_start.clone()) {
                    self.post_start(kind, i, &id, &h).await;
                }
            }
            Err(e) => self.start_error(kind, i, &id, e.to_string()),
        }
    }

    fn start_error(&mut self, kind: Kind, i: usize, id: &str, message: String) {
        tracing::warn!(pod = %self.name, container = %self.container(kind, i).name, "start failed: {message}");
        let rec = self.rec(kind, i);
        if let Some(cur) = rec.current.as_mut().filter(|c| c.id == id) {
            cur.state = InstState::Exited {
                code: 128,
                reason: "StartError".into(),
                message: Some(message),
                finished_at: Timestamp::now(),
            };
        }
        rec.exited_mono = Some(std::time::Instant::now());
        if let Some(r) = self.tasks.remove(id) {
            let _ = r.exited.send(true);
        }
    }

    async fn post_start(&mut self, kind: Kind, i: usize, id: &str, h: &LifecycleHandler) {
        if let Err(e) = self.run_hook(kind, i, id, h, Duration::from_secs(30)).await {
            let name = self.container(kind, i).name.clone();
            tracing::warn!(pod = %self.name, container = %name, event = "FailedPostStartHook", "PostStartHook failed: {e}");
            self.stop_container(kind, i, self.grace(None), false).await;
        }
    }

    /// Opens the log FIFOs of an instance and starts its log pumps. For a new instance this runs
    /// before the task is created, since the shim's open of the write side waits for a reader.
    fn attach(
        &mut self,
        kind: Kind,
        i: usize,
        inst: &Instance,
        process: ProcessConfig,
    ) -> Result<(), String> {
        let name = self.container(kind, i).name.clone();
        let path = self
            .log_dir()
            .join(&name)
            .join(format!("{}.log", inst.restart_count));
        let log = LogFile::open(&path, self.ctx.cfg.rotation)
            .map_err(|e| format!("container log {}: {e}", path.display()))?;
        let log = Arc::new(Mutex::new(log));
        let fifo = self.ctx.cfg.fifo_dir();
        let (exited, stop) = tokio::sync::watch::channel(false);
        let mut pumps = vec![];
        for (suffix, stream) in [("out", "stdout"), ("err", "stderr")] {
            let p = fifo.join(format!("{}.{suffix}", inst.id));
            if !p.exists() {
                nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600))
                    .map_err(|e| format!("log FIFO {}: {e}", p.display()))?;
            }
            let rx = logs::open_fifo(&p).map_err(|e| format!("log FIFO {}: {e}", p.display()))?;
            pumps.push(tokio::spawn(logs::pump(
                rx,
                stream,
                log.clone(),
                stop.clone(),
            )));
        }
        self.tasks.insert(
            inst.id.clone(),
            Running {
                probes: None,
                pumps,
                exited,
                process,
            },
        );
        Ok(())
    }

    /// Starts probes of an adopted running instance, counting from its recorded start.
    fn resume_probes(&mut self, kind: Kind, i: usize, inst: &Instance) {
        let since = inst
            .started_at
            .map(|t| Timestamp::now().duration_since(t).unsigned_abs())
            .unwrap_or_default();
        let started = tokio::time::Instant::now()
            .checked_sub(since)
            .unwrap_or_else(tokio::time::Instant::now);
        self.start_probes(kind, i, inst, started);
    }

    fn start_probes(
        &mut self,
        kind: Kind,
        i: usize,
        inst: &Instance,
        started: tokio::time::Instant,
    ) {
        let c = self.container(kind, i).clone();
        if kind == Kind::Init {
            self.rec(kind, i).started = true;
            return;
        }
        let sb = self.sandbox_info();
        let named_ports = c
            .ports
            .iter()
            .flatten()
            .filter_map(|p| p.name.clone().map(|n| (n, p.container_port)))
            .collect();
        let process = self
            .tasks
            .get(&inst.id)
            .map(|r| r.process.clone())
            .unwrap_or_default();
        let target = Arc::new(ProbeTarget {
            rt: self.ctx.rt.clone(),
            container_id: inst.id.clone(),
            pod_ip: sb.pod_ip.as_deref().and_then(|i| i.parse().ok()),
            process,
            scratch: self.ctx.cfg.data_dir.join("exec"),
            named_ports,
        });
        let (ptx, mut prx) = mpsc::unbounded_channel();
        let wtx = self.tx.clone();
        let cid = inst.id.clone();
        let fwd = async move {
            while let Some(ev) = prx.recv().await {
                if wtx
                    .send(Msg::Probe {
                        cid: cid.clone(),
                        ev,
                    })
                    .is_err()
                {
                    break;
                }
            }
        };
        let sup = probe::supervise(
            c.startup_probe.clone(),
            c.liveness_probe.clone(),
            c.readiness_probe.clone(),
            target,
            started,
            ptx,
        );
        let handle = tokio::spawn(async move {
            tokio::join!(sup, fwd);
        });
        if let Some(r) = self.tasks.get_mut(&inst.id) {
            if let Some(old) = r.probes.replace(handle) {
                old.abort();
            }
        } else {
            handle.abort();
        }
    }

    /// Runs a lifecycle hook within `budget`.
    async fn run_hook(
        &self,
        kind: Kind,
        i: usize,
        cid: &str,
        h: &LifecycleHandler,
        budget: Duration,
    ) -> Result<(), String> {
        if let Some(s) = &h.sleep {
            tokio::time::sleep(Duration::from_secs(s.seconds.max(0) as u64).min(budget)).await;
            return Ok(());
        }
        let c = self.container(kind, i);
        let as_probe = k8s_openapi::api::core::v1::Probe {
            exec: h.exec.clone(),
            http_get: h.http_get.clone(),
            tcp_socket: h.tcp_socket.clone(),
            ..Default::default()
        };
        let sb = self.sandbox_info();
        let target = ProbeTarget {
            rt: self.ctx.rt.clone(),
            container_id: cid.to_string(),
            pod_ip: sb.pod_ip.as_deref().and_then(|i| i.parse().ok()),
            process: self
                .tasks
                .get(cid)
                .map(|r| r.process.clone())
                .unwrap_or_default(),
            scratch: self.ctx.cfg.data_dir.join("exec"),
            named_ports: c
                .ports
                .iter()
                .flatten()
                .filter_map(|p| p.name.clone().map(|n| (n, p.container_port)))
                .collect(),
        };
        probe::probe_once(&as_probe, &target, budget)
            .await
            .map(|_| ())
    }

    /// Stops one container: preStop (if `pre_stop`), SIGTERM, grace, SIGKILL; records the exit.
    async fn stop_container(&mut self, kind: Kind, i: usize, grace: i64, pre_stop: bool) {
        let Some(cid) = self
            .rec(kind, i)
            .current
            .as_ref()
            .filter(|c| c.is_running())
            .map(|c| c.id.clone())
        else {
            return;
        };
        let c = self.container(kind, i).clone();
        let deadline = std::time::Instant::now() + Duration::from_secs(grace as u64);
        tracing::info!(pod = %self.name, container = %c.name, event = "Killing", "Stopping container {}", c.name);
        if pre_stop
            && let Some(h) = c.lifecycle.as_ref().and_then(|l| l.pre_stop.clone())
            && let Err(e) = self
                .run_hook(kind, i, &cid, &h, Duration::from_secs(grace as u64))
                .await
        {
            tracing::warn!(pod = %self.name, container = %c.name, event = "FailedPreStopHook", "PreStopHook failed: {e}");
        }
        let remaining = deadline
            .saturating_duration_since(std::time::Instant::now())
            .max(Duration::from_secs(if grace == 0 { 0 } else { 2 }));
        if let Some(r) = self.tasks.get(&cid)
            && let Some(p) = &r.probes
        {
            p.abort();
        }
        let _ = self.ctx.rt.kill(&cid, 15).await;
        let mut exited = self.ctx.rt.wait(&cid, remaining).await.ok().flatten();
        if exited.is_none() {
            let _ = self.ctx.rt.kill(&cid, 9).await;
            exited = self
                .ctx
                .rt
                .wait(&cid, Duration::from_secs(10))
                .await
                .ok()
                .flatten();
        }
        let (code, at) = match self.ctx.rt.task_state(&cid).await {
            Ok(TaskState::Stopped {
                exit_code,
                exited_at,
            }) => (exit_code as i32, exited_at.unwrap_or_else(Timestamp::now)),
            _ => (exited.map(|c| c as i32).unwrap_or(137), Timestamp::now()),
        };
        self.mark_exited(&cid, code, at);
    }

    /// Stops everything of the pod and frees its resources.
    async fn terminate(&mut self, grace: Option<i64>) {
        let grace = self.grace(grace);
        tracing::info!(pod = %self.name, grace, "terminating pod");
        // App containers stop in parallel as kubelet does; we run them concurrently via join.
        let mut stops = vec![];
        for (k, n) in [(Kind::App, self.app.len()), (Kind::Init, self.init.len())] {
            for i in 0..n {
                stops.push((k, i));
            }
        }
        let futs: Vec<_> = stops
            .into_iter()
            .filter(|(k, i)| {
                let r = match k {
                    Kind::Init => &self.init[*i],
                    Kind::App => &self.app[*i],
                };
                r.current.as_ref().is_some_and(|c| c.is_running())
            })
            .collect();
        // Stopping needs &mut self; run preStop hooks concurrently first, then signal all.
        self.stop_all(futs, grace).await;
        let rt = self.ctx.rt.clone();
        for r in self.init.iter().chain(self.app.iter()) {
            for inst in [&r.current, &r.previous].into_iter().flatten() {
                remove_container(&rt, &inst.id).await;
                self.unregister(&inst.id);
            }
        }
        for (_, r) in self.tasks.drain() {
            if let Some(p) = r.probes {
                p.abort();
            }
            for p in r.pumps {
                p.abort();
            }
        }
        self.teardown_sandbox().await;
        let dir = self.pod_dir();
        if let Ok(vols) = std::fs::read_dir(dir.join("volumes/empty-dir")) {
            for v in vols.flatten() {
                let _ = nix::mount::umount2(&v.path(), nix::mount::MntFlags::MNT_DETACH);
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(self.log_dir());
        let fifo = self.ctx.cfg.fifo_dir();
        for r in self.init.iter().chain(self.app.iter()) {
            for inst in [&r.current, &r.previous].into_iter().flatten() {
                let _ = std::fs::remove_file(fifo.join(format!("{}.out", inst.id)));
                let _ = std::fs::remove_file(fifo.join(format!("{}.err", inst.id)));
            }
        }
        if let Ok(mut s) = self.ctx.store.write() {
            s.remove(&self.uid);
        }
        tracing::info!(pod = %self.name, "pod stopped");
    }

    async fn stop_all(&mut self, which: Vec<(Kind, usize)>, grace: i64) {
        let deadline = std::time::Instant::now() + Duration::from_secs(grace as u64);
        // preStop hooks run concurrently, bounded by the grace period.
        let mut hooks = vec![];
        for (k, i) in &which {
            let c = self.container(*k, *i);
            if let (Some(h), Some(cur)) = (
                c.lifecycle.as_ref().and_then(|l| l.pre_stop.clone()),
                self.rec(*k, *i).current.clone(),
            ) {
                hooks.push((*k, *i, cur.id, h));
            }
        }
        let this: &Self = self;
        let runs = hooks.iter().map(|(k, i, id, h)| async move {
            if let Err(e) = this.run_hook(*k, *i, id, h, Duration::from_secs(grace as u64)).await {
                tracing::warn!(pod = %this.name, event = "FailedPreStopHook", "PreStopHook failed: {e}");
            }
        });
        let _ = tokio::time::timeout(
            Duration::from_secs(grace as u64),
            futures::future::join_all(runs),
        )
        .await;
        let remaining = deadline
            .saturating_duration_since(std::time::Instant::now())
            .max(Duration::from_secs(if grace == 0 { 0 } else { 2 }));
        let rt = self.ctx.rt.clone();
        let ids: Vec<String> = which
            .iter()
            .filter_map(|(k, i)| match k {
                Kind::Init => self.init[*i].current.as_ref().map(|c| c.id.clone()),
                Kind::App => self.app[*i].current.as_ref().map(|c| c.id.clone()),
            })
            .collect();
        let kills = ids.iter().map(|id| {
            let rt = rt.clone();
            async move {
                let _ = rt.kill(id, 15).await;
                if rt.wait(id, remaining).await.ok().flatten().is_none() {
                    let _ = rt.kill(id, 9).await;
                    let _ = rt.wait(id, Duration::from_secs(10)).await;
                }
            }
        });
        futures::future::join_all(kills).await;
    }

    async fn teardown_sandbox(&mut self) {
        if let Some(sb) = self.sandbox.take() {
            remove_container(&self.ctx.rt, &sb.id).await;
            self.unregister(&sb.id);
        }
        let _ = net::teardown_pod(&net::host_veth_name(&self.uid)).await;
        if let Err(e) = self.ctx.ipam.release_owner(&self.uid) {
            tracing::warn!(pod = %self.name, error = %e, "releasing pod IP");
        }
    }

    fn condition(
        &self,
        typ: &str,
        ok: bool,
        reason: Option<&str>,
        message: Option<String>,
    ) -> PodCondition {
        let status = if ok { "True" } else { "False" };
        let prev = self.conditions.iter().find(|c| c.type_ == typ);
        let changed = prev.is_none_or(|p| p.status != status);
        PodCondition {
            type_: typ.to_string(),
            status: status.to_string(),
            reason: reason.map(str::to_string),
            message,
            last_transition_time: if changed {
                Some(Time(Timestamp::now()))
            } else {
                prev.and_then(|p| p.last_transition_time.clone())
            },
            last_probe_time: None,
            observed_generation: None,
        }
    }

    /// Computes the pod status and publishes it to the agent's store.
    fn publish(&mut self) {
        let spec = spec_of(&self.pod).clone();
        let has_init = spec.init_containers.as_ref().is_some_and(|v| !v.is_empty());
        let mut init_st: Vec<ContainerStatus> = vec![];
        for (i, c) in spec.init_containers.iter().flatten().enumerate() {
            let mut s =
                self.init[i].status(&c.name, c.image.as_deref().unwrap_or(""), "PodInitializing");
            if let Some(e) = self
                .sandbox_error
                .as_ref()
                .filter(|_| self.init[i].current.is_none())
            {
                s.state = Some(waiting_state("ContainerCreating", e));
            }
            init_st.push(s);
        }
        let init_done = self
            .init
            .iter()
            .all(|r| r.current.as_ref().and_then(Instance::exit_code) == Some(0));
        let default_wait = if has_init {
            "PodInitializing"
        } else {
            "ContainerCreating"
        };
        let mut app_st: Vec<ContainerStatus> = vec![];
        for (i, c) in spec.containers.iter().enumerate() {
            let mut s = self.app[i].status(&c.name, c.image.as_deref().unwrap_or(""), default_wait);
            if let Some(e) = self
                .sandbox_error
                .as_ref()
                .filter(|_| self.app[i].current.is_none())
            {
                s.state = Some(waiting_state("ContainerCreating", e));
            }
            app_st.push(s);
        }
        let policy = self.restart_policy();
        let ph = phase(&init_st, &app_st, &policy, init_done);
        let terminal = ph == "Succeeded" || ph == "Failed";
        let unready: Vec<String> = app_st
            .iter()
            .filter(|s| !s.ready)
            .map(|s| s.name.clone())
            .collect();
        let incomplete: Vec<String> = init_st
            .iter()
            .filter(|s| {
                s.state
                    .as_ref()
                    .and_then(|st| st.terminated.as_ref())
                    .is_none_or(|t| t.exit_code != 0)
            })
            .map(|s| s.name.clone())
            .collect();
        let list = |v: &[String]| format!("[{}]", v.join(" "));
        let mut conds = vec![
            self.condition(
                "PodReadyToStartContainers",
                self.sandbox.is_some(),
                None,
                None,
            ),
            if init_done {
                self.condition(
                    "Initialized",
                    true,
                    if ph == "Succeeded" && has_init {
                        Some("PodCompleted")
                    } else {
                        None
                    },
                    None,
                )
            } else {
                self.condition(
                    "Initialized",
                    false,
                    Some("ContainersNotInitialized"),
                    Some(format!(
                        "containers with incomplete status: {}",
                        list(&incomplete)
                    )),
                )
            },
        ];
        let (ready, reason, msg) = if terminal {
            (
                false,
                Some(if ph == "Succeeded" {
                    "PodCompleted"
                } else {
                    "PodFailed"
                }),
                None,
            )
        } else if unready.is_empty() {
            (true, None, None)
        } else {
            (
                false,
                Some("ContainersNotReady"),
                Some(format!(
                    "containers with unready status: {}",
                    list(&unready)
                )),
            )
        };
        conds.push(self.condition("ContainersReady", ready, reason, msg.clone()));
        conds.push(self.condition("Ready", ready, reason, msg));
        conds.push(self.condition("PodScheduled", true, None, None));
        self.conditions = conds.clone();
        let sb = self.sandbox_info();
        let status = PodStatus {
            phase: Some(ph.to_string()),
            conditions: Some(conds),
            host_ip: Some(sb.host_ip.clone()),
            host_ips: Some(vec![HostIP {
                ip: sb.host_ip.clone(),
            }]),
            pod_ip: sb.pod_ip.clone(),
            pod_ips: sb.pod_ip.clone().map(|ip| vec![PodIP { ip }]),
            start_time: self.start_time.map(Time),
            init_container_statuses: has_init.then_some(init_st),
            container_statuses: Some(app_st),
            qos_class: Some(qos_class(&spec)),
            ..Default::default()
        };
        let mut pod = self.pod.clone();
        pod.status = Some(status);
        if let Ok(mut s) = self.ctx.store.write() {
            s.insert(self.uid.clone(), pod);
        }
        if terminal && !self.terminal {
            // Nothing will run again: the next sync tears the sandbox down, as kubelet does.
            self.terminal = true;
            self.set_wake(Instant::now());
        }
    }
}

/// Deletes a container from containerd, logging (not failing) on error.
pub(crate) async fn remove_container(rt: &crate::runtime::Containerd, id: &str) {
    if let Err(e) = rt.delete(id).await {
        tracing::warn!(container = id, error = %e, "removing container");
    }
}

fn waiting_state(reason: &str, message: &str) -> k8s_openapi::api::core::v1::ContainerState {
    k8s_openapi::api::core::v1::ContainerState {
        waiting: Some(k8s_openapi::api::core::v1::ContainerStateWaiting {
            reason: Some(reason.into()),
            message: Some(message.into()),
        }),
        ..Default::default()
    }
}

fn humantime(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 60 && s.is_multiple_of(60) {
        format!("{}m0s", s / 60)
    } else if s >= 60 {
        format!("{}m{}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

/// The pod's QoS class from its containers' requests and limits.
pub fn qos_class(spec: &k8s_openapi::api::core::v1::PodSpec) -> String {
    let all: Vec<&Container> = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .collect();
    let mut any = false;
    let mut guaranteed = true;
    for c in all {
        let r = c.resources.as_ref();
        let lim = r.and_then(|r| r.limits.as_ref());
        let req = r.and_then(|r| r.requests.as_ref());
        for res in ["cpu", "memory"] {
            let l = lim.and_then(|m| m.get(res));
            let q = req.and_then(|m| m.get(res)).or(l);
            if l.is_some() || q.is_some() {
                any = true;
            }
            if l.is_none() || q.map(|q| &q.0) != l.map(|l| &l.0) {
                guaranteed = false;
            }
        }
    }
    if !any {
        "BestEffort".into()
    } else if guaranteed {
        "Guaranteed".into()
    } else {
        "Burstable".into()
    }
}
