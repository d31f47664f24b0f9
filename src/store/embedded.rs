//! The embedded store: a redb database file (ACID, fsync on commit, so `kill -9` loses no
//! acknowledged write) with one writer thread that commits queued writes together (group
//! commit: one fsync for a burst), and readers on MVCC snapshots. Watches replay history from
//! the change log, then follow live changes broadcast after each commit.

use std::{
    ops::Bound,
    path::Path,
    sync::{Arc, mpsc as std_mpsc},
    thread,
};

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{broadcast, mpsc, oneshot};

use super::{
    Error, Event, EventKind, KeyValue, List, Precondition, Result, Revision, Store, check,
};

const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, i64> = TableDefinition::new("meta");
const META_REV: &str = "revision";
const META_COMPACTED: &str = "compacted";

/// Writes queued in one batch at most.
const MAX_BATCH: usize = 512;
/// Live events buffered per watcher before it is cut off (it must re-list).
const WATCH_BUFFER: usize = 8192;

fn backend(e: impl std::fmt::Display) -> Error {
    Error::Backend(e.to_string())
}

fn enc_kv(create: Revision, modr: Revision, value: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(16 + value.len());
    v.extend_from_slice(&create.to_le_bytes());
    v.extend_from_slice(&modr.to_le_bytes());
    v.extend_from_slice(value);
    v
}

fn dec_kv(key: &str, b: &[u8]) -> Result<KeyValue> {
    if b.len() < 16 {
        return Err(Error::Backend(format!("corrupt record for {key:?}")));
    }
    let rev = |i: usize| i64::from_le_bytes(b[i..i + 8].try_into().unwrap_or([0; 8]));
    Ok(KeyValue {
        key: key.to_string(),
        create_revision: rev(0),
        mod_revision: rev(8),
        value: b[16..].to_vec(),
    })
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

fn enc_event(e: &Event) -> Vec<u8> {
    let mut out = vec![match e.kind {
        EventKind::Put => 0u8,
        EventKind::Delete => 1,
    }];
    put_bytes(&mut out, e.kv.key.as_bytes());
    put_bytes(
        &mut out,
        &enc_kv(e.kv.create_revision, e.kv.mod_revision, &e.kv.value),
    );
    match &e.prev {
        None => out.push(0),
        Some(p) => {
            out.push(1);
            put_bytes(
                &mut out,
                &enc_kv(p.create_revision, p.mod_revision, &p.value),
            );
        }
    }
    out
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let s = self
            .b
            .get(self.at..self.at + n)
            .ok_or_else(|| Error::Backend("corrupt change log entry".into()))?;
        self.at += n;
        Ok(s)
    }
    fn bytes(&mut self) -> Result<&'a [u8]> {
        let n = u32::from_le_bytes(self.take(4)?.try_into().unwrap_or([0; 4])) as usize;
        self.take(n)
    }
}

fn dec_event(b: &[u8]) -> Result<Event> {
    let mut r = Reader { b, at: 0 };
    let kind = match r.take(1)?[0] {
        0 => EventKind::Put,
        _ => EventKind::Delete,
    };
    let key = String::from_utf8_lossy(r.bytes()?).to_string();
    let kv = dec_kv(&key, r.bytes()?)?;
    let prev = match r.take(1)?[0] {
        0 => None,
        _ => Some(dec_kv(&key, r.bytes()?)?),
    };
    Ok(Event { kind, kv, prev })
}

enum Op {
    Put {
        key: String,
        value: Vec<u8>,
        pre: Precondition,
    },
    Delete {
        key: String,
        pre: Precondition,
    },
    Compact(Revision),
}

struct WriteReq {
    op: Op,
    reply: oneshot::Sender<Result<Option<KeyValue>>>,
}

/// The embedded store. Cheap to clone.
#[derive(Clone)]
pub struct Embedded {
    db: Arc<Database>,
    writer: std_mpsc::Sender<WriteReq>,
    events: broadcast::Sender<Arc<Event>>,
}

impl Embedded {
    /// Opens (or creates) the database file at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent() {
            crate::runtime::private_dir(dir, 0o700)
                .map_err(|e| Error::Backend(format!("{}: {e}", dir.display())))?;
        }
        {
            // The store holds every Secret: readable by root only, from its creation on.
            use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| Error::Backend(format!("{}: {e}", path.display())))?;
            f.set_permissions(std::fs::Permissions::from_mode(0o600))
                .map_err(|e| Error::Backend(format!("{}: {e}", path.display())))?;
        }
        let db = Database::create(path)
            .map_err(|e| Error::Backend(format!("{}: {e}", path.display())))?;
        {
            let w = db.begin_write().map_err(backend)?;
            w.open_table(KV).map_err(backend)?;
            w.open_table(LOG).map_err(backend)?;
            w.open_table(META).map_err(backend)?;
            w.commit().map_err(backend)?;
        }
        let db = Arc::new(db);
        let (events, _) = broadcast::channel(WATCH_BUFFER);
        let (tx, rx) = std_mpsc::channel();
        let (wdb, wevents) = (db.clone(), events.clone());
        thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer_loop(wdb, rx, wevents))
            .map_err(backend)?;
        Ok(Self {
            db,
            writer: tx,
            events,
        })
    }

    async fn submit(&self, op: Op) -> Result<Option<KeyValue>> {
        let (reply, rx) = oneshot::channel();
        self.writer
            .send(WriteReq { op, reply })
            .map_err(|_| Error::Closed)?;
        rx.await.map_err(|_| Error::Closed)?
    }

    fn meta(&self, key: &str) -> Result<Revision> {
        let r = self.db.begin_read().map_err(backend)?;
        let t = r.open_table(META).map_err(backend)?;
        Ok(t.get(key).map_err(backend)?.map(|v| v.value()).unwrap_or(0))
    }
}

/// The writer: applies queued writes in one transaction per batch, commits (one fsync), then
/// answers each caller and broadcasts the events in revision order.
fn writer_loop(
    db: Arc<Database>,
    rx: std_mpsc::Receiver<WriteReq>,
    events: broadcast::Sender<Arc<Event>>,
) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let mut results: Vec<Result<Option<KeyValue>>> = Vec::with_capacity(batch.len());
        let mut emitted: Vec<Event> = vec![];
        let outcome = (|| -> Result<()> {
            let w = db.begin_write().map_err(backend)?;
            {
                let mut kv = w.open_table(KV).map_err(backend)?;
                let mut log = w.open_table(LOG).map_err(backend)?;
                let mut meta = w.open_table(META).map_err(backend)?;
                let mut rev = meta
                    .get(META_REV)
                    .map_err(backend)?
                    .map(|v| v.value())
                    .unwrap_or(0);
                for req in &batch {
                    let r = apply(&req.op, &mut kv, &mut log, &mut meta, &mut rev);
                    match r {
                        Ok((kv, ev)) => {
                            if let Some(ev) = ev {
                                emitted.push(ev);
                            }
                            results.push(Ok(kv));
                        }
                        Err(e @ Error::Backend(_)) => return Err(e),
                        Err(e) => results.push(Err(e)),
                    }
                }
                meta.insert(META_REV, rev).map_err(backend)?;
            }
            w.commit().map_err(backend)
        })();
        match outcome {
            Ok(()) => {
                for (req, r) in batch.into_iter().zip(results) {
                    let _ = req.reply.send(r);
                }
                for ev in emitted {
                    let _ = events.send(Arc::new(ev));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "store commit failed");
                for req in batch {
                    let _ = req.reply.send(Err(Error::Backend(e.to_string())));
                }
            }
        }
    }
}

type KvTable<'t> = redb::Table<'t, &'static str, &'static [u8]>;
type LogTable<'t> = redb::Table<'t, u64, &'static [u8]>;
type MetaTable<'t> = redb::Table<'t, &'static str, i64>;

fn apply(
    op: &Op,
    kv: &mut KvTable<'_>,
    log: &mut LogTable<'_>,
    meta: &mut MetaTable<'_>,
    rev: &mut Revision,
) -> Result<(Option<KeyValue>, Option<Event>)> {
    match op {
        Op::Put { key, value, pre } => {
            let cur = match kv.get(key.as_str()).map_err(backend)? {
                Some(v) => Some(dec_kv(key, v.value())?),
                None => None,
            };
            check(key, cur.as_ref(), *pre)?;
            *rev += 1;
            let create = cur.as_ref().map_or(*rev, |c| c.create_revision);
            kv.insert(key.as_str(), enc_kv(create, *rev, value).as_slice())
                .map_err(backend)?;
            let new = KeyValue {
                key: key.clone(),
                value: value.clone(),
                create_revision: create,
                mod_revision: *rev,
            };
            let ev = Event {
                kind: EventKind::Put,
                kv: new.clone(),
                prev: cur,
            };
            log.insert(*rev as u64, enc_event(&ev).as_slice())
                .map_err(backend)?;
            Ok((Some(new), Some(ev)))
        }
        Op::Delete { key, pre } => {
            let cur = match kv.get(key.as_str()).map_err(backend)? {
                Some(v) => Some(dec_kv(key, v.value())?),
                None => None,
            };
            check(key, cur.as_ref(), *pre)?;
            let Some(cur) = cur else {
                return Err(Error::NotFound(key.clone()));
            };
            *rev += 1;
            kv.remove(key.as_str()).map_err(backend)?;
            let gone = KeyValue {
                mod_revision: *rev,
                ..cur.clone()
            };
            let ev = Event {
                kind: EventKind::Delete,
                kv: gone.clone(),
                prev: Some(cur),
            };
            log.insert(*rev as u64, enc_event(&ev).as_slice())
                .map_err(backend)?;
            Ok((Some(gone), Some(ev)))
        }
        Op::Compact(to) => {
            let to = (*to).min(*rev);
            let old = meta
                .get(META_COMPACTED)
                .map_err(backend)?
                .map(|v| v.value())
                .unwrap_or(0);
            if to > old {
                log.retain_in(..=(to as u64), |_, _| false)
                    .map_err(backend)?;
                meta.insert(META_COMPACTED, to).map_err(backend)?;
            }
            Ok((None, None))
        }
    }
}

#[async_trait]
impl Store for Embedded {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let r = self.db.begin_read().map_err(backend)?;
        let t = r.open_table(KV).map_err(backend)?;
        match t.get(key).map_err(backend)? {
            Some(v) => Ok(Some(dec_kv(key, v.value())?)),
            None => Ok(None),
        }
    }

    async fn list(&self, prefix: &str, start_after: Option<&str>, limit: usize) -> Result<List> {
        let r = self.db.begin_read().map_err(backend)?;
        let revision = r
            .open_table(META)
            .map_err(backend)?
            .get(META_REV)
            .map_err(backend)?
            .map(|v| v.value())
            .unwrap_or(0);
        let t = r.open_table(KV).map_err(backend)?;
        let lower = match start_after {
            Some(a) if a >= prefix => Bound::Excluded(a),
            _ => Bound::Included(prefix),
        };
        let mut items = vec![];
        let mut more = false;
        for entry in t
            .range::<&str>((lower, Bound::Unbounded))
            .map_err(backend)?
        {
            let (k, v) = entry.map_err(backend)?;
            let key = k.value();
            if !key.starts_with(prefix) {
                break;
            }
            if limit > 0 && items.len() == limit {
                more = true;
                break;
            }
            items.push(dec_kv(key, v.value())?);
        }
        Ok(List {
            items,
            revision,
            more,
        })
    }

    async fn put(&self, key: &str, value: Vec<u8>, pre: Precondition) -> Result<KeyValue> {
        let op = Op::Put {
            key: key.into(),
            value,
            pre,
        };
        self.submit(op).await?.ok_or(Error::Closed)
    }

    async fn delete(&self, key: &str, pre: Precondition) -> Result<KeyValue> {
        self.submit(Op::Delete {
            key: key.into(),
            pre,
        })
        .await?
        .ok_or(Error::Closed)
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<mpsc::Receiver<Event>> {
        // Subscribe before reading history, so nothing falls between; duplicates are skipped
        // by revision.
        let mut live = self.events.subscribe();
        let r = self.db.begin_read().map_err(backend)?;
        let meta = r.open_table(META).map_err(backend)?;
        let current = meta
            .get(META_REV)
            .map_err(backend)?
            .map(|v| v.value())
            .unwrap_or(0);
        let compacted = meta
            .get(META_COMPACTED)
            .map_err(backend)?
            .map(|v| v.value())
            .unwrap_or(0);
        if from < compacted {
            return Err(Error::Compacted {
                requested: from,
                compacted,
            });
        }
        if from > current {
            return Err(Error::FutureRevision {
                requested: from,
                current,
            });
        }
        let log = r.open_table(LOG).map_err(backend)?;
        let mut history = vec![];
        for entry in log.range((from + 1) as u64..).map_err(backend)? {
            let (_, v) = entry.map_err(backend)?;
            let ev = dec_event(v.value())?;
            if ev.kv.key.starts_with(prefix) {
                history.push(ev);
            }
        }
        drop(log);
        drop(r);
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        let prefix = prefix.to_string();
        tokio::spawn(async move {
            let mut last = current.max(from);
            for ev in history {
                last = last.max(ev.revision());
                if tx.send(ev).await.is_err() {
                    return;
                }
            }
            loop {
                match live.recv().await {
                    Ok(ev) => {
                        if ev.revision() <= last || !ev.kv.key.starts_with(&prefix) {
                            continue;
                        }
                        last = ev.revision();
                        if tx.send((*ev).clone()).await.is_err() {
                            return;
                        }
                    }
                    // Too slow: end the watch; the client re-lists and watches again.
                    Err(broadcast::error::RecvError::Lagged(_)) => return,
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(rx)
    }

    async fn revision(&self) -> Result<Revision> {
        self.meta(META_REV)
    }

    async fn compact(&self, rev: Revision) -> Result<()> {
        self.submit(Op::Compact(rev)).await.map(|_| ())
    }

    async fn compacted(&self) -> Result<Revision> {
        self.meta(META_COMPACTED)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn change_log_entries_round_trip() {
        let kv = KeyValue {
            key: "/a".into(),
            value: b"v".to_vec(),
            create_revision: 2,
            mod_revision: 5,
        };
        for prev in [
            None,
            Some(KeyValue {
                mod_revision: 3,
                value: b"old".to_vec(),
                ..kv.clone()
            }),
        ] {
            let ev = Event {
                kind: EventKind::Put,
                kv: kv.clone(),
                prev,
            };
            assert_eq!(dec_event(&enc_event(&ev)).unwrap(), ev);
        }
        assert!(
            dec_event(&[0, 9, 0, 0, 0, b'x']).is_err(),
            "truncated entries are errors"
        );
    }

    fn open() -> (tempfile::TempDir, Embedded) {
        let d = tempfile::tempdir().unwrap();
        let s = Embedded::open(&d.path().join("db")).unwrap();
        (d, s)
    }

    #[tokio::test]
    async fn embedded_store_passes_the_storage_suite() {
        let (_d, s) = open();
        super::super::suite::run_all(&s).await;
    }

    #[tokio::test]
    async fn data_survives_reopening() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("db");
        let rev = {
            let s = Embedded::open(&path).unwrap();
            s.put("/k", b"1".to_vec(), Precondition::Absent)
                .await
                .unwrap();
            s.put("/k", b"2".to_vec(), Precondition::Exists)
                .await
                .unwrap()
                .mod_revision
        };
        // The writer thread of the first instance ends with its channel; reopen the file.
        let mut s = None;
        for _ in 0..50 {
            match Embedded::open(&path) {
                Ok(x) => {
                    s = Some(x);
                    break;
                }
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
            }
        }
        let s = s.expect("reopen");
        let kv = s.get("/k").await.unwrap().unwrap();
        assert_eq!((kv.value.as_slice(), kv.mod_revision), (&b"2"[..], rev));
        assert_eq!(s.revision().await.unwrap(), rev);
        let next = s
            .put("/j", b"x".to_vec(), Precondition::None)
            .await
            .unwrap();
        assert_eq!(
            next.mod_revision,
            rev + 1,
            "revisions continue after a restart"
        );
    }
}
