//! The backend-neutral model of what the kernel should do for Services: one entry per Service
//! port, with its addresses (ClusterIP, node port, external and load-balancer IPs), the
//! endpoints traffic may go to (readiness, terminating fallback and traffic policies already
//! applied, as kube-proxy's `CategorizeEndpoints` does), and session affinity. The iptables
//! and nftables backends render this and nothing else, so Service semantics live here once.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use k8s_openapi::api::{
    core::v1::{Service, ServiceSpec},
    discovery::v1::EndpointSlice,
};

/// The label linking an EndpointSlice to its Service.
pub const SERVICE_NAME: &str = "kubernetes.io/service-name";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    Tcp,
    Udp,
    Sctp,
}

impl Proto {
    pub fn parse(s: Option<&str>) -> Option<Proto> {
        match s.unwrap_or("TCP") {
            "TCP" => Some(Proto::Tcp),
            "UDP" => Some(Proto::Udp),
            "SCTP" => Some(Proto::Sctp),
            _ => None,
        }
    }
    /// As iptables and nft spell it.
    pub fn lower(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Sctp => "sctp",
        }
    }
    pub fn upper(self) -> &'static str {
        match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
            Proto::Sctp => "SCTP",
        }
    }
    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => 6,
            Proto::Udp => 17,
            Proto::Sctp => 132,
        }
    }
}

/// One endpoint traffic may be sent to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Endpoint {
    pub ip: Ipv4Addr,
    pub port: u16,
    /// On this node.
    pub local: bool,
}

/// One port of one Service, as the kernel must treat it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    /// `namespace/name:port-name` (kube-proxy's ServicePortName; `:` alone when unnamed).
    pub name: String,
    pub proto: Proto,
    pub cluster_ip: Option<Ipv4Addr>,
    pub port: u16,
    pub node_port: Option<u16>,
    /// externalIPs and `status.loadBalancer.ingress` IPs: treated as external traffic.
    pub external_ips: Vec<Ipv4Addr>,
    /// Where traffic to the ClusterIP goes (internalTrafficPolicy applied).
    pub cluster_endpoints: Vec<Endpoint>,
    /// Where node-port and external traffic goes (externalTrafficPolicy applied).
    pub external_endpoints: Vec<Endpoint>,
    /// externalTrafficPolicy: Local (the client's address is kept; no masquerade).
    pub external_local: bool,
    /// sessionAffinity: ClientIP, with its timeout in seconds.
    pub affinity_seconds: Option<u32>,
    /// A LoadBalancer's healthCheckNodePort (externalTrafficPolicy: Local), where the proxy
    /// answers whether this node has local endpoints.
    pub health_check_node_port: Option<u16>,
}

impl ServicePort {
    /// Endpoints of either kind (for conntrack clean-up when one goes away).
    pub fn all_endpoints(&self) -> BTreeSet<Endpoint> {
        self.cluster_endpoints
            .iter()
            .chain(&self.external_endpoints)
            .copied()
            .collect()
    }
}

/// What the proxy wants in the kernel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Model {
    /// By ServicePortName + protocol.
    pub ports: BTreeMap<String, ServicePort>,
}

#[derive(Debug, Clone, Copy)]
struct Candidate {
    ep: Endpoint,
    ready: bool,
    serving: bool,
    terminating: bool,
}

/// kube-proxy's choice: the ready endpoints; when there are none, the serving-but-terminating
/// ones (so that connections keep working while a rollout drains).
fn usable(cands: &[Candidate], local_only: bool) -> Vec<Endpoint> {
    let pool: Vec<&Candidate> = cands.iter().filter(|c| !local_only || c.ep.local).collect();
    let ready: Vec<Endpoint> = pool.iter().filter(|c| c.ready).map(|c| c.ep).collect();
    let mut out = if ready.is_empty() {
        pool.iter()
            .filter(|c| c.serving && c.terminating)
            .map(|c| c.ep)
            .collect()
    } else {
        ready
    };
    out.sort();
    out.dedup();
    out
}

/// Builds the model from the Services and EndpointSlices, as seen by node `node`.
pub fn build(services: &[&Service], slices: &[&EndpointSlice], node: &str) -> Model {
    // Slices by (namespace, service).
    let mut by_svc: BTreeMap<(String, String), Vec<&EndpointSlice>> = BTreeMap::new();
    for s in slices {
        if s.address_type != "IPv4" {
            continue;
        }
        let Some(svc) = s.metadata.labels.as_ref().and_then(|l| l.get(SERVICE_NAME)) else {
            continue;
        };
        let ns = s.metadata.namespace.clone().unwrap_or_default();
        by_svc.entry((ns, svc.clone())).or_default().push(s);
    }
    let mut ports = BTreeMap::new();
    for svc in services {
        let ns = svc.metadata.namespace.clone().unwrap_or_default();
        let name = svc.metadata.name.clone().unwrap_or_default();
        let sl = by_svc.get(&(ns, name)).map(Vec::as_slice).unwrap_or(&[]);
        ports.extend(build_service(svc, sl, node));
    }
    Model { ports }
}

/// The endpoints of a Service port: the slice port with the same name and protocol (a named
/// targetPort is resolved per pod by the endpoints controller).
fn candidates(slices: &[&EndpointSlice], pname: &str, proto: Proto, node: &str) -> Vec<Candidate> {
    let mut cands = vec![];
    for s in slices.iter().filter(|s| s.address_type == "IPv4") {
        let Some(sp) = s.ports.iter().flatten().find(|sp| {
            sp.name.clone().unwrap_or_default() == pname
                && Proto::parse(sp.protocol.as_deref()) == Some(proto)
        }) else {
            continue;
        };
        let Some(port) = sp.port.and_then(|p| u16::try_from(p).ok()) else {
            continue;
        };
        for e in &s.endpoints {
            let c = e.conditions.as_ref();
            let ready = c.and_then(|c| c.ready).unwrap_or(true);
            let serving = c.and_then(|c| c.serving).unwrap_or(ready);
            let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
            let local = e.node_name.as_deref() == Some(node);
            for a in &e.addresses {
                // Loopback, unspecified and link-local endpoints are invalid (kube's
                // EndpointSlice validation refuses them): a DNAT there would capture the
                // node's own traffic.
                if let Ok(ip) = a.parse::<Ipv4Addr>()
                    && !(ip.is_loopback() || ip.is_unspecified() || ip.is_link_local())
                {
                    cands.push(Candidate {
                        ep: Endpoint { ip, port, local },
                        ready,
                        serving,
                        terminating,
                    });
                }
            }
        }
    }
    cands
}

/// The Service's external IPs, with a LoadBalancer's ingress IPs, sorted and once each.
fn external_ips(svc: &Service, spec: &ServiceSpec, typ: &str) -> Vec<Ipv4Addr> {
    let mut ips: Vec<Ipv4Addr> = spec
        .external_ips
        .iter()
        .flatten()
        .filter_map(|i| i.parse().ok())
        .collect();
    if typ == "LoadBalancer" {
        ips.extend(
            svc.status
                .as_ref()
                .and_then(|s| s.load_balancer.as_ref())
                .and_then(|l| l.ingress.as_ref())
                .into_iter()
                .flatten()
                .filter_map(|i| i.ip.as_deref()?.parse::<Ipv4Addr>().ok()),
        );
    }
    ips.sort();
    ips.dedup();
    ips
}

/// The ports of one Service, given the EndpointSlices labelled with its name (slices of
/// another address type are ignored).
pub fn build_service(
    svc: &Service,
    slices: &[&EndpointSlice],
    node: &str,
) -> Vec<(String, ServicePort)> {
    let mut out = vec![];
    let Some(spec) = svc.spec.as_ref() else {
        return out;
    };
    let ns = svc.metadata.namespace.clone().unwrap_or_default();
    let name = svc.metadata.name.clone().unwrap_or_default();
    let typ = spec.type_.as_deref().unwrap_or("ClusterIP");
    if typ == "ExternalName" {
        return out;
    }
    let cluster_ip = spec
        .cluster_ip
        .as_deref()
        .filter(|c| *c != "None" && !c.is_empty())
        .and_then(|c| c.parse::<Ipv4Addr>().ok());
    // Headless Services get no rules.
    if cluster_ip.is_none() {
        return out;
    }
    let external_ips = external_ips(svc, spec, typ);
    let affinity_seconds = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        spec.session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .filter(|t| *t > 0)
            .map_or(10800, |t| t as u32)
    });
    let internal_local = spec.internal_traffic_policy.as_deref() == Some("Local");
    let external_local = spec.external_traffic_policy.as_deref() == Some("Local")
        && (typ == "NodePort" || typ == "LoadBalancer" || !external_ips.is_empty());
    for p in spec.ports.iter().flatten() {
        let Some(proto) = Proto::parse(p.protocol.as_deref()) else {
            continue;
        };
        let pname = p.name.clone().unwrap_or_default();
        let cands = candidates(slices, &pname, proto, node);
        let node_port = match typ {
            "NodePort" | "LoadBalancer" => p.node_port.and_then(|n| u16::try_from(n).ok()),
            _ => None,
        };
        let Ok(port) = u16::try_from(p.port) else {
            continue;
        };
        let sp = ServicePort {
            name: format!("{ns}/{name}:{pname}"),
            proto,
            cluster_ip,
            port,
            node_port,
            external_ips: external_ips.clone(),
            cluster_endpoints: usable(&cands, internal_local),
            external_endpoints: usable(&cands, external_local),
            external_local,
            affinity_seconds,
            health_check_node_port: spec
                .health_check_node_port
                .filter(|_| external_local && typ == "LoadBalancer")
                .and_then(|n| u16::try_from(n).ok()),
        };
        out.push((format!("{}/{}", sp.name, proto.upper()), sp));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(json: serde_json::Value) -> Service {
        serde_json::from_value(json).unwrap()
    }

    fn slice(json: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(json).unwrap()
    }

    fn web_slice(eps: serde_json::Value) -> EndpointSlice {
        slice(serde_json::json!({
            "metadata": {"name": "web-x", "namespace": "default",
                         "labels": {SERVICE_NAME: "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": eps,
        }))
    }

    #[test]
    fn ready_endpoints_then_terminating_fallback_and_policies() {
        let s = svc(serde_json::json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"type": "NodePort", "clusterIP": "10.96.0.10",
                     "externalTrafficPolicy": "Local", "sessionAffinity": "ClientIP",
                     "ports": [{"name": "http", "port": 80, "targetPort": "http", "nodePort": 30080}]},
        }));
        let sl = web_slice(serde_json::json!([
            {"addresses": ["10.244.1.2"], "nodeName": "n1", "conditions": {"ready": true}},
            {"addresses": ["10.244.2.2"], "nodeName": "n2", "conditions": {"ready": true}},
            {"addresses": ["10.244.1.3"], "nodeName": "n1",
             "conditions": {"ready": false, "serving": true, "terminating": true}},
        ]));
        let m = build(&[&s], &[&sl], "n1");
        let p = &m.ports["default/web:http/TCP"];
        assert_eq!(p.cluster_ip, Some(Ipv4Addr::new(10, 96, 0, 10)));
        assert_eq!((p.port, p.node_port), (80, Some(30080)));
        let ips = |v: &[Endpoint]| v.iter().map(|e| e.ip.to_string()).collect::<Vec<_>>();
        assert_eq!(ips(&p.cluster_endpoints), ["10.244.1.2", "10.244.2.2"]);
        assert_eq!(ips(&p.external_endpoints), ["10.244.1.2"], "only local");
        assert!(p.external_local);
        assert_eq!(p.affinity_seconds, Some(10800));
        assert!(p.cluster_endpoints.iter().all(|e| e.port == 8080));

        // Nothing ready: the serving-but-terminating endpoint carries the traffic.
        let sl = web_slice(serde_json::json!([
            {"addresses": ["10.244.1.3"], "nodeName": "n1",
             "conditions": {"ready": false, "serving": true, "terminating": true}},
            {"addresses": ["10.244.2.9"], "nodeName": "n2", "conditions": {"ready": false}},
        ]));
        let m = build(&[&s], &[&sl], "n2");
        let p = &m.ports["default/web:http/TCP"];
        assert_eq!(ips(&p.cluster_endpoints), ["10.244.1.3"]);
        assert!(
            p.external_endpoints.is_empty(),
            "n2 has no usable local endpoint"
        );

        // Loopback, unspecified and link-local addresses are never endpoints.
        let sl = web_slice(serde_json::json!([
            {"addresses": ["127.0.0.1"], "conditions": {"ready": true}},
            {"addresses": ["0.0.0.0"], "conditions": {"ready": true}},
            {"addresses": ["169.254.0.5"], "conditions": {"ready": true}},
            {"addresses": ["10.244.2.2"], "conditions": {"ready": true}},
        ]));
        let m = build(&[&s], &[&sl], "n1");
        assert_eq!(
            ips(&m.ports["default/web:http/TCP"].cluster_endpoints),
            ["10.244.2.2"]
        );
    }

    #[test]
    fn headless_externalname_and_internal_local() {
        let headless = svc(serde_json::json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"clusterIP": "None", "ports": [{"name": "http", "port": 80}]},
        }));
        let ext = svc(serde_json::json!({
            "metadata": {"name": "x", "namespace": "default"},
            "spec": {"type": "ExternalName", "externalName": "example.org"},
        }));
        let sl = web_slice(serde_json::json!([
            {"addresses": ["10.244.1.2"], "nodeName": "n1", "conditions": {"ready": true}},
        ]));
        assert!(build(&[&headless, &ext], &[&sl], "n1").ports.is_empty());
        let local = svc(serde_json::json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.11", "internalTrafficPolicy": "Local",
                     "externalIPs": ["192.0.2.7"],
                     "ports": [{"name": "http", "port": 80}]},
        }));
        let m = build(&[&local], &[&sl], "n2");
        let p = &m.ports["default/web:http/TCP"];
        assert!(p.cluster_endpoints.is_empty(), "no local endpoint on n2");
        assert_eq!(
            p.external_endpoints.len(),
            1,
            "external traffic is not limited"
        );
        assert_eq!(p.external_ips, [Ipv4Addr::new(192, 0, 2, 7)]);
        assert_eq!(p.node_port, None);
    }
}
