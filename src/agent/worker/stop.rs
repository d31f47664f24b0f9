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
        let deadline = std::time::Instant::now() + Duration::from_secs(grace as u64);
        tracing::info!(pod = %self.name, container = %c.name, event = "Killing", "Stopping container {}", c.name);
        self.event(false, "Killing", format!("Stopping container {}", c.name));
        if pre_stop
            && let Some(h) = c.lifecycle.as_ref().and_then(|l| l.pre_stop.clone())
            && let Err(e) = self
                .run_hook(kind, i, &cid, &h, Duration::from_secs(grace as u64))
                .await
        {
            tracing::warn!(pod = %self.name, container = %c.name, event = "FailedPreStopHook", "PreStopHook failed: {e}");
        }
        let remaining = deadline
            .saturating_duration_since(std::time::Instant::now())
            .max(Duration::from_secs(if grace == 0 { 0 } else { 2 }));
        if let Some(r) = self.tasks.get(&cid)
            && let Some(p) = &r.probes
        {
            p.abort();
        }
        let _ = self.ctx.rt.kill(&cid, 15).await;
        let mut exited = self.ctx.rt.wait(&cid, remaining).await.ok().flatten();
        if exited.is_none() {
            let _ = self.ctx.rt.kill(&cid, 9).await;
            exited = self
                .ctx
                .rt
                .wait(&cid, Duration::from_secs(10))
                .await
                .ok()
                .flatten();
        }
        let (code, at) = match self.ctx.rt.task_state(&cid).await {
            Ok(TaskState::Stopped {
                exit_code,
                exited_at,
            }) => (exit_code as i32, exited_at.unwrap_or_else(Timestamp::now)),
            _ => (exited.map(|c| c as i32).unwrap_or(137), Timestamp::now()),
        };
        self.mark_exited(&cid, code, at);
    }

    /// Stops everything of the pod and frees its resources.
    pub(super) async fn terminate(&mut self, grace: Option<i64>) {
        let grace = self.grace(grace);
        tracing::info!(pod = %self.name, grace, "terminating pod");
        // Shown as Terminating while it stops.
        self.pod.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
        self.pod.metadata.deletion_grace_period_seconds = Some(grace);
        self.publish();
        // App containers stop in parallel as kubelet does; we run them concurrently via join.
        let mut stops = vec![];
        for (k, n) in [(Kind::App, self.app.len()), (Kind::Init, self.init.len())] {
            for i in 0..n {
                stops.push((k, i));
            }
        }
        let futs: Vec<_> = stops
            .into_iter()
            .filter(|(k, i)| {
                let r = match k {
                    Kind::Init => &self.init[*i],
                    Kind::App => &self.app[*i],
                };
                r.current.as_ref().is_some_and(|c| c.is_running())
            })
            .collect();
        // Stopping needs &mut self; run preStop hooks concurrently first, then signal all.
        self.stop_all(futs, grace).await;
        let rt = self.ctx.rt.clone();
        for r in self.init.iter().chain(self.app.iter()) {
            for inst in [&r.current, &r.previous].into_iter().flatten() {
                remove_container(&rt, &inst.id).await;
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
            tracing::warn!(pod = %self.name, error = %e, "removing the pod's directory");
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
        if let Ok(mut s) = self.ctx.store.write() {
            s.remove(&self.uid);
        }
        tracing::info!(pod = %self.name, "pod stopped");
    }

    pub(super) async fn stop_all(&mut self, which: Vec<(Kind, usize)>, grace: i64) {
        let deadline = std::time::Instant::now() + Duration::from_secs(grace as u64);
        for (k, i) in &which {
            if self
                .rec(*k, *i)
                .current
                .as_ref()
                .is_some_and(|c| c.is_running())
            {
                let name = self.container(*k, *i).name.clone();
                self.event(false, "Killing", format!("Stopping container {name}"));
            }
        }
        // preStop hooks run concurrently, bounded by the grace period.
        let mut hooks = vec![];
        for (k, i) in &which {
            let c = self.container(*k, *i);
            if let (Some(h), Some(cur)) = (
                c.lifecycle.as_ref().and_then(|l| l.pre_stop.clone()),
                self.rec(*k, *i).current.clone(),
            ) {
                hooks.push((*k, *i, cur.id, h));
            }
        }
        let this: &Self = self;
        let runs = hooks.iter().map(|(k, i, id, h)| async move {
            if let Err(e) = this.run_hook(*k, *i, id, h, Duration::from_secs(grace as u64)).await {
                tracing::warn!(pod = %this.name, event = "FailedPreStopHook", "PreStopHook failed: {e}");
            }
        });
        let _ = tokio::time::timeout(
            Duration::from_secs(grace as u64),
            futures::future::join_all(runs),
        )
        .await;
        let remaining = deadline
            .saturating_duration_since(std::time::Instant::now())
            .max(Duration::from_secs(if grace == 0 { 0 } else { 2 }));
        let rt = self.ctx.rt.clone();
        let ids: Vec<String> = which
            .iter()
            .filter_map(|(k, i)| match k {
                Kind::Init => self.init[*i].current.as_ref().map(|c| c.id.clone()),
                Kind::App => self.app[*i].current.as_ref().map(|c| c.id.clone()),
            })
            .collect();
        let kills = ids.iter().map(|id| {
            let rt = rt.clone();
            async move {
                let _ = rt.kill(id, 15).await;
                if rt.wait(id, remaining).await.ok().flatten().is_none() {
                    let _ = rt.kill(id, 9).await;
                    let _ = rt.wait(id, Duration::from_secs(10)).await;
                }
            }
        });
        futures::future::join_all(kills).await;
    }

    pub(super) async fn teardown_sandbox(&mut self) {
        if let Some(sb) = self.state.take_sandbox() {
            // The network first, while the namespace still exists (CNI DEL wants it).
            self.net_teardown(&sb.id, Some(sb.pid)).await;
            remove_container(&self.ctx.rt, &sb.id).await;
            self.unregister(&sb.id);
        } else if self.ctx.cfg.cni.is_none() {
            let _ = net::teardown_pod(&net::host_veth_name(&self.uid)).await;
        }
        if let Err(e) = self.ctx.ipam.release_owner(&self.uid) {
            tracing::warn!(pod = %self.name, error = %e, "releasing pod IP");
        }
    }
}
