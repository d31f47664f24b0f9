//! The service proxy (kube-proxy's job): Services and EndpointSlices, watched, become the
//! backend-neutral [`model::Model`], which a backend programs into the kernel of the node's
//! network namespace. Changes are batched (a burst of events → one sync after
//! `min_sync_period`), a periodic full resync repairs rules someone removed, the first sync
//! removes leftovers of an earlier run, and UDP conntrack entries of endpoints that went away
//! are deleted so that clients stop talking to a dead pod.

pub mod conntrack;
pub mod health;
pub mod index;
pub mod iptables;
pub mod model;
pub mod nftables;

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use futures::StreamExt;
use ipnet::Ipv4Net;
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::{
    Api, Client,
    runtime::{WatchStreamExt, watcher},
};

use model::{Model, Proto, ServicePort};

/// Which kernel interface programs the rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Iptables,
    Nftables,
}

impl Mode {
    /// nftables where the kernel takes nf_tables transactions, else iptables (the default of
    /// `--proxy-mode`). Probes in the calling thread's network namespace.
    pub fn detect() -> Mode {
        if nftables::supported() {
            Mode::Nftables
        } else {
            tracing::warn!("nf_tables is not usable here; the proxy uses iptables");
            Mode::Iptables
        }
    }
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "iptables" => Ok(Mode::Iptables),
            "nftables" => Ok(Mode::Nftables),
            o => Err(format!("--proxy-mode {o:?}: iptables or nftables")),
        }
    }
}

/// Settings of the proxy.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub node_name: String,
    /// The cluster's pod network: traffic to a ClusterIP from outside it is masqueraded.
    pub cluster_cidr: Ipv4Net,
    pub mode: Mode,
    /// Changes arriving within this window are applied together.
    pub min_sync_period: Duration,
    /// A full resync (rewrites every chain, repairs what someone removed) at least this often.
    pub sync_period: Duration,
    /// kube-proxy's /healthz port (None: not served).
    pub healthz_port: Option<u16>,
    /// ClusterIPs this node serves itself (the cluster DNS, bound locally): no rules, so
    /// their packets reach the local sockets.
    pub local_vips: Vec<Ipv4Addr>,
}

/// Another consumer of the proxy's Service and EndpointSlice watches (the cluster DNS): sees
/// every event, as it arrives, before the proxy's own index takes it. One watch per kind
/// feeds both.
pub trait Subscriber: Send {
    fn service(&mut self, ev: &watcher::Event<Service>);
    fn slice(&mut self, ev: &watcher::Event<EndpointSlice>);
}

/// What was loaded last, per backend.
enum Backend {
    Iptables(Option<iptables::Rendered>),
    /// None: the table is rebuilt from scratch at the next sync (start, or after an error).
    Nftables(Option<nftables::State>),
}

#[derive(Debug, thiserror::Error)]
enum SyncError {
    #[error(transparent)]
    Iptables(#[from] iptables::IptError),
    #[error(transparent)]
    Nftables(#[from] crate::net::nft::NftError),
}

impl Backend {
    fn new(mode: Mode) -> Self {
        match mode {
            Mode::Iptables => Backend::Iptables(None),
            Mode::Nftables => Backend::Nftables(None),
        }
    }

    /// Forgets what was loaded: the next sync rebuilds from scratch.
    fn reset(&mut self) {
        match self {
            Backend::Iptables(l) => *l = None,
            Backend::Nftables(st) => *st = None,
        }
    }

    /// Removes what an earlier run left: the other backend's rules, and (nftables) the table.
    fn clean_start(&self) -> Result<(), SyncError> {
        match self {
            Backend::Iptables(_) => {
                if let Err(e) = nftables::cleanup() {
                    tracing::debug!(error = %e, "removing the nftables table");
                }
            }
            Backend::Nftables(_) => {
                if let Err(e) = iptables::cleanup() {
                    tracing::debug!(error = %e, "removing iptables rules");
                }
                nftables::cleanup()?;
            }
        }
        Ok(())
    }

    /// Applies `m`: a delta against what was loaded, or a full sync (every chain rewritten,
    /// leftovers of an earlier run and whatever someone changed repaired).
    /// `keys`: the port keys that may have changed, when known (not after a relist).
    fn apply(
        &mut self,
        m: &Model,
        keys: Option<&BTreeSet<String>>,
        cidr: Ipv4Net,
        full: bool,
    ) -> Result<(), SyncError> {
        match self {
            Backend::Iptables(loaded) => {
                let new = iptables::render(m, cidr);
                let old = if full {
                    Some(existing_chains()?)
                } else {
                    loaded.clone()
                };
                if old.as_ref() == Some(&new) {
                    return Ok(());
                }
                let input = iptables::restore_input(old.as_ref(), &new);
                iptables::restore(&input)?;
                if full {
                    iptables::ensure_jumps()?;
                }
                *loaded = Some(new);
            }
            Backend::Nftables(state) => {
                // A full load over an existing table is followed by removing what the state
                // does not hold (released by the reset, or someone else's).
                let (st, tx, prune) = match state.take() {
                    // Only the Services that changed.
                    Some(mut st) if !full => {
                        let tx = match keys {
                            Some(k) => st.update_keys(m, k),
                            None => st.update(m),
                        };
                        (st, tx, false)
                    }
                    // Every chain and map rewritten (affinity entries kept).
                    Some(mut st) => {
                        st.reset(m);
                        let tx = st.load(true);
                        (st, tx, true)
                    }
                    None => {
                        nftables::cleanup()?;
                        let mut st = nftables::State::new(cidr);
                        st.reset(m);
                        let tx = st.load(false);
                        (st, tx, false)
                    }
                };
                tx.commit()?;
                if prune {
                    match nftables::remove_foreign(&st) {
                        Ok(0) => {}
                        Ok(n) => {
                            tracing::debug!(n, "removed chains and sets the state does not hold")
                        }
                        // The table works without it; the next full sync tries again.
                        Err(e) => {
                            tracing::warn!(error = %e, "removing chains and sets the state does not hold")
                        }
                    }
                }
                *state = Some(st);
            }
        }
        Ok(())
    }
}

/// The KUBE-* chains present in the kernel, with contents that never equal a rendered one
/// (so a full sync declares and refills every wanted chain, and deletes the others).
fn existing_chains() -> Result<iptables::Rendered, iptables::IptError> {
    let mut r = iptables::Rendered::default();
    for (table, names) in iptables::kernel_chains()? {
        let chains = if table == "nat" {
            &mut r.nat
        } else {
            &mut r.filter
        };
        for n in names {
            chains.insert(n, vec!["(in the kernel)".into()]);
        }
    }
    Ok(r)
}

/// UDP endpoints of the previous versions of changed ports that the ports' new versions (or,
/// after a full rebuild, all UDP ports) no longer use.
fn stale_udp(old: &[ServicePort], new: &Model, ch: &index::Changed) -> BTreeSet<(Ipv4Addr, u16)> {
    let eps = |p: &ServicePort| {
        p.all_endpoints()
            .into_iter()
            .map(|e| (e.ip, e.port))
            .collect::<BTreeSet<_>>()
    };
    let before: BTreeSet<(Ipv4Addr, u16)> = old
        .iter()
        .filter(|p| p.proto == Proto::Udp)
        .flat_map(eps)
        .collect();
    let after: BTreeSet<(Ipv4Addr, u16)> = if ch.all {
        new.ports
            .values()
            .filter(|p| p.proto == Proto::Udp)
            .flat_map(eps)
            .collect()
    } else {
        ch.keys
            .iter()
            .filter_map(|k| new.ports.get(k))
            .filter(|p| p.proto == Proto::Udp)
            .flat_map(eps)
            .collect()
    };
    before.difference(&after).copied().collect()
}

/// Deletes the conntrack entries of UDP flows answered by `ep`: through ctnetlink, or with the
/// conntrack tool where the kernel does not take filtered flushes.
fn flush_udp(ep: (Ipv4Addr, u16)) {
    match conntrack::delete_udp_replies_from(ep.0, ep.1) {
        Ok(()) => {
            tracing::debug!(endpoint = %format!("{}:{}", ep.0, ep.1), "UDP conntrack entries deleted");
            return;
        }
        Err(e) => tracing::debug!(error = %e, "ctnetlink flush refused; using the conntrack tool"),
    }
    let out = std::process::Command::new("conntrack")
        .args(["-D", "-p", "udp", "--reply-src"])
        .arg(ep.0.to_string())
        .args(["--reply-port-src", &ep.1.to_string()])
        .output();
    match out {
        // Exit status 1 with "0 flow entries" means there was nothing to delete.
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "running conntrack (is it installed?)"),
    }
}

type Watch<K> = std::pin::Pin<
    Box<dyn futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send>,
>;

/// The Service and EndpointSlice watches (with kube's default back-off).
fn watches(client: Client) -> (Watch<Service>, Watch<EndpointSlice>) {
    let wc = watcher::Config::default;
    (
        watcher(Api::<Service>::all(client.clone()), wc())
            .default_backoff()
            .boxed(),
        watcher(Api::<EndpointSlice>::all(client), wc())
            .default_backoff()
            .boxed(),
    )
}

/// Feeds `sub` from the watches without programming anything (the cluster DNS on a node
/// whose proxy is off).
pub async fn feed(client: Client, mut sub: Box<dyn Subscriber>) -> anyhow::Result<()> {
    let (mut services, mut slices) = watches(client);
    loop {
        tokio::select! {
            ev = services.next() => match ev {
                Some(Ok(ev)) => sub.service(&ev),
                Some(Err(e)) => tracing::debug!(error = %e, "watching Services; retrying"),
                None => anyhow::bail!("the Service watch ended"),
            },
            ev = slices.next() => match ev {
                Some(Ok(ev)) => sub.slice(&ev),
                Some(Err(e)) => tracing::debug!(error = %e, "watching EndpointSlices; retrying"),
                None => anyhow::bail!("the EndpointSlice watch ended"),
            },
        }
    }
}

/// Runs the proxy until `shutdown`; `sub` sees every event too.
pub async fn run(
    client: Client,
    cfg: ProxyConfig,
    mut sub: Option<Box<dyn Subscriber>>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let (mut services, mut slices) = watches(client);
    let mut index = index::Index::new(&cfg.node_name, &cfg.local_vips);
    let mut health = health::Health::default();
    let mut backend = Backend::new(cfg.mode);
    backend.clean_start()?;
    let synced = health::LastSync::default();
    if let Some(port) = cfg.healthz_port {
        // Healthy while full syncs keep succeeding (kube-proxy: within twice the period). The
        // port may still be held by the proxy this one replaces (a DaemonSet's rolling update
        // of hostNetwork pods): kube-proxy keeps trying to listen, and so does this.
        let (synced, within) = (synced.clone(), cfg.sync_period * 2 + Duration::from_secs(5));
        tokio::spawn(async move {
            let mut said = false;
            loop {
                match tokio::net::TcpListener::bind(("0.0.0.0", port)).await {
                    Ok(l) => {
                        if said {
                            tracing::info!(port, "healthz serving");
                        }
                        return health::serve_healthz(l, synced, within).await;
                    }
                    Err(e) if !said => {
                        tracing::warn!(port, error = %e, "--healthz-port: cannot listen yet; trying again every second");
                        said = true;
                    }
                    Err(_) => {}
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }
    let mut last_full: Option<Instant> = None;
    // When the next sync is due: a burst of events within `min_sync_period` is one sync.
    let mut due: Option<tokio::time::Instant> = None;
    tokio::pin!(shutdown);
    loop {
        let full_at = last_full.map_or_else(tokio::time::Instant::now, |t| {
            tokio::time::Instant::from_std(t + cfg.sync_period)
        });
        let wake = if index.ready() {
            due.map_or(full_at, |d| d.min(full_at))
        } else {
            tokio::time::Instant::now() + Duration::from_secs(3600)
        };
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            ev = services.next() => match ev {
                Some(Ok(ev)) => {
                    if let Some(s) = sub.as_mut() {
                        s.service(&ev);
                    }
                    index.service_event(ev)
                }
                Some(Err(e)) => tracing::debug!(error = %e, "watching Services; retrying"),
                None => anyhow::bail!("the Service watch ended"),
            },
            ev = slices.next() => match ev {
                Some(Ok(ev)) => {
                    if let Some(s) = sub.as_mut() {
                        s.slice(&ev);
                    }
                    index.slice_event(ev)
                }
                Some(Err(e)) => tracing::debug!(error = %e, "watching EndpointSlices; retrying"),
                None => anyhow::bail!("the EndpointSlice watch ended"),
            },
            _ = tokio::time::sleep_until(wake) => {
                let t0 = Instant::now();
                let full = last_full.is_none_or(|t| t.elapsed() >= cfg.sync_period);
                let ch = index.sync();
                due = None;
                let keys = (!ch.all).then_some(&ch.keys);
                // A full sync also re-reads every health check port (and retries a listener
                // that could not bind before).
                health.sync(&index.model, if full { None } else { keys });
                match backend.apply(&index.model, keys, cfg.cluster_cidr, full) {
                    Ok(()) => {
                        for ep in stale_udp(&ch.old, &index.model, &ch) {
                            flush_udp(ep);
                        }
                        tracing::debug!(ports = index.model.ports.len(), changed = ch.keys.len(), full, took = ?t0.elapsed(), "proxy rules synced");
                        if full {
                            last_full = Some(Instant::now());
                        }
                        synced.mark();
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "syncing proxy rules; retrying with a full sync in 1 s");
                        last_full = Some(Instant::now() - cfg.sync_period + Duration::from_secs(1));
                        backend.reset();
                    }
                }
                continue;
            }
        }
        if index.pending() && due.is_none() {
            due = Some(tokio::time::Instant::now() + cfg.min_sync_period);
        }
    }
}

/// `keelson proxy --cleanup`: removes every rule and chain keelson's proxy installed.
pub fn cleanup() -> anyhow::Result<()> {
    iptables::cleanup()?;
    nftables::cleanup()?;
    Ok(())
}
