//! Container logs in the CRI format (`<RFC3339Nano> <stdout|stderr> <P|F> <msg>`), written from
//! the FIFOs containerd's shim fills, with size-based rotation; and reading them back for the
//! agent API (tail, follow, timestamps). Never talks to containerd.

use std::{
    io::Write,
    path::{Path, PathBuf},
    sync::Arc,
};

use tokio::{io::AsyncReadExt, sync::Mutex};

/// Longest line written as one record; longer lines are split into partial (`P`) records.
const MAX_LINE: usize = 16 * 1024;

/// Rotation policy.
#[derive(Debug, Clone, Copy)]
pub struct Rotation {
    pub max_size: u64,
    pub max_files: usize,
}

impl Default for Rotation {
    fn default() -> Self {
        Self {
            max_size: 10 << 20,
            max_files: 5,
        }
    }
}

/// The CRI log file of one container instance, shared by its stdout and stderr pumps.
pub struct LogFile {
    path: PathBuf,
    file: std::fs::File,
    size: u64,
    rotation: Rotation,
}

impl LogFile {
    pub fn open(path: &Path, rotation: Rotation) -> std::io::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        let size = file.metadata()?.len();
        Ok(Self {
            path: path.to_path_buf(),
            file,
            size,
            rotation,
        })
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        let n = self.rotation.max_files.max(1);
        let name = |i: usize| PathBuf::from(format!("{}.{i}", self.path.display()));
        let _ = std::fs::remove_file(name(n - 1));
        for i in (1..n.saturating_sub(1)).rev() {
            let _ = std::fs::rename(name(i), name(i + 1));
        }
        if n > 1 {
            std::fs::rename(&self.path, name(1))?;
        } else {
            std::fs::remove_file(&self.path)?;
        }
        self.file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        self.size = 0;
        Ok(())
    }

    /// Appends one record.
    pub fn record(&mut self, stream: &str, partial: bool, msg: &[u8]) -> std::io::Result<()> {
        let ts = jiff::Timestamp::now();
        let mut line = Vec::with_capacity(msg.len() + 48);
        write!(
            line,
            "{} {} {} ",
            ts.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            stream,
            if partial { 'P' } else { 'F' }
        )?;
        line.extend_from_slice(msg);
        line.push(b'\n');
        if self.size > 0 && self.size + line.len() as u64 > self.rotation.max_size {
            self.rotate()?;
        }
        self.file.write_all(&line)?;
        self.size += line.len() as u64;
        Ok(())
    }
}

/// Opens the read side of a log FIFO without blocking and without ever seeing EOF (read-write
/// mode), so it can be opened before the shim opens the write side.
pub fn open_fifo(path: &Path) -> std::io::Result<tokio::net::unix::pipe::Receiver> {
    tokio::net::unix::pipe::OpenOptions::new()
        .read_write(true)
        .open_receiver(path)
}

/// A copy of a container's output for attached clients: (channel, bytes) as read.
pub type Tee = tokio::sync::broadcast::Sender<(u8, bytes::Bytes)>;

/// Copies one FIFO into the log file (and to `tee`'s listeners, if any, on channel `ch`). Once
/// `stop` turns true (the container exited), whatever is still buffered is drained and the pump
/// ends.
pub async fn pump(
    mut rx: tokio::net::unix::pipe::Receiver,
    stream: &'static str,
    log: Arc<Mutex<LogFile>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
    tee: Option<(u8, Tee)>,
) {
    let mut buf = vec![0u8; 8 * 1024];
    let mut pending: Vec<u8> = Vec::new();
    let mut stopping = *stop.borrow();
    loop {
        let read = if stopping {
            match tokio::time::timeout(std::time::Duration::from_millis(50), rx.read(&mut buf))
                .await
            {
                Ok(r) => r,
                Err(_) => break,
            }
        } else {
            tokio::select! {
                r = rx.read(&mut buf) => r,
                c = stop.changed() => {
                    stopping = c.is_err() || *stop.borrow();
                    continue;
                }
            }
        };
        let n = match read {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(error = %e, "log FIFO read");
                break;
            }
        };
        if let Some((ch, tx)) = &tee
            && tx.receiver_count() > 0
        {
            let _ = tx.send((*ch, bytes::Bytes::copy_from_slice(&buf[..n])));
        }
        pending.extend_from_slice(&buf[..n]);
        let mut log = log.lock().await;
        while let Some(pos) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=pos).collect();
            let body = &line[..line.len() - 1];
            if body.is_empty() {
                let _ = log.record(stream, false, b"");
            }
            for (i, chunk) in body.chunks(MAX_LINE).enumerate() {
                let last = (i + 1) * MAX_LINE >= body.len();
                let _ = log.record(stream, !last, chunk);
            }
        }
        while pending.len() >= MAX_LINE {
            let chunk: Vec<u8> = pending.drain(..MAX_LINE).collect();
            let _ = log.record(stream, true, &chunk);
        }
    }
    if !pending.is_empty() {
        let _ = log.lock().await.record(stream, false, &pending);
    }
}

/// Parses one CRI log line into (timestamp, stream, partial, message).
pub fn parse_line(line: &str) -> Option<(&str, &str, bool, &str)> {
    let (ts, rest) = line.split_once(' ')?;
    let (stream, rest) = rest.split_once(' ')?;
    let (tag, msg) = rest.split_once(' ').unwrap_or((rest, ""));
    Some((ts, stream, tag == "P", msg))
}

/// Options of a log read, as `kubectl logs` sends them.
#[derive(Debug, Clone, Default)]
pub struct ReadOpts {
    pub tail_lines: Option<usize>,
    pub timestamps: bool,
}

/// Renders a CRI log file as the user-facing log: partial records joined, optional timestamps,
/// the last `tail_lines` lines.
pub fn render(content: &str, opts: &ReadOpts) -> String {
    let mut lines: Vec<String> = Vec::new();
    let mut cur = String::new();
    let mut cur_ts: Option<String> = None;
    for l in content.lines() {
        let Some((ts, _stream, partial, msg)) = parse_line(l) else {
            continue;
        };
        if cur_ts.is_none() {
            cur_ts = Some(ts.to_string());
        }
        cur.push_str(msg);
        if !partial {
            let ts = cur_ts.take().unwrap_or_default();
            lines.push(if opts.timestamps {
                format!("{ts} {cur}\n")
            } else {
                format!("{cur}\n")
            });
            cur.clear();
        }
    }
    let skip = opts
        .tail_lines
        .map(|t| lines.len().saturating_sub(t))
        .unwrap_or(0);
    lines[skip..].concat()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_cri_lines_and_render_back_with_partials_joined() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c/0.log");
        let mut f = LogFile::open(&p, Rotation::default()).unwrap();
        f.record("stdout", false, b"hello").unwrap();
        f.record("stderr", true, b"par").unwrap();
        f.record("stderr", false, b"tial").unwrap();
        let content = std::fs::read_to_string(&p).unwrap();
        let first = content.lines().next().unwrap();
        let (ts, stream, partial, msg) = parse_line(first).unwrap();
        assert!(ts.ends_with('Z') && ts.contains('T'));
        assert_eq!((stream, partial, msg), ("stdout", false, "hello"));
        assert_eq!(render(&content, &ReadOpts::default()), "hello\npartial\n");
        let tail = render(
            &content,
            &ReadOpts {
                tail_lines: Some(1),
                timestamps: false,
            },
        );
        assert_eq!(tail, "partial\n");
    }

    #[test]
    fn rotation_keeps_at_most_max_files() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("0.log");
        let mut f = LogFile::open(
            &p,
            Rotation {
                max_size: 100,
                max_files: 3,
            },
        )
        .unwrap();
        for _ in 0..50 {
            f.record("stdout", false, b"0123456789012345678901234567890123456789")
                .unwrap();
        }
        let n = std::fs::read_dir(d.path()).unwrap().count();
        assert_eq!(n, 3, "current + 2 rotated");
        assert!(std::fs::metadata(&p).unwrap().len() <= 100);
    }
}
