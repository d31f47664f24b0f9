//! Owns the pod network on this node: the bridge `keelson0`, each pod's veth pair, addresses
//! and routes, through rtnetlink (no `ip` commands). Never calls containerd or the API server.

pub mod cni;
pub mod hostgw;
pub mod ipam;
pub mod nft;
pub mod pod_network;
pub mod xtables;

use std::{net::Ipv4Addr, os::fd::AsRawFd};

use futures::TryStreamExt;
use rtnetlink::{Handle, LinkBridge, LinkUnspec, LinkVeth, RouteMessageBuilder};
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("netlink {op}: {source}")]
    Netlink {
        op: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("link {0} not found")]
    NoLink(String),
    #[error(transparent)]
    Xtables(#[from] xtables::XtError),
}

pub type Result<T, E = NetError> = std::result::Result<T, E>;

fn nl(op: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetError {
    let op = op.into();
    move |source| NetError::Netlink { op, source }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> NetError {
    let what = what.into();
    move |source| NetError::Io { what, source }
}

/// The node bridge's default name.
pub const BRIDGE: &str = "keelson0";

/// The host-side veth name of a pod: stable for its UID, at most 15 bytes.
pub fn host_veth_name(pod_uid: &str) -> String {
    let h = hex::encode(Sha256::digest(pod_uid.as_bytes()));
    format!("veth{}", &h[..10])
}

fn connect() -> Result<Handle> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(io("netlink socket"))?;
    tokio::spawn(conn);
    Ok(handle)
}

async fn link_index(h: &Handle, name: &str) -> Result<Option<u32>> {
    let mut links = h.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(Some(l)) => Ok(Some(l.header.index)),
        Ok(None) => Ok(None),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
        Err(e) => Err(nl(format!("get link {name}"))(e)),
    }
}

async fn has_addr(h: &Handle, index: u32, ip: impl Into<std::net::IpAddr>) -> Result<bool> {
    let ip = ip.into();
    use netlink_packet_route::address::AddressAttribute;
    let mut addrs = h.address().get().set_link_index_filter(index).execute();
    while let Some(a) = addrs.try_next().await.map_err(nl("get addresses"))? {
        for attr in a.attributes {
            if let AddressAttribute::Address(v) = attr
                && v == ip
            {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// Creates the bridge (if missing) with the gateway address, brings it up, enables forwarding.
/// Acts in the caller's network namespace, which is the node's.
pub async fn ensure_bridge(name: &str, gateway: Ipv4Addr, prefix: u8) -> Result<()> {
    let h = connect()?;
    let idx = match link_index(&h, name).await? {
        Some(i) => i,
        None => {
            h.link()
                .add(LinkBridge::new(name).build())
                .execute()
                .await
                .map_err(nl(format!("add bridge {name}")))?;
            link_index(&h, name)
                .await?
                .ok_or_else(|| NetError::NoLink(name.into()))?
        }
    };
    if !has_addr(&h, idx, gateway).await? {
        h.address()
            .add(idx, gateway.into(), prefix)
            .execute()
            .await
            .map_err(nl(format!("add address {gateway}/{prefix} to {name}")))?;
    }
    h.link()
        .set(LinkUnspec::new_with_index(idx).up().build())
        .execute()
        .await
        .map_err(nl(format!("set {name} up")))?;
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").map_err(io("enable ip_forward"))?;
    Ok(())
}

/// The label of the addresses this node answers on without a wire (the cluster DNS), on its
/// loopback: what tells them apart from the host's own for removal. (A dummy link would do
/// too, but not every kernel has the module; an address on `lo` works everywhere: packets to
/// a local address are delivered whatever interface they came in on.)
pub const LOCAL_LABEL: &str = "lo:keelson";

/// Adds `addrs` as host addresses on the loopback (labelled [`LOCAL_LABEL`]): packets to them,
/// from pods or the node, reach the node's own sockets. Acts in the caller's network
/// namespace, which is the node's.
pub async fn ensure_local_addrs(addrs: &[std::net::IpAddr]) -> Result<()> {
    use netlink_packet_route::address::AddressAttribute;
    let h = connect()?;
    let idx = link_index(&h, "lo")
        .await?
        .ok_or_else(|| NetError::NoLink("lo".into()))?;
    for ip in addrs {
        if has_addr(&h, idx, *ip).await? {
            continue;
        }
        let prefix = if ip.is_ipv4() { 32 } else { 128 };
        let mut req = h.address().add(idx, *ip, prefix);
        if ip.is_ipv4() {
            req.message_mut()
                .attributes
                .push(AddressAttribute::Label(LOCAL_LABEL.into()));
        }
        req.execute()
            .await
            .map_err(nl(format!("add address {ip}/{prefix} to lo")))?;
    }
    Ok(())
}

/// Removes what [`ensure_local_addrs`] added (`keelson down`).
pub async fn remove_local_addrs() -> Result<()> {
    use netlink_packet_route::address::AddressAttribute;
    let h = connect()?;
    let Some(idx) = link_index(&h, "lo").await? else {
        return Ok(());
    };
    let mut addrs = h.address().get().set_link_index_filter(idx).execute();
    let mut ours = vec![];
    while let Some(a) = addrs.try_next().await.map_err(nl("get addresses"))? {
        let labelled = a
            .attributes
            .iter()
            .any(|at| matches!(at, AddressAttribute::Label(l) if l == LOCAL_LABEL));
        if labelled {
            ours.push(a);
        }
    }
    for a in ours {
        h.address()
            .del(a)
            .execute()
            .await
            .map_err(nl("delete a cluster DNS address from lo"))?;
    }
    Ok(())
}

/// How a pod's interface is set up.
#[derive(Debug, Clone)]
pub struct PodNet {
    pub host_veth: String,
    pub ip: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
    pub bridge: String,
}

/// Wires the network namespace of process `pid` (the pod's pause) to the bridge:
/// veth pair, `eth0` with the pod address, `lo` up, default route via the bridge.
pub async fn setup_pod(pid: u32, n: &PodNet) -> Result<()> {
    let h = connect()?;
    if let Some(old) = link_index(&h, &n.host_veth).await? {
        // A leftover from an earlier sandbox of the same pod.
        let _ = h.link().del(old).execute().await;
    }
    let peer = format!("kp{}", &n.host_veth[4..]);
    h.link()
        .add(LinkVeth::new(&n.host_veth, &peer).build())
        .execute()
        .await
        .map_err(nl(format!("add veth {}", n.host_veth)))?;
    let host_idx = link_index(&h, &n.host_veth)
        .await?
        .ok_or_else(|| NetError::NoLink(n.host_veth.clone()))?;
    let peer_idx = link_index(&h, &peer)
        .await?
        .ok_or_else(|| NetError::NoLink(peer.clone()))?;
    let bridge_idx = link_index(&h, &n.bridge)
        .await?
        .ok_or_else(|| NetError::NoLink(n.bridge.clone()))?;
    let netns = std::fs::File::open(format!("/proc/{pid}/ns/net"))
        .map_err(io(format!("open netns of pid {pid}")))?;
    h.link()
        .set(
            LinkUnspec::new_with_index(peer_idx)
                .setns_by_fd(netns.as_raw_fd())
                .build(),
        )
        .execute()
        .await
        .map_err(nl("move veth peer into the pod"))?;
    h.link()
        .set(
            LinkUnspec::new_with_index(host_idx)
                .controller(bridge_idx)
                .up()
                .build(),
        )
        .execute()
        .await
        .map_err(nl(format!("attach {} to {}", n.host_veth, n.bridge)))?;
    let (ip, prefix, gw) = (n.ip, n.prefix, n.gateway);
    in_netns(netns, move |h| async move {
        let idx = link_index(&h, &peer)
            .await?
            .ok_or_else(|| NetError::NoLink(peer.clone()))?;
        h.link()
            .set(LinkUnspec::new_with_index(idx).name("eth0").build())
            .execute()
            .await
            .map_err(nl("rename to eth0"))?;
        h.address()
            .add(idx, ip.into(), prefix)
            .execute()
            .await
            .map_err(nl(format!("add address {ip}/{prefix}")))?;
        h.link()
            .set(LinkUnspec::new_with_index(idx).up().build())
            .execute()
            .await
            .map_err(nl("set eth0 up"))?;
        if let Some(lo) = link_index(&h, "lo").await? {
            h.link()
                .set(LinkUnspec::new_with_index(lo).up().build())
                .execute()
                .await
                .map_err(nl("set lo up"))?;
        }
        h.route()
            .add(RouteMessageBuilder::<Ipv4Addr>::new().gateway(gw).build())
            .execute()
            .await
            .map_err(nl(format!("default route via {gw}")))?;
        Ok(())
    })
    .await
}

/// Removes the pod's host-side veth (its peer goes with it). Idempotent.
pub async fn teardown_pod(host_veth: &str) -> Result<()> {
    delete_link(host_veth).await
}

/// Deletes a link by name (gone already is fine).
pub async fn delete_link(name: &str) -> Result<()> {
    let host_veth = name;
    let h = connect()?;
    if let Some(idx) = link_index(&h, host_veth).await? {
        match h.link().del(idx).execute().await {
            Ok(()) => {}
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => {}
            Err(e) => return Err(nl(format!("delete {host_veth}"))(e)),
        }
    }
    Ok(())
}

/// Runs `f` with a netlink handle opened inside the network namespace `netns`, on a dedicated
/// OS thread (a netlink socket acts in the namespace it was opened in).
pub async fn in_netns<F, Fut, T>(netns: std::fs::File, f: F) -> Result<T>
where
    F: FnOnce(Handle) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T>>,
    T: Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let r = (|| {
            nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
                NetError::Io {
                    what: "setns".into(),
                    source: e.into(),
                }
            })?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(io("netns runtime"))?;
            rt.block_on(async move {
                let h = connect()?;
                f(h).await
            })
        })();
        let _ = tx.send(r);
    });
    rx.await.map_err(|_| NetError::Io {
        what: "netns thread".into(),
        source: std::io::Error::other("thread ended without an answer"),
    })?
}

#[cfg(test)]
mod tests {
    #[test]
    fn host_veth_names_fit_ifnamsiz_and_are_stable() {
        let a = super::host_veth_name("0b7c-uid");
        assert!(a.len() <= 15);
        assert_eq!(a, super::host_veth_name("0b7c-uid"));
        assert_ne!(a, super::host_veth_name("other"));
    }
}
