//! One exec: a containerd exec process (the container's own user, environment and working
//! directory, kubectl's command) whose stdio are FIFOs, pumped to and from the WebSocket.
//!
//! Two tasks so that neither direction can stall the other: the client reader feeds stdin
//! (and resizes, and stdin's EOF), the writer sends stdout/stderr and, when the process ended
//! and containerd finished copying its output, the exit Status on the error channel.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use futures::{SinkExt, StreamExt, stream::SplitSink};
use tokio::{io::AsyncWriteExt, net::unix::pipe};
use tokio_tungstenite::tungstenite::{Message, protocol::CloseFrame};

use super::{StreamOpts, Ws};
use crate::{
    agent::{AgentCtx, logs},
    runtime::{container::Stdio, random_hex},
    stream::channel::{self, Incoming},
};

pub(super) type Tx = SplitSink<Ws, Message>;

/// The end of a session, as the error channel reports it.
enum End {
    Exited(u32),
    Failed(String),
    ClientGone,
    Idle,
}

struct Fifos {
    stdin: Option<PathBuf>,
    stdout: Option<PathBuf>,
    stderr: Option<PathBuf>,
}

impl Fifos {
    fn all(&self) -> impl Iterator<Item = &PathBuf> {
        [&self.stdin, &self.stdout, &self.stderr]
            .into_iter()
            .flatten()
    }
}

fn path_str(p: &Option<PathBuf>) -> String {
    p.as_ref()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn mkfifo(p: &Path) -> std::io::Result<()> {
    nix::unistd::mkfifo(p, nix::sys::stat::Mode::from_bits_truncate(0o600))
        .map_err(std::io::Error::from)
}

/// Sends the final Status (if any) and a normal close.
pub(super) async fn finish(tx: &mut Tx, status: Option<serde_json::Value>) {
    if let Some(s) = status {
        let _ = tx
            .send(Message::Binary(
                channel::frame(channel::ERROR, s.to_string().as_bytes()).into(),
            ))
            .await;
    }
    let _ = tx
        .send(Message::Close(Some(CloseFrame {
            code: tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode::Normal,
            reason: "".into(),
        })))
        .await;
    let _ = tx.close().await;
}

/// A clock of the last bytes moved either way (for the idle timeout).
#[derive(Clone)]
pub(super) struct Activity(Arc<std::sync::Mutex<tokio::time::Instant>>);

impl Activity {
    pub(super) fn new() -> Self {
        Self(Arc::new(std::sync::Mutex::new(tokio::time::Instant::now())))
    }
    pub(super) fn touch(&self) {
        if let Ok(mut t) = self.0.lock() {
            *t = tokio::time::Instant::now();
        }
    }
    pub(super) fn last(&self) -> tokio::time::Instant {
        self.0
            .lock()
            .map(|t| *t)
            .unwrap_or_else(|_| tokio::time::Instant::now())
    }
    /// Resolves once nothing moved for `idle`.
    pub(super) async fn idle(&self, idle: Duration) {
        loop {
            let deadline = self.last() + idle;
            if tokio::time::Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

pub(super) async fn run(ctx: Arc<AgentCtx>, ws: Ws, cid: String, o: StreamOpts, _v5: bool) {
    let exec_id = format!("exec-{}", random_hex(8));
    let dir = ctx.cfg.fifo_dir();
    // Output FIFOs exist whether or not the client asked for the stream (containerd's CRI does
    // the same): a process writing to a stream nobody reads must not fail; what the client did
    // not ask for is read and dropped. A terminal has one output.
    let fifos = Fifos {
        stdin: o.stdin.then(|| dir.join(format!("{exec_id}.in"))),
        stdout: Some(dir.join(format!("{exec_id}.out"))),
        stderr: (!o.tty).then(|| dir.join(format!("{exec_id}.err"))),
    };
    let (mut tx, rx) = ws.split();
    let end = session(&ctx, &mut tx, rx, &cid, &exec_id, &o, &fifos).await;
    for p in fifos.all() {
        let _ = std::fs::remove_file(p);
    }
    let status = match &end {
        End::Exited(code) => Some(channel::exit_status(&o.command, *code)),
        End::Failed(msg) => Some(channel::failure(msg)),
        End::Idle => Some(channel::failure("the stream was idle for too long")),
        End::ClientGone => None,
    };
    match &end {
        End::Exited(code) => tracing::info!(container = %cid, exec = %exec_id, code, "exec ended"),
        End::Failed(msg) => {
            tracing::info!(container = %cid, exec = %exec_id, error = %msg, "exec failed")
        }
        End::ClientGone => {
            tracing::info!(container = %cid, exec = %exec_id, "exec client went away")
        }
        End::Idle => tracing::info!(container = %cid, exec = %exec_id, "exec idle: closed"),
    }
    finish(&mut tx, status).await;
}

/// Reads one FIFO if it is open; pending forever otherwise.
async fn read_opt(rx: &mut Option<pipe::Receiver>, buf: &mut [u8]) -> std::io::Result<usize> {
    use tokio::io::AsyncReadExt;
    match rx {
        Some(r) => r.read(buf).await,
        None => std::future::pending().await,
    }
}

/// Whatever a FIFO still holds, without waiting.
fn drain(rx: &mut Option<pipe::Receiver>) -> Vec<u8> {
    let mut all = vec![];
    let mut buf = [0u8; 32 * 1024];
    if let Some(r) = rx {
        while let Ok(n) = r.try_read(&mut buf) {
            if n == 0 {
                break;
            }
            all.extend_from_slice(&buf[..n]);
        }
    }
    all
}

/// The client's side: stdin bytes (`on_stdin` answers false once stdin is gone), stdin's
/// close (also when the client leaves with stdin open), terminal resizes. Returns when the
/// client closes the WebSocket or goes away.
pub(super) async fn read_client(
    mut rx: futures::stream::SplitStream<Ws>,
    mut on_stdin: impl AsyncFnMut(&[u8]) -> bool,
    on_close_stdin: impl AsyncFn(),
    on_resize: impl AsyncFn(u16, u16),
    activity: Activity,
) {
    let mut open = true;
    while let Some(m) = rx.next().await {
        // The channel protocol comes in binary or text frames alike (the Python client writes
        // stdin as text): the first byte is the channel either way.
        let data = match m {
            Ok(Message::Binary(b)) => b,
            Ok(Message::Text(t)) => bytes::Bytes::copy_from_slice(t.as_bytes()),
            Ok(Message::Close(_)) | Err(_) => break,
            Ok(_) => continue,
        };
        activity.touch();
        match channel::decode(&data) {
            Ok(Incoming::Stdin(d)) => {
                if open && !on_stdin(d).await {
                    open = false;
                }
            }
            Ok(Incoming::Close(channel::STDIN)) => {
                if std::mem::take(&mut open) {
                    on_close_stdin().await;
                }
            }
            Ok(Incoming::Resize { width, height }) => on_resize(width, height).await,
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "stream message"),
        }
    }
    if open {
        on_close_stdin().await;
    }
}

fn exec_failure(what: &str, e: &dyn std::fmt::Display) -> End {
    End::Failed(format!(
        "error executing command in container: failed to {what} in container: {e}"
    ))
}

/// The session's end of the FIFOs: stdin (opened on first use, see [`Stdin`]) and the two
/// output readers.
struct Pipes {
    stdin: Option<Stdin>,
    out: Option<pipe::Receiver>,
    err: Option<pipe::Receiver>,
}

/// The exec's stdin FIFO. Opened write-only once the shim reads it: bytes written into a FIFO
/// nobody else has open are discarded when the last descriptor closes, so a client that sends
/// its input and closes stdin at once (as the JavaScript client does) would lose both if the
/// agent held the only descriptor; and a close (CloseIO) that reaches the shim before its own
/// deferred opens ran leaves the shim's reader waiting for a writer forever, the process with
/// neither input nor EOF.
enum Stdin {
    Path(PathBuf),
    Open(pipe::Sender),
}

impl Stdin {
    /// The writer, waiting (at most 10 s) until the shim has the FIFO open for reading.
    async fn writer(&mut self) -> std::io::Result<&mut pipe::Sender> {
        if let Stdin::Path(p) = self {
            let t0 = tokio::time::Instant::now();
            let w = loop {
                match pipe::OpenOptions::new().open_sender(&*p) {
                    Ok(w) => break w,
                    // ENXIO: no reader yet.
                    Err(e)
                        if e.raw_os_error() == Some(libc::ENXIO)
                            && t0.elapsed() < Duration::from_secs(10) =>
                    {
                        tokio::time::sleep(Duration::from_millis(2)).await
                    }
                    Err(e) => return Err(e),
                }
            };
            *self = Stdin::Open(w);
        }
        match self {
            Stdin::Open(w) => Ok(w),
            Stdin::Path(_) => unreachable!("opened above"),
        }
    }
}

fn open_pipes(fifos: &Fifos) -> Result<Pipes, End> {
    for p in fifos.all() {
        mkfifo(p).map_err(|e| exec_failure("make FIFOs", &e))?;
    }
    let stdin = fifos.stdin.clone().map(Stdin::Path);
    let open = |p: &Option<PathBuf>| p.as_ref().map(|p| logs::open_fifo(p)).transpose();
    match (open(&fifos.stdout), open(&fifos.stderr)) {
        (Ok(out), Ok(err)) => Ok(Pipes { stdin, out, err }),
        (Err(e), _) | (_, Err(e)) => Err(exec_failure("open output", &e)),
    }
}

/// Creates and starts the exec process; returns the task waiting for its exit code.
async fn start_process(
    ctx: &Arc<AgentCtx>,
    cid: &str,
    exec_id: &str,
    o: &StreamOpts,
    fifos: &Fifos,
) -> Result<tokio::task::JoinHandle<crate::runtime::Result<u32>>, End> {
    let mut process = ctx
        .rt
        .container_process(cid)
        .await
        .map_err(|e| exec_failure("exec", &e))?;
    process.set_args(Some(o.command.clone()));
    process.set_terminal(Some(o.tty));
    if o.tty {
        let mut env = process.env().clone().unwrap_or_default();
        if !env.iter().any(|e| e.starts_with("TERM=")) {
            env.push("TERM=xterm".into());
        }
        process.set_env(Some(env));
    }
    let io = Stdio {
        stdin: path_str(&fifos.stdin),
        stdout: path_str(&fifos.stdout),
        stderr: path_str(&fifos.stderr),
        terminal: o.tty,
    };
    ctx.rt
        .exec_create(cid, exec_id, &process, &io)
        .await
        .map_err(|e| exec_failure("exec", &e))?;
    let wait = {
        let (rt, c, e) = (ctx.rt.clone(), cid.to_string(), exec_id.to_string());
        tokio::spawn(async move { rt.wait_process(&c, &e).await })
    };
    if let Err(e) = ctx.rt.exec_start(cid, exec_id).await {
        wait.abort();
        let _ = ctx.rt.exec_delete(cid, exec_id).await;
        return Err(exec_failure(&format!("start exec {exec_id:?}"), &e));
    }
    Ok(wait)
}

/// The task reading the client: stdin into the process, stdin's close, terminal resizes.
fn spawn_client_reader(
    ctx: &Arc<AgentCtx>,
    rx: futures::stream::SplitStream<Ws>,
    cid: &str,
    exec_id: &str,
    tty: bool,
    stdin: Option<Stdin>,
    activity: Activity,
) -> tokio::task::JoinHandle<()> {
    let (rt1, rt2) = (ctx.rt.clone(), ctx.rt.clone());
    let (c1, c2, e1, e2) = (
        cid.to_string(),
        cid.to_string(),
        exec_id.to_string(),
        exec_id.to_string(),
    );
    // Shared by the writes and the close: stdin reaches EOF once this writer is gone and
    // containerd closed its own (the shim holds one open until CloseIO).
    let stdin = Arc::new(tokio::sync::Mutex::new(stdin));
    let stdin2 = stdin.clone();
    tokio::spawn(read_client(
        rx,
        async move |d: &[u8]| match stdin.lock().await.as_mut() {
            Some(s) => match s.writer().await {
                Ok(w) => w.write_all(d).await.is_ok(),
                Err(_) => false,
            },
            None => false,
        },
        async move || {
            if let Some(mut s) = stdin2.lock().await.take() {
                // Only once the shim reads the FIFO: then what was written reaches the
                // process, and the EOF after it.
                if let Err(e) = s.writer().await {
                    tracing::debug!(error = %e, "exec stdin was never read");
                }
                drop(s);
                let _ = rt1.close_stdin(&c1, &e1).await;
            }
        },
        async move |w, h| {
            if tty && let Err(e) = rt2.resize_pty(&c2, &e2, w.into(), h.into()).await {
                tracing::debug!(error = %e, "resize");
            }
        },
        activity,
    ))
}

async fn session(
    ctx: &Arc<AgentCtx>,
    tx: &mut Tx,
    rx: futures::stream::SplitStream<Ws>,
    cid: &str,
    exec_id: &str,
    o: &StreamOpts,
    fifos: &Fifos,
) -> End {
    let Pipes { stdin, out, err } = match open_pipes(fifos) {
        Ok(p) => p,
        Err(end) => return end,
    };
    let mut wait = match start_process(ctx, cid, exec_id, o, fifos).await {
        Ok(w) => w,
        Err(end) => return end,
    };
    let activity = Activity::new();
    let mut reader = spawn_client_reader(ctx, rx, cid, exec_id, o.tty, stdin, activity.clone());
    let mut pump = Pump {
        ctx,
        cid,
        exec_id,
        o,
        out,
        err,
        code: None,
        waited: false,
        deleting: None,
    };
    let end = pump.run(tx, &mut wait, &mut reader, &activity).await;
    reader.abort();
    if pump.code.is_none() {
        // The client went away or idled out: the process goes too (as containerd's CRI does).
        let _ = ctx.rt.close_stdin(cid, exec_id).await;
        let _ = ctx.rt.exec_kill(cid, exec_id, 9).await;
        if !pump.waited {
            let _ = tokio::time::timeout(Duration::from_secs(5), &mut wait).await;
        }
        let _ = ctx.rt.exec_delete(cid, exec_id).await;
    } else if let Some(d) = pump.deleting {
        let _ = tokio::time::timeout(Duration::from_secs(5), d).await;
    }
    end
}

/// The output side of a running exec: FIFOs to the client until the process ended and
/// containerd copied all its output, or the client left, or the stream idled.
struct Pump<'a> {
    ctx: &'a Arc<AgentCtx>,
    cid: &'a str,
    exec_id: &'a str,
    o: &'a StreamOpts,
    out: Option<pipe::Receiver>,
    err: Option<pipe::Receiver>,
    code: Option<u32>,
    waited: bool,
    deleting: Option<tokio::task::JoinHandle<()>>,
}

impl Pump<'_> {
    async fn run(
        &mut self,
        tx: &mut Tx,
        wait: &mut tokio::task::JoinHandle<crate::runtime::Result<u32>>,
        reader: &mut tokio::task::JoinHandle<()>,
        activity: &Activity,
    ) -> End {
        let idle = self.ctx.cfg.stream_idle_timeout;
        let (mut obuf, mut ebuf) = (vec![0u8; 32 * 1024], vec![0u8; 32 * 1024]);
        let (want_out, want_err) = (self.o.stdout, self.o.stderr);
        loop {
            tokio::select! {
                r = read_opt(&mut self.out, &mut obuf) => match r {
                    Ok(n) if n > 0 => {
                        activity.touch();
                        if want_out && send(tx, channel::STDOUT, &obuf[..n]).await.is_err() {
                            return End::ClientGone;
                        }
                    }
                    _ => self.out = None,
                },
                r = read_opt(&mut self.err, &mut ebuf) => match r {
                    Ok(n) if n > 0 => {
                        activity.touch();
                        if want_err && send(tx, channel::STDERR, &ebuf[..n]).await.is_err() {
                            return End::ClientGone;
                        }
                    }
                    _ => self.err = None,
                },
                w = &mut *wait, if !self.waited => {
                    if let Some(end) = self.exited(w) {
                        return end;
                    }
                }
                _ = async { self.deleting.as_mut().expect("guarded").await }, if self.deleting.is_some() => {
                    self.deleting = None;
                    return self.flush(tx).await;
                }
                _ = &mut *reader => return End::ClientGone,
                _ = activity.idle(idle) => return End::Idle,
            }
        }
    }

    /// The process ended: starts containerd's delete, which returns once the shim copied all
    /// output into the FIFOs (read meanwhile, so that a full pipe cannot hold it up).
    fn exited(
        &mut self,
        w: Result<crate::runtime::Result<u32>, tokio::task::JoinError>,
    ) -> Option<End> {
        self.waited = true;
        let failed = match w {
            Ok(Ok(c)) => {
                self.code = Some(c);
                None
            }
            Ok(Err(e)) => Some(End::Failed(format!(
                "error executing command in container: {e}"
            ))),
            Err(e) => Some(End::Failed(format!(
                "error executing command in container: {e}"
            ))),
        };
        let (rt, c, e) = (
            self.ctx.rt.clone(),
            self.cid.to_string(),
            self.exec_id.to_string(),
        );
        self.deleting = Some(tokio::spawn(async move {
            let _ = rt.exec_delete(&c, &e).await;
        }));
        failed
    }

    /// containerd is done with the output: what the FIFOs still hold, then the exit.
    async fn flush(&mut self, tx: &mut Tx) -> End {
        let rest = [
            (channel::STDOUT, drain(&mut self.out), self.o.stdout),
            (channel::STDERR, drain(&mut self.err), self.o.stderr),
        ];
        for (ch, rest, wanted) in rest {
            if wanted && !rest.is_empty() {
                let _ = send(tx, ch, &rest).await;
            }
        }
        match self.code {
            Some(c) => End::Exited(c),
            None => End::Failed(
                "error executing command in container: the process could not be waited for".into(),
            ),
        }
    }
}

async fn send(
    tx: &mut Tx,
    ch: u8,
    data: &[u8],
) -> Result<(), tokio_tungstenite::tungstenite::Error> {
    tx.send(Message::Binary(channel::frame(ch, data).into()))
        .await
}
