//! The agent's local API on `DATA_DIR/agent.sock`, with kubelet's paths: `/pods`, `/healthz`,
//! `/containerLogs/NS/POD/CONTAINER`. Reads the status store and log files; changes nothing.

use std::{sync::Arc, time::Duration};

use axum::{
    Json, Router,
    body::Body,
    extract::{Path, Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
};
use k8s_openapi::api::core::v1::Pod;
use serde::Deserialize;

use super::{AgentCtx, logs};

pub fn router(ctx: Arc<AgentCtx>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/pods", get(pods))
        .route("/containerLogs/{ns}/{pod}/{container}", get(container_logs))
        .merge(super::streaming::routes())
        .with_state(ctx)
}

/// Binds the agent's unix socket (owner-only).
pub fn bind(socket: &std::path::Path) -> std::io::Result<tokio::net::UnixListener> {
    let _ = std::fs::remove_file(socket);
    let listener = tokio::net::UnixListener::bind(socket)?;
    std::fs::set_permissions(socket, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    Ok(listener)
}

/// Serves the router on a bound socket until the task is dropped.
pub async fn serve(ctx: Arc<AgentCtx>, listener: tokio::net::UnixListener) -> std::io::Result<()> {
    axum::serve(listener, router(ctx)).await
}

async fn pods(State(ctx): State<Arc<AgentCtx>>) -> Json<serde_json::Value> {
    let items: Vec<Pod> = ctx
        .store
        .read()
        .map(|s| s.values().cloned().collect())
        .unwrap_or_default();
    Json(serde_json::json!({"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items}))
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct LogQuery {
    tail_lines: Option<usize>,
    follow: Option<bool>,
    timestamps: Option<bool>,
    previous: Option<bool>,
}

fn status_err(code: StatusCode, message: String) -> Response {
    let reason = match code {
        StatusCode::NOT_FOUND => "NotFound",
        _ => "BadRequest",
    };
    (
        code,
        Json(
            serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": message, "reason": reason, "code": code.as_u16()}),
        ),
    )
        .into_response()
}

async fn container_logs(
    State(ctx): State<Arc<AgentCtx>>,
    Path((ns, pod, container)): Path<(String, String, String)>,
    Query(q): Query<LogQuery>,
) -> Response {
    let previous = q.previous.unwrap_or(false);
    let (uid, n) = match log_instance(&ctx, &ns, &pod, &container, previous) {
        Ok(found) => found,
        Err(resp) => return resp,
    };
    let path = ctx
        .cfg
        .log_dir
        .join(format!("{ns}_{pod}_{uid}"))
        .join(&container)
        .join(format!("{n}.log"));
    let opts = logs::ReadOpts {
        tail_lines: q.tail_lines,
        timestamps: q.timestamps.unwrap_or(false),
    };
    let content = std::fs::read_to_string(&path).unwrap_or_default();
    let first = logs::render(&content, &opts);
    if !q.follow.unwrap_or(false) || previous {
        return (StatusCode::OK, [("content-type", "text/plain")], first).into_response();
    }
    // Follow: stream appended records until the container stops running.
    let mut offset = content.len() as u64;
    let timestamps = opts.timestamps;
    let stream = async_stream(move |tx| async move {
        if tx.send(Ok(first)).await.is_err() {
            return;
        }
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let data = std::fs::read(&path).unwrap_or_default();
            if (data.len() as u64) < offset {
                offset = 0; // rotated
            }
            let new = &data[offset as usize..];
            if let Some(end) = new.iter().rposition(|b| *b == b'\n') {
                let chunk = String::from_utf8_lossy(&new[..=end]).to_string();
                offset += end as u64 + 1;
                let text = logs::render(
                    &chunk,
                    &logs::ReadOpts {
                        tail_lines: None,
                        timestamps,
                    },
                );
                if !text.is_empty() && tx.send(Ok(text)).await.is_err() {
                    return;
                }
            }
            if !still_running(&ctx, &uid, &container, n) {
                return;
            }
        }
    });
    (
        StatusCode::OK,
        [("content-type", "text/plain")],
        Body::from_stream(stream),
    )
        .into_response()
}

/// The pod's UID and the instance (restart count) whose log is asked for, or kubelet's
/// error: no such pod, no such container, no previous instance, not started yet.
#[allow(clippy::result_large_err)]
fn log_instance(
    ctx: &AgentCtx,
    ns: &str,
    pod: &str,
    container: &str,
    previous: bool,
) -> Result<(String, i32), Response> {
    let found = ctx.store.read().ok().and_then(|s| {
        s.values()
            .find(|p| {
                p.metadata.name.as_deref() == Some(pod)
                    && p.metadata.namespace.as_deref() == Some(ns)
            })
            .cloned()
    });
    let Some(p) = found else {
        return Err(status_err(
            StatusCode::NOT_FOUND,
            format!("pods \"{pod}\" not found"),
        ));
    };
    let uid = p.metadata.uid.clone().unwrap_or_default();
    let cs = p.status.as_ref().and_then(|s| {
        s.container_statuses
            .iter()
            .flatten()
            .chain(s.init_container_statuses.iter().flatten())
            .find(|c| c.name == container)
    });
    let Some(cs) = cs else {
        return Err(status_err(
            StatusCode::BAD_REQUEST,
            format!("container {container} is not valid for pod {pod}"),
        ));
    };
    if previous {
        let has_last = cs
            .last_state
            .as_ref()
            .and_then(|l| l.terminated.as_ref())
            .is_some();
        if !has_last {
            return Err(status_err(
                StatusCode::BAD_REQUEST,
                format!("previous terminated container \"{container}\" in pod \"{pod}\" not found"),
            ));
        }
        return Ok((uid, cs.restart_count - 1));
    }
    let waiting = cs.state.as_ref().and_then(|s| s.waiting.as_ref());
    if let (Some(w), None) = (waiting, &cs.container_id) {
        return Err(status_err(
            StatusCode::BAD_REQUEST,
            format!(
                "container \"{container}\" in pod \"{pod}\" is waiting to start: {}",
                w.reason.clone().unwrap_or_default()
            ),
        ));
    }
    Ok((uid, cs.restart_count))
}

/// Whether instance `n` of the container still runs (a followed log ends when not).
fn still_running(ctx: &AgentCtx, uid: &str, container: &str, n: i32) -> bool {
    ctx.store.read().ok().is_some_and(|s| {
        s.get(uid)
            .and_then(|p| p.status.as_ref())
            .is_some_and(|st| {
                st.container_statuses
                    .iter()
                    .flatten()
                    .chain(st.init_container_statuses.iter().flatten())
                    .any(|c| {
                        c.name == container
                            && c.restart_count == n
                            && c.state.as_ref().is_some_and(|s| s.running.is_some())
                    })
            })
    })
}

/// A stream fed by a task through a channel.
fn async_stream<F, Fut>(
    f: F,
) -> tokio_stream::wrappers::ReceiverStream<Result<String, std::io::Error>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<String, std::io::Error>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(f(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
