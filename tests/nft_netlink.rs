//! The nf_tables netlink layer against the kernel, in a scratch network namespace (removed at
//! the end): a table, a chain and a concatenated verdict map with elements appear in
//! `nft list` exactly as written, elements are deleted, a bad message is reported with what
//! it was, and nothing of a failed transaction is applied; a VIP map with a DNAT rule
//! translates a real connection; the nftables proxy backend's table balances, rejects,
//! sticks, serves node ports, applies deltas and repairs a flushed chain; and a random walk of
//! deltas, and full syncs over it (removing foreign chains and sets), end where a fresh load does.
mod common;

use std::{
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering::SeqCst},
    },
};

use common::in_netns as in_ns;

use ipnet::Ipv4Net;
use keelson::net::nft::{
    Batch, DATA_VERDICT, Data, Expr, HOOK_OUTPUT, NftError, REG_1, REG_2, REG32_00,
    TYPE_INET_PROTOCOL, TYPE_INET_SERVICE, TYPE_IPADDR, VERDICT_GOTO, concat_type, load_vip_key,
    vip_key,
};
use keelson::proxy::{
    model::{Endpoint, Model, Proto, ServicePort},
    nftables,
};

/// A scratch network namespace, deleted when dropped.
struct Ns(String);

impl Ns {
    /// Creates `kt-PREFIX-<random>` (needs root).
    fn new(prefix: &str) -> Ns {
        assert!(
            nix::unistd::geteuid().is_root(),
            "needs root (network namespaces)"
        );
        let mut b = [0u8; 3];
        getrandom::fill(&mut b).unwrap();
        let ns = Ns(format!("kt-{prefix}-{}", hex::encode(b)));
        sh(&["ip", "netns", "add", &ns.0]);
        ns
    }

    /// Loopback up, and a veth pair v0/v1 inside the namespace, up, with `addrs` (device,
    /// address/prefix) on its ends.
    fn veth(&self, addrs: &[(&str, &str)]) {
        sh(&["ip", "-n", &self.0, "link", "set", "lo", "up"]);
        sh(&[
            "ip", "-n", &self.0, "link", "add", "v0", "type", "veth", "peer", "name", "v1",
        ]);
        for (dev, a) in addrs {
            sh(&["ip", "-n", &self.0, "addr", "add", a, "dev", dev]);
        }
        sh(&["ip", "-n", &self.0, "link", "set", "v0", "up"]);
        sh(&["ip", "-n", &self.0, "link", "set", "v1", "up"]);
    }

    /// The Service range routed out of v0 (so connections to VIPs reach nat OUTPUT).
    fn service_route(&self) {
        sh(&[
            "ip",
            "-n",
            &self.0,
            "route",
            "add",
            "10.96.0.0/12",
            "dev",
            "v0",
        ]);
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.0])
            .status();
    }
}

/// `nft list table ip TABLE` in `ns`: whether it succeeded, and its stdout and stderr.
fn nft_list(ns: &str, table: &str) -> (bool, String) {
    let o = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "list", "table", "ip", table])
        .output()
        .unwrap();
    (
        o.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

#[test]
fn tables_chains_maps_and_elements_through_netlink() {
    let ns = Ns::new("nft");
    let key = (
        concat_type(&[TYPE_IPADDR, TYPE_INET_PROTOCOL, TYPE_INET_SERVICE]),
        12,
    );
    let goto = |c: &str| Data::Verdict {
        code: VERDICT_GOTO,
        chain: Some(c.into()),
    };
    in_ns(&ns.0, || {
        let mut t = Batch::new();
        t.add_table("kt");
        t.add_chain("kt", "svc-a", None);
        t.add_chain("kt", "svc-b", None);
        t.add_set("kt", "services", 0, key, Some((DATA_VERDICT, 0)));
        t.add_elems(
            "kt",
            "services",
            &[
                (
                    vip_key("10.96.0.10".parse().unwrap(), 6, 80),
                    Some(goto("svc-a")),
                ),
                (
                    vip_key("10.96.0.11".parse().unwrap(), 17, 53),
                    Some(goto("svc-b")),
                ),
            ],
        );
        t.commit().unwrap();
    });
    let (ok, out) = nft_list(&ns.0, "kt");
    assert!(ok, "{out}");
    assert!(out.contains("chain svc-a"), "{out}");
    assert!(out.contains("map services"), "{out}");
    assert!(out.contains("10.96.0.10 . tcp . 80 : goto svc-a"), "{out}");
    assert!(out.contains("10.96.0.11 . udp . 53 : goto svc-b"), "{out}");

    // Delete one element; a failing transaction (unknown set) applies nothing.
    in_ns(&ns.0, || {
        let mut t = Batch::new();
        t.del_elems(
            "kt",
            "services",
            &[vip_key("10.96.0.10".parse().unwrap(), 6, 80)],
        );
        t.commit().unwrap();
        let mut bad = Batch::new();
        bad.del_elems(
            "kt",
            "services",
            &[vip_key("10.96.0.11".parse().unwrap(), 17, 53)],
        );
        bad.add_elems("kt", "nosuch", &[(vec![0; 12], None)]);
        let e = bad.commit().unwrap_err().to_string();
        assert!(e.contains("elements of kt nosuch"), "{e}");
    });
    let (_, out) = nft_list(&ns.0, "kt");
    assert!(!out.contains("10.96.0.10 . tcp . 80"), "{out}");
    assert!(
        out.contains("10.96.0.11 . udp . 53 : goto svc-b"),
        "the failed transaction changed nothing: {out}"
    );

    in_ns(&ns.0, || {
        let mut t = Batch::new();
        t.del_table("kt");
        t.commit().unwrap();
    });
    assert!(!nft_list(&ns.0, "kt").0, "the table is gone");
}

fn sh(args: &[&str]) {
    assert!(
        Command::new(args[0])
            .args(&args[1..])
            .status()
            .unwrap()
            .success(),
        "{args:?}"
    );
}

/// A VIP lookup in a verdict map, a per-Service chain and a DNAT rule, all sent through
/// netlink: a TCP connection to the VIP reaches the listener behind it.
#[test]
fn a_vip_map_translates_connections() {
    let ns = Ns::new("nftd");
    ns.veth(&[("v0", "10.201.0.1/24")]);
    ns.service_route();
    let key = (
        concat_type(&[TYPE_IPADDR, TYPE_INET_PROTOCOL, TYPE_INET_SERVICE]),
        12,
    );
    let listener = in_ns(&ns.0, || {
        let l = std::net::TcpListener::bind("10.201.0.1:18080").unwrap();
        let mut t = Batch::new();
        t.add_table("kt");
        t.add_chain("kt", "output", Some((HOOK_OUTPUT, -100, "nat")));
        t.add_chain("kt", "svc-a", None);
        t.add_set("kt", "services", 0, key, Some((DATA_VERDICT, 0)));
        t.add_elems(
            "kt",
            "services",
            &[(
                vip_key("10.96.0.10".parse().unwrap(), 6, 80),
                Some(Data::Verdict {
                    code: VERDICT_GOTO,
                    chain: Some("svc-a".into()),
                }),
            )],
        );
        let mut lookup = load_vip_key();
        lookup.push(Expr::Lookup {
            set: "services".into(),
            sreg: REG32_00,
            dreg: Some(0),
        });
        t.add_rule("kt", "output", &lookup);
        t.add_rule(
            "kt",
            "svc-a",
            &[
                Expr::Immediate {
                    dreg: REG_1,
                    data: Data::Value(vec![10, 201, 0, 1]),
                },
                Expr::Immediate {
                    dreg: REG_2,
                    data: Data::Value(18080u16.to_be_bytes().to_vec()),
                },
                Expr::Dnat {
                    addr: REG_1,
                    port: Some(REG_2),
                },
            ],
        );
        t.commit().unwrap();
        l
    });
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.0, "nft", "list", "table", "ip", "kt"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        text.contains("ip daddr . meta l4proto . th dport vmap @services"),
        "{text}"
    );
    assert!(text.contains("dnat to 10.201.0.1:18080"), "{text}");
    let t = std::thread::spawn(move || listener.accept().map(|(_, peer)| peer));
    in_ns(&ns.0, || {
        std::net::TcpStream::connect_timeout(
            &"10.96.0.10:80".parse().unwrap(),
            std::time::Duration::from_secs(3),
        )
        .expect("the VIP is translated to the listener");
    });
    let peer = t.join().unwrap().unwrap();
    assert_eq!(peer.ip().to_string(), "10.201.0.1");
}

/// Accepts connections on `addr` (inside `ns`) forever, counting them.
fn serve(ns: &str, addr: &str) -> std::sync::Arc<std::sync::atomic::AtomicUsize> {
    let l = in_ns(ns, || std::net::TcpListener::bind(addr).unwrap());
    let n = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let c = n.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            if s.is_ok() {
                c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
    });
    n
}

fn connect(ns: &str, to: &str) -> std::io::Result<()> {
    let to: std::net::SocketAddr = to.parse().unwrap();
    in_ns(ns, || {
        std::net::TcpStream::connect_timeout(&to, std::time::Duration::from_secs(2)).map(|_| ())
    })
}

/// The nftables proxy backend's table (the Services of [`backend_model`]) loaded in a scratch
/// namespace whose veth pair holds the node address 10.201.0.1 and two endpoints, .2 and .3,
/// each with a listener on port 18080 counting the connections it accepts.
struct Backend {
    ns: Ns,
    /// Connections accepted by 10.201.0.2:18080 and 10.201.0.3:18080.
    a: Arc<AtomicUsize>,
    b: Arc<AtomicUsize>,
    cidr: Ipv4Net,
    /// The backend's state, as the table in the kernel holds it.
    state: nftables::State,
}

impl Backend {
    /// The counts of `a` and `b` once they add up to `total` (or after 3 s). Accepts trail the
    /// handshakes: wait until every connection is counted.
    fn counts(&self, total: usize) -> (usize, usize) {
        let t0 = std::time::Instant::now();
        loop {
            let c = (self.a.load(SeqCst), self.b.load(SeqCst));
            if c.0 + c.1 >= total || t0.elapsed() > std::time::Duration::from_secs(3) {
                return c;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}

/// The endpoint 10.201.0.LAST:18080, on this node.
fn ep(last: u8) -> Endpoint {
    Endpoint {
        ip: [10, 201, 0, last].into(),
        port: 18080,
        local: true,
    }
}

/// The TCP Service port `default/NAME:` on 10.96.0.VIP:80, with `eps` behind it.
fn port(name: &str, vip: u8, eps: Vec<Endpoint>) -> ServicePort {
    ServicePort {
        name: format!("default/{name}:"),
        proto: Proto::Tcp,
        cluster_ip: Some([10, 96, 0, vip].into()),
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

/// `web` (10.96.0.10) on `web`, `empty` (.11) on nothing, and on .2 and .3 `sticky` (.12,
/// ClientIP affinity for 60 s) and `np` (.13, node port 30080).
fn backend_model(web: Vec<Endpoint>) -> Model {
    let mut np = port("np", 13, vec![ep(2), ep(3)]);
    np.node_port = Some(30080);
    let mut sticky = port("sticky", 12, vec![ep(2), ep(3)]);
    sticky.affinity_seconds = Some(60);
    Model {
        ports: [port("web", 10, web), port("empty", 11, vec![]), sticky, np]
            .into_iter()
            .map(|p| (format!("{}/TCP", p.name), p))
            .collect(),
    }
}

#[test]
fn the_nftables_backend_in_the_kernel() {
    let ns = Ns::new("nftb");
    ns.veth(&[
        ("v0", "10.201.0.1/24"),
        ("v1", "10.201.0.2/24"),
        ("v1", "10.201.0.3/24"),
    ]);
    ns.service_route();
    let (a, b) = (
        serve(&ns.0, "10.201.0.2:18080"),
        serve(&ns.0, "10.201.0.3:18080"),
    );
    let cidr: Ipv4Net = "10.201.0.0/24".parse().unwrap();
    let mut state = nftables::State::new(cidr);
    let _ = state.update(&backend_model(vec![ep(2), ep(3)]));
    let r1 = state.rendered();
    in_ns(&ns.0, || {
        nftables::cleanup().unwrap();
        nftables::load(&r1, false).commit().unwrap();
    });
    let mut backend = Backend {
        ns,
        a,
        b,
        cidr,
        state,
    };
    crate::scenarios!(&mut backend;
        the_table_reads_back_with_the_vip_dispatch_map_a_random_pick_and_hairpin_masquerade,
        a_cluster_ip_is_balanced_over_both_endpoints,
        a_service_without_endpoints_is_refused_at_once,
        a_sticky_service_sends_one_client_to_one_endpoint,
        a_node_port_answers_on_the_nodes_address,
        a_delta_that_drops_an_endpoint_sends_every_connection_to_the_other,
        a_full_sync_repairs_a_flushed_chain_and_recreates_a_deleted_table,
        cleanup_removes_the_table,
    );
}

/// nft reads the loaded table back: the VIP dispatch map, a random pick of two endpoints, and
/// hairpin masquerade only for translated traffic.
fn the_table_reads_back_with_the_vip_dispatch_map_a_random_pick_and_hairpin_masquerade(
    s: &Backend,
) {
    let (ok, text) = nft_list(&s.ns.0, "keelson");
    assert!(ok, "nft reads the table back: {text}");
    assert!(text.contains("vmap @vip-dispatch"), "{text}");
    assert!(text.contains("numgen random mod 2"), "{text}");
    // Hairpin masquerade only for translated traffic.
    assert!(
        text.lines().any(|l| l.contains("ct status dnat")
            && l.contains("@hairpin")
            && l.contains("masquerade")),
        "{text}"
    );
}

/// Balanced over both endpoints (the first connections made: the counts start at zero).
fn a_cluster_ip_is_balanced_over_both_endpoints(s: &Backend) {
    for _ in 0..30 {
        connect(&s.ns.0, "10.96.0.10:80").expect("the ClusterIP answers");
    }
    let (na, nb) = s.counts(30);
    assert!(na > 0 && nb > 0 && na + nb == 30, "{na} + {nb}");
}

/// No endpoints: refused at once.
fn a_service_without_endpoints_is_refused_at_once(s: &Backend) {
    let t0 = std::time::Instant::now();
    let e = connect(&s.ns.0, "10.96.0.11:80").expect_err("nothing serves it");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
    assert!(t0.elapsed() < std::time::Duration::from_secs(1));
}

/// Affinity: one client, one endpoint.
fn a_sticky_service_sends_one_client_to_one_endpoint(s: &Backend) {
    let before = (s.a.load(SeqCst), s.b.load(SeqCst));
    for _ in 0..12 {
        connect(&s.ns.0, "10.96.0.12:80").expect("the sticky Service answers");
    }
    let now = s.counts(before.0 + before.1 + 12);
    let d = (now.0 - before.0, now.1 - before.1);
    assert!(d == (12, 0) || d == (0, 12), "sticky: {d:?}");
    let (_, text) = nft_list(&s.ns.0, "keelson");
    assert!(text.contains("update @affinity-"), "{text}");
}

/// A node port on the node's address.
fn a_node_port_answers_on_the_nodes_address(s: &Backend) {
    connect(&s.ns.0, "10.201.0.1:30080").expect("the node port answers");
}

/// Delta: web loses 10.201.0.3; every connection now reaches .2.
fn a_delta_that_drops_an_endpoint_sends_every_connection_to_the_other(s: &mut Backend) {
    let tx = s.state.update(&backend_model(vec![ep(2)]));
    let r2 = s.state.rendered();
    assert_eq!(r2, nftables::render(&backend_model(vec![ep(2)]), s.cidr));
    assert!(tx.len() <= 8, "a small delta: {} messages", tx.len());
    in_ns(&s.ns.0, || tx.commit().unwrap());
    let before = (s.a.load(SeqCst), s.b.load(SeqCst));
    for _ in 0..10 {
        connect(&s.ns.0, "10.96.0.10:80").unwrap();
    }
    assert_eq!(
        {
            let now = s.counts(before.0 + before.1 + 10);
            (now.0 - before.0, now.1 - before.1)
        },
        (10, 0)
    );
}

/// Someone flushes the dispatch chain; a full sync repairs it. The whole table deleted: a full
/// sync re-creates it. Builds on the delta before: the full sync loads the state it left.
fn a_full_sync_repairs_a_flushed_chain_and_recreates_a_deleted_table(s: &Backend) {
    let r2 = s.state.rendered();
    sh(&[
        "ip", "netns", "exec", &s.ns.0, "nft", "flush", "chain", "ip", "keelson", "services",
    ]);
    assert!(connect(&s.ns.0, "10.96.0.10:80").is_err(), "flushed");
    in_ns(&s.ns.0, || nftables::load(&r2, true).commit().unwrap());
    connect(&s.ns.0, "10.96.0.10:80").expect("repaired");
    // The whole table deleted: a full sync re-creates it.
    sh(&[
        "ip", "netns", "exec", &s.ns.0, "nft", "delete", "table", "ip", "keelson",
    ]);
    in_ns(&s.ns.0, || nftables::load(&r2, true).commit().unwrap());
    connect(&s.ns.0, "10.96.0.10:80").expect("re-created");
}

/// `cleanup` removes the table.
fn cleanup_removes_the_table(s: &Backend) {
    in_ns(&s.ns.0, || nftables::cleanup().unwrap());
    assert!(!nft_list(&s.ns.0, "keelson").0, "cleanup removes the table");
}

/// A random walk of Service changes and the namespaces it is played in.
struct Walk {
    /// The walk applied as deltas.
    ns1: Ns,
    /// A fresh load of the walk's last model.
    ns2: Ns,
    /// A full load from a state brought to the last model without deltas.
    ns3: Ns,
    /// Periodic full syncs over the walk, with the state `full` they keep...
    ns4: Ns,
    /// ...and a fresh load of each model synced there, to compare with.
    ns5: Ns,
    cidr: Ipv4Net,
    /// 150 models of up to 8 Service ports (a fixed seed).
    history: Vec<Model>,
    full: nftables::State,
}

/// 150 random models of up to eight Service ports (TCP and UDP, node ports, external IPs,
/// local traffic policy, affinity), from a fixed seed.
fn random_walk() -> Vec<Model> {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut rnd = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let mut history = vec![];
    for _ in 0..150 {
        let mut ports = std::collections::BTreeMap::new();
        for i in 0..8u8 {
            if rnd(4) == 0 {
                continue;
            }
            let eps: Vec<Endpoint> = (0..rnd(4) as u8)
                .map(|k| Endpoint {
                    ip: [10, 244, 1 + k, 2 + rnd(3) as u8].into(),
                    port: 8080,
                    local: rnd(2) == 0,
                })
                .collect();
            let local = rnd(3) == 0;
            let p = ServicePort {
                name: format!("default/s{i}:"),
                proto: if i % 3 == 0 { Proto::Udp } else { Proto::Tcp },
                cluster_ip: Some([10, 96, 0, 10 + i].into()),
                port: 80,
                node_port: (rnd(2) == 0).then_some(30000 + u16::from(i)),
                external_ips: if rnd(3) == 0 {
                    vec![[192, 0, 2, i].into()]
                } else {
                    vec![]
                },
                external_endpoints: if local {
                    eps.iter().filter(|e| e.local).copied().collect()
                } else {
                    eps.clone()
                },
                cluster_endpoints: eps,
                external_local: local,
                affinity_seconds: (rnd(4) == 0).then_some(30 + rnd(2) as u32),
                health_check_node_port: None,
            };
            ports.insert(format!("{}/{:?}", p.name, p.proto), p);
        }
        history.push(Model { ports });
    }
    history
}

/// The lines of `nft -s list table ip keelson` in `ns`, sorted.
fn listing(ns: &str) -> Vec<String> {
    let o = Command::new("ip")
        .args([
            "netns", "exec", ns, "nft", "-s", "list", "table", "ip", "keelson",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Element and chain order may differ; the content may not.
    let mut lines: Vec<String> = String::from_utf8_lossy(&o.stdout)
        .split([',', '\n', '{', '}'])
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect();
    lines.sort();
    lines
}

impl Walk {
    /// A full sync of the walk's model `round` in `ns4`, as the proxy makes it (reset, repair
    /// load, then whatever the state does not hold removed), and a fresh load of it in `ns5`;
    /// how many foreign chains and sets it removed.
    fn full_sync(&mut self, round: usize) -> Result<usize, NftError> {
        let m = &self.history[round];
        self.full.reset(m);
        let full = &self.full;
        let removed = in_ns(&self.ns4.0, || {
            full.load(true).commit()?;
            nftables::remove_foreign(full)
        });
        in_ns(&self.ns5.0, || {
            nftables::cleanup().unwrap();
            nftables::load(&nftables::render(m, self.cidr), false)
                .commit()
                .unwrap()
        });
        removed
    }
}

#[test]
fn random_deltas_end_where_a_fresh_load_does() {
    let (ns1, ns2, ns3) = (Ns::new("nftr"), Ns::new("nftf"), Ns::new("nfts"));
    let (ns4, ns5) = (Ns::new("nftp"), Ns::new("nftq"));
    let cidr: Ipv4Net = "10.244.0.0/16".parse().unwrap();
    let mut walk = Walk {
        ns1,
        ns2,
        ns3,
        ns4,
        ns5,
        cidr,
        history: random_walk(),
        full: nftables::State::new(cidr),
    };
    crate::scenarios!(&mut walk;
        every_delta_of_a_random_walk_is_taken_and_the_table_ends_as_a_fresh_load,
        a_full_load_from_a_state_reset_without_deltas_is_the_same_table,
        periodic_full_syncs_over_the_walk_always_equal_a_fresh_load,
        foreign_chains_and_sets_in_keelsons_table_are_removed_by_a_full_sync,
    );
}

/// A random walk of Service changes applied as deltas: the kernel takes every transaction, and
/// the table ends up exactly as a fresh load of the last state.
fn every_delta_of_a_random_walk_is_taken_and_the_table_ends_as_a_fresh_load(w: &Walk) {
    let (ns1, ns2) = (&w.ns1, &w.ns2);
    let mut state = nftables::State::new(w.cidr);
    in_ns(&ns1.0, || {
        nftables::load(&state.rendered(), false).commit().unwrap()
    });
    for (round, m) in w.history.iter().enumerate() {
        let tx = state.update(m);
        in_ns(&ns1.0, || tx.commit())
            .unwrap_or_else(|e| panic!("round {round}: the kernel refused the delta: {e}"));
    }
    let fresh = nftables::render(w.history.last().unwrap(), w.cidr);
    assert_eq!(state.rendered(), fresh);
    in_ns(&ns2.0, || nftables::load(&fresh, false).commit().unwrap());
    assert_eq!(listing(&ns1.0), listing(&ns2.0));
}

/// A full load encoded straight from a state brought there without deltas (the proxy's first
/// and periodic full syncs) is the same table, and so is a repair load over it. Builds on the
/// fresh load of the walk's last model before.
fn a_full_load_from_a_state_reset_without_deltas_is_the_same_table(w: &Walk) {
    let (ns2, ns3) = (&w.ns2, &w.ns3);
    let last = w.history.last().unwrap();
    let fresh = nftables::render(last, w.cidr);
    let mut direct = nftables::State::new(w.cidr);
    direct.reset(last);
    assert_eq!(direct.rendered(), fresh);
    in_ns(&ns3.0, || direct.load(false).commit().unwrap());
    assert_eq!(listing(&ns3.0), listing(&ns2.0));
    in_ns(&ns3.0, || direct.load(true).commit().unwrap());
    assert_eq!(listing(&ns3.0), listing(&ns2.0));
}

/// Periodic full syncs over the same walk, as the proxy makes them (reset, repair load, then
/// whatever the state does not hold removed): the pick and affinity chains and affinity sets
/// that a reset released are deleted, so the table always equals a fresh load of the latest
/// state.
fn periodic_full_syncs_over_the_walk_always_equal_a_fresh_load(w: &mut Walk) {
    in_ns(&w.ns4.0, || w.full.load(false).commit().unwrap());
    let last = w.history.len() - 1;
    let rounds: Vec<usize> = (0..w.history.len()).step_by(7).chain([last]).collect();
    for round in rounds {
        w.full_sync(round)
            .unwrap_or_else(|e| panic!("round {round}: the kernel refused the full sync: {e}"));
        assert_eq!(listing(&w.ns4.0), listing(&w.ns5.0), "round {round}");
    }
}

/// Chains and sets someone else put in keelson's table (a base chain, a chain jumped to, a set
/// it looks up, a verdict map naming a chain) are listed and removed after a full sync. Builds
/// on the full syncs before (`ns4` holds the walk's last model).
fn foreign_chains_and_sets_in_keelsons_table_are_removed_by_a_full_sync(w: &mut Walk) {
    let ns4 = &w.ns4.0;
    let (ours_chains, ours_sets) = in_ns(ns4, || keelson::net::nft::list("keelson")).unwrap();
    assert!(
        ours_chains.iter().any(|c| c == "services"),
        "{ours_chains:?}"
    );
    assert!(
        ours_sets.iter().any(|s| s == "vip-dispatch"),
        "{ours_sets:?}"
    );
    for cmd in [
        "add chain ip keelson alien-base { type filter hook input priority 5 ; }",
        "add chain ip keelson alien",
        "add chain ip keelson alien-leaf",
        "add rule ip keelson alien-leaf counter",
        "add set ip keelson alien-set { type ipv4_addr ; }",
        "add map ip keelson alien-map { type ipv4_addr : verdict ; }",
        "add element ip keelson alien-map { 10.9.9.9 : jump alien-leaf }",
        "add rule ip keelson alien-base ip saddr @alien-set jump alien",
        "add rule ip keelson alien-base ip daddr { 10.9.9.1, 10.9.9.2 } counter",
        "add rule ip keelson alien ip daddr vmap @alien-map",
    ] {
        sh(&["ip", "netns", "exec", ns4, "nft", cmd]);
    }
    let (chains, sets) = in_ns(ns4, || keelson::net::nft::list("keelson")).unwrap();
    for c in ["alien", "alien-base", "alien-leaf"] {
        assert!(chains.iter().any(|x| x == c), "{c} in {chains:?}");
    }
    for st in ["alien-set", "alien-map"] {
        assert!(sets.iter().any(|x| x == st), "{st} in {sets:?}");
    }
    assert!(
        !sets.iter().any(|x| x.starts_with("__")),
        "anonymous: {sets:?}"
    );
    let last = w.history.len() - 1;
    let removed = w.full_sync(last).unwrap();
    assert_eq!(
        removed, 5,
        "three chains, a set and a map (not the anonymous set)"
    );
    assert_eq!(listing(&w.ns4.0), listing(&w.ns5.0));
    assert_eq!(w.full_sync(last).unwrap(), 0);
}

/// ctnetlink: a filtered flush deletes the UDP entries answered by one endpoint and leaves the
/// others.
#[test]
fn conntrack_entries_of_one_endpoint_are_deleted() {
    use keelson::proxy::{conntrack, model::Model, nftables};
    let ns = Ns::new("ct");
    ns.veth(&[("v0", "10.202.0.1/24"), ("v1", "10.202.0.2/24")]);
    let cidr: ipnet::Ipv4Net = "10.244.0.0/16".parse().unwrap();
    // Our (empty) table turns connection tracking on in the namespace.
    let listeners = in_ns(&ns.0, || {
        let r = nftables::render(&Model::default(), cidr);
        nftables::load(&r, false).commit().unwrap();
        let l: Vec<std::net::UdpSocket> = [5353u16, 5454]
            .iter()
            .map(|p| std::net::UdpSocket::bind(("10.202.0.2", *p)).unwrap())
            .collect();
        for _ in 0..3 {
            for p in [5353u16, 5454] {
                let s = std::net::UdpSocket::bind("10.202.0.1:0").unwrap();
                s.send_to(b"q", ("10.202.0.2", p)).unwrap();
            }
        }
        l
    });
    let flows = |port: u16| {
        let o = Command::new("ip")
            .args(["netns", "exec", &ns.0, "conntrack", "-L", "-p", "udp"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter(|l| l.contains(&format!("dport={port} ")))
            .count()
    };
    assert_eq!((flows(5353), flows(5454)), (3, 3), "three flows to each");
    in_ns(&ns.0, || {
        conntrack::delete_udp_replies_from("10.202.0.2".parse().unwrap(), 5353).unwrap()
    });
    assert_eq!(
        (flows(5353), flows(5454)),
        (0, 3),
        "only 5353's flows are gone"
    );
    drop(listeners);
}

/// The agent's node rules (host-gw masquerade and the Service-range reject) through nf_tables:
/// installed twice they read the same, an untranslated Service address is refused at once,
/// and `cleanup` removes the table.
#[test]
fn node_masquerade_and_reject_rules() {
    use keelson::net::hostgw;
    let ns = Ns::new("nftn");
    ns.veth(&[("v0", "10.201.0.1/24")]);
    ns.service_route();
    let list = || {
        let o = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns.0,
                "nft",
                "list",
                "table",
                "ip",
                "keelson-node-kt0",
            ])
            .output()
            .unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).to_string(),
        )
    };
    let install = || {
        in_ns(&ns.0, || {
            hostgw::ensure_masquerade(
                "kt0",
                "10.244.1.0/24".parse().unwrap(),
                "10.244.0.0/16".parse().unwrap(),
                Some(&hostgw::ServiceRange {
                    cidr: "10.96.0.0/12".parse().unwrap(),
                    // An address this node serves itself (the cluster DNS): exempt.
                    served: vec!["10.96.0.53".parse().unwrap()],
                }),
            )
        })
        .unwrap()
    };
    assert_eq!(install(), hostgw::Filter::Nftables);
    let (ok, first) = list();
    assert!(ok, "{first}");
    for want in [
        "type nat hook postrouting priority srcnat",
        "ip saddr 10.244.1.0/24 ip daddr 10.244.0.0/16 return",
        "ip saddr 10.244.1.0/24 masquerade",
        "type filter hook forward priority filter",
        "type filter hook output priority filter",
        "ip daddr 10.96.0.53 return",
        "ip daddr 10.96.0.0/12 reject",
    ] {
        assert!(first.contains(want), "{want:?} missing from\n{first}");
    }
    assert!(
        first.find("ip daddr 10.96.0.53 return") < first.find("ip daddr 10.96.0.0/12 reject"),
        "{first}"
    );
    assert_eq!(first.matches("reject").count(), 2, "{first}");
    install();
    assert_eq!(list().1, first, "a second install changes nothing");
    // Nothing translates 10.96.0.10: refused at once, not left to time out.
    let e = connect(&ns.0, "10.96.0.10:80").unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
    in_ns(&ns.0, || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(hostgw::cleanup("kt0"))
    })
    .unwrap();
    assert!(!list().0, "table removed");
}
