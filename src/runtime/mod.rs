//! Owns every call to containerd: images (import, registry pulls, lookup), containers, tasks,
//! exec and events. Never touches the API server; callers hand it fully resolved configs (the
//! only network it reaches is a registry a pull names).

mod api;
pub mod container;
pub mod events;
#[cfg(test)]
pub(crate) mod fake;
pub mod image;
pub mod pack;
pub mod pull;
pub mod registries;
pub mod sandbox;
pub mod seccomp;
pub mod spec;

use std::path::{Path, PathBuf};

use containerd_client::services::v1::{
    containers_client::ContainersClient, content_client::ContentClient, diff_client::DiffClient,
    events_client::EventsClient, images_client::ImagesClient,
    introspection_client::IntrospectionClient, leases_client::LeasesClient,
    namespaces_client::NamespacesClient, snapshots::snapshots_client::SnapshotsClient,
    tasks_client::TasksClient, version_client::VersionClient,
};
use tonic::transport::Channel;

pub use api::Runtime;

/// Errors of the runtime layer, named after the operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Could not reach containerd's socket.
    #[error("connecting to containerd at {path}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: tonic::transport::Error,
    },
    /// A containerd RPC failed.
    #[error("containerd {op}: {}", .source.message())]
    Rpc {
        op: &'static str,
        #[source]
        source: tonic::Status,
    },
    /// The image is not in containerd's image store.
    #[error("image {0:?} is not present")]
    ImageNotFound(String),
    /// The reference is not a valid image name (kubelet's InvalidImageName).
    #[error("invalid image name {reference:?}: {reason}")]
    InvalidImageName { reference: String, reason: String },
    /// A registry pull failed; `reason` is in the registry's words.
    #[error("failed to pull and unpack image {reference:?}: {reason}")]
    Pull { reference: String, reason: String },
    /// An image archive or blob could not be understood.
    #[error("{what}: {reason}")]
    BadImage { what: String, reason: String },
    /// Local file I/O for the runtime (FIFOs, archives, rootfs).
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn rpc(op: &'static str) -> impl FnOnce(tonic::Status) -> Error {
        move |source| Error::Rpc { op, source }
    }
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let what = what.into();
        move |source| Error::Io { what, source }
    }
    pub(crate) fn bad(what: impl Into<String>, reason: impl std::fmt::Display) -> Error {
        Error::BadImage {
            what: what.into(),
            reason: reason.to_string(),
        }
    }
    /// True when containerd answered NotFound.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::Rpc { source, .. } if source.code() == tonic::Code::NotFound)
    }
}

/// The snapshotter every keelson container uses.
pub const SNAPSHOTTER: &str = "overlayfs";
/// containerd's runc shim.
pub const RUNC_RUNTIME: &str = "io.containerd.runc.v2";

/// A connection to containerd, bound to one containerd namespace.
#[derive(Clone)]
pub struct Containerd {
    channel: Channel,
    namespace: String,
    /// Resolved images by `name@manifest-digest` (content is immutable).
    pub(crate) image_cache:
        std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, image::ImageInfo>>>,
    /// Image sizes by target digest (content is immutable), so that listing the node's
    /// images every heartbeat reads each manifest once.
    pub(crate) image_sizes:
        std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, u64>>>,
}

impl Containerd {
    /// Connects to containerd's gRPC socket; `namespace` isolates this agent's objects.
    pub async fn connect(socket: &Path, namespace: &str) -> Result<Self> {
        let channel =
            containerd_client::connect(socket)
                .await
                .map_err(|source| Error::Connect {
                    path: socket.to_path_buf(),
                    source,
                })?;
        Ok(Self {
            channel,
            namespace: namespace.to_string(),
            image_cache: Default::default(),
            image_sizes: Default::default(),
        })
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Wraps a message in a request carrying the containerd namespace.
    pub(crate) fn req<T>(&self, msg: T) -> tonic::Request<T> {
        self.req_leased(msg, None)
    }

    /// Same as [`Self::req`], with a lease that protects new content from garbage collection.
    pub(crate) fn req_leased<T>(&self, msg: T, lease: Option<&str>) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        let md = req.metadata_mut();
        if let Ok(v) = self.namespace.parse() {
            md.insert("containerd-namespace", v);
        }
        if let Some(Ok(v)) = lease.map(str::parse) {
            md.insert("containerd-lease", v);
        }
        req
    }

    pub(crate) fn introspection(&self) -> IntrospectionClient<Channel> {
        IntrospectionClient::new(self.channel.clone())
    }
    pub(crate) fn containers(&self) -> ContainersClient<Channel> {
        ContainersClient::new(self.channel.clone())
    }
    pub(crate) fn tasks(&self) -> TasksClient<Channel> {
        TasksClient::new(self.channel.clone())
    }
    pub(crate) fn content(&self) -> ContentClient<Channel> {
        ContentClient::new(self.channel.clone())
    }
    pub(crate) fn snapshots(&self) -> SnapshotsClient<Channel> {
        SnapshotsClient::new(self.channel.clone())
    }
    pub(crate) fn diff(&self) -> DiffClient<Channel> {
        DiffClient::new(self.channel.clone())
    }
    pub(crate) fn images(&self) -> ImagesClient<Channel> {
        ImagesClient::new(self.channel.clone())
    }
    pub(crate) fn leases(&self) -> LeasesClient<Channel> {
        LeasesClient::new(self.channel.clone())
    }
    pub(crate) fn events(&self) -> EventsClient<Channel> {
        EventsClient::new(self.channel.clone())
    }

    /// Creates a lease named `prefix-<random>` that expires by itself after `ttl` (should this
    /// process die holding it): content and snapshots made under it are safe from garbage
    /// collection until [`Containerd::drop_lease`].
    pub(crate) async fn lease(&self, prefix: &str, ttl: std::time::Duration) -> Result<String> {
        let id = format!("{prefix}-{}", random_hex(6));
        let expire = jiff::Timestamp::now()
            .checked_add(jiff::SignedDuration::try_from(ttl).unwrap_or_default())
            .map(|t| t.to_string())
            .unwrap_or_default();
        self.leases()
            .create(self.req(containerd_client::services::v1::CreateRequest {
                id: id.clone(),
                labels: [("containerd.io/gc.expire".to_string(), expire)].into(),
            }))
            .await
            .map_err(Error::rpc("lease create"))?;
        Ok(id)
    }

    /// The IDs of the leases in this namespace.
    pub async fn lease_ids(&self) -> Result<Vec<String>> {
        let r = self
            .leases()
            .list(self.req(containerd_client::services::v1::ListRequest::default()))
            .await
            .map_err(Error::rpc("lease list"))?;
        Ok(r.into_inner().leases.into_iter().map(|l| l.id).collect())
    }

    /// Deletes a lease (what it protected is collectable again unless referenced).
    pub(crate) async fn drop_lease(&self, id: String) {
        let _ = self
            .leases()
            .delete(self.req(containerd_client::services::v1::DeleteRequest { id, sync: false }))
            .await;
    }

    /// Every containerd namespace (the lab's containerd is private to the lab, so all of them
    /// are the lab's nodes' and their extra agents').
    pub async fn namespaces(&self) -> Result<Vec<String>> {
        let r = NamespacesClient::new(self.channel.clone())
            .list(containerd_client::services::v1::ListNamespacesRequest::default())
            .await
            .map_err(Error::rpc("list namespaces"))?;
        Ok(r.into_inner()
            .namespaces
            .into_iter()
            .map(|n| n.name)
            .collect())
    }

    /// containerd's version string (for `containerRuntimeVersion`).
    pub async fn version(&self) -> Result<String> {
        let v = VersionClient::new(self.channel.clone())
            .version(())
            .await
            .map_err(Error::rpc("version"))?;
        Ok(v.into_inner().version)
    }
}

/// A random lowercase hex identifier of `bytes` bytes.
pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    // getrandom only fails when the kernel has no entropy source at all.
    getrandom::fill(&mut buf).expect("kernel random source");
    hex::encode(buf)
}

/// Creates `dir` (and its parents) and makes it `mode` (0700 for data, store and PKI
/// directories: they hold secrets no other local user may read).
pub fn private_dir(dir: &std::path::Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
}

/// Writes a secret file readable by root only: created 0600 (never wider, not even for a
/// moment), synced, then renamed over `path`.
pub fn write_private(path: &std::path::Path, content: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    std::io::Write::write_all(&mut f, content)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}
