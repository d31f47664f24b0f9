//! Stopping things: one container (preStop, SIGTERM, grace, SIGKILL), the whole pod, the sandbox.

use super::*;

impl PodWorker {
    /// Stops one container: preStop (if `pre_stop`), SIGTERM, grace, SIGKILL; records the exit.
    pub(super) async fn stop_container(
        &mut self,
        kind: Kind,
        i: usize,
        grace: i64,
        pre_stop: bool,
    ) {
        let Some(cid) = self
            .rec(kind, i)
            .current
            .as_ref()
            .filter(|c| c.is_running())
            .map(|c| c.id.clone())
        else {
            return;
        };
        let c = self.container(kind, i).clone();
        tracing::info!(container = %c.name, event = "Killing", "Stopping container {}", c.name);
        self.event(false, "Killing", format!("Stopping container {}", c.name));
        if let Some(r) = self.tasks.get(&cid)
            && let Some(p) = &r.probes
        {
            p.abort();
        }
        let grace = Duration::from_secs(grace.max(0) as u64);
        let hook = c
            .lifecycle
            .as_ref()
            .and_then(|l| l.pre_stop.as_ref())
            .filter(|_| pre_stop);
        let run = hook.map(|h| self.pre_stop(kind, i, &cid, h, grace));
        let exited = super::kill::graceful_stop(self.ctx.rt.as_ref(), &cid, grace, run).await;
        let (code, at) = match self.ctx.rt.task_state(&cid).await {
            Ok(TaskState::Stopped {
                exit_code,
                exited_at,
            }) => (exit_code as i32, exited_at.unwrap_or_else(Timestamp::now)),
            _ => (exited.map(|c| c as i32).unwrap_or(137), Timestamp::now()),
        };
        self.mark_exited(&cid, code, at);
    }

    /// Kills every running container at once (no grace, no preStop): the sandbox under them
    /// is gone or being replaced.
    pub(super) async fn stop_running(&mut self) {
        for k in [Kind::Init, Kind::App] {
            let n = if k == Kind::Init {
                self.init.len()
            } else {
                self.app.len()
            };
            for i in 0..n {
                if self
                    .rec(k, i)
                    .current
                    .as_ref()
                    .is_some_and(|c| c.is_running())
                {
                    self.stop_container(k, i, 0, false).await;
                }
            }
        }
    }

    /// Stops everything of the pod and frees its resources.
    pub(super) async fn terminate(&mut self, grace: Option<i64>) {
        let grace = self.grace(grace);
        tracing::info!(grace, "terminating pod");
        // Shown as Terminating while it stops.
        self.pod.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
        self.pod.metadata.deletion_grace_period_seconds = Some(grace);
        self.publish();
        // Every container stops at once, as kubelet's killPod does.
        let all = (0..self.app.len())
            .map(|i| (Kind::App, i))
            .chain((0..self.init.len()).map(|i| (Kind::Init, i)))
            .collect();
        self.stop_all(all, grace).await;
        let rt = self.ctx.rt.clone();
        for r in self.init.iter().chain(self.app.iter()) {
            for inst in [&r.current, &r.previous].into_iter().flatten() {
                remove_container(rt.as_ref(), &inst.id).await;
                self.unregister(&inst.id);
            }
        }
        for (_, r) in self.tasks.drain() {
            if let Some(p) = r.probes {
                p.abort();
            }
            for p in r.pumps {
                p.abort();
            }
        }
        self.teardown_sandbox().await;
        let dir = self.pod_dir();
        // Unmounts subPath binds and memory emptyDirs first: the removal never walks into a
        // volume or a host path.
        if let Err(e) = crate::agent::build::safe_fs::remove_tree(&dir) {
            tracing::warn!(error = %e, "removing the pod's directory");
        }
        crate::agent::build::forget_projections(&dir);
        let _ = std::fs::remove_dir_all(self.log_dir());
        let fifo = self.ctx.cfg.fifo_dir();
        for r in self.init.iter().chain(self.app.iter()) {
            for inst in [&r.current, &r.previous].into_iter().flatten() {
                for suffix in ["in", "out", "err"] {
                    let _ = std::fs::remove_file(fifo.join(format!("{}.{suffix}", inst.id)));
                }
            }
        }
        self.ctx.store.remove(&self.uid);
        tracing::info!("pod stopped");
    }

    /// Stops the containers `which` at once, each with its own preStop hook, within `grace`.
    pub(super) async fn stop_all(&mut self, which: Vec<(Kind, usize)>, grace: i64) {
        let running: Vec<(Kind, usize, String)> = which
            .into_iter()
            .filter_map(|(k, i)| {
                let cur = self.rec_ref(k, i).current.as_ref()?;
                cur.is_running().then(|| (k, i, cur.id.clone()))
            })
            .collect();
        for (k, i, _) in &running {
            let name = self.container(*k, *i).name.clone();
            self.event(false, "Killing", format!("Stopping container {name}"));
        }
        let grace = Duration::from_secs(grace.max(0) as u64);
        let this: &Self = self;
        let stops = running.iter().map(|(k, i, id)| async move {
            let hook = this
                .container(*k, *i)
                .lifecycle
                .as_ref()
                .and_then(|l| l.pre_stop.as_ref());
            let run = hook.map(|h| this.pre_stop(*k, *i, id, h, grace));
            super::kill::graceful_stop(this.ctx.rt.as_ref(), id, grace, run).await
        });
        futures::future::join_all(stops).await;
    }

    /// The preStop hook of container `cid`, its failure reported.
    async fn pre_stop(
        &self,
        kind: Kind,
        i: usize,
        cid: &str,
        h: &LifecycleHandler,
        budget: Duration,
    ) {
        if let Err(e) = self.run_hook(kind, i, cid, h, budget).await {
            let name = &self.container(kind, i).name;
            tracing::warn!(container = %name, event = "FailedPreStopHook", "PreStopHook failed: {e}");
            self.event(
                true,
                "FailedPreStopHook",
                format!("PreStopHook failed: {e}"),
            );
        }
    }

    pub(super) async fn teardown_sandbox(&mut self) {
        if let Some(sb) = self.state.take_sandbox() {
            // The network first, while the namespace still exists (CNI DEL wants it).
            self.net_teardown(&sb.id, Some(sb.pid)).await;
            remove_container(self.ctx.rt.as_ref(), &sb.id).await;
            self.unregister(&sb.id);
        } else {
            self.ctx.network.detach(&self.pod_ref(), None, None).await;
        }
        self.ctx.network.release(&self.uid);
    }
}
