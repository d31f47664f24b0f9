//! The pod network behind one trait, so the pod worker is the same whichever wires its pods:
//! the built-in bridge (a veth pair per pod on `keelson0`, addresses from the node's IPAM) or
//! standard CNI plugins. Unit tests use a recording fake.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use super::{
    NetError,
    cni::{Cni, CniError, PodRef},
    ipam::{Ipam, IpamError},
};

#[derive(Debug, thiserror::Error)]
pub enum PodNetError {
    #[error(transparent)]
    Address(#[from] IpamError),
    #[error("pod network: {0}")]
    Bridge(#[from] NetError),
    #[error("pod network (CNI): {0}")]
    Cni(#[from] CniError),
}

#[async_trait::async_trait]
pub trait PodNetwork: Send + Sync + 'static {
    /// The pod's address, reserved before its sandbox exists (the pod's files name it);
    /// None when the network hands it out on attach.
    fn reserve(&self, pod: &PodRef) -> Result<Option<Ipv4Addr>, PodNetError>;
    /// Wires sandbox `sandbox`, whose pause process is `pid`, into the network; the pod's
    /// address. Nothing is left behind on failure.
    async fn attach(
        &self,
        pod: &PodRef,
        sandbox: &str,
        pid: u32,
        reserved: Option<Ipv4Addr>,
    ) -> Result<Option<Ipv4Addr>, PodNetError>;
    /// Unwires a sandbox (`pid`: its pause process, if it still runs); with no sandbox, what
    /// is left of the pod's wiring. Failures are logged: the next detach tries again.
    async fn detach(&self, pod: &PodRef, sandbox: Option<&str>, pid: Option<u32>);
    /// The address of a sandbox that was running before the agent started (its wiring
    /// checked).
    fn adopt(&self, pod: &PodRef, sandbox: &str, pid: u32) -> Option<Ipv4Addr>;
    /// Frees the pod's address.
    fn release(&self, pod_uid: &str);
    /// The pods holding an address (UIDs), to free the leaked ones.
    fn holders(&self) -> Vec<String>;
}

/// The built-in network: the node bridge, a veth pair per pod, the node's IPAM.
pub struct Bridge {
    pub ipam: Ipam,
    pub bridge: String,
}

#[async_trait::async_trait]
impl PodNetwork for Bridge {
    fn reserve(&self, pod: &PodRef) -> Result<Option<Ipv4Addr>, PodNetError> {
        Ok(Some(self.ipam.allocate(&pod.uid)?))
    }

    async fn attach(
        &self,
        pod: &PodRef,
        _sandbox: &str,
        pid: u32,
        reserved: Option<Ipv4Addr>,
    ) -> Result<Option<Ipv4Addr>, PodNetError> {
        let Some(ip) = reserved else { return Ok(None) };
        let pn = super::PodNet {
            host_veth: super::host_veth_name(&pod.uid),
            ip,
            prefix: self.ipam.cidr().prefix_len(),
            gateway: self.ipam.gateway(),
            bridge: self.bridge.clone(),
        };
        if let Err(e) = super::setup_pod(pid, &pn).await {
            let _ = super::teardown_pod(&pn.host_veth).await;
            return Err(e.into());
        }
        Ok(Some(ip))
    }

    async fn detach(&self, pod: &PodRef, _sandbox: Option<&str>, _pid: Option<u32>) {
        let _ = super::teardown_pod(&super::host_veth_name(&pod.uid)).await;
    }

    fn adopt(&self, pod: &PodRef, _sandbox: &str, _pid: u32) -> Option<Ipv4Addr> {
        self.ipam.owned_by(&pod.uid).ok().flatten()
    }

    fn release(&self, pod_uid: &str) {
        if let Err(e) = self.ipam.release_owner(pod_uid) {
            tracing::warn!(error = %e, uid = pod_uid, "releasing pod IP");
        }
    }

    fn holders(&self) -> Vec<String> {
        self.ipam
            .allocations()
            .map(|a| a.into_iter().map(|(_, owner)| owner).collect())
            .unwrap_or_default()
    }
}

/// CNI plugins: the plugins' IPAM hands out addresses, ADD results are cached for DEL and
/// CHECK.
pub struct CniNetwork {
    pub cni: Cni,
    pub pod_cidr: Ipv4Net,
}

#[async_trait::async_trait]
impl PodNetwork for CniNetwork {
    fn reserve(&self, _pod: &PodRef) -> Result<Option<Ipv4Addr>, PodNetError> {
        Ok(None)
    }

    async fn attach(
        &self,
        pod: &PodRef,
        sandbox: &str,
        pid: u32,
        _reserved: Option<Ipv4Addr>,
    ) -> Result<Option<Ipv4Addr>, PodNetError> {
        Ok(self
            .cni
            .attach(self.pod_cidr, sandbox, pid, pod.clone())
            .await?)
    }

    async fn detach(&self, pod: &PodRef, sandbox: Option<&str>, pid: Option<u32>) {
        let Some(sandbox) = sandbox else { return };
        if let Err(e) = self
            .cni
            .detach(self.pod_cidr, sandbox, pid, pod.clone())
            .await
        {
            tracing::warn!(error = %e, uid = %pod.uid, "CNI DEL");
        }
    }

    fn adopt(&self, pod: &PodRef, sandbox: &str, pid: u32) -> Option<Ipv4Addr> {
        if let Err(e) = self.cni.check_pid(sandbox, pid, pod) {
            tracing::warn!(error = %e, uid = %pod.uid, "CNI CHECK of an adopted pod");
        }
        self.cni
            .cached(sandbox)
            .and_then(|(_, r)| super::cni::first_ipv4(&r))
    }

    fn release(&self, _pod_uid: &str) {}

    fn holders(&self) -> Vec<String> {
        vec![]
    }
}

#[cfg(test)]
pub(crate) mod fake {
    use std::sync::Mutex;

    use super::*;

    /// Hands out 10.88.0.2, .3, … and records every call as a line (`attach NAME`, …) in a
    /// log it may share with other fakes.
    pub(crate) struct FakeNetwork {
        log: std::sync::Arc<Mutex<Vec<String>>>,
        next: Mutex<u8>,
        held: Mutex<Vec<String>>,
        /// Adoption finds no record of any address (a lost IPAM entry).
        pub(crate) forgets: std::sync::atomic::AtomicBool,
    }

    impl FakeNetwork {
        pub(crate) fn new(log: std::sync::Arc<Mutex<Vec<String>>>) -> Self {
            Self {
                log,
                next: Mutex::new(0),
                held: Mutex::new(vec![]),
                forgets: Default::default(),
            }
        }

        fn record(&self, line: String) {
            self.log.lock().unwrap().push(line);
        }
    }

    #[async_trait::async_trait]
    impl PodNetwork for FakeNetwork {
        fn reserve(&self, pod: &PodRef) -> Result<Option<Ipv4Addr>, PodNetError> {
            self.record(format!("reserve {}", pod.name));
            let mut n = self.next.lock().unwrap();
            *n += 1;
            self.held.lock().unwrap().push(pod.uid.clone());
            Ok(Some(Ipv4Addr::new(10, 88, 0, 1 + *n)))
        }
        async fn attach(
            &self,
            pod: &PodRef,
            _sandbox: &str,
            _pid: u32,
            reserved: Option<Ipv4Addr>,
        ) -> Result<Option<Ipv4Addr>, PodNetError> {
            self.record(format!("attach {}", pod.name));
            Ok(reserved)
        }
        async fn detach(&self, pod: &PodRef, sandbox: Option<&str>, _pid: Option<u32>) {
            let what = if sandbox.is_some() { "sandbox" } else { "rest" };
            self.record(format!("detach {} {what}", pod.name));
        }
        fn adopt(&self, pod: &PodRef, _sandbox: &str, _pid: u32) -> Option<Ipv4Addr> {
            self.record(format!("adopt {}", pod.name));
            let forgets = self.forgets.load(std::sync::atomic::Ordering::Relaxed);
            (!forgets).then_some(Ipv4Addr::new(10, 88, 0, 200))
        }
        fn release(&self, pod_uid: &str) {
            self.record("release".into());
            self.held.lock().unwrap().retain(|u| u != pod_uid);
        }
        fn holders(&self) -> Vec<String> {
            self.held.lock().unwrap().clone()
        }
    }
}
