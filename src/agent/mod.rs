//! The kubelet half of keelson: pod sources (static manifests), one worker per pod, the
//! containerd event router, and the local API. Never programs Service rules (that is `proxy`).

pub mod bootstrap;
pub mod build;
pub mod cluster;
pub mod config;
pub mod image_gc;
pub mod images;
pub mod kubelet_api;
pub mod logs;
pub mod manager;
pub mod manifest;
pub mod memory;
pub mod metrics;
pub mod probe;
pub mod server;
pub mod state;
pub mod statuses;
pub mod storage;
pub mod streaming;
pub mod worker;

use std::{
    collections::{HashMap, HashSet},
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context;
use futures::StreamExt;
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Pod;
use tokio::sync::mpsc;

use crate::{
    net::{self, ipam::Ipam, pod_network::PodNetwork},
    runtime::{
        Containerd, Runtime,
        container::Listed,
        events::RuntimeEvent,
        image::ImageInfo,
        pack::{self, ImageSettings, MemFile},
    },
};
pub use config::AgentConfig;
use worker::{Msg, labels};

/// The pause image keelson builds from its embedded binary.
pub const PAUSE_IMAGE: &str = "keelson.local/pause:1";
/// The embedded static pause binary (built by build.rs from pause/pause.rs).
pub const PAUSE_BINARY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/pause"));

/// State shared by the agent's tasks.
pub struct AgentCtx {
    pub rt: Arc<dyn Runtime>,
    /// Image pulls, one per image at a time.
    pub images: Arc<images::Puller>,
    pub cfg: AgentConfig,
    /// The pod network: the built-in bridge or CNI.
    pub network: Arc<dyn PodNetwork>,
    pub pause: ImageInfo,
    /// Pods with live status, by UID (the status manager).
    pub store: statuses::PodStatuses,
    /// The API server, when the agent is part of a cluster.
    pub client: Option<kube::Client>,
    /// Events about pods (`kubelet` component), in cluster mode.
    pub recorder: Option<crate::control::recorder::Recorder>,
    /// Container ID → the worker that owns it (for runtime events).
    pub routes: Mutex<HashMap<String, mpsc::UnboundedSender<Msg>>>,
    /// Container ID → the stdio of its running process, for `attach` (held by the worker).
    pub attach: Mutex<HashMap<String, std::sync::Weak<streaming::AttachIo>>>,
}

/// The pause image archive (an OCI layout tarball with the static pause binary).
pub fn pause_archive() -> anyhow::Result<Vec<u8>> {
    let layer = pack::layer_from_files(&[MemFile {
        path: "pause",
        mode: 0o755,
        data: PAUSE_BINARY,
    }])?;
    Ok(pack::pack_oci_archive(
        &ImageSettings {
            name: PAUSE_IMAGE.into(),
            entrypoint: vec!["/pause".into()],
            ..Default::default()
        },
        &layer,
    )?)
}

/// Makes sure the pause image is in containerd; imports it from the binary when missing.
pub async fn ensure_pause(rt: &Containerd) -> anyhow::Result<ImageInfo> {
    match rt.image_info(PAUSE_IMAGE).await {
        Ok(i) => Ok(i),
        Err(crate::runtime::Error::ImageNotFound(_)) => {
            rt.import_archive("pause image", &pause_archive()?).await?;
            Ok(rt.image_info(PAUSE_IMAGE).await?)
        }
        Err(e) => Err(e.into()),
    }
}

/// Imports every tarball in `dir` (airgap images); errors are logged per file.
pub async fn import_dir(rt: &Containerd, dir: &Path) -> Vec<String> {
    let mut imported = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return imported;
    };
    let mut files: Vec<_> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "tar"))
        .collect();
    files.sort();
    for f in files {
        let what = f.display().to_string();
        match std::fs::read(&f) {
            Ok(bytes) => match rt.import_archive(&what, &bytes).await {
                Ok(names) => {
                    tracing::info!(file = %what, images = ?names, "imported images");
                    imported.extend(names);
                }
                Err(e) => tracing::warn!(file = %what, error = %e, "image import failed"),
            },
            Err(e) => tracing::warn!(file = %what, error = %e, "cannot read image archive"),
        }
    }
    imported
}

/// Connects to containerd, retrying for up to `patience`.
pub async fn connect_containerd(
    socket: &Path,
    ns: &str,
    patience: Duration,
) -> anyhow::Result<Containerd> {
    let deadline = std::time::Instant::now() + patience;
    loop {
        match Containerd::connect(socket, ns).await {
            Ok(rt) if rt.version().await.is_ok() => return Ok(rt),
            Ok(_) | Err(_) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Ok(rt) => {
                rt.version().await?;
                return Ok(rt);
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Runs the standalone agent until `shutdown` resolves. Pods keep running after it returns.
pub async fn run(
    mut cfg: AgentConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    prepare_dirs(&cfg)?;
    let rt = connect_containerd(&cfg.containerd, &cfg.namespace, Duration::from_secs(30))
        .await
        .with_context(|| format!("containerd at {}", cfg.containerd.display()))?;
    // Images first: a node that reports Ready can start pods at once.
    let pause = ensure_pause(&rt).await.context("pause image")?;
    // The pause image and the node's own archives are never collected.
    let mut pinned = import_dir(&rt, &cfg.images_dir).await;
    pinned.push(crate::runtime::image::normalize_ref(PAUSE_IMAGE));
    // Joining a cluster: the node's own certificate, then register the Node, and take the pod
    // CIDR the cluster assigns.
    let (cluster, join_ca) = match cfg.join.clone() {
        Some(join) => {
            let j = join_cluster(&join, &mut cfg, &rt).await?;
            (Some((j.client, j.pods)), j.ca_pem)
        }
        None => (None, None),
    };
    let network = pod_network(&cfg).await?;
    let recorder = cluster
        .as_ref()
        .map(|(c, _)| crate::control::recorder::Recorder::new(c.clone(), "kubelet"));
    image_gc::start(
        rt.clone(),
        cfg.image_gc.clone(),
        Arc::new(pinned.into_iter().collect()),
        recorder.clone().map(|recorder| image_gc::NodeEvents {
            recorder,
            node: cfg.node_name.clone(),
        }),
    );
    let rt: Arc<dyn Runtime> = Arc::new(rt);
    let ctx = Arc::new(AgentCtx {
        images: images::Puller::new(rt.clone(), cfg.pulls.clone()),
        rt,
        cfg: cfg.clone(),
        network,
        pause,
        store: statuses::PodStatuses::default(),
        client: cluster.as_ref().map(|(c, _)| c.clone()),
        recorder,
        routes: Mutex::new(HashMap::new()),
        attach: Mutex::new(HashMap::new()),
    });
    // Events first, so that no exit between adoption and subscription is lost for long
    // (the workers' relist repairs the rest).
    let events = tokio::spawn(route_events(ctx.clone()));
    let listener = server::bind(&cfg.socket())
        .with_context(|| format!("agent socket {}", cfg.socket().display()))?;
    if let Some((client, pods)) = &cluster {
        start_cluster_roles(client, pods, &ctx, join_ca).await?;
    }
    let mut api_changed = cluster.as_ref().map(|(_, p)| p.changed.clone());
    let mut mirrors = cluster::Mirrors::new();
    let server = {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            if let Err(e) = server::serve(ctx, listener).await {
                tracing::error!(error = %e, "agent API stopped");
            }
        })
    };

    let adopted = existing_containers(ctx.rt.as_ref()).await?;
    let (notify_tx, mut notify_rx) = mpsc::unbounded_channel::<()>();
    if let Some(dir) = &cfg.manifests {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        watch_dir(dir.clone(), notify_tx.clone());
    }
    let mut source = manifest::ManifestSource::default();
    let (mut pods, mut done_rx) = manager::PodManager::new(ctx.clone(), adopted);
    let mut first = true;
    tokio::pin!(shutdown);
    crate::systemd::notify("READY=1");
    loop {
        let statics = static_pods(&mut source, &cfg);
        let api = cluster.as_ref().map(|(_, p)| p.all());
        if let (Some((client, _)), Some(api)) = (&cluster, &api) {
            let pods: Vec<Pod> = statics.iter().map(|sp| sp.pod.clone()).collect();
            mirrors.sync(client, &pods, api, &cfg.node_name);
        }
        pods.sync(statics, api.as_deref());
        if first {
            first = false;
            clean_up_orphans(&ctx, pods.take_orphans(), &pods.live());
        }
        tokio::select! {
            _ = &mut shutdown => break,
            _ = notify_rx.recv() => {
                // Let a burst of file events settle.
                tokio::time::sleep(Duration::from_millis(10)).await;
                while notify_rx.try_recv().is_ok() {}
            }
            Some(uid) = done_rx.recv() => pods.finished(&uid),
            _ = async {
                match api_changed.as_mut() {
                    Some(rx) => { let _ = rx.changed().await; }
                    None => std::future::pending::<()>().await,
                }
            } => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            _ = tokio::time::sleep(cfg.rescan) => {}
        }
    }
    tracing::info!("agent stopping; pods keep running");
    events.abort();
    server.abort();
    pods.abort();
    let _ = std::fs::remove_file(cfg.socket());
    Ok(())
}

/// A node that joined its cluster.
struct Joined {
    client: kube::Client,
    /// The pods bound to this node, followed.
    pods: crate::control::Cache<Pod>,
    /// The cluster CA, as the join found it.
    ca_pem: Option<String>,
}

/// The pod network the configuration names: CNI (a broken config is said at start; the
/// plugins make the bridge) or the built-in bridge, made now.
async fn pod_network(cfg: &AgentConfig) -> anyhow::Result<Arc<dyn PodNetwork>> {
    if let Some(cni) = &cfg.cni {
        let list = cni.config(cfg.pod_cidr)?;
        tracing::info!(network = %list["name"], dir = %cni.conf_dir.display(), "pod network through CNI");
        return Ok(Arc::new(net::pod_network::CniNetwork {
            cni: cni.clone(),
            pod_cidr: cfg.pod_cidr,
        }));
    }
    let ipam = Ipam::new(cfg.pod_cidr, &cfg.ipam_dir())?;
    net::ensure_bridge(&cfg.bridge, ipam.gateway(), cfg.pod_cidr.prefix_len())
        .await
        .context("node bridge")?;
    Ok(Arc::new(net::pod_network::Bridge {
        ipam,
        bridge: cfg.bridge.clone(),
    }))
}

/// The data and pod directories hold tokens and Secrets: root only (kubelet: 0750 pods).
fn prepare_dirs(cfg: &AgentConfig) -> anyhow::Result<()> {
    for (d, mode) in [
        (cfg.data_dir.clone(), 0o700),
        (cfg.pods_dir(), 0o700),
        (cfg.fifo_dir(), 0o700),
    ] {
        crate::runtime::private_dir(&d, mode)
            .with_context(|| format!("creating {}", d.display()))?;
    }
    for d in [cfg.log_dir.clone(), cfg.images_dir.clone()] {
        std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    }
    Ok(())
}

/// Containers that already run, by pod UID (after an agent restart).
async fn existing_containers(rt: &dyn Runtime) -> anyhow::Result<HashMap<String, Vec<Listed>>> {
    let mut adopted: HashMap<String, Vec<Listed>> = HashMap::new();
    for l in rt.list_with_label(labels::POD_UID).await? {
        if let Some(uid) = l.labels.get(labels::POD_UID).cloned() {
            adopted.entry(uid).or_default().push(l);
        }
    }
    tracing::info!(
        containers = adopted.values().map(Vec::len).sum::<usize>(),
        "found existing containers"
    );
    Ok(adopted)
}

/// The static pods of the manifest directory (bad files are said, and skipped).
fn static_pods(
    source: &mut manifest::ManifestSource,
    cfg: &AgentConfig,
) -> Vec<manifest::StaticPod> {
    let Some(dir) = &cfg.manifests else {
        return vec![];
    };
    let (pods, errors) = source.scan(dir, &cfg.node_name);
    for e in errors {
        tracing::error!(file = %e.file.display(), "bad manifest: {}", e.message);
    }
    pods
}

/// Joins the cluster: the node's credentials, the Node registered (its pod CIDR taken into
/// `cfg`), the heartbeat started and the node's pods listed.
async fn join_cluster(
    join: &cluster::Join,
    cfg: &mut AgentConfig,
    rt: &Containerd,
) -> anyhow::Result<Joined> {
    let joined = cluster::client(join, &cfg.node_name, Some(&cfg.pki_dir()))
        .await
        .context("the node's credentials")?;
    let client = joined.client;
    let version = rt.version().await.unwrap_or_default();
    let cidr = cluster::register(&client, cfg, rt, &version, Duration::from_secs(60))
        .await
        .context("registering the node")?;
    match cidr {
        Some(c) if c != cfg.pod_cidr => {
            tracing::info!(pod_cidr = %c, "using the pod CIDR the cluster assigned");
            // The bridge address follows the CIDR when it stood for the node's address.
            let gw = |n: Ipv4Net| std::net::Ipv4Addr::from(u32::from(n.network()) + 1);
            if cfg.node_ip == gw(cfg.pod_cidr) {
                cfg.node_ip = gw(c);
            }
            cfg.pod_cidr = c;
        }
        Some(_) => {}
        None => {
            tracing::warn!(pod_cidr = %cfg.pod_cidr, "no pod CIDR assigned by the cluster; using --pod-cidr")
        }
    }
    cluster::heartbeat(client.clone(), cfg.clone(), rt.clone(), version);
    storage::start(
        client.clone(),
        storage::root(&cfg.data_dir),
        cfg.node_name.clone(),
    );
    let pods = cluster::pods(&client, &cfg.node_name);
    let _ = pods.store.wait_until_ready().await;
    Ok(Joined {
        client,
        pods,
        ca_pem: joined.ca_pem,
    })
}

/// The cluster DNS addresses on this node and the server on them.
async fn start_dns(dc: &crate::dns::DnsConfig) -> anyhow::Result<Arc<crate::dns::Server>> {
    crate::net::ensure_local_addrs(&dc.listen)
        .await
        .context("adding the cluster DNS addresses")?;
    Ok(crate::dns::start(dc).await?)
}

/// The node's cluster roles: host-gw routes, the service proxy, the status publisher and the
/// kubelet API (with its serving certificate, rotated).
async fn start_cluster_roles(
    client: &kube::Client,
    pods: &crate::control::Cache<Pod>,
    ctx: &Arc<AgentCtx>,
    join_ca: Option<String>,
) -> anyhow::Result<()> {
    let cfg = &ctx.cfg;
    cluster::network(client, cfg);
    // The cluster DNS: its addresses on this node, its sockets, and its zone fed by the
    // proxy's watches (or watches of its own when the proxy is off).
    let mut zone: Option<Box<dyn crate::proxy::Subscriber>> = None;
    if let Some(dc) = &cfg.dns {
        match start_dns(dc).await {
            Ok(server) => zone = Some(Box::new(server.feed())),
            // Someone else answers there (another agent on this node, NodeLocal DNS): the
            // node's pods still ask the address; this agent just does not serve it.
            Err(e) => tracing::error!(
                error = %format!("{e:#}"),
                "the cluster DNS is not served by this agent (--serve-cluster-dns=false says so on purpose)"
            ),
        }
    }
    let client2 = client.clone();
    match (cfg.proxy.clone(), zone) {
        (Some(pc), zone) => {
            tokio::spawn(async move {
                if let Err(e) = crate::proxy::run(client2, pc, zone, std::future::pending()).await {
                    tracing::error!(error = %format!("{e:#}"), "service proxy stopped");
                }
            });
        }
        (None, Some(zone)) => {
            tokio::spawn(async move {
                if let Err(e) = crate::proxy::feed(client2, zone).await {
                    tracing::error!(error = %format!("{e:#}"), "cluster DNS watches stopped");
                }
            });
        }
        (None, None) => {}
    }
    cluster::publish_statuses(client.clone(), ctx.clone(), pods.clone());
    if cfg.kubelet_port == 0 {
        return Ok(());
    }
    // Callers: certificates of the cluster CA (--client-ca-file, else the CA the agent
    // joined with), and then only the API server's kubelet client.
    let ca = match &cfg.client_ca_file {
        Some(f) => Some(
            std::fs::read_to_string(f)
                .with_context(|| format!("reading --client-ca-file {}", f.display()))?,
        ),
        None => join_ca,
    };
    if ca.is_none() {
        tracing::warn!(
            "no client CA (--client-ca-file): the kubelet API serves only /healthz, so `kubectl logs` and `exec` cannot reach this node"
        );
    }
    // The kept certificate the cluster issued, else a self-signed one at first; a new one is
    // asked for in the background (and again at 80 % of each one's life) and served once
    // issued.
    let kept = bootstrap::kept_serving(&cfg.pki_dir(), &cfg.node_name);
    let first = match &kept {
        Some(c) => c.clone(),
        None => kubelet_api::self_signed(ctx)?,
    };
    let serving = crate::tls::CertSwitch::new(&first.cert_pem, &first.key_pem)?;
    tokio::spawn(bootstrap::rotate_serving(
        client.clone(),
        cfg.node_name.clone(),
        std::net::IpAddr::V4(cfg.node_ip),
        cfg.pki_dir(),
        serving.clone(),
        kept,
    ));
    kubelet_api::start(ctx.clone(), cfg.kubelet_port, serving, ca).await?;
    Ok(())
}

/// Pods found at start that no manifest or API pod wants: stopped, and their addresses freed
/// along with any address whose owner runs no worker.
fn clean_up_orphans(
    ctx: &Arc<AgentCtx>,
    orphans: HashMap<String, Vec<Listed>>,
    live: &HashSet<String>,
) {
    for (uid, conts) in orphans {
        tracing::info!(uid = %uid, "removing orphaned pod");
        let ctx = ctx.clone();
        tokio::spawn(async move { remove_orphan(&ctx, &uid, conts).await });
    }
    for owner in ctx.network.holders() {
        if !live.contains(&owner) {
            tracing::info!(owner = %owner, "releasing a leaked pod IP");
            ctx.network.release(&owner);
        }
    }
}

/// Stops and removes the containers of a pod nobody wants, and frees its network. Its spec is
/// unknown, so it gets kubelet's minimum grace period of 2 s.
async fn remove_orphan(ctx: &AgentCtx, uid: &str, conts: Vec<Listed>) {
    let rt = &ctx.rt;
    let apps = conts
        .iter()
        .filter(|c| c.labels.get(labels::KIND).map(String::as_str) != Some("sandbox"));
    let no_hook = None::<std::future::Ready<()>>;
    futures::future::join_all(apps.map(|c| {
        worker::graceful_stop(rt.as_ref(), &c.id, Duration::from_secs(2), no_hook.clone())
    }))
    .await;
    // The network first, while the sandbox (and its namespace) still exists (CNI DEL).
    for c in conts
        .iter()
        .filter(|c| c.labels.get(labels::KIND).map(String::as_str) == Some("sandbox"))
    {
        let pid = match rt.task_state(&c.id).await {
            Ok(crate::runtime::container::TaskState::Running { pid }) => Some(pid),
            _ => None,
        };
        let label = |k: &str| c.labels.get(k).cloned().unwrap_or_default();
        let pod = net::cni::PodRef {
            namespace: label(labels::POD_NAMESPACE),
            name: label(labels::POD_NAME),
            uid: uid.to_string(),
        };
        ctx.network.detach(&pod, Some(&c.id), pid).await;
    }
    for c in &conts {
        worker::remove_container(rt.as_ref(), &c.id).await;
        let fifo = ctx.cfg.fifo_dir();
        for suffix in ["in", "out", "err"] {
            let _ = std::fs::remove_file(fifo.join(format!("{}.{suffix}", c.id)));
        }
    }
    tracing::info!(uid, containers = conts.len(), "orphaned pod removed");
    let pod = net::cni::PodRef {
        namespace: String::new(),
        name: String::new(),
        uid: uid.to_string(),
    };
    ctx.network.detach(&pod, None, None).await;
    ctx.network.release(uid);
    let dir = ctx.cfg.pods_dir().join(uid);
    if let Err(e) = build::safe_fs::remove_tree(&dir) {
        tracing::warn!(uid, error = %e, "removing an orphaned pod's directory");
    }
    build::forget_projections(&dir);
    if let Some(c) = conts.first()
        && let (Some(ns), Some(name)) = (
            c.labels.get(labels::POD_NAMESPACE),
            c.labels.get(labels::POD_NAME),
        )
    {
        let _ = std::fs::remove_dir_all(ctx.cfg.log_dir.join(format!("{ns}_{name}_{uid}")));
    }
}

/// Routes containerd task events to the worker owning the container; resubscribes on failure.
async fn route_events(ctx: Arc<AgentCtx>) {
    loop {
        match ctx.rt.events().await {
            Ok(stream) => {
                tokio::pin!(stream);
                while let Some(ev) = stream.next().await {
                    let ev = match ev {
                        Ok(ev) => ev,
                        Err(e) => {
                            tracing::warn!(error = %e, "containerd event stream");
                            break;
                        }
                    };
                    let (cid, msg) = match ev {
                        RuntimeEvent::Exit {
                            container_id,
                            exec_id,
                            exit_code,
                            exited_at,
                        } => {
                            if exec_id != container_id && !exec_id.is_empty() {
                                continue; // an exec process, not the container
                            }
                            let m = Msg::Exit {
                                cid: container_id.clone(),
                                code: exit_code,
                                at: exited_at,
                            };
                            (container_id, m)
                        }
                        RuntimeEvent::Oom { container_id } => {
                            let m = Msg::Oom {
                                cid: container_id.clone(),
                            };
                            (container_id, m)
                        }
                    };
                    let tx = ctx.routes.lock().ok().and_then(|r| r.get(&cid).cloned());
                    if let Some(tx) = tx {
                        let _ = tx.send(msg);
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "subscribing to containerd events"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Watches a directory with inotify on a blocking thread; each event sends a notification.
fn watch_dir(dir: std::path::PathBuf, tx: mpsc::UnboundedSender<()>) {
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    std::thread::spawn(move || {
        let ino = match Inotify::init(InitFlags::IN_CLOEXEC) {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!(error = %e, "inotify unavailable; relying on periodic rescans");
                return;
            }
        };
        let flags = AddWatchFlags::IN_CREATE
            | AddWatchFlags::IN_DELETE
            | AddWatchFlags::IN_CLOSE_WRITE
            | AddWatchFlags::IN_MOVED_TO
            | AddWatchFlags::IN_MOVED_FROM
            | AddWatchFlags::IN_MODIFY;
        if let Err(e) = ino.add_watch(&dir, flags) {
            tracing::warn!(error = %e, dir = %dir.display(), "cannot watch manifest directory");
            return;
        }
        while let Ok(events) = ino.read_events() {
            if !events.is_empty() && tx.send(()).is_err() {
                return;
            }
        }
    });
}
