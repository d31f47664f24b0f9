//! The watch cache: one store watch per resource feeds an in-memory copy of its objects and a
//! bounded history of changes, from which the server answers lists and watches — so 100
//! watchers of pods are one watch on the storage engine (one etcd watch), not 100.
//!
//! Lists read the writes the server acknowledged: every write through the server records its
//! revision per resource, and a list waits (briefly) until the cache has applied the last one. A watch
//! from a revision replays the history after it, then follows live changes; a revision older
//! than the history is `Compacted` (410), one ahead of the cache waits for the cache to catch
//! up. When the store watch ends (the engine dropped a slow watcher, or compaction), the cache
//! lists again and carries on; its watchers' streams end, and they resume from their last
//! revision as any Kubernetes client does.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use tokio::sync::{broadcast, mpsc, watch};

use crate::store::{Error, Event, EventKind, KeyValue, List, Result, Revision, Store};

/// Changes kept per resource for watches that resume from an older revision.
const HISTORY: usize = 10_000;

struct Inner {
    objects: BTreeMap<String, KeyValue>,
    history: VecDeque<Arc<Event>>,
    /// The oldest revision a watch may start from.
    oldest: Revision,
}

/// The cache of one resource prefix.
pub struct WatchCache {
    inner: RwLock<Inner>,
    live: broadcast::Sender<Arc<Event>>,
    /// The revision applied so far.
    rev: watch::Sender<Revision>,
    /// Bumped by every relist: the watchers that follow the live stream end then (the changes
    /// between the end of the store watch and the relist reached neither the history nor them)
    /// and resume from their last revision.
    epoch: watch::Sender<u64>,
}

impl WatchCache {
    async fn start(store: Arc<dyn Store>, prefix: String) -> Result<Arc<WatchCache>> {
        let (live, _) = broadcast::channel(4096);
        let (rev, _) = watch::channel(0);
        let (epoch, _) = watch::channel(0);
        let c = Arc::new(WatchCache {
            inner: RwLock::new(Inner {
                objects: BTreeMap::new(),
                history: VecDeque::new(),
                oldest: 0,
            }),
            live,
            rev,
            epoch,
        });
        let rx = c.load(store.as_ref(), &prefix).await?;
        let cc = c.clone();
        tokio::spawn(async move { cc.follow(store, prefix, rx).await });
        Ok(c)
    }

    /// Lists the prefix into the cache and starts a store watch after it.
    async fn load(&self, store: &dyn Store, prefix: &str) -> Result<mpsc::Receiver<Event>> {
        let page = store.list(prefix, None, 0).await?;
        let rx = store.watch(prefix, page.revision).await?;
        let mut g = self.inner.write().map_err(|_| Error::Closed)?;
        g.objects = page
            .items
            .into_iter()
            .map(|kv| (kv.key.clone(), kv))
            .collect();
        g.history.clear();
        g.oldest = page.revision;
        self.epoch.send_modify(|e| *e += 1);
        drop(g);
        self.rev.send_replace(page.revision);
        Ok(rx)
    }

    async fn follow(
        self: Arc<Self>,
        store: Arc<dyn Store>,
        prefix: String,
        mut rx: mpsc::Receiver<Event>,
    ) {
        loop {
            while let Some(ev) = rx.recv().await {
                let rev = ev.revision();
                let ev = Arc::new(ev);
                if let Ok(mut g) = self.inner.write() {
                    match ev.kind {
                        EventKind::Put => {
                            g.objects.insert(ev.kv.key.clone(), ev.kv.clone());
                        }
                        EventKind::Delete => {
                            g.objects.remove(&ev.kv.key);
                        }
                    }
                    g.history.push_back(ev.clone());
                    if g.history.len() > HISTORY
                        && let Some(old) = g.history.pop_front()
                    {
                        g.oldest = old.revision();
                    }
                }
                let _ = self.live.send(ev);
                self.rev.send_replace(rev);
            }
            // The store watch ended: start over from a fresh list.
            tracing::debug!(%prefix, "watch cache relisting");
            loop {
                match self.load(store.as_ref(), &prefix).await {
                    Ok(r) => {
                        rx = r;
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(%prefix, error = %e, "watch cache relist failed");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        }
    }

    /// Waits until the cache has applied `rev` (up to 3 s).
    async fn wait_for(&self, rev: Revision) -> Result<()> {
        let mut rx = self.rev.subscribe();
        let r = tokio::time::timeout(Duration::from_secs(3), rx.wait_for(|r| *r >= rev)).await;
        match r {
            Ok(Ok(_)) => Ok(()),
            _ => Err(Error::FutureRevision {
                requested: rev,
                current: *self.rev.borrow(),
            }),
        }
    }
}

/// `/registry/<resource>/` of a storage key.
fn resource_prefix(key: &str) -> Option<&str> {
    let rest = key.strip_prefix("/registry/")?;
    let end = rest.find('/')?;
    Some(&key[..("/registry/".len() + end + 1)])
}

/// The revision of the last write this server made under each resource prefix.
type LastWrites = Arc<Mutex<HashMap<String, Revision>>>;

/// The store as the server's handlers use it: every write also records its revision, so that a
/// list from the cache can wait for the writes this server acknowledged (read-your-writes).
struct Recording {
    inner: Arc<dyn Store>,
    last: LastWrites,
}

impl Recording {
    fn note(&self, key: &str, rev: Revision) {
        if let (Some(p), Ok(mut m)) = (resource_prefix(key), self.last.lock()) {
            let e = m.entry(p.to_string()).or_insert(0);
            *e = (*e).max(rev);
        }
    }
}

#[async_trait::async_trait]
impl Store for Recording {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        self.inner.get(key).await
    }
    async fn list(&self, prefix: &str, start_after: Option<&str>, limit: usize) -> Result<List> {
        self.inner.list(prefix, start_after, limit).await
    }
    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        pre: crate::store::Precondition,
    ) -> Result<KeyValue> {
        let kv = self.inner.put(key, value, pre).await?;
        self.note(key, kv.mod_revision);
        Ok(kv)
    }
    async fn delete(&self, key: &str, pre: crate::store::Precondition) -> Result<KeyValue> {
        let kv = self.inner.delete(key, pre).await?;
        self.note(key, kv.mod_revision);
        Ok(kv)
    }
    async fn watch(&self, prefix: &str, from: Revision) -> Result<mpsc::Receiver<Event>> {
        self.inner.watch(prefix, from).await
    }
    async fn revision(&self) -> Result<Revision> {
        self.inner.revision().await
    }
    async fn compact(&self, rev: Revision) -> Result<()> {
        self.inner.compact(rev).await
    }
    async fn compacted(&self) -> Result<Revision> {
        self.inner.compacted().await
    }
}

/// The watch caches of the server, one per resource prefix, started on first use.
pub struct WatchCaches {
    store: Arc<dyn Store>,
    caches: Mutex<HashMap<String, Arc<WatchCache>>>,
    starting: tokio::sync::Mutex<()>,
    last: LastWrites,
}

impl WatchCaches {
    /// The caches over `store`, and the store the handlers must write through.
    pub fn new(store: Arc<dyn Store>) -> (Self, Arc<dyn Store>) {
        let last: LastWrites = Arc::default();
        let recording: Arc<dyn Store> = Arc::new(Recording {
            inner: store.clone(),
            last: last.clone(),
        });
        (
            WatchCaches {
                store,
                caches: Mutex::new(HashMap::new()),
                starting: tokio::sync::Mutex::new(()),
                last,
            },
            recording,
        )
    }

    async fn get(&self, resource_prefix: &str) -> Result<Arc<WatchCache>> {
        if let Some(c) = self
            .caches
            .lock()
            .map_err(|_| Error::Closed)?
            .get(resource_prefix)
        {
            return Ok(c.clone());
        }
        let _one = self.starting.lock().await;
        if let Some(c) = self
            .caches
            .lock()
            .map_err(|_| Error::Closed)?
            .get(resource_prefix)
        {
            return Ok(c.clone());
        }
        let c = WatchCache::start(self.store.clone(), resource_prefix.to_string()).await?;
        self.caches
            .lock()
            .map_err(|_| Error::Closed)?
            .insert(resource_prefix.to_string(), c.clone());
        Ok(c)
    }

    /// Like [`Store::list`], from the cache of `resource_prefix`, consistent with the store.
    pub async fn list(
        &self,
        resource_prefix: &str,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<List> {
        let c = self.get(resource_prefix).await?;
        let written = self
            .last
            .lock()
            .ok()
            .and_then(|m| m.get(resource_prefix).copied())
            .unwrap_or(0);
        c.wait_for(written).await?;
        let g = c.inner.read().map_err(|_| Error::Closed)?;
        let from = match start_after {
            Some(k) => std::ops::Bound::Excluded(k.to_string()),
            None => std::ops::Bound::Included(prefix.to_string()),
        };
        let mut items = vec![];
        let mut more = false;
        for (k, kv) in g.objects.range((from, std::ops::Bound::Unbounded)) {
            if !k.starts_with(prefix) {
                break;
            }
            if limit > 0 && items.len() == limit {
                more = true;
                break;
            }
            items.push(kv.clone());
        }
        Ok(List {
            items,
            revision: *c.rev.borrow(),
            more,
        })
    }

    /// Like [`Store::watch`], from the cache of `resource_prefix`.
    pub async fn watch(
        &self,
        resource_prefix: &str,
        prefix: &str,
        from: Revision,
    ) -> Result<mpsc::Receiver<Event>> {
        let c = self.get(resource_prefix).await?;
        if from > *c.rev.borrow() {
            let current = self.store.revision().await?;
            if from > current {
                return Err(Error::FutureRevision {
                    requested: from,
                    current,
                });
            }
            c.wait_for(from).await?;
        }
        // History the engine compacted is gone for watchers too (410), as with etcd: a watch
        // from before a change under `prefix` that compaction covers gets 410. One from a
        // later revision resumes from the cache, whose history holds every change after it,
        // even when the engine compacted past it because other resources (or namespaces) were
        // written since: a list answers with the revision of the resource's last change, a
        // bookmark with that of the watcher's last event, not the store's.
        let compacted = self.store.compacted().await?;
        // One look at the history decides and copies, so a relist cannot fall in between.
        let picked = {
            let g = c.inner.read().map_err(|_| Error::Closed)?;
            let n = g.history.partition_point(|e| e.revision() <= compacted);
            let gone = g
                .history
                .range(..n)
                .rev()
                .find(|e| e.kv.key.starts_with(prefix))
                .map(|e| e.revision());
            if gone.is_some_and(|gone| from < gone) {
                tracing::debug!(from, compacted, ?gone, "watch from a compacted revision");
                return Err(Error::Compacted {
                    requested: from,
                    compacted,
                });
            }
            if from < g.oldest {
                None
            } else {
                let replay: Vec<Arc<Event>> = g
                    .history
                    .iter()
                    .filter(|e| e.revision() > from && e.kv.key.starts_with(prefix))
                    .cloned()
                    .collect();
                // Subscribed under the lock: nothing applied after the copy is missed, and a
                // relist after it ends this watcher.
                Some((replay, c.live.subscribe(), c.epoch.subscribe()))
            }
        };
        let Some((replay, mut live, mut epoch)) = picked else {
            // Older than the cache's history: the engine may still have it (or says 410).
            return self.store.watch(prefix, from).await;
        };
        let (tx, rx) = mpsc::channel(1024);
        let prefix = prefix.to_string();
        tokio::spawn(async move {
            let mut last = from;
            for e in replay {
                last = e.revision();
                if tx.send((*e).clone()).await.is_err() {
                    return;
                }
            }
            loop {
                let e = tokio::select! {
                    e = live.recv() => e,
                    () = tx.closed() => return,
                    _ = epoch.changed() => return,
                };
                match e {
                    Ok(e) if e.revision() > last && e.kv.key.starts_with(&prefix) => {
                        last = e.revision();
                        if tx.send((*e).clone()).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    // Too slow for the live stream: end it; the client resumes from `last`.
                    Err(_) => return,
                }
            }
        });
        Ok(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Precondition, embedded::Embedded};

    #[tokio::test]
    async fn lists_and_watches_come_from_one_store_watch() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(Embedded::open(&dir.path().join("s.redb")).unwrap());
        let (caches, store) = WatchCaches::new(store);
        for i in 0..5 {
            store
                .put(
                    &format!("/registry/pods/a/p{i}"),
                    vec![i],
                    Precondition::None,
                )
                .await
                .unwrap();
        }
        store
            .put("/registry/pods/b/q", vec![9], Precondition::None)
            .await
            .unwrap();
        let all = caches
            .list("/registry/pods/", "/registry/pods/", None, 0)
            .await
            .unwrap();
        assert_eq!(all.items.len(), 6);
        let page = caches
            .list(
                "/registry/pods/",
                "/registry/pods/a/",
                Some("/registry/pods/a/p1"),
                2,
            )
            .await
            .unwrap();
        let keys: Vec<&str> = page.items.iter().map(|k| k.key.as_str()).collect();
        assert_eq!(keys, ["/registry/pods/a/p2", "/registry/pods/a/p3"]);
        assert!(page.more);
        // A write is visible to the very next list (consistent reads).
        let w = store
            .put("/registry/pods/a/p9", vec![1], Precondition::None)
            .await
            .unwrap();
        let l = caches
            .list("/registry/pods/", "/registry/pods/a/", None, 0)
            .await
            .unwrap();
        assert!(l.items.iter().any(|k| k.key == "/registry/pods/a/p9"));
        assert!(l.revision >= w.mod_revision);
        // A watch from an older revision replays what followed it, then goes live.
        let mut rx = caches
            .watch("/registry/pods/", "/registry/pods/a/", w.mod_revision - 1)
            .await
            .unwrap();
        assert_eq!(rx.recv().await.unwrap().kv.key, "/registry/pods/a/p9");
        store
            .put("/registry/pods/b/other", vec![1], Precondition::None)
            .await
            .unwrap();
        let d = store
            .delete("/registry/pods/a/p0", Precondition::None)
            .await
            .unwrap();
        let e = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!((e.kind, e.revision()), (EventKind::Delete, d.mod_revision));
        assert!(matches!(
            caches
                .watch("/registry/pods/", "/registry/pods/", 1_000_000)
                .await,
            Err(Error::FutureRevision { .. })
        ));
    }

    #[tokio::test]
    async fn a_listed_revision_stays_watchable_after_other_resources_compact_past_it() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(Embedded::open(&dir.path().join("s.redb")).unwrap());
        let (caches, store) = WatchCaches::new(store);
        let cms = "/registry/configmaps/";
        caches.list(cms, cms, None, 0).await.unwrap();
        let mut revs = vec![];
        for i in 0..2 {
            let kv = store
                .put(&format!("{cms}a/c{i}"), vec![i], Precondition::None)
                .await
                .unwrap();
            revs.push(kv.mod_revision);
        }
        let listed = caches.list(cms, cms, None, 0).await.unwrap().revision;
        assert_eq!(listed, revs[1]);
        // Other resources move the store on, and compaction follows them.
        for i in 0..3 {
            store
                .put(
                    &format!("/registry/leases/a/l{i}"),
                    vec![i],
                    Precondition::None,
                )
                .await
                .unwrap();
        }
        let now = store.revision().await.unwrap();
        assert!(now > listed);
        store.compact(now).await.unwrap();
        let w = store
            .put(&format!("{cms}a/c2"), vec![2], Precondition::None)
            .await
            .unwrap();
        let mut rx = caches
            .watch(cms, cms, listed)
            .await
            .expect("a watch from the listed revision resumes");
        let e = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (e.kv.key.as_str(), e.revision()),
            ("/registry/configmaps/a/c2", w.mod_revision)
        );
        // From before a change that compaction covers (c1): 410.
        match caches.watch(cms, cms, revs[0]).await {
            Err(Error::Compacted {
                requested,
                compacted,
            }) => assert_eq!((requested, compacted), (revs[0], now)),
            other => panic!("a watch from before c1 is Gone: {other:?}"),
        }
        // A watch of another namespace from the same revision misses nothing: no change of
        // its own was compacted after it (a namespaced watcher's bookmark lags like this).
        assert!(
            caches
                .watch(cms, &format!("{cms}b/"), revs[0])
                .await
                .is_ok()
        );
    }

    /// A store whose watches the test can cut, as the engine does to a slow watcher.
    struct Cuttable {
        inner: Arc<dyn Store>,
        cut: broadcast::Sender<()>,
    }

    #[async_trait::async_trait]
    impl Store for Cuttable {
        async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
            self.inner.get(key).await
        }
        async fn list(&self, prefix: &str, after: Option<&str>, limit: usize) -> Result<List> {
            self.inner.list(prefix, after, limit).await
        }
        async fn put(&self, key: &str, value: Vec<u8>, pre: Precondition) -> Result<KeyValue> {
            self.inner.put(key, value, pre).await
        }
        async fn delete(&self, key: &str, pre: Precondition) -> Result<KeyValue> {
            self.inner.delete(key, pre).await
        }
        async fn watch(&self, prefix: &str, from: Revision) -> Result<mpsc::Receiver<Event>> {
            let mut rx = self.inner.watch(prefix, from).await?;
            let mut cut = self.cut.subscribe();
            let (tx, out) = mpsc::channel(16);
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        e = rx.recv() => {
                            let Some(e) = e else { return };
                            if tx.send(e).await.is_err() {
                                return;
                            }
                        }
                        _ = cut.recv() => return,
                    }
                }
            });
            Ok(out)
        }
        async fn revision(&self) -> Result<Revision> {
            self.inner.revision().await
        }
        async fn compact(&self, rev: Revision) -> Result<()> {
            self.inner.compact(rev).await
        }
        async fn compacted(&self) -> Result<Revision> {
            self.inner.compacted().await
        }
    }

    #[tokio::test]
    async fn a_relist_ends_the_watchers_and_the_cache_follows_on() {
        let dir = tempfile::tempdir().unwrap();
        let inner: Arc<dyn Store> = Arc::new(Embedded::open(&dir.path().join("s.redb")).unwrap());
        let (cut, _) = broadcast::channel(1);
        let (caches, store) = WatchCaches::new(Arc::new(Cuttable {
            inner,
            cut: cut.clone(),
        }));
        let cms = "/registry/configmaps/";
        let listed = caches.list(cms, cms, None, 0).await.unwrap().revision;
        let mut rx = caches.watch(cms, cms, listed).await.unwrap();
        // The store watch ends: the cache lists again, and its watcher's stream ends (changes
        // may have fallen between) so that its client resumes.
        cut.send(()).unwrap();
        let end = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("the watcher's stream ends after the relist");
        assert!(end.is_none(), "{end:?}");
        let w = store
            .put(&format!("{cms}a/c1"), vec![1], Precondition::None)
            .await
            .unwrap();
        let mut rx = caches.watch(cms, cms, listed).await.unwrap();
        let e = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(e.revision(), w.mod_revision);
    }
}
