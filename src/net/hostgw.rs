//! host-gw networking between nodes: a route to every other node's pod CIDR via that node's
//! InternalIP, the Service CIDR kept on the node, and masquerade for pod traffic leaving the pod
//! network. Acts in the caller's network namespace, which is the node's. Routes keelson made
//! carry their own protocol number, so a sync removes exactly the stale ones and nothing else.
//!
//! The Service CIDR: a route sends it to the node bridge (so that the node's own connections
//! to a ClusterIP find a route and reach the nat OUTPUT hook, where the proxy translates them —
//! a `blackhole` or `unreachable` route would fail them in `connect()` before any rule is
//! seen), and filter rules at the end of FORWARD and OUTPUT reject whatever is still addressed
//! to the Service range after translation, with ICMP port-unreachable. So an address no proxy
//! rule translated never leaves the node, and a Service without endpoints refuses a connection
//! at once instead of letting it hang.

use std::net::Ipv4Addr;

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol};
use rtnetlink::RouteMessageBuilder;

use super::{
    Result, connect,
    nft::{self, Batch, Expr, IP_DADDR, IP_SADDR, addr_in},
    nl, xtables,
};

/// The route protocol number marking keelson's routes (`ip route show proto 75`).
pub const PROTO: u8 = 75;

/// The nat chain holding the masquerade rules.
pub const MASQ_CHAIN: &str = "KEELSON-POSTROUTING";

/// Where a route leads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Via {
    Gateway(Ipv4Addr),
    /// Straight onto a link (by index).
    Dev(u32),
}

/// A route keelson wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Route {
    pub dst: Ipv4Net,
    pub via: Via,
}

impl Route {
    /// Whether `other` serves as this route: the same destination and gateway, or both
    /// straight onto a link, whichever (two agents sharing a network namespace each want the
    /// Service range on their own bridge; one such route is enough, and they must not take
    /// turns replacing it).
    pub fn same(&self, other: &Route) -> bool {
        self.dst == other.dst
            && match (self.via, other.via) {
                (Via::Dev(_), Via::Dev(_)) => true,
                (a, b) => a == b,
            }
    }
}

fn describe(m: &RouteMessage) -> Option<Route> {
    let mut dst = None;
    let mut gw = None;
    let mut oif = None;
    for a in &m.attributes {
        match a {
            RouteAttribute::Destination(RouteAddress::Inet(d)) => dst = Some(*d),
            RouteAttribute::Gateway(RouteAddress::Inet(g)) => gw = Some(*g),
            RouteAttribute::Oif(i) => oif = Some(*i),
            _ => {}
        }
    }
    let dst = Ipv4Net::new(dst?, m.header.destination_prefix_length).ok()?;
    let via = match (gw, oif) {
        (Some(g), _) => Via::Gateway(g),
        (None, Some(i)) => Via::Dev(i),
        (None, None) => return None,
    };
    Some(Route { dst, via })
}

fn message(r: &Route) -> RouteMessage {
    let b = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(r.dst.network(), r.dst.prefix_len())
        .protocol(RouteProtocol::Other(PROTO));
    match r.via {
        Via::Gateway(gw) => b.gateway(gw).build(),
        Via::Dev(i) => b
            .output_interface(i)
            .scope(netlink_packet_route::route::RouteScope::Link)
            .build(),
    }
}

/// The index of link `name` in this namespace.
pub async fn link_index(name: &str) -> Result<Option<u32>> {
    let h = connect()?;
    super::link_index(&h, name).await
}

/// Makes keelson's routes in the main table exactly `wanted`: adds (or replaces) what is
/// missing and deletes keelson routes that are no longer wanted. Returns what changed.
pub async fn sync_routes(wanted: &[Route]) -> Result<(usize, usize)> {
    let h = connect()?;
    let mut have = Vec::new();
    let mut routes = h
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute();
    while let Some(m) = routes.try_next().await.map_err(nl("list routes"))? {
        if m.header.protocol == RouteProtocol::Other(PROTO)
            && let Some(r) = describe(&m)
        {
            have.push((r, m));
        }
    }
    let mut removed = 0;
    for (r, m) in &have {
        if !wanted.iter().any(|w| w.same(r)) {
            match h.route().del(m.clone()).execute().await {
                Ok(()) => removed += 1,
                Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ESRCH => {}
                Err(e) => return Err(nl(format!("delete route {}", r.dst))(e)),
            }
        }
    }
    let mut added = 0;
    for r in wanted {
        if have.iter().any(|(h, _)| r.same(h)) {
            continue;
        }
        h.route()
            .add(message(r))
            .replace()
            .execute()
            .await
            .map_err(nl(match r.via {
                Via::Gateway(gw) => format!("route {} via {gw}", r.dst),
                Via::Dev(i) => format!("route {} dev #{i}", r.dst),
            }))?;
        added += 1;
    }
    Ok((added, removed))
}

/// The filter chain rejecting untranslated Service addresses.
pub const REJECT_CHAIN: &str = "KEELSON-SERVICES";

/// The Service range, unreachable after translation, and the addresses in it this node
/// answers on itself (the cluster DNS, bound locally), which stay reachable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRange {
    pub cidr: Ipv4Net,
    pub served: Vec<Ipv4Addr>,
}

/// The iptables-restore input for the masquerade chain (pod traffic to anything outside the
/// cluster's pod network leaves with the node's address) and the Service-range reject chain.
pub fn masquerade_rules(
    pod_cidr: Ipv4Net,
    cluster_cidr: Ipv4Net,
    services: Option<&ServiceRange>,
) -> String {
    let mut s = format!(
        "*nat\n:{MASQ_CHAIN} - [0:0]\n\
         -A {MASQ_CHAIN} -s {pod_cidr} -d {cluster_cidr} -m comment --comment \"keelson: pod to pod\" -j RETURN\n\
         -A {MASQ_CHAIN} -s {pod_cidr} -m comment --comment \"keelson: pod traffic leaving the pod network\" -j MASQUERADE\n\
         COMMIT\n*filter\n:{REJECT_CHAIN} - [0:0]\n"
    );
    if let Some(svc) = services {
        for ip in &svc.served {
            s += &format!(
                "-A {REJECT_CHAIN} -d {ip}/32 -m comment --comment \"keelson: served on this node\" -j RETURN\n"
            );
        }
        s += &format!(
            "-A {REJECT_CHAIN} -d {} -m comment --comment \"keelson: untranslated Service address\" -j REJECT --reject-with icmp-port-unreachable\n",
            svc.cidr
        );
    }
    s + "COMMIT\n"
}

/// The nf_tables table holding the node's masquerade and reject rules: one per pod bridge,
/// so that two agents sharing a network namespace (a node's agent and keelson's agent
/// DaemonSet beside it) keep theirs apart.
pub fn nft_table(bridge: &str) -> String {
    format!("keelson-node-{bridge}")
}

/// The transaction that installs (or repairs) the nftables form of the rules: a nat
/// postrouting chain (pod traffic to the pod network is left alone, the rest of the pod
/// traffic masqueraded) and filter forward/output chains rejecting untranslated Service
/// addresses after the proxy's DNAT (priority 0, after dstnat at -100). Each chain is flushed
/// and refilled in the same transaction, so running it again changes nothing.
pub fn nft_batch(
    table: &str,
    pod_cidr: Ipv4Net,
    cluster_cidr: Ipv4Net,
    services: Option<&ServiceRange>,
) -> Batch {
    let reg = nft::REG32_00;
    let mut b = Batch::new();
    b.add_table(table);
    b.add_chain(
        table,
        "postrouting",
        Some((nft::HOOK_POSTROUTING, 100, "nat")),
    );
    b.flush_chain(table, "postrouting");
    let mut pod_to_pod = addr_in(IP_SADDR, pod_cidr, true, reg);
    pod_to_pod.extend(addr_in(IP_DADDR, cluster_cidr, true, reg));
    pod_to_pod.push(Expr::Immediate {
        dreg: nft::REG_VERDICT,
        data: nft::Data::Verdict {
            code: nft::VERDICT_RETURN,
            chain: None,
        },
    });
    b.add_rule(table, "postrouting", &pod_to_pod);
    let mut leaving = addr_in(IP_SADDR, pod_cidr, true, reg);
    leaving.push(Expr::Masq { flags: 0 });
    b.add_rule(table, "postrouting", &leaving);
    for (chain, hook) in [("forward", nft::HOOK_FORWARD), ("output", nft::HOOK_OUTPUT)] {
        b.add_chain(table, chain, Some((hook, 0, "filter")));
        b.flush_chain(table, chain);
        if let Some(svc) = services {
            for ip in &svc.served {
                let mut served = addr_in(IP_DADDR, Ipv4Net::from(*ip), true, reg);
                served.push(Expr::Immediate {
                    dreg: nft::REG_VERDICT,
                    data: nft::Data::Verdict {
                        code: nft::VERDICT_RETURN,
                        chain: None,
                    },
                });
                b.add_rule(table, chain, &served);
            }
            let mut reject = addr_in(IP_DADDR, svc.cidr, true, reg);
            reject.push(Expr::Reject);
            b.add_rule(table, chain, &reject);
        }
    }
    b
}

/// Which packet filter holds the node rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    Nftables,
    Iptables,
}

/// Installs (or repairs) the masquerade and reject rules: through nf_tables netlink where the
/// kernel has it (no iptables binaries needed, so the agent also runs from its bare image),
/// else as iptables chains with jumps to them (appended, after any proxy rules).
pub fn ensure_masquerade(
    bridge: &str,
    pod_cidr: Ipv4Net,
    cluster_cidr: Ipv4Net,
    services: Option<&ServiceRange>,
) -> Result<Filter> {
    let nft_err = match nft_batch(&nft_table(bridge), pod_cidr, cluster_cidr, services).commit() {
        Ok(()) => return Ok(Filter::Nftables),
        Err(e) => e,
    };
    tracing::debug!(error = %nft_err, "nf_tables refused the node rules; using iptables");
    xtables::restore(&masquerade_rules(pod_cidr, cluster_cidr, services))?;
    for (table, chain, target) in [
        ("nat", "POSTROUTING", MASQ_CHAIN),
        ("filter", "FORWARD", REJECT_CHAIN),
        ("filter", "OUTPUT", REJECT_CHAIN),
    ] {
        xtables::ensure_rule(table, chain, &["-j".into(), target.into()], false)?;
    }
    Ok(Filter::Iptables)
}

/// Removes the iptables form of the rules (the jumps and both chains), if any; quiet when
/// there is no iptables at all.
pub fn remove_iptables_rules() {
    if std::process::Command::new("iptables")
        .arg("--version")
        .output()
        .is_err()
    {
        return;
    }
    for (table, chain, target) in [
        ("nat", "POSTROUTING", MASQ_CHAIN),
        ("filter", "FORWARD", REJECT_CHAIN),
        ("filter", "OUTPUT", REJECT_CHAIN),
    ] {
        xtables::delete_rule(table, chain, &["-j".into(), target.into()]);
    }
    for (table, chain) in [("nat", MASQ_CHAIN), ("filter", REJECT_CHAIN)] {
        for op in ["-F", "-X"] {
            let _ = std::process::Command::new("iptables")
                .args(["-w", "-t", table, op, chain])
                .output();
        }
    }
}

/// Removes what `ensure_masquerade` and `sync_routes` installed for the bridge `bridge`: the
/// nf_tables table, the iptables chains, and every route keelson made (protocol 75).
pub async fn cleanup(bridge: &str) -> Result<()> {
    let mut b = Batch::new();
    b.del_table(&nft_table(bridge));
    match b.commit() {
        Ok(()) => {}
        Err(nft::NftError::Rejected { source, .. })
            if source.raw_os_error() == Some(libc::ENOENT) => {}
        Err(e) => tracing::warn!(error = %e, "removing the node's nf_tables table"),
    }
    remove_iptables_rules();
    sync_routes(&[]).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_route::route::RouteType;

    #[test]
    fn masquerade_rules_exempt_the_pod_network() {
        let r = masquerade_rules(
            "10.244.1.0/24".parse().unwrap(),
            "10.244.0.0/16".parse().unwrap(),
            Some(&ServiceRange {
                cidr: "10.96.0.0/12".parse().unwrap(),
                served: vec![Ipv4Addr::new(10, 96, 0, 10)],
            }),
        );
        assert!(r.contains("-d 10.96.0.0/12 -m comment"));
        let (served, reject) = (
            r.find("-d 10.96.0.10/32").unwrap(),
            r.find("-d 10.96.0.0/12").unwrap(),
        );
        assert!(
            served < reject,
            "the served address is exempt before the reject:\n{r}"
        );
        assert!(r.contains("-j REJECT --reject-with icmp-port-unreachable"));
        assert!(r.contains("-s 10.244.1.0/24 -d 10.244.0.0/16"));
        assert!(r.contains("-j RETURN"));
        assert!(r.contains("-s 10.244.1.0/24 -m comment"));
        assert!(r.ends_with("COMMIT\n"));
        assert_eq!(r.matches("COMMIT").count(), 2);
    }

    #[test]
    fn route_messages_round_trip() {
        for r in [
            Route {
                dst: "10.244.2.0/24".parse().unwrap(),
                via: Via::Gateway(Ipv4Addr::new(10, 99, 0, 12)),
            },
            Route {
                dst: "10.96.0.0/12".parse().unwrap(),
                via: Via::Dev(7),
            },
        ] {
            let m = message(&r);
            assert_eq!(describe(&m), Some(r));
            assert_eq!(m.header.protocol, RouteProtocol::Other(PROTO));
            assert_eq!(m.header.kind, RouteType::Unicast);
        }
    }
}
