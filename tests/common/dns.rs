//! A fake upstream DNS server for the lab (never the machine's resolver): it lives in a lab
//! namespace, answers a few names, says NXDOMAIN to the rest, sends an answer too big for UDP
//! truncated (the full one over TCP), and counts what it was asked.

use std::{
    net::UdpSocket,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use hickory_proto::{
    op::{Message, ResponseCode},
    rr::{Name, RData, Record, RecordType, rdata::A, rdata::SOA},
};

/// `www.example.com` (and every other name under `example.com` but `big`) → this address.
pub const WWW: &str = "192.0.2.53";
/// `big.example.com` has this many A records (more than fit a UDP answer).
pub const BIG: usize = 100;

pub struct FakeUpstream {
    stop: Arc<AtomicBool>,
    tcp_stop: Arc<AtomicBool>,
    /// Questions asked over UDP and TCP.
    pub udp: Arc<AtomicUsize>,
    pub tcp: Arc<AtomicUsize>,
}

fn answer(req: &[u8], max: usize) -> Option<Vec<u8>> {
    let q = Message::from_vec(req).ok()?;
    let query = q.queries.first()?.clone();
    let mut r = Message::response(q.id, q.op_code);
    r.metadata.recursion_desired = q.recursion_desired;
    r.metadata.recursion_available = true;
    r.queries = q.queries.clone();
    let name = query.name().to_ascii().to_ascii_lowercase();
    let a = |ip: std::net::Ipv4Addr| Record::from_rdata(query.name().clone(), 300, RData::A(A(ip)));
    let ours = name.ends_with(".example.com.");
    match (name.as_str(), query.query_type()) {
        ("big.example.com.", RecordType::A) => {
            for i in 0..BIG {
                r.answers
                    .push(a(std::net::Ipv4Addr::new(198, 51, 100, i as u8)));
            }
        }
        (_, RecordType::A) if ours => r.answers.push(a(WWW.parse().unwrap())),
        _ if ours => {}
        _ => {
            r.metadata.response_code = ResponseCode::NXDomain;
            let soa = SOA::new(
                Name::from_ascii("ns.example.").unwrap(),
                Name::from_ascii("hostmaster.example.").unwrap(),
                1,
                3600,
                600,
                86400,
                60,
            );
            r.authorities.push(Record::from_rdata(
                Name::from_ascii("example.").unwrap(),
                60,
                RData::SOA(soa),
            ));
        }
    }
    let b = r.to_vec().ok()?;
    if b.len() <= max {
        return Some(b);
    }
    r.answers.clear();
    r.metadata.truncation = true;
    r.to_vec().ok()
}

impl FakeUpstream {
    /// Serves `ip`:53 (UDP and TCP) in namespace `netns`.
    pub fn start(netns: &str, ip: &str) -> FakeUpstream {
        let stop = Arc::new(AtomicBool::new(false));
        let (udp, tcp) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (ns, at, stop2, udp2) = (
            netns.to_string(),
            format!("{ip}:53"),
            stop.clone(),
            udp.clone(),
        );
        std::thread::spawn(move || {
            use std::os::fd::AsFd;
            let f = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
            nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let s = UdpSocket::bind(&at).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            ready_tx.send(()).unwrap();
            let mut buf = [0u8; 4096];
            while !stop2.load(Ordering::Relaxed) {
                let Ok((n, peer)) = s.recv_from(&mut buf) else {
                    continue;
                };
                udp2.fetch_add(1, Ordering::Relaxed);
                // The requester's EDNS size, else 512.
                let max = Message::from_vec(&buf[..n])
                    .ok()
                    .and_then(|m| m.edns.map(|e| e.max_payload() as usize))
                    .unwrap_or(512);
                if let Some(b) = answer(&buf[..n], max) {
                    let _ = s.send_to(&b, peer);
                }
            }
        });
        ready_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        let tcp2 = tcp.clone();
        let tcp_stop = super::registry::serve_in_netns(netns, &format!("{ip}:53"), move |mut c| {
            use std::io::{Read, Write};
            let _ = c.set_nonblocking(false);
            let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
            let mut l = [0u8; 2];
            while c.read_exact(&mut l).is_ok() {
                let mut buf = vec![0u8; u16::from_be_bytes(l) as usize];
                if c.read_exact(&mut buf).is_err() {
                    return;
                }
                tcp2.fetch_add(1, Ordering::Relaxed);
                let Some(b) = answer(&buf, 65535) else { return };
                let _ = c.write_all(&(b.len() as u16).to_be_bytes());
                let _ = c.write_all(&b);
            }
        });
        FakeUpstream {
            stop,
            tcp_stop,
            udp,
            tcp,
        }
    }

    pub fn asked(&self) -> usize {
        self.udp.load(Ordering::Relaxed) + self.tcp.load(Ordering::Relaxed)
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.tcp_stop.store(true, Ordering::Relaxed);
    }
}

/// Runs `dig` in a node's namespace: `dig @SERVER ARGS +short`-style output lines.
pub fn dig(netns: &str, args: &[&str]) -> String {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", netns, "dig", "+time=2", "+tries=1"])
        .args(args)
        .output()
        .expect("dig (bind9-dnsutils) runs");
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// The status (NOERROR, NXDOMAIN, …) dig reports.
pub fn status(dig_output: &str) -> String {
    dig_output
        .lines()
        .find_map(|l| l.split("status: ").nth(1))
        .and_then(|s| s.split(',').next())
        .unwrap_or("(no answer)")
        .to_string()
}
