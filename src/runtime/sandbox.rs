//! The pod sandbox: the pause container that holds the pod's namespaces, wired to the pod
//! network. The worker decides when; this is how.

use std::{collections::HashMap, net::Ipv4Addr, path::PathBuf};

use super::{Runtime, container::CreateOpts, image::ImageInfo};
use crate::net::{
    cni::PodRef,
    pod_network::{PodNetError, PodNetwork},
};

/// A sandbox failed to come up (shown as the pod's waiting reason and message, and retried
/// with back-off).
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("{}: {source}", path.display())]
    Files {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Spec(#[from] super::spec::SpecError),
    #[error(transparent)]
    Runtime(super::Error),
    #[error(transparent)]
    Network(#[from] PodNetError),
    /// What the pod asks for cannot be made (e.g. a host name too long for the kernel).
    #[error("{0}")]
    Pod(String),
}

/// The sandbox to make.
pub struct SandboxSpec<'a> {
    pub id: &'a str,
    pub pod: &'a PodRef,
    pub pause: &'a ImageInfo,
    pub spec: &'a oci_spec::runtime::Spec,
    pub labels: HashMap<String, String>,
    /// The pause joins the node's network namespace: there is nothing to wire.
    pub host_network: bool,
    /// The address the network reserved for the pod, if any.
    pub reserved: Option<Ipv4Addr>,
}

/// Creates and starts the pause container, then wires its network namespace: (pause pid,
/// pod address). On failure the pause container is removed again.
pub async fn create(
    rt: &dyn Runtime,
    net: &dyn PodNetwork,
    s: SandboxSpec<'_>,
) -> Result<(u32, Option<Ipv4Addr>), SandboxError> {
    rt.create(CreateOpts {
        id: s.id,
        image: s.pause,
        spec: s.spec,
        labels: s.labels,
        stdio: Default::default(),
    })
    .await
    .map_err(SandboxError::Runtime)?;
    let wired = match rt.start(s.id).await {
        Ok(pid) if s.host_network => Ok((pid, None)),
        Ok(pid) => net
            .attach(s.pod, s.id, pid, s.reserved)
            .await
            .map(|ip| (pid, ip))
            .map_err(SandboxError::from),
        Err(e) => Err(SandboxError::Runtime(e)),
    };
    if wired.is_err()
        && let Err(e) = rt.delete(s.id).await
    {
        tracing::warn!(container = s.id, error = %e, "removing a failed sandbox");
    }
    wired
}
