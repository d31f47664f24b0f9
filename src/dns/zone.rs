//! The cluster zone: Services and EndpointSlices, kept as the records the Kubernetes DNS
//! specification (schema 1.1.0) asks for, and the answer to one question about a name in it.
//! Updated per event, so a new Service answers as soon as its event arrives; names are
//! compared in lower case and answered in the case they were asked.

use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
};

use hickory_proto::{
    op::ResponseCode,
    rr::{
        Name, RData, Record, RecordType,
        rdata::{A, AAAA, CNAME, NS, PTR, SOA, SRV, TXT},
    },
};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use crate::{
    kinds::validate::{is_dns1123_label, is_dns1123_subdomain},
    proxy::model::SERVICE_NAME,
};

/// The schema version in `dns-version.<zone>`.
pub const SCHEMA_VERSION: &str = "1.1.0";

/// namespace, name (lower case).
type Key = (String, String);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    ClusterIp(Vec<IpAddr>),
    Headless,
    External(Box<str>),
}

/// One Service as the zone keeps it (compact: 10,000 of them fit in a few MiB).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Svc {
    kind: Kind,
    /// Named ports: (name, protocol, port), lower case.
    ports: Vec<(Box<str>, &'static str, u16)>,
    publish_not_ready: bool,
    /// The addresses its PTR records are under (to take them back when it changes).
    ptrs: Vec<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Endpoint {
    ips: Vec<IpAddr>,
    /// The endpoint's hostname, else its first address with dashes (the spec's
    /// system-assigned identifier, as CoreDNS makes it).
    host: String,
    ready: bool,
}

#[derive(Debug, Clone, Default)]
struct Slice {
    owner: Option<Key>,
    endpoints: Vec<Endpoint>,
    /// Named ports: (name, protocol, port).
    ports: Vec<(Box<str>, &'static str, u16)>,
}

/// What the zone says about a question.
#[derive(Debug, Clone, PartialEq)]
pub enum Lookup {
    /// Not a cluster name: for the upstream servers.
    Forward,
    Answer(Box<Answer>),
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Answer {
    /// NoError or NXDomain.
    pub rcode: ResponseCode,
    pub answers: Vec<Record>,
    pub additionals: Vec<Record>,
    /// Negative (NXDOMAIN, or no record of the type): the zone's SOA goes in authority.
    pub soa: Option<Record>,
    /// An ExternalName's target, for the server to resolve and append.
    pub chase: Option<Name>,
}

pub struct Zone {
    /// e.g. `cluster.local`, lower case, no trailing dot.
    domain: String,
    origin: Name,
    ttl: u32,
    /// The cluster DNS addresses (the NS record's glue).
    dns_ips: Vec<IpAddr>,
    /// Namespace → name → Service (looked up by `&str`, no key built per question; a
    /// namespace with Services answers `<ns>.svc.<zone>`).
    services: HashMap<Box<str>, HashMap<Box<str>, Svc>>,
    count: usize,
    slices: HashMap<Key, Slice>,
    slices_of: HashMap<Key, Vec<Box<str>>>,
    ptr: HashMap<IpAddr, Vec<Box<str>>>,
    relist_services: Option<HashMap<Key, Svc>>,
    relist_slices: Option<HashMap<Key, Slice>>,
    serial: u32,
}

#[derive(Debug, thiserror::Error)]
#[error("--cluster-domain {0:?} is not a DNS name")]
pub struct BadDomain(String);

fn key(ns: Option<&String>, name: Option<&String>) -> Key {
    (
        ns.map(|s| s.to_ascii_lowercase()).unwrap_or_default(),
        name.map(|s| s.to_ascii_lowercase()).unwrap_or_default(),
    )
}

fn dashed(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v) => v.to_string().replace('.', "-"),
        IpAddr::V6(v) => v.to_string().replace(':', "-"),
    }
}

fn proto(p: Option<&str>) -> &'static str {
    match p.unwrap_or("TCP") {
        "TCP" => "tcp",
        "UDP" => "udp",
        "SCTP" => "sctp",
        _ => "",
    }
}

/// A named port as SRV records name it: (name, protocol, number), lower case; unnamed ports
/// have none.
fn named_port(
    name: Option<&str>,
    protocol: Option<&str>,
    port: Option<i32>,
) -> Option<(Box<str>, &'static str, u16)> {
    let n = name.filter(|n| !n.is_empty())?;
    Some((
        n.to_ascii_lowercase().into(),
        proto(protocol),
        u16::try_from(port?).ok()?,
    ))
}

/// A Service as the zone keeps it; None (with the reason) when DNS cannot name it.
fn service_records(s: &Service) -> Result<Svc, String> {
    let name = s.metadata.name.as_deref().unwrap_or_default();
    let ns = s.metadata.namespace.as_deref().unwrap_or_default();
    if !is_dns1123_label(&name.to_ascii_lowercase()) || !is_dns1123_label(&ns.to_ascii_lowercase())
    {
        return Err("its name or namespace is not a DNS label".into());
    }
    let spec = s.spec.as_ref().cloned().unwrap_or_default();
    let kind = if spec.type_.as_deref() == Some("ExternalName") {
        let target = spec.external_name.unwrap_or_default();
        let target = target.trim_end_matches('.').to_ascii_lowercase();
        if !is_dns1123_subdomain(&target) {
            return Err(format!("externalName {target:?} is not a DNS name"));
        }
        Kind::External(target.into())
    } else {
        let ips: Vec<IpAddr> = match &spec.cluster_ips {
            Some(v) if !v.is_empty() => v.iter().filter_map(|i| i.parse().ok()).collect(),
            _ => spec
                .cluster_ip
                .iter()
                .filter_map(|i| i.parse().ok())
                .collect(),
        };
        if ips.is_empty() {
            Kind::Headless
        } else {
            Kind::ClusterIp(ips)
        }
    };
    let ports = spec
        .ports
        .iter()
        .flatten()
        .filter_map(|p| named_port(p.name.as_deref(), p.protocol.as_deref(), Some(p.port)))
        .collect();
    Ok(Svc {
        kind,
        ports,
        publish_not_ready: spec.publish_not_ready_addresses.unwrap_or(false),
        ptrs: vec![],
    })
}

fn slice_records(s: &EndpointSlice) -> Slice {
    let owner = s
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME))
        .map(|svc| key(s.metadata.namespace.as_ref(), Some(svc)));
    let endpoints = s
        .endpoints
        .iter()
        .filter_map(|e| {
            let ips: Vec<IpAddr> = e.addresses.iter().filter_map(|a| a.parse().ok()).collect();
            let first = *ips.first()?;
            let host = match e.hostname.as_deref() {
                Some(h) if is_dns1123_label(&h.to_ascii_lowercase()) => h.to_ascii_lowercase(),
                _ => dashed(first),
            };
            let ready = e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
            Some(Endpoint { ips, host, ready })
        })
        .collect();
    let ports = s
        .ports
        .iter()
        .flatten()
        .filter_map(|p| named_port(p.name.as_deref(), p.protocol.as_deref(), p.port))
        .collect();
    Slice {
        owner,
        endpoints,
        ports,
    }
}

/// A name inside the zone from text keelson made (never fails for the labels the zone keeps).
fn name(s: &str) -> Name {
    Name::from_ascii(s).unwrap_or_else(|_| Name::root())
}

/// `d.c.b.a.in-addr.arpa` / nibbles `.ip6.arpa` → the address.
fn reverse_ip(labels: &[&str]) -> Option<IpAddr> {
    match labels {
        [rest @ .., "in-addr", "arpa"] if rest.len() == 4 => {
            let mut o = [0u8; 4];
            for (i, l) in rest.iter().rev().enumerate() {
                o[i] = l.parse().ok()?;
            }
            Some(IpAddr::from(o))
        }
        [rest @ .., "ip6", "arpa"] if rest.len() == 32 => {
            let mut v = 0u128;
            for l in rest.iter().rev() {
                v = v << 4 | u128::from_str_radix(l, 16).ok()?;
            }
            Some(IpAddr::from(v.to_be_bytes()))
        }
        _ => None,
    }
}

/// `10-244-1-5` (or an IPv6 address with dashes) → the address.
fn undash(l: &str) -> Option<IpAddr> {
    l.replace('-', ".")
        .parse::<std::net::Ipv4Addr>()
        .map(IpAddr::V4)
        .ok()
        .or_else(|| l.replace('-', ":").parse().ok())
}

fn wants(qtype: RecordType, ip: &IpAddr) -> bool {
    matches!(
        (qtype, ip),
        (RecordType::A, IpAddr::V4(_)) | (RecordType::AAAA, IpAddr::V6(_)) | (RecordType::ANY, _)
    )
}

impl Zone {
    pub fn new(domain: &str, ttl: u32, dns_ips: Vec<IpAddr>) -> Result<Zone, BadDomain> {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        if !is_dns1123_subdomain(&domain) {
            return Err(BadDomain(domain));
        }
        Ok(Zone {
            origin: name(&format!("{domain}.")),
            domain,
            ttl,
            dns_ips,
            services: HashMap::new(),
            count: 0,
            slices: HashMap::new(),
            slices_of: HashMap::new(),
            ptr: HashMap::new(),
            relist_services: None,
            relist_slices: None,
            serial: 1,
        })
    }

    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// The number of Services answered.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    fn svc(&self, ns: &str, name: &str) -> Option<&Svc> {
        self.services.get(ns)?.get(name)
    }

    fn parse_service(s: &Service) -> Option<(Key, Svc)> {
        let k = key(s.metadata.namespace.as_ref(), s.metadata.name.as_ref());
        match service_records(s) {
            Ok(r) => Some((k, r)),
            Err(why) => {
                tracing::warn!(service = %format!("{}/{}", k.0, k.1), "not in cluster DNS: {why}");
                None
            }
        }
    }

    pub fn apply_service(&mut self, s: &Service) {
        let Some((k, r)) = Self::parse_service(s) else {
            return self.delete_service(s);
        };
        let inner = self.services.entry(k.0.as_str().into()).or_default();
        let old = match inner.get_mut(k.1.as_str()) {
            Some(o)
                if Svc {
                    ptrs: o.ptrs.clone(),
                    ..r.clone()
                } == *o =>
            {
                return;
            }
            Some(o) => std::mem::replace(o, r).ptrs,
            None => {
                inner.insert(k.1.as_str().into(), r);
                self.count += 1;
                vec![]
            }
        };
        self.refresh(&k, old);
    }

    pub fn delete_service(&mut self, s: &Service) {
        let k = key(s.metadata.namespace.as_ref(), s.metadata.name.as_ref());
        let Some(inner) = self.services.get_mut(k.0.as_str()) else {
            return;
        };
        let Some(old) = inner.remove(k.1.as_str()) else {
            return;
        };
        self.count -= 1;
        if inner.is_empty() {
            self.services.remove(k.0.as_str());
        }
        self.refresh(&k, old.ptrs);
    }

    pub fn apply_slice(&mut self, s: &EndpointSlice) {
        let k = key(s.metadata.namespace.as_ref(), s.metadata.name.as_ref());
        let old = self.unlink(&k);
        let new = slice_records(s);
        if let Some(o) = &new.owner {
            self.slices_of
                .entry(o.clone())
                .or_default()
                .push(k.1.as_str().into());
        }
        let owner = new.owner.clone();
        self.slices.insert(k, new);
        for o in [old, owner].into_iter().flatten().collect::<BTreeSet<_>>() {
            self.reendpoint(&o);
        }
    }

    pub fn delete_slice(&mut self, s: &EndpointSlice) {
        let k = key(s.metadata.namespace.as_ref(), s.metadata.name.as_ref());
        if let Some(o) = self.unlink(&k) {
            self.reendpoint(&o);
        }
    }

    /// Removes a slice; returns the Service it belonged to.
    fn unlink(&mut self, k: &Key) -> Option<Key> {
        let o = self.slices.remove(k)?.owner?;
        if let Some(set) = self.slices_of.get_mut(&o) {
            set.retain(|n| **n != *k.1);
            if set.is_empty() {
                self.slices_of.remove(&o);
            }
        }
        Some(o)
    }

    /// A relist of Services begins: what it lists replaces what the zone had.
    pub fn services_relist_begin(&mut self) {
        self.relist_services = Some(HashMap::new());
    }
    pub fn services_relist_item(&mut self, s: &Service) {
        if let Some((k, r)) = Self::parse_service(s) {
            self.relist_services.get_or_insert_default().insert(k, r);
        }
    }
    pub fn services_relist_done(&mut self) {
        self.services.clear();
        self.count = 0;
        for ((ns, name), svc) in self.relist_services.take().unwrap_or_default() {
            self.services
                .entry(ns.into())
                .or_default()
                .insert(name.into(), svc);
            self.count += 1;
        }
        self.rebuild();
    }
    pub fn slices_relist_begin(&mut self) {
        self.relist_slices = Some(HashMap::new());
    }
    pub fn slices_relist_item(&mut self, s: &EndpointSlice) {
        let k = key(s.metadata.namespace.as_ref(), s.metadata.name.as_ref());
        self.relist_slices
            .get_or_insert_default()
            .insert(k, slice_records(s));
    }
    pub fn slices_relist_done(&mut self) {
        self.slices = self.relist_slices.take().unwrap_or_default();
        self.rebuild();
    }

    /// Every derived index from scratch (after a relist).
    fn rebuild(&mut self) {
        self.slices_of.clear();
        for (k, s) in &self.slices {
            if let Some(o) = &s.owner {
                self.slices_of
                    .entry(o.clone())
                    .or_default()
                    .push(k.1.as_str().into());
            }
        }
        self.ptr.clear();
        let keys: Vec<Key> = self
            .services
            .iter()
            .flat_map(|(ns, m)| m.keys().map(|n| (ns.to_string(), n.to_string())))
            .collect();
        for k in keys {
            self.refresh(&k, vec![]);
        }
    }

    /// The ready endpoints of a headless Service (not-ready too with publishNotReadyAddresses).
    fn endpoints<'a>(&'a self, k: &Key, svc: &Svc) -> Vec<(&'a Endpoint, &'a Slice)> {
        let mut out = vec![];
        for sname in self.slices_of.get(k).into_iter().flatten() {
            let Some(sl) = self.slices.get(&(k.0.clone(), sname.to_string())) else {
                continue;
            };
            out.extend(
                sl.endpoints
                    .iter()
                    .filter(|e| e.ready || svc.publish_not_ready)
                    .map(|e| (e, sl)),
            );
        }
        out
    }

    /// A Service's endpoints changed: its PTR records again.
    fn reendpoint(&mut self, k: &Key) {
        let old = match self
            .services
            .get_mut(k.0.as_str())
            .and_then(|m| m.get_mut(k.1.as_str()))
        {
            Some(s) => std::mem::take(&mut s.ptrs),
            None => return,
        };
        self.refresh(k, old);
    }

    /// Takes back the PTR records a Service had under `old` and adds the ones it has now.
    fn refresh(&mut self, k: &Key, old: Vec<IpAddr>) {
        self.serial = self.serial.wrapping_add(1);
        let base = format!("{}.{}.svc.{}.", k.1, k.0, self.domain);
        // Its names: the base, or one label before it (a headless endpoint's).
        let mine = |n: &str| {
            n.strip_suffix(base.as_str()).is_some_and(|h| {
                h.is_empty() || h.strip_suffix('.').is_some_and(|l| !l.contains('.'))
            })
        };
        for ip in old {
            if let Some(names) = self.ptr.get_mut(&ip) {
                names.retain(|n| !mine(n));
                if names.is_empty() {
                    self.ptr.remove(&ip);
                }
            }
        }
        let Some(svc) = self.svc(&k.0, &k.1) else {
            return;
        };
        let mut ptrs: Vec<(IpAddr, String)> = vec![];
        match &svc.kind {
            Kind::ClusterIp(ips) => ptrs.extend(ips.iter().map(|ip| (*ip, base.clone()))),
            Kind::Headless => {
                for (e, _) in self.endpoints(k, svc) {
                    ptrs.extend(e.ips.iter().map(|ip| (*ip, format!("{}.{base}", e.host))));
                }
            }
            Kind::External(_) => {}
        }
        let mut ips = Vec::with_capacity(ptrs.len());
        for (ip, n) in ptrs {
            let names = self.ptr.entry(ip).or_default();
            if !names.iter().any(|x| **x == *n) {
                names.push(n.into());
            }
            ips.push(ip);
        }
        if let Some(s) = self
            .services
            .get_mut(k.0.as_str())
            .and_then(|m| m.get_mut(k.1.as_str()))
        {
            s.ptrs = ips;
        }
    }

    fn soa(&self) -> Record {
        let mname = name(&format!("ns.dns.{}.", self.domain));
        let rname = name(&format!("hostmaster.{}.", self.domain));
        Record::from_rdata(
            self.origin.clone(),
            self.ttl,
            RData::SOA(SOA::new(
                mname,
                rname,
                self.serial,
                7200,
                1800,
                86400,
                self.ttl,
            )),
        )
    }

    fn rec(&self, owner: &Name, data: RData) -> Record {
        Record::from_rdata(owner.clone(), self.ttl, data)
    }

    fn ip_rec(&self, owner: &Name, ip: IpAddr) -> Record {
        match ip {
            IpAddr::V4(v) => self.rec(owner, RData::A(A(v))),
            IpAddr::V6(v) => self.rec(owner, RData::AAAA(AAAA(v))),
        }
    }

    fn nxdomain(&self) -> Lookup {
        Lookup::Answer(Box::new(Answer {
            rcode: ResponseCode::NXDomain,
            soa: Some(self.soa()),
            ..Default::default()
        }))
    }

    /// An answer with these records, or NODATA when there are none.
    fn records(&self, answers: Vec<Record>, additionals: Vec<Record>) -> Lookup {
        let soa = answers.is_empty().then(|| self.soa());
        Lookup::Answer(Box::new(Answer {
            rcode: ResponseCode::NoError,
            answers,
            additionals,
            soa,
            chase: None,
        }))
    }

    /// Answers `qname` `qtype` (class IN).
    pub fn lookup(&self, qname: &Name, qtype: RecordType) -> Lookup {
        let text = qname.to_ascii().to_ascii_lowercase();
        let text = text.trim_end_matches('.');
        let labels: Vec<&str> = text.split('.').collect();
        if let Some(ip) = reverse_ip(&labels) {
            return match self.ptr.get(&ip) {
                // Not a cluster address: the upstream servers know it (CoreDNS's fallthrough).
                None => Lookup::Forward,
                Some(names) if matches!(qtype, RecordType::PTR | RecordType::ANY) => self.records(
                    names
                        .iter()
                        .map(|n| self.rec(qname, RData::PTR(PTR(name(n)))))
                        .collect(),
                    vec![],
                ),
                Some(_) => self.records(vec![], vec![]),
            };
        }
        let rel = if text == self.domain {
            &[][..]
        } else if let Some(r) = text
            .strip_suffix(&self.domain)
            .and_then(|r| r.strip_suffix('.'))
        {
            // Labels before the zone.
            let n = r.split('.').count();
            &labels[..n]
        } else {
            return Lookup::Forward;
        };
        match rel {
            [] => self.apex(qname, qtype),
            ["dns-version"] => self.records(
                match qtype {
                    RecordType::TXT | RecordType::ANY => vec![self.rec(
                        qname,
                        RData::TXT(TXT::new(vec![SCHEMA_VERSION.to_string()])),
                    )],
                    _ => vec![],
                },
                vec![],
            ),
            ["ns", "dns"] => self.records(
                self.dns_ips
                    .iter()
                    .filter(|ip| wants(qtype, ip))
                    .map(|ip| self.ip_rec(qname, *ip))
                    .collect(),
                vec![],
            ),
            ["dns"] | ["svc"] | ["pod"] | [_, "pod"] => self.records(vec![], vec![]),
            [ns, "svc"] if self.services.contains_key(*ns) => self.records(vec![], vec![]),
            [ip, _ns, "pod"] => match undash(ip) {
                Some(ip) => self.records(
                    wants(qtype, &ip)
                        .then(|| self.ip_rec(qname, ip))
                        .into_iter()
                        .collect(),
                    vec![],
                ),
                None => self.nxdomain(),
            },
            [svc, ns, "svc"] => self.service(qname, qtype, ns, svc),
            [first, svc, ns, "svc"] => self.below_service(qname, qtype, ns, svc, first),
            [port, pr, svc, ns, "svc"] => self.srv(qname, qtype, ns, svc, port, pr),
            _ => self.nxdomain(),
        }
    }

    fn apex(&self, qname: &Name, qtype: RecordType) -> Lookup {
        let ns_name = name(&format!("ns.dns.{}.", self.domain));
        let glue: Vec<Record> = self
            .dns_ips
            .iter()
            .map(|ip| self.ip_rec(&ns_name, *ip))
            .collect();
        match qtype {
            RecordType::SOA => self.records(vec![self.soa()], vec![]),
            RecordType::NS => self.records(vec![self.rec(qname, RData::NS(NS(ns_name)))], glue),
            RecordType::ANY => self.records(
                vec![self.soa(), self.rec(qname, RData::NS(NS(ns_name)))],
                glue,
            ),
            _ => self.records(vec![], vec![]),
        }
    }

    fn service(&self, qname: &Name, qtype: RecordType, ns: &str, svc: &str) -> Lookup {
        let Some(s) = self.svc(ns, svc) else {
            return self.nxdomain();
        };
        match &s.kind {
            Kind::ClusterIp(ips) => self.records(
                ips.iter()
                    .filter(|ip| wants(qtype, ip))
                    .map(|ip| self.ip_rec(qname, *ip))
                    .collect(),
                vec![],
            ),
            Kind::Headless => {
                let eps = self.endpoints(&(ns.to_string(), svc.to_string()), s);
                if eps.is_empty() {
                    // The spec: a headless Service with no ready endpoints is NXDOMAIN.
                    return self.nxdomain();
                }
                let mut ips: Vec<IpAddr> = eps.iter().flat_map(|(e, _)| e.ips.clone()).collect();
                ips.sort();
                ips.dedup();
                self.records(
                    ips.iter()
                        .filter(|ip| wants(qtype, ip))
                        .map(|ip| self.ip_rec(qname, *ip))
                        .collect(),
                    vec![],
                )
            }
            Kind::External(target) => {
                let t = name(&format!("{target}."));
                Lookup::Answer(Box::new(Answer {
                    rcode: ResponseCode::NoError,
                    answers: vec![self.rec(qname, RData::CNAME(CNAME(t.clone())))],
                    chase: (qtype != RecordType::CNAME).then_some(t),
                    ..Default::default()
                }))
            }
        }
    }

    /// `<hostname>.<svc>.<ns>.svc.<zone>` (a headless Service's endpoint) or
    /// `_<proto>.<svc>.<ns>.svc.<zone>` (a name on the way to SRV records).
    fn below_service(
        &self,
        qname: &Name,
        qtype: RecordType,
        ns: &str,
        svc: &str,
        first: &str,
    ) -> Lookup {
        let k = (ns.to_string(), svc.to_string());
        let Some(s) = self.svc(ns, svc) else {
            return self.nxdomain();
        };
        if let Some(p) = first.strip_prefix('_') {
            return match s.ports.iter().any(|(_, pr, _)| *pr == p) {
                true => self.records(vec![], vec![]),
                false => self.nxdomain(),
            };
        }
        if s.kind != Kind::Headless {
            return self.nxdomain();
        }
        let ips: Vec<IpAddr> = self
            .endpoints(&k, s)
            .iter()
            .filter(|(e, _)| e.host == first)
            .flat_map(|(e, _)| e.ips.clone())
            .collect();
        if ips.is_empty() {
            return self.nxdomain();
        }
        self.records(
            ips.iter()
                .filter(|ip| wants(qtype, ip))
                .map(|ip| self.ip_rec(qname, *ip))
                .collect(),
            vec![],
        )
    }

    fn srv(
        &self,
        qname: &Name,
        qtype: RecordType,
        ns: &str,
        svc: &str,
        port: &str,
        pr: &str,
    ) -> Lookup {
        let k = (ns.to_string(), svc.to_string());
        let (Some(s), Some(port), Some(pr)) = (
            self.svc(ns, svc),
            port.strip_prefix('_'),
            pr.strip_prefix('_'),
        ) else {
            return self.nxdomain();
        };
        let Some(&(_, _, number)) = s.ports.iter().find(|(n, p, _)| **n == *port && *p == pr)
        else {
            return self.nxdomain();
        };
        let want = matches!(qtype, RecordType::SRV | RecordType::ANY);
        let base = format!("{svc}.{ns}.svc.{}.", self.domain);
        // (target, port, address for the additional section)
        let mut targets: Vec<(String, u16, Vec<IpAddr>)> = vec![];
        match &s.kind {
            Kind::ClusterIp(ips) => targets.push((base.clone(), number, ips.clone())),
            Kind::Headless => {
                for (e, sl) in self.endpoints(&k, s) {
                    // The endpoint's own port of that name (what clients connect to).
                    if let Some(&(_, _, p)) =
                        sl.ports.iter().find(|(n, x, _)| **n == *port && *x == pr)
                    {
                        targets.push((format!("{}.{base}", e.host), p, e.ips.clone()));
                    }
                }
                if targets.is_empty() {
                    return self.nxdomain();
                }
            }
            Kind::External(_) => return self.nxdomain(),
        }
        if !want {
            return self.records(vec![], vec![]);
        }
        let weight = (100 / targets.len().max(1)) as u16;
        let mut answers = vec![];
        let mut extra = vec![];
        for (t, p, ips) in targets {
            let tn = name(&t);
            answers.push(self.rec(qname, RData::SRV(SRV::new(0, weight, p, tn.clone()))));
            extra.extend(ips.iter().map(|ip| self.ip_rec(&tn, *ip)));
        }
        self.records(answers, extra)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(v: serde_json::Value) -> Service {
        serde_json::from_value(v).unwrap()
    }
    fn slice(v: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(v).unwrap()
    }

    fn zone() -> Zone {
        let mut z = Zone::new("cluster.local", 5, vec!["10.96.0.10".parse().unwrap()]).unwrap();
        z.apply_service(&svc(serde_json::json!({"metadata": {"name": "web", "namespace": "shop"},
            "spec": {"clusterIP": "10.96.0.20", "ports": [{"name": "http", "port": 80}, {"port": 81}]}})));
        z.apply_service(&svc(
            serde_json::json!({"metadata": {"name": "db", "namespace": "shop"},
            "spec": {"clusterIP": "None", "ports": [{"name": "pg", "port": 5432}]}}),
        ));
        z.apply_slice(&slice(serde_json::json!({"metadata": {"name": "db-1", "namespace": "shop",
                "labels": {SERVICE_NAME: "db"}},
            "addressType": "IPv4", "ports": [{"name": "pg", "port": 15432}],
            "endpoints": [
                {"addresses": ["10.244.1.5"], "hostname": "db-0", "conditions": {"ready": true}},
                {"addresses": ["10.244.2.6"], "conditions": {"ready": true}},
                {"addresses": ["10.244.2.7"], "hostname": "db-2", "conditions": {"ready": false}}]})));
        z.apply_service(&svc(
            serde_json::json!({"metadata": {"name": "ext", "namespace": "shop"},
            "spec": {"type": "ExternalName", "externalName": "www.example.com"}}),
        ));
        z
    }

    fn ask(z: &Zone, q: &str, t: RecordType) -> Answer {
        match z.lookup(&Name::from_ascii(q).unwrap(), t) {
            Lookup::Answer(a) => *a,
            Lookup::Forward => panic!("{q} forwarded"),
        }
    }

    fn data(a: &Answer) -> Vec<String> {
        a.answers.iter().map(|r| r.data.to_string()).collect()
    }

    #[test]
    fn cluster_ip_service_a_srv_ptr_and_negative_answers() {
        let z = zone();
        let a = ask(&z, "WEB.Shop.svc.cluster.local.", RecordType::A);
        assert_eq!(data(&a), ["10.96.0.20"]);
        // Answered under the name as asked.
        assert_eq!(a.answers[0].name.to_ascii(), "WEB.Shop.svc.cluster.local.");
        assert_eq!(a.answers[0].ttl, 5);
        // The name exists, not the type: NODATA with the SOA.
        let a = ask(&z, "web.shop.svc.cluster.local.", RecordType::AAAA);
        assert_eq!((a.rcode, a.answers.len()), (ResponseCode::NoError, 0));
        assert!(a.soa.is_some());
        let a = ask(&z, "nope.shop.svc.cluster.local.", RecordType::A);
        assert_eq!(a.rcode, ResponseCode::NXDomain);
        let a = ask(
            &z,
            "_http._tcp.web.shop.svc.cluster.local.",
            RecordType::SRV,
        );
        assert_eq!(data(&a), ["0 100 80 web.shop.svc.cluster.local."]);
        assert_eq!(a.additionals.len(), 1);
        // Unnamed ports have no SRV; the protocol must match.
        let a = ask(
            &z,
            "_http._udp.web.shop.svc.cluster.local.",
            RecordType::SRV,
        );
        assert_eq!(a.rcode, ResponseCode::NXDomain);
        let a = ask(&z, "20.0.96.10.in-addr.arpa.", RecordType::PTR);
        assert_eq!(data(&a), ["web.shop.svc.cluster.local."]);
        // An address the cluster does not know is the upstream's.
        let q = Name::from_ascii("1.1.168.192.in-addr.arpa.").unwrap();
        assert_eq!(z.lookup(&q, RecordType::PTR), Lookup::Forward);
        let q = Name::from_ascii("example.com.").unwrap();
        assert_eq!(z.lookup(&q, RecordType::A), Lookup::Forward);
        // Names on the way are empty non-terminals; an unknown namespace is not.
        assert_eq!(
            ask(&z, "shop.svc.cluster.local.", RecordType::A).rcode,
            ResponseCode::NoError
        );
        assert_eq!(
            ask(&z, "svc.cluster.local.", RecordType::A).rcode,
            ResponseCode::NoError
        );
        assert_eq!(
            ask(&z, "other.svc.cluster.local.", RecordType::A).rcode,
            ResponseCode::NXDomain
        );
        assert_eq!(
            data(&ask(&z, "dns-version.cluster.local.", RecordType::TXT)),
            ["1.1.0"]
        );
        assert_eq!(
            data(&ask(
                &z,
                "10-244-3-9.shop.pod.cluster.local.",
                RecordType::A
            )),
            ["10.244.3.9"]
        );
        assert_eq!(ask(&z, "cluster.local.", RecordType::SOA).answers.len(), 1);
    }

    #[test]
    fn headless_service_endpoints_hostnames_srv_and_ptr() {
        let mut z = zone();
        let a = ask(&z, "db.shop.svc.cluster.local.", RecordType::A);
        assert_eq!(data(&a), ["10.244.1.5", "10.244.2.6"]);
        assert_eq!(
            data(&ask(&z, "db-0.db.shop.svc.cluster.local.", RecordType::A)),
            ["10.244.1.5"]
        );
        // No hostname: the dashed address names it.
        assert_eq!(
            data(&ask(
                &z,
                "10-244-2-6.db.shop.svc.cluster.local.",
                RecordType::A
            )),
            ["10.244.2.6"]
        );
        // Not ready: not named.
        assert_eq!(
            ask(&z, "db-2.db.shop.svc.cluster.local.", RecordType::A).rcode,
            ResponseCode::NXDomain
        );
        let mut srv = data(&ask(
            &z,
            "_pg._tcp.db.shop.svc.cluster.local.",
            RecordType::SRV,
        ));
        srv.sort();
        assert_eq!(
            srv,
            [
                "0 50 15432 10-244-2-6.db.shop.svc.cluster.local.",
                "0 50 15432 db-0.db.shop.svc.cluster.local."
            ]
        );
        assert_eq!(
            data(&ask(&z, "5.1.244.10.in-addr.arpa.", RecordType::PTR)),
            ["db-0.db.shop.svc.cluster.local."]
        );
        // publishNotReadyAddresses names the not-ready one too.
        z.apply_service(&svc(serde_json::json!({"metadata": {"name": "db", "namespace": "shop"},
            "spec": {"clusterIP": "None", "publishNotReadyAddresses": true, "ports": [{"name": "pg", "port": 5432}]}})));
        assert_eq!(
            data(&ask(&z, "db-2.db.shop.svc.cluster.local.", RecordType::A)),
            ["10.244.2.7"]
        );
        // No ready endpoints at all: NXDOMAIN (the spec), and the PTRs go.
        z.apply_slice(&slice(
            serde_json::json!({"metadata": {"name": "db-1", "namespace": "shop",
                "labels": {SERVICE_NAME: "db"}}, "addressType": "IPv4", "endpoints": []}),
        ));
        assert_eq!(
            ask(&z, "db.shop.svc.cluster.local.", RecordType::A).rcode,
            ResponseCode::NXDomain
        );
        let q = Name::from_ascii("5.1.244.10.in-addr.arpa.").unwrap();
        assert_eq!(z.lookup(&q, RecordType::PTR), Lookup::Forward);
    }

    #[test]
    fn external_name_relists_and_names_dns_cannot_carry() {
        let mut z = zone();
        let a = ask(&z, "ext.shop.svc.cluster.local.", RecordType::A);
        assert_eq!(data(&a), ["www.example.com."]);
        assert_eq!(a.chase.unwrap().to_ascii(), "www.example.com.");
        // A relist that no longer has `web` removes it and its PTR.
        let db = svc(
            serde_json::json!({"metadata": {"name": "db", "namespace": "shop"}, "spec": {"clusterIP": "None"}}),
        );
        z.services_relist_begin();
        z.services_relist_item(&db);
        z.services_relist_done();
        assert_eq!(z.len(), 1);
        assert_eq!(
            ask(&z, "web.shop.svc.cluster.local.", RecordType::A).rcode,
            ResponseCode::NXDomain
        );
        let q = Name::from_ascii("20.0.96.10.in-addr.arpa.").unwrap();
        assert_eq!(z.lookup(&q, RecordType::PTR), Lookup::Forward);
        // The slice survived the Service relist and still names db's endpoints.
        assert_eq!(
            ask(&z, "db-0.db.shop.svc.cluster.local.", RecordType::A)
                .answers
                .len(),
            1
        );
        // A name DNS cannot carry is skipped, not an error.
        z.apply_service(&svc(serde_json::json!({"metadata": {"name": "Bad_Name", "namespace": "shop"}, "spec": {"clusterIP": "10.96.0.99"}})));
        assert_eq!(z.len(), 1);
        assert!(Zone::new("bad..domain", 5, vec![]).is_err());
    }

    #[test]
    fn dual_stack_service_answers_a_and_aaaa_and_ip6_arpa() {
        let mut z = zone();
        z.apply_service(&svc(
            serde_json::json!({"metadata": {"name": "v6", "namespace": "shop"},
            "spec": {"clusterIP": "10.96.0.30", "clusterIPs": ["10.96.0.30", "fd00:10:96::30"]}}),
        ));
        assert_eq!(
            data(&ask(&z, "v6.shop.svc.cluster.local.", RecordType::A)),
            ["10.96.0.30"]
        );
        assert_eq!(
            data(&ask(&z, "v6.shop.svc.cluster.local.", RecordType::AAAA)),
            ["fd00:10:96::30"]
        );
        let nibbles: String = "fd000010009600000000000000000030"
            .chars()
            .rev()
            .map(|c| format!("{c}."))
            .collect();
        let q = format!("{nibbles}ip6.arpa.");
        assert_eq!(
            data(&ask(&z, &q, RecordType::PTR)),
            ["v6.shop.svc.cluster.local."]
        );
        // A changed address moves its PTR.
        z.apply_service(&svc(
            serde_json::json!({"metadata": {"name": "v6", "namespace": "shop"},
            "spec": {"clusterIP": "10.96.0.31"}}),
        ));
        let old = Name::from_ascii("30.0.96.10.in-addr.arpa.").unwrap();
        assert_eq!(z.lookup(&old, RecordType::PTR), Lookup::Forward);
        assert_eq!(
            data(&ask(&z, "31.0.96.10.in-addr.arpa.", RecordType::PTR)),
            ["v6.shop.svc.cluster.local."]
        );
    }
}
