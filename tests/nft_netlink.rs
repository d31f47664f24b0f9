//! The nf_tables netlink layer against the kernel, in a scratch network namespace (removed at
//! the end): a table, a chain and a concatenated verdict map with elements appear in
//! `nft list` exactly as written, elements are deleted, a bad message is reported with what
//! it was, and nothing of a failed transaction is applied.
use std::{os::fd::AsFd, process::Command};

use keelson::proxy::nft::{
    Batch, DATA_VERDICT, Data, TYPE_INET_PROTOCOL, TYPE_INET_SERVICE, TYPE_IPADDR, VERDICT_GOTO,
    concat_type, vip_key,
};

struct Ns(String);
impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.0])
            .status();
    }
}

fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
        .join()
        .unwrap()
    })
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
