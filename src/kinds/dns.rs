//! A pod's name service as kubelet sets it up: its resolv.conf from `dnsPolicy` and
//! `dnsConfig`, its host name and domain (`hostname`, `subdomain`, `setHostnameAsFQDN`), the
//! managed /etc/hosts with `hostAliases`; and the DNS name rules the cluster DNS relies on.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::Pod;

/// Limits kubelet applies to what it writes (ExpandedDNSConfig, GA since 1.28).
pub const MAX_NAMESERVERS: usize = 3;
pub const MAX_SEARCH_PATHS: usize = 32;
pub const MAX_SEARCH_CHARS: usize = 2048;
/// A search domain longer than this aborts some resolvers (glibc 2.28): kubelet drops it.
const MAX_SEARCH_DOMAIN: usize = 253;
/// The longest host name the kernel takes (`setHostnameAsFQDN`).
pub const MAX_HOSTNAME: usize = 64;

/// The lines of a resolv.conf that matter: nameservers accumulate, the last `search` and the
/// last `options` line win (as kubelet reads the node's file).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResolvConf {
    pub nameservers: Vec<String>,
    pub searches: Vec<String>,
    pub options: Vec<String>,
}

impl ResolvConf {
    pub fn parse(text: &str) -> ResolvConf {
        let mut r = ResolvConf::default();
        for line in text.lines() {
            let line = line.trim();
            if line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            let mut f = line.split_whitespace();
            match f.next() {
                Some("nameserver") => r.nameservers.extend(f.next().map(str::to_string)),
                Some("search") | Some("domain") => {
                    r.searches = f.map(|s| s.trim_end_matches('.').to_string()).collect()
                }
                Some("options") => r.options = f.map(str::to_string).collect(),
                _ => {}
            }
        }
        r
    }

    /// As the container runtime writes it.
    pub fn render(&self) -> String {
        let mut s = String::new();
        if !self.searches.is_empty() {
            s += &format!("search {}\n", self.searches.join(" "));
        }
        for n in &self.nameservers {
            s += &format!("nameserver {n}\n");
        }
        if !self.options.is_empty() {
            s += &format!("options {}\n", self.options.join(" "));
        }
        s
    }
}

/// The cluster's DNS as the node's agent knows it (kubelet's `--cluster-dns`, `--cluster-domain`).
#[derive(Debug, Clone, Copy)]
pub struct ClusterDns<'a> {
    pub servers: &'a [IpAddr],
    pub domain: &'a str,
}

/// A pod's resolv.conf and what kubelet would say about it (Warning events: reason, message).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodDns {
    pub conf: ResolvConf,
    pub warnings: Vec<(&'static str, String)>,
}

fn push_unique(into: &mut Vec<String>, items: impl IntoIterator<Item = String>) {
    for i in items {
        if !into.contains(&i) {
            into.push(i);
        }
    }
}

/// `host`: the node's resolv.conf (kubelet's `--resolv-conf`; None when that flag is empty,
/// which sends pods to a resolver on their own loopback, effectively no DNS).
pub fn pod_resolv_conf(
    pod: &Pod,
    cluster: Option<ClusterDns>,
    host: Option<&ResolvConf>,
) -> PodDns {
    let spec = pod.spec.as_ref();
    let host_network = spec.and_then(|s| s.host_network).unwrap_or(false);
    let policy = spec
        .and_then(|s| s.dns_policy.as_deref())
        .unwrap_or("ClusterFirst");
    let mut out = PodDns::default();
    let cluster_first = match policy {
        "None" => None,
        "ClusterFirstWithHostNet" => Some(true),
        "Default" => Some(false),
        // ClusterFirst: a hostNetwork pod falls back to the node's resolver.
        _ => Some(!host_network),
    };
    match cluster_first {
        None => {}
        Some(true) if cluster.is_some_and(|c| !c.servers.is_empty()) => {
            let c = cluster.expect("checked above");
            let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
            out.conf.nameservers = c.servers.iter().map(IpAddr::to_string).collect();
            let mut searches = vec![];
            if !c.domain.is_empty() {
                searches = vec![
                    format!("{ns}.svc.{}", c.domain),
                    format!("svc.{}", c.domain),
                    c.domain.to_string(),
                ];
            }
            push_unique(
                &mut searches,
                host.into_iter().flat_map(|h| h.searches.clone()),
            );
            out.conf.searches = searches;
            out.conf.options = vec!["ndots:5".into()];
        }
        Some(cluster_wanted) => {
            if cluster_wanted {
                out.warnings.push((
                    "MissingClusterDNS",
                    "this node has no cluster DNS server configured and cannot create a pod using the \"ClusterFirst\" policy; falling back to \"Default\"".into(),
                ));
            }
            match host {
                Some(h) => out.conf = h.clone(),
                None => {
                    out.conf.nameservers = vec!["127.0.0.1".into()];
                    out.conf.searches = vec![".".into()];
                }
            }
        }
    }
    if let Some(dc) = spec.and_then(|s| s.dns_config.as_ref()) {
        push_unique(
            &mut out.conf.nameservers,
            dc.nameservers.iter().flatten().cloned(),
        );
        push_unique(
            &mut out.conf.searches,
            dc.searches
                .iter()
                .flatten()
                .map(|s| s.trim_end_matches('.').to_string()),
        );
        for o in dc.options.iter().flatten() {
            let Some(name) = o.name.as_deref() else {
                continue;
            };
            let opt = match &o.value {
                Some(v) if !v.is_empty() => format!("{name}:{v}"),
                _ => name.to_string(),
            };
            let same = |e: &String| e.split(':').next() == Some(name);
            match out.conf.options.iter().position(same) {
                Some(i) => out.conf.options[i] = opt,
                None => out.conf.options.push(opt),
            }
        }
    }
    fit_limits(&mut out);
    out
}

/// kubelet's limits: 3 nameservers, 32 search domains of at most 253 characters, a search
/// line of at most 2048; what is dropped is said in a DNSConfigForming event.
fn fit_limits(out: &mut PodDns) {
    let c = &mut out.conf;
    if c.nameservers.len() > MAX_NAMESERVERS {
        c.nameservers.truncate(MAX_NAMESERVERS);
        out.warnings.push((
            "DNSConfigForming",
            format!(
                "Nameserver limits were exceeded, some nameservers have been omitted, the applied nameserver line is: {}",
                c.nameservers.join(" ")
            ),
        ));
    }
    let before = c.searches.len();
    c.searches.truncate(MAX_SEARCH_PATHS);
    c.searches.retain(|s| s.len() <= MAX_SEARCH_DOMAIN);
    while c.searches.join(" ").len() > MAX_SEARCH_CHARS {
        c.searches.pop();
    }
    if c.searches.len() != before {
        out.warnings.push((
            "DNSConfigForming",
            format!(
                "Search Line limits were exceeded, some search paths have been omitted, the applied search line is: {}",
                c.searches.join(" ")
            ),
        ));
    }
}

/// The pod's host name (spec.hostname, else its name cut to 63 characters) and domain
/// (`<subdomain>.<namespace>.svc.<zone>` when it names a subdomain), as kubelet derives them.
pub fn pod_hostname(pod: &Pod, zone: &str) -> (String, Option<String>) {
    let spec = pod.spec.as_ref();
    let host = match spec
        .and_then(|s| s.hostname.as_deref())
        .filter(|h| !h.is_empty())
    {
        Some(h) => h.to_string(),
        None => {
            let name = pod.metadata.name.as_deref().unwrap_or_default();
            let cut = &name[..name.len().min(63)];
            cut.trim_end_matches(['-', '.']).to_string()
        }
    };
    let domain = spec
        .and_then(|s| s.subdomain.as_deref())
        .filter(|d| !d.is_empty() && !zone.is_empty())
        .map(|sub| {
            let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
            format!("{sub}.{ns}.svc.{zone}")
        });
    (host, domain)
}

/// The name the pod's UTS namespace carries: its host name, or with `setHostnameAsFQDN` its
/// fully qualified name (an error when that exceeds the kernel's 64 characters).
pub fn uts_hostname(pod: &Pod, zone: &str) -> Result<String, String> {
    let (host, domain) = pod_hostname(pod, zone);
    let fqdn = pod
        .spec
        .as_ref()
        .and_then(|s| s.set_hostname_as_fqdn)
        .unwrap_or(false);
    match domain {
        Some(d) if fqdn => {
            let name = format!("{host}.{d}");
            if name.len() > MAX_HOSTNAME {
                return Err(format!(
                    "failed to construct FQDN from pod hostname and cluster domain, FQDN {name} is too long ({MAX_HOSTNAME} characters is the max, {} characters requested)",
                    name.len()
                ));
            }
            Ok(name)
        }
        _ => Ok(host),
    }
}

/// The managed /etc/hosts of a pod with its own network: localhost, the pod's address under
/// its names, and `hostAliases`. `node_hosts`: for a hostNetwork pod, the node's own file,
/// which it keeps (with the aliases added).
pub fn hosts_file(pod: &Pod, ip: IpAddr, zone: &str, node_hosts: Option<&str>) -> String {
    let mut s = match node_hosts {
        Some(h) => format!("# Kubernetes-managed hosts file (host network).\n{h}"),
        None => {
            let (host, domain) = pod_hostname(pod, zone);
            let me = match domain {
                Some(d) => format!("{ip}\t{host}.{d}\t{host}"),
                None => format!("{ip}\t{host}"),
            };
            format!(
                "# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\nfe00::0\tip6-localnet\nfe00::0\tip6-mcastprefix\nfe00::1\tip6-allnodes\nfe00::2\tip6-allrouters\n{me}\n"
            )
        }
    };
    let aliases = pod.spec.as_ref().and_then(|s| s.host_aliases.as_ref());
    if let Some(aliases) = aliases.filter(|a| !a.is_empty()) {
        if !s.ends_with('\n') {
            s.push('\n');
        }
        s += "\n# Entries added by HostAliases.\n";
        for a in aliases {
            let names = a.hostnames.as_deref().unwrap_or_default();
            if !names.is_empty() {
                s += &format!("{}\t{}\n", a.ip, names.join("\t"));
            }
        }
    }
    s
}

/// The cluster DNS address by convention: the Service range's tenth address.
pub fn default_cluster_dns(service_net: std::net::Ipv4Addr) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::from(u32::from(service_net) + 10)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(v: serde_json::Value) -> Pod {
        serde_json::from_value(v).unwrap()
    }

    const HOST: &str = "# the node's\nnameserver 10.0.0.53\nnameserver 10.0.0.54\nsearch corp.example. lab.example\noptions edns0 ndots:2\n";

    fn cluster() -> ([IpAddr; 1], &'static str) {
        (["10.96.0.10".parse().unwrap()], "cluster.local")
    }

    #[test]
    fn cluster_first_names_the_cluster_server_and_search_path_then_the_hosts_searches() {
        let host = ResolvConf::parse(HOST);
        assert_eq!(host.searches, ["corp.example", "lab.example"]);
        let (servers, domain) = cluster();
        let c = Some(ClusterDns {
            servers: &servers,
            domain,
        });
        let p = pod(
            serde_json::json!({"metadata": {"name": "a", "namespace": "shop"}, "spec": {"containers": []}}),
        );
        let d = pod_resolv_conf(&p, c, Some(&host));
        assert_eq!(
            d.conf.render(),
            "search shop.svc.cluster.local svc.cluster.local cluster.local corp.example lab.example\nnameserver 10.96.0.10\noptions ndots:5\n"
        );
        assert!(d.warnings.is_empty());
        // hostNetwork: ClusterFirst falls back to the node's; ClusterFirstWithHostNet does not.
        let p = pod(
            serde_json::json!({"metadata": {"name": "a", "namespace": "shop"}, "spec": {"hostNetwork": true, "containers": []}}),
        );
        assert_eq!(pod_resolv_conf(&p, c, Some(&host)).conf, host);
        let p = pod(
            serde_json::json!({"metadata": {"name": "a", "namespace": "shop"}, "spec": {"hostNetwork": true, "dnsPolicy": "ClusterFirstWithHostNet", "containers": []}}),
        );
        assert_eq!(
            pod_resolv_conf(&p, c, Some(&host)).conf.nameservers,
            ["10.96.0.10"]
        );
        // No cluster DNS: the node's, with kubelet's warning.
        let p = pod(serde_json::json!({"metadata": {"name": "a"}, "spec": {"containers": []}}));
        let d = pod_resolv_conf(&p, None, Some(&host));
        assert_eq!(d.conf, host);
        assert_eq!(d.warnings[0].0, "MissingClusterDNS");
        // --resolv-conf "": loopback and no search.
        let d = pod_resolv_conf(&p, None, None);
        assert_eq!(d.conf.render(), "search .\nnameserver 127.0.0.1\n");
    }

    #[test]
    fn dns_config_merges_as_kubelet_does_and_limits_are_applied() {
        let host = ResolvConf::parse(HOST);
        let (servers, domain) = cluster();
        let c = Some(ClusterDns {
            servers: &servers,
            domain,
        });
        let p = pod(
            serde_json::json!({"metadata": {"name": "a"}, "spec": {"containers": [], "dnsPolicy": "None",
            "dnsConfig": {"nameservers": ["1.1.1.1", "1.1.1.1"], "searches": ["x.example."], "options": [{"name": "ndots", "value": "2"}, {"name": "edns0"}]}}}),
        );
        assert_eq!(
            pod_resolv_conf(&p, c, Some(&host)).conf.render(),
            "search x.example\nnameserver 1.1.1.1\noptions ndots:2 edns0\n"
        );
        // ClusterFirst + dnsConfig: ndots overridden in place, a server appended.
        let p = pod(
            serde_json::json!({"metadata": {"name": "a"}, "spec": {"containers": [],
            "dnsConfig": {"nameservers": ["1.1.1.1", "2.2.2.2", "3.3.3.3"], "options": [{"name": "ndots", "value": "1"}, {"name": "timeout", "value": "3"}]}}}),
        );
        let d = pod_resolv_conf(&p, c, None);
        assert_eq!(d.conf.options, ["ndots:1", "timeout:3"]);
        assert_eq!(d.conf.nameservers, ["10.96.0.10", "1.1.1.1", "2.2.2.2"]);
        assert_eq!(d.warnings[0].0, "DNSConfigForming");
        let many: Vec<String> = (0..40).map(|i| format!("d{i}.example")).collect();
        let p = pod(
            serde_json::json!({"metadata": {"name": "a"}, "spec": {"containers": [], "dnsPolicy": "None",
            "dnsConfig": {"searches": many}}}),
        );
        assert_eq!(pod_resolv_conf(&p, c, None).conf.searches.len(), 32);
    }

    #[test]
    fn hostname_subdomain_fqdn_and_hosts_file() {
        let p = pod(
            serde_json::json!({"metadata": {"name": "web-0", "namespace": "shop"},
            "spec": {"containers": [], "hostname": "db-0", "subdomain": "db", "setHostnameAsFQDN": true,
                     "hostAliases": [{"ip": "10.1.2.3", "hostnames": ["foo.local", "bar.local"]}]}}),
        );
        assert_eq!(
            pod_hostname(&p, "cluster.local"),
            ("db-0".into(), Some("db.shop.svc.cluster.local".into()))
        );
        assert_eq!(
            uts_hostname(&p, "cluster.local").unwrap(),
            "db-0.db.shop.svc.cluster.local"
        );
        let h = hosts_file(&p, "10.244.1.5".parse().unwrap(), "cluster.local", None);
        assert!(h.contains("\n10.244.1.5\tdb-0.db.shop.svc.cluster.local\tdb-0\n"));
        assert!(h.ends_with("# Entries added by HostAliases.\n10.1.2.3\tfoo.local\tbar.local\n"));
        let h = hosts_file(
            &p,
            "10.0.0.1".parse().unwrap(),
            "cluster.local",
            Some("127.0.0.1 node1"),
        );
        assert!(
            h.starts_with("# Kubernetes-managed hosts file (host network).\n127.0.0.1 node1\n")
        );
        // Too long for the kernel: an error naming the length.
        let long = "x".repeat(50);
        let p = pod(
            serde_json::json!({"metadata": {"name": "a", "namespace": "shop"},
            "spec": {"containers": [], "hostname": long, "subdomain": "db", "setHostnameAsFQDN": true}}),
        );
        assert!(
            uts_hostname(&p, "cluster.local")
                .unwrap_err()
                .contains("too long")
        );
        // A long pod name is cut to 63 without a trailing dash.
        let name = format!("{}-{}", "a".repeat(62), "b");
        let p = pod(serde_json::json!({"metadata": {"name": name}, "spec": {"containers": []}}));
        assert_eq!(pod_hostname(&p, "cluster.local").0, "a".repeat(62));
    }
}
