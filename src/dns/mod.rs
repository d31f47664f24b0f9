//! Node-local cluster DNS (CoreDNS's job, on every node): the cluster zone built from the
//! Service and EndpointSlice events the service proxy's watches deliver, answered on the
//! cluster DNS address (bound on this node, so pods never cross to another node for a name);
//! every other name forwarded to the node's upstream servers with a cache. The wire format is
//! hickory-proto's; the zone logic is keelson's (`zone`). Never touches the API server itself
//! and never programs the kernel beyond its own sockets.

pub mod forward;
pub mod metrics;
pub mod zone;

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{Arc, RwLock, atomic::Ordering},
    time::{Duration, Instant},
};

use hickory_proto::{
    op::{Edns, Message, MessageType, OpCode, ResponseCode},
    rr::{DNSClass, Name, Record, RecordType},
};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::runtime::watcher::Event;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, UdpSocket},
};

use forward::Forwarder;
use metrics::Metrics;
use zone::{Lookup, Zone};

/// Settings of the node's DNS server.
#[derive(Debug, Clone)]
pub struct DnsConfig {
    /// The cluster DNS addresses this node answers on (bound locally).
    pub listen: Vec<IpAddr>,
    pub port: u16,
    /// CoreDNS's metrics port (served on the listen addresses; None: off).
    pub metrics_port: Option<u16>,
    /// The cluster domain, e.g. `cluster.local`.
    pub domain: String,
    /// TTL of cluster records.
    pub ttl: u32,
    /// Where the upstream servers come from (None: nowhere; names outside the cluster fail).
    pub resolv_conf: Option<PathBuf>,
    /// Forwarded answers are cached at most this long.
    pub cache_ttl: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error(transparent)]
    Domain(#[from] zone::BadDomain),
    #[error("listening on {addr} ({proto}): {source}")]
    Listen {
        addr: SocketAddr,
        proto: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("reading {path}: {source}")]
    ResolvConf {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The largest answer sent over UDP to a client without EDNS, and the most any gets.
const UDP_PLAIN: usize = 512;
const UDP_MAX: usize = 4096;
/// CNAME chains (ExternalName to ExternalName) are followed this far.
const MAX_CHASE: usize = 8;

pub struct Server {
    zone: Arc<RwLock<Zone>>,
    fwd: Forwarder,
    pub metrics: Metrics,
}

/// What to do with a request once it is read.
enum Step {
    Done(Vec<u8>),
    /// Needs the upstreams (a forwarded name, or an ExternalName's target).
    Later(Box<Message>, Option<Box<zone::Answer>>),
}

/// A response to `req` (its id, question, RD and CD; RA set; an OPT when it had one).
fn response(req: &Message, rcode: ResponseCode, aa: bool) -> Message {
    let mut r = Message::response(req.id, req.op_code);
    r.metadata.recursion_desired = req.recursion_desired;
    r.metadata.checking_disabled = req.checking_disabled;
    r.metadata.recursion_available = true;
    r.metadata.authoritative = aa;
    r.metadata.response_code = rcode;
    r.queries = req.queries.clone();
    if req.edns.is_some() {
        let mut e = Edns::new();
        e.set_max_payload(1232);
        r.set_edns(e);
    }
    r
}

/// `r` in wire format within `max` bytes: truncated (TC, no records) when it does not fit.
fn encode(r: &Message, max: usize) -> Vec<u8> {
    match r.to_vec() {
        Ok(b) if b.len() <= max => b,
        Ok(_) => r.truncate().to_vec().unwrap_or_default(),
        Err(e) => {
            tracing::debug!(error = %e, "encoding a DNS answer");
            let mut f = response(r, ResponseCode::ServFail, false);
            f.queries.clear();
            f.to_vec().unwrap_or_default()
        }
    }
}

/// FORMERR for a request hickory could not parse: its id and opcode, no sections. Nothing for
/// a packet too short to have a header or that is itself a response.
fn formerr(buf: &[u8]) -> Option<Vec<u8>> {
    if buf.len() < 12 || buf[2] & 0x80 != 0 {
        return None;
    }
    let mut h = vec![0u8; 12];
    h[..2].copy_from_slice(&buf[..2]);
    h[2] = 0x80 | (buf[2] & 0x78);
    h[3] = 0x80 | ResponseCode::FormErr.low();
    Some(h)
}

/// The largest UDP answer `req` takes.
fn udp_max(req: &Message) -> usize {
    match &req.edns {
        Some(e) => (e.max_payload() as usize).clamp(UDP_PLAIN, UDP_MAX),
        None => UDP_PLAIN,
    }
}

impl Server {
    pub fn new(cfg: &DnsConfig) -> Result<Server, DnsError> {
        let zone = Zone::new(&cfg.domain, cfg.ttl, cfg.listen.clone())?;
        let upstreams = match &cfg.resolv_conf {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| DnsError::ResolvConf {
                    path: p.clone(),
                    source,
                })?;
                forward::upstreams(&crate::kinds::dns::ResolvConf::parse(&text), &cfg.listen)
            }
            None => vec![],
        };
        Ok(Server {
            zone: Arc::new(RwLock::new(zone)),
            fwd: Forwarder::new(upstreams, cfg.cache_ttl),
            metrics: Metrics::default(),
        })
    }

    /// The feed that keeps the zone up to date (see `proxy::Subscriber`).
    pub fn feed(self: &Arc<Self>) -> ZoneFeed {
        ZoneFeed {
            server: self.clone(),
        }
    }

    /// Answers from the zone, or says what needs the upstreams. None: nothing to send.
    fn handle(&self, buf: &[u8], proto: &'static str) -> Option<Step> {
        let req = match Message::from_vec(buf) {
            Ok(m) => m,
            Err(_) => {
                self.metrics.response("FORMERR".into(), Duration::ZERO);
                return formerr(buf).map(Step::Done);
            }
        };
        if req.message_type != MessageType::Query {
            return None;
        }
        let max = if proto == "udp" { udp_max(&req) } else { 65535 };
        let reply =
            |rcode: ResponseCode| Some(Step::Done(encode(&response(&req, rcode, false), max)));
        if req.op_code != OpCode::Query {
            return reply(ResponseCode::NotImp);
        }
        let [q] = req.queries.as_slice() else {
            return reply(ResponseCode::FormErr);
        };
        self.metrics.request(proto, u16::from(q.query_type()));
        self.fwd.saw(q.name(), &self.metrics);
        if q.query_class() != DNSClass::IN {
            return reply(ResponseCode::NotImp);
        }
        match q.query_type() {
            RecordType::AXFR | RecordType::IXFR => return reply(ResponseCode::NotImp),
            RecordType::OPT => return reply(ResponseCode::FormErr),
            _ => {}
        }
        let found = match self.zone.read() {
            Ok(z) => z.lookup(q.name(), q.query_type()),
            Err(_) => return reply(ResponseCode::ServFail),
        };
        match found {
            Lookup::Forward => Some(Step::Later(Box::new(req), None)),
            Lookup::Answer(a) if a.chase.is_some() => Some(Step::Later(Box::new(req), Some(a))),
            Lookup::Answer(a) => {
                let mut r = response(&req, a.rcode, true);
                r.answers = a.answers;
                r.additionals = a.additionals;
                r.authorities = a.soa.into_iter().collect();
                Some(Step::Done(encode(&r, max)))
            }
        }
    }

    /// Finishes a request that needs the upstreams.
    async fn later(&self, req: &Message, chase: Option<Box<zone::Answer>>, max: usize) -> Vec<u8> {
        let q = &req.queries[0];
        let Some(mut a) = chase else {
            return match self.fwd.resolve(q, &self.metrics).await {
                Ok(up) => {
                    let mut r = response(req, up.response_code, false);
                    r.answers = up.answers;
                    r.authorities = up.authorities;
                    r.additionals = up
                        .additionals
                        .into_iter()
                        .filter(|r| r.record_type() != RecordType::OPT)
                        .collect();
                    encode(&r, max)
                }
                Err(e) => {
                    tracing::debug!(name = %q.name(), error = %e, "forwarding");
                    encode(&response(req, ResponseCode::ServFail, false), max)
                }
            };
        };
        // An ExternalName: its CNAME, then what the target resolves to (in the cluster or
        // upstream), as a recursive server answers.
        let mut rcode = ResponseCode::NoError;
        let mut seen = 0;
        while let Some(target) = a.chase.take() {
            seen += 1;
            let more = self.chase(&target, q.query_type()).await;
            match more {
                Some((code, records, next)) if seen <= MAX_CHASE => {
                    rcode = code;
                    a.answers.extend(records);
                    a.chase = next;
                }
                _ => break,
            }
        }
        let mut r = response(req, rcode, true);
        r.answers = a.answers;
        encode(&r, max)
    }

    /// The records of `target` (and a further CNAME target to follow).
    async fn chase(
        &self,
        target: &Name,
        qtype: RecordType,
    ) -> Option<(ResponseCode, Vec<Record>, Option<Name>)> {
        let found = self.zone.read().ok()?.lookup(target, qtype);
        match found {
            Lookup::Answer(a) => Some((a.rcode, a.answers, a.chase)),
            Lookup::Forward => {
                let q = hickory_proto::op::Query::query(target.clone(), qtype);
                let up = self.fwd.resolve(&q, &self.metrics).await.ok()?;
                Some((up.response_code, up.answers, None))
            }
        }
    }

    async fn serve_udp(self: Arc<Self>, sock: Arc<UdpSocket>) {
        let mut buf = vec![0u8; 65535];
        loop {
            let (n, peer) = match sock.recv_from(&mut buf).await {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!(error = %e, "DNS UDP receive");
                    continue;
                }
            };
            let t0 = Instant::now();
            match self.handle(&buf[..n], "udp") {
                None => {}
                Some(Step::Done(b)) => {
                    self.count(&b, t0);
                    let _ = sock.send_to(&b, peer).await;
                }
                Some(Step::Later(req, chase)) => {
                    let (me, sock) = (self.clone(), sock.clone());
                    tokio::spawn(async move {
                        let b = me.later(&req, chase, udp_max(&req)).await;
                        me.count(&b, t0);
                        let _ = sock.send_to(&b, peer).await;
                    });
                }
            }
        }
    }

    fn count(&self, b: &[u8], t0: Instant) {
        let rcode = b.get(3).map_or("", |x| metrics::rcode_name(x & 0x0f));
        self.metrics.response(rcode.to_string(), t0.elapsed());
    }

    async fn serve_tcp(self: Arc<Self>, l: TcpListener) {
        loop {
            let Ok((mut conn, _)) = l.accept().await else {
                continue;
            };
            let me = self.clone();
            tokio::spawn(async move {
                // Several questions per connection, each length-prefixed; idle ones close.
                loop {
                    let mut len = [0u8; 2];
                    let idle =
                        tokio::time::timeout(Duration::from_secs(10), conn.read_exact(&mut len));
                    if !matches!(idle.await, Ok(Ok(_))) {
                        return;
                    }
                    let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
                    let body =
                        tokio::time::timeout(Duration::from_secs(5), conn.read_exact(&mut buf));
                    if !matches!(body.await, Ok(Ok(_))) {
                        return;
                    }
                    let t0 = Instant::now();
                    let b = match me.handle(&buf, "tcp") {
                        None => continue,
                        Some(Step::Done(b)) => b,
                        Some(Step::Later(req, chase)) => me.later(&req, chase, 65535).await,
                    };
                    me.count(&b, t0);
                    let Ok(l) = u16::try_from(b.len()) else {
                        return;
                    };
                    if conn.write_all(&l.to_be_bytes()).await.is_err()
                        || conn.write_all(&b).await.is_err()
                    {
                        return;
                    }
                }
            });
        }
    }
}

/// Binds the server's sockets (UDP and TCP on each listen address, metrics) and serves them.
pub async fn start(cfg: &DnsConfig) -> Result<Arc<Server>, DnsError> {
    let server = Arc::new(Server::new(cfg)?);
    for ip in &cfg.listen {
        let addr = SocketAddr::new(*ip, cfg.port);
        let listen = |proto| {
            move |source| DnsError::Listen {
                addr,
                proto,
                source,
            }
        };
        let udp = UdpSocket::bind(addr).await.map_err(listen("udp"))?;
        let tcp = TcpListener::bind(addr).await.map_err(listen("tcp"))?;
        tokio::spawn(server.clone().serve_udp(Arc::new(udp)));
        tokio::spawn(server.clone().serve_tcp(tcp));
        if let Some(port) = cfg.metrics_port {
            let addr = SocketAddr::new(*ip, port);
            let l = TcpListener::bind(addr).await.map_err(listen("metrics"))?;
            let me = server.clone();
            tokio::spawn(crate::proxy::health::answer_each(l, move || {
                let body = me.metrics.render();
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
            }));
        }
    }
    tracing::info!(listen = ?cfg.listen, domain = %cfg.domain, upstreams = ?server.fwd.upstreams(), "cluster DNS serving");
    let me = server.clone();
    tokio::spawn(async move { me.fwd.probe(&me.metrics).await });
    Ok(server)
}

/// Keeps the zone in step with the Service and EndpointSlice watches.
pub struct ZoneFeed {
    server: Arc<Server>,
}

impl ZoneFeed {
    fn with(&self, f: impl FnOnce(&mut Zone)) {
        if let Ok(mut z) = self.server.zone.write() {
            f(&mut z);
            self.server
                .metrics
                .services
                .store(z.len() as u64, Ordering::Relaxed);
        }
    }
}

impl crate::proxy::Subscriber for ZoneFeed {
    fn service(&mut self, ev: &Event<Service>) {
        self.with(|z| match ev {
            Event::Apply(s) => z.apply_service(s),
            Event::Delete(s) => z.delete_service(s),
            Event::Init => z.services_relist_begin(),
            Event::InitApply(s) => z.services_relist_item(s),
            Event::InitDone => z.services_relist_done(),
        })
    }
    fn slice(&mut self, ev: &Event<EndpointSlice>) {
        self.with(|z| match ev {
            Event::Apply(s) => z.apply_slice(s),
            Event::Delete(s) => z.delete_slice(s),
            Event::Init => z.slices_relist_begin(),
            Event::InitApply(s) => z.slices_relist_item(s),
            Event::InitDone => z.slices_relist_done(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;

    fn server() -> Server {
        let s = Server::new(&DnsConfig {
            listen: vec!["10.96.0.10".parse().unwrap()],
            port: 53,
            metrics_port: None,
            domain: "cluster.local".into(),
            ttl: 5,
            resolv_conf: None,
            cache_ttl: Duration::from_secs(30),
        })
        .unwrap();
        let svc: Service = serde_json::from_value(
            serde_json::json!({"metadata": {"name": "web", "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.20"}}),
        )
        .unwrap();
        s.zone.write().unwrap().apply_service(&svc);
        s
    }

    fn query(name: &str, t: RecordType, edns: bool) -> Vec<u8> {
        let mut m = Message::new(0x1234, MessageType::Query, OpCode::Query);
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
        m.metadata.recursion_desired = true;
        if edns {
            m.set_edns(Edns::new());
        }
        m.to_vec().unwrap()
    }

    fn done(s: &Server, b: &[u8]) -> Message {
        match s.handle(b, "udp") {
            Some(Step::Done(b)) => Message::from_vec(&b).unwrap(),
            _ => panic!("no immediate answer"),
        }
    }

    #[test]
    fn answers_bad_input_with_the_right_rcode_and_never_panics() {
        let s = server();
        let r = done(
            &s,
            &query("web.default.svc.cluster.local.", RecordType::A, true),
        );
        assert_eq!(r.id, 0x1234);
        assert!(r.authoritative && r.recursion_available && r.recursion_desired);
        assert_eq!(r.answers[0].data.to_string(), "10.96.0.20");
        assert!(r.edns.is_some());
        // Garbage with a header: FORMERR under its id; too short, or a response: nothing.
        let mut junk = query("web.default.svc.cluster.local.", RecordType::A, false);
        junk.truncate(20);
        let b = match s.handle(&junk, "udp") {
            Some(Step::Done(b)) => b,
            _ => panic!("no FORMERR"),
        };
        assert_eq!((b[0], b[1], b[3] & 0x0f), (0x12, 0x34, 1));
        assert!(s.handle(&[1, 2, 3], "udp").is_none());
        let mut resp = query("x.", RecordType::A, false);
        resp[2] |= 0x80;
        assert!(s.handle(&resp, "udp").is_none());
        // Another opcode: NOTIMP; a zone transfer: NOTIMP; another class: NOTIMP.
        let mut m = Message::from_vec(&query("cluster.local.", RecordType::SOA, false)).unwrap();
        m.metadata.op_code = OpCode::Status;
        assert_eq!(
            done(&s, &m.to_vec().unwrap()).response_code,
            ResponseCode::NotImp
        );
        let r = done(&s, &query("cluster.local.", RecordType::AXFR, false));
        assert_eq!(r.response_code, ResponseCode::NotImp);
        let mut m = Message::from_vec(&query("cluster.local.", RecordType::A, false)).unwrap();
        m.queries[0].set_query_class(DNSClass::CH);
        assert_eq!(
            done(&s, &m.to_vec().unwrap()).response_code,
            ResponseCode::NotImp
        );
        // Two questions: FORMERR.
        let mut m = Message::from_vec(&query("cluster.local.", RecordType::A, false)).unwrap();
        m.add_query(Query::query(Name::from_ascii("x.").unwrap(), RecordType::A));
        assert_eq!(
            done(&s, &m.to_vec().unwrap()).response_code,
            ResponseCode::FormErr
        );
        // An unknown type on a cluster name: NODATA.
        let r = done(
            &s,
            &query(
                "web.default.svc.cluster.local.",
                RecordType::Unknown(65000),
                false,
            ),
        );
        assert_eq!(
            (r.response_code, r.answers.len()),
            (ResponseCode::NoError, 0)
        );
        assert_eq!(r.authorities.len(), 1);
    }

    #[tokio::test]
    async fn no_upstream_is_servfail_and_big_answers_are_truncated_over_udp() {
        let s = server();
        let b = query("example.com.", RecordType::A, false);
        let Some(Step::Later(req, chase)) = s.handle(&b, "udp") else {
            panic!("not forwarded");
        };
        let r = Message::from_vec(&s.later(&req, chase, 512).await).unwrap();
        assert_eq!(r.response_code, ResponseCode::ServFail);
        // A headless Service with 100 endpoints does not fit 512 bytes: TC, no records.
        let svc: Service = serde_json::from_value(
            serde_json::json!({"metadata": {"name": "big", "namespace": "default"},
            "spec": {"clusterIP": "None"}}),
        )
        .unwrap();
        let eps: Vec<serde_json::Value> = (0..100)
            .map(|i| serde_json::json!({"addresses": [format!("10.244.0.{i}")]}))
            .collect();
        let sl: EndpointSlice = serde_json::from_value(serde_json::json!({"metadata": {"name": "big-1", "namespace": "default",
            "labels": {"kubernetes.io/service-name": "big"}}, "addressType": "IPv4", "endpoints": eps})).unwrap();
        {
            let mut z = s.zone.write().unwrap();
            z.apply_service(&svc);
            z.apply_slice(&sl);
        }
        let r = done(
            &s,
            &query("big.default.svc.cluster.local.", RecordType::A, false),
        );
        assert!(r.truncation && r.answers.is_empty());
        match s.handle(
            &query("big.default.svc.cluster.local.", RecordType::A, false),
            "tcp",
        ) {
            Some(Step::Done(b)) => assert_eq!(Message::from_vec(&b).unwrap().answers.len(), 100),
            _ => panic!("no TCP answer"),
        }
    }

    #[tokio::test]
    async fn a_forwarding_loop_is_found_by_the_probe_and_forwarding_stops() {
        // A server on loopback whose only upstream is itself.
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        let mut s = server();
        s.fwd = Forwarder::new(vec![addr], Duration::from_secs(30));
        let s = Arc::new(s);
        tokio::spawn(s.clone().serve_udp(Arc::new(sock)));
        tokio::time::timeout(Duration::from_secs(10), s.fwd.probe(&s.metrics))
            .await
            .expect("the probe comes back");
        assert_eq!(s.metrics.loops.load(Ordering::Relaxed), 1);
        // Another name: SERVFAIL at once, nothing forwarded.
        let forwarded = s.metrics.render();
        let b = query("example.com.", RecordType::A, false);
        let Some(Step::Later(req, chase)) = s.handle(&b, "udp") else {
            panic!("not forwarded");
        };
        let t0 = Instant::now();
        let r = Message::from_vec(&s.later(&req, chase, 512).await).unwrap();
        assert_eq!(r.response_code, ResponseCode::ServFail);
        assert!(t0.elapsed() < Duration::from_millis(100));
        let count = |m: &str| {
            m.lines()
                .filter(|l| l.starts_with("coredns_forward_requests_total{"))
                .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
                .sum::<u64>()
        };
        assert_eq!(count(&forwarded), count(&s.metrics.render()));
    }
}
