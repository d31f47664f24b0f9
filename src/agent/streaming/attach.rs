//! One attach: the container's own stdio. Output comes from the log pumps (so the log file
//! keeps everything, including what was written before anyone attached); stdin goes into the
//! FIFO the agent holds open for containers with `stdin: true`. With `stdinOnce`, the
//! container's stdin is closed when the first attached client closes its stdin or leaves.

use std::{sync::Arc, time::Duration};

use futures::{SinkExt, StreamExt};
use tokio::sync::broadcast::error::RecvError;
use tokio_tungstenite::tungstenite::Message;

use super::{
    AttachIo, StreamOpts, Ws,
    exec::{Activity, finish, read_client},
};
use crate::{agent::AgentCtx, stream::channel};

async fn close_stdin(ctx: &AgentCtx, io: &AttachIo) {
    if io.stdin.lock().await.take().is_some() {
        let _ = ctx.rt.close_stdin(&io.container_id, "").await;
    }
}

pub(super) async fn run(ctx: Arc<AgentCtx>, ws: Ws, io: Arc<AttachIo>, o: StreamOpts) {
    let mut out = io.output.subscribe();
    let (mut tx, rx) = ws.split();
    let activity = Activity::new();
    let mut reader = {
        let (c2, c3) = (ctx.clone(), ctx.clone());
        let (i1, i2, i3) = (io.clone(), io.clone(), io.clone());
        let wants_stdin = o.stdin;
        tokio::spawn(read_client(
            rx,
            async move |d: &[u8]| {
                use tokio::io::AsyncWriteExt;
                let mut w = i1.stdin.lock().await;
                match w.as_mut() {
                    Some(f) if wants_stdin => f.write_all(d).await.is_ok(),
                    _ => false,
                }
            },
            async move || {
                if wants_stdin && i2.stdin_once {
                    close_stdin(&c2, &i2).await;
                }
            },
            async move |width, height| {
                if i3.tty
                    && let Err(e) = c3
                        .rt
                        .resize_pty(&i3.container_id, "", width.into(), height.into())
                        .await
                {
                    tracing::debug!(error = %e, "resize");
                }
            },
            activity.clone(),
        ))
    };
    let mut exited = io.exited.clone();
    let idle = ctx.cfg.stream_idle_timeout;
    let wanted =
        |ch: u8| (ch == channel::STDOUT && o.stdout) || (ch == channel::STDERR && o.stderr);
    let mut client_gone = false;
    loop {
        tokio::select! {
            m = out.recv() => match m {
                Ok((ch, data)) if wanted(ch) => {
                    activity.touch();
                    if tx.send(Message::Binary(channel::frame(ch, &data).into())).await.is_err() {
                        client_gone = true;
                        break;
                    }
                }
                Ok(_) => {}
                Err(RecvError::Lagged(n)) => tracing::debug!(skipped = n, "attached client fell behind"),
                Err(RecvError::Closed) => break,
            },
            _ = &mut reader => {
                client_gone = true;
                break;
            }
            _ = async { let _ = exited.wait_for(|e| *e).await; } => {
                // The pumps drain for a moment after the exit: pass on what they still read.
                while let Ok(Ok((ch, data))) = tokio::time::timeout(Duration::from_millis(200), out.recv()).await {
                    if wanted(ch) {
                        let _ = tx.send(Message::Binary(channel::frame(ch, &data).into())).await;
                    }
                }
                break;
            }
            _ = activity.idle(idle) => break,
        }
    }
    if !client_gone {
        reader.abort();
        finish(
            &mut tx,
            Some(serde_json::json!({"metadata": {}, "status": "Success"})),
        )
        .await;
    }
}
