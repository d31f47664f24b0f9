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
        container::{CreateOpts, Listed, Stdio, TaskState},
        image::ImageInfo,
        random_hex,
        sandbox::{self, SandboxError},
        spec::{self, Ns, ProcessConfig, RuntimeConfig},
    },
};

mod adopt;
mod image;
mod kill;

pub(super) use kill::graceful_stop;
mod lifecycle;
mod start;
mod status;
mod stop;
#[cfg(test)]
mod tests;

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
    /// A pull this pod's containers waited for ended.
    ImagePulled {
        image: String,
        result: super::images::PullResult,
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
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
    /// Its stdio for attached clients (the agent's registry holds a weak reference).
    _io: Arc<super::streaming::AttachIo>,
}

pub struct PodWorker {
    ctx: Arc<AgentCtx>,
    pod: Pod,
    uid: String,
    name: String,
    namespace: String,
    /// The sandbox and where the pod stands (see `lifecycle`).
    state: lifecycle::PodState,
    init: Vec<ContainerRecord>,
    app: Vec<ContainerRecord>,
    tasks: HashMap<String, Running>,
    tx: mpsc::UnboundedSender<Msg>,
    rx: mpsc::UnboundedReceiver<Msg>,
    start_time: Option<Timestamp>,
    conditions: Vec<PodCondition>,
    wake: Option<Instant>,
    /// The ConfigMaps and Secrets the pod references, as last fetched.
    refs: build::Refs,
    /// When this worker first saw the pod; None once its start was counted.
    seen: Option<std::time::Instant>,
}

fn spec_of(pod: &Pod) -> &k8s_openapi::api::core::v1::PodSpec {
    static EMPTY: std::sync::OnceLock<k8s_openapi::api::core::v1::PodSpec> =
        std::sync::OnceLock::new();
    pod.spec
        .as_ref()
        .unwrap_or_else(|| EMPTY.get_or_init(Default::default))
}

impl PodWorker {
    /// Records a kubelet event about this pod (cluster mode; static pods have no API object).
    pub(super) fn event(&self, warning: bool, reason: &str, message: String) {
        if let Some(r) = &self.ctx.recorder
            && self.pod.metadata.annotations.as_ref().is_none_or(|a| {
                a.get("kubernetes.io/config.source")
                    .is_none_or(|s| s == "api")
            })
        {
            r.event(&self.pod, warning, reason, message);
        }
    }

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
            refs: build::Refs::default(),
            state: lifecycle::PodState::default(),
            init: vec![ContainerRecord::default(); n_init],
            app: vec![ContainerRecord::default(); n_app],
            tasks: HashMap::new(),
            tx: tx.clone(),
            rx,
            start_time: None,
            conditions: vec![],
            wake: None,
            seen: Some(std::time::Instant::now()),
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

    fn rec_ref(&self, kind: Kind, i: usize) -> &ContainerRecord {
        match kind {
            Kind::Init => &self.init[i],
            Kind::App => &self.app[i],
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

    fn restart_policy(&self) -> lifecycle::RestartPolicy {
        lifecycle::RestartPolicy::of(spec_of(&self.pod))
    }

    /// Runs the worker until the pod is terminated.
    ///
    /// The steps are boxed: a worker rests between wake-ups for most of its life, and its
    /// task then holds only this loop's state instead of the largest step's (measured: a
    /// pod's resting task fell from tens of KiB).
    pub async fn run(mut self, adopted: Vec<Listed>) {
        if !adopted.is_empty() {
            // Started by an earlier run of the agent: not a start to count.
            self.seen = None;
        }
        Box::pin(self.adopt(adopted)).await;
        // A pod adopted in a terminal phase must not get a new sandbox: reporting first
        // computes the phase from what was found.
        self.report();
        loop {
            let t0 = std::time::Instant::now();
            Box::pin(self.sync()).await;
            super::metrics::get().pod_sync.observe(t0.elapsed());
            self.report();
            self.count_start();
            let resync = Instant::now() + self.ctx.cfg.resync;
            let wake = self.wake.take().map_or(resync, |w| w.min(resync));
            let msg = tokio::select! {
                m = self.rx.recv() => m,
                _ = tokio::time::sleep_until(wake) => {
                    Box::pin(self.relist()).await;
                    continue;
                }
            };
            let Some(msg) = msg else { break };
            if let Msg::Terminate { grace } = msg {
                Box::pin(self.terminate(grace)).await;
                break;
            }
            Box::pin(self.handle(msg)).await;
            while let Ok(m) = self.rx.try_recv() {
                if let Msg::Terminate { grace } = m {
                    Box::pin(self.terminate(grace)).await;
                    return;
                }
                Box::pin(self.handle(m)).await;
            }
        }
    }

    /// Publishes the pod's status; once it is Succeeded or Failed the pod is finished (nothing
    /// runs again, and the next sync removes the sandbox, as kubelet does).
    fn report(&mut self) {
        if self.publish() && !self.state.is_finished() {
            self.state.finish();
            self.set_wake(Instant::now());
        }
    }

    /// Counts the pod's start once all its containers run (kubelet_pod_start_duration_seconds).
    fn count_start(&mut self) {
        let Some(seen) = self.seen else { return };
        let running = !self.app.is_empty()
            && self
                .app
                .iter()
                .all(|r| r.current.as_ref().is_some_and(|c| c.is_running()));
        if running {
            super::metrics::get().pod_start.observe(seen.elapsed());
            self.seen = None;
        }
    }

    async fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Exit { cid, code, at } => {
                if self.state.task_exited(&cid) {
                    tracing::warn!("sandbox exited");
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
            Msg::ImagePulled { image, result } => self.on_pulled(&image, &result),
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
                tracing::info!(container = %cname, event = "Unhealthy", "{} probe failed: {}", kind.label(), output.trim());
                self.event(
                    true,
                    "Unhealthy",
                    format!("{} probe failed: {}", kind.label(), output.trim()),
                );
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
                tracing::info!(container = %cname, event = "Killing", "Container {cname} failed {} probe, will be restarted", kind.label().to_lowercase());
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
        let mut message = read_termination_message(&tlog);
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
        rec.exited_mono = Some(Instant::now());
        rec.started = false;
        rec.ready = false;
        if let Some(r) = self.tasks.remove(cid) {
            let _ = r.exited.send(true);
            self.forget_io(cid);
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

    fn register(&self, cid: &str) {
        if let Ok(mut r) = self.ctx.routes.lock() {
            r.insert(cid.to_string(), self.tx.clone());
        }
    }

    fn forget_io(&self, cid: &str) {
        if let Ok(mut a) = self.ctx.attach.lock() {
            a.remove(cid);
        }
    }

    fn unregister(&self, cid: &str) {
        if let Ok(mut r) = self.ctx.routes.lock() {
            r.remove(cid);
        }
    }

    /// Checks every running instance against containerd (repairs missed events).
    async fn relist(&mut self) {
        // Only an answer counts: a failed call says nothing about the sandbox.
        if let Some(id) = self.state.sandbox().map(|s| s.id.clone())
            && matches!(
                self.ctx.rt.task_state(&id).await,
                Ok(s) if !matches!(s, TaskState::Running { .. })
            )
        {
            self.state.task_exited(&id);
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
        self.sync_volumes().await;
    }

    /// Brings ConfigMap/Secret/downwardAPI volumes of a running pod up to date.
    async fn sync_volumes(&mut self) {
        let projected = spec_of(&self.pod)
            .volumes
            .iter()
            .flatten()
            .any(|v| v.config_map.is_some() || v.secret.is_some() || v.downward_api.is_some());
        if !projected || !self.state.is_running() || self.ctx.client.is_none() {
            return;
        }
        self.refresh_refs().await;
        if let Err(e) = build::refresh_projections(&self.pod, &self.sandbox_info()) {
            tracing::warn!(error = %e, "updating volumes");
        }
    }

    fn set_wake(&mut self, at: Instant) {
        self.wake = Some(self.wake.map_or(at, |w| w.min(at)));
    }

    /// One reconciliation pass: carries out what `lifecycle::plan` says until it says wait.
    async fn sync(&mut self) {
        use lifecycle::{ContainerStep, Step};
        let policy = self.restart_policy();
        loop {
            let now = Instant::now();
            match lifecycle::plan(&self.state, policy, &self.init, &self.app, now) {
                Step::Wait(at) => {
                    if let Some(at) = at {
                        self.set_wake(at);
                    }
                    return;
                }
                Step::TearDown => {
                    self.teardown_sandbox().await;
                    return;
                }
                Step::ReplaceSandbox => self.replace_sandbox().await,
                Step::CreateSandbox => match self.create_sandbox().await {
                    Ok(sb) => self.state.created(sb),
                    Err(e) => {
                        let delay = self.state.create_failed(e.to_string(), now);
                        tracing::warn!(error = %e, retry_in = ?delay, "creating pod sandbox failed");
                        self.set_wake(Instant::now() + delay);
                        return;
                    }
                },
                Step::Containers(steps, at) => {
                    for step in steps {
                        match step {
                            ContainerStep::Start(k, i) => self.start(k, i).await,
                            ContainerStep::Restart(k, i) => {
                                let before = self.rec(k, i).backoff.clone();
                                self.rec(k, i).backoff.next(Instant::now());
                                self.start(k, i).await;
                                if self.rec(k, i).pull.waiting_since.is_some() {
                                    // Only waiting for a pull: the restart happens when it
                                    // ends, and is charged then.
                                    self.rec(k, i).backoff = before;
                                }
                            }
                            ContainerStep::BackOff(k, i, until) => self.back_off(k, i, until),
                        }
                    }
                    if let Some(at) = at {
                        self.set_wake(at);
                    }
                    return;
                }
            }
        }
    }

    /// Holds an exited container in CrashLoopBackOff until `until` (announced once).
    fn back_off(&mut self, kind: Kind, i: usize, until: Instant) {
        let name = self.container(kind, i).name.clone();
        let (pod, ns, uid) = (self.name.clone(), self.namespace.clone(), self.uid.clone());
        let rec = self.rec(kind, i);
        let msg = format!(
            "back-off {} restarting failed container={name} pod={pod}_{ns}({uid})",
            humantime(rec.backoff.current())
        );
        let announce = rec
            .waiting
            .as_ref()
            .is_none_or(|(r, _)| r != "CrashLoopBackOff");
        rec.waiting = Some(("CrashLoopBackOff".into(), msg));
        if announce {
            let text =
                format!("Back-off restarting failed container {name} in pod {pod}_{ns}({uid})");
            tracing::info!(container = %name, event = "BackOff", "{text}");
            self.event(true, "BackOff", text);
        }
        self.set_wake(until);
    }
}

pub(crate) async fn remove_container(rt: &dyn crate::runtime::Runtime, id: &str) {
    if let Err(e) = rt.delete(id).await {
        tracing::warn!(container = id, error = %e, "removing container");
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

/// A container's termination message: at most its first 4096 bytes (kubelet's cap), read
/// without loading the rest of a file the container may have made huge.
pub(super) fn read_termination_message(path: &std::path::Path) -> Option<String> {
    use std::io::Read;
    let mut buf = Vec::with_capacity(4096);
    std::fs::File::open(path)
        .ok()?
        .take(4096)
        .read_to_end(&mut buf)
        .ok()?;
    (!buf.is_empty()).then(|| String::from_utf8_lossy(&buf).into_owned())
}
