//! Adoption: rebuilding a worker's state from containers already running (agent restart).

use super::*;

impl PodWorker {
    /// Rebuilds state from containers found in containerd (agent restart).
    pub(super) async fn adopt(&mut self, listed: Vec<Listed>) {
        if !listed.is_empty() {
            self.refresh_refs().await;
        }
        let rt = self.ctx.rt.clone();
        let mut by_name: BTreeMap<(String, String), Vec<(i32, Listed)>> = BTreeMap::new();
        for l in listed {
            let kind = l.labels.get(labels::KIND).cloned().unwrap_or_default();
            if kind == "sandbox" {
                if self.state.sandbox().is_none()
                    && let Ok(TaskState::Running { pid }) = rt.task_state(&l.id).await
                {
                    self.start_time = l
                        .labels
                        .get(labels::POD_STARTED)
                        .and_then(|t| t.parse().ok());
                    let ip = match &self.ctx.cfg.cni {
                        // The address from the cached ADD; CHECK that the network is intact.
                        Some(cni) => {
                            if let Err(e) = cni.check_pid(&l.id, pid, &self.pod_ref()) {
                                tracing::warn!(pod = %self.name, error = %e, "CNI CHECK of an adopted pod");
                            }
                            cni.cached(&l.id)
                                .and_then(|(_, r)| net::cni::first_ipv4(&r))
                        }
                        None => self.ctx.ipam.owned_by(&self.uid).ok().flatten(),
                    };
                    self.state.created(Sandbox {
                        id: l.id.clone(),
                        pid,
                        ip,
                    });
                    self.register(&l.id);
                    continue;
                }
                remove_container(&rt, &l.id).await;
                continue;
            }
            let name = l.labels.get(labels::NAME).cloned().unwrap_or_default();
            let rc = l
                .labels
                .get(labels::RESTART)
                .and_then(|r| r.parse().ok())
                .unwrap_or(0);
            by_name.entry((kind, name)).or_default().push((rc, l));
        }
        for ((kind, name), mut insts) in by_name {
            insts.sort_by_key(|(rc, _)| -*rc);
            let k = if kind == "init" {
                Kind::Init
            } else {
                Kind::App
            };
            let list = match k {
                Kind::Init => spec_of(&self.pod)
                    .init_containers
                    .clone()
                    .unwrap_or_default(),
                Kind::App => spec_of(&self.pod).containers.clone(),
            };
            let Some(i) = list.iter().position(|c| c.name == name) else {
                for (_, l) in insts {
                    remove_container(&rt, &l.id).await;
                }
                continue;
            };
            let mut found = vec![];
            for (n, (rc, l)) in insts.into_iter().enumerate() {
                if n >= 2 {
                    remove_container(&rt, &l.id).await;
                    continue;
                }
                let started_at = l
                    .labels
                    .get(labels::STARTED_AT)
                    .and_then(|t| t.parse().ok());
                let state = match rt.task_state(&l.id).await {
                    Ok(TaskState::Running { .. }) | Ok(TaskState::Created) => InstState::Running,
                    Ok(TaskState::Stopped {
                        exit_code,
                        exited_at,
                    }) => InstState::Exited {
                        code: exit_code as i32,
                        reason: exit_reason(exit_code as i32, false).into(),
                        message: super::read_termination_message(
                            &self.termination_log(&name, &l.id),
                        ),
                        finished_at: exited_at.unwrap_or_else(Timestamp::now),
                    },
                    _ => InstState::Exited {
                        code: 255,
                        reason: "Error".into(),
                        message: Some("container task not found after agent restart".into()),
                        finished_at: Timestamp::now(),
                    },
                };
                let image_id = rt
                    .image_info(&l.image)
                    .await
                    .map(|i| i.image_id)
                    .unwrap_or_default();
                found.push(Instance {
                    id: l.id.clone(),
                    restart_count: rc,
                    started_at,
                    state,
                    image_id,
                });
            }
            let mut it = found.into_iter();
            let current = it.next();
            let previous = it.next();
            let rec = self.rec(k, i);
            rec.previous = previous;
            rec.current = current.clone();
            if let Some(cur) = current {
                self.register(&cur.id);
                if cur.is_running() {
                    let process = self.adopted_process(k, i, &cur).await;
                    if let Err(e) = self.attach(k, i, &cur, process) {
                        tracing::warn!(pod = %self.name, error = %e, "re-attaching logs");
                    }
                    self.resume_probes(k, i, &cur);
                } else {
                    self.rec(k, i).exited_mono = Some(std::time::Instant::now());
                }
            }
        }
        if self.state.sandbox().is_some() {
            tracing::info!(pod = %self.name, "adopted running pod");
        }
    }

    /// The process config of an adopted container, rebuilt from its spec and image.
    pub(super) async fn adopted_process(
        &self,
        kind: Kind,
        i: usize,
        inst: &Instance,
    ) -> ProcessConfig {
        let c = self.container(kind, i);
        let Ok(img) = self
            .ctx
            .rt
            .image_info(c.image.as_deref().unwrap_or(""))
            .await
        else {
            return ProcessConfig::default();
        };
        let tlog = self.termination_log(&c.name, &inst.id);
        build::runtime_config(&self.pod, c, &img, &self.sandbox_info(), &inst.id, &tlog)
            .map(|rc| rc.process)
            .unwrap_or_default()
    }
}
