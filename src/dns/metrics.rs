//! The cluster DNS's counters under CoreDNS's metric names (so dashboards built for CoreDNS
//! read them): requests by protocol and type, responses by rcode, cache hits and misses,
//! forwarded requests and their latency; served as Prometheus text on port 9153.

use std::{
    collections::BTreeMap,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use crate::control::metrics::Histogram;

/// CoreDNS's buckets for request durations (seconds).
const BUCKETS: &[f64] = &[
    0.00025, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024,
    2.048, 4.096, 8.192,
];

pub struct Metrics {
    /// (proto, type) → requests.
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    /// rcode → responses.
    responses: Mutex<BTreeMap<String, u64>>,
    pub cache_hits_success: AtomicU64,
    pub cache_hits_denial: AtomicU64,
    pub cache_misses: AtomicU64,
    /// upstream → forwarded requests.
    forwards: Mutex<BTreeMap<String, u64>>,
    pub forward_duration: Histogram,
    pub request_duration: Histogram,
    /// Loops found by the loop probe (forwarding stops when one is).
    pub loops: AtomicU64,
    /// Services the zone answers for.
    pub services: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Mutex::default(),
            responses: Mutex::default(),
            cache_hits_success: AtomicU64::new(0),
            cache_hits_denial: AtomicU64::new(0),
            cache_misses: AtomicU64::new(0),
            forwards: Mutex::default(),
            forward_duration: Histogram::new(BUCKETS),
            request_duration: Histogram::new(BUCKETS),
            loops: AtomicU64::new(0),
            services: AtomicU64::new(0),
        }
    }
}

/// An rcode as CoreDNS's metrics spell it.
pub fn rcode_name(code: u8) -> &'static str {
    match code {
        0 => "NOERROR",
        1 => "FORMERR",
        2 => "SERVFAIL",
        3 => "NXDOMAIN",
        4 => "NOTIMP",
        5 => "REFUSED",
        _ => "OTHER",
    }
}

/// A labelled counter's rows: (labels, value).
fn rows<K>(m: &Mutex<BTreeMap<K, u64>>, f: impl Fn(&K) -> String) -> Vec<(String, u64)> {
    m.lock()
        .map(|m| m.iter().map(|(k, v)| (f(k), *v)).collect())
        .unwrap_or_default()
}

fn bump<K: Ord>(m: &Mutex<BTreeMap<K, u64>>, k: K) {
    if let Ok(mut m) = m.lock() {
        *m.entry(k).or_default() += 1;
    }
}

impl Metrics {
    pub fn request(&self, proto: &'static str, qtype: u16) {
        bump(&self.requests, (proto, qtype));
    }

    pub fn response(&self, rcode: String, took: Duration) {
        bump(&self.responses, rcode);
        self.request_duration.observe(took);
    }

    pub fn forwarded(&self, to: String, took: Duration) {
        bump(&self.forwards, to);
        self.forward_duration.observe(took);
    }

    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let mut counter = |name: &str, help: &str, rows: Vec<(String, u64)>| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (labels, v) in rows {
                let _ = writeln!(out, "{name}{labels} {v}");
            }
        };
        counter(
            "coredns_dns_requests_total",
            "Counter of DNS requests made per zone, protocol and family.",
            rows(&self.requests, |(p, t)| {
                let t = hickory_proto::rr::RecordType::from(*t);
                format!("{{server=\"dns://:53\",zone=\".\",proto=\"{p}\",type=\"{t}\"}}")
            }),
        );
        counter(
            "coredns_dns_responses_total",
            "Counter of response status codes.",
            rows(&self.responses, |r| {
                format!("{{server=\"dns://:53\",zone=\".\",rcode=\"{r}\"}}")
            }),
        );
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        counter(
            "coredns_cache_hits_total",
            "The count of cache hits.",
            vec![
                ("{type=\"success\"}".into(), load(&self.cache_hits_success)),
                ("{type=\"denial\"}".into(), load(&self.cache_hits_denial)),
            ],
        );
        counter(
            "coredns_cache_misses_total",
            "The count of cache misses.",
            vec![(String::new(), load(&self.cache_misses))],
        );
        counter(
            "coredns_forward_requests_total",
            "Counter of requests made per upstream.",
            rows(&self.forwards, |to| format!("{{to=\"{to}\"}}")),
        );
        counter(
            "keelson_dns_loops_total",
            "Forwarding loops the loop probe found (forwarding stops).",
            vec![(String::new(), load(&self.loops))],
        );
        self.forward_duration.render(
            "coredns_forward_request_duration_seconds",
            "Histogram of the time each request took.",
            &mut out,
        );
        self.request_duration.render(
            "coredns_dns_request_duration_seconds",
            "Histogram of the time (in seconds) each request took.",
            &mut out,
        );
        let _ = writeln!(
            out,
            "# HELP keelson_dns_services Services in the cluster zone.\n# TYPE keelson_dns_services gauge\nkeelson_dns_services {}",
            load(&self.services)
        );
        out
    }
}
