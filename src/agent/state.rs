//! What the agent knows of each container of a pod (observed state), the restart back-off,
//! and the Pod status computed from them exactly as kubelet reports it. Pure data and functions.

use std::time::Duration;

use tokio::time::Instant;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
    ContainerStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

/// How a container instance ended or stands.
#[derive(Debug, Clone, PartialEq)]
pub enum InstState {
    Created,
    Running,
    Exited {
        code: i32,
        reason: String,
        message: Option<String>,
        finished_at: Timestamp,
    },
}

/// One container instance in containerd (one per restart).
#[derive(Debug, Clone, PartialEq)]
pub struct Instance {
    pub id: String,
    pub restart_count: i32,
    pub started_at: Option<Timestamp>,
    pub state: InstState,
    pub image_id: String,
}

impl Instance {
    pub fn is_running(&self) -> bool {
        matches!(self.state, InstState::Running | InstState::Created)
    }
    pub fn exit_code(&self) -> Option<i32> {
        match &self.state {
            InstState::Exited { code, .. } => Some(*code),
            _ => None,
        }
    }
    fn terminated(&self) -> Option<ContainerStateTerminated> {
        match &self.state {
            InstState::Exited {
                code,
                reason,
                message,
                finished_at,
            } => Some(ContainerStateTerminated {
                exit_code: *code,
                reason: Some(reason.clone()),
                message: message.clone(),
                started_at: self.started_at.map(Time),
                finished_at: Some(Time(*finished_at)),
                container_id: Some(format!("containerd://{}", self.id)),
                signal: None,
            }),
            _ => None,
        }
    }
}

/// kubelet's exit reason for an exit code.
pub fn exit_reason(code: i32, oom: bool) -> &'static str {
    if oom {
        "OOMKilled"
    } else if code == 0 {
        "Completed"
    } else {
        "Error"
    }
}

/// Restart back-off of one container, as client-go's flowcontrol.Backoff used by kubelet:
/// first restart immediate, then 10 s doubling to 300 s; reset after 2 × max of clean running.
#[derive(Debug, Clone, Default)]
pub struct Backoff {
    entry: Option<(Duration, Instant)>,
}

impl Backoff {
    pub const INITIAL: Duration = Duration::from_secs(10);
    pub const MAX: Duration = Duration::from_secs(300);

    /// If the container (which finished at `finished`) must still wait, the instant it may restart.
    pub fn wait_until(&self, finished: Instant, now: Instant) -> Option<Instant> {
        let (delay, last) = self.entry?;
        if finished.saturating_duration_since(last) > 2 * Self::MAX {
            return None;
        }
        let until = finished + delay;
        (now < until).then_some(until)
    }

    /// Records a restart at `now` and grows the delay.
    pub fn next(&mut self, now: Instant) {
        let delay = match self.entry {
            Some((d, last)) if now.saturating_duration_since(last) <= 2 * Self::MAX => {
                (d * 2).min(Self::MAX)
            }
            _ => Self::INITIAL,
        };
        self.entry = Some((delay, now));
    }

    /// The delay that applies to the next restart (for messages).
    pub fn current(&self) -> Duration {
        self.entry.map(|(d, _)| d).unwrap_or(Duration::ZERO)
    }
}

/// A container's image pull: waited for, just done, or failed and backing off (kubelet's
/// image back-off: 10 s doubling to 300 s).
#[derive(Debug, Clone, Default)]
pub struct PullState {
    /// Since when this container waits for a pull in flight.
    pub waiting_since: Option<Instant>,
    /// The image was pulled for the coming start (an `Always` start does not pull twice).
    pub fresh: bool,
    /// After a failed pull: the delay and the instant the next pull may begin.
    pub backoff: Option<(Duration, Instant)>,
    /// The last failure, in the registry's words.
    pub last_error: String,
}

impl PullState {
    /// Records a failed pull at `now`; the instant the next may begin.
    pub fn failed(&mut self, now: Instant, reason: String) -> Instant {
        let delay = self
            .backoff
            .map(|(d, _)| (d * 2).min(Backoff::MAX))
            .unwrap_or(Backoff::INITIAL);
        let until = now + delay;
        self.backoff = Some((delay, until));
        self.waiting_since = None;
        self.last_error = reason;
        until
    }

    /// A pull that succeeded: the back-off is forgotten.
    pub fn succeeded(&mut self) {
        self.waiting_since = None;
        self.fresh = true;
        self.backoff = None;
        self.last_error.clear();
    }

    /// While backing off, the instant the next pull may begin.
    pub fn backing_off(&self, now: Instant) -> Option<Instant> {
        self.backoff.map(|(_, u)| u).filter(|u| *u > now)
    }
}

/// Everything known about one named container of a pod.
#[derive(Debug, Clone, Default)]
pub struct ContainerRecord {
    pub current: Option<Instance>,
    pub previous: Option<Instance>,
    /// Why the container is not running (set while creating, backing off, or failing to start).
    pub waiting: Option<(String, String)>,
    /// Monotonic time of the current instance's exit (for back-off).
    pub exited_mono: Option<Instant>,
    pub backoff: Backoff,
    /// Earliest time to retry a start that failed before the container ran (image, config).
    pub retry_at: Option<Instant>,
    pub pull: PullState,
    pub started: bool,
    pub ready: bool,
    pub oom: bool,
}

impl ContainerRecord {
    /// Whether a start that failed before the container ran may be tried again now.
    pub fn may_start(&self) -> bool {
        self.retry_at.is_none_or(|t| t <= Instant::now())
    }

    pub fn restart_count(&self) -> i32 {
        self.current
            .as_ref()
            .or(self.previous.as_ref())
            .map(|i| i.restart_count)
            .unwrap_or(0)
    }

    /// The Kubernetes ContainerStatus of this container.
    pub fn status(&self, name: &str, image: &str, default_waiting: &str) -> ContainerStatus {
        let waiting = |reason: &str, message: Option<String>| ContainerState {
            waiting: Some(ContainerStateWaiting {
                reason: Some(reason.to_string()),
                message,
            }),
            ..Default::default()
        };
        let (state, last) = match (&self.current, &self.waiting) {
            (None, w) => (
                match w {
                    Some((r, m)) => waiting(r, Some(m.clone())),
                    None => waiting(default_waiting, None),
                },
                self.previous.as_ref().and_then(Instance::terminated),
            ),
            (Some(cur), Some((r, m))) if !cur.is_running() => {
                (waiting(r, Some(m.clone())), cur.terminated())
            }
            (Some(cur), _) => match cur.terminated() {
                Some(t) => (
                    ContainerState {
                        terminated: Some(t),
                        ..Default::default()
                    },
                    self.previous.as_ref().and_then(Instance::terminated),
                ),
                None => (
                    ContainerState {
                        running: Some(ContainerStateRunning {
                            started_at: cur.started_at.map(Time),
                        }),
                        ..Default::default()
                    },
                    self.previous.as_ref().and_then(Instance::terminated),
                ),
            },
        };
        let running = state.running.is_some();
        let shown = self.current.as_ref().or(self.previous.as_ref());
        ContainerStatus {
            name: name.to_string(),
            image: image.to_string(),
            image_id: shown.map(|i| i.image_id.clone()).unwrap_or_default(),
            container_id: shown.map(|i| format!("containerd://{}", i.id)),
            state: Some(state),
            last_state: Some(ContainerState {
                terminated: last,
                ..Default::default()
            }),
            ready: running && self.started && self.ready,
            started: Some(running && self.started),
            restart_count: self.restart_count(),
            ..Default::default()
        }
    }
}

/// kubelet's getPhase.
pub fn phase(
    init: &[ContainerStatus],
    containers: &[ContainerStatus],
    restart_policy: &str,
    all_init_done: bool,
) -> &'static str {
    let mut pending_init = false;
    for s in init {
        let st = s.state.as_ref();
        if let Some(t) = st.and_then(|s| s.terminated.as_ref()) {
            if t.exit_code != 0 && restart_policy == "Never" {
                return "Failed";
            }
            if t.exit_code != 0 {
                pending_init = true;
            }
        } else if st.and_then(|s| s.waiting.as_ref()).is_some() {
            let failed_before = s
                .last_state
                .as_ref()
                .and_then(|l| l.terminated.as_ref())
                .is_some_and(|t| t.exit_code != 0);
            if failed_before && restart_policy == "Never" {
                return "Failed";
            }
            pending_init = true;
        } else {
            pending_init = true;
        }
    }
    if pending_init || !all_init_done {
        return "Pending";
    }
    let (mut running, mut waiting, mut stopped, mut succeeded) = (0, 0, 0, 0);
    for s in containers {
        let st = s.state.as_ref();
        if st.and_then(|s| s.running.as_ref()).is_some() {
            running += 1;
        } else if let Some(t) = st.and_then(|s| s.terminated.as_ref()) {
            stopped += 1;
            if t.exit_code == 0 {
                succeeded += 1;
            }
        } else if s
            .last_state
            .as_ref()
            .and_then(|l| l.terminated.as_ref())
            .is_some()
        {
            stopped += 1;
        } else {
            waiting += 1;
        }
    }
    if waiting > 0 {
        return "Pending";
    }
    if running > 0 {
        return "Running";
    }
    if stopped > 0 && stopped == containers.len() {
        return match restart_policy {
            "Always" => "Running",
            "OnFailure" if succeeded == stopped => "Succeeded",
            "OnFailure" => "Running",
            _ if succeeded == stopped => "Succeeded",
            _ => "Failed",
        };
    }
    "Pending"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_restarts_at_once_then_waits_10_20_40_up_to_300_seconds() {
        let t0 = Instant::now();
        let mut b = Backoff::default();
        assert_eq!(b.wait_until(t0, t0), None, "first restart is immediate");
        b.next(t0);
        let mut expected = 10;
        let mut now = t0;
        for _ in 0..8 {
            let until = b.wait_until(now, now).expect("in back-off");
            assert_eq!(until - now, Duration::from_secs(expected));
            now = until;
            b.next(now);
            expected = (expected * 2).min(300);
        }
    }

    #[test]
    fn backoff_resets_after_ten_minutes_of_running() {
        let t0 = Instant::now();
        let mut b = Backoff::default();
        b.next(t0);
        b.next(t0 + Duration::from_secs(10));
        let later = t0 + Duration::from_secs(10 + 601);
        assert_eq!(b.wait_until(later, later), None);
        b.next(later);
        assert_eq!(b.current(), Backoff::INITIAL);
    }

    fn cs(state: ContainerState, last: Option<ContainerStateTerminated>) -> ContainerStatus {
        ContainerStatus {
            state: Some(state),
            last_state: Some(ContainerState {
                terminated: last,
                ..Default::default()
            }),
            ..Default::default()
        }
    }
    fn term(code: i32) -> ContainerStateTerminated {
        ContainerStateTerminated {
            exit_code: code,
            ..Default::default()
        }
    }
    fn terminated(code: i32) -> ContainerState {
        ContainerState {
            terminated: Some(term(code)),
            ..Default::default()
        }
    }
    fn running() -> ContainerState {
        ContainerState {
            running: Some(Default::default()),
            ..Default::default()
        }
    }
    fn waiting() -> ContainerState {
        ContainerState {
            waiting: Some(Default::default()),
            ..Default::default()
        }
    }

    #[test]
    fn phase_follows_kubelet() {
        assert_eq!(
            phase(&[], &[cs(running(), None)], "Always", true),
            "Running"
        );
        assert_eq!(
            phase(&[], &[cs(waiting(), None)], "Always", true),
            "Pending"
        );
        assert_eq!(
            phase(&[], &[cs(terminated(0), None)], "Never", true),
            "Succeeded"
        );
        assert_eq!(
            phase(&[], &[cs(terminated(1), None)], "Never", true),
            "Failed"
        );
        assert_eq!(
            phase(&[], &[cs(terminated(1), None)], "OnFailure", true),
            "Running"
        );
        assert_eq!(
            phase(&[], &[cs(terminated(0), None)], "OnFailure", true),
            "Succeeded"
        );
        assert_eq!(
            phase(&[], &[cs(waiting(), Some(term(1)))], "Always", true),
            "Running",
            "crash-looping container counts as stopped"
        );
        assert_eq!(
            phase(
                &[cs(terminated(1), None)],
                &[cs(waiting(), None)],
                "Never",
                false
            ),
            "Failed"
        );
        assert_eq!(
            phase(
                &[cs(running(), None)],
                &[cs(waiting(), None)],
                "Always",
                false
            ),
            "Pending"
        );
    }

    #[test]
    fn a_backing_off_container_shows_waiting_with_the_last_exit() {
        let rec = ContainerRecord {
            current: Some(Instance {
                id: "abc".into(),
                restart_count: 2,
                started_at: None,
                state: InstState::Exited {
                    code: 3,
                    reason: "Error".into(),
                    message: None,
                    finished_at: Timestamp::now(),
                },
                image_id: "i".into(),
            }),
            waiting: Some(("CrashLoopBackOff".into(), "back-off 20s".into())),
            ..Default::default()
        };
        let s = rec.status("c", "img", "ContainerCreating");
        let st = s.state.unwrap();
        assert_eq!(
            st.waiting.unwrap().reason.as_deref(),
            Some("CrashLoopBackOff")
        );
        assert_eq!(s.last_state.unwrap().terminated.unwrap().exit_code, 3);
        assert_eq!(s.restart_count, 2);
        assert!(!s.ready);
    }
}
