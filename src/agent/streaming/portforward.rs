//! Port-forward: a SPDY/3.1 session carried in WebSocket binary messages
//! (`SPDY/3.1+portforward.k8s.io`). kubectl opens two streams per forwarded connection, an
//! `error` stream and a `data` stream with the same `requestid` and `port`; once both are
//! there the agent connects to `localhost:PORT` inside the pod's network namespace and copies
//! bytes both ways. A failed connection is reported on the error stream in kubelet's words;
//! both streams are closed (FIN) when the connection ends.
//!
//! The WebSocket channel protocol (`v4.channel.k8s.io`, or its base64 text form) forwards the
//! ports the request names (`?ports=80,8080`), one connection each: port i has the data
//! channel 2i and the error channel 2i+1, each of which starts with the port as two
//! little-endian bytes from the agent; the client's bytes on a data channel go to its
//! connection. The session ends once every connection is done, as kubelet's does.

use std::{collections::HashMap, os::fd::AsFd, time::Duration};

use bytes::BytesMut;
use futures::{SinkExt, StreamExt};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::mpsc,
};
use tokio_tungstenite::tungstenite::Message;

use super::{Ws, exec::Activity};
use crate::stream::spdy::{self, FLAG_FIN, Frame};

/// SPDY inside the WebSocket (what kubectl's tunnel speaks), then the channel protocol
/// (what the Python and JavaScript clients speak: per port a data and an error channel).
pub const PROTOCOLS: &[&str] = &[
    "SPDY/3.1+portforward.k8s.io",
    CHANNEL_PROTOCOL,
    CHANNEL_BASE64_PROTOCOL,
];
pub const CHANNEL_PROTOCOL: &str = "v4.channel.k8s.io";
pub const CHANNEL_BASE64_PROTOCOL: &str = "v4.base64.channel.k8s.io";

/// How long the first stream of a pair waits for the other (kubelet's stream creation
/// timeout).
const PAIR_TIMEOUT: Duration = Duration::from_secs(30);

/// Connects to 127.0.0.1:`port` inside the network namespace of process `pid`.
pub async fn dial_in_netns(pid: u32, port: u16) -> std::io::Result<tokio::net::TcpStream> {
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/net"))?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let r = (|| {
            nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(std::io::Error::from)?;
            let s = std::net::TcpStream::connect_timeout(
                &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
                Duration::from_secs(10),
            )?;
            s.set_nonblocking(true)?;
            Ok::<_, std::io::Error>(s)
        })();
        let _ = tx.send(r);
    });
    let s = rx
        .await
        .map_err(|_| std::io::Error::other("netns thread ended without an answer"))??;
    tokio::net::TcpStream::from_std(s)
}

/// A forwarded connection being set up or running.
#[derive(Default)]
struct Pair {
    port: Option<u16>,
    error_id: Option<u32>,
    data_id: Option<u32>,
    /// Client bytes for the connection (None once the client half-closed it).
    to_conn: Option<mpsc::Sender<bytes::Bytes>>,
    since: Option<tokio::time::Instant>,
}

pub(super) async fn run(ws: Ws, pod: String, uid: String, pid: u32, idle: Duration) {
    let (mut ws_tx, mut ws_rx) = ws.split();
    // Every frame out goes through one queue (header compression is per connection).
    let (out_tx, mut out_rx) = mpsc::channel::<Vec<u8>>(64);
    let activity = Activity::new();
    let writer = {
        let activity = activity.clone();
        tokio::spawn(async move {
            while let Some(f) = out_rx.recv().await {
                activity.touch();
                if ws_tx.send(Message::Binary(f.into())).await.is_err() {
                    break;
                }
            }
            let _ = ws_tx.close().await;
        })
    };
    let mut s = Session {
        out_tx,
        codec: spdy::Codec::new(),
        pairs: HashMap::new(),
        streams: HashMap::new(),
        tasks: tokio::task::JoinSet::new(),
        pod,
        uid,
        pid,
    };
    let mut buf = BytesMut::new();
    let mut sweep = tokio::time::interval(Duration::from_secs(5));
    'session: loop {
        let msg = tokio::select! {
            m = ws_rx.next() => m,
            _ = activity.idle(idle) => {
                tracing::info!(pod = %s.pod, "port-forward idle: closed");
                break;
            }
            _ = sweep.tick() => {
                s.sweep().await;
                continue;
            }
        };
        let data = match msg {
            Some(Ok(Message::Binary(b))) => b,
            Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
            Some(Ok(_)) => continue,
        };
        activity.touch();
        buf.extend_from_slice(&data);
        loop {
            let frame = match s.codec.parse(&mut buf) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    tracing::info!(pod = %s.pod, error = %e, "port-forward: bad SPDY from the client");
                    let _ = s.out_tx.send(spdy::goaway(0)).await;
                    break 'session;
                }
            };
            if s.on_frame(frame).await.is_break() {
                break 'session;
            }
        }
        // Forget pairs whose connections ended.
        while s.tasks.try_join_next().is_some() {}
    }
    s.tasks.abort_all();
    let pod = s.pod.clone();
    drop(s);
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
    tracing::info!(%pod, "port-forward ended");
}

/// One SPDY port-forward session's state: the stream pairs and their connections.
struct Session {
    out_tx: mpsc::Sender<Vec<u8>>,
    codec: spdy::Codec,
    pairs: HashMap<String, Pair>,
    /// Stream id → the pair's request id.
    streams: HashMap<u32, String>,
    tasks: tokio::task::JoinSet<()>,
    pod: String,
    uid: String,
    pid: u32,
}

impl Session {
    /// Resets pairs whose second stream never came.
    async fn sweep(&mut self) {
        let now = tokio::time::Instant::now();
        let stale: Vec<String> = self
            .pairs
            .iter()
            .filter(|(_, p)| {
                p.to_conn.is_none()
                    && p.since.is_some_and(|s| now - s > PAIR_TIMEOUT)
                    && (p.error_id.is_none() || p.data_id.is_none())
            })
            .map(|(k, _)| k.clone())
            .collect();
        for k in stale {
            if let Some(p) = self.pairs.remove(&k) {
                for id in [p.error_id, p.data_id].into_iter().flatten() {
                    self.streams.remove(&id);
                    let _ = self
                        .out_tx
                        .send(spdy::rst_stream(id, spdy::RST_CANCEL))
                        .await;
                }
            }
        }
    }

    async fn on_frame(&mut self, frame: Frame) -> std::ops::ControlFlow<()> {
        tracing::debug!(pod = %self.pod, frame = ?frame, "port-forward: SPDY frame from the client");
        match frame {
            Frame::SynStream { id, headers, .. } => self.syn_stream(id, &headers).await,
            Frame::Data { id, flags, data } => self.data(id, flags, data).await,
            Frame::RstStream { id, .. } => self.reset(id),
            Frame::Ping(n) => {
                let _ = self.out_tx.send(spdy::ping(n)).await;
            }
            Frame::GoAway { .. } => return std::ops::ControlFlow::Break(()),
            Frame::SynReply { .. }
            | Frame::Headers { .. }
            | Frame::Settings
            | Frame::WindowUpdate { .. }
            | Frame::Other(_) => {}
        }
        std::ops::ControlFlow::Continue(())
    }

    async fn reject(&self, id: u32) {
        let _ = self
            .out_tx
            .send(spdy::rst_stream(id, spdy::RST_PROTOCOL_ERROR))
            .await;
    }

    /// A new stream: half of a pair; the connection starts once both halves are there.
    async fn syn_stream(&mut self, id: u32, headers: &spdy::Headers) {
        let _ = self.out_tx.send(self.codec.syn_reply(id, 0, &[])).await;
        let kind = spdy::header(headers, "streamtype").unwrap_or("");
        let port = spdy::header(headers, "port").and_then(|p| p.parse::<u16>().ok());
        let req = spdy::header(headers, "requestid")
            .map(str::to_string)
            .unwrap_or_else(|| id.to_string());
        let Some(port) = port.filter(|p| *p > 0) else {
            tracing::info!(pod = %self.pod, stream = id, "port-forward: stream without a valid port header");
            return self.reject(id).await;
        };
        if !matches!(kind, "error" | "data") {
            tracing::info!(pod = %self.pod, stream = id, kind, "port-forward: unknown stream type");
            return self.reject(id).await;
        }
        let p = self.pairs.entry(req.clone()).or_default();
        p.port = Some(port);
        p.since.get_or_insert_with(tokio::time::Instant::now);
        if kind == "error" {
            p.error_id = Some(id);
        } else {
            p.data_id = Some(id);
        }
        self.streams.insert(id, req);
        if let (Some(eid), Some(did)) = (p.error_id, p.data_id)
            && p.to_conn.is_none()
        {
            let (tx, rx) = mpsc::channel(32);
            p.to_conn = Some(tx);
            self.tasks.spawn(forward(
                self.out_tx.clone(),
                rx,
                self.pid,
                port,
                eid,
                did,
                format!("{}, uid {}", self.pod, self.uid),
            ));
        }
    }

    /// Client bytes for a connection; FIN half-closes it toward the pod.
    async fn data(&mut self, id: u32, flags: u8, data: bytes::Bytes) {
        let Some(p) = self.streams.get(&id).and_then(|r| self.pairs.get_mut(r)) else {
            return;
        };
        if Some(id) != p.data_id {
            return;
        }
        if !data.is_empty()
            && let Some(tx) = &p.to_conn
            && tx.send(data).await.is_err()
        {
            p.to_conn = None;
        }
        if flags & FLAG_FIN != 0 {
            // Dropping the sender half-closes the connection toward the pod.
            p.to_conn = None;
        }
    }

    fn reset(&mut self, id: u32) {
        if let Some(req) = self.streams.remove(&id)
            && let Some(p) = self.pairs.get_mut(&req)
        {
            p.to_conn = None;
            if p.error_id == Some(id) {
                p.error_id = None;
            }
            if p.data_id == Some(id) {
                p.data_id = None;
            }
            if p.error_id.is_none() && p.data_id.is_none() {
                self.pairs.remove(&req);
            }
        }
    }
}

/// An I/O error as Go prints it ("connection refused"), without Rust's "(os error N)".
fn plain(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => nix::errno::Errno::from_raw(n).desc().to_ascii_lowercase(),
        None => e.to_string(),
    }
}

/// A forwarded port that could not be reached in the pod; displays in kubelet's words.
#[derive(Debug, thiserror::Error)]
#[error(
    "error forwarding port {port} to pod {pod}: failed to connect to localhost:{port} inside the pod's network namespace: dial tcp4 127.0.0.1:{port}: connect: {}",
    plain(source)
)]
struct DialError {
    port: u16,
    pod: String,
    source: std::io::Error,
}

/// Dials `port` in the pod's network namespace.
async fn dial(pid: u32, port: u16, pod: &str) -> Result<tokio::net::TcpStream, DialError> {
    match dial_in_netns(pid, port).await {
        Ok(c) => {
            let _ = c.set_nodelay(true);
            Ok(c)
        }
        Err(source) => {
            let e = DialError {
                port,
                pod: pod.to_string(),
                source,
            };
            tracing::info!("{e}");
            Err(e)
        }
    }
}

/// The client's bytes into the connection until the client is done, then a half-close.
async fn client_to_pod(
    mut from_client: mpsc::Receiver<bytes::Bytes>,
    mut w: tokio::net::tcp::OwnedWriteHalf,
) {
    while let Some(b) = from_client.recv().await {
        if w.write_all(&b).await.is_err() {
            break;
        }
    }
    let _ = w.shutdown().await;
}

/// The pod's bytes out through `send` until the pod's side ends (or `send` fails).
async fn pod_to_client<F: std::future::Future<Output = bool>>(
    mut r: tokio::net::tcp::OwnedReadHalf,
    send: impl Fn(Vec<u8>) -> F,
) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if !send(buf[..n].to_vec()).await {
                    return;
                }
            }
        }
    }
}

/// One forwarded connection: dial, then copy until both directions are done.
async fn forward(
    out: mpsc::Sender<Vec<u8>>,
    from_client: mpsc::Receiver<bytes::Bytes>,
    pid: u32,
    port: u16,
    error_id: u32,
    data_id: u32,
    pod: String,
) {
    let conn = match dial(pid, port, &pod).await {
        Ok(c) => c,
        Err(e) => {
            let _ = out
                .send(spdy::data(error_id, 0, e.to_string().as_bytes()))
                .await;
            let _ = out.send(spdy::data(error_id, FLAG_FIN, &[])).await;
            let _ = out.send(spdy::data(data_id, FLAG_FIN, &[])).await;
            return;
        }
    };
    let (r, w) = conn.into_split();
    let up = client_to_pod(from_client, w);
    let down = async {
        pod_to_client(r, |b| {
            let out = &out;
            async move { out.send(spdy::data(data_id, 0, &b)).await.is_ok() }
        })
        .await;
        let _ = out.send(spdy::data(data_id, FLAG_FIN, &[])).await;
    };
    tokio::join!(up, down);
    let _ = out.send(spdy::data(error_id, FLAG_FIN, &[])).await;
}

/// One port-forward session in the channel protocol: `ports` in order, one connection each.
pub(super) async fn run_channels(
    ws: Ws,
    pod: String,
    uid: String,
    pid: u32,
    ports: Vec<u16>,
    base64: bool,
    idle: Duration,
) {
    use base64::Engine;
    let (mut ws_tx, mut ws_rx) = ws.split();
    let (out_tx, mut out_rx) = mpsc::channel::<(u8, Vec<u8>)>(64);
    let activity = Activity::new();
    let writer = {
        let activity = activity.clone();
        tokio::spawn(async move {
            while let Some((ch, data)) = out_rx.recv().await {
                activity.touch();
                let msg = if base64 {
                    let text = format!(
                        "{}{}",
                        (b'0' + ch) as char,
                        base64::engine::general_purpose::STANDARD.encode(&data)
                    );
                    Message::Text(text.into())
                } else {
                    Message::Binary(crate::stream::channel::frame(ch, &data).into())
                };
                if ws_tx.send(msg).await.is_err() {
                    break;
                }
            }
            let _ = ws_tx.close().await;
        })
    };
    let mut to_conns = Vec::with_capacity(ports.len());
    let mut tasks = tokio::task::JoinSet::new();
    for (i, port) in ports.iter().copied().enumerate() {
        let (data_ch, err_ch) = ((2 * i) as u8, (2 * i + 1) as u8);
        for ch in [data_ch, err_ch] {
            let _ = out_tx.send((ch, port.to_le_bytes().to_vec())).await;
        }
        let (tx, rx) = mpsc::channel::<bytes::Bytes>(32);
        to_conns.push(Some(tx));
        tasks.spawn(forward_channels(
            out_tx.clone(),
            rx,
            pid,
            port,
            (data_ch, err_ch),
            format!("{pod}, uid {uid}"),
        ));
    }
    drop(out_tx);
    loop {
        tokio::select! {
            done = tasks.join_next() => {
                if done.is_none() {
                    break;
                }
            }
            m = ws_rx.next() => {
                let data = match m {
                    Some(Ok(Message::Binary(b))) => b.to_vec(),
                    Some(Ok(Message::Text(t))) if base64 => {
                        let t = t.as_bytes();
                        let Some((&c, body)) = t.split_first() else { continue };
                        let Ok(mut d) = base64::engine::general_purpose::STANDARD.decode(body) else { continue };
                        d.insert(0, c.wrapping_sub(b'0'));
                        d
                    }
                    Some(Ok(Message::Text(t))) => t.as_bytes().to_vec(),
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                    Some(Ok(_)) => continue,
                };
                activity.touch();
                let Some((&ch, body)) = data.split_first() else { continue };
                // Even channels carry data; a client's error channel has nothing to say.
                let i = (ch / 2) as usize;
                if ch % 2 == 0
                    && let Some(slot) = to_conns.get_mut(i)
                    && let Some(tx) = slot
                    && tx.send(bytes::Bytes::copy_from_slice(body)).await.is_err()
                {
                    *slot = None;
                }
            }
            _ = activity.idle(idle) => {
                tracing::info!(%pod, "port-forward idle: closed");
                break;
            }
        }
    }
    tasks.abort_all();
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
    tracing::info!(%pod, "port-forward ended");
}

/// One connection of a channel-protocol session: dial, copy both ways, report a failure on
/// the error channel.
async fn forward_channels(
    out: mpsc::Sender<(u8, Vec<u8>)>,
    from_client: mpsc::Receiver<bytes::Bytes>,
    pid: u32,
    port: u16,
    (data_ch, err_ch): (u8, u8),
    pod: String,
) {
    let conn = match dial(pid, port, &pod).await {
        Ok(c) => c,
        Err(e) => {
            let _ = out.send((err_ch, e.to_string().into_bytes())).await;
            return;
        }
    };
    let (r, w) = conn.into_split();
    let up = client_to_pod(from_client, w);
    // The connection is done when the pod's side ends (kubelet's forwarder returns then).
    let down = pod_to_client(r, |b| {
        let out = &out;
        async move { out.send((data_ch, b)).await.is_ok() }
    });
    tokio::select! {
        _ = down => {}
        _ = async { up.await; std::future::pending::<()>().await } => {}
    }
}
