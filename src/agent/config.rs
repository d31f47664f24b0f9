//! The agent's configuration (from flags) and the paths it derives.

use std::{net::Ipv4Addr, path::PathBuf, time::Duration};

use ipnet::Ipv4Net;

use super::logs::Rotation;

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub node_name: String,
    pub pod_cidr: Ipv4Net,
    pub node_ip: Ipv4Addr,
    pub data_dir: PathBuf,
    pub log_dir: PathBuf,
    pub manifests: Option<PathBuf>,
    pub containerd: PathBuf,
    pub namespace: String,
    pub bridge: String,
    pub images_dir: PathBuf,
    /// Registry pulls: the node's registries.yaml, parallelism, progress deadline.
    pub pulls: super::images::PullConfig,
    /// When unused images are deleted.
    pub image_gc: super::image_gc::GcPolicy,
    pub rescan: Duration,
    pub resync: Duration,
    pub rotation: Rotation,
    /// The cluster to join (none: standalone).
    pub join: Option<super::cluster::Join>,
    /// Port of the kubelet API (0: off).
    pub kubelet_port: u16,
    /// Callers of the kubelet API with a certificate signed by this CA are authenticated
    /// (kubelet's `--client-ca-file`).
    pub client_ca_file: Option<PathBuf>,
    /// Resources held back from pods (allocatable = capacity − reserved).
    pub reserved: std::collections::BTreeMap<String, String>,
    /// Labels added to the Node when it registers (kubelet's --node-labels).
    pub node_labels: std::collections::BTreeMap<String, String>,
    /// exec/attach/port-forward streams with no traffic for this long are closed.
    pub stream_idle_timeout: Duration,
    /// Pod networking through CNI plugins (None: the built-in bridge and veths).
    pub cni: Option<crate::net::cni::Cni>,
    /// One containerd shim for every container on the node (`--shim-group node`) instead of
    /// one per pod.
    pub shim_per_node: bool,
    /// The node Lease's duration; renewed every quarter of it (kubelet: 40 s, every 10 s).
    pub node_lease: Duration,
    /// The service proxy, run in the agent in cluster mode (None: off).
    pub proxy: Option<crate::proxy::ProxyConfig>,
    /// The cluster's pod network (traffic leaving it is masqueraded), in cluster mode.
    pub cluster_cidr: Ipv4Net,
    /// The Service range, unreachable on the node so that untranslated VIPs go nowhere.
    pub service_cidr: Option<Ipv4Net>,
    /// The nameservers of pods with cluster DNS (kubelet's `--cluster-dns`; empty: none, and
    /// such pods get the node's resolver).
    pub cluster_dns: Vec<std::net::IpAddr>,
    /// The cluster domain (kubelet's `--cluster-domain`).
    pub cluster_domain: String,
    /// The node's resolv.conf: pods with dnsPolicy Default get it, and the cluster DNS
    /// forwards to its nameservers (None: `--resolv-conf ""`, no upstream at all).
    pub resolv_conf: Option<PathBuf>,
    /// This node answers the cluster DNS itself, on the `cluster_dns` addresses (None:
    /// another server does, e.g. CoreDNS).
    pub dns: Option<crate::dns::DnsConfig>,
}

impl AgentConfig {
    pub fn pods_dir(&self) -> PathBuf {
        self.data_dir.join("pods")
    }
    /// The node's certificates (client and kubelet serving) and keys.
    pub fn pki_dir(&self) -> PathBuf {
        self.data_dir.join("pki")
    }
    pub fn fifo_dir(&self) -> PathBuf {
        self.data_dir.join("fifo")
    }
    pub fn socket(&self) -> PathBuf {
        self.data_dir.join("agent.sock")
    }
    pub fn ipam_dir(&self) -> PathBuf {
        self.data_dir.join("ipam")
    }
}
