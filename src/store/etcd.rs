//! The `etcd` engine: the store on an etcd v3 cluster (the HA setup, several API servers on one
//! etcd). Keys are written as the API server names them (`/registry/<resource>/<ns>/<name>`),
//! revisions are etcd's, preconditions are etcd transactions, watches are etcd watches with
//! previous values. A watch stream that breaks (a member going away) is resumed from the last
//! revision it delivered, so callers see one unbroken sequence.

use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, DeleteOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    TxnOpResponse, WatchOptions,
};
use tokio::sync::mpsc;

use super::{Error, Event, EventKind, KeyValue, List, Precondition, Result, Revision, Store};

/// Where the revision of the last compaction is recorded (etcd itself does not report it
/// except by failing a watch). Outside `/registry/`, so no resource watch sees it.
const COMPACTED_KEY: &str = "/keelson/compacted";

/// Keys per range request when a list is read in chunks.
const LIST_CHUNK: usize = 500;

/// A store on an etcd cluster.
pub struct EtcdStore {
    client: Client,
}

fn backend(e: etcd_client::Error) -> Error {
    Error::Backend(format!("etcd: {e}"))
}

fn kv(k: &etcd_client::KeyValue) -> KeyValue {
    KeyValue {
        key: String::from_utf8_lossy(k.key()).into_owned(),
        value: k.value().to_vec(),
        create_revision: k.create_revision(),
        mod_revision: k.mod_revision(),
    }
}

/// The first key after every key starting with `prefix` (etcd's range end for a prefix).
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Whether an error is worth retrying on another member (connection trouble, leader change).
fn transient(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => matches!(
            s.code(),
            tonic::Code::Unavailable
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Unknown
                | tonic::Code::Cancelled
        ),
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        _ => false,
    }
}

impl EtcdStore {
    /// Connects to the cluster (`http://host:port` endpoints).
    pub async fn connect(endpoints: &[String]) -> Result<Self> {
        let opts = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3));
        let client = Client::connect(endpoints, Some(opts))
            .await
            .map_err(backend)?;
        let s = EtcdStore { client };
        s.revision().await?;
        Ok(s)
    }

    /// Runs `op` with a fresh client handle, retrying transient failures for up to ~10 s.
    async fn call<T, F, Fut>(&self, op: F) -> Result<T>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        Ok(self.call_retried(op).await?.0)
    }

    /// [`Self::call`], also telling whether an earlier attempt failed (and so may have been
    /// applied without an answer).
    async fn call_retried<T, F, Fut>(&self, op: F) -> Result<(T, bool)>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let mut delay = Duration::from_millis(50);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let mut retried = false;
        loop {
            match op(self.client.clone()).await {
                Ok(v) => return Ok((v, retried)),
                Err(e) if transient(&e) && tokio::time::Instant::now() < deadline => {
                    retried = true;
                    tracing::debug!(error = %e, "etcd call failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
                Err(e) => return Err(backend(e)),
            }
        }
    }

    /// The revision keelson last compacted at (0 if never), kept in [`COMPACTED_KEY`].
    async fn compacted_revision(&self) -> Result<Revision> {
        Ok(match self.get(COMPACTED_KEY).await? {
            Some(kv) => String::from_utf8_lossy(&kv.value).parse().unwrap_or(0),
            None => 0,
        })
    }

    /// The outcome of a conditional write whose condition failed: why.
    async fn explain(&self, key: &str, pre: Precondition) -> Error {
        let cur = match self.get(key).await {
            Ok(c) => c,
            Err(e) => return e,
        };
        match super::check(key, cur.as_ref(), pre) {
            Err(e) => e,
            // The key changed back between the transaction and this read: report the race.
            Ok(()) => Error::Conflict {
                key: key.into(),
                expected: match pre {
                    Precondition::ModRevision(r) => r,
                    _ => 0,
                },
                actual: cur.map(|c| c.mod_revision).unwrap_or(0),
            },
        }
    }
}

fn compare(key: &str, pre: Precondition) -> Vec<Compare> {
    match pre {
        Precondition::None => vec![],
        Precondition::Absent => vec![Compare::create_revision(key, CompareOp::Equal, 0)],
        Precondition::Exists => vec![Compare::create_revision(key, CompareOp::Greater, 0)],
        Precondition::ModRevision(r) => vec![Compare::mod_revision(key, CompareOp::Equal, r)],
    }
}

#[async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let key = key.to_string();
        let resp = self
            .call(|mut c| {
                let key = key.clone();
                async move { c.get(key, None).await }
            })
            .await?;
        Ok(resp.kvs().first().map(kv))
    }

    async fn list(&self, prefix: &str, start_after: Option<&str>, limit: usize) -> Result<List> {
        let end = prefix_end(prefix);
        let mut from = match start_after {
            Some(k) => format!("{k}\0"),
            None => prefix.to_string(),
        };
        // Read in chunks at one revision: gRPC messages are capped at 4 MiB, and a list of
        // 10,000 pods is larger than that.
        let mut items = Vec::new();
        let mut revision = 0;
        loop {
            let want = if limit == 0 {
                LIST_CHUNK
            } else {
                (limit - items.len()).min(LIST_CHUNK)
            };
            let resp = self
                .call(|mut c| {
                    let (from, end) = (from.clone(), end.clone());
                    async move {
                        let mut o = GetOptions::new().with_range(end).with_limit(want as i64);
                        if revision > 0 {
                            o = o.with_revision(revision);
                        }
                        c.get(from, Some(o)).await
                    }
                })
                .await?;
            if revision == 0 {
                revision = resp.header().map(|h| h.revision()).unwrap_or(0);
            }
            items.extend(resp.kvs().iter().map(kv));
            let more = resp.more();
            if !more || (limit > 0 && items.len() >= limit) {
                return Ok(List {
                    items,
                    revision,
                    more,
                });
            }
            let Some(last) = items.last() else {
                return Ok(List {
                    items,
                    revision,
                    more,
                });
            };
            from = format!("{}\0", last.key);
        }
    }

    async fn put(&self, key: &str, value: Vec<u8>, pre: Precondition) -> Result<KeyValue> {
        let k = key.to_string();
        let (resp, retried) = self
            .call_retried(|mut c| {
                let txn = Txn::new().when(compare(&k, pre)).and_then([TxnOp::put(
                    k.clone(),
                    value.clone(),
                    Some(PutOptions::new().with_prev_key()),
                )]);
                async move { c.txn(txn).await }
            })
            .await?;
        if !resp.succeeded() {
            // A retried attempt may find its own earlier, acknowledged-but-unanswered write
            // (API objects carry a uid, so an identical value is that write).
            if retried
                && let Ok(Some(cur)) = self.get(key).await
                && cur.value == value
            {
                return Ok(cur);
            }
            return Err(self.explain(key, pre).await);
        }
        let rev = resp.header().map(|h| h.revision()).unwrap_or(0);
        let prev_create = resp.op_responses().into_iter().find_map(|r| match r {
            TxnOpResponse::Put(p) => p.prev_key().map(|p| p.create_revision()),
            _ => None,
        });
        Ok(KeyValue {
            key: key.to_string(),
            value,
            create_revision: prev_create.unwrap_or(rev),
            mod_revision: rev,
        })
    }

    async fn delete(&self, key: &str, pre: Precondition) -> Result<KeyValue> {
        let k = key.to_string();
        let resp = self
            .call(|mut c| {
                let txn = Txn::new().when(compare(&k, pre)).and_then([TxnOp::delete(
                    k.clone(),
                    Some(DeleteOptions::new().with_prev_key()),
                )]);
                async move { c.txn(txn).await }
            })
            .await?;
        if !resp.succeeded() {
            return Err(self.explain(key, pre).await);
        }
        let rev = resp.header().map(|h| h.revision()).unwrap_or(0);
        let prev = resp.op_responses().into_iter().find_map(|r| match r {
            TxnOpResponse::Delete(d) => d.prev_kvs().first().map(kv),
            _ => None,
        });
        let mut prev = prev.ok_or_else(|| Error::NotFound(key.into()))?;
        prev.mod_revision = rev;
        Ok(prev)
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<mpsc::Receiver<Event>> {
        let current = self.revision().await?;
        if from > current {
            return Err(Error::FutureRevision {
                requested: from,
                current,
            });
        }
        let compacted = self.compacted_revision().await?;
        if from < compacted {
            return Err(Error::Compacted {
                requested: from,
                compacted,
            });
        }
        let (tx, rx) = mpsc::channel(1024);
        let client = self.client.clone();
        let prefix = prefix.to_string();
        tokio::spawn(async move { follow(client, prefix, from, tx).await });
        Ok(rx)
    }

    async fn revision(&self) -> Result<Revision> {
        let resp = self
            .call(
                |mut c| async move { c.get("\0", Some(GetOptions::new().with_count_only())).await },
            )
            .await?;
        Ok(resp.header().map(|h| h.revision()).unwrap_or(0))
    }

    async fn compact(&self, rev: Revision) -> Result<()> {
        self.call(|mut c| async move { c.compact(rev, None).await })
            .await?;
        self.put(
            COMPACTED_KEY,
            rev.to_string().into_bytes(),
            Precondition::None,
        )
        .await?;
        Ok(())
    }

    async fn compacted(&self) -> Result<Revision> {
        self.compacted_revision().await
    }
}

/// Streams changes under `prefix` above `from` into `tx`, resuming after stream failures until
/// the receiver goes away or history is compacted past the last delivered revision.
async fn follow(mut client: Client, prefix: String, mut from: Revision, tx: mpsc::Sender<Event>) {
    let mut failures = 0u32;
    loop {
        let opts = WatchOptions::new()
            .with_range(prefix_end(&prefix))
            .with_start_revision(from + 1)
            .with_prev_key();
        let mut stream = match client.watch(prefix.clone(), Some(opts)).await {
            Ok(s) => s,
            Err(e) => {
                failures += 1;
                if failures > 50 || tx.is_closed() {
                    tracing::warn!(error = %e, %prefix, "etcd watch gave up");
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        loop {
            let msg = tokio::select! {
                m = stream.message() => m,
                () = tx.closed() => {
                    drop(stream);
                    return;
                }
            };
            let resp = match msg {
                Ok(Some(r)) => r,
                Ok(None) | Err(_) => break,
            };
            if resp.compact_revision() > 0 || resp.canceled() {
                tracing::debug!(%prefix, reason = resp.cancel_reason(), "etcd watch canceled");
                return;
            }
            failures = 0;
            for e in resp.events() {
                let Some(cur) = e.kv() else { continue };
                let prev = e.prev_kv().map(kv);
                let ev = match e.event_type() {
                    EventType::Put => Event {
                        kind: EventKind::Put,
                        kv: kv(cur),
                        prev,
                    },
                    EventType::Delete => {
                        let mut gone = prev.clone().unwrap_or_else(|| kv(cur));
                        gone.mod_revision = cur.mod_revision();
                        Event {
                            kind: EventKind::Delete,
                            kv: gone,
                            prev,
                        }
                    }
                };
                from = ev.kv.mod_revision;
                if tx.send(ev).await.is_err() {
                    return;
                }
            }
        }
        failures += 1;
        if failures > 50 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use std::{
        net::TcpListener,
        process::{Child, Command, Stdio},
    };

    use super::*;

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    /// Members of an etcd cluster on loopback ports, in a temp dir, killed on drop.
    struct Cluster {
        _dir: tempfile::TempDir,
        members: Vec<Child>,
        clients: Vec<String>,
    }

    impl Cluster {
        fn start(n: usize) -> Cluster {
            let dir = tempfile::tempdir().unwrap();
            let peers: Vec<(String, u16, u16)> = (0..n)
                .map(|i| (format!("m{i}"), free_port(), free_port()))
                .collect();
            let initial: Vec<String> = peers
                .iter()
                .map(|(name, _, peer)| format!("{name}=http://127.0.0.1:{peer}"))
                .collect();
            let mut members = vec![];
            let mut clients = vec![];
            for (name, client, peer) in &peers {
                let c = format!("http://127.0.0.1:{client}");
                let p = format!("http://127.0.0.1:{peer}");
                let log = std::fs::File::create(dir.path().join(format!("{name}.log"))).unwrap();
                members.push(
                    Command::new("etcd")
                        .args(["--name", name, "--data-dir"])
                        .arg(dir.path().join(name))
                        .args(["--listen-client-urls", &c, "--advertise-client-urls", &c])
                        .args([
                            "--listen-peer-urls",
                            &p,
                            "--initial-advertise-peer-urls",
                            &p,
                        ])
                        .args(["--initial-cluster", &initial.join(",")])
                        .args(["--initial-cluster-state", "new", "--initial-cluster-token"])
                        .arg(dir.path().file_name().unwrap())
                        .stdout(Stdio::null())
                        .stderr(log)
                        .spawn()
                        .expect("etcd (Debian etcd-server) is installed"),
                );
                clients.push(c);
            }
            Cluster {
                _dir: dir,
                members,
                clients,
            }
        }

        async fn connect(&self) -> EtcdStore {
            let t0 = std::time::Instant::now();
            loop {
                match EtcdStore::connect(&self.clients).await {
                    Ok(s) => return s,
                    Err(e) if t0.elapsed() < Duration::from_secs(30) => {
                        let _ = e;
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Err(e) => panic!("etcd did not come up: {e}"),
                }
            }
        }
    }

    impl Drop for Cluster {
        fn drop(&mut self) {
            for m in &mut self.members {
                let _ = m.kill();
                let _ = m.wait();
            }
        }
    }

    #[tokio::test]
    async fn the_storage_suite_passes_on_one_etcd_member() {
        let c = Cluster::start(1);
        let s = c.connect().await;
        super::super::suite::run_all(&s).await;
    }

    /// Writes `key` once, through a failover: a request cut off while the members elect a new
    /// leader (the client's 5 s timeout) may or may not have been applied, so the key is looked
    /// up before the write is tried again, as any etcd client must. Within 30 s it is there.
    async fn put_through_failover(s: &EtcdStore, key: &str, v: Vec<u8>) -> KeyValue {
        let t0 = std::time::Instant::now();
        loop {
            match s.put(key, v.clone(), Precondition::Absent).await {
                Ok(kv) => return kv,
                Err(Error::Backend(_) | Error::AlreadyExists(_))
                    if t0.elapsed() < Duration::from_secs(30) =>
                {
                    if let Ok(Some(kv)) = s.get(key).await {
                        return kv;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("writes go on with two of three members: {e}"),
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_three_member_cluster_keeps_serving_with_one_member_killed() {
        let mut c = Cluster::start(3);
        let s = c.connect().await;
        let first = s
            .put("/ha/a", b"1".to_vec(), Precondition::Absent)
            .await
            .unwrap();
        let mut rx = s.watch("/ha/", first.mod_revision).await.unwrap();
        // Kill the first member (the one the client most likely talks to).
        c.members[0].kill().unwrap();
        c.members[0].wait().unwrap();
        let mut last = first.mod_revision;
        for i in 0..20 {
            let kv = put_through_failover(&s, &format!("/ha/k{i}"), vec![i]).await;
            assert!(kv.mod_revision > last);
            last = kv.mod_revision;
        }
        assert_eq!(s.list("/ha/", None, 0).await.unwrap().items.len(), 21);
        assert_eq!(s.get("/ha/a").await.unwrap().unwrap().value, b"1");
        // The watch carries on past the failure, every event once, in order.
        let mut seen = vec![];
        while seen.len() < 20 {
            let e = tokio::time::timeout(Duration::from_secs(15), rx.recv())
                .await
                .expect("watch event in time")
                .expect("watch open");
            seen.push(e.kv.key);
        }
        let want: Vec<String> = (0..20).map(|i| format!("/ha/k{i}")).collect();
        assert_eq!(seen, want);
    }
}
