//! Owns persistence of API objects: a revisioned key-value store with compare-and-swap, range
//! by prefix, watch from a revision with bounded history, and compaction — the model etcd gives
//! Kubernetes. Never interprets values (the API server encodes objects); never serves HTTP.
//!
//! Every successful write gets the next global revision (the objects' resourceVersion). A key
//! remembers the revision that created it and the one that last modified it; writes may be
//! conditional on either. A watch from revision R delivers, in order, every change with a
//! revision above R, first from history and then live; history older than the compacted
//! revision is gone and asking for it is `Error::Compacted` (HTTP 410 Gone upstream).

pub mod embedded;
pub mod etcd;

use async_trait::async_trait;
use tokio::sync::mpsc;

/// A global, monotonically increasing store revision.
pub type Revision = i64;

/// One key with its value and revisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    pub create_revision: Revision,
    pub mod_revision: Revision,
}

/// What happened to a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

/// A change, as a watch delivers it. For a delete, `kv` is the value that was deleted, with
/// `mod_revision` set to the deleting revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    pub kv: KeyValue,
    /// The value before this change (none for a create).
    pub prev: Option<KeyValue>,
}

impl Event {
    pub fn revision(&self) -> Revision {
        self.kv.mod_revision
    }
}

/// The condition a write needs to hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precondition {
    /// Write unconditionally (create or replace).
    None,
    /// The key must not exist (create).
    Absent,
    /// The key must exist with exactly this mod revision (optimistic concurrency).
    ModRevision(Revision),
    /// The key must exist, whatever its revision.
    Exists,
}

/// A page of a range read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct List {
    pub items: Vec<KeyValue>,
    /// The store revision the page was read at.
    pub revision: Revision,
    /// More keys follow the last item.
    pub more: bool,
}

/// Storage errors, named after what went wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("key {0:?} already exists")]
    AlreadyExists(String),
    #[error("key {0:?} not found")]
    NotFound(String),
    #[error("conflict on {key:?}: expected revision {expected}, found {actual}")]
    Conflict {
        key: String,
        expected: Revision,
        actual: Revision,
    },
    #[error("revision {requested} has been compacted (oldest available {compacted})")]
    Compacted {
        requested: Revision,
        compacted: Revision,
    },
    #[error("revision {requested} is in the future (current {current})")]
    FutureRevision {
        requested: Revision,
        current: Revision,
    },
    #[error("storage backend: {0}")]
    Backend(String),
    #[error("storage is closed")]
    Closed,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A revisioned key-value store.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The key's current value.
    async fn get(&self, key: &str) -> Result<Option<KeyValue>>;
    /// Keys starting with `prefix`, in key order, after `start_after` (exclusive), at most
    /// `limit` (0 = all).
    async fn list(&self, prefix: &str, start_after: Option<&str>, limit: usize) -> Result<List>;
    /// Writes `value` under `key` if `pre` holds.
    async fn put(&self, key: &str, value: Vec<u8>, pre: Precondition) -> Result<KeyValue>;
    /// Deletes `key` if `pre` holds; returns the deleted value (mod_revision = deleting revision).
    async fn delete(&self, key: &str, pre: Precondition) -> Result<KeyValue>;
    /// Every change under `prefix` with a revision above `from`, in order, then live changes.
    /// The channel closes if the watcher falls too far behind (it must re-list).
    async fn watch(&self, prefix: &str, from: Revision) -> Result<mpsc::Receiver<Event>>;
    /// The latest revision.
    async fn revision(&self) -> Result<Revision>;
    /// Forgets history at and below `rev`.
    async fn compact(&self, rev: Revision) -> Result<()>;
    /// The oldest revision a watch may start from.
    async fn compacted(&self) -> Result<Revision>;
}

/// Checks a precondition against the current value of a key.
pub fn check(key: &str, current: Option<&KeyValue>, pre: Precondition) -> Result<()> {
    match (pre, current) {
        (Precondition::None, _) => Ok(()),
        (Precondition::Absent, None) => Ok(()),
        (Precondition::Absent, Some(_)) => Err(Error::AlreadyExists(key.into())),
        (Precondition::Exists | Precondition::ModRevision(_), None) => {
            Err(Error::NotFound(key.into()))
        }
        (Precondition::Exists, Some(_)) => Ok(()),
        (Precondition::ModRevision(r), Some(kv)) if kv.mod_revision == r => Ok(()),
        (Precondition::ModRevision(r), Some(kv)) => Err(Error::Conflict {
            key: key.into(),
            expected: r,
            actual: kv.mod_revision,
        }),
    }
}

#[cfg(test)]
pub(crate) mod suite;
