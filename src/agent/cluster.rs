//! The agent as a member of a cluster: its identity towards the API server, the Node it
//! registers (labels, addresses, capacity, nodeInfo, conditions), the Lease it renews every 10 s,
//! the pods bound to it (a watch with `spec.nodeName=<node>`), and the pod statuses it
//! publishes (only when they changed).

use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use anyhow::Context;
use ipnet::Ipv4Net;
use k8s_openapi::api::{
    coordination::v1::Lease,
    core::v1::{Node, Pod},
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
    runtime::watcher,
};
use serde_json::json;

use super::{AgentCtx, config::AgentConfig};
use crate::{
    control::Cache,
    net::hostgw::{self, Route, Via},
};

/// How the agent reaches the API server, and with which credential it bootstraps its node's
/// own certificate (`bootstrap`).
#[derive(Debug, Clone)]
pub enum Join {
    /// A kubeconfig file (any identity allowed to ask for node client certificates).
    Kubeconfig(PathBuf),
    /// The server URL, the cluster's join token (it only lets the agent ask for its node's
    /// certificate) and the server's CA certificate.
    Token {
        server: String,
        token_file: PathBuf,
        ca_file: PathBuf,
    },
    /// The pod's in-cluster configuration (service account token, CA, KUBERNETES_SERVICE_*),
    /// when the agent runs as a DaemonSet pod; RBAC lets it ask for its node's certificate.
    InCluster,
}

/// A client acting as the node, and the cluster CA it trusts (PEM).
pub struct Joined {
    pub client: Client,
    pub ca_pem: Option<String>,
}

/// The configuration the agent starts with: its join credential, not yet the node's.
async fn bootstrap_config(join: &Join) -> anyhow::Result<kube::Config> {
    match join {
        Join::Kubeconfig(p) => {
            let kc = kube::config::Kubeconfig::read_from(p)
                .with_context(|| format!("reading kubeconfig {}", p.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .with_context(|| format!("kubeconfig {}", p.display()))
        }
        Join::InCluster => kube::Config::incluster().context("in-cluster configuration"),
        Join::Token {
            server,
            token_file,
            ca_file,
        } => {
            let token = std::fs::read_to_string(token_file)
                .with_context(|| format!("reading --token-file {}", token_file.display()))?;
            let ca = std::fs::read(ca_file)
                .with_context(|| format!("reading --ca-file {}", ca_file.display()))?;
            let kc = json!({
                "apiVersion": "v1", "kind": "Config", "current-context": "node",
                "clusters": [{"name": "c", "cluster": {"server": server,
                    "certificate-authority-data": base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &ca)}}],
                "users": [{"name": "node", "user": {"token": token.trim()}}],
                "contexts": [{"name": "node", "context": {"cluster": "c", "user": "node"}}],
            });
            let kc: kube::config::Kubeconfig =
                serde_json::from_value(kc).context("building the bootstrap kubeconfig")?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .context("bootstrap kubeconfig")
        }
    }
}

/// A client for the API server as node `node` (`system:node:<node>`, by a client certificate
/// the cluster issued through a CertificateSigningRequest; kept in `pki_dir` when given). The
/// certificate is renewed at 80 % of its lifetime while the client runs (kubelet's
/// `--rotate-certificates`): new connections present the new one.
pub async fn client(
    join: &Join,
    node: &str,
    pki_dir: Option<&std::path::Path>,
) -> anyhow::Result<Joined> {
    use kube::client::ConfigExt;
    let base = bootstrap_config(join).await?;
    let cred = super::bootstrap::client_certificate(&base, node, pki_dir).await?;
    // The cluster and CA of the bootstrap configuration, no credential of its own: the TLS
    // layer presents whatever the switch holds.
    let mut cfg = base.clone();
    cfg.auth_info = Default::default();
    let switch = crate::tls::CertSwitch::new(&cred.cert_pem, &cred.key_pem)
        .context("the node client certificate")?;
    let mut tls = cfg
        .rustls_client_config()
        .context("TLS towards the API server")?;
    tls.client_auth_cert_resolver = switch.clone();
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.enforce_http(false);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    let mut timeouts = hyper_timeout::TimeoutConnector::new(https);
    timeouts.set_connect_timeout(cfg.connect_timeout);
    timeouts.set_read_timeout(cfg.read_timeout);
    timeouts.set_write_timeout(cfg.write_timeout);
    // A burst of pods opens many connections at once (each pod's first requests); only a few
    // stay open afterwards, each holding its TLS and HTTP buffers (measured: 65 idle
    // connections, ~2 MiB, after 50 pods).
    let http_client =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_max_idle_per_host(4)
            .pool_idle_timeout(Duration::from_secs(30))
            .build(timeouts);
    let service = tower::ServiceBuilder::new()
        .layer(cfg.base_uri_layer())
        .service(http_client);
    let client = Client::new(service, cfg.default_namespace.clone());
    tokio::spawn(super::bootstrap::rotate_client(
        client.clone(),
        node.to_string(),
        pki_dir.map(|d| d.to_path_buf()),
        switch,
        cred,
    ));
    let ca_pem = match (&base.root_cert, &base.root_cert_file) {
        (Some(ders), _) => Some(
            ders.iter()
                .map(|d| {
                    format!(
                        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
                        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, d)
                            .as_bytes()
                            .chunks(64)
                            .map(|c| String::from_utf8_lossy(c).into_owned())
                            .collect::<Vec<_>>()
                            .join("\n")
                    )
                })
                .collect::<String>(),
        ),
        (None, Some(f)) => std::fs::read_to_string(f).ok(),
        (None, None) => None,
    };
    Ok(Joined { client, ca_pem })
}

fn arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

fn mem_total_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn os_image() -> String {
    std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                .map(|v| v.trim_matches('"').to_string())
        })
        .unwrap_or_else(|| "Linux".into())
}

fn disk_bytes(path: &std::path::Path) -> u64 {
    nix::sys::statvfs::statvfs(path)
        .map(|s| s.blocks() * s.fragment_size())
        .unwrap_or(0)
}

fn now() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

/// Capacity minus what is reserved for the system (kubelet's --system-reserved and
/// --kube-reserved together), never below zero.
pub fn allocatable(
    capacity: &BTreeMap<&'static str, String>,
    reserved: &BTreeMap<String, String>,
) -> BTreeMap<&'static str, String> {
    use crate::kinds::quantity;
    let mut out = capacity.clone();
    for (k, v) in capacity {
        let Some(r) = reserved.get(*k) else { continue };
        let left = match *k {
            "cpu" => quantity::millicores(v)
                .zip(quantity::millicores(r))
                .map(|(c, r)| format!("{}m", (c - r).max(0))),
            "memory" => quantity::bytes(v)
                .zip(quantity::bytes(r))
                .map(|(c, r)| format!("{}Ki", (c - r).max(0) / 1024)),
            _ => quantity::bytes(v)
                .zip(quantity::bytes(r))
                .map(|(c, r)| (c - r).max(0).to_string()),
        };
        if let Some(l) = left {
            out.insert(k, l);
        }
    }
    out
}

/// A bad value of an agent flag, naming the flag.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct FlagError(String);

/// Parses `cpu=100m,memory=256Mi,...` (the resources kubelet reports).
pub fn parse_reserved(s: &str) -> Result<BTreeMap<String, String>, FlagError> {
    let mut m = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| FlagError(format!("--reserved {part:?}: expected NAME=QUANTITY")))?;
        if !["cpu", "memory", "pods", "ephemeral-storage"].contains(&k) {
            return Err(FlagError(format!(
                "--reserved {k:?}: one of cpu, memory, pods, ephemeral-storage"
            )));
        }
        if crate::kinds::quantity::parse(v).is_none() {
            return Err(FlagError(format!("--reserved {k}={v:?}: not a quantity")));
        }
        m.insert(k.to_string(), v.to_string());
    }
    Ok(m)
}

/// Parses `--node-labels` (kubelet's flag): `key=value` pairs, comma-separated, each a valid
/// label (an optional DNS-subdomain prefix and `/`, a name of up to 63 characters; a value of
/// up to 63 characters, possibly empty).
pub fn parse_node_labels(s: &str) -> Result<BTreeMap<String, String>, FlagError> {
    fn name_ok(n: &str) -> bool {
        n.len() <= 63
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && n.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
            && n.chars().last().is_some_and(|c| c.is_ascii_alphanumeric())
    }
    let mut m = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| FlagError(format!("--node-labels {part:?}: expected KEY=VALUE")))?;
        let (prefix, name) = match k.split_once('/') {
            Some((p, n)) => (Some(p), n),
            None => (None, k),
        };
        if !name_ok(name)
            || prefix.is_some_and(|p| !crate::kinds::validate::is_dns1123_subdomain(p))
        {
            return Err(FlagError(format!(
                "--node-labels {k:?}: not a valid label key (an optional DNS subdomain and '/', then up to 63 alphanumeric characters, '-', '_' or '.', starting and ending alphanumeric)"
            )));
        }
        if !v.is_empty() && !name_ok(v) {
            return Err(FlagError(format!(
                "--node-labels {k}={v:?}: not a valid label value (up to 63 alphanumeric characters, '-', '_' or '.', starting and ending alphanumeric)"
            )));
        }
        m.insert(k.to_string(), v.to_string());
    }
    Ok(m)
}

/// The node's images as kubelet lists them in `status.images`: one entry per image (its
/// references by tag and digest), largest first, at most 50.
pub async fn node_images(rt: &crate::runtime::Containerd) -> serde_json::Value {
    let list = match rt.list_images().await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "listing images");
            return json!([]);
        }
    };
    let mut by_digest: BTreeMap<String, (Vec<String>, u64)> = BTreeMap::new();
    for i in list {
        let e = by_digest.entry(i.digest).or_default();
        e.0.push(i.name);
        e.1 = e.1.max(i.size);
    }
    let mut out: Vec<(Vec<String>, u64)> = by_digest.into_values().collect();
    out.sort_by_key(|(_, size)| std::cmp::Reverse(*size));
    out.truncate(50);
    json!(
        out.into_iter()
            .map(|(mut names, size)| {
                // Digest references first, as kubelet lists them.
                names.sort_by_key(|n| (!n.contains('@'), n.clone()));
                json!({"names": names, "sizeBytes": size})
            })
            .collect::<Vec<_>>()
    )
}

/// The node's status as the agent reports it.
pub fn node_status(
    cfg: &AgentConfig,
    runtime_version: &str,
    images: serde_json::Value,
) -> serde_json::Value {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mut capacity: BTreeMap<&str, String> = BTreeMap::new();
    capacity.insert("cpu", cpus.to_string());
    capacity.insert("memory", format!("{}Ki", mem_total_kib()));
    capacity.insert("pods", "110".into());
    capacity.insert("ephemeral-storage", disk_bytes(&cfg.data_dir).to_string());
    let allocatable = allocatable(&capacity, &cfg.reserved);
    let uts = nix::sys::utsname::uname().ok();
    let kernel = uts
        .as_ref()
        .map(|u| u.release().to_string_lossy().to_string())
        .unwrap_or_default();
    let t = now();
    let cond = |ty: &str, status: &str, reason: &str, msg: &str| {
        json!({"type": ty, "status": status, "reason": reason, "message": msg,
               "lastHeartbeatTime": t, "lastTransitionTime": t})
    };
    json!({
        "capacity": capacity,
        "allocatable": allocatable,
        "addresses": [{"type": "InternalIP", "address": cfg.node_ip.to_string()},
                      {"type": "Hostname", "address": cfg.node_name}],
        "conditions": [
            cond("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
            cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
            cond("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
            cond("NetworkUnavailable", "False", "RouteCreated", "keelson set up the node network"),
            cond("Ready", "True", "KubeletReady", "kubelet is posting ready status"),
        ],
        "nodeInfo": {
            "machineID": std::fs::read_to_string("/etc/machine-id").unwrap_or_default().trim(),
            "systemUUID": "", "bootID": std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default().trim(),
            "kernelVersion": kernel, "osImage": os_image(),
            "containerRuntimeVersion": format!("containerd://{runtime_version}"),
            "kubeletVersion": format!("v1.{}.0-keelson.{}", crate::kinds::KUBE_MINOR, env!("CARGO_PKG_VERSION")),
            "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": arch(),
        },
        "daemonEndpoints": {"kubeletEndpoint": {"Port": cfg.kubelet_port}},
        "images": images,
    })
}

/// Creates or updates this node's Node; returns its pod CIDR once the cluster assigned one
/// (waiting up to `wait`), or `None`.
pub async fn register(
    client: &Client,
    cfg: &AgentConfig,
    rt: &crate::runtime::Containerd,
    runtime_version: &str,
    wait: Duration,
) -> anyhow::Result<Option<Ipv4Net>> {
    let api: Api<Node> = Api::all(client.clone());
    let name = &cfg.node_name;
    let status = node_status(cfg, runtime_version, node_images(rt).await);
    let mut labels = json!({"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": arch()});
    for (k, v) in &cfg.node_labels {
        labels[k] = json!(v);
    }
    let annotations = json!({crate::kinds::storage::LOCAL_PATH_ROOT:
        super::storage::root(&cfg.data_dir).to_string_lossy()});
    match api
        .get_opt(name)
        .await
        .context("reading this node's Node")?
    {
        None => {
            let node: Node = serde_json::from_value(json!({
                "metadata": {"name": name, "labels": labels, "annotations": annotations},
                "status": status,
            }))?;
            api.create(&PostParams::default(), &node)
                .await
                .context("registering the Node")?;
            tracing::info!(node = %name, "node registered");
        }
        Some(_) => {
            api.patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(&json!({"metadata": {"labels": labels, "annotations": annotations}})),
            )
            .await
            .context("updating the Node's labels")?;
            api.patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(&json!({ "status": status })),
            )
            .await
            .context("updating the Node's status")?;
            tracing::info!(node = %name, "node status updated");
        }
    }
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let n = api.get(name).await?;
        if let Some(c) = n.spec.as_ref().and_then(|s| s.pod_cidr.as_ref()) {
            let net: Ipv4Net = c
                .parse()
                .with_context(|| format!("the Node's spec.podCIDR {c:?}"))?;
            return Ok(Some(net));
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Renews `kube-node-lease/<node>` every quarter of its duration (kubelet: 40 s, every 10 s),
/// and re-posts the node's status every minute or so (its heartbeat), and at once when the node
/// controller has turned Ready Unknown while the agent was away.
pub fn heartbeat(
    client: Client,
    cfg: AgentConfig,
    rt: crate::runtime::Containerd,
    runtime_version: String,
) {
    tokio::spawn(async move {
        let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
        let nodes: Api<Node> = Api::all(client.clone());
        let name = cfg.node_name.clone();
        let secs = cfg.node_lease.as_secs().max(1);
        let every = (cfg.node_lease / 4).max(Duration::from_millis(250));
        // Status about once a minute however often the lease is renewed.
        let status_every = (60_000 / every.as_millis().max(1)).max(1) as u32;
        let mut tick = 0u32;
        let mut last_images = serde_json::Value::Null;
        loop {
            let lease = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": name, "namespace": "kube-node-lease"},
                "spec": {"holderIdentity": name, "leaseDurationSeconds": secs,
                         "renewTime": jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%S.%6fZ").to_string()}});
            let r = match leases.get_opt(&name).await {
                Ok(Some(_)) => leases
                    .patch(&name, &PatchParams::default(), &Patch::Merge(&lease))
                    .await
                    .map(|_| ()),
                Ok(None) => match serde_json::from_value::<Lease>(lease) {
                    Ok(l) => leases.create(&PostParams::default(), &l).await.map(|_| ()),
                    Err(e) => Err(kube::Error::SerdeError(e)),
                },
                Err(e) => Err(e),
            };
            if let Err(e) = r {
                tracing::warn!(error = %e, "renewing the node lease");
            }
            let ready = nodes.get_opt(&name).await.ok().flatten().is_some_and(|n| {
                n.status
                    .and_then(|s| s.conditions)
                    .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
            });
            // The image list is posted when it changes too (a pull, a removal).
            let images = node_images(&rt).await;
            if tick.is_multiple_of(status_every) || !ready || images != last_images {
                last_images = images.clone();
                let status = node_status(&cfg, &runtime_version, images);
                if let Err(e) = nodes
                    .patch_status(
                        &name,
                        &PatchParams::default(),
                        &Patch::Merge(&json!({ "status": status })),
                    )
                    .await
                {
                    tracing::warn!(error = %e, "posting node status");
                }
            }
            tick = tick.wrapping_add(1);
            tokio::time::sleep(every).await;
        }
    });
}

/// The pods bound to this node, watched.
pub fn pods(client: &Client, node: &str) -> Cache<Pod> {
    Cache::start(
        Api::all(client.clone()),
        watcher::Config::default().fields(&format!("spec.nodeName={node}")),
    )
}

/// Publishes the statuses the workers computed for API pods, when they changed: woken by
/// the status manager on every change and by the pod cache (a mirror pod appearing takes its
/// static pod's status), and once a second while a patch is failing.
pub fn publish_statuses(client: Client, ctx: Arc<AgentCtx>, pods: Cache<Pod>) {
    tokio::spawn(async move {
        let mut statuses = ctx.store.subscribe();
        let mut api = pods.changed.clone();
        let mut published: HashMap<String, serde_json::Value> = HashMap::new();
        let mut failing = false;
        loop {
            let retry = if failing { 1 } else { 3600 };
            tokio::select! {
                r = statuses.changed() => if r.is_err() { return },
                r = api.changed() => if r.is_err() { return },
                _ = tokio::time::sleep(Duration::from_secs(retry)) => {}
            }
            statuses.borrow_and_update();
            api.borrow_and_update();
            failing = !publish_changed(&client, &ctx, &pods, &mut published).await;
        }
    });
}

/// Patches the status of every API pod whose computed status differs from what was last
/// published; whether every patch went through.
async fn publish_changed(
    client: &Client,
    ctx: &AgentCtx,
    pods: &Cache<Pod>,
    published: &mut HashMap<String, serde_json::Value>,
) -> bool {
    let live = pods.all();
    let current: Vec<(String, String, String, serde_json::Value)> = {
        let Ok(store) = ctx.store.read() else {
            return false;
        };
        live.iter()
            .filter_map(|p| {
                let uid = p.metadata.uid.clone()?;
                let st = store.get(&status_key(p)?)?.status.clone()?;
                Some((
                    uid,
                    p.metadata.namespace.clone().unwrap_or_default(),
                    p.metadata.name.clone().unwrap_or_default(),
                    serde_json::to_value(st).ok()?,
                ))
            })
            .collect()
    };
    let uids: std::collections::HashSet<&String> = current.iter().map(|c| &c.0).collect();
    published.retain(|u, _| uids.contains(u));
    let mut ok = true;
    for (uid, ns, name, status) in current {
        if published.get(&uid) == Some(&status) {
            continue;
        }
        let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
        // Merge patch: lists (conditions, containerStatuses) are replaced whole.
        let patch = json!({ "status": status });
        match api
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                published.insert(uid, status);
            }
            Err(e) => {
                ok = false;
                tracing::debug!(pod = %name, error = %e, "publishing pod status");
            }
        }
    }
    ok
}

/// Finishes the deletion of a pod the agent stopped: the API object goes (grace 0, this uid).
pub async fn finish_delete(client: &Client, pod: &Pod) {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let dp = kube::api::DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(kube::api::Preconditions {
            uid: pod.metadata.uid.clone(),
            resource_version: None,
        }),
        ..Default::default()
    };
    match api.delete(&name, &dp).await {
        Ok(_) => tracing::info!(pod = %name, "pod deleted"),
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
        Err(e) => tracing::warn!(pod = %name, error = %e, "finishing pod deletion"),
    }
}

/// The annotation that marks a mirror pod (its value: the static pod's UID, kubelet's hash).
pub const MIRROR: &str = "kubernetes.io/config.mirror";

/// The key under which the agent keeps the status of an API pod: the static pod's UID for a
/// mirror pod, the pod's own UID otherwise.
pub fn status_key(p: &Pod) -> Option<String> {
    p.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(MIRROR).cloned())
        .or_else(|| p.metadata.uid.clone())
}

/// Keeps one mirror pod in the API per static pod (as kubelet does, so static pods show in
/// `kubectl get pods`): creates missing ones, replaces those of an older version, removes
/// those whose static pod is gone. Creates are retried at most every 5 s per pod.
pub struct Mirrors {
    tried: HashMap<String, std::time::Instant>,
}

impl Mirrors {
    pub fn new() -> Self {
        Mirrors {
            tried: HashMap::new(),
        }
    }

    pub fn sync(&mut self, client: &Client, statics: &[Pod], api: &[Arc<Pod>], node: &str) {
        let mirror_of = |p: &Pod| {
            p.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(MIRROR).cloned())
        };
        let wanted: HashMap<String, &Pod> = statics
            .iter()
            .filter_map(|p| Some((p.metadata.uid.clone()?, p)))
            .collect();
        for m in api {
            let Some(hash) = mirror_of(m) else { continue };
            if m.metadata.deletion_timestamp.is_some() {
                continue;
            }
            if !wanted.contains_key(&hash) {
                let (client, m) = (client.clone(), (**m).clone());
                tokio::spawn(async move { finish_delete(&client, &m).await });
            }
        }
        let present: std::collections::HashSet<String> = api
            .iter()
            .filter(|m| m.metadata.deletion_timestamp.is_none())
            .filter_map(|m| mirror_of(m))
            .collect();
        let now = std::time::Instant::now();
        self.tried
            .retain(|_, t| now.duration_since(*t) < Duration::from_secs(5));
        for (uid, sp) in wanted {
            if present.contains(&uid) || self.tried.contains_key(&uid) {
                continue;
            }
            // Another version of the same pod is still there: it goes first (above).
            let name = sp.metadata.name.clone().unwrap_or_default();
            let ns = sp
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into());
            if api.iter().any(|m| {
                m.metadata.name.as_deref() == Some(name.as_str())
                    && m.metadata.namespace.as_deref() == Some(ns.as_str())
            }) {
                continue;
            }
            self.tried.insert(uid.clone(), now);
            let mut mirror = sp.clone();
            mirror.metadata.uid = None;
            mirror.metadata.resource_version = None;
            mirror.metadata.namespace = Some(ns.clone());
            mirror
                .metadata
                .annotations
                .get_or_insert_with(Default::default)
                .insert(MIRROR.into(), uid.clone());
            if let Some(spec) = mirror.spec.as_mut() {
                spec.node_name = Some(node.to_string());
            }
            mirror.status = None;
            let client = client.clone();
            tokio::spawn(async move {
                let api: Api<Pod> = Api::namespaced(client, &ns);
                match api.create(&PostParams::default(), &mirror).await {
                    Ok(_) => tracing::info!(pod = %name, "mirror pod created"),
                    Err(e) => tracing::debug!(pod = %name, error = %e, "creating the mirror pod"),
                }
            });
        }
    }
}

impl Default for Mirrors {
    fn default() -> Self {
        Self::new()
    }
}

/// The routes this node wants: every other node's pod CIDR via its InternalIP, and the
/// Service range onto the node bridge `bridge` (see `net::hostgw`). A Node whose InternalIP is
/// this node's own address is another agent on the same host (keelson's agent DaemonSet
/// beside a node's agent): its pod CIDR is on its own bridge here, so no route.
pub fn wanted_routes(
    nodes: &[Arc<Node>],
    me: &str,
    my_ip: Ipv4Addr,
    service_cidr: Option<Ipv4Net>,
    bridge: Option<u32>,
) -> Vec<Route> {
    let mut v: Vec<Route> = nodes
        .iter()
        .filter(|n| n.metadata.name.as_deref() != Some(me))
        .filter_map(|n| {
            let spec = n.spec.as_ref()?;
            let dst: Ipv4Net = spec.pod_cidr.as_deref()?.parse().ok()?;
            let gw = n
                .status
                .as_ref()?
                .addresses
                .as_ref()?
                .iter()
                .find(|a| a.type_ == "InternalIP")?
                .address
                .parse()
                .ok()?;
            (gw != my_ip).then_some(Route {
                dst: dst.trunc(),
                via: Via::Gateway(gw),
            })
        })
        .collect();
    if let (Some(dst), Some(b)) = (service_cidr, bridge) {
        v.push(Route {
            dst,
            via: Via::Dev(b),
        });
    }
    v.sort();
    v.dedup();
    v
}

/// host-gw: keeps the routes to the other nodes' pod CIDRs in step with the Nodes (and
/// repairs them every 30 s), the Service-range unreachable route, and the masquerade chain.
pub fn network(client: &Client, cfg: &AgentConfig) {
    let nodes: Cache<Node> = Cache::start(Api::all(client.clone()), watcher::Config::default());
    let cfg = cfg.clone();
    tokio::spawn(async move {
        let mut changed = nodes.changed.clone();
        let _ = nodes.store.wait_until_ready().await;
        let mut installed: Option<Vec<Route>> = None;
        let mut masq_ok = false;
        let mut filter = None;
        loop {
            if !masq_ok {
                let services = cfg.service_cidr.map(|cidr| hostgw::ServiceRange {
                    cidr,
                    served: cfg
                        .dns
                        .iter()
                        .flat_map(|d| &d.listen)
                        .filter_map(|ip| match ip {
                            std::net::IpAddr::V4(v) => Some(*v),
                            std::net::IpAddr::V6(_) => None,
                        })
                        .collect(),
                });
                match hostgw::ensure_masquerade(
                    &cfg.bridge,
                    cfg.pod_cidr,
                    cfg.cluster_cidr,
                    services.as_ref(),
                ) {
                    Ok(f) => {
                        if filter != Some(f) {
                            tracing::info!(filter = ?f, "node masquerade and Service reject rules");
                            if f == hostgw::Filter::Nftables {
                                // Left by an earlier version that used iptables.
                                hostgw::remove_iptables_rules();
                            }
                            filter = Some(f);
                        }
                        masq_ok = true
                    }
                    Err(e) => tracing::warn!(error = %e, "masquerade rules"),
                }
            }
            let bridge = hostgw::link_index(&cfg.bridge).await.ok().flatten();
            let wanted = wanted_routes(
                &nodes.store.state(),
                &cfg.node_name,
                cfg.node_ip,
                cfg.service_cidr,
                bridge,
            );
            match hostgw::sync_routes(&wanted).await {
                Ok((added, removed)) => {
                    if added + removed > 0 || installed.as_ref() != Some(&wanted) {
                        tracing::info!(routes = ?wanted.iter().map(|r| r.dst.to_string()).collect::<Vec<_>>(), added, removed, "node routes");
                    }
                    installed = Some(wanted);
                }
                Err(e) => tracing::warn!(error = %e, "syncing node routes"),
            }
            tokio::select! {
                r = changed.changed() => if r.is_err() { return },
                _ = tokio::time::sleep(Duration::from_secs(30)) => masq_ok = false,
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_skip_nodes_at_this_address() {
        let node = |name: &str, cidr: &str, ip: &str| {
            Arc::new(
                serde_json::from_value::<Node>(serde_json::json!({
                    "metadata": {"name": name},
                    "spec": {"podCIDR": cidr},
                    "status": {"addresses": [{"type": "InternalIP", "address": ip}]}
                }))
                .unwrap(),
            )
        };
        let nodes = [
            node("n1", "10.244.0.0/24", "10.250.0.11"),
            node("n2", "10.244.1.0/24", "10.250.0.12"),
            // The agent DaemonSet's extra node beside n1.
            node("n1-keelson", "10.244.2.0/24", "10.250.0.11"),
        ];
        let me: Ipv4Addr = "10.250.0.11".parse().unwrap();
        let svc = Some("10.96.0.0/12".parse().unwrap());
        for name in ["n1", "n1-keelson"] {
            let r = wanted_routes(&nodes, name, me, svc, Some(7));
            assert_eq!(
                r,
                vec![
                    Route {
                        dst: "10.96.0.0/12".parse().unwrap(),
                        via: Via::Dev(7)
                    },
                    Route {
                        dst: "10.244.1.0/24".parse().unwrap(),
                        via: Via::Gateway("10.250.0.12".parse().unwrap())
                    },
                ],
                "{name}"
            );
        }
        // Both agents' Service routes are one route: neither replaces the other's.
        let theirs = wanted_routes(&nodes, "n1-keelson", me, svc, Some(9));
        assert!(r_same(
            &theirs,
            &wanted_routes(&nodes, "n1", me, svc, Some(7))
        ));
        let n2 = wanted_routes(&nodes, "n2", "10.250.0.12".parse().unwrap(), svc, None);
        assert_eq!(n2.len(), 2, "{n2:?}");
    }

    fn r_same(a: &[Route], b: &[Route]) -> bool {
        a.len() == b.len() && a.iter().all(|x| b.iter().any(|y| x.same(y)))
    }

    #[test]
    fn allocatable_is_capacity_minus_reserved() {
        let cap: BTreeMap<&str, String> = [
            ("cpu", "2".to_string()),
            ("memory", "4194304Ki".to_string()),
            ("pods", "110".to_string()),
            ("ephemeral-storage", "1000000000".to_string()),
        ]
        .into();
        let r = parse_reserved("cpu=250m,memory=1Gi,pods=10").unwrap();
        let a = allocatable(&cap, &r);
        assert_eq!(a["cpu"], "1750m");
        assert_eq!(a["memory"], "3145728Ki");
        assert_eq!(a["pods"], "100");
        assert_eq!(a["ephemeral-storage"], "1000000000");
        assert!(
            parse_reserved("gpu=1")
                .unwrap_err()
                .to_string()
                .contains("gpu")
        );
        assert!(
            parse_reserved("cpu")
                .unwrap_err()
                .to_string()
                .contains("NAME=QUANTITY")
        );
        assert!(
            parse_reserved("memory=lots")
                .unwrap_err()
                .to_string()
                .contains("not a quantity")
        );
        assert!(parse_reserved("").unwrap().is_empty());
        let l = parse_node_labels("node.keelson.dev/extra=true, tier=").unwrap();
        assert_eq!(l["node.keelson.dev/extra"], "true");
        assert_eq!(l["tier"], "");
        for bad in ["a", "-a=b", "a=b c", "Bad_Prefix/x=y", "x=-y"] {
            let e = parse_node_labels(bad).unwrap_err();
            assert!(e.to_string().contains("--node-labels"), "{bad}: {e}");
        }
    }
}
