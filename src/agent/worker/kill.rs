//! Stopping one container as kubelet's killContainer does: its preStop hook first, bounded by
//! the grace period; SIGTERM; what is left of the grace period (at least 2 s, unless the grace
//! is 0); SIGKILL. Written against `TaskSignals` so the order and the timing are unit-tested
//! on a recording fake with paused time.

use std::{future::Future, time::Duration};

use tokio::time::Instant;

use crate::runtime::Runtime;

/// kubelet's minimumGracePeriodInSeconds: SIGTERM always gets this long after a preStop hook
/// that used up the grace period.
pub(super) const MIN_AFTER_HOOK: Duration = Duration::from_secs(2);

/// What stopping a task needs of the container runtime.
#[async_trait::async_trait]
pub(crate) trait TaskSignals: Send + Sync {
    /// Sends `signal` to the task's init process (a task already gone is not an error).
    async fn signal(&self, id: &str, signal: u32);
    /// Waits up to `timeout` for the task to exit; its exit status if it did.
    async fn exited_within(&self, id: &str, timeout: Duration) -> Option<u32>;
}

#[async_trait::async_trait]
impl<R: Runtime + ?Sized> TaskSignals for R {
    async fn signal(&self, id: &str, signal: u32) {
        if let Err(e) = self.kill(id, signal).await {
            tracing::warn!(container = id, signal, error = %e, "signalling container");
        }
    }

    async fn exited_within(&self, id: &str, timeout: Duration) -> Option<u32> {
        self.wait(id, timeout).await.ok().flatten()
    }
}

/// Stops task `id` within `grace`, running `pre_stop` first; the exit status seen, if any
/// (none when even SIGKILL was not confirmed within 10 s).
pub(crate) async fn graceful_stop<T: TaskSignals + ?Sized>(
    rt: &T,
    id: &str,
    grace: Duration,
    pre_stop: Option<impl Future<Output = ()>>,
) -> Option<u32> {
    let deadline = Instant::now() + grace;
    if let Some(hook) = pre_stop {
        // The hook's own failure is reported by the hook; its time counts against the grace.
        let _ = tokio::time::timeout(grace, hook).await;
    }
    let floor = if grace.is_zero() {
        Duration::ZERO
    } else {
        MIN_AFTER_HOOK
    };
    let remaining = deadline
        .saturating_duration_since(Instant::now())
        .max(floor);
    rt.signal(id, 15).await;
    if let Some(code) = rt.exited_within(id, remaining).await {
        return Some(code);
    }
    rt.signal(id, 9).await;
    rt.exited_within(id, Duration::from_secs(10)).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A task that exits `term_after` after SIGTERM (never, if None), at once on SIGKILL; it
    /// records each signal and when it came.
    struct FakeTask {
        t0: Instant,
        term_after: Option<Duration>,
        signals: Mutex<Vec<(u32, Duration)>>,
    }

    impl FakeTask {
        fn new(term_after: Option<Duration>) -> Self {
            FakeTask {
                t0: Instant::now(),
                term_after,
                signals: Mutex::new(vec![]),
            }
        }

        fn signals(&self) -> Vec<(u32, Duration)> {
            self.signals.lock().unwrap().clone()
        }

        /// When the task exits, as far as the signals so far decide.
        fn exit_at(&self) -> Option<(Instant, u32)> {
            let s = self.signals.lock().unwrap();
            let kill = s.iter().find(|x| x.0 == 9).map(|x| (self.t0 + x.1, 137));
            let term = s
                .iter()
                .find(|x| x.0 == 15)
                .and_then(|x| Some((self.t0 + x.1 + self.term_after?, 143)));
            match (kill, term) {
                (Some(k), Some(t)) => Some(if t.0 <= k.0 { t } else { k }),
                (k, t) => k.or(t),
            }
        }
    }

    #[async_trait::async_trait]
    impl TaskSignals for FakeTask {
        async fn signal(&self, _id: &str, signal: u32) {
            self.signals
                .lock()
                .unwrap()
                .push((signal, self.t0.elapsed()));
        }

        async fn exited_within(&self, _id: &str, timeout: Duration) -> Option<u32> {
            let until = Instant::now() + timeout;
            match self.exit_at() {
                Some((at, code)) if at <= until => {
                    tokio::time::sleep_until(at).await;
                    Some(code)
                }
                _ => {
                    tokio::time::sleep_until(until).await;
                    None
                }
            }
        }
    }

    const S: fn(u64) -> Duration = Duration::from_secs;

    async fn hook(secs: u64, ran: &Mutex<Option<Duration>>, t0: Instant) {
        tokio::time::sleep(S(secs)).await;
        *ran.lock().unwrap() = Some(t0.elapsed());
    }

    #[tokio::test(start_paused = true)]
    async fn pre_stop_runs_first_and_its_time_counts_against_the_grace_period() {
        let task = FakeTask::new(None);
        let ran = Mutex::new(None);
        let code = graceful_stop(&task, "c", S(10), Some(hook(3, &ran, task.t0))).await;
        assert_eq!(*ran.lock().unwrap(), Some(S(3)), "the hook ran to its end");
        // SIGTERM once the hook is done, SIGKILL when the 10 s are up (not 3 + 10).
        assert_eq!(task.signals(), vec![(15, S(3)), (9, S(10))]);
        assert_eq!(code, Some(137));
    }

    #[tokio::test(start_paused = true)]
    async fn a_container_that_exits_on_sigterm_is_not_killed() {
        let task = FakeTask::new(Some(S(1)));
        let code = graceful_stop(&task, "c", S(30), None::<std::future::Ready<()>>).await;
        assert_eq!(task.signals(), vec![(15, S(0))]);
        assert_eq!(code, Some(143));
        assert_eq!(task.t0.elapsed(), S(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_hook_outlasting_the_grace_period_is_cut_and_sigterm_still_gets_two_seconds() {
        let task = FakeTask::new(None);
        let ran = Mutex::new(None);
        let code = graceful_stop(&task, "c", S(5), Some(hook(60, &ran, task.t0))).await;
        assert_eq!(
            *ran.lock().unwrap(),
            None,
            "the hook was cut at the grace period"
        );
        assert_eq!(task.signals(), vec![(15, S(5)), (9, S(7))]);
        assert_eq!(code, Some(137));
    }

    #[tokio::test(start_paused = true)]
    async fn a_zero_grace_period_kills_at_once() {
        let task = FakeTask::new(Some(S(5)));
        let code = graceful_stop(&task, "c", S(0), None::<std::future::Ready<()>>).await;
        assert_eq!(task.signals(), vec![(15, S(0)), (9, S(0))]);
        assert_eq!(code, Some(137));
    }
}
