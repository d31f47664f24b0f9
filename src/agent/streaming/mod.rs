//! kubelet's streaming endpoints on the kubelet API, for the API server's `pods/exec`,
//! `pods/attach` and `pods/portforward`: `/exec/NS/POD/CONTAINER`, `/attach/NS/POD/CONTAINER`
//! and `/portForward/NS/POD`, each a WebSocket upgrade. Exec and attach speak the channel
//! protocol (`v5.channel.k8s.io`, or v4); port-forward speaks SPDY/3.1 inside the WebSocket
//! (`SPDY/3.1+portforward.k8s.io`), as kubectl 1.30+ tunnels it.
//!
//! Everything is looked up when a request comes: the pod in the agent's status store, its
//! containers in containerd by label, the pod's network namespace through its sandbox's pid.
//! A stream idle (no bytes either way) for `--streaming-connection-idle-timeout` is closed; a
//! client that goes away ends the process's stdin and frees the stream's FIFOs.

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{Path, RawQuery, Request, State},
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::any,
};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio_tungstenite::{WebSocketStream, tungstenite::protocol::Role};

use super::{AgentCtx, worker::labels};
use crate::stream::channel;
use crate::stream::query::query_pairs;

mod attach;
mod exec;
mod portforward;

pub type Ws = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

/// The stdio of a running container, shared by its log pumps and attached clients.
pub struct AttachIo {
    pub container_id: String,
    pub tty: bool,
    pub stdin_once: bool,
    /// Output as the log pumps read it: (channel, bytes).
    pub output: super::logs::Tee,
    /// The write side of the container's stdin FIFO while it is open.
    pub stdin: tokio::sync::Mutex<Option<tokio::net::unix::pipe::Sender>>,
    /// Turns true when the container exits.
    pub exited: tokio::sync::watch::Receiver<bool>,
}

/// Output chunks an attached client may fall behind by before it misses some (each at most a
/// log pump's read, 8 KiB). The ring is allocated per container, attached or not: 64 slots
/// are 4 KiB (256 were 16 KiB).
const OUTPUT_BACKLOG: usize = 64;

impl AttachIo {
    pub fn new(
        container_id: String,
        tty: bool,
        stdin_once: bool,
        stdin: Option<tokio::net::unix::pipe::Sender>,
        exited: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        Self {
            container_id,
            tty,
            stdin_once,
            output: tokio::sync::broadcast::channel(OUTPUT_BACKLOG).0,
            stdin: tokio::sync::Mutex::new(stdin),
            exited,
        }
    }
}

pub fn routes() -> Router<Arc<AgentCtx>> {
    Router::new()
        .route("/exec/{ns}/{pod}/{container}", any(exec_handler))
        .route("/attach/{ns}/{pod}/{container}", any(attach_handler))
        .route("/portForward/{ns}/{pod}", any(port_forward_handler))
}

/// A request refused before any upgrade: answered as a Status (the API server relays it to
/// kubectl).
#[derive(Debug)]
pub struct Refusal {
    code: StatusCode,
    message: String,
}

fn status(code: StatusCode, message: impl Into<String>) -> Refusal {
    Refusal {
        code,
        message: message.into(),
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        status_response(self.code, self.message)
    }
}

fn status_response(code: StatusCode, message: String) -> Response {
    let reason = match code {
        StatusCode::NOT_FOUND => "NotFound",
        StatusCode::BAD_REQUEST => "BadRequest",
        StatusCode::FORBIDDEN => "Forbidden",
        _ => "InternalError",
    };
    (
        code,
        Json(
            json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "message": message, "reason": reason, "code": code.as_u16()}),
        ),
    )
        .into_response()
}

/// The options of an exec or attach, under kubelet's names (`input`, `output`, `error`, `tty`,
/// `command`) or the API's (`stdin`, `stdout`, `stderr`).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct StreamOpts {
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub tty: bool,
    pub command: Vec<String>,
}

impl StreamOpts {
    pub fn parse(q: Option<&str>) -> Self {
        let mut o = StreamOpts::default();
        // Go's strconv.ParseBool, as kubelet parses them.
        let on = |v: &str| matches!(v, "1" | "t" | "T" | "true" | "True" | "TRUE");
        for (k, v) in query_pairs(q) {
            match k.as_str() {
                "input" | "stdin" => o.stdin = on(&v),
                "output" | "stdout" => o.stdout = on(&v),
                "error" | "stderr" => o.stderr = on(&v),
                "tty" => o.tty = on(&v),
                "command" => o.command.push(v),
                _ => {}
            }
        }
        // A terminal has one output stream.
        if o.tty {
            o.stderr = false;
        }
        o
    }
}

/// The pod's UID, from the agent's status store.
fn pod_uid(ctx: &AgentCtx, ns: &str, pod: &str) -> Result<String, Refusal> {
    ctx.store
        .read()
        .ok()
        .and_then(|s| {
            s.iter()
                .find(|(_, p)| {
                    p.metadata.name.as_deref() == Some(pod)
                        && p.metadata.namespace.as_deref().unwrap_or("default") == ns
                })
                .map(|(uid, _)| uid.clone())
        })
        .ok_or_else(|| status(StatusCode::NOT_FOUND, format!("pod {ns}/{pod} not found")))
}

/// The running containerd container of a pod's container (the newest instance).
async fn running_container(
    ctx: &AgentCtx,
    ns: &str,
    pod: &str,
    container: &str,
) -> Result<String, Refusal> {
    let uid = pod_uid(ctx, ns, pod)?;
    let listed = ctx
        .rt
        .list_labelled(&[(labels::POD_UID, &uid), (labels::NAME, container)])
        .await
        .map_err(|e| status(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let mut found: Vec<_> = listed
        .into_iter()
        .filter(|c| c.labels.get(labels::KIND).map(String::as_str) != Some("sandbox"))
        .collect();
    if found.is_empty() {
        return Err(status(
            StatusCode::NOT_FOUND,
            format!("container not found ({container:?}) in pod {ns}/{pod}"),
        ));
    }
    found.sort_by_key(|c| {
        std::cmp::Reverse(
            c.labels
                .get(labels::RESTART)
                .and_then(|r| r.parse::<i64>().ok())
                .unwrap_or(0),
        )
    });
    for c in found {
        if matches!(
            ctx.rt.task_state(&c.id).await,
            Ok(crate::runtime::container::TaskState::Running { .. })
        ) {
            return Ok(c.id);
        }
    }
    Err(status(
        StatusCode::BAD_REQUEST,
        format!("container {container} in pod {ns}/{pod} is not running"),
    ))
}

/// The pid of the pod's sandbox (its network namespace is `/proc/PID/ns/net`).
async fn sandbox_pid(ctx: &AgentCtx, ns: &str, pod: &str) -> Result<(String, u32), Refusal> {
    let uid = pod_uid(ctx, ns, pod)?;
    let listed = ctx
        .rt
        .list_labelled(&[(labels::POD_UID, &uid), (labels::KIND, "sandbox")])
        .await
        .map_err(|e| status(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    for c in listed {
        if let Ok(crate::runtime::container::TaskState::Running { pid }) =
            ctx.rt.task_state(&c.id).await
        {
            return Ok((uid, pid));
        }
    }
    Err(status(
        StatusCode::BAD_REQUEST,
        format!("pod {ns}/{pod} has no running sandbox"),
    ))
}

/// Answers a WebSocket upgrade with one of `protocols`; the socket comes from the returned
/// future once the response went out.
fn upgrade(
    req: &mut Request,
    protocols: &[&'static str],
) -> Result<
    (
        Response,
        &'static str,
        impl std::future::Future<Output = Option<Ws>> + Send + 'static,
    ),
    Refusal,
> {
    let h = req.headers();
    let is_ws = h
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    if !is_ws {
        let asked = h
            .get(header::UPGRADE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("none");
        return Err(status(
            StatusCode::BAD_REQUEST,
            format!(
                "streams are served over WebSocket only (asked for upgrade {asked:?}); protocols: {}",
                protocols.join(", ")
            ),
        ));
    }
    let key = h
        .get(header::SEC_WEBSOCKET_KEY)
        .map(|k| tokio_tungstenite::tungstenite::handshake::derive_accept_key(k.as_bytes()))
        .ok_or_else(|| status(StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key"))?;
    let offer = h
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
        .join(",");
    let proto = channel::negotiate(&offer, protocols).ok_or_else(|| {
        status(
            StatusCode::BAD_REQUEST,
            format!(
                "none of the offered subprotocols ({offer}) is supported; supported: {}",
                protocols.join(", ")
            ),
        )
    })?;
    let on = req
        .extensions_mut()
        .remove::<hyper::upgrade::OnUpgrade>()
        .ok_or_else(|| status(StatusCode::BAD_REQUEST, "the connection cannot be upgraded"))?;
    let mut resp = Response::new(axum::body::Body::empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let hs = resp.headers_mut();
    hs.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    hs.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(v) = HeaderValue::from_str(&key) {
        hs.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    hs.insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static(proto),
    );
    let ws = async move {
        match on.await {
            Ok(up) => {
                Some(WebSocketStream::from_raw_socket(TokioIo::new(up), Role::Server, None).await)
            }
            Err(e) => {
                tracing::debug!(error = %e, "stream upgrade failed");
                None
            }
        }
    };
    Ok((resp, proto, ws))
}

async fn exec_handler(
    State(ctx): State<Arc<AgentCtx>>,
    Path((ns, pod, container)): Path<(String, String, String)>,
    RawQuery(q): RawQuery,
    mut req: Request,
) -> Response {
    let opts = StreamOpts::parse(q.as_deref());
    if opts.command.is_empty() {
        return status(
            StatusCode::BAD_REQUEST,
            "you must specify at least 1 command",
        )
        .into_response();
    }
    if !(opts.stdin || opts.stdout || opts.stderr) {
        return status(
            StatusCode::BAD_REQUEST,
            "you must specify at least 1 of stdin, stdout, stderr",
        )
        .into_response();
    }
    let cid = match running_container(&ctx, &ns, &pod, &container).await {
        Ok(c) => c,
        Err(r) => return r.into_response(),
    };
    let (resp, proto, ws) = match upgrade(&mut req, channel::PROTOCOLS) {
        Ok(u) => u,
        Err(r) => return r.into_response(),
    };
    tracing::info!(pod = %format!("{ns}/{pod}"), %container, command = ?opts.command, tty = opts.tty, "exec");
    tokio::spawn(async move {
        if let Some(ws) = ws.await {
            exec::run(ctx, ws, cid, opts, proto == channel::PROTOCOLS[0]).await;
        }
    });
    resp
}

async fn attach_handler(
    State(ctx): State<Arc<AgentCtx>>,
    Path((ns, pod, container)): Path<(String, String, String)>,
    RawQuery(q): RawQuery,
    mut req: Request,
) -> Response {
    let opts = StreamOpts::parse(q.as_deref());
    let cid = match running_container(&ctx, &ns, &pod, &container).await {
        Ok(c) => c,
        Err(r) => return r.into_response(),
    };
    let io = ctx
        .attach
        .lock()
        .ok()
        .and_then(|a| a.get(&cid).and_then(std::sync::Weak::upgrade));
    let Some(io) = io else {
        return status(
            StatusCode::BAD_REQUEST,
            format!("container {container} in pod {ns}/{pod} is not running"),
        )
        .into_response();
    };
    let (resp, _proto, ws) = match upgrade(&mut req, channel::PROTOCOLS) {
        Ok(u) => u,
        Err(r) => return r.into_response(),
    };
    tracing::info!(pod = %format!("{ns}/{pod}"), %container, stdin = opts.stdin, tty = opts.tty, "attach");
    tokio::spawn(async move {
        if let Some(ws) = ws.await {
            attach::run(ctx, ws, io, opts).await;
        }
    });
    resp
}

async fn port_forward_handler(
    State(ctx): State<Arc<AgentCtx>>,
    Path((ns, pod)): Path<(String, String)>,
    mut req: Request,
) -> Response {
    let (uid, pid) = match sandbox_pid(&ctx, &ns, &pod).await {
        Ok(x) => x,
        Err(r) => return r.into_response(),
    };
    // The channel protocol forwards the ports of the query (kubelet: `ports`, required).
    let ports: Vec<u16> = query_pairs(req.uri().query())
        .into_iter()
        .filter(|(k, _)| k == "ports" || k == "port")
        .flat_map(|(_, v)| {
            v.split(',')
                .map(|p| p.trim().to_string())
                .collect::<Vec<_>>()
        })
        .filter_map(|p| p.parse::<u16>().ok().filter(|p| *p > 0))
        .collect();
    let (resp, proto, ws) = match upgrade(&mut req, portforward::PROTOCOLS) {
        Ok(u) => u,
        Err(r) => return r.into_response(),
    };
    let channels = proto != portforward::PROTOCOLS[0];
    if channels && ports.is_empty() {
        return status(
            StatusCode::BAD_REQUEST,
            "query parameter \"ports\" is required",
        )
        .into_response();
    }
    tracing::info!(pod = %format!("{ns}/{pod}"), protocol = proto, "port-forward");
    let idle = ctx.cfg.stream_idle_timeout;
    let base64 = proto == portforward::CHANNEL_BASE64_PROTOCOL;
    tokio::spawn(async move {
        if let Some(ws) = ws.await {
            let name = format!("{ns}/{pod}");
            if channels {
                portforward::run_channels(ws, name, uid, pid, ports, base64, idle).await;
            } else {
                portforward::run(ws, name, uid, pid, idle).await;
            }
        }
    });
    resp
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn query_map(q: Option<&str>) -> HashMap<String, String> {
        query_pairs(q).into_iter().collect()
    }

    #[test]
    fn stream_options_under_either_name() {
        let o = StreamOpts::parse(Some(
            "command=sh&command=-c&command=echo%20hi%3B%20exit%203&input=1&output=1&error=1",
        ));
        assert_eq!(o.command, vec!["sh", "-c", "echo hi; exit 3"]);
        assert!(o.stdin && o.stdout && o.stderr && !o.tty);
        let t = StreamOpts::parse(Some(
            "stdin=true&stdout=true&stderr=true&tty=true&command=sh",
        ));
        assert!(t.tty && t.stdin && t.stdout);
        assert!(!t.stderr, "a terminal has no separate stderr");
        assert_eq!(query_map(Some("a=%zz&b=x+y"))["a"], "%zz");
        assert_eq!(query_map(Some("a=%zz&b=x+y"))["b"], "x y");
        assert_eq!(query_map(Some("c=%4"))["c"], "%4");
    }
}
