//! The pod worker's lifecycle as data and pure decisions: one state per pod (`PodState`) with
//! its transitions, and `plan`, which reads that state and the containers' records at an
//! instant and says what the worker must do next. The worker (`sync`) carries the steps out
//! against containerd and the pod network and reports back through the transitions; nothing
//! here does I/O or reads the clock, so every rule is unit-tested below.
//!
//! The rules are kubelet's SyncPod: a sandbox first (re-created with back-off when that fails,
//! replaced when its task dies); init containers one at a time, in order, each to exit 0; then
//! every app container, restarted per the pod's restartPolicy with the crash-loop back-off;
//! once the pod is Succeeded or Failed nothing starts again and the sandbox goes when nothing
//! runs in it.

use std::time::Duration;

use tokio::time::Instant;

use super::{Kind, Sandbox};
use crate::agent::state::ContainerRecord;

/// Where a pod stands. The only place the sandbox lives.
#[derive(Debug)]
pub(super) enum PodState {
    /// No sandbox: one is to be created, not before `retry_at`; `failures` in a row so far,
    /// the last one's message shown in the containers' waiting state.
    Creating {
        failures: u32,
        retry_at: Option<Instant>,
        error: Option<String>,
    },
    /// The sandbox runs; containers are started and restarted in it.
    Running(Sandbox),
    /// The sandbox's task is gone: what ran in it is stopped, it is removed, and a new one made.
    SandboxLost(Sandbox),
    /// Succeeded or Failed: nothing starts again; the sandbox (while it is still there) goes
    /// once no container runs.
    Finished(Option<Sandbox>),
}

impl Default for PodState {
    fn default() -> Self {
        PodState::Creating {
            failures: 0,
            retry_at: None,
            error: None,
        }
    }
}

/// The sandbox re-creation back-off: 2, 4, 8 … 64 s after consecutive failures, at most 60 s.
pub(super) fn sandbox_backoff(failures: u32) -> Duration {
    Duration::from_secs(1 << failures.clamp(1, 6)).min(Duration::from_secs(60))
}

impl PodState {
    pub fn sandbox(&self) -> Option<&Sandbox> {
        match self {
            PodState::Running(s) | PodState::SandboxLost(s) | PodState::Finished(Some(s)) => {
                Some(s)
            }
            _ => None,
        }
    }

    /// Why the sandbox could not be made, while it is being retried.
    pub fn error(&self) -> Option<&str> {
        match self {
            PodState::Creating { error, .. } => error.as_deref(),
            _ => None,
        }
    }

    pub fn is_finished(&self) -> bool {
        matches!(self, PodState::Finished(_))
    }

    pub fn is_running(&self) -> bool {
        matches!(self, PodState::Running(_))
    }

    /// The sandbox was made (or found running on adoption).
    pub fn created(&mut self, sb: Sandbox) {
        *self = match std::mem::take(self) {
            PodState::Finished(_) => PodState::Finished(Some(sb)),
            _ => PodState::Running(sb),
        };
    }

    /// Making the sandbox failed at `now`: retry after the back-off.
    pub fn create_failed(&mut self, error: String, now: Instant) -> Duration {
        let failures = match self {
            PodState::Creating { failures, .. } => failures.saturating_add(1),
            _ => 1,
        };
        let delay = sandbox_backoff(failures);
        *self = PodState::Creating {
            failures,
            retry_at: Some(now + delay),
            error: Some(error),
        };
        delay
    }

    /// Task `id` exited: when it is the running sandbox's, the sandbox is lost. Whether it was.
    pub fn task_exited(&mut self, id: &str) -> bool {
        match std::mem::take(self) {
            PodState::Running(s) if s.id == id => {
                *self = PodState::SandboxLost(s);
                true
            }
            other => {
                let was = other.sandbox().is_some_and(|s| s.id == id);
                *self = other;
                was
            }
        }
    }

    /// Takes the sandbox out to tear it down; a lost one leaves the pod to be re-created.
    pub fn take_sandbox(&mut self) -> Option<Sandbox> {
        match std::mem::take(self) {
            PodState::Running(s) | PodState::SandboxLost(s) => Some(s),
            PodState::Finished(s) => {
                *self = PodState::Finished(None);
                s
            }
            creating => {
                *self = creating;
                None
            }
        }
    }

    /// The pod reached Succeeded or Failed.
    pub fn finish(&mut self) {
        let sb = self.take_sandbox();
        *self = PodState::Finished(sb);
    }
}

/// The pod's restartPolicy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RestartPolicy {
    Always,
    OnFailure,
    Never,
}

impl RestartPolicy {
    pub fn of(spec: &k8s_openapi::api::core::v1::PodSpec) -> Self {
        match spec.restart_policy.as_deref() {
            Some("OnFailure") => RestartPolicy::OnFailure,
            Some("Never") => RestartPolicy::Never,
            _ => RestartPolicy::Always,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RestartPolicy::Always => "Always",
            RestartPolicy::OnFailure => "OnFailure",
            RestartPolicy::Never => "Never",
        }
    }

    /// Whether an app container that exited with `code` runs again.
    fn restarts_app(self, code: Option<i32>) -> bool {
        match self {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => code != Some(0),
            RestartPolicy::Never => false,
        }
    }

    /// Whether a failed init container runs again (everything but Never).
    fn restarts_init(self) -> bool {
        self != RestartPolicy::Never
    }
}

/// What to do with one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum ContainerStep {
    /// Start its first instance.
    Start(Kind, usize),
    /// Start a new instance after an exit (the back-off has passed).
    Restart(Kind, usize),
    /// Exited, to be restarted, but the crash-loop back-off holds it until `until`.
    BackOff(Kind, usize, Instant),
}

/// The worker's next step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Step {
    /// Nothing to do now; look again at `Some(instant)` (or on the next event).
    Wait(Option<Instant>),
    CreateSandbox,
    /// Stop everything in the lost sandbox and remove it (then plan again).
    ReplaceSandbox,
    /// The pod is finished and nothing runs: remove the sandbox.
    TearDown,
    /// Container steps, in order; then wait, looking again at `Some(instant)` at the latest.
    Containers(Vec<ContainerStep>, Option<Instant>),
}

/// The next step for a pod in `state` whose init and app containers stand as `init`/`app`.
pub(super) fn plan(
    state: &PodState,
    policy: RestartPolicy,
    init: &[ContainerRecord],
    app: &[ContainerRecord],
    now: Instant,
) -> Step {
    match state {
        PodState::Finished(sb) => {
            let running = init.iter().chain(app).any(runs);
            if sb.is_some() && !running {
                Step::TearDown
            } else {
                Step::Wait(None)
            }
        }
        PodState::SandboxLost(_) => Step::ReplaceSandbox,
        PodState::Creating {
            retry_at: Some(at), ..
        } if *at > now => Step::Wait(Some(*at)),
        PodState::Creating { .. } => Step::CreateSandbox,
        PodState::Running(_) => {
            let (steps, wake) = containers(policy, init, app, now);
            Step::Containers(steps, wake)
        }
    }
}

fn runs(r: &ContainerRecord) -> bool {
    r.current.as_ref().is_some_and(|c| c.is_running())
}

/// The steps for containers in a running sandbox, and when to look again.
fn containers(
    policy: RestartPolicy,
    init: &[ContainerRecord],
    app: &[ContainerRecord],
    now: Instant,
) -> (Vec<ContainerStep>, Option<Instant>) {
    let mut steps = vec![];
    let mut wake: Option<Instant> = None;
    let mut later = |t: Instant| wake = Some(wake.map_or(t, |w| w.min(t)));
    // Init containers, one at a time, in order: the first one not done decides.
    for (i, rec) in init.iter().enumerate() {
        match rec
            .current
            .as_ref()
            .map(|c| (c.is_running(), c.exit_code()))
        {
            Some((false, Some(0))) => continue,
            None => match rec.retry_at.filter(|t| *t > now) {
                Some(t) => later(t),
                None => steps.push(ContainerStep::Start(Kind::Init, i)),
            },
            Some((true, _)) => {}
            Some((false, _)) if policy.restarts_init() => {
                steps.push(restart(rec, Kind::Init, i, now));
            }
            Some((false, _)) => {}
        }
        if let Some(ContainerStep::BackOff(_, _, t)) = steps.last() {
            later(*t);
        }
        return (steps, wake);
    }
    for (i, rec) in app.iter().enumerate() {
        match rec
            .current
            .as_ref()
            .map(|c| (c.is_running(), c.exit_code()))
        {
            None => match rec.retry_at.filter(|t| *t > now) {
                Some(t) => later(t),
                None => steps.push(ContainerStep::Start(Kind::App, i)),
            },
            Some((true, _)) => {}
            Some((false, code)) if policy.restarts_app(code) => {
                let s = restart(rec, Kind::App, i, now);
                if let ContainerStep::BackOff(_, _, t) = s {
                    later(t);
                }
                steps.push(s);
            }
            Some((false, _)) => {}
        }
    }
    (steps, wake)
}

/// Restart now, or back off until the delay since the exit has passed.
fn restart(rec: &ContainerRecord, kind: Kind, i: usize, now: Instant) -> ContainerStep {
    let finished = rec.exited_mono.unwrap_or(now);
    match rec.backoff.wait_until(finished, now) {
        Some(until) => ContainerStep::BackOff(kind, i, until),
        None => ContainerStep::Restart(kind, i),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::state::{Backoff, InstState, Instance};
    use jiff::Timestamp;

    fn sandbox(id: &str) -> Sandbox {
        Sandbox {
            id: id.into(),
            pid: 1,
            ip: None,
        }
    }

    fn running() -> ContainerRecord {
        ContainerRecord {
            current: Some(Instance {
                id: "c".into(),
                restart_count: 0,
                started_at: None,
                state: InstState::Running,
                image_id: String::new(),
            }),
            ..Default::default()
        }
    }

    fn exited(code: i32, at: Instant) -> ContainerRecord {
        let mut r = running();
        if let Some(c) = r.current.as_mut() {
            c.state = InstState::Exited {
                code,
                reason: String::new(),
                message: None,
                finished_at: Timestamp::UNIX_EPOCH,
            };
        }
        r.exited_mono = Some(at);
        r
    }

    fn up() -> PodState {
        PodState::Running(sandbox("sb"))
    }

    fn steps(s: Step) -> Vec<ContainerStep> {
        match s {
            Step::Containers(v, _) => v,
            other => panic!("expected container steps, got {other:?}"),
        }
    }

    use ContainerStep::*;
    use Kind::{App, Init};
    use RestartPolicy::*;

    #[test]
    fn a_new_pod_creates_its_sandbox_before_any_container() {
        let now = Instant::now();
        let s = plan(
            &PodState::default(),
            Always,
            &[],
            &[ContainerRecord::default()],
            now,
        );
        assert_eq!(s, Step::CreateSandbox);
    }

    #[test]
    fn init_containers_run_one_at_a_time_in_order_before_the_app() {
        let now = Instant::now();
        let none = ContainerRecord::default;
        // Nothing ran: only the first init container starts.
        assert_eq!(
            steps(plan(&up(), Always, &[none(), none()], &[none()], now)),
            vec![Start(Init, 0)]
        );
        // The first runs: nothing else starts.
        assert!(steps(plan(&up(), Always, &[running(), none()], &[none()], now)).is_empty());
        // The first exited 0: the second starts, still not the app.
        assert_eq!(
            steps(plan(
                &up(),
                Always,
                &[exited(0, now), none()],
                &[none()],
                now
            )),
            vec![Start(Init, 1)]
        );
        // Both done: every app container starts at once.
        assert_eq!(
            steps(plan(
                &up(),
                Always,
                &[exited(0, now), exited(0, now)],
                &[none(), none()],
                now
            )),
            vec![Start(App, 0), Start(App, 1)]
        );
    }

    #[test]
    fn a_failed_init_container_is_retried_unless_the_policy_is_never() {
        let now = Instant::now();
        let init = [exited(1, now), ContainerRecord::default()];
        let app = [ContainerRecord::default()];
        assert_eq!(
            steps(plan(&up(), OnFailure, &init, &app, now)),
            vec![Restart(Init, 0)]
        );
        assert_eq!(
            steps(plan(&up(), Always, &init, &app, now)),
            vec![Restart(Init, 0)]
        );
        // Never: it stays failed and nothing after it starts (the pod is Failed).
        assert!(steps(plan(&up(), Never, &init, &app, now)).is_empty());
    }

    #[test]
    fn app_containers_restart_per_the_restart_policy() {
        let now = Instant::now();
        let app = [exited(0, now), exited(2, now)];
        assert_eq!(
            steps(plan(&up(), Always, &[], &app, now)),
            vec![Restart(App, 0), Restart(App, 1)]
        );
        assert_eq!(
            steps(plan(&up(), OnFailure, &[], &app, now)),
            vec![Restart(App, 1)]
        );
        assert!(steps(plan(&up(), Never, &[], &app, now)).is_empty());
    }

    #[test]
    fn crash_loop_back_off_is_immediate_then_10s_doubling_to_300s() {
        let t0 = Instant::now();
        let mut rec = exited(1, t0);
        let app = |r: &ContainerRecord| [r.clone()];
        // The first restart is immediate.
        assert_eq!(
            steps(plan(&up(), Always, &[], &app(&rec), t0)),
            vec![Restart(App, 0)]
        );
        rec.backoff.next(t0);
        // Each later exit waits the current delay from that exit: 10, 20, 40 … 300 s.
        let mut exit = t0 + Duration::from_secs(1);
        for want in [10u64, 20, 40, 80, 160, 300, 300] {
            rec.exited_mono = Some(exit);
            let until = exit + Duration::from_secs(want);
            let s = plan(&up(), Always, &[], &app(&rec), exit);
            assert_eq!(
                s,
                Step::Containers(vec![BackOff(App, 0, until)], Some(until))
            );
            // Still held a moment before; restarted once the delay has passed.
            let before = until - Duration::from_millis(1);
            assert_eq!(
                steps(plan(&up(), Always, &[], &app(&rec), before)),
                vec![BackOff(App, 0, until)]
            );
            assert_eq!(
                steps(plan(&up(), Always, &[], &app(&rec), until)),
                vec![Restart(App, 0)]
            );
            rec.backoff.next(until);
            exit = until + Duration::from_secs(1);
        }
        // Ten minutes (2 × the maximum) of clean running resets the back-off.
        rec.exited_mono = Some(exit + Duration::from_secs(601));
        let now = exit + Duration::from_secs(601);
        assert_eq!(
            steps(plan(&up(), Always, &[], &app(&rec), now)),
            vec![Restart(App, 0)]
        );
        rec.backoff.next(now);
        assert_eq!(rec.backoff.current(), Backoff::INITIAL);
    }

    #[test]
    fn a_container_that_failed_to_start_waits_for_its_retry_time() {
        let now = Instant::now();
        let later = now + Duration::from_secs(10);
        let rec = ContainerRecord {
            retry_at: Some(later),
            ..Default::default()
        };
        let app = [rec, ContainerRecord::default()];
        assert_eq!(
            plan(&up(), Always, &[], &app, now),
            Step::Containers(vec![Start(App, 1)], Some(later))
        );
        assert_eq!(
            steps(plan(&up(), Always, &[], &app, later)),
            vec![Start(App, 0), Start(App, 1)]
        );
    }

    #[test]
    fn a_lost_sandbox_is_replaced_and_everything_starts_again() {
        let now = Instant::now();
        let mut st = up();
        assert!(!st.task_exited("some-container"), "not the sandbox");
        assert!(st.is_running());
        assert!(st.task_exited("sb"));
        assert_eq!(
            plan(&st, Always, &[], &[running()], now),
            Step::ReplaceSandbox
        );
        // The worker stops the containers and takes the sandbox out; then a new one is made.
        assert_eq!(st.take_sandbox().map(|s| s.id), Some("sb".into()));
        assert_eq!(
            plan(&st, Always, &[], &[exited(137, now)], now),
            Step::CreateSandbox
        );
        st.created(sandbox("sb2"));
        assert_eq!(st.sandbox().map(|s| s.id.as_str()), Some("sb2"));
    }

    #[test]
    fn sandbox_creation_is_retried_with_back_off_and_its_error_shown() {
        let t0 = Instant::now();
        let mut st = PodState::default();
        let mut at = t0;
        for want in [2u64, 4, 8, 16, 32, 60, 60] {
            assert_eq!(plan(&st, Always, &[], &[], at), Step::CreateSandbox);
            let delay = st.create_failed("no address left".into(), at);
            assert_eq!(delay, Duration::from_secs(want));
            assert_eq!(st.error(), Some("no address left"));
            let retry = at + delay;
            assert_eq!(
                plan(&st, Always, &[], &[], retry - Duration::from_millis(1)),
                Step::Wait(Some(retry))
            );
            at = retry;
        }
        st.created(sandbox("sb"));
        assert_eq!(st.error(), None);
        // After a success the count starts over.
        st.take_sandbox();
        assert_eq!(st.create_failed("again".into(), at), Duration::from_secs(2));
    }

    #[test]
    fn a_finished_pod_starts_nothing_and_removes_its_sandbox_once_nothing_runs() {
        let now = Instant::now();
        let mut st = up();
        st.finish();
        assert!(st.is_finished());
        // A container still stopping: wait; exited ones are not restarted, even under Always.
        assert_eq!(
            plan(&st, Always, &[], &[running(), exited(1, now)], now),
            Step::Wait(None)
        );
        assert_eq!(
            plan(&st, Always, &[], &[exited(0, now), exited(1, now)], now),
            Step::TearDown
        );
        assert!(st.take_sandbox().is_some());
        assert_eq!(
            plan(&st, Always, &[], &[exited(0, now)], now),
            Step::Wait(None)
        );
        // A lost sandbox of a finished pod is not replaced.
        let mut st = up();
        st.finish();
        assert!(st.task_exited("sb"));
        assert!(st.is_finished());
    }
}
