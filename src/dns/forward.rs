//! Names outside the cluster: forwarded to the node's upstream servers (its resolv.conf),
//! over UDP with a retry over TCP when the answer comes back truncated, each server tried in
//! turn; answers cached (at most `cache_ttl`, like CoreDNS's `cache 30`); and a loop probe,
//! as CoreDNS's `loop` plugin sends one: a query for a random name that only comes back to
//! this server if an upstream forwards to it. When it comes back, forwarding stops.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use hickory_proto::{
    op::{Edns, Message, MessageType, OpCode, Query, ResponseCode},
    rr::{DNSClass, Name, RecordType},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpStream, UdpSocket},
};

use super::metrics::Metrics;

/// How long one upstream gets to answer before the next is tried.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// Forwards in flight at once: beyond this, SERVFAIL (what bounds a loop the probe has not
/// caught yet).
const MAX_IN_FLIGHT: usize = 256;
const CACHE_ENTRIES: usize = 9984;

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("no upstream DNS server is configured")]
    NoUpstream,
    #[error("forwarding stopped: a forwarding loop was detected")]
    Loop,
    #[error("too many forwarded queries in flight")]
    Busy,
    #[error("no upstream answered: {0}")]
    Failed(String),
}

/// (lower-case name, type, class)
type CacheKey = (String, RecordType, DNSClass);

struct Cached {
    msg: Message,
    at: Instant,
    ttl: Duration,
}

pub struct Forwarder {
    upstreams: Vec<SocketAddr>,
    cache_ttl: Duration,
    cache: Mutex<HashMap<CacheKey, Cached>>,
    in_flight: tokio::sync::Semaphore,
    looped: AtomicBool,
    /// The loop probe's name, and how often it came back.
    probe: Name,
    probe_seen: AtomicU32,
}

/// The nameservers of a resolv.conf, minus this server's own addresses (a node whose
/// resolv.conf names the cluster DNS would otherwise forward to itself).
pub fn upstreams(conf: &crate::kinds::dns::ResolvConf, own: &[IpAddr]) -> Vec<SocketAddr> {
    conf.nameservers
        .iter()
        .filter_map(|n| {
            let ip = n.split('%').next()?.parse::<IpAddr>();
            match ip {
                Ok(ip) if own.contains(&ip) => {
                    tracing::warn!(%ip, "the upstream DNS server is this cluster DNS itself; not forwarding to it");
                    None
                }
                Ok(ip) => Some(SocketAddr::new(ip, 53)),
                Err(_) => {
                    tracing::warn!(nameserver = %n, "not an address in resolv.conf; skipped");
                    None
                }
            }
        })
        .collect()
}

fn random_label() -> String {
    crate::runtime::random_hex(8)
}

fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    // getrandom only fails when the kernel has no entropy source at all.
    getrandom::fill(&mut b).expect("kernel random source");
    u64::from_le_bytes(b)
}

/// A query id nobody can guess (answers with another id are dropped).
fn query_id() -> u16 {
    rand_u64() as u16
}

impl Forwarder {
    pub fn new(upstreams: Vec<SocketAddr>, cache_ttl: Duration) -> Forwarder {
        let probe = Name::from_ascii(format!("{}.{}.", random_label(), random_label()))
            .unwrap_or_else(|_| Name::root());
        Forwarder {
            upstreams,
            cache_ttl,
            cache: Mutex::new(HashMap::new()),
            in_flight: tokio::sync::Semaphore::new(MAX_IN_FLIGHT),
            looped: AtomicBool::new(false),
            probe,
            probe_seen: AtomicU32::new(0),
        }
    }

    pub fn upstreams(&self) -> &[SocketAddr] {
        &self.upstreams
    }

    /// The server saw a query for `name`: when it is the loop probe coming back a third
    /// time, a loop is declared (CoreDNS's threshold) and forwarding stops.
    pub fn saw(&self, name: &Name, m: &Metrics) {
        if *name != self.probe {
            return;
        }
        if self.probe_seen.fetch_add(1, Ordering::Relaxed) + 1 >= 3
            && !self.looped.swap(true, Ordering::Relaxed)
        {
            m.loops.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                upstreams = ?self.upstreams,
                "DNS forwarding loop: the probe query {} came back to this server; forwarding is off (fix the node's resolv.conf or --resolv-conf)",
                self.probe
            );
        }
    }

    /// Sends the loop probe once through the upstreams (its answer does not matter).
    pub async fn probe(&self, m: &Metrics) {
        if self.upstreams.is_empty() {
            return;
        }
        let q = Query::query(self.probe.clone(), RecordType::HINFO);
        let _ = self.forward(&q, m).await;
    }

    /// The cached answer to `q`, its TTLs aged, under `id`.
    fn cached(&self, q: &Query, m: &Metrics) -> Option<Message> {
        let k = key(q);
        let mut cache = self.cache.lock().ok()?;
        let c = cache.get(&k)?;
        let age = c.at.elapsed();
        if age >= c.ttl {
            cache.remove(&k);
            return None;
        }
        let mut msg = c.msg.clone();
        let left = (c.ttl - age).as_secs() as u32;
        for r in msg
            .answers
            .iter_mut()
            .chain(msg.authorities.iter_mut())
            .chain(msg.additionals.iter_mut())
        {
            r.ttl = r.ttl.min(left.max(1));
        }
        match msg.response_code {
            ResponseCode::NXDomain => &m.cache_hits_denial,
            _ if msg.answers.is_empty() => &m.cache_hits_denial,
            _ => &m.cache_hits_success,
        }
        .fetch_add(1, Ordering::Relaxed);
        Some(msg)
    }

    fn store(&self, q: &Query, msg: &Message) {
        let ttl = match msg.response_code {
            ResponseCode::NoError if !msg.answers.is_empty() => {
                msg.answers.iter().map(|r| r.ttl).min()
            }
            // Negative answers: the SOA's minimum (RFC 2308), else not cached.
            ResponseCode::NoError | ResponseCode::NXDomain => {
                msg.authorities.iter().map(|r| r.ttl).min()
            }
            _ => None,
        };
        let Some(ttl) = ttl.map(|t| Duration::from_secs(t.into()).min(self.cache_ttl)) else {
            return;
        };
        if ttl.is_zero() {
            return;
        }
        let Ok(mut cache) = self.cache.lock() else {
            return;
        };
        if cache.len() >= CACHE_ENTRIES {
            // Expired entries first; else any one.
            cache.retain(|_, c| c.at.elapsed() < c.ttl);
            if cache.len() >= CACHE_ENTRIES
                && let Some(k) = cache.keys().next().cloned()
            {
                cache.remove(&k);
            }
        }
        let mut msg = msg.clone();
        msg.edns = None;
        cache.insert(
            key(q),
            Cached {
                msg,
                at: Instant::now(),
                ttl,
            },
        );
    }

    /// The answer to `q` from the cache or the upstreams (the caller sets id and flags).
    pub async fn resolve(&self, q: &Query, m: &Metrics) -> Result<Message, ForwardError> {
        if let Some(msg) = self.cached(q, m) {
            return Ok(msg);
        }
        m.cache_misses.fetch_add(1, Ordering::Relaxed);
        let msg = self.forward(q, m).await?;
        self.store(q, &msg);
        Ok(msg)
    }

    async fn forward(&self, q: &Query, m: &Metrics) -> Result<Message, ForwardError> {
        if self.looped.load(Ordering::Relaxed) {
            return Err(ForwardError::Loop);
        }
        if self.upstreams.is_empty() {
            return Err(ForwardError::NoUpstream);
        }
        let _permit = self
            .in_flight
            .try_acquire()
            .map_err(|_| ForwardError::Busy)?;
        let mut errors = vec![];
        for up in &self.upstreams {
            let t0 = Instant::now();
            match exchange(*up, q).await {
                Ok(msg) => {
                    m.forwarded(up.to_string(), t0.elapsed());
                    return Ok(msg);
                }
                Err(e) => errors.push(format!("{up}: {e}")),
            }
        }
        Err(ForwardError::Failed(errors.join("; ")))
    }
}

fn key(q: &Query) -> CacheKey {
    (
        q.name().to_ascii().to_ascii_lowercase(),
        q.query_type(),
        q.query_class(),
    )
}

fn request(q: &Query) -> Result<(u16, Vec<u8>), std::io::Error> {
    let id = query_id();
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(q.clone());
    let mut e = Edns::new();
    e.set_max_payload(1232);
    m.set_edns(e);
    let bytes = m.to_vec().map_err(std::io::Error::other)?;
    Ok((id, bytes))
}

/// Whether `r` answers request `id` for `q` (anything else on the socket is ignored).
fn answers(r: &Message, id: u16, q: &Query) -> bool {
    r.id == id
        && r.message_type == MessageType::Response
        && r.queries.len() == 1
        && r.queries[0].query_type() == q.query_type()
        && r.queries[0].name().eq_case(q.name())
}

/// One question to one upstream: UDP, then TCP when the answer was truncated.
async fn exchange(up: SocketAddr, q: &Query) -> std::io::Result<Message> {
    let (id, bytes) = request(q)?;
    let bind: SocketAddr = match up {
        SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let sock = UdpSocket::bind(bind).await?;
    sock.connect(up).await?;
    sock.send(&bytes).await?;
    let deadline = tokio::time::Instant::now() + UPSTREAM_TIMEOUT;
    let mut buf = vec![0u8; 4096];
    let msg = loop {
        let n = tokio::time::timeout_at(deadline, sock.recv(&mut buf))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer in 2 s"))??;
        if let Ok(r) = Message::from_vec(&buf[..n])
            && answers(&r, id, q)
        {
            break r;
        }
    };
    if !msg.truncation {
        return Ok(msg);
    }
    let (id, bytes) = request(q)?;
    let exchange = async {
        let mut s = TcpStream::connect(up).await?;
        let len = u16::try_from(bytes.len()).map_err(std::io::Error::other)?;
        s.write_all(&len.to_be_bytes()).await?;
        s.write_all(&bytes).await?;
        let mut l = [0u8; 2];
        s.read_exact(&mut l).await?;
        let mut buf = vec![0u8; u16::from_be_bytes(l) as usize];
        s.read_exact(&mut buf).await?;
        Message::from_vec(&buf).map_err(std::io::Error::other)
    };
    let r = tokio::time::timeout(UPSTREAM_TIMEOUT, exchange)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no TCP answer in 2 s"))??;
    if !answers(&r, id, q) {
        return Err(std::io::Error::other(
            "the TCP answer does not match the question",
        ));
    }
    Ok(r)
}
