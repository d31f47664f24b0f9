//! The iptables backend: the model rendered in kube-proxy's layout and chain names
//! (KUBE-SERVICES, KUBE-SVC-*, KUBE-SVL-*, KUBE-EXT-*, KUBE-SEP-*, KUBE-NODEPORTS,
//! KUBE-MARK-MASQ, KUBE-POSTROUTING, and the filter table's KUBE-EXTERNAL-SERVICES /
//! KUBE-FORWARD), so users' debugging habits carry over, loaded with `iptables-restore
//! --noflush` in one transaction that declares only the chains whose content changed.

use std::{collections::BTreeMap, fmt::Write as _};

use ipnet::Ipv4Net;
use sha2::{Digest, Sha256};

use super::model::{Endpoint, Model, ServicePort};

/// The masquerade mark bit (kube-proxy's default).
pub const MASQ_MARK: &str = "0x4000";

/// kube-proxy's chain-name hash: base32 of SHA-256, 16 characters.
fn hash(s: &str) -> String {
    let d = Sha256::digest(s.as_bytes());
    let b32 = base32(&d);
    b32[..16].to_string()
}

fn base32(data: &[u8]) -> String {
    const A: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::new();
    let (mut buf, mut bits) = (0u32, 0u32);
    for &b in data {
        buf = (buf << 8) | b as u32;
        bits += 8;
        while bits >= 5 {
            out.push(A[((buf >> (bits - 5)) & 31) as usize] as char);
            bits -= 5;
        }
    }
    if bits > 0 {
        out.push(A[((buf << (5 - bits)) & 31) as usize] as char);
    }
    out
}

fn svc_chain(p: &ServicePort) -> String {
    format!(
        "KUBE-SVC-{}",
        hash(&format!("{}{}", p.name, p.proto.lower()))
    )
}
fn svl_chain(p: &ServicePort) -> String {
    format!(
        "KUBE-SVL-{}",
        hash(&format!("{}{}", p.name, p.proto.lower()))
    )
}
fn ext_chain(p: &ServicePort) -> String {
    format!(
        "KUBE-EXT-{}",
        hash(&format!("{}{}", p.name, p.proto.lower()))
    )
}
fn sep_chain(p: &ServicePort, e: &Endpoint) -> String {
    format!(
        "KUBE-SEP-{}",
        hash(&format!("{}{}{}:{}", p.name, p.proto.lower(), e.ip, e.port))
    )
}

/// One table's chains: name → rules (each rule without the `-A CHAIN` prefix).
pub type Chains = BTreeMap<String, Vec<String>>;

/// The rendered state: nat and filter chains.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub nat: Chains,
    pub filter: Chains,
}

/// The jumps from the built-in chains into keelson's (kept once each, never duplicated).
pub const JUMPS: &[(&str, &str, &str)] = &[
    (
        "nat",
        "PREROUTING",
        "-m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
    ),
    (
        "nat",
        "OUTPUT",
        "-m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
    ),
    (
        "nat",
        "POSTROUTING",
        "-m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING",
    ),
    (
        "filter",
        "INPUT",
        "-m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES",
    ),
    (
        "filter",
        "FORWARD",
        "-m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD",
    ),
];

/// A rule comment.
fn c(s: &str) -> String {
    format!("-m comment --comment \"{s}\"")
}

/// Rules spreading a Service port's traffic over `eps` (sticky first, under session
/// affinity; then one random pick each, probability 1/left).
fn spread(p: &ServicePort, eps: &[Endpoint]) -> Vec<String> {
    let mut rules = vec![];
    if let Some(t) = p.affinity_seconds {
        for e in eps {
            let sep = sep_chain(p, e);
            rules.push(format!(
                "{} -m recent --name {sep} --rcheck --seconds {t} --reap --mask 255.255.255.255 --rsource -j {sep}",
                c(&format!("{} -> {}:{}", p.name, e.ip, e.port))
            ));
        }
    }
    let n = eps.len();
    for (i, e) in eps.iter().enumerate() {
        let sep = sep_chain(p, e);
        let left = n - i;
        let comment = c(&format!("{} -> {}:{}", p.name, e.ip, e.port));
        if left > 1 {
            rules.push(format!(
                "{comment} -m statistic --mode random --probability {:.10} -j {sep}",
                1.0 / left as f64
            ));
        } else {
            rules.push(format!("{comment} -j {sep}"));
        }
    }
    rules
}

/// Renders the model. `cluster_cidr`: traffic from outside it to a ClusterIP is masqueraded.
pub fn render(m: &Model, cluster_cidr: Ipv4Net) -> Rendered {
    let mut r = Render::new(cluster_cidr);
    for p in m.ports.values() {
        r.endpoints(p);
        r.cluster_ip(p);
        r.external(p);
    }
    r.finish()
}

/// The render in progress: the chains so far and the rules of the shared chains.
struct Render {
    cluster_cidr: Ipv4Net,
    nat: Chains,
    filter: Chains,
    services: Vec<String>,
    nodeports: Vec<String>,
    ext_reject: Vec<String>,
}

impl Render {
    fn new(cluster_cidr: Ipv4Net) -> Self {
        let mut nat = Chains::new();
        let mut filter = Chains::new();
        nat.insert(
            "KUBE-MARK-MASQ".into(),
            vec![format!("-j MARK --or-mark {MASQ_MARK}")],
        );
        nat.insert(
            "KUBE-POSTROUTING".into(),
            vec![
                format!("-m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN"),
                format!("-j MARK --xor-mark {MASQ_MARK}"),
                format!(
                    "{} -j MASQUERADE --random-fully",
                    c("kubernetes service traffic requiring SNAT")
                ),
            ],
        );
        filter.insert(
            "KUBE-FORWARD".into(),
            vec![
                "-m conntrack --ctstate INVALID -j DROP".into(),
                format!(
                    "{} -m mark --mark {MASQ_MARK}/{MASQ_MARK} -j ACCEPT",
                    c("kubernetes forwarding rules")
                ),
                "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT".into(),
            ],
        );
        Self {
            cluster_cidr,
            nat,
            filter,
            services: vec![],
            nodeports: vec![],
            ext_reject: vec![],
        }
    }

    /// One KUBE-SEP chain per endpoint of either kind.
    fn endpoints(&mut self, p: &ServicePort) {
        let proto = p.proto.lower();
        for e in p.all_endpoints() {
            let sep = sep_chain(p, &e);
            let mut rules = vec![format!("{} -s {}/32 -j KUBE-MARK-MASQ", c(&p.name), e.ip)];
            let recent = p
                .affinity_seconds
                .map(|_| format!(" -m recent --name {sep} --mask 255.255.255.255 --rsource --set"))
                .unwrap_or_default();
            rules.push(format!(
                "{} -m {proto} -p {proto}{recent} -j DNAT --to-destination {}:{}",
                c(&p.name),
                e.ip,
                e.port
            ));
            self.nat.insert(sep, rules);
        }
    }

    fn cluster_ip(&mut self, p: &ServicePort) {
        // Without endpoints the packet is not translated; the node's Service-range route
        // rejects it.
        let Some(vip) = p.cluster_ip.filter(|_| !p.cluster_endpoints.is_empty()) else {
            return;
        };
        let proto = p.proto.lower();
        let what = format!("{} cluster IP", p.name);
        let svc = svc_chain(p);
        let m_dst = format!("-d {vip}/32 -p {proto} -m {proto} --dport {}", p.port);
        self.services.push(format!("{} {m_dst} -j {svc}", c(&what)));
        let mut rules = vec![format!(
            "{} ! -s {} {m_dst} -j KUBE-MARK-MASQ",
            c(&what),
            self.cluster_cidr
        )];
        rules.extend(spread(p, &p.cluster_endpoints));
        self.nat.insert(svc, rules);
    }

    /// Node port and external IPs → KUBE-EXT-*, or REJECTs when no endpoint serves them.
    fn external(&mut self, p: &ServicePort) {
        if p.node_port.is_none() && p.external_ips.is_empty() {
            return;
        }
        let proto = p.proto.lower();
        if p.external_endpoints.is_empty() {
            for ip in &p.external_ips {
                self.ext_reject.push(format!(
                    "{} -d {ip}/32 -p {proto} -m {proto} --dport {} -j REJECT",
                    c(&format!("{} has no local endpoints", p.name)),
                    p.port
                ));
            }
            if let Some(np) = p.node_port {
                self.ext_reject.push(format!(
                    "{} -m addrtype --dst-type LOCAL -p {proto} -m {proto} --dport {np} -j REJECT",
                    c(&format!("{} has no endpoints", p.name))
                ));
            }
            return;
        }
        let ext = ext_chain(p);
        let rules = self.ext_rules(p);
        self.nat.insert(ext.clone(), rules);
        for ip in &p.external_ips {
            self.services.push(format!(
                "{} -d {ip}/32 -p {proto} -m {proto} --dport {} -j {ext}",
                c(&format!("{} external IP", p.name)),
                p.port
            ));
        }
        if let Some(np) = p.node_port {
            self.nodeports.push(format!(
                "{} -p {proto} -m {proto} --dport {np} -j {ext}",
                c(&p.name)
            ));
        }
    }

    /// The KUBE-EXT chain's rules.
    fn ext_rules(&mut self, p: &ServicePort) -> Vec<String> {
        let svc = svc_chain(p);
        let mut rules = vec![];
        if p.external_local {
            // Pods' own traffic may use any endpoint; everyone else only local ones, and
            // keeps their source address.
            if !p.cluster_endpoints.is_empty() {
                rules.push(format!(
                    "{} -s {} -j {svc}",
                    c("pod traffic for external destinations"),
                    self.cluster_cidr
                ));
            }
            let svl = svl_chain(p);
            rules.push(format!("-j {svl}"));
            self.nat.insert(svl, spread(p, &p.external_endpoints));
        } else {
            rules.push(format!(
                "{} -j KUBE-MARK-MASQ",
                c("masquerade traffic for external destinations")
            ));
            if p.cluster_endpoints == p.external_endpoints {
                rules.push(format!("-j {svc}"));
            } else {
                rules.extend(spread(p, &p.external_endpoints));
            }
        }
        rules
    }

    fn finish(mut self) -> Rendered {
        self.services.push(format!(
            "{} -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS",
            c("kubernetes service nodeports; NOTE: this must be the last rule in this chain")
        ));
        self.nat.insert("KUBE-SERVICES".into(), self.services);
        self.nat.insert("KUBE-NODEPORTS".into(), self.nodeports);
        self.filter
            .insert("KUBE-EXTERNAL-SERVICES".into(), self.ext_reject);
        Rendered {
            nat: self.nat,
            filter: self.filter,
        }
    }
}

/// The `iptables-restore --noflush` input that turns `old` (what was loaded last, or None
/// for a full sync) into `new`: changed and new chains are declared (which flushes them) and
/// filled, vanished chains deleted. Untouched chains are not mentioned.
pub fn restore_input(old: Option<&Rendered>, new: &Rendered) -> String {
    let mut out = String::new();
    for (table, o, n) in [
        ("nat", old.map(|r| &r.nat), &new.nat),
        ("filter", old.map(|r| &r.filter), &new.filter),
    ] {
        let _ = writeln!(out, "*{table}");
        let changed: Vec<&String> = n
            .iter()
            .filter(|(k, v)| o.and_then(|o| o.get(*k)) != Some(*v))
            .map(|(k, _)| k)
            .collect();
        for k in &changed {
            let _ = writeln!(out, ":{k} - [0:0]");
        }
        // Chains to delete must be flushed first (another may still jump to them).
        let gone: Vec<&String> = o
            .into_iter()
            .flat_map(|o| o.keys())
            .filter(|k| !n.contains_key(*k))
            .collect();
        for k in &gone {
            let _ = writeln!(out, ":{k} - [0:0]");
        }
        for k in &changed {
            for r in &n[*k] {
                let _ = writeln!(out, "-A {k} {r}");
            }
        }
        for k in &gone {
            let _ = writeln!(out, "-X {k}");
        }
        let _ = writeln!(out, "COMMIT");
    }
    out
}

use crate::net::xtables;
pub use crate::net::xtables::{XtError as IptError, restore};

/// Adds the jumps from the built-in chains when missing (first in their chains).
pub fn ensure_jumps() -> Result<(), IptError> {
    for (table, chain, rule) in JUMPS {
        xtables::ensure_rule(table, chain, &shell_words(rule), true)?;
    }
    Ok(())
}

/// Every KUBE-* chain in the nat and filter tables.
pub fn kernel_chains() -> Result<Vec<(&'static str, Vec<String>)>, IptError> {
    ["nat", "filter"]
        .into_iter()
        .map(|t| Ok((t, xtables::chains(t, "KUBE-")?)))
        .collect()
}

/// Removes everything this backend installed: the jumps, then every KUBE-* chain it owns.
pub fn cleanup() -> Result<(), IptError> {
    for (table, chain, rule) in JUMPS {
        xtables::delete_rule(table, chain, &shell_words(rule));
    }
    let mut input = String::new();
    for (table, ours) in kernel_chains()? {
        let _ = writeln!(input, "*{table}");
        for c in &ours {
            let _ = writeln!(input, ":{c} - [0:0]");
        }
        for c in &ours {
            let _ = writeln!(input, "-X {c}");
        }
        let _ = writeln!(input, "COMMIT");
    }
    restore(&input)
}

/// Splits a rule written with double-quoted comments into arguments.
fn shell_words(s: &str) -> Vec<String> {
    let mut out = vec![];
    let mut cur = String::new();
    let mut quoted = false;
    for ch in s.chars() {
        match ch {
            '"' => quoted = !quoted,
            ' ' if !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::model::{Endpoint, Proto};
    use std::net::Ipv4Addr;

    fn port(eps: &[(u8, bool)], node_port: Option<u16>, affinity: Option<u32>) -> ServicePort {
        let eps: Vec<Endpoint> = eps
            .iter()
            .map(|(i, local)| Endpoint {
                ip: Ipv4Addr::new(10, 244, 0, *i),
                port: 8080,
                local: *local,
            })
            .collect();
        ServicePort {
            name: "default/web:http".into(),
            proto: Proto::Tcp,
            cluster_ip: Some(Ipv4Addr::new(10, 96, 0, 10)),
            port: 80,
            node_port,
            external_ips: vec![],
            cluster_endpoints: eps.clone(),
            external_endpoints: eps,
            external_local: false,
            affinity_seconds: affinity,
            health_check_node_port: None,
        }
    }

    fn model(p: ServicePort) -> Model {
        Model {
            ports: [("default/web:http/TCP".to_string(), p)].into(),
        }
    }

    #[test]
    fn chain_names_follow_kube_proxy() {
        // kube-proxy: base32(sha256(servicePortName + protocol))[:16].
        assert_eq!(base32(b"foobar"), "MZXW6YTBOI");
        let p = port(&[(2, true)], None, None);
        let n = svc_chain(&p);
        assert!(n.starts_with("KUBE-SVC-") && n.len() == 25, "{n}");
    }

    #[test]
    fn endpoints_are_spread_with_decreasing_probabilities() {
        let r = render(
            &model(port(
                &[(2, true), (3, false), (4, false)],
                Some(30080),
                None,
            )),
            "10.244.0.0/16".parse().unwrap(),
        );
        let svc = r
            .nat
            .iter()
            .find(|(k, _)| k.starts_with("KUBE-SVC-"))
            .unwrap()
            .1;
        assert!(svc[0].contains("! -s 10.244.0.0/16") && svc[0].contains("KUBE-MARK-MASQ"));
        assert!(svc[1].contains("--probability 0.3333333333"));
        assert!(svc[2].contains("--probability 0.5000000000"));
        assert!(!svc[3].contains("statistic"));
        assert_eq!(
            r.nat.keys().filter(|k| k.starts_with("KUBE-SEP-")).count(),
            3
        );
        let sep = r
            .nat
            .iter()
            .find(|(k, _)| k.starts_with("KUBE-SEP-"))
            .unwrap()
            .1;
        assert!(sep[1].contains("-j DNAT --to-destination 10.244.0."));
        assert!(r.nat["KUBE-NODEPORTS"][0].contains("--dport 30080 -j KUBE-EXT-"));
        assert!(
            r.nat["KUBE-SERVICES"]
                .last()
                .unwrap()
                .contains("KUBE-NODEPORTS")
        );
    }

    #[test]
    fn no_endpoints_means_no_translation_and_a_reject_for_node_ports() {
        let r = render(
            &model(port(&[], Some(30080), None)),
            "10.244.0.0/16".parse().unwrap(),
        );
        assert_eq!(r.nat["KUBE-SERVICES"].len(), 1, "only the nodeports jump");
        assert!(r.filter["KUBE-EXTERNAL-SERVICES"][0].contains("--dport 30080 -j REJECT"));
    }

    #[test]
    fn affinity_uses_recent_and_only_changed_chains_are_rewritten() {
        let cidr = "10.244.0.0/16".parse().unwrap();
        let a = render(&model(port(&[(2, true), (3, true)], None, Some(60))), cidr);
        let svc = a
            .nat
            .iter()
            .find(|(k, _)| k.starts_with("KUBE-SVC-"))
            .unwrap()
            .1;
        assert!(svc[1].contains("--rcheck --seconds 60 --reap"));
        let full = restore_input(None, &a);
        assert!(full.contains(":KUBE-SERVICES - [0:0]"));
        // One endpoint more: its SEP chain and the SVC chain change; KUBE-SERVICES does not.
        let b = render(
            &model(port(&[(2, true), (3, true), (4, true)], None, Some(60))),
            cidr,
        );
        let delta = restore_input(Some(&a), &b);
        assert!(!delta.contains(":KUBE-SERVICES "), "{delta}");
        assert!(delta.contains(":KUBE-SVC-"));
        assert_eq!(delta.matches(":KUBE-SEP-").count(), 1, "{delta}");
        // And back: the vanished SEP chain is deleted.
        let back = restore_input(Some(&b), &a);
        assert_eq!(back.matches("-X KUBE-SEP-").count(), 1, "{back}");
        assert_eq!(
            shell_words("-m comment --comment \"a b\" -j X"),
            ["-m", "comment", "--comment", "a b", "-j", "X"]
        );
    }
}
