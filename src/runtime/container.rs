//! Containers and tasks in containerd: create (snapshot + container + task), start, signal,
//! inspect, delete, list by label, and exec. One container per keelson container instance.

use std::{collections::HashMap, path::Path, time::Duration};

use containerd_client::services::v1::{
    CloseIoRequest, Container, CreateContainerRequest, CreateTaskRequest, DeleteContainerRequest,
    DeleteProcessRequest, DeleteTaskRequest, ExecProcessRequest, GetRequest, KillRequest,
    ListContainersRequest, ResizePtyRequest, StartRequest, UpdateContainerRequest, WaitRequest,
    container::Runtime,
    snapshots::{PrepareSnapshotRequest, RemoveSnapshotRequest},
};
use prost_types::Any;

use super::{Containerd, Error, RUNC_RUNTIME, Result, SNAPSHOTTER, image::ImageInfo, random_hex};

const SPEC_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Spec";

/// The stdio paths of an interactive process (FIFOs the caller made; empty = none). With a
/// terminal, stdout carries the terminal's output and stderr stays empty.
#[derive(Debug, Clone, Default)]
pub struct Stdio {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

/// What to create.
pub struct CreateOpts<'a> {
    pub id: &'a str,
    pub image: &'a ImageInfo,
    pub spec: &'a oci_spec::runtime::Spec,
    pub labels: HashMap<String, String>,
    /// Paths the shim opens for the container's stdio (FIFOs or regular files); empty = none.
    pub stdio: Stdio,
}

/// A task's state as containerd reports it.
#[derive(Debug, Clone, PartialEq)]
pub enum TaskState {
    /// No task (never created, or deleted).
    Missing,
    Created,
    Running {
        pid: u32,
    },
    Stopped {
        exit_code: u32,
        exited_at: Option<jiff::Timestamp>,
    },
    Other,
}

/// A container found in containerd, with its labels.
#[derive(Debug, Clone)]
pub struct Listed {
    pub id: String,
    pub labels: HashMap<String, String>,
    pub image: String,
}

/// The outcome of an exec.
#[derive(Debug, Clone)]
pub struct ExecResult {
    pub exit_code: Option<u32>,
    pub output: Vec<u8>,
    pub timed_out: bool,
}

pub(crate) fn ts(t: Option<prost_types::Timestamp>) -> Option<jiff::Timestamp> {
    let t = t?;
    jiff::Timestamp::new(t.seconds, t.nanos).ok()
}

fn ignore_not_found(r: std::result::Result<(), tonic::Status>, op: &'static str) -> Result<()> {
    match r {
        Ok(()) => Ok(()),
        Err(s) if s.code() == tonic::Code::NotFound => Ok(()),
        Err(source) => Err(Error::Rpc { op, source }),
    }
}

impl Containerd {
    /// Prepares a rootfs snapshot, creates the container and its task (not started).
    /// A rootfs mount that fails with ENOENT is retried a few times: containerd 1.6 can race
    /// its snapshot garbage collection against a fresh overlay mount.
    pub async fn create(&self, o: CreateOpts<'_>) -> Result<u32> {
        let mut attempt = 0;
        loop {
            match self.create_once(&o).await {
                Err(Error::Rpc {
                    op: "task create",
                    source,
                }) if attempt < 3
                    && source
                        .message()
                        .contains("failed to mount rootfs component")
                    && source.message().contains("no such file or directory") =>
                {
                    attempt += 1;
                    tracing::debug!(
                        id = o.id,
                        attempt,
                        "retrying task create after a rootfs mount race"
                    );
                    tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
                }
                other => return other,
            }
        }
    }

    async fn create_once(&self, o: &CreateOpts<'_>) -> Result<u32> {
        // The new active snapshot is referenced by nothing until the container record exists:
        // without a lease, a garbage collection that another container's deletion set off in
        // between removes it, and the task then finds no rootfs (as containerd's client, the
        // snapshot and the container are made under a lease dropped once the container holds
        // the snapshot).
        let lease = self
            .lease("keelson-create", Duration::from_secs(300))
            .await?;
        let res = self.create_container(o, &lease).await;
        self.drop_lease(lease).await;
        let mounts = res?;
        self.create_task(o, mounts).await
    }

    /// The snapshot and the container record, under `lease`; returns the rootfs mounts.
    async fn create_container(
        &self,
        o: &CreateOpts<'_>,
        lease: &str,
    ) -> Result<Vec<containerd_client::types::Mount>> {
        let mounts = self
            .snapshots()
            .prepare(self.req_leased(
                PrepareSnapshotRequest {
                    snapshotter: SNAPSHOTTER.into(),
                    key: o.id.into(),
                    parent: o.image.chain_id.clone(),
                    labels: HashMap::new(),
                },
                Some(lease),
            ))
            .await
            .map_err(Error::rpc("snapshot prepare"))?
            .into_inner()
            .mounts;
        let spec = serde_json::to_vec(o.spec).map_err(|e| Error::bad("runtime spec", e))?;
        tracing::debug!(id = o.id, spec = %String::from_utf8_lossy(&spec), "creating container");
        let container = Container {
            id: o.id.into(),
            labels: o.labels.clone(),
            image: o.image.name.clone(),
            runtime: Some(Runtime {
                name: RUNC_RUNTIME.into(),
                options: None,
            }),
            spec: Some(Any {
                type_url: SPEC_TYPE_URL.into(),
                value: spec,
            }),
            snapshotter: SNAPSHOTTER.into(),
            snapshot_key: o.id.into(),
            ..Default::default()
        };
        if let Err(source) = self
            .containers()
            .create(self.req_leased(
                CreateContainerRequest {
                    container: Some(container),
                },
                Some(lease),
            ))
            .await
        {
            let _ = self.remove_snapshot(o.id).await;
            return Err(Error::Rpc {
                op: "container create",
                source,
            });
        }
        Ok(mounts)
    }

    async fn create_task(
        &self,
        o: &CreateOpts<'_>,
        mounts: Vec<containerd_client::types::Mount>,
    ) -> Result<u32> {
        let created = self
            .tasks()
            .create(self.req(CreateTaskRequest {
                container_id: o.id.into(),
                rootfs: mounts,
                stdin: o.stdio.stdin.clone(),
                stdout: o.stdio.stdout.clone(),
                stderr: o.stdio.stderr.clone(),
                terminal: o.stdio.terminal,
                ..Default::default()
            }))
            .await;
        match created {
            Ok(r) => Ok(r.into_inner().pid),
            Err(source) => {
                let _ = self.delete(o.id).await;
                Err(Error::Rpc {
                    op: "task create",
                    source,
                })
            }
        }
    }

    /// Starts a created task; returns its pid.
    pub async fn start(&self, id: &str) -> Result<u32> {
        let r = self
            .tasks()
            .start(self.req(StartRequest {
                container_id: id.into(),
                exec_id: String::new(),
            }))
            .await
            .map_err(Error::rpc("task start"))?;
        Ok(r.into_inner().pid)
    }

    /// Sends a signal to the container's init process.
    pub async fn kill(&self, id: &str, signal: u32) -> Result<()> {
        let r = self
            .tasks()
            .kill(self.req(KillRequest {
                container_id: id.into(),
                exec_id: String::new(),
                signal,
                all: false,
            }))
            .await
            .map(|_| ());
        ignore_not_found(r, "task kill")
    }

    /// The task's current state.
    pub async fn task_state(&self, id: &str) -> Result<TaskState> {
        let r = self
            .tasks()
            .get(self.req(GetRequest {
                container_id: id.into(),
                exec_id: String::new(),
            }))
            .await;
        let p = match r {
            Ok(r) => r.into_inner().process,
            Err(s) if s.code() == tonic::Code::NotFound => return Ok(TaskState::Missing),
            Err(source) => {
                return Err(Error::Rpc {
                    op: "task get",
                    source,
                });
            }
        };
        let Some(p) = p else {
            return Ok(TaskState::Missing);
        };
        use containerd_client::types::v1::Status;
        Ok(
            match Status::try_from(p.status).unwrap_or(Status::Unknown) {
                Status::Created => TaskState::Created,
                Status::Running | Status::Pausing | Status::Paused => {
                    TaskState::Running { pid: p.pid }
                }
                Status::Stopped => TaskState::Stopped {
                    exit_code: p.exit_status,
                    exited_at: ts(p.exited_at),
                },
                Status::Unknown => TaskState::Other,
            },
        )
    }

    /// Waits for the task to exit, up to `timeout`; `None` when it is still running then.
    pub async fn wait(&self, id: &str, timeout: Duration) -> Result<Option<u32>> {
        let mut tasks = self.tasks();
        let fut = tasks.wait(self.req(WaitRequest {
            container_id: id.into(),
            exec_id: String::new(),
        }));
        match tokio::time::timeout(timeout, fut).await {
            Err(_) => Ok(None),
            Ok(Ok(r)) => Ok(Some(r.into_inner().exit_status)),
            Ok(Err(s)) if s.code() == tonic::Code::NotFound => Ok(Some(0)),
            Ok(Err(source)) => Err(Error::Rpc {
                op: "task wait",
                source,
            }),
        }
    }

    /// Deletes the task (if any), the container and its snapshot. Idempotent. A task that is
    /// still running (or whose exit containerd has not processed yet) is killed first.
    pub async fn delete(&self, id: &str) -> Result<()> {
        let mut attempt = 0;
        loop {
            let r = self
                .tasks()
                .delete(self.req(DeleteTaskRequest {
                    container_id: id.into(),
                }))
                .await
                .map(|_| ());
            match r {
                Ok(()) => break,
                Err(s) if s.code() == tonic::Code::NotFound => break,
                Err(source) if attempt >= 5 => {
                    return Err(Error::Rpc {
                        op: "task delete",
                        source,
                    });
                }
                Err(_) => {
                    attempt += 1;
                    self.kill(id, 9).await?;
                    let _ = self.wait(id, Duration::from_secs(2)).await?;
                    tokio::time::sleep(Duration::from_millis(50 * attempt)).await;
                }
            }
        }
        let r = self
            .containers()
            .delete(self.req(DeleteContainerRequest { id: id.into() }))
            .await
            .map(|_| ());
        ignore_not_found(r, "container delete")?;
        self.remove_snapshot(id).await
    }

    async fn remove_snapshot(&self, key: &str) -> Result<()> {
        let r = self
            .snapshots()
            .remove(self.req(RemoveSnapshotRequest {
                snapshotter: SNAPSHOTTER.into(),
                key: key.into(),
            }))
            .await
            .map(|_| ());
        ignore_not_found(r, "snapshot remove")
    }

    /// Merges `labels` into the container's labels.
    pub async fn set_labels(&self, id: &str, labels: HashMap<String, String>) -> Result<()> {
        let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
        self.containers()
            .update(self.req(UpdateContainerRequest {
                container: Some(Container {
                    id: id.into(),
                    labels,
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask { paths }),
            }))
            .await
            .map_err(Error::rpc("container update"))?;
        Ok(())
    }

    /// Every container in this namespace that carries `label`.
    pub async fn list_with_label(&self, label: &str) -> Result<Vec<Listed>> {
        self.list_filtered(&format!("labels.\"{label}\"")).await
    }

    /// Containers whose labels match every `(label, value)`.
    pub async fn list_labelled(&self, want: &[(&str, &str)]) -> Result<Vec<Listed>> {
        let filter: Vec<String> = want
            .iter()
            .map(|(k, v)| format!("labels.\"{k}\"=={v}"))
            .collect();
        self.list_filtered(&filter.join(",")).await
    }

    /// The process of a container's runtime spec (user, environment, working directory):
    /// the base of an exec in it.
    pub async fn container_process(&self, id: &str) -> Result<oci_spec::runtime::Process> {
        let r = self
            .containers()
            .get(self.req(containerd_client::services::v1::GetContainerRequest { id: id.into() }))
            .await
            .map_err(Error::rpc("container get"))?;
        let spec = r
            .into_inner()
            .container
            .and_then(|c| c.spec)
            .ok_or_else(|| Error::bad("container spec", format!("container {id} has no spec")))?;
        let spec: oci_spec::runtime::Spec =
            serde_json::from_slice(&spec.value).map_err(|e| Error::bad("container spec", e))?;
        spec.process()
            .clone()
            .ok_or_else(|| Error::bad("container spec", format!("container {id} has no process")))
    }

    async fn list_filtered(&self, filter: &str) -> Result<Vec<Listed>> {
        let r = self
            .containers()
            .list(self.req(ListContainersRequest {
                filters: vec![filter.to_string()],
            }))
            .await
            .map_err(Error::rpc("container list"))?;
        Ok(r.into_inner()
            .containers
            .into_iter()
            .map(|c| Listed {
                id: c.id,
                labels: c.labels,
                image: c.image,
            })
            .collect())
    }

    /// Creates an exec process (not started) with the given stdio.
    pub async fn exec_create(
        &self,
        id: &str,
        exec_id: &str,
        process: &oci_spec::runtime::Process,
        io: &Stdio,
    ) -> Result<()> {
        let spec = serde_json::to_vec(process).map_err(|e| Error::bad("exec spec", e))?;
        self.tasks()
            .exec(self.req(ExecProcessRequest {
                container_id: id.into(),
                stdin: io.stdin.clone(),
                stdout: io.stdout.clone(),
                stderr: io.stderr.clone(),
                terminal: io.terminal,
                spec: Some(Any {
                    type_url: "types.containerd.io/opencontainers/runtime-spec/1/Process".into(),
                    value: spec,
                }),
                exec_id: exec_id.into(),
            }))
            .await
            .map_err(Error::rpc("exec"))?;
        Ok(())
    }

    /// Waits for a process (`exec_id` empty: the container's own) to exit: its exit status.
    /// Call it before starting the process.
    pub fn wait_process(
        &self,
        id: &str,
        exec_id: &str,
    ) -> impl std::future::Future<Output = Result<u32>> + Send + 'static {
        let mut tasks = self.tasks();
        let req = self.req(WaitRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
        });
        async move {
            tasks
                .wait(req)
                .await
                .map(|r| r.into_inner().exit_status)
                .map_err(Error::rpc("exec wait"))
        }
    }

    /// Starts a created exec process; its pid.
    pub async fn exec_start(&self, id: &str, exec_id: &str) -> Result<u32> {
        let r = self
            .tasks()
            .start(self.req(StartRequest {
                container_id: id.into(),
                exec_id: exec_id.into(),
            }))
            .await
            .map_err(Error::rpc("exec start"))?;
        Ok(r.into_inner().pid)
    }

    /// Sets the terminal size of a process (`exec_id` empty: the container's own).
    pub async fn resize_pty(&self, id: &str, exec_id: &str, width: u32, height: u32) -> Result<()> {
        self.tasks()
            .resize_pty(self.req(ResizePtyRequest {
                container_id: id.into(),
                exec_id: exec_id.into(),
                width,
                height,
            }))
            .await
            .map_err(Error::rpc("resize pty"))?;
        Ok(())
    }

    /// Closes a process's stdin (it reads EOF).
    pub async fn close_stdin(&self, id: &str, exec_id: &str) -> Result<()> {
        let r = self
            .tasks()
            .close_io(self.req(CloseIoRequest {
                container_id: id.into(),
                exec_id: exec_id.into(),
                stdin: true,
            }))
            .await
            .map(|_| ());
        ignore_not_found(r, "close stdin")
    }

    /// Signals an exec process (gone already is fine).
    pub async fn exec_kill(&self, id: &str, exec_id: &str, signal: u32) -> Result<()> {
        let r = self
            .tasks()
            .kill(self.req(KillRequest {
                container_id: id.into(),
                exec_id: exec_id.into(),
                signal,
                all: false,
            }))
            .await
            .map(|_| ());
        ignore_not_found(r, "exec kill")
    }

    /// Forgets an exited exec process (gone already is fine).
    pub async fn exec_delete(&self, id: &str, exec_id: &str) -> Result<()> {
        let r = self
            .tasks()
            .delete_process(self.req(DeleteProcessRequest {
                container_id: id.into(),
                exec_id: exec_id.into(),
            }))
            .await
            .map(|_| ());
        ignore_not_found(r, "exec delete")
    }

    /// Runs a process inside a running container and collects its output (stdout and stderr
    /// together, at most `max_output` bytes). The process is killed at `timeout`.
    pub async fn exec(
        &self,
        id: &str,
        process: &oci_spec::runtime::Process,
        scratch_dir: &Path,
        timeout: Duration,
        max_output: usize,
    ) -> Result<ExecResult> {
        let exec_id = format!("exec-{}", random_hex(6));
        std::fs::create_dir_all(scratch_dir).map_err(Error::io("exec scratch dir"))?;
        let out_path = scratch_dir.join(format!("{exec_id}.out"));
        std::fs::File::create(&out_path).map_err(Error::io("exec output file"))?;
        let out = out_path.to_string_lossy().to_string();
        let res = self.exec_inner(id, &exec_id, process, &out, timeout).await;
        let mut output = std::fs::read(&out_path).unwrap_or_default();
        output.truncate(max_output);
        let _ = std::fs::remove_file(&out_path);
        let (exit_code, timed_out) = res?;
        Ok(ExecResult {
            exit_code,
            output,
            timed_out,
        })
    }

    async fn exec_inner(
        &self,
        id: &str,
        exec_id: &str,
        process: &oci_spec::runtime::Process,
        out: &str,
        timeout: Duration,
    ) -> Result<(Option<u32>, bool)> {
        let io = Stdio {
            stdout: out.into(),
            stderr: out.into(),
            ..Default::default()
        };
        self.exec_create(id, exec_id, process, &io).await?;
        let wait = self.wait_process(id, exec_id);
        let result = match self.exec_start(id, exec_id).await {
            Err(e) => Err(e),
            Ok(_) => match tokio::time::timeout(timeout, wait).await {
                Ok(Ok(code)) => Ok((Some(code), false)),
                Ok(Err(e)) => Err(e),
                Err(_) => {
                    let _ = self.exec_kill(id, exec_id, 9).await;
                    let _ = tokio::time::timeout(
                        Duration::from_secs(2),
                        self.wait_process(id, exec_id),
                    )
                    .await;
                    Ok((None, true))
                }
            },
        };
        let _ = self.exec_delete(id, exec_id).await;
        result
    }
}
