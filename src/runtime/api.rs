//! The container runtime as the agent sees it: one trait, implemented by containerd
//! (`Containerd`) and, in unit tests, by a recording fake (`fake::FakeRuntime`), so that the
//! pod worker's lifecycle is tested without containerd.

use std::{collections::HashMap, path::Path, time::Duration};

use futures::stream::BoxStream;

use super::{
    Containerd, Result,
    container::{CreateOpts, ExecResult, Listed, Stdio, TaskState},
    events::RuntimeEvent,
    image::ImageInfo,
    pull::{PullOptions, Pulled},
};

/// What the agent needs of a container runtime: containers with one task each, their
/// labels, exec processes, images by reference, and exit/OOM events.
#[async_trait::async_trait]
pub trait Runtime: Send + Sync + 'static {
    /// The image's config (an image that is not present is `Error::ImageNotFound`).
    async fn image_info(&self, reference: &str) -> Result<ImageInfo>;
    /// Pulls the image from its registry (through the node's mirrors).
    async fn pull(&self, reference: &str, opts: PullOptions<'_>) -> Result<Pulled>;
    /// Creates container `o.id` and its task (not started); the task's pid.
    async fn create(&self, o: CreateOpts<'_>) -> Result<u32>;
    /// Starts the task; its pid.
    async fn start(&self, id: &str) -> Result<u32>;
    /// Signals the task's init process.
    async fn kill(&self, id: &str, signal: u32) -> Result<()>;
    async fn task_state(&self, id: &str) -> Result<TaskState>;
    /// Waits up to `timeout` for the task to exit; its exit status if it did.
    async fn wait(&self, id: &str, timeout: Duration) -> Result<Option<u32>>;
    /// Removes the task and the container.
    async fn delete(&self, id: &str) -> Result<()>;
    async fn set_labels(&self, id: &str, labels: HashMap<String, String>) -> Result<()>;
    /// Containers carrying `label`.
    async fn list_with_label(&self, label: &str) -> Result<Vec<Listed>>;
    /// Containers whose labels match every `(label, value)`.
    async fn list_labelled(&self, want: &[(&str, &str)]) -> Result<Vec<Listed>> {
        let Some((first, _)) = want.first() else {
            return Ok(vec![]);
        };
        Ok(self
            .list_with_label(first)
            .await?
            .into_iter()
            .filter(|l| {
                want.iter()
                    .all(|(k, v)| l.labels.get(*k).is_some_and(|x| x == v))
            })
            .collect())
    }
    /// Task exits and OOM kills, from now on.
    async fn events(&self) -> Result<BoxStream<'static, Result<RuntimeEvent>>>;

    /// The container's process (user, environment, working directory), for execs.
    async fn container_process(&self, id: &str) -> Result<oci_spec::runtime::Process>;
    async fn exec_create(
        &self,
        id: &str,
        exec_id: &str,
        process: &oci_spec::runtime::Process,
        io: &Stdio,
    ) -> Result<()>;
    /// Waits for the exec process to exit; its status.
    async fn wait_process(&self, id: &str, exec_id: &str) -> Result<u32>;
    async fn exec_start(&self, id: &str, exec_id: &str) -> Result<u32>;
    async fn resize_pty(&self, id: &str, exec_id: &str, width: u32, height: u32) -> Result<()>;
    async fn close_stdin(&self, id: &str, exec_id: &str) -> Result<()>;
    async fn exec_kill(&self, id: &str, exec_id: &str, signal: u32) -> Result<()>;
    async fn exec_delete(&self, id: &str, exec_id: &str) -> Result<()>;
    /// Runs `process` in the container to its end (or `timeout`), keeping up to `max_output`
    /// bytes of its output (probes and hooks).
    async fn exec(
        &self,
        id: &str,
        process: &oci_spec::runtime::Process,
        scratch_dir: &Path,
        timeout: Duration,
        max_output: usize,
    ) -> Result<ExecResult>;
}

#[async_trait::async_trait]
impl Runtime for Containerd {
    async fn image_info(&self, reference: &str) -> Result<ImageInfo> {
        Containerd::image_info(self, reference).await
    }
    async fn pull(&self, reference: &str, opts: PullOptions<'_>) -> Result<Pulled> {
        Containerd::pull(self, reference, opts).await
    }
    async fn create(&self, o: CreateOpts<'_>) -> Result<u32> {
        Containerd::create(self, o).await
    }
    async fn start(&self, id: &str) -> Result<u32> {
        Containerd::start(self, id).await
    }
    async fn kill(&self, id: &str, signal: u32) -> Result<()> {
        Containerd::kill(self, id, signal).await
    }
    async fn task_state(&self, id: &str) -> Result<TaskState> {
        Containerd::task_state(self, id).await
    }
    async fn wait(&self, id: &str, timeout: Duration) -> Result<Option<u32>> {
        Containerd::wait(self, id, timeout).await
    }
    async fn delete(&self, id: &str) -> Result<()> {
        Containerd::delete(self, id).await
    }
    async fn set_labels(&self, id: &str, labels: HashMap<String, String>) -> Result<()> {
        Containerd::set_labels(self, id, labels).await
    }
    async fn list_with_label(&self, label: &str) -> Result<Vec<Listed>> {
        Containerd::list_with_label(self, label).await
    }
    async fn list_labelled(&self, want: &[(&str, &str)]) -> Result<Vec<Listed>> {
        Containerd::list_labelled(self, want).await
    }
    async fn events(&self) -> Result<BoxStream<'static, Result<RuntimeEvent>>> {
        use futures::StreamExt;
        Ok(Containerd::subscribe(self).await?.boxed())
    }
    async fn container_process(&self, id: &str) -> Result<oci_spec::runtime::Process> {
        Containerd::container_process(self, id).await
    }
    async fn exec_create(
        &self,
        id: &str,
        exec_id: &str,
        process: &oci_spec::runtime::Process,
        io: &Stdio,
    ) -> Result<()> {
        Containerd::exec_create(self, id, exec_id, process, io).await
    }
    async fn wait_process(&self, id: &str, exec_id: &str) -> Result<u32> {
        Containerd::wait_process(self, id, exec_id).await
    }
    async fn exec_start(&self, id: &str, exec_id: &str) -> Result<u32> {
        Containerd::exec_start(self, id, exec_id).await
    }
    async fn resize_pty(&self, id: &str, exec_id: &str, width: u32, height: u32) -> Result<()> {
        Containerd::resize_pty(self, id, exec_id, width, height).await
    }
    async fn close_stdin(&self, id: &str, exec_id: &str) -> Result<()> {
        Containerd::close_stdin(self, id, exec_id).await
    }
    async fn exec_kill(&self, id: &str, exec_id: &str, signal: u32) -> Result<()> {
        Containerd::exec_kill(self, id, exec_id, signal).await
    }
    async fn exec_delete(&self, id: &str, exec_id: &str) -> Result<()> {
        Containerd::exec_delete(self, id, exec_id).await
    }
    async fn exec(
        &self,
        id: &str,
        process: &oci_spec::runtime::Process,
        scratch_dir: &Path,
        timeout: Duration,
        max_output: usize,
    ) -> Result<ExecResult> {
        Containerd::exec(self, id, process, scratch_dir, timeout, max_output).await
    }
}
