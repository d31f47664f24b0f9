//! The nftables backend: the model rendered into one table, `ip keelson`, whose size in chains
//! does not grow with the number of Services or endpoints. Every Service is a handful of map
//! elements:
//!
//! - `vip-dispatch` (`ip daddr . meta l4proto . th dport` → `goto <kind>-<N>`) and
//!   `np-dispatch` (`meta l4proto . th dport`, for node ports) pick a *pick chain* shared by
//!   every Service of the same kind with N endpoints;
//! - the pick chain marks for masquerade as the kind requires and DNATs through
//!   `dnat to ip daddr . meta l4proto . th dport . numgen random mod N map @vip-backends`, whose
//!   elements map each Service address and index to an endpoint's `ip . port`;
//! - `pod-vip-*` / `pod-np-*` carry pods' traffic to externalTrafficPolicy: Local Services,
//!   which kube-proxy sends to every endpoint rather than only local ones;
//! - `no-endpoint-vips` / `no-endpoint-nps` reject new connections at once (ICMP port
//!   unreachable) when a Service has nothing to serve them;
//! - `hairpin` (`endpoint ip . endpoint ip`) masquerades a pod reaching itself through its
//!   Service, and the mark bit 0x4000 masquerades what kube-proxy masquerades.
//!
//! `sessionAffinity: ClientIP` (rare) uses kube-proxy's nftables layout for those Services only:
//! a chain per Service address that sends a client found in an endpoint's dynamic `ip saddr`
//! set (with the affinity timeout) to that endpoint's chain, which refreshes the entry.
//!
//! The number of chains is bounded by the distinct endpoint counts in use (times 7 kinds) plus
//! the affinity Services' chains, so the kernel's chain validation stays cheap, and a packet
//! costs the same few hash lookups at 10 or 10,000 Services. Every rule is self-contained (no
//! register is carried across rules or chains) and built from expressions `nft list` prints.
//! A sync is one netlink transaction: a delta against what was loaded, or a full rewrite of
//! every chain and map (the periodic repair), which keeps the affinity entries.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use ipnet::Ipv4Net;
use sha2::{Digest, Sha256};

use super::model::{Endpoint, Model, ServicePort};
use crate::net::nft::{
    BASE_NETWORK, BASE_TRANSPORT, Batch, CMP_EQ, CMP_NEQ, CT_STATE, CT_STATE_NEW, CT_STATUS,
    CT_STATUS_DNAT, DATA_VERDICT, Data, Expr, FIB_ADDRTYPE_DADDR, HOOK_FORWARD, HOOK_INPUT,
    HOOK_OUTPUT, HOOK_POSTROUTING, HOOK_PREROUTING, IP_SADDR, META_L4PROTO, META_MARK,
    NAT_RANDOM_FULLY, NftError, REG_VERDICT, REG32_00, RTN_LOCAL, SET_EVAL, SET_TIMEOUT,
    TYPE_INET_PROTOCOL, TYPE_INET_SERVICE, TYPE_IPADDR, TYPE_MARK, VERDICT_GOTO, VERDICT_JUMP,
    VERDICT_RETURN, addr_in, concat_type, load_vip_key, vip_key,
};

mod state;
pub use state::State;

/// The table keelson owns.
pub const TABLE: &str = "keelson";
/// The masquerade mark bit (kube-proxy's).
const MASQ_MARK: u32 = 0x4000;

/// 32-bit registers by index.
const fn r(i: u32) -> u32 {
    REG32_00 + i
}

/// How traffic reaches a pick chain: which key finds the Service, which maps hold it, and
/// whether it is marked for masquerade.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Kind {
    /// ClusterIP: masquerade traffic from outside the cluster CIDR.
    Cluster,
    /// External IPs and LoadBalancer IPs: masquerade everything.
    External,
    /// External IPs with externalTrafficPolicy: Local: keep the client's address.
    ExternalLocal,
    /// Node ports.
    NodePort,
    NodePortLocal,
    /// Pods' traffic to an externalTrafficPolicy: Local Service's external address / node port.
    PodVip,
    PodNodePort,
}

impl Kind {
    fn prefix(self) -> &'static str {
        match self {
            Kind::Cluster => "cluster",
            Kind::External => "external",
            Kind::ExternalLocal => "external-local",
            Kind::NodePort => "nodeport",
            Kind::NodePortLocal => "nodeport-local",
            Kind::PodVip => "pod-external",
            Kind::PodNodePort => "pod-nodeport",
        }
    }
    /// Node-port kinds key on `meta l4proto . th dport` only.
    fn node_port(self) -> bool {
        matches!(
            self,
            Kind::NodePort | Kind::NodePortLocal | Kind::PodNodePort
        )
    }
    fn pod(self) -> bool {
        matches!(self, Kind::PodVip | Kind::PodNodePort)
    }
    fn dispatch(self) -> &'static str {
        match (self.pod(), self.node_port()) {
            (true, true) => "pod-np-dispatch",
            (true, false) => "pod-vip-dispatch",
            (false, true) => "np-dispatch",
            (false, false) => "vip-dispatch",
        }
    }
    fn backends(self) -> &'static str {
        match (self.pod(), self.node_port()) {
            (true, true) => "pod-np-backends",
            (true, false) => "pod-vip-backends",
            (false, true) => "np-backends",
            (false, false) => "vip-backends",
        }
    }
    /// The rule that marks for masquerade, if this kind has one.
    fn masquerade(self, cidr: Ipv4Net) -> Option<Vec<Expr>> {
        match self {
            Kind::Cluster => {
                let mut m = saddr_in(cidr, false);
                m.push(jump("mark-for-masquerade"));
                Some(m)
            }
            Kind::External | Kind::NodePort => Some(vec![jump("mark-for-masquerade")]),
            _ => None,
        }
    }
    /// The expressions loading this kind's key into r0...
    fn key(self) -> Vec<Expr> {
        if self.node_port() {
            load_np_key()
        } else {
            load_vip_key()
        }
    }
}

/// A set or map of the table: name, flags, key (type, length), data (type, length).
type SetDef = (&'static str, u32, (u32, u32), Option<(u32, u32)>);

fn set_defs() -> Vec<SetDef> {
    let vip = (
        concat_type(&[TYPE_IPADDR, TYPE_INET_PROTOCOL, TYPE_INET_SERVICE]),
        12,
    );
    let np = (concat_type(&[TYPE_INET_PROTOCOL, TYPE_INET_SERVICE]), 8);
    let vip_i = (
        concat_type(&[
            TYPE_IPADDR,
            TYPE_INET_PROTOCOL,
            TYPE_INET_SERVICE,
            TYPE_MARK,
        ]),
        16,
    );
    let np_i = (
        concat_type(&[TYPE_INET_PROTOCOL, TYPE_INET_SERVICE, TYPE_MARK]),
        12,
    );
    let verdict = Some((DATA_VERDICT, 0));
    let ep = Some((concat_type(&[TYPE_IPADDR, TYPE_INET_SERVICE]), 8));
    vec![
        ("vip-dispatch", 0, vip, verdict),
        ("pod-vip-dispatch", 0, vip, verdict),
        ("np-dispatch", 0, np, verdict),
        ("pod-np-dispatch", 0, np, verdict),
        ("vip-backends", 0, vip_i, ep),
        ("pod-vip-backends", 0, vip_i, ep),
        ("np-backends", 0, np_i, ep),
        ("pod-np-backends", 0, np_i, ep),
        (
            "hairpin",
            0,
            (concat_type(&[TYPE_IPADDR, TYPE_IPADDR]), 8),
            None,
        ),
        ("no-endpoint-vips", 0, vip, None),
        ("no-endpoint-nps", 0, np, None),
    ]
}

/// A chain: its hook (number, priority, type) if it is a base chain, and its rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub hook: Option<(u32, i32, &'static str)>,
    pub rules: Vec<Vec<Expr>>,
}

/// A set or map element: key, data.
pub type Elem = (Vec<u8>, Option<Data>);
/// An element's identity: set name, key.
type ElemKey = (&'static str, Vec<u8>);

/// Elements of one set or map: key → data.
pub type Elems = BTreeMap<Vec<u8>, Option<Data>>;

/// The rendered table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rendered {
    pub chains: BTreeMap<String, Chain>,
    /// The fixed sets and maps (see [`set_defs`]) and their elements.
    pub sets: BTreeMap<&'static str, Elems>,
    /// Per-endpoint client sets of affinity Services (filled from the packet path).
    pub affinity_sets: BTreeSet<String>,
}

fn verdict(code: i32, chain: &str) -> Data {
    Data::Verdict {
        code,
        chain: Some(chain.to_string()),
    }
}

fn jump(chain: &str) -> Expr {
    Expr::Immediate {
        dreg: REG_VERDICT,
        data: verdict(VERDICT_JUMP, chain),
    }
}

fn goto(chain: &str) -> Expr {
    Expr::Immediate {
        dreg: REG_VERDICT,
        data: verdict(VERDICT_GOTO, chain),
    }
}

/// `ip saddr` (not) in `cidr`, through a scratch register.
fn saddr_in(cidr: Ipv4Net, inside: bool) -> Vec<Expr> {
    addr_in(IP_SADDR, cidr, inside, r(15))
}

/// `meta l4proto . th dport` into r0, r1.
fn load_np_key() -> Vec<Expr> {
    vec![
        Expr::Meta {
            dreg: r(0),
            key: META_L4PROTO,
        },
        Expr::Payload {
            dreg: r(1),
            base: BASE_TRANSPORT,
            offset: 2,
            len: 2,
        },
    ]
}

fn np_key(proto: u8, port: u16) -> Vec<u8> {
    let mut k = vec![proto, 0, 0, 0];
    k.extend_from_slice(&port.to_be_bytes());
    k.extend_from_slice(&[0, 0]);
    k
}

fn ep_data(e: &Endpoint) -> Vec<u8> {
    let mut d = e.ip.octets().to_vec();
    d.extend_from_slice(&e.port.to_be_bytes());
    d.extend_from_slice(&[0, 0]);
    d
}

fn lookup(set: &str, sreg: u32, dreg: Option<u32>) -> Expr {
    Expr::Lookup {
        set: set.into(),
        sreg,
        dreg,
    }
}

/// `fib daddr type local` (into a scratch register).
fn daddr_local() -> Vec<Expr> {
    vec![
        Expr::Fib {
            dreg: r(15),
            result: FIB_ADDRTYPE_DADDR.0,
            flags: FIB_ADDRTYPE_DADDR.1,
        },
        Expr::Cmp {
            sreg: r(15),
            op: CMP_EQ,
            data: RTN_LOCAL.to_ne_bytes().to_vec(),
        },
    ]
}

fn mark_load_masked(mask: u32, xor: u32) -> Vec<Expr> {
    vec![
        Expr::Meta {
            dreg: r(15),
            key: META_MARK,
        },
        Expr::Bitwise {
            sreg: r(15),
            dreg: r(15),
            mask: mask.to_ne_bytes().to_vec(),
            xor: xor.to_ne_bytes().to_vec(),
        },
    ]
}

/// The fixed chains (hooks, dispatch, masquerading, reject checks).
fn base_chains(cidr: Ipv4Net) -> BTreeMap<String, Chain> {
    let mut c = BTreeMap::new();
    let mut add = |name: &str, hook: Option<(u32, i32, &'static str)>, rules: Vec<Vec<Expr>>| {
        c.insert(name.to_string(), Chain { hook, rules });
    };
    add(
        "nat-prerouting",
        Some((HOOK_PREROUTING, -100, "nat")),
        vec![vec![jump("services")]],
    );
    add(
        "nat-output",
        Some((HOOK_OUTPUT, -100, "nat")),
        vec![vec![jump("services")]],
    );
    add(
        "nat-postrouting",
        Some((HOOK_POSTROUTING, 100, "nat")),
        vec![vec![jump("masquerading")]],
    );
    let mut new_conn = ct_bits_set(CT_STATE, CT_STATE_NEW);
    new_conn.push(jump("endpoints-check"));
    for (name, hook) in [
        ("filter-input", HOOK_INPUT),
        ("filter-forward", HOOK_FORWARD),
        ("filter-output", HOOK_OUTPUT),
    ] {
        add(name, Some((hook, -110, "filter")), vec![new_conn.clone()]);
    }
    let mut vip_reject = load_vip_key();
    vip_reject.extend([lookup("no-endpoint-vips", r(0), None), Expr::Reject]);
    let mut np_reject = daddr_local();
    np_reject.extend(load_np_key());
    np_reject.extend([lookup("no-endpoint-nps", r(0), None), Expr::Reject]);
    add("endpoints-check", None, vec![vip_reject, np_reject]);
    add("services", None, services_rules(cidr));
    let mut pod_np = saddr_in(cidr, true);
    pod_np.extend(load_np_key());
    pod_np.push(lookup("pod-np-dispatch", r(0), Some(REG_VERDICT)));
    let mut np = load_np_key();
    np.push(lookup("np-dispatch", r(0), Some(REG_VERDICT)));
    add("nodeports", None, vec![pod_np, np]);
    let mut set_mark = mark_load_masked(!MASQ_MARK, MASQ_MARK);
    set_mark.push(Expr::MetaSet {
        key: META_MARK,
        sreg: r(15),
    });
    add("mark-for-masquerade", None, vec![set_mark]);
    add("masquerading", None, masquerading_rules());
    c
}

/// Matches when the conntrack field `key` has any of the `bits`.
fn ct_bits_set(key: u32, bits: u32) -> Vec<Expr> {
    vec![
        Expr::Ct { dreg: r(15), key },
        Expr::Bitwise {
            sreg: r(15),
            dreg: r(15),
            mask: bits.to_ne_bytes().to_vec(),
            xor: vec![0; 4],
        },
        Expr::Cmp {
            sreg: r(15),
            op: CMP_NEQ,
            data: vec![0; 4],
        },
    ]
}

/// The dispatch: pods' traffic to a VIP, anyone's to a VIP, then node ports on the node's
/// own addresses (but not 127/8).
fn services_rules(cidr: Ipv4Net) -> Vec<Vec<Expr>> {
    let mut pod_vip = saddr_in(cidr, true);
    pod_vip.extend(load_vip_key());
    pod_vip.push(lookup("pod-vip-dispatch", r(0), Some(REG_VERDICT)));
    let mut vip = load_vip_key();
    vip.push(lookup("vip-dispatch", r(0), Some(REG_VERDICT)));
    let mut to_np = daddr_local();
    to_np.extend([
        Expr::Payload {
            dreg: r(14),
            base: BASE_NETWORK,
            offset: 16,
            len: 4,
        },
        Expr::Bitwise {
            sreg: r(14),
            dreg: r(14),
            mask: vec![255, 0, 0, 0],
            xor: vec![0; 4],
        },
        Expr::Cmp {
            sreg: r(14),
            op: CMP_NEQ,
            data: vec![127, 0, 0, 0],
        },
        goto("nodeports"),
    ]);
    vec![pod_vip, vip, to_np]
}

/// Hairpin traffic, then everything marked for masquerade (the mark is cleared first).
fn masquerading_rules() -> Vec<Vec<Expr>> {
    // Only translated traffic (kube-proxy marks hairpin traffic in the endpoint's chain, before
    // its DNAT): an endpoint's own connections to itself that no Service carried stay as they
    // are.
    let mut hairpin = ct_bits_set(CT_STATUS, CT_STATUS_DNAT);
    hairpin.extend([
        Expr::Payload {
            dreg: r(0),
            base: BASE_NETWORK,
            offset: 12,
            len: 4,
        },
        Expr::Payload {
            dreg: r(1),
            base: BASE_NETWORK,
            offset: 16,
            len: 4,
        },
        lookup("hairpin", r(0), None),
        Expr::Masq {
            flags: NAT_RANDOM_FULLY,
        },
    ]);
    let mut unmarked = mark_load_masked(MASQ_MARK, 0);
    unmarked.extend([
        Expr::Cmp {
            sreg: r(15),
            op: CMP_EQ,
            data: vec![0; 4],
        },
        Expr::Immediate {
            dreg: REG_VERDICT,
            data: Data::Verdict {
                code: VERDICT_RETURN,
                chain: None,
            },
        },
    ]);
    let mut clear = mark_load_masked(u32::MAX, MASQ_MARK);
    clear.push(Expr::MetaSet {
        key: META_MARK,
        sreg: r(15),
    });
    let masq = vec![Expr::Masq {
        flags: NAT_RANDOM_FULLY,
    }];
    vec![hairpin, unmarked, clear, masq]
}

/// A pick chain shared by every Service of kind `k` with `n` endpoints: mark for masquerade
/// as the kind requires, then DNAT to `key . numgen random mod n` looked up in the backends.
fn pick_chain(k: Kind, n: usize, cidr: Ipv4Net) -> Chain {
    let mut rules: Vec<Vec<Expr>> = k.masquerade(cidr).into_iter().collect();
    let mut p = k.key();
    // The index goes right after the key: r3 after a VIP key, r2 after a node-port key.
    let idx = if k.node_port() { r(2) } else { r(3) };
    p.extend([
        Expr::Numgen {
            dreg: idx,
            modulus: n as u32,
        },
        lookup(k.backends(), r(0), Some(r(4))),
        Expr::Dnat {
            addr: r(4),
            port: Some(r(5)),
        },
    ]);
    rules.push(p);
    Chain { hook: None, rules }
}

fn short_hash(s: &str) -> String {
    hex::encode(&Sha256::digest(s.as_bytes())[..6])
}

/// DNAT to one endpoint (constants).
fn dnat_to(e: &Endpoint) -> Vec<Expr> {
    vec![
        Expr::Immediate {
            dreg: r(0),
            data: Data::Value(e.ip.octets().to_vec()),
        },
        Expr::Immediate {
            dreg: r(1),
            data: Data::Value(e.port.to_be_bytes().to_vec()),
        },
        Expr::Dnat {
            addr: r(0),
            port: Some(r(1)),
        },
    ]
}

/// Renders the model. `cluster_cidr`: traffic from outside it to a ClusterIP is masqueraded.
pub fn render(m: &Model, cluster_cidr: Ipv4Net) -> Rendered {
    let mut s = State::new(cluster_cidr);
    let _ = s.update(m);
    s.rendered()
}

fn add_affinity_set(b: &mut Batch, name: &str) {
    b.add_set(TABLE, name, SET_TIMEOUT | SET_EVAL, (TYPE_IPADDR, 4), None);
}

/// The transaction that loads the whole table `r` (changes go through [`State::update`]).
/// With `repair`, every chain and set is flushed and refilled, so whatever someone changed is
/// repaired (the table is re-created if it was deleted); the affinity sets keep their clients.
pub fn load(r: &Rendered, repair: bool) -> Batch {
    let mut b = Batch::new();
    b.add_table(TABLE);
    for (name, flags, key, data) in set_defs() {
        b.add_set(TABLE, name, flags, key, data);
    }
    for name in &r.affinity_sets {
        add_affinity_set(&mut b, name);
    }
    for (name, c) in &r.chains {
        b.add_chain(TABLE, name, c.hook);
    }
    for (name, c) in &r.chains {
        if repair {
            b.flush_chain(TABLE, name);
        }
        for rule in &c.rules {
            b.add_rule(TABLE, name, rule);
        }
    }
    for (set, elems) in &r.sets {
        if repair {
            b.flush_set(TABLE, set);
        }
        let all: Vec<Elem> = elems.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        b.add_elems(TABLE, set, &all);
    }
    b
}

/// Deletes the chains and named sets in keelson's table that `st` does not hold: the pick and
/// affinity chains and affinity sets a [`State::reset`] released, and anything someone else
/// added while keelson ran (kube-proxy's full syncs do the same). Run after a full load, which
/// left no rule or map element of keelson's referring to them. How many.
pub fn remove_foreign(st: &State) -> Result<usize, NftError> {
    let (chains, sets) = crate::net::nft::list(TABLE)?;
    let chains: Vec<String> = chains.into_iter().filter(|c| !st.owns_chain(c)).collect();
    let sets: Vec<String> = sets.into_iter().filter(|s| !st.owns_set(s)).collect();
    if chains.is_empty() && sets.is_empty() {
        return Ok(0);
    }
    // Their rules first (they may jump to each other or look up the sets), then the sets
    // (whose verdict elements may name the chains), then the chains.
    let mut b = Batch::new();
    for c in &chains {
        b.flush_chain(TABLE, c);
    }
    for s in &sets {
        b.del_set(TABLE, s);
    }
    for c in &chains {
        b.del_chain(TABLE, c);
    }
    b.commit()?;
    Ok(chains.len() + sets.len())
}

/// Deletes keelson's table (and so everything the nftables backend installed), if present.
pub fn cleanup() -> Result<(), NftError> {
    let mut b = Batch::new();
    b.del_table(TABLE);
    match b.commit() {
        Err(NftError::Rejected { source, .. }) if source.raw_os_error() == Some(libc::ENOENT) => {
            Ok(())
        }
        other => other,
    }
}

/// Whether this kernel takes nf_tables transactions (for choosing the default mode): creates
/// and deletes a scratch table.
pub fn supported() -> bool {
    let mut b = Batch::new();
    b.add_table("keelson-probe");
    b.del_table("keelson-probe");
    b.commit().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::model::{Proto, ServicePort};

    fn port(name: &str, vip: [u8; 4], eps: &[[u8; 4]]) -> ServicePort {
        let eps: Vec<Endpoint> = eps
            .iter()
            .map(|ip| Endpoint {
                ip: (*ip).into(),
                port: 8080,
                local: false,
            })
            .collect();
        ServicePort {
            name: format!("default/{name}:http"),
            proto: Proto::Tcp,
            cluster_ip: Some(vip.into()),
            port: 80,
            node_port: None,
            external_ips: vec![],
            cluster_endpoints: eps.clone(),
            external_endpoints: eps,
            external_local: false,
            affinity_seconds: None,
            health_check_node_port: None,
        }
    }

    fn model(ports: Vec<ServicePort>) -> Model {
        Model {
            ports: ports
                .into_iter()
                .map(|p| (format!("{}/TCP", p.name), p))
                .collect(),
        }
    }

    #[test]
    fn chains_do_not_grow_with_services() {
        let cidr: Ipv4Net = "10.244.0.0/16".parse().unwrap();
        let few = render(
            &model(vec![port("a", [10, 96, 0, 1], &[[10, 244, 1, 2]])]),
            cidr,
        );
        let many: Vec<ServicePort> = (0..1000u32)
            .map(|i| {
                port(
                    &format!("s{i}"),
                    [10, 96, (i >> 8) as u8, i as u8],
                    &[
                        [10, 244, 1, 2],
                        [10, 244, 2, 2],
                        [10, 244, 3, (i % 200) as u8],
                    ],
                )
            })
            .collect();
        let big = render(&model(many), cidr);
        assert_eq!(
            big.chains.len(),
            few.chains.len(),
            "one pick chain each: {:?}",
            big.chains.keys().collect::<Vec<_>>()
        );
        assert!(big.chains.contains_key("cluster-3"));
        assert_eq!(big.sets["vip-dispatch"].len(), 1000);
        assert_eq!(big.sets["vip-backends"].len(), 3000);
        assert!(few.sets["no-endpoint-vips"].is_empty());
    }

    #[test]
    fn deltas_touch_only_what_changed() {
        let cidr: Ipv4Net = "10.244.0.0/16".parse().unwrap();
        let a = port("a", [10, 96, 0, 1], &[[10, 244, 1, 2], [10, 244, 2, 2]]);
        let b = port("b", [10, 96, 0, 2], &[[10, 244, 1, 3]]);
        let r1 = render(&model(vec![a.clone(), b.clone()]), cidr);
        // Service a loses an endpoint: its dispatch element now goes to cluster-1, its second
        // backend goes, cluster-2 is no longer used.
        let a2 = port("a", [10, 96, 0, 1], &[[10, 244, 1, 2]]);
        let r2 = render(&model(vec![a2, b.clone()]), cidr);
        let key_a = vip_key([10, 96, 0, 1].into(), 6, 80);
        assert_eq!(
            r2.sets["vip-dispatch"][&key_a],
            Some(verdict(VERDICT_GOTO, "cluster-1"))
        );
        assert!(!r2.chains.contains_key("cluster-2"));
        assert_eq!(r2.sets["vip-backends"].len(), 2);
        // Scaled to zero: the VIP moves to the reject set.
        let a0 = port("a", [10, 96, 0, 1], &[]);
        let r3 = render(&model(vec![a0, b.clone()]), cidr);
        assert!(r3.sets["no-endpoint-vips"].contains_key(&key_a));
        assert!(!r3.sets["vip-dispatch"].contains_key(&key_a));
        // The delta transaction from r1 to r2 is much smaller than a full one.
        let mut st = State::new(cidr);
        let _ = st.update(&model(vec![a.clone(), b.clone()]));
        assert_eq!(st.rendered(), r1);
        let delta = st.update(&model(vec![
            port("a", [10, 96, 0, 1], &[[10, 244, 1, 2]]),
            b.clone(),
        ]));
        let full = load(&r2, true);
        assert!(
            delta.len() < full.len(),
            "{} vs {}",
            delta.len(),
            full.len()
        );
        assert_eq!(
            st.update(&model(vec![
                port("a", [10, 96, 0, 1], &[[10, 244, 1, 2]]),
                b.clone()
            ]))
            .len(),
            0,
            "no change, no message"
        );
        // Affinity: per-endpoint chains and client sets for that Service only.
        let mut s = b;
        s.affinity_seconds = Some(30);
        let r4 = render(&model(vec![s]), cidr);
        assert_eq!(r4.affinity_sets.len(), 1);
        assert_eq!(
            r4.chains.len(),
            r3.chains.len() + 1,
            "{:?}",
            r4.chains.keys()
        );
    }

    /// The incremental state always equals a fresh render, whatever the order of changes, and
    /// a change to one Service yields a transaction about that Service only.
    #[test]
    fn incremental_state_equals_a_fresh_render() {
        let cidr: Ipv4Net = "10.244.0.0/16".parse().unwrap();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let mut st = State::new(cidr);
        for round in 0..300 {
            let present: Vec<u8> = (0..6u8).filter(|_| rnd(5) > 0).collect();
            let ports: Vec<ServicePort> = present
                .into_iter()
                .map(|i| {
                    let eps: Vec<[u8; 4]> = (0..rnd(4) as u8)
                        .map(|k| [10, 244, 1 + k, 2 + (rnd(2) as u8)])
                        .collect();
                    let mut p = port(&format!("s{i}"), [10, 96, 0, 1 + i], &eps);
                    if rnd(3) == 0 {
                        p.affinity_seconds = Some(60);
                    }
                    if rnd(3) == 0 {
                        p.node_port = Some(30000 + u16::from(i));
                        p.external_local = rnd(2) == 0;
                        if p.external_local {
                            p.external_endpoints.truncate(1);
                        }
                    }
                    p
                })
                .collect();
            let m = model(ports);
            let _ = st.update(&m);
            assert_eq!(st.rendered(), render(&m, cidr), "round {round}");
            assert_eq!(st.update(&m).len(), 0, "round {round}: nothing left to do");
        }
        // One endpoint of one Service among many: a handful of messages.
        let many = |last: u8| {
            model(
                (0..200u32)
                    .map(|i| {
                        let l = if i == 100 { last } else { 4 };
                        port(
                            &format!("m{i}"),
                            [10, 96, 1, i as u8],
                            &[[10, 244, 1, 2], [10, 244, 1, l]],
                        )
                    })
                    .collect(),
            )
        };
        let mut st = State::new(cidr);
        let _ = st.update(&many(4));
        let tx = st.update(&many(9));
        assert!(tx.len() <= 4, "{} messages", tx.len());
    }
}
