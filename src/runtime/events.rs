//! containerd's event stream, reduced to what a pod worker reacts to: task exits and OOM kills.

use containerd_client::{events::TaskExit, events::TaskOom, services::v1::SubscribeRequest};
use futures::{Stream, StreamExt};
use prost::Message;

use super::{Containerd, Error, Result, container::ts};

/// A runtime event for one container.
#[derive(Debug, Clone, PartialEq)]
pub enum RuntimeEvent {
    /// A process exited; `exec_id` equals `container_id` for the container's init process.
    Exit {
        container_id: String,
        exec_id: String,
        exit_code: u32,
        exited_at: Option<jiff::Timestamp>,
    },
    /// The kernel's OOM killer hit the container's cgroup.
    Oom { container_id: String },
}

impl Containerd {
    /// Subscribes to task exit and OOM events of this namespace.
    pub async fn subscribe(&self) -> Result<impl Stream<Item = Result<RuntimeEvent>> + use<>> {
        let ns = self.namespace().to_string();
        let filters = vec![
            format!("namespace=={ns},topic==\"/tasks/exit\""),
            format!("namespace=={ns},topic==\"/tasks/oom\""),
        ];
        let stream = self
            .events()
            .subscribe(SubscribeRequest { filters })
            .await
            .map_err(Error::rpc("events subscribe"))?
            .into_inner();
        Ok(stream.filter_map(|env| async move {
            let env = match env {
                Ok(e) => e,
                Err(source) => {
                    return Some(Err(Error::Rpc {
                        op: "events",
                        source,
                    }));
                }
            };
            let any = env.event?;
            let t = any.type_url.trim_start_matches("types.containerd.io/");
            if t.ends_with("TaskExit") {
                let e = TaskExit::decode(any.value.as_slice()).ok()?;
                Some(Ok(RuntimeEvent::Exit {
                    container_id: e.container_id,
                    exec_id: e.id,
                    exit_code: e.exit_status,
                    exited_at: ts(e.exited_at),
                }))
            } else if t.ends_with("TaskOOM") {
                let e = TaskOom::decode(any.value.as_slice()).ok()?;
                Some(Ok(RuntimeEvent::Oom {
                    container_id: e.container_id,
                }))
            } else {
                None
            }
        }))
    }
}
