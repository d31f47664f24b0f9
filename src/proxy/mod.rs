//! The service proxy (kube-proxy's job): Services and EndpointSlices, watched, become the
//! backend-neutral [`model::Model`], which a backend programs into the kernel of the node's
//! network namespace. Changes are batched (a burst of events → one sync after
//! `min_sync_period`), a periodic full resync repairs rules someone removed, the first sync
//! removes leftovers of an earlier run, and UDP conntrack entries of endpoints that went away
//! are deleted so that clients stop talking to a dead pod.

pub mod iptables;
pub mod model;
pub mod nft;
pub mod nftables;

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use ipnet::Ipv4Net;
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::{Api, Client, runtime::watcher};

use crate::control::Cache;
use model::{Model, Proto};

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
    Nftables(#[from] nft::NftError),
}

impl Backend {
    fn new(mode: Mode) -> Self {
        match mode {
            Mode::Iptables => Backend::Iptables(None),
            Mode::Nftables => Backend::Nftables(None),
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
    fn apply(&mut self, m: &Model, cidr: Ipv4Net, full: bool) -> Result<(), SyncError> {
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
                let (st, tx) = match state.take() {
                    // Only the Services that changed.
                    Some(mut st) if !full => {
                        let tx = st.update(m);
                        (st, tx)
                    }
                    // Every chain and map rewritten (affinity entries kept).
                    Some(mut st) => {
                        let _ = st.update(m);
                        let tx = nftables::transaction(None, &st.rendered(), true);
                        (st, tx)
                    }
                    None => {
                        nftables::cleanup()?;
                        let mut st = nftables::State::new(cidr);
                        let _ = st.update(m);
                        let tx = nftables::transaction(None, &st.rendered(), false);
                        (st, tx)
                    }
                };
                tx.commit()?;
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

/// UDP endpoints (VIP or node port, endpoint) that were in `old` and are not in `new`.
fn stale_udp(old: &Model, new: &Model) -> BTreeSet<(Ipv4Addr, u16)> {
    let eps = |m: &Model| -> BTreeSet<(Ipv4Addr, u16)> {
        m.ports
            .values()
            .filter(|p| p.proto == Proto::Udp)
            .flat_map(|p| p.all_endpoints().into_iter().map(|e| (e.ip, e.port)))
            .collect()
    };
    eps(old).difference(&eps(new)).copied().collect()
}

/// Deletes the conntrack entries of UDP flows answered by `ep` (conntrack tool).
fn flush_udp(ep: (Ipv4Addr, u16)) {
    let out = std::process::Command::new("conntrack")
        .args(["-D", "-p", "udp", "--reply-src"])
        .arg(ep.0.to_string())
        .args(["--reply-port-src", &ep.1.to_string()])
        .output();
    match out {
        Ok(o) if o.status.success() => {
            tracing::debug!(endpoint = %format!("{}:{}", ep.0, ep.1), "UDP conntrack entries deleted")
        }
        // Exit status 1 with "0 flow entries" means there was nothing to delete.
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "running conntrack (is it installed?)"),
    }
}

/// Runs the proxy until `shutdown`.
pub async fn run(
    client: Client,
    cfg: ProxyConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let services: Cache<Service> =
        Cache::start(Api::all(client.clone()), watcher::Config::default());
    let slices: Cache<EndpointSlice> = Cache::start(Api::all(client), watcher::Config::default());
    let _ = services.store.wait_until_ready().await;
    let _ = slices.store.wait_until_ready().await;
    let (mut a, mut b) = (services.changed.clone(), slices.changed.clone());
    let mut backend = Backend::new(cfg.mode);
    backend.clean_start()?;
    let mut current = Model::default();
    let mut last_full: Option<Instant> = None;
    tokio::pin!(shutdown);
    loop {
        let full = last_full.is_none_or(|t| t.elapsed() >= cfg.sync_period);
        let svcs = services.all();
        let sls = slices.all();
        let t0 = Instant::now();
        let m = model::build(
            &svcs.iter().map(|s| s.as_ref()).collect::<Vec<_>>(),
            &sls.iter().map(|s| s.as_ref()).collect::<Vec<_>>(),
            &cfg.node_name,
        );
        if full || m != current {
            match backend.apply(&m, cfg.cluster_cidr, full) {
                Ok(()) => {
                    for ep in stale_udp(&current, &m) {
                        flush_udp(ep);
                    }
                    tracing::debug!(ports = m.ports.len(), full, took = ?t0.elapsed(), "proxy rules synced");
                    current = m;
                    if full {
                        last_full = Some(Instant::now());
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "syncing proxy rules; retrying with a full sync");
                    last_full = None;
                }
            }
        }
        let wait = if last_full.is_none() {
            Duration::from_secs(1)
        } else {
            cfg.sync_period
        };
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            _ = a.changed() => {},
            _ = b.changed() => {},
            _ = tokio::time::sleep(wait) => {},
        }
        // Batch: whatever else arrives within the window goes into the same sync.
        tokio::time::sleep(cfg.min_sync_period).await;
    }
}

/// `keelson proxy --cleanup`: removes every rule and chain keelson's proxy installed.
pub fn cleanup() -> anyhow::Result<()> {
    iptables::cleanup()?;
    nftables::cleanup()?;
    Ok(())
}
