//! The nf_tables netlink layer against the kernel, in a scratch network namespace (removed at
//! the end): a table, a chain and a concatenated verdict map with elements appear in
//! `nft list` exactly as written, elements are deleted, a bad message is reported with what
//! it was, and nothing of a failed transaction is applied; and a VIP map with a DNAT rule
//! translates a real connection.
mod common;

use std::process::Command;

use common::in_netns as in_ns;

use keelson::proxy::nft::{
    Batch, DATA_VERDICT, Data, Expr, HOOK_OUTPUT, REG_1, REG_2, REG32_00, TYPE_INET_PROTOCOL,
    TYPE_INET_SERVICE, TYPE_IPADDR, VERDICT_GOTO, concat_type, load_vip_key, vip_key,
};

struct Ns(String);
impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.0])
            .status();
    }
}

fn nft_list(ns: &str) -> (bool, String) {
    let o = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "list", "table", "ip", "kt"])
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).to_string(),
    )
}

#[test]
fn tables_chains_maps_and_elements_through_netlink() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "needs root (network namespaces)"
    );
    let mut b = [0u8; 3];
    getrandom::fill(&mut b).unwrap();
    let ns = Ns(format!("kt-nft-{}", hex::encode(b)));
    assert!(
        Command::new("ip")
            .args(["netns", "add", &ns.0])
            .status()
            .unwrap()
            .success()
    );
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
    let (ok, out) = nft_list(&ns.0);
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
    let (_, out) = nft_list(&ns.0);
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
    assert!(!nft_list(&ns.0).0, "the table is gone");
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
    assert!(
        nix::unistd::geteuid().is_root(),
        "needs root (network namespaces)"
    );
    let mut b = [0u8; 3];
    getrandom::fill(&mut b).unwrap();
    let ns = Ns(format!("kt-nftd-{}", hex::encode(b)));
    sh(&["ip", "netns", "add", &ns.0]);
    sh(&["ip", "-n", &ns.0, "link", "set", "lo", "up"]);
    sh(&[
        "ip", "-n", &ns.0, "link", "add", "v0", "type", "veth", "peer", "name", "v1",
    ]);
    sh(&[
        "ip",
        "-n",
        &ns.0,
        "addr",
        "add",
        "10.201.0.1/24",
        "dev",
        "v0",
    ]);
    sh(&["ip", "-n", &ns.0, "link", "set", "v0", "up"]);
    sh(&["ip", "-n", &ns.0, "link", "set", "v1", "up"]);
    sh(&[
        "ip",
        "-n",
        &ns.0,
        "route",
        "add",
        "10.96.0.0/12",
        "dev",
        "v0",
    ]);
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
