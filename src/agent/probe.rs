//! Container probes (exec, httpGet, tcpSocket) and the per-container probe supervisor:
//! startup first, then liveness and readiness, with kubelet's defaults and thresholds.
//! Sends results to the pod worker; never changes containers itself.

use std::{collections::HashMap, net::Ipv4Addr, path::PathBuf, sync::Arc, time::Duration};

use k8s_openapi::{api::core::v1::Probe, apimachinery::pkg::util::intstr::IntOrString};
use tokio::{io::AsyncReadExt, io::AsyncWriteExt, net::TcpStream, sync::mpsc};

use crate::runtime::spec::ProcessConfig;

/// Which probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeKind {
    Startup,
    Liveness,
    Readiness,
}

impl ProbeKind {
    pub fn label(self) -> &'static str {
        match self {
            ProbeKind::Startup => "Startup",
            ProbeKind::Liveness => "Liveness",
            ProbeKind::Readiness => "Readiness",
        }
    }
}

/// What a probe supervisor reports to its pod worker.
#[derive(Debug, Clone, PartialEq)]
pub enum ProbeEvent {
    /// The startup probe succeeded (or there is none): liveness and readiness may run.
    Started,
    /// Readiness changed.
    Ready(bool),
    /// A probe failed once (for the `Unhealthy` event).
    Unhealthy { kind: ProbeKind, output: String },
    /// Liveness or startup failed `failureThreshold` times: the container must be restarted.
    Failed { kind: ProbeKind },
}

/// Everything a probe of one container instance needs.
pub struct ProbeTarget {
    pub rt: std::sync::Arc<dyn crate::runtime::Runtime>,
    pub container_id: String,
    pub pod_ip: Option<Ipv4Addr>,
    pub process: ProcessConfig,
    pub scratch: PathBuf,
    pub named_ports: HashMap<String, i32>,
}

/// Why a probe (or a hook run as one) did not succeed, in kubelet's words. Both count as a
/// failure toward the threshold.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProbeFailure {
    /// The handler answered no: the command's output, the HTTP status, the refused dial.
    #[error("{0}")]
    Unhealthy(String),
    /// The probe could not run: a port that does not resolve, no pod IP, an unsupported
    /// scheme, a runtime error.
    #[error("{0}")]
    Error(String),
}

fn unhealthy(s: impl Into<String>) -> ProbeFailure {
    ProbeFailure::Unhealthy(s.into())
}

fn cannot(s: impl Into<String>) -> ProbeFailure {
    ProbeFailure::Error(s.into())
}

/// Runs a probe once: Ok(output) on success. `ProbeTarget` probes a container for real; the
/// supervisor's tests script the answers.
pub trait Prober: Send + Sync + 'static {
    fn run(
        &self,
        p: &Probe,
        timeout: Duration,
    ) -> impl Future<Output = Result<String, ProbeFailure>> + Send;
}

impl Prober for ProbeTarget {
    fn run(
        &self,
        p: &Probe,
        timeout: Duration,
    ) -> impl Future<Output = Result<String, ProbeFailure>> + Send {
        probe_once(p, self, timeout)
    }
}

/// kubelet's probe defaults applied to a probe.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timing {
    pub initial_delay: Duration,
    pub timeout: Duration,
    pub period: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

pub fn timing(p: &Probe) -> Timing {
    let secs = |v: Option<i32>, d: i32| Duration::from_secs(v.unwrap_or(d).max(0) as u64);
    Timing {
        initial_delay: secs(p.initial_delay_seconds, 0),
        timeout: secs(p.timeout_seconds, 1).max(Duration::from_secs(1)),
        period: secs(p.period_seconds, 10).max(Duration::from_secs(1)),
        success_threshold: p.success_threshold.unwrap_or(1).max(1) as u32,
        failure_threshold: p.failure_threshold.unwrap_or(3).max(1) as u32,
    }
}

fn resolve_port(port: &IntOrString, named: &HashMap<String, i32>) -> Result<u16, ProbeFailure> {
    match port {
        IntOrString::Int(n) => u16::try_from(*n).map_err(|_| cannot(format!("invalid port {n}"))),
        IntOrString::String(s) => match s.parse::<u16>() {
            Ok(n) => Ok(n),
            Err(_) => named
                .get(s)
                .and_then(|n| u16::try_from(*n).ok())
                .ok_or_else(|| {
                    cannot(format!("couldn't find port {s:?} in the container's ports"))
                }),
        },
    }
}

/// Runs one probe once: Ok(output) on success.
pub async fn probe_once(
    p: &Probe,
    t: &ProbeTarget,
    timeout: Duration,
) -> Result<String, ProbeFailure> {
    if let Some(e) = &p.exec {
        let mut proc = t.process.clone();
        proc.args = e.command.clone().unwrap_or_default();
        proc.terminal = false;
        let spec = crate::runtime::spec::process(&proc).map_err(|e| cannot(e.to_string()))?;
        let r =
            t.rt.exec(&t.container_id, &spec, &t.scratch, timeout, 10 * 1024)
                .await
                .map_err(|e| cannot(e.to_string()))?;
        let out = String::from_utf8_lossy(&r.output).to_string();
        if r.timed_out {
            return Err(unhealthy(format!(
                "command {:?} timed out",
                proc.args.join(" ")
            )));
        }
        return match r.exit_code {
            Some(0) => Ok(out),
            _ => Err(unhealthy(out)),
        };
    }
    if let Some(h) = &p.http_get {
        let port = resolve_port(&h.port, &t.named_ports)?;
        let host = match &h.host {
            Some(h) if !h.is_empty() => h.clone(),
            _ => t
                .pod_ip
                .map(|i| i.to_string())
                .ok_or_else(|| cannot("pod has no IP"))?,
        };
        if h.scheme.as_deref() == Some("HTTPS") {
            return Err(cannot("HTTPS probes are not supported by keelson yet"));
        }
        let path = h.path.clone().unwrap_or_else(|| "/".into());
        let path = if path.starts_with('/') {
            path
        } else {
            format!("/{path}")
        };
        let headers: Vec<(String, String)> = h
            .http_headers
            .iter()
            .flatten()
            .map(|h| (h.name.clone(), h.value.clone()))
            .collect();
        return tokio::time::timeout(timeout, http_get(&host, port, &path, &headers))
            .await
            .unwrap_or_else(|_| {
                Err(unhealthy(format!(
                    "Get \"http://{host}:{port}{path}\": context deadline exceeded (Client.Timeout exceeded while awaiting headers)"
                )))
            });
    }
    if let Some(s) = &p.tcp_socket {
        let port = resolve_port(&s.port, &t.named_ports)?;
        let host = match &s.host {
            Some(h) if !h.is_empty() => h.clone(),
            _ => t
                .pod_ip
                .map(|i| i.to_string())
                .ok_or_else(|| cannot("pod has no IP"))?,
        };
        return match tokio::time::timeout(timeout, TcpStream::connect((host.as_str(), port))).await
        {
            Ok(Ok(_)) => Ok(String::new()),
            Ok(Err(e)) => Err(unhealthy(format!("dial tcp {host}:{port}: connect: {e}"))),
            Err(_) => Err(unhealthy(format!("dial tcp {host}:{port}: i/o timeout"))),
        };
    }
    Err(cannot("probe has no handler"))
}

/// A minimal HTTP/1.1 GET: success for status 200–399. Reads at most 10 KiB of the body.
async fn http_get(
    host: &str,
    port: u16,
    path: &str,
    headers: &[(String, String)],
) -> Result<String, ProbeFailure> {
    let url = format!("http://{host}:{port}{path}");
    let mut s = TcpStream::connect((host, port)).await.map_err(|e| {
        unhealthy(format!(
            "Get \"{url}\": dial tcp {host}:{port}: connect: {e}"
        ))
    })?;
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n");
    let mut has_ua = false;
    let mut has_accept = false;
    for (k, v) in headers {
        has_ua |= k.eq_ignore_ascii_case("user-agent");
        has_accept |= k.eq_ignore_ascii_case("accept");
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !has_ua {
        req.push_str("User-Agent: kube-probe/1.33\r\n");
    }
    if !has_accept {
        req.push_str("Accept: */*\r\n");
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| unhealthy(format!("Get \"{url}\": {e}")))?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    while buf.len() < 10 * 1024 + 4096 {
        match s.read(&mut chunk).await {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if buf.is_empty() => return Err(unhealthy(format!("Get \"{url}\": {e}"))),
            Err(_) => break,
        }
    }
    let text = String::from_utf8_lossy(&buf);
    let status_line = text.lines().next().unwrap_or("");
    let code: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| {
            unhealthy(format!(
                "Get \"{url}\": malformed HTTP response {status_line:?}"
            ))
        })?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    let body: String = body.chars().take(10 * 1024).collect();
    if (200..400).contains(&code) {
        Ok(body)
    } else {
        Err(unhealthy(format!(
            "HTTP probe failed with statuscode: {code}"
        )))
    }
}

/// Runs a probe until it reaches success or failure threshold; for the startup probe.
async fn until_threshold<P: Prober>(
    kind: ProbeKind,
    p: &Probe,
    t: &P,
    started: tokio::time::Instant,
    tx: &mpsc::UnboundedSender<ProbeEvent>,
) -> bool {
    let tm = timing(p);
    tokio::time::sleep_until(started + tm.initial_delay).await;
    let (mut ok, mut bad) = (0, 0);
    let mut tick = tokio::time::interval(tm.period);
    loop {
        tick.tick().await;
        // Boxed: the probe (an HTTP exchange, an exec) lives only while it runs, not in
        // the supervisor's resting task.
        let r = Box::pin(t.run(p, tm.timeout)).await;
        super::metrics::get().probe(kind.label(), r.is_ok());
        match r {
            Ok(_) => {
                bad = 0;
                ok += 1;
                if ok >= tm.success_threshold {
                    return true;
                }
            }
            Err(output) => {
                ok = 0;
                bad += 1;
                let _ = tx.send(ProbeEvent::Unhealthy {
                    kind,
                    output: output.to_string(),
                });
                if bad >= tm.failure_threshold {
                    return false;
                }
            }
        }
    }
}

/// Liveness / readiness loop: reports readiness changes and liveness failure.
async fn periodic<P: Prober>(
    kind: ProbeKind,
    p: Probe,
    t: Arc<P>,
    started: tokio::time::Instant,
    tx: mpsc::UnboundedSender<ProbeEvent>,
) {
    let tm = timing(&p);
    tokio::time::sleep_until(started + tm.initial_delay).await;
    let (mut ok, mut bad) = (0u32, 0u32);
    let mut ready = false;
    let mut tick = tokio::time::interval(tm.period);
    loop {
        tick.tick().await;
        let r = Box::pin(t.run(&p, tm.timeout)).await;
        super::metrics::get().probe(kind.label(), r.is_ok());
        match r {
            Ok(_) => {
                bad = 0;
                ok = ok.saturating_add(1);
                if kind == ProbeKind::Readiness && !ready && ok >= tm.success_threshold {
                    ready = true;
                    let _ = tx.send(ProbeEvent::Ready(true));
                }
            }
            Err(output) => {
                ok = 0;
                bad = bad.saturating_add(1);
                let _ = tx.send(ProbeEvent::Unhealthy {
                    kind,
                    output: output.to_string(),
                });
                if bad >= tm.failure_threshold {
                    if kind == ProbeKind::Liveness {
                        let _ = tx.send(ProbeEvent::Failed { kind });
                        return;
                    }
                    if ready {
                        ready = false;
                        let _ = tx.send(ProbeEvent::Ready(false));
                    }
                }
            }
        }
        if tx.is_closed() {
            return;
        }
    }
}

/// Supervises all probes of one container instance started at `started`.
pub async fn supervise<P: Prober>(
    startup: Option<Probe>,
    liveness: Option<Probe>,
    readiness: Option<Probe>,
    t: Arc<P>,
    started: tokio::time::Instant,
    tx: mpsc::UnboundedSender<ProbeEvent>,
) {
    if let Some(sp) = &startup
        && !until_threshold(ProbeKind::Startup, sp, &*t, started, &tx).await
    {
        let _ = tx.send(ProbeEvent::Failed {
            kind: ProbeKind::Startup,
        });
        return;
    }
    let _ = tx.send(ProbeEvent::Started);
    if readiness.is_none() {
        let _ = tx.send(ProbeEvent::Ready(true));
    }
    // Liveness and readiness count from when the container started, as kubelet does.
    let live = liveness.map(|p| periodic(ProbeKind::Liveness, p, t.clone(), started, tx.clone()));
    let ready =
        readiness.map(|p| periodic(ProbeKind::Readiness, p, t.clone(), started, tx.clone()));
    match (live, ready) {
        (Some(a), Some(b)) => {
            tokio::select! { _ = a => {}, _ = b => {} }
        }
        (Some(a), None) => a.await,
        (None, Some(b)) => b.await,
        (None, None) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_defaults_are_kubelets() {
        let t = timing(&Probe::default());
        assert_eq!(t.timeout, Duration::from_secs(1));
        assert_eq!(t.period, Duration::from_secs(10));
        assert_eq!((t.success_threshold, t.failure_threshold), (1, 3));
    }

    #[test]
    fn named_ports_resolve_through_the_container_ports() {
        let named: HashMap<String, i32> = [("http".to_string(), 8080)].into();
        assert_eq!(
            resolve_port(&IntOrString::String("http".into()), &named),
            Ok(8080)
        );
        assert_eq!(resolve_port(&IntOrString::Int(81), &named), Ok(81));
        assert!(resolve_port(&IntOrString::String("nope".into()), &named).is_err());
    }

    /// A prober answering from a script per probe (named by its exec command), the last
    /// answer repeating; it records when each probe ran.
    #[derive(Default)]
    struct Script {
        answers: std::sync::Mutex<HashMap<String, std::collections::VecDeque<bool>>>,
        calls: std::sync::Mutex<Vec<(String, tokio::time::Instant)>>,
    }

    impl Script {
        fn new(answers: &[(&str, &[bool])]) -> Arc<Self> {
            let s = Script::default();
            for (name, a) in answers {
                s.answers
                    .lock()
                    .unwrap()
                    .insert(name.to_string(), a.iter().copied().collect());
            }
            Arc::new(s)
        }

        fn calls(&self, name: &str) -> Vec<tokio::time::Instant> {
            let calls = self.calls.lock().unwrap();
            calls.iter().filter(|c| c.0 == name).map(|c| c.1).collect()
        }
    }

    impl Prober for Script {
        async fn run(&self, p: &Probe, _timeout: Duration) -> Result<String, ProbeFailure> {
            let name = p
                .exec
                .as_ref()
                .and_then(|e| e.command.as_ref())
                .and_then(|c| c.first())
                .cloned()
                .unwrap_or_default();
            self.calls
                .lock()
                .unwrap()
                .push((name.clone(), tokio::time::Instant::now()));
            let mut answers = self.answers.lock().unwrap();
            let q = answers.entry(name.clone()).or_default();
            let ok = if q.len() > 1 {
                q.pop_front()
            } else {
                q.front().copied()
            };
            if ok.unwrap_or(true) {
                Ok(String::new())
            } else {
                Err(ProbeFailure::Unhealthy(format!("{name} failed")))
            }
        }
    }

    /// A probe named `name`: every `period` s, `success`/`failure` thresholds, `delay` s first.
    fn scripted(name: &str, period: i32, success: i32, failure: i32, delay: i32) -> Probe {
        Probe {
            exec: Some(k8s_openapi::api::core::v1::ExecAction {
                command: Some(vec![name.into()]),
            }),
            period_seconds: Some(period),
            success_threshold: Some(success),
            failure_threshold: Some(failure),
            initial_delay_seconds: Some(delay),
            ..Default::default()
        }
    }

    /// Runs the supervisor on `script` and collects its first `n` events with their times.
    async fn events(
        probes: [Option<Probe>; 3],
        script: &Arc<Script>,
        n: usize,
    ) -> (tokio::time::Instant, Vec<(Duration, ProbeEvent)>) {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let t0 = tokio::time::Instant::now();
        let [s, l, r] = probes;
        let task = tokio::spawn(supervise(s, l, r, script.clone(), t0, tx));
        let mut got = vec![];
        while got.len() < n {
            let ev = tokio::time::timeout(Duration::from_secs(3600), rx.recv())
                .await
                .expect("the supervisor reports within an hour")
                .expect("the supervisor is still running");
            got.push((t0.elapsed(), ev));
        }
        task.abort();
        (t0, got)
    }

    fn unhealthy(kind: ProbeKind) -> ProbeEvent {
        ProbeEvent::Unhealthy {
            kind,
            output: format!(
                "{} failed",
                match kind {
                    ProbeKind::Startup => "startup",
                    ProbeKind::Liveness => "live",
                    ProbeKind::Readiness => "ready",
                }
            ),
        }
    }

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[tokio::test(start_paused = true)]
    async fn the_startup_probe_gates_liveness_and_readiness() {
        let script = Script::new(&[("startup", &[false, false, true])]);
        let probes = [
            Some(scripted("startup", 1, 1, 5, 0)),
            Some(scripted("live", 10, 1, 3, 0)),
            Some(scripted("ready", 10, 1, 3, 0)),
        ];
        let (t0, got) = events(probes, &script, 4).await;
        assert_eq!(
            got,
            vec![
                (S(0), unhealthy(ProbeKind::Startup)),
                (S(1), unhealthy(ProbeKind::Startup)),
                (S(2), ProbeEvent::Started),
                (S(2), ProbeEvent::Ready(true)),
            ]
        );
        // Neither liveness nor readiness ran before the startup probe succeeded.
        let started = t0 + S(2);
        for p in ["live", "ready"] {
            let calls = script.calls(p);
            assert!(!calls.is_empty(), "{p} runs once started");
            assert!(calls.iter().all(|t| *t >= started), "{p} ran before start");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_startup_probe_failing_its_threshold_fails_the_container_alone() {
        let script = Script::new(&[("startup", &[false])]);
        let probes = [
            Some(scripted("startup", 2, 1, 3, 0)),
            Some(scripted("live", 1, 1, 1, 0)),
            Some(scripted("ready", 1, 1, 1, 0)),
        ];
        let (_, got) = events(probes, &script, 4).await;
        let failed = ProbeEvent::Failed {
            kind: ProbeKind::Startup,
        };
        assert_eq!(
            got,
            vec![
                (S(0), unhealthy(ProbeKind::Startup)),
                (S(2), unhealthy(ProbeKind::Startup)),
                (S(4), unhealthy(ProbeKind::Startup)),
                (S(4), failed),
            ]
        );
        assert!(script.calls("live").is_empty() && script.calls("ready").is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn without_probes_a_container_is_started_and_ready_at_once() {
        let script = Script::new(&[]);
        let (_, got) = events([None, None, None], &script, 2).await;
        assert_eq!(
            got,
            vec![(S(0), ProbeEvent::Started), (S(0), ProbeEvent::Ready(true))]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn liveness_fails_only_after_failure_threshold_failures_in_a_row() {
        // A success between failures starts the count over.
        let script = Script::new(&[("live", &[false, false, true, false, false, false])]);
        let probes = [None, Some(scripted("live", 3, 1, 3, 0)), None];
        let (_, got) = events(probes, &script, 8).await;
        let u = || unhealthy(ProbeKind::Liveness);
        let failed = ProbeEvent::Failed {
            kind: ProbeKind::Liveness,
        };
        assert_eq!(
            got,
            vec![
                (S(0), ProbeEvent::Started),
                (S(0), ProbeEvent::Ready(true)),
                (S(0), u()),
                (S(3), u()),
                (S(9), u()),
                (S(12), u()),
                (S(15), u()),
                (S(15), failed),
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn readiness_waits_its_initial_delay_and_success_threshold_and_drops_on_failures() {
        let script = Script::new(&[("ready", &[true, true, false, false, true, true])]);
        let probes = [None, None, Some(scripted("ready", 2, 2, 2, 5))];
        let (t0, got) = events(probes, &script, 5).await;
        let u = || unhealthy(ProbeKind::Readiness);
        assert_eq!(
            got,
            vec![
                (S(0), ProbeEvent::Started),
                (S(7), ProbeEvent::Ready(true)),
                (S(9), u()),
                (S(11), u()),
                (S(11), ProbeEvent::Ready(false)),
            ]
        );
        assert_eq!(script.calls("ready")[0], t0 + S(5), "the initial delay");
    }

    #[tokio::test]
    async fn http_probe_reports_the_status_code_on_failure() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            for code in [200, 500] {
                let (mut s, _) = l.accept().await.unwrap();
                let mut b = [0u8; 1024];
                let _ = s.read(&mut b).await;
                let resp = format!("HTTP/1.1 {code} X\r\nContent-Length: 2\r\n\r\nok");
                s.write_all(resp.as_bytes()).await.unwrap();
            }
        });
        assert_eq!(http_get("127.0.0.1", port, "/", &[]).await, Ok("ok".into()));
        assert_eq!(
            http_get("127.0.0.1", port, "/", &[]).await,
            Err(ProbeFailure::Unhealthy(
                "HTTP probe failed with statuscode: 500".into()
            ))
        );
    }
}
