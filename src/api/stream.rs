//! `pods/exec`, `pods/attach` and `pods/portforward`: checked here (who asks, the pod, its
//! phase, the container), then the WebSocket upgrade is passed to the pod's kubelet with the
//! API server's kubelet-client credential, and once the kubelet switched protocols the two
//! connections are spliced byte for byte. kubelet's query names are used on the way
//! (`stdin` → `input`, `stdout` → `output`, `stderr` → `error`).

use std::sync::Arc;

use axum::{
    extract::{Path, RawQuery, Request, State},
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use hyper_util::rt::TokioIo;
use serde_json::Value;

use super::{
    ApiState,
    authz::Identity,
    handlers::{ApiError, decode, get_existing},
    logs, registry,
};

/// Headers of a WebSocket handshake passed through both ways.
const HANDSHAKE: &[&str] = &[
    "upgrade",
    "connection",
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-protocol",
    "sec-websocket-accept",
    "x-stream-protocol-version",
];

/// The kubelet path and query for a request, with kubelet's parameter names.
pub fn kubelet_path(sub: &str, ns: &str, pod: &str, container: &str, query: &str) -> String {
    let params: Vec<String> = query
        .split('&')
        .filter(|kv| !kv.is_empty())
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            let k = match k {
                "stdin" => "input",
                "stdout" => "output",
                "stderr" => "error",
                "tty" | "command" | "ports" => k,
                _ => return None,
            };
            Some(format!("{k}={v}"))
        })
        .collect();
    match sub {
        // The ports matter to the WebSocket channel protocol (SPDY names them per stream).
        "portforward" if params.is_empty() => format!("/portForward/{ns}/{pod}"),
        "portforward" => format!("/portForward/{ns}/{pod}?{}", params.join("&")),
        _ => format!("/{sub}/{ns}/{pod}/{container}?{}", params.join("&")),
    }
}

type Args = (
    State<Arc<ApiState>>,
    axum::Extension<Identity>,
    Path<(String, String)>,
    RawQuery,
    Request,
);

macro_rules! sub_handler {
    ($f:ident, $sub:literal) => {
        pub async fn $f(
            st: State<Arc<ApiState>>,
            id: axum::Extension<Identity>,
            p: Path<(String, String)>,
            q: RawQuery,
            req: Request,
        ) -> Result<Response, ApiError> {
            handle((st, id, p, q, req), $sub).await
        }
    };
}
sub_handler!(exec, "exec");
sub_handler!(attach, "attach");
sub_handler!(portforward, "portforward");

async fn handle(args: Args, sub: &str) -> Result<Response, ApiError> {
    let (State(st), axum::Extension(id), Path((ns, name)), RawQuery(q), mut req) = args;
    let allowed = match &id {
        Identity::Admin => true,
        Identity::ServiceAccount(..) | Identity::User(_) => {
            let a = super::rbac::Attributes {
                verb: "create".into(),
                group: String::new(),
                resource: format!("pods/{sub}"),
                namespace: Some(ns.clone()),
                name: Some(name.clone()),
            };
            super::rbac::allows(&st, &id.info(), &a).await?
        }
        Identity::Node(_) | Identity::Bootstrap => false,
    };
    if !allowed {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "Forbidden",
            format!(
                "pods \"{name}\" is forbidden: User \"{}\" cannot create resource \"pods/{sub}\" in API group \"\" in the namespace \"{ns}\"",
                id.user()
            ),
        ));
    }
    let pods = registry::find("", "v1", "pods").ok_or_else(|| ApiError::internal("no pods"))?;
    let pod = decode(&get_existing(&st, pods, &pods.key(Some(&ns), &name), &name).await?)?;
    let query = q.unwrap_or_default();
    let container = if sub == "portforward" {
        String::new()
    } else {
        let phase = pod
            .pointer("/status/phase")
            .and_then(Value::as_str)
            .unwrap_or("");
        if matches!(phase, "Succeeded" | "Failed") {
            let verb = if sub == "exec" {
                "exec into"
            } else {
                "attach to"
            };
            return Err(ApiError::bad_request(format!(
                "cannot {verb} a container in a completed pod; current phase is {phase}"
            )));
        }
        let requested = crate::stream::query::query_pairs(Some(&query))
            .into_iter()
            .find(|(k, _)| k == "container")
            .map(|(_, v)| v);
        logs::container_of(&pod, requested.as_deref())?
    };
    let (addr, node) = logs::kubelet_of(&st, &pod, &name).await?;
    let path = kubelet_path(sub, &ns, &name, &container, &query);
    // Any upgrade goes to the kubelet, also kubectl's SPDY retry after a refused WebSocket:
    // the kubelet's refusal (the container is not running, ...) is what kubectl then prints.
    let on_client = req
        .extensions_mut()
        .remove::<hyper::upgrade::OnUpgrade>()
        .ok_or_else(|| ApiError::bad_request("the connection cannot be upgraded"))?;
    let mut send = crate::tls::connect(addr, &node, &st.kubelet_tls)
        .await
        .map_err(|e| logs::kubelet_unreachable(addr, &path, &e))?;
    let mut kreq = hyper::Request::builder()
        .method(req.method().clone())
        .uri(&path)
        .header(header::HOST, addr.to_string());
    for h in HANDSHAKE {
        for v in req.headers().get_all(*h) {
            kreq = kreq.header(*h, v);
        }
    }
    let kreq = kreq
        .body(axum::body::Body::empty())
        .map_err(ApiError::internal)?;
    let kresp = send
        .send_request(kreq)
        .await
        .map_err(|e| logs::kubelet_unreachable(addr, &path, &anyhow::Error::from(e)))?;
    if kresp.status() != StatusCode::SWITCHING_PROTOCOLS {
        return Err(logs::kubelet_error(kresp).await);
    }
    let mut resp = Response::new(axum::body::Body::empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    for h in HANDSHAKE {
        for v in kresp.headers().get_all(*h) {
            resp.headers_mut()
                .append(header::HeaderName::from_static(h), v.clone());
        }
    }
    if !resp.headers().contains_key(header::UPGRADE) {
        resp.headers_mut()
            .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    }
    let what = format!("{ns}/{name} {sub}");
    tokio::spawn(async move {
        let (client, kubelet) = match tokio::join!(on_client, hyper::upgrade::on(kresp)) {
            (Ok(c), Ok(k)) => (c, k),
            (c, k) => {
                tracing::debug!(stream = %what, client = c.is_ok(), kubelet = k.is_ok(), "stream upgrade failed");
                return;
            }
        };
        let (up, down) = splice(TokioIo::new(client), TokioIo::new(kubelet)).await;
        tracing::debug!(stream = %what, up, down, "stream ended");
    });
    Ok(resp.into_response())
}

/// Copies `from` into `to` until `from` ends — by EOF or by an error, such as a TLS peer that
/// closed without close_notify — flushing every write, then shuts `to` down cleanly: whatever
/// was read reaches the other side before it sees the end (an exec's last output, its status
/// and its close frame, in that order).
async fn pump<R, W>(mut from: R, mut to: W) -> u64
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).await.is_err() || to.flush().await.is_err() {
                    break;
                }
                total += n as u64;
            }
        }
    }
    let _ = to.shutdown().await;
    total
}

/// Splices a client's upgraded connection and the kubelet's: (bytes up, bytes down). When the
/// kubelet's side ends, the client gets everything it sent and then the end; the client then
/// has a few seconds to close its side.
async fn splice<C, K>(client: C, kubelet: K) -> (u64, u64)
where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    K: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (cr, cw) = tokio::io::split(client);
    let (kr, kw) = tokio::io::split(kubelet);
    let up = pump(cr, kw);
    let down = pump(kr, cw);
    tokio::pin!(up, down);
    tokio::select! {
        u = &mut up => {
            // The client is done sending; the kubelet still answers (an exec's last output).
            let d = tokio::time::timeout(std::time::Duration::from_secs(30), &mut down).await.unwrap_or(0);
            (u, d)
        }
        d = &mut down => {
            let u = tokio::time::timeout(std::time::Duration::from_secs(5), &mut up).await.unwrap_or(0);
            (u, d)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubelet_names_on_the_way() {
        assert_eq!(
            kubelet_path(
                "exec",
                "default",
                "web",
                "c",
                "command=sh&command=-c&command=echo%20hi&container=c&stdin=true&stdout=true&stderr=true&tty=false"
            ),
            "/exec/default/web/c?command=sh&command=-c&command=echo%20hi&input=true&output=true&error=true&tty=false"
        );
        assert_eq!(
            kubelet_path("portforward", "ns", "p", "", "ports=80"),
            "/portForward/ns/p?ports=80"
        );
    }

    /// A reader that yields its bytes and then fails, as a kubelet's TLS connection does when
    /// it closes without close_notify.
    struct ThenFail(Option<Vec<u8>>);

    impl tokio::io::AsyncRead for ThenFail {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(match self.0.take() {
                Some(b) => {
                    buf.put_slice(&b);
                    Ok(())
                }
                None => Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "peer closed connection without sending TLS close_notify",
                )),
            })
        }
    }

    #[tokio::test]
    async fn what_was_read_reaches_the_client_before_the_end_even_when_the_kubelet_side_fails() {
        use tokio::io::AsyncReadExt;
        let (to, mut client) = tokio::io::duplex(8);
        let last = b"stdout...status...close-frame".to_vec();
        let pumped = tokio::spawn(pump(ThenFail(Some(last.clone())), to));
        let mut got = vec![];
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(pumped.await.unwrap(), last.len() as u64);
        assert_eq!(got, last, "every byte, then a clean end");
    }
}
