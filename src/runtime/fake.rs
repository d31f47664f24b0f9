//! A recording container runtime for unit tests. Containers live in a map; every lifecycle
//! call is a line in `calls`, naming the container by its name label (`create POD`,
//! `start init-a`, `kill app 15`, `delete POD`); exits arrive as events, as containerd's do.
//! Scripts: a container that exits by itself on start (`exit_on_start`), one whose start
//! fails (`fail_start`), one that ignores SIGTERM (`ignore_sigterm`).

use std::{
    collections::{HashMap, HashSet},
    path::Path,
    sync::Mutex,
    time::Duration,
};

use futures::{StreamExt, stream::BoxStream};
use tokio::sync::broadcast;

use super::{
    Error, Result, Runtime,
    container::{CreateOpts, ExecResult, Listed, Stdio, TaskState},
    events::RuntimeEvent,
    image::ImageInfo,
};

struct Container {
    name: String,
    labels: HashMap<String, String>,
    image: String,
    state: TaskState,
}

#[derive(Default)]
struct State {
    containers: HashMap<String, Container>,
    next_pid: u32,
    exit_on_start: HashMap<String, u32>,
    fail_start: HashMap<String, String>,
    ignore_sigterm: HashSet<String>,
    /// Images not on the node until pulled.
    absent: HashSet<String>,
    /// Pulls of these images fail with the reason.
    pull_fails: HashMap<String, String>,
    /// How long a pull takes.
    pull_takes: Duration,
}

/// Calls in order, shared with other fakes (the pod network's) to see one sequence.
pub(crate) type CallLog = std::sync::Arc<Mutex<Vec<String>>>;

pub(crate) struct FakeRuntime {
    /// The label whose value names a container in `calls`.
    name_label: &'static str,
    log: CallLog,
    state: Mutex<State>,
    events: broadcast::Sender<RuntimeEvent>,
}

impl FakeRuntime {
    pub(crate) fn new(name_label: &'static str, log: CallLog) -> Self {
        Self {
            name_label,
            log,
            state: Mutex::new(State {
                next_pid: 100,
                ..Default::default()
            }),
            events: broadcast::channel(64).0,
        }
    }

    /// Container `name` exits with `code` as soon as it starts (every time).
    pub(crate) fn exit_on_start(&self, name: &str, code: u32) {
        self.lock().exit_on_start.insert(name.into(), code);
    }

    /// Starting container `name` fails with `message`.
    pub(crate) fn fail_start(&self, name: &str, message: &str) {
        self.lock().fail_start.insert(name.into(), message.into());
    }

    /// Container `name` survives SIGTERM (SIGKILL still ends it).
    pub(crate) fn ignore_sigterm(&self, name: &str) {
        self.lock().ignore_sigterm.insert(name.into());
    }

    /// Image `reference` is not on the node until a pull brings it.
    pub(crate) fn absent(&self, reference: &str) {
        self.lock().absent.insert(reference.into());
    }

    /// Pulls of `reference` fail with `reason` (None: they succeed again).
    pub(crate) fn pull_fails(&self, reference: &str, reason: Option<&str>) {
        let mut st = self.lock();
        match reason {
            Some(r) => st.pull_fails.insert(reference.into(), r.into()),
            None => st.pull_fails.remove(reference),
        };
    }

    /// Every pull takes `d`.
    pub(crate) fn pull_takes(&self, d: Duration) {
        self.lock().pull_takes = d;
    }

    /// The calls so far.
    pub(crate) fn calls(&self) -> Vec<String> {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The running containers' names.
    pub(crate) fn running(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .lock()
            .containers
            .values()
            .filter(|c| matches!(c.state, TaskState::Running { .. }))
            .map(|c| c.name.clone())
            .collect();
        v.sort();
        v
    }

    /// The sandbox dies: its task stops and its exit is reported.
    pub(crate) fn crash(&self, name: &str, code: u32) {
        let id = {
            let st = self.lock();
            st.containers
                .iter()
                .find(|(_, c)| c.name == name && matches!(c.state, TaskState::Running { .. }))
                .map(|(id, _)| id.clone())
        };
        if let Some(id) = id {
            self.exit(&id, code);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn name_of(&self, id: &str) -> String {
        self.lock()
            .containers
            .get(id)
            .map(|c| c.name.clone())
            .unwrap_or_else(|| id.to_string())
    }

    fn record(&self, line: String) {
        self.log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(line);
    }

    /// Task `id` stops with `code`; its exit event follows.
    fn exit(&self, id: &str, code: u32) {
        if let Some(c) = self.lock().containers.get_mut(id) {
            c.state = TaskState::Stopped {
                exit_code: code,
                exited_at: Some(jiff::Timestamp::now()),
            };
        }
        let _ = self.events.send(RuntimeEvent::Exit {
            container_id: id.into(),
            exec_id: id.into(),
            exit_code: code,
            exited_at: Some(jiff::Timestamp::now()),
        });
    }

    fn unsupported<T>(&self, what: &str) -> Result<T> {
        Err(Error::Io {
            what: format!("fake runtime: {what}"),
            source: std::io::Error::from(std::io::ErrorKind::Unsupported),
        })
    }
}

#[async_trait::async_trait]
impl Runtime for FakeRuntime {
    async fn pull(
        &self,
        reference: &str,
        _opts: super::pull::PullOptions<'_>,
    ) -> Result<super::pull::Pulled> {
        self.record(format!("pull {reference}"));
        let takes = self.lock().pull_takes;
        tokio::time::sleep(takes).await;
        let mut st = self.lock();
        if let Some(reason) = st.pull_fails.get(reference) {
            return Err(Error::Pull {
                reference: reference.into(),
                reason: reason.clone(),
            });
        }
        st.absent.remove(reference);
        Ok(super::pull::Pulled {
            name: reference.into(),
            digest: "sha256:00".into(),
            size: 1000,
        })
    }

    async fn image_info(&self, reference: &str) -> Result<ImageInfo> {
        if self.lock().absent.contains(reference) {
            return Err(Error::ImageNotFound(reference.into()));
        }
        Ok(ImageInfo {
            name: reference.into(),
            image_id: format!("{reference}@sha256:00"),
            cmd: vec!["/bin/app".into()],
            working_dir: "/".into(),
            ..Default::default()
        })
    }

    async fn create(&self, o: CreateOpts<'_>) -> Result<u32> {
        let name = o.labels.get(self.name_label).cloned().unwrap_or_default();
        self.record(format!("create {name}"));
        self.lock().containers.insert(
            o.id.into(),
            Container {
                name,
                labels: o.labels,
                image: o.image.name.clone(),
                state: TaskState::Created,
            },
        );
        Ok(0)
    }

    async fn start(&self, id: &str) -> Result<u32> {
        let name = self.name_of(id);
        self.record(format!("start {name}"));
        let (pid, exit) = {
            let mut st = self.lock();
            if let Some(msg) = st.fail_start.get(&name).cloned() {
                return Err(Error::Io {
                    what: msg,
                    source: std::io::Error::from(std::io::ErrorKind::NotFound),
                });
            }
            st.next_pid += 1;
            let pid = st.next_pid;
            if let Some(c) = st.containers.get_mut(id) {
                c.state = TaskState::Running { pid };
            }
            (pid, st.exit_on_start.get(&name).copied())
        };
        if let Some(code) = exit {
            self.exit(id, code);
        }
        Ok(pid)
    }

    async fn kill(&self, id: &str, signal: u32) -> Result<()> {
        let name = self.name_of(id);
        self.record(format!("kill {name} {signal}"));
        let running = matches!(
            self.lock().containers.get(id).map(|c| &c.state),
            Some(TaskState::Running { .. })
        );
        let ignored = signal == 15 && self.lock().ignore_sigterm.contains(&name);
        if running && !ignored {
            self.exit(id, 128 + signal);
        }
        Ok(())
    }

    async fn task_state(&self, id: &str) -> Result<TaskState> {
        Ok(self
            .lock()
            .containers
            .get(id)
            .map(|c| c.state.clone())
            .unwrap_or(TaskState::Missing))
    }

    async fn wait(&self, id: &str, timeout: Duration) -> Result<Option<u32>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let TaskState::Stopped { exit_code, .. } = self.task_state(id).await? {
                return Ok(Some(exit_code));
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn delete(&self, id: &str) -> Result<()> {
        let name = self.name_of(id);
        self.record(format!("delete {name}"));
        self.lock().containers.remove(id);
        Ok(())
    }

    async fn set_labels(&self, id: &str, labels: HashMap<String, String>) -> Result<()> {
        if let Some(c) = self.lock().containers.get_mut(id) {
            c.labels.extend(labels);
        }
        Ok(())
    }

    async fn list_with_label(&self, label: &str) -> Result<Vec<Listed>> {
        Ok(self
            .lock()
            .containers
            .iter()
            .filter(|(_, c)| c.labels.contains_key(label))
            .map(|(id, c)| Listed {
                id: id.clone(),
                labels: c.labels.clone(),
                image: c.image.clone(),
            })
            .collect())
    }

    async fn events(&self) -> Result<BoxStream<'static, Result<RuntimeEvent>>> {
        let rx = self.events.subscribe();
        Ok(tokio_stream::wrappers::BroadcastStream::new(rx)
            .filter_map(|e| async move { e.ok().map(Ok) })
            .boxed())
    }

    async fn container_process(&self, _id: &str) -> Result<oci_spec::runtime::Process> {
        self.unsupported("container_process")
    }
    async fn exec_create(
        &self,
        _id: &str,
        _exec_id: &str,
        _process: &oci_spec::runtime::Process,
        _io: &Stdio,
    ) -> Result<()> {
        self.unsupported("exec_create")
    }
    async fn wait_process(&self, _id: &str, _exec_id: &str) -> Result<u32> {
        self.unsupported("wait_process")
    }
    async fn exec_start(&self, _id: &str, _exec_id: &str) -> Result<u32> {
        self.unsupported("exec_start")
    }
    async fn resize_pty(&self, _id: &str, _exec_id: &str, _w: u32, _h: u32) -> Result<()> {
        self.unsupported("resize_pty")
    }
    async fn close_stdin(&self, _id: &str, _exec_id: &str) -> Result<()> {
        self.unsupported("close_stdin")
    }
    async fn exec_kill(&self, _id: &str, _exec_id: &str, _signal: u32) -> Result<()> {
        self.unsupported("exec_kill")
    }
    async fn exec_delete(&self, _id: &str, _exec_id: &str) -> Result<()> {
        self.unsupported("exec_delete")
    }
    async fn exec(
        &self,
        id: &str,
        process: &oci_spec::runtime::Process,
        _scratch_dir: &Path,
        _timeout: Duration,
        _max_output: usize,
    ) -> Result<ExecResult> {
        let name = self.name_of(id);
        let args = process.args().clone().unwrap_or_default().join(" ");
        self.record(format!("exec {name} {args}"));
        Ok(ExecResult {
            exit_code: Some(0),
            output: vec![],
            timed_out: false,
        })
    }
}
