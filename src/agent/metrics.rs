//! The agent's own metrics (kubelet's names where kubelet has one), rendered in the Prometheus
//! text format by the kubelet API's `/metrics`: pod start latency and pod sync durations as
//! histograms, and probe results as counters. Process-wide: one agent per process.

use std::{collections::BTreeMap, sync::Mutex};

use crate::control::metrics::Histogram;

/// kubelet's buckets for pod start (seconds).
const START_BUCKETS: &[f64] = &[
    0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 20.0, 30.0, 45.0, 60.0,
];
/// Buckets for a pod worker's sync pass (seconds).
const SYNC_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

pub struct Metrics {
    /// From the agent seeing a pod to the pod running.
    pub pod_start: Histogram,
    /// One pod worker sync pass.
    pub pod_sync: Histogram,
    /// (probe type, result) → probes run.
    probes: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
}

impl Metrics {
    fn new() -> Self {
        Self {
            pod_start: Histogram::new(START_BUCKETS),
            pod_sync: Histogram::new(SYNC_BUCKETS),
            probes: Mutex::new(BTreeMap::new()),
        }
    }

    /// Counts one probe run of `kind` (Startup, Liveness, Readiness).
    pub fn probe(&self, kind: &'static str, ok: bool) {
        if let Ok(mut m) = self.probes.lock() {
            *m.entry((kind, if ok { "successful" } else { "failed" }))
                .or_default() += 1;
        }
    }

    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        self.pod_start.render(
            "kubelet_pod_start_duration_seconds",
            "Duration in seconds from the agent seeing a pod to the pod running.",
            &mut out,
        );
        self.pod_sync.render(
            "kubelet_pod_worker_duration_seconds",
            "Duration in seconds of one pod worker sync pass.",
            &mut out,
        );
        let _ = writeln!(
            out,
            "# HELP prober_probe_total Cumulative number of probes by type and result.\n# TYPE prober_probe_total counter"
        );
        if let Ok(m) = self.probes.lock() {
            for ((kind, result), n) in m.iter() {
                let _ = writeln!(
                    out,
                    "prober_probe_total{{probe_type=\"{kind}\",result=\"{result}\"}} {n}"
                );
            }
        }
        out
    }
}

/// The process's metrics.
pub fn get() -> &'static Metrics {
    static M: std::sync::OnceLock<Metrics> = std::sync::OnceLock::new();
    M.get_or_init(Metrics::new)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn histograms_are_cumulative_and_render_prometheus_text() {
        let m = Metrics::new();
        m.pod_start.observe(Duration::from_millis(700));
        m.pod_start.observe(Duration::from_millis(2500));
        m.probe("Readiness", true);
        m.probe("Readiness", true);
        m.probe("Liveness", false);
        let t = m.render();
        assert!(t.contains("kubelet_pod_start_duration_seconds_bucket{le=\"0.5\"} 0"));
        assert!(t.contains("kubelet_pod_start_duration_seconds_bucket{le=\"1\"} 1"));
        assert!(t.contains("kubelet_pod_start_duration_seconds_bucket{le=\"3\"} 2"));
        assert!(t.contains("kubelet_pod_start_duration_seconds_bucket{le=\"+Inf\"} 2"));
        assert!(t.contains("kubelet_pod_start_duration_seconds_sum 3.2"));
        assert!(t.contains("kubelet_pod_start_duration_seconds_count 2"));
        assert!(t.contains("prober_probe_total{probe_type=\"Readiness\",result=\"successful\"} 2"));
        assert!(t.contains("prober_probe_total{probe_type=\"Liveness\",result=\"failed\"} 1"));
        assert!(t.contains("# TYPE kubelet_pod_worker_duration_seconds histogram"));
    }
}
