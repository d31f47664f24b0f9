//! keelson's command line: parses flags and starts the roles. Nothing else.

use std::{
    io::{Read, Write},
    net::Ipv4Addr,
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use keelson::{
    agent::{self, AgentConfig, logs::Rotation},
    runtime::pack::{self, ImageSettings},
};

#[cfg(feature = "server")]
mod up;

#[derive(Parser)]
#[command(
    name = "keelson",
    version,
    about = "A Kubernetes node agent with a thin control plane, in one binary"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[cfg(feature = "server")]
/// Leader election timings (client-go's defaults).
#[derive(clap::Args, Clone, Copy)]
struct ElectionArgs {
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    leader_elect_lease_duration: std::time::Duration,
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    leader_elect_renew_deadline: std::time::Duration,
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    leader_elect_retry_period: std::time::Duration,
}

#[cfg(feature = "server")]
/// Settings of the controllers (kube-controller-manager's flags).
#[derive(clap::Args, Clone, Copy)]
struct ControllerArgs {
    /// How long a node may stay silent (no Lease renewal) before it turns Ready=Unknown.
    #[arg(long, default_value = "50s", value_parser = parse_duration)]
    node_monitor_grace_period: std::time::Duration,
    /// The pod network that node IPAM cuts into per-node blocks.
    #[arg(long, default_value = "10.244.0.0/16")]
    cluster_cidr: ipnet::Ipv4Net,
    /// Prefix length of each node's pod CIDR.
    #[arg(long, default_value = "24")]
    node_cidr_mask_size: u8,
    /// A test clock for the CronJob controller: its time runs this many times faster than
    /// the real one (60: a minute a second).
    #[arg(long, default_value = "1", hide = true)]
    cronjob_time_scale: u32,
}

#[cfg(feature = "server")]
impl ControllerArgs {
    fn options(self) -> anyhow::Result<keelson::controllers::Options> {
        anyhow::ensure!(
            self.node_cidr_mask_size >= self.cluster_cidr.prefix_len()
                && self.node_cidr_mask_size <= 30,
            "--node-cidr-mask-size {} must be between the --cluster-cidr prefix ({}) and 30",
            self.node_cidr_mask_size,
            self.cluster_cidr.prefix_len()
        );
        anyhow::ensure!(
            (1..=3600).contains(&self.cronjob_time_scale),
            "--cronjob-time-scale {} must be between 1 and 3600",
            self.cronjob_time_scale
        );
        Ok(keelson::controllers::Options {
            node: keelson::controllers::node::Options {
                grace: self.node_monitor_grace_period,
                cluster_cidr: self.cluster_cidr.trunc(),
                node_prefix: self.node_cidr_mask_size,
            },
            cron_clock: keelson::controllers::cronjob::Clock::scaled(self.cronjob_time_scale),
        })
    }
}

#[cfg(feature = "server")]
impl ElectionArgs {
    fn config(self) -> keelson::control::leader::Config {
        keelson::control::leader::Config {
            lease_duration: self.leader_elect_lease_duration,
            renew_deadline: self.leader_elect_renew_deadline,
            retry_period: self.leader_elect_retry_period,
        }
    }
}

#[derive(Subcommand)]
enum Cmd {
    #[cfg(feature = "server")]
    /// A whole single-node cluster in one process: API server (embedded store), scheduler,
    /// controllers and the agent with its service proxy; starts a private containerd when none
    /// answers. Prints the kubeconfig; Ctrl-C stops it, running it again reuses DATA_DIR.
    Up(up::UpArgs),
    #[cfg(feature = "server")]
    /// Removes what `keelson up` left running: the pods' containers, their network, the
    /// service rules; with --purge also the data directory.
    Down(up::DownArgs),
    /// Run the node agent (kubelet). With --standalone it runs static pods without an API server.
    Agent(Box<AgentArgs>),
    /// Run the service proxy alone (kube-proxy's job), e.g. as a DaemonSet.
    Proxy(ProxyArgs),
    #[cfg(feature = "server")]
    /// Run the API server (HTTPS, embedded store). Writes DATA_DIR/kubeconfig.yaml.
    Server {
        #[arg(long, default_value = "/var/lib/keelson")]
        data_dir: PathBuf,
        /// Address to serve HTTPS on.
        #[arg(long, default_value = "127.0.0.1:6443")]
        listen: std::net::SocketAddr,
        /// Another name or address for the serving certificate (repeatable), e.g. the address
        /// agents use to reach this server.
        #[arg(long)]
        tls_san: Vec<String>,
        /// Also serve on this inherited, listening TCP socket (repeatable): how `keelson lab`
        /// makes a server that lives in the lab's namespace reachable on the host's loopback.
        #[arg(long)]
        listen_fd: Vec<i32>,
        /// ClusterIP range of Services.
        #[arg(long, default_value = "10.96.0.0/12")]
        service_cidr: String,
        /// NodePort range, LOW-HIGH.
        #[arg(long, default_value = "30000-32767")]
        service_node_port_range: String,
        /// Storage engine: the embedded database, or an etcd v3 cluster.
        #[arg(long, default_value = "embedded", value_parser = ["embedded", "etcd"])]
        store: String,
        /// etcd client URLs, comma-separated (with --store etcd).
        #[arg(long, value_delimiter = ',', default_value = "http://127.0.0.1:2379")]
        etcd_endpoints: Vec<String>,
        /// How often history older than one interval is compacted (e.g. 300s, 5m).
        #[arg(long, default_value = "5m", value_parser = parse_duration)]
        compaction_interval: std::time::Duration,
        /// Serve the API only: do not run the scheduler and controllers in this process.
        #[arg(long)]
        no_controllers: bool,
        /// Longest lifetime of a certificate the server signs for a CertificateSigningRequest
        /// (kube-controller-manager's flag of the same name); agents renew at 80 %.
        #[arg(long, default_value = "8760h", value_parser = parse_duration)]
        cluster_signing_duration: std::time::Duration,
        #[command(flatten)]
        election: ElectionArgs,
        #[command(flatten)]
        nodes: ControllerArgs,
        /// Seconds new pods tolerate a not-ready node (DefaultTolerationSeconds).
        #[arg(long, default_value = "300")]
        default_not_ready_toleration_seconds: i64,
        /// Seconds new pods tolerate an unreachable node (DefaultTolerationSeconds).
        #[arg(long, default_value = "300")]
        default_unreachable_toleration_seconds: i64,
    },
    #[cfg(feature = "server")]
    /// A multi-node cluster on this host, each node in its own network namespace.
    Lab {
        #[command(subcommand)]
        cmd: LabCmd,
    },
    #[cfg(feature = "server")]
    /// Run the scheduler alone against an API server (several may stand by for each other).
    Scheduler {
        #[arg(long)]
        kubeconfig: PathBuf,
        #[command(flatten)]
        election: ElectionArgs,
    },
    #[cfg(feature = "server")]
    /// Run the controllers alone against an API server (several may stand by for each other).
    Controllers {
        #[arg(long)]
        kubeconfig: PathBuf,
        #[command(flatten)]
        election: ElectionArgs,
        #[command(flatten)]
        nodes: ControllerArgs,
    },
    /// Build and load container images offline.
    Image {
        #[command(subcommand)]
        cmd: ImageCmd,
    },
    /// List the agent's pods (from its local API) as a kubectl-like table.
    Pods {
        #[arg(long, default_value = "/var/lib/keelson")]
        data_dir: PathBuf,
        /// Print the PodList as JSON instead of a table.
        #[arg(short, long)]
        json: bool,
    },
    /// Print a container's log from the agent's local API.
    Logs {
        /// NAMESPACE/POD or POD (namespace default).
        pod: String,
        /// Container name.
        container: String,
        #[arg(long, default_value = "/var/lib/keelson")]
        data_dir: PathBuf,
        #[arg(long)]
        previous: bool,
        #[arg(long)]
        tail: Option<usize>,
    },
}

#[derive(clap::Args)]
struct ProxyArgs {
    /// Remove every rule and chain the proxy installed, then exit.
    #[arg(long)]
    cleanup: bool,
    /// The cluster's kubeconfig (default: in-cluster configuration, as a pod).
    #[arg(long, conflicts_with = "server")]
    kubeconfig: Option<PathBuf>,
    /// The API server URL, with --token-file (the node token) and --ca-file.
    #[arg(long, requires_all = ["token_file", "ca_file"])]
    server: Option<String>,
    #[arg(long)]
    token_file: Option<PathBuf>,
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// This node's name (default: the hostname): decides which endpoints are local.
    #[arg(long)]
    node_name: Option<String>,
    #[command(flatten)]
    proxy: ProxyFlags,
}

#[derive(clap::Args, Clone)]
struct ProxyFlags {
    /// How Services are programmed: nftables, iptables, none, or auto (nftables where the
    /// kernel takes nf_tables transactions, else iptables).
    #[arg(long, default_value = "auto")]
    proxy_mode: String,
    /// The cluster's pod network (traffic to a ClusterIP from outside it is masqueraded).
    #[arg(long = "proxy-cluster-cidr", default_value = "10.244.0.0/16")]
    proxy_cluster_cidr: ipnet::Ipv4Net,
    /// Changes within this window are applied together.
    #[arg(long, default_value = "50ms", value_parser = parse_duration)]
    min_sync_period: std::time::Duration,
    /// Full resync (repairs removed rules) at least this often.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    sync_period: std::time::Duration,
    /// Serve kube-proxy's /healthz on this port (0: off; kube-proxy uses 10256).
    #[arg(long, default_value_t = 0)]
    healthz_port: u16,
}

impl ProxyFlags {
    fn config(&self, node_name: &str) -> anyhow::Result<Option<keelson::proxy::ProxyConfig>> {
        if self.proxy_mode == "none" {
            return Ok(None);
        }
        let mode = match self.proxy_mode.as_str() {
            "auto" => keelson::proxy::Mode::detect(),
            m => m
                .parse::<keelson::proxy::Mode>()
                .map_err(anyhow::Error::msg)?,
        };
        Ok(Some(keelson::proxy::ProxyConfig {
            node_name: node_name.to_string(),
            cluster_cidr: self.proxy_cluster_cidr.trunc(),
            mode,
            min_sync_period: self.min_sync_period,
            sync_period: self.sync_period,
            healthz_port: (self.healthz_port != 0).then_some(self.healthz_port),
            local_vips: vec![],
        }))
    }
}

fn node_name_or_host(n: Option<String>) -> anyhow::Result<String> {
    Ok(match n {
        Some(n) => n,
        None => nix::unistd::gethostname()?.to_string_lossy().to_lowercase(),
    })
}

#[derive(clap::Args)]
struct AgentArgs {
    /// Run static pods only, with no API server.
    #[arg(long)]
    standalone: bool,
    /// Join the cluster with this kubeconfig.
    #[arg(long, conflicts_with_all = ["standalone", "server"])]
    kubeconfig: Option<PathBuf>,
    /// Join the cluster at this API server URL (with --token-file and --ca-file).
    #[arg(long, requires_all = ["token_file", "ca_file"], conflicts_with = "standalone")]
    server: Option<String>,
    /// The cluster's node token (the server's DATA_DIR/node-token).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// The API server's CA certificate (the server's DATA_DIR/pki/ca.crt).
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// Port of the kubelet API (HTTPS; 0 turns it off).
    #[arg(long, default_value_t = 10250)]
    kubelet_port: u16,
    /// Authenticate kubelet API callers whose client certificate this CA signed (kubelet's
    /// flag; the API server presents its kubelet-client certificate). Default as a pod: the
    /// service account's ca.crt.
    #[arg(long)]
    client_ca_file: Option<std::path::PathBuf>,
    /// The service proxy in the agent (cluster mode).
    #[command(flatten)]
    proxy: ProxyFlags,
    /// Resources held back from pods, e.g. cpu=100m,memory=256Mi (allocatable = capacity − this).
    #[arg(long, default_value = "", value_parser = keelson::agent::cluster::parse_reserved)]
    reserved: std::collections::BTreeMap<String, String>,
    /// Labels for the Node, e.g. node.keelson.dev/extra=true,tier=edge (kubelet's flag).
    #[arg(long, default_value = "", value_parser = keelson::agent::cluster::parse_node_labels)]
    node_labels: std::collections::BTreeMap<String, String>,
    /// The node Lease's duration (kubelet's nodeLeaseDurationSeconds); it is renewed every
    /// quarter of it. Keep it above the controller's --node-monitor-grace-period ÷ 1.25.
    #[arg(long, default_value = "40s", value_parser = parse_duration)]
    node_lease_duration: std::time::Duration,
    /// Pod networking: the built-in bridge and veths, or standard CNI plugins.
    #[arg(long, default_value = "builtin", value_parser = ["builtin", "cni"])]
    network: String,
    /// CNI network configs (with --network cni): the first *.conflist / *.conf is used.
    #[arg(long, default_value = "/etc/cni/net.d")]
    cni_conf_dir: PathBuf,
    /// Where CNI plugins are looked up (with --network cni), colon-separated.
    #[arg(long, default_value = "/usr/lib/cni:/opt/cni/bin")]
    cni_bin_dir: String,
    /// Close exec, attach and port-forward streams idle for this long (kubelet's default).
    #[arg(long, default_value = "4h", value_parser = parse_duration)]
    streaming_connection_idle_timeout: std::time::Duration,
    /// Directory of static pod manifests.
    #[arg(long)]
    manifests: Option<PathBuf>,
    /// This node's name (default: the hostname).
    #[arg(long)]
    node_name: Option<String>,
    /// The pod address range of this node, e.g. 10.244.1.0/24.
    #[arg(long, default_value = "10.244.0.0/24")]
    pod_cidr: String,
    /// The node's own address (default: the bridge address).
    #[arg(long)]
    node_ip: Option<Ipv4Addr>,
    /// The cluster's pod network: pod traffic leaving it is masqueraded (cluster mode).
    #[arg(long, default_value = "10.244.0.0/16")]
    cluster_cidr: ipnet::Ipv4Net,
    /// The Service range, unreachable on the node (cluster mode; "" for none).
    #[arg(long, default_value = "10.96.0.0/12")]
    service_cidr: String,
    #[arg(long, default_value = "/var/lib/keelson")]
    data_dir: PathBuf,
    /// Where container logs go (CRI format).
    #[arg(long, default_value = "/var/log/pods")]
    log_dir: PathBuf,
    /// containerd's socket.
    #[arg(long, default_value = "/run/containerd/containerd.sock")]
    containerd: PathBuf,
    /// The containerd namespace for this node's containers.
    #[arg(long, default_value = "k8s.keelson.io")]
    containerd_namespace: String,
    /// Name of the node bridge.
    #[arg(long, default_value = "keelson0")]
    bridge: String,
    /// Which containers share a containerd shim: each pod's (as the CRI plugin groups them)
    /// or every container on the node (one shim process: less memory and faster pod starts,
    /// but a shim that dies takes the node's task management with it).
    #[arg(long, default_value = "pod", value_parser = ["pod", "node"])]
    shim_group: String,
    /// Directory of image tarballs imported at start (default: DATA_DIR/images).
    #[arg(long)]
    images: Option<PathBuf>,
    /// The node's registry configuration: mirrors and credentials/TLS per registry, in
    /// k3s's registries.yaml format (a missing file is no configuration).
    #[arg(long, default_value = "/etc/keelson/registries.yaml")]
    registry_config: PathBuf,
    /// Pull one image at a time (kubelet's flag).
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    serialize_image_pulls: bool,
    /// At most this many pulls at once (0: no limit).
    #[arg(long, default_value_t = 0)]
    max_parallel_image_pulls: usize,
    /// Image GC starts when the image filesystem is this full (percent).
    #[arg(long, default_value_t = 85, value_parser = clap::value_parser!(u8).range(0..=100))]
    image_gc_high_threshold: u8,
    /// Image GC frees space until the image filesystem is under this (percent).
    #[arg(long, default_value_t = 80, value_parser = clap::value_parser!(u8).range(0..=100))]
    image_gc_low_threshold: u8,
    /// Unused images younger than this are kept.
    #[arg(long, default_value = "2m", value_parser = parse_duration)]
    minimum_image_ttl_duration: std::time::Duration,
    /// How often image GC checks the image filesystem (kubelet: 5 min).
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    image_gc_period: std::time::Duration,
    /// Cancel a pull whose transfer makes no progress for this long.
    #[arg(long, default_value = "1m", value_parser = parse_duration)]
    image_pull_progress_deadline: std::time::Duration,
    /// Seconds between manifest rescans (file events are also watched).
    #[arg(long, default_value_t = 20)]
    rescan_seconds: u64,
    /// Seconds between pod relists against containerd.
    #[arg(long, default_value_t = 10)]
    resync_seconds: u64,
    /// Rotate a container log when it exceeds this many bytes.
    #[arg(long, default_value_t = 10 << 20)]
    container_log_max_size: u64,
    /// Rotated log files kept per container.
    #[arg(long, default_value_t = 5)]
    container_log_max_files: usize,
    /// Nameservers of pods with cluster DNS (kubelet's flag), comma-separated; "auto": the
    /// tenth address of --service-cidr when the agent joins a cluster, none standalone;
    /// "": none (such pods get the node's resolver).
    #[arg(long, default_value = "auto")]
    cluster_dns: String,
    /// The cluster domain (kubelet's flag).
    #[arg(long, default_value = "cluster.local")]
    cluster_domain: String,
    /// The node's resolver configuration: what dnsPolicy Default pods get and where the
    /// cluster DNS forwards other names ("": none).
    #[arg(long, default_value = "/etc/resolv.conf")]
    resolv_conf: String,
    /// Answer the cluster DNS on this node, on the --cluster-dns addresses (turn off where
    /// another server, e.g. CoreDNS, answers them).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    serve_cluster_dns: bool,
    /// TTL of cluster DNS records, in seconds.
    #[arg(long, default_value_t = 5)]
    cluster_dns_ttl: u32,
}

#[cfg(feature = "server")]
#[derive(clap::Args)]
struct LabWhich {
    /// The lab's name (prefix of its namespaces and nodes).
    #[arg(long, default_value = "lab")]
    name: String,
    /// The lab's directory (default: /var/lib/keelson/lab/NAME).
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

#[cfg(feature = "server")]
impl LabWhich {
    fn dir(&self) -> anyhow::Result<PathBuf> {
        keelson::lab::check_name(&self.name)?;
        Ok(self
            .data_dir
            .clone()
            .unwrap_or_else(|| keelson::lab::default_dir(&self.name)))
    }
}

#[cfg(feature = "server")]
#[derive(Subcommand)]
enum LabCmd {
    /// Create the lab and return when every node is Ready (prints the kubeconfig to use).
    Up {
        #[command(flatten)]
        which: LabWhich,
        /// Number of nodes.
        #[arg(long, default_value_t = 2)]
        nodes: usize,
        /// Directory of image tarballs every node imports.
        #[arg(long)]
        images: Option<PathBuf>,
        /// Port of the API server on the host's loopback (0: any free port).
        #[arg(long, default_value_t = 0)]
        port: u16,
        /// An extra flag for the server (repeatable), e.g. --server-arg=--node-monitor-grace-period=20s.
        #[arg(long, allow_hyphen_values = true)]
        server_arg: Vec<String>,
        /// An extra flag for every agent (repeatable).
        #[arg(long, allow_hyphen_values = true)]
        agent_arg: Vec<String>,
        /// Every node's registry configuration (k3s's registries.yaml format).
        #[arg(long)]
        registry_config: Option<PathBuf>,
        /// An upstream DNS server for the nodes' cluster DNS (repeatable; default: none, so
        /// names outside the cluster do not resolve).
        #[arg(long)]
        dns_upstream: Vec<std::net::IpAddr>,
        /// How long to wait for the nodes to be Ready.
        #[arg(long, default_value = "120s", value_parser = parse_duration)]
        timeout: std::time::Duration,
    },
    /// Remove everything the lab made (processes, containers, namespaces, its directory).
    Down {
        #[command(flatten)]
        which: LabWhich,
    },
    /// Kill a node's agent or the server (SIGKILL, like a crash; pods keep running).
    Stop {
        #[command(flatten)]
        which: LabWhich,
        /// `server`, or a node's name.
        member: keelson::lab::Member,
    },
    /// Start a stopped agent or server again, with the flags it had.
    Start {
        #[command(flatten)]
        which: LabWhich,
        /// `server`, or a node's name.
        member: keelson::lab::Member,
    },
    /// List the lab's nodes, their namespaces and state.
    Status {
        #[command(flatten)]
        which: LabWhich,
    },
}

/// Which containerd and containerd namespace an image command works on.
#[derive(clap::Args)]
struct ContainerdAt {
    #[arg(long, default_value = "/run/containerd/containerd.sock")]
    containerd: PathBuf,
    #[arg(long, default_value = "k8s.keelson.io")]
    containerd_namespace: String,
}

impl ContainerdAt {
    async fn connect(&self) -> anyhow::Result<keelson::runtime::Containerd> {
        keelson::runtime::Containerd::connect(&self.containerd, &self.containerd_namespace)
            .await
            .with_context(|| format!("containerd at {}", self.containerd.display()))
    }
}

#[derive(Subcommand)]
enum ImageCmd {
    /// Pack a root filesystem directory into an OCI image archive.
    Pack {
        /// A root filesystem directory: one layer (repeat for several, bottom first).
        #[arg(long, required = true)]
        rootfs: Vec<PathBuf>,
        #[arg(long)]
        name: String,
        #[arg(long, allow_hyphen_values = true, help = "repeat for each argument")]
        entrypoint: Vec<String>,
        #[arg(long, allow_hyphen_values = true, help = "repeat for each argument")]
        cmd: Vec<String>,
        #[arg(long)]
        env: Vec<String>,
        #[arg(long)]
        workdir: Option<String>,
        /// `OS/ARCH` of a manifest (repeat for a multi-platform index of them).
        #[arg(long)]
        platform: Vec<String>,
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Import OCI or docker-archive tarballs into containerd.
    Import {
        #[command(flatten)]
        at: ContainerdAt,
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Pull an image from its registry (through the node's mirrors) into containerd.
    Pull {
        #[command(flatten)]
        at: ContainerdAt,
        /// The node's registry configuration (k3s's registries.yaml format).
        #[arg(long, default_value = "/etc/keelson/registries.yaml")]
        registry_config: PathBuf,
        /// Credentials for the image's registry, `USER:PASSWORD`.
        #[arg(long)]
        creds: Option<String>,
        reference: String,
    },
    /// List the images in containerd (name, digest, size).
    Ls {
        #[command(flatten)]
        at: ContainerdAt,
    },
    /// Remove images by reference.
    Rm {
        #[command(flatten)]
        at: ContainerdAt,
        #[arg(required = true)]
        references: Vec<String>,
    },
    /// Write the pause image archive built from keelson's embedded pause binary.
    Pause {
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Pack keelson itself as an image (`/keelson`), for the DaemonSets in deploy/.
    #[command(name = "self")]
    Myself {
        /// The binary to pack (default: this one).
        #[arg(long)]
        binary: Option<PathBuf>,
        #[arg(long, default_value = "keelson.local/keelson:0.1")]
        name: String,
        #[arg(short, long)]
        output: PathBuf,
    },
}

/// The service account's CA in a pod (the cluster CA, which signed the API server's
/// kubelet-client certificate).
const IN_CLUSTER_CA: &str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";

/// Raises the open-file limit to its hard limit (as systemd's LimitNOFILE for kube-apiserver
/// and kubelet): every client connection, watch and container stream holds descriptors.
fn raise_nofile() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
    {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    raise_nofile();
    if matches!(cli.cmd, Cmd::Agent(_)) {
        agent::memory::tune();
    }
    let filter = || {
        tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
    };
    match &cli.cmd {
        // `up` shows progress on the terminal; the daemons' logs go to a file.
        #[cfg(feature = "server")]
        Cmd::Up(a) => {
            let dir = a.data_dir.join("logs");
            std::fs::create_dir_all(&dir).with_context(|| dir.display().to_string())?;
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join("keelson.log"))
                .with_context(|| dir.join("keelson.log").display().to_string())?;
            tracing_subscriber::fmt()
                .with_env_filter(filter())
                .with_ansi(false)
                .with_writer(std::sync::Mutex::new(file))
                .init();
        }
        _ => tracing_subscriber::fmt()
            .with_env_filter(filter())
            .with_writer(std::io::stderr)
            .init(),
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run(cli))
}

#[cfg(feature = "server")]
async fn lab(cmd: LabCmd) -> anyhow::Result<()> {
    match cmd {
        LabCmd::Up {
            which,
            nodes,
            images,
            port,
            server_arg,
            mut agent_arg,
            registry_config,
            dns_upstream,
            timeout,
        } => {
            if let Some(r) = registry_config {
                let r = std::fs::canonicalize(&r)
                    .with_context(|| format!("--registry-config {}", r.display()))?;
                agent_arg.extend(["--registry-config".into(), r.display().to_string()]);
            }
            let st = keelson::lab::up(&keelson::lab::UpOptions {
                data_dir: which.dir()?,
                name: which.name,
                nodes,
                images,
                port,
                server_args: server_arg,
                agent_args: agent_arg,
                dns_upstreams: dns_upstream,
                timeout,
            })
            .await?;
            println!("export KUBECONFIG={}", st.kubeconfig().display());
            println!("# then: kubectl get nodes -o wide");
            Ok(())
        }
        LabCmd::Down { which } => {
            let dir = which.dir()?;
            if keelson::lab::State::load(&dir)?.is_some() {
                keelson::lab::down(&dir).await
            } else {
                let n = keelson::lab::down_by_name(&which.name)?;
                eprintln!(
                    "lab: no lab.json in {}; removed {n} namespaces named {}-*",
                    dir.display(),
                    which.name
                );
                Ok(())
            }
        }
        LabCmd::Stop { which, member } => keelson::lab::stop_member(&which.dir()?, &member),
        LabCmd::Start { which, member } => {
            let pid = keelson::lab::start_member(&which.dir()?, &member)?;
            eprintln!("lab: {member:?} started (pid {pid})");
            Ok(())
        }
        LabCmd::Status { which } => {
            print!("{}", keelson::lab::status(&which.dir()?).await?);
            Ok(())
        }
    }
}

/// A duration like `300s`, `5m`, `1h` or `500ms` (plain numbers are seconds).
fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, "s"), |i| s.split_at(i));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 30s, 5m or 500ms"))?;
    let secs = |k: u64| Ok(std::time::Duration::from_secs(n * k));
    match unit {
        "ms" => Ok(std::time::Duration::from_millis(n)),
        "s" => secs(1),
        "m" => secs(60),
        "h" => secs(3600),
        _ => Err(format!("{s:?}: unknown unit {unit:?} (ms, s, m, h)")),
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        #[cfg(feature = "server")]
        Cmd::Up(a) => Box::pin(up::up(a)).await,
        #[cfg(feature = "server")]
        Cmd::Down(a) => up::down(a).await,
        Cmd::Proxy(p) => {
            if p.cleanup {
                keelson::proxy::cleanup()?;
                eprintln!("proxy: rules and chains removed");
                return Ok(());
            }
            let node = node_name_or_host(p.node_name)?;
            let Some(cfg) = p.proxy.config(&node)? else {
                bail!("--proxy-mode none: nothing to run");
            };
            let client = match (&p.kubeconfig, &p.server) {
                (Some(k), _) => keelson::control::client_from(k).await?,
                (None, Some(server)) => {
                    let join = agent::cluster::Join::Token {
                        server: server.clone(),
                        token_file: p.token_file.clone().context("--token-file")?,
                        ca_file: p.ca_file.clone().context("--ca-file")?,
                    };
                    agent::cluster::client(&join, &node, None).await?.client
                }
                (None, None) => kube::Client::try_default()
                    .await
                    .context("no --kubeconfig or --server, and no in-cluster configuration")?,
            };
            keelson::proxy::run(client, cfg, None, shutdown_signal()).await
        }
        cmd @ Cmd::Agent(_) => daemon(cmd).await,
        #[cfg(feature = "server")]
        cmd @ Cmd::Server { .. } => daemon(cmd).await,
        Cmd::Image { cmd } => image(cmd).await,
        #[cfg(feature = "server")]
        Cmd::Lab { cmd } => lab(cmd).await,
        #[cfg(feature = "server")]
        Cmd::Scheduler {
            kubeconfig,
            election,
        } => {
            let client = keelson::control::client_from(&kubeconfig).await?;
            tokio::select! {
                _ = keelson::roles::run(client, keelson::roles::Actors::Scheduler, election.config(), Default::default()) => {}
                _ = shutdown_signal() => {}
            }
            Ok(())
        }
        #[cfg(feature = "server")]
        Cmd::Controllers {
            kubeconfig,
            election,
            nodes,
        } => {
            let node_opts = nodes.options()?;
            let client = keelson::control::client_from(&kubeconfig).await?;
            tokio::select! {
                _ = keelson::roles::run(client, keelson::roles::Actors::Controllers, election.config(), node_opts) => {}
                _ = shutdown_signal() => {}
            }
            Ok(())
        }
        Cmd::Pods { data_dir, json } => {
            let body = local_get(&data_dir, "/pods")?;
            if json {
                println!("{body}");
                return Ok(());
            }
            let list: serde_json::Value =
                serde_json::from_str(&body).context("agent answered non-JSON")?;
            let pods: Vec<k8s_openapi::api::core::v1::Pod> =
                serde_json::from_value(list["items"].clone()).context("agent's PodList")?;
            print!("{}", keelson::kinds::print::table(&pods));
            Ok(())
        }
        Cmd::Logs {
            pod,
            container,
            data_dir,
            previous,
            tail,
        } => {
            let (ns, name) = pod.split_once('/').unwrap_or(("default", &pod));
            let mut path = format!("/containerLogs/{ns}/{name}/{container}?previous={previous}");
            if let Some(t) = tail {
                path.push_str(&format!("&tailLines={t}"));
            }
            print!("{}", local_get(&data_dir, &path)?);
            Ok(())
        }
    }
}

/// How the agent finds its cluster: a kubeconfig, a bootstrap token, in-cluster, or none.
fn join_mode(a: &AgentArgs) -> anyhow::Result<Option<agent::cluster::Join>> {
    Ok(match (&a.kubeconfig, &a.server) {
        (Some(k), _) => Some(agent::cluster::Join::Kubeconfig(k.clone())),
        (None, Some(server)) => Some(agent::cluster::Join::Token {
            server: server.clone(),
            token_file: a
                .token_file
                .clone()
                .context("--token-file is required with --server")?,
            ca_file: a
                .ca_file
                .clone()
                .context("--ca-file is required with --server")?,
        }),
        (None, None) if a.standalone => None,
        // As a pod (deploy/keelson-agent.yaml): the service account's configuration.
        (None, None) if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() => {
            Some(agent::cluster::Join::InCluster)
        }
        (None, None) => bail!(
            "say how to run: --standalone --manifests DIR, or join a cluster with --kubeconfig FILE or --server URL --token-file FILE --ca-file FILE (as a pod, the in-cluster configuration is used)"
        ),
    })
}

/// Pods' cluster DNS servers (--cluster-dns), and this node's DNS server when it answers them.
fn cluster_dns(
    a: &AgentArgs,
    joined: bool,
    service_cidr: Option<ipnet::Ipv4Net>,
) -> anyhow::Result<(Vec<std::net::IpAddr>, Option<keelson::dns::DnsConfig>)> {
    let domain = a.cluster_domain.trim_end_matches('.').to_ascii_lowercase();
    if !keelson::kinds::validate::is_dns1123_subdomain(&domain) {
        bail!("--cluster-domain {:?} is not a DNS name", a.cluster_domain);
    }
    let servers: Vec<std::net::IpAddr> = match a.cluster_dns.as_str() {
        "auto" => match service_cidr.filter(|_| joined) {
            Some(c) => vec![keelson::kinds::dns::default_cluster_dns(c.network()).into()],
            None => vec![],
        },
        list => list
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.parse()
                    .with_context(|| format!("--cluster-dns: {s:?} is not an IP address"))
            })
            .collect::<anyhow::Result<_>>()?,
    };
    let serve = a.serve_cluster_dns && joined && !servers.is_empty();
    let dns = serve.then(|| keelson::dns::DnsConfig {
        listen: servers.clone(),
        port: 53,
        metrics_port: Some(9153),
        domain,
        ttl: a.cluster_dns_ttl,
        resolv_conf: (!a.resolv_conf.is_empty()).then(|| PathBuf::from(&a.resolv_conf)),
        cache_ttl: Duration::from_secs(30),
    });
    Ok((servers, dns))
}

/// The agent's configuration from its flags.
fn agent_config(a: AgentArgs) -> anyhow::Result<AgentConfig> {
    let join = join_mode(&a)?;
    let client_ca_file = a.client_ca_file.clone().or_else(|| {
        matches!(join, Some(agent::cluster::Join::InCluster))
            .then(|| std::path::PathBuf::from(IN_CLUSTER_CA))
            .filter(|p| p.exists())
    });
    let pod_cidr: ipnet::Ipv4Net = a
        .pod_cidr
        .parse()
        .with_context(|| format!("--pod-cidr {:?} is not an IPv4 CIDR", a.pod_cidr))?;
    let pod_cidr = pod_cidr.trunc();
    let node_name = node_name_or_host(a.node_name.clone())?;
    let mut proxy = a.proxy.config(&node_name)?;
    let service_cidr = match a.service_cidr.as_str() {
        "" => None,
        c => Some(
            c.parse::<ipnet::Ipv4Net>()
                .with_context(|| format!("--service-cidr {c:?} is not an IPv4 CIDR"))?
                .trunc(),
        ),
    };
    let (cluster_dns, dns) = cluster_dns(&a, join.is_some(), service_cidr)?;
    if let (Some(p), Some(d)) = (proxy.as_mut(), &dns) {
        p.local_vips = d
            .listen
            .iter()
            .filter_map(|ip| match ip {
                std::net::IpAddr::V4(v) => Some(*v),
                std::net::IpAddr::V6(_) => None,
            })
            .collect();
    }
    let gateway = Ipv4Addr::from(u32::from(pod_cidr.network()) + 1);
    let cni = (a.network == "cni").then(|| keelson::net::cni::Cni {
        conf_dir: a.cni_conf_dir.clone(),
        bin_dirs: a
            .cni_bin_dir
            .split(':')
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
            .collect(),
        cache_dir: a.data_dir.join("cni"),
    });
    let registries = keelson::runtime::registries::Registries::load(&a.registry_config)?;
    if a.image_gc_low_threshold > a.image_gc_high_threshold {
        bail!(
            "--image-gc-low-threshold ({}) must not be above --image-gc-high-threshold ({})",
            a.image_gc_low_threshold,
            a.image_gc_high_threshold
        );
    }
    let cfg = AgentConfig {
        pulls: agent::images::PullConfig {
            registries: std::sync::Arc::new(registries),
            serialize: a.serialize_image_pulls,
            max_parallel: (a.max_parallel_image_pulls > 0).then_some(a.max_parallel_image_pulls),
            progress_deadline: a.image_pull_progress_deadline.max(Duration::from_secs(1)),
        },
        image_gc: agent::image_gc::GcPolicy {
            high: a.image_gc_high_threshold,
            low: a.image_gc_low_threshold,
            min_age: a.minimum_image_ttl_duration,
            period: a.image_gc_period.max(Duration::from_secs(1)),
        },
        node_name,
        pod_cidr,
        node_ip: a.node_ip.unwrap_or(gateway),
        images_dir: a.images.unwrap_or_else(|| a.data_dir.join("images")),
        data_dir: a.data_dir,
        log_dir: a.log_dir,
        manifests: a.manifests,
        containerd: a.containerd,
        namespace: a.containerd_namespace,
        bridge: a.bridge,
        shim_per_node: a.shim_group == "node",
        rescan: Duration::from_secs(a.rescan_seconds.max(1)),
        resync: Duration::from_secs(a.resync_seconds.max(1)),
        rotation: Rotation {
            max_size: a.container_log_max_size,
            max_files: a.container_log_max_files,
        },
        join,
        kubelet_port: a.kubelet_port,
        client_ca_file,
        reserved: a.reserved,
        node_labels: a.node_labels,
        cni,
        node_lease: a.node_lease_duration.max(Duration::from_secs(1)),
        stream_idle_timeout: a
            .streaming_connection_idle_timeout
            .max(Duration::from_secs(1)),
        proxy,
        cluster_cidr: a.cluster_cidr.trunc(),
        service_cidr,
        cluster_dns,
        cluster_domain: a.cluster_domain.trim_end_matches('.').to_string(),
        resolv_conf: (!a.resolv_conf.is_empty()).then(|| PathBuf::from(&a.resolv_conf)),
        dns,
    };
    Ok(cfg)
}

/// The two long-running roles `keelson up` also runs (kept apart from `run`, which runs `up`).
async fn daemon(cmd: Cmd) -> anyhow::Result<()> {
    match cmd {
        Cmd::Agent(a) => agent::run(agent_config(*a)?, shutdown_signal()).await,
        #[cfg(feature = "server")]
        Cmd::Server {
            data_dir,
            listen,
            tls_san,
            listen_fd,
            service_cidr,
            service_node_port_range,
            store,
            etcd_endpoints,
            compaction_interval,
            no_controllers,
            cluster_signing_duration,
            election,
            nodes,
            default_not_ready_toleration_seconds,
            default_unreachable_toleration_seconds,
        } => {
            let node_opts = nodes.options()?;
            let cidr: ipnet::Ipv4Net = service_cidr
                .parse()
                .with_context(|| format!("--service-cidr {service_cidr:?} is not an IPv4 CIDR"))?;
            let range = service_node_port_range
                .split_once('-')
                .and_then(|(a, b)| {
                    Some((a.trim().parse::<u16>().ok()?, b.trim().parse::<u16>().ok()?))
                })
                .filter(|(a, b)| a <= b)
                .with_context(|| {
                    format!("--service-node-port-range {service_node_port_range:?} is not LOW-HIGH")
                })?;
            let services = keelson::api::alloc::ServiceNet {
                cidr: cidr.trunc(),
                node_ports: range,
            };
            let ready = std::sync::Arc::new(tokio::sync::Notify::new());
            let cfg = keelson::api::ServerConfig {
                data_dir,
                listen,
                listen_fds: listen_fd,
                services,
                store: match store.as_str() {
                    "etcd" => keelson::api::StoreConfig::Etcd(etcd_endpoints),
                    _ => keelson::api::StoreConfig::Embedded,
                },
                compaction_interval,
                ready: Some(ready.clone()),
                default_tolerations: (
                    default_not_ready_toleration_seconds,
                    default_unreachable_toleration_seconds,
                ),
                tls_sans: tls_san,
                signing_duration: cluster_signing_duration,
            };
            if !no_controllers {
                let kubeconfig = cfg.data_dir.join("kubeconfig.yaml");
                tokio::spawn(async move {
                    ready.notified().await;
                    match keelson::control::client_from(&kubeconfig).await {
                        Ok(client) => {
                            keelson::roles::run(
                                client,
                                keelson::roles::Actors::Both,
                                election.config(),
                                node_opts,
                            )
                            .await
                        }
                        Err(e) => {
                            tracing::error!(error = %format!("{e:#}"), "control plane client")
                        }
                    }
                });
            }
            keelson::api::run(cfg, shutdown_signal()).await
        }
        _ => bail!("not a daemon command"),
    }
}

/// The shared libraries `bin` needs, by `ldd`: (absolute path, content).
fn shared_libraries(bin: &std::path::Path) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let out = std::process::Command::new("ldd")
        .arg(bin)
        .output()
        .context("running ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // "not a dynamic executable": nothing to add.
        return Ok(vec![]);
    }
    let mut libs = vec![];
    for line in text.lines() {
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line
                .split_whitespace()
                .next()
                .filter(|p| p.starts_with('/')),
        };
        let Some(path) = path.filter(|p| p.starts_with('/')) else {
            continue;
        };
        let bytes = std::fs::read(path).with_context(|| format!("reading {path}"))?;
        libs.push((path.to_string(), bytes));
    }
    Ok(libs)
}

/// A GET against the agent's unix socket; the body on 2xx, an error with the body otherwise.
fn local_get(data_dir: &std::path::Path, path: &str) -> anyhow::Result<String> {
    let sock = data_dir.join("agent.sock");
    let mut s = std::os::unix::net::UnixStream::connect(&sock).with_context(|| {
        format!(
            "connecting to the agent at {} (is it running?)",
            sock.display()
        )
    })?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    let text = String::from_utf8_lossy(&resp).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    if !(200..300).contains(&code) {
        let msg = serde_json::from_str::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v["message"].as_str().map(str::to_string))
            .unwrap_or_else(|| body.to_string());
        bail!("{msg}");
    }
    Ok(body.to_string())
}

/// `keelson image pull`: the node's registry configuration, and `--creds` for the image's
/// registry.
async fn image_pull(
    at: &ContainerdAt,
    registry_config: &std::path::Path,
    creds: Option<&str>,
    reference: &str,
) -> anyhow::Result<()> {
    use keelson::runtime::registries::{Credential, Registries};
    let registries = Registries::load(registry_config)?;
    let credentials = match creds {
        None => vec![],
        Some(c) => {
            let (username, password) = c
                .split_once(':')
                .context("--creds: expected USER:PASSWORD")?;
            vec![Credential::Basic {
                username: username.into(),
                password: password.into(),
            }]
        }
    };
    let rt = at.connect().await?;
    let t0 = std::time::Instant::now();
    let pulled = rt
        .pull(
            reference,
            keelson::runtime::pull::PullOptions {
                registries: &registries,
                credentials: &credentials,
                progress_deadline: std::time::Duration::from_secs(60),
                parallel_layers: 3,
            },
        )
        .await?;
    println!(
        "pulled {} ({}, {} in {:.1}s)",
        pulled.name,
        pulled.digest,
        human_size(pulled.size),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `keelson image ls`: crictl's columns.
async fn image_ls(at: &ContainerdAt) -> anyhow::Result<()> {
    let rt = at.connect().await?;
    println!("{:<60} {:<20} {:>10}", "IMAGE", "DIGEST", "SIZE");
    for i in rt.list_images().await? {
        let short = i.digest.trim_start_matches("sha256:");
        println!(
            "{:<60} {:<20} {:>10}",
            i.name,
            &short[..short.len().min(12)],
            human_size(i.size)
        );
    }
    Ok(())
}

/// Bytes as crictl prints them (`5.2MB`).
fn human_size(n: u64) -> String {
    let f = n as f64;
    if f >= 1e9 {
        format!("{:.1}GB", f / 1e9)
    } else if f >= 1e6 {
        format!("{:.1}MB", f / 1e6)
    } else if f >= 1e3 {
        format!("{:.1}kB", f / 1e3)
    } else {
        format!("{n}B")
    }
}

async fn image(cmd: ImageCmd) -> anyhow::Result<()> {
    match cmd {
        ImageCmd::Pack {
            rootfs,
            name,
            entrypoint,
            cmd,
            env,
            workdir,
            platform,
            output,
        } => {
            let mut layers = Vec::new();
            for r in &rootfs {
                if !r.is_dir() {
                    bail!("--rootfs {}: not a directory", r.display());
                }
                layers.push(pack::layer_from_dir(r)?);
            }
            let layer_refs: Vec<&[u8]> = layers.iter().map(Vec::as_slice).collect();
            let ar = pack::pack_oci_archive_layers(
                &ImageSettings {
                    name: name.clone(),
                    entrypoint,
                    cmd,
                    env,
                    working_dir: workdir,
                    platforms: platform,
                },
                &layer_refs,
            )?;
            std::fs::write(&output, ar).with_context(|| format!("writing {}", output.display()))?;
            eprintln!(
                "packed {} into {}",
                keelson::runtime::image::normalize_ref(&name),
                output.display()
            );
            Ok(())
        }
        ImageCmd::Pull {
            at,
            registry_config,
            creds,
            reference,
        } => image_pull(&at, &registry_config, creds.as_deref(), &reference).await,
        ImageCmd::Ls { at } => image_ls(&at).await,
        ImageCmd::Rm { at, references } => {
            let rt = at.connect().await?;
            for r in references {
                let name = keelson::runtime::image::normalize_ref(&r);
                rt.remove_image_sync(&name, true).await?;
                println!("deleted {name}");
            }
            Ok(())
        }
        ImageCmd::Import { at, files } => {
            let rt = at.connect().await?;
            for f in files {
                let bytes =
                    std::fs::read(&f).with_context(|| format!("reading {}", f.display()))?;
                let names = rt.import_archive(&f.display().to_string(), &bytes).await?;
                for n in names {
                    println!("imported {n}");
                }
            }
            Ok(())
        }
        ImageCmd::Pause { output } => {
            std::fs::write(&output, agent::pause_archive()?)
                .with_context(|| format!("writing {}", output.display()))?;
            Ok(())
        }
        ImageCmd::Myself {
            binary,
            name,
            output,
        } => {
            let bin = match binary {
                Some(b) => b,
                None => std::env::current_exe().context("this binary's path")?,
            };
            let data = std::fs::read(&bin).with_context(|| format!("reading {}", bin.display()))?;
            // The shared libraries it links (glibc, its loader), where the loader looks.
            let libs = shared_libraries(&bin)?;
            let mut files = vec![keelson::runtime::pack::MemFile {
                path: "keelson",
                mode: 0o755,
                data: &data,
            }];
            for (path, bytes) in &libs {
                files.push(keelson::runtime::pack::MemFile {
                    path: path.trim_start_matches('/'),
                    mode: 0o755,
                    data: bytes,
                });
            }
            let layer = pack::layer_from_files(&files)?;
            let ar = pack::pack_oci_archive(
                &ImageSettings {
                    name: name.clone(),
                    entrypoint: vec!["/keelson".into()],
                    ..Default::default()
                },
                &layer,
            )?;
            std::fs::write(&output, ar).with_context(|| format!("writing {}", output.display()))?;
            eprintln!("{name}: {} ({} MB)", output.display(), data.len() >> 20);
            Ok(())
        }
    }
}
