//! Adoption: rebuilding a worker's state from containers already running (agent restart).

use super::*;

impl PodWorker {
    /// Rebuilds state from containers found in containerd (agent restart).
    pub(super) async fn adopt(&mut self, listed: Vec<Listed>) {
        if !listed.is_empty() {
            self.refresh_refs().await;
        }
        let rt = self.ctx.rt.clone();
        let spec = spec_of(&self.pod);
        let names = |v: &[Container]| v.iter().map(|c| c.name.clone()).collect::<Vec<_>>();
        let found = sort_found(
            listed,
            &names(spec.init_containers.as_deref().unwrap_or_default()),
            &names(&spec.containers),
        );
        for id in &found.stale {
            remove_container(rt.as_ref(), id).await;
        }
        for l in found.sandboxes {
            if self.state.sandbox().is_none()
                && let Some(TaskState::Running { pid }) = settled_state(rt.as_ref(), &l.id).await
            {
                self.adopt_sandbox(&l, pid);
                continue;
            }
            remove_container(rt.as_ref(), &l.id).await;
        }
        for (k, i, insts) in found.instances {
            let name = self.container(k, i).name.clone();
            let mut adopted = vec![];
            for (rc, l) in insts {
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
                adopted.push(Instance {
                    id: l.id.clone(),
                    restart_count: rc,
                    started_at,
                    state,
                    image_id,
                });
            }
            let mut it = adopted.into_iter();
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
                        tracing::warn!(error = %e, "re-attaching logs");
                    }
                    self.resume_probes(k, i, &cur);
                } else {
                    self.rec(k, i).exited_mono = Some(Instant::now());
                }
            }
        }
        if self.state.sandbox().is_some() {
            tracing::info!("adopted running pod");
        } else {
            // Containers running without their sandbox (kubelet: the sandbox changed, so the
            // pod is killed and made again): they would keep a network namespace nobody
            // wires, and probes without an address.
            self.stop_running().await;
        }
    }

    /// Takes over the running sandbox `l` (pid `pid`) with its network.
    fn adopt_sandbox(&mut self, l: &Listed, pid: u32) {
        self.start_time = l
            .labels
            .get(labels::POD_STARTED)
            .and_then(|t| t.parse().ok());
        // The network's record of the address (CNI: the cached ADD, its wiring CHECKed).
        let ip = self.ctx.network.adopt(&self.pod_ref(), &l.id, pid);
        self.state.created(Sandbox {
            id: l.id.clone(),
            pid,
            ip,
        });
        self.register(&l.id);
        if ip.is_none() && !spec_of(&self.pod).host_network.unwrap_or(false) {
            // kubelet: "Sandbox for pod has no IP address. Need to start a new one".
            tracing::warn!(sandbox = %l.id, "the adopted sandbox has no IP address: making a new one");
            self.state.task_exited(&l.id);
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

/// A task's state, asked up to three times: `None` when containerd never answered (one
/// failed call must not make a restarted agent replace a running pod's sandbox).
pub(super) async fn settled_state(rt: &dyn crate::runtime::Runtime, id: &str) -> Option<TaskState> {
    for attempt in 0..3 {
        match rt.task_state(id).await {
            Ok(s) => return Some(s),
            Err(e) => {
                tracing::warn!(container = id, attempt, error = %e, "asking a task's state");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    None
}

/// A container of the spec and its instances found, newest first, with their restart counts.
pub(super) type Instances = (Kind, usize, Vec<(i32, Listed)>);

/// What a restarted agent found of one pod in containerd, sorted out.
#[derive(Debug, Default)]
pub(super) struct Found {
    /// Pause containers (the first one still running becomes the sandbox).
    pub sandboxes: Vec<Listed>,
    /// For each container of the spec that has instances: its newest two (current, then
    /// previous) with their restart counts.
    pub instances: Vec<Instances>,
    /// Older instances and containers the spec no longer has: to remove.
    pub stale: Vec<String>,
}

/// Sorts the containers found for a pod whose spec names `init` and `app` containers, by the
/// labels keelson put on them.
pub(super) fn sort_found(listed: Vec<Listed>, init: &[String], app: &[String]) -> Found {
    let mut found = Found::default();
    let mut by_container: BTreeMap<(Kind, usize), Vec<(i32, Listed)>> = BTreeMap::new();
    for l in listed {
        let kind = l.labels.get(labels::KIND).map(String::as_str);
        let (k, names) = match kind {
            Some("sandbox") => {
                found.sandboxes.push(l);
                continue;
            }
            Some("init") => (Kind::Init, init),
            _ => (Kind::App, app),
        };
        let name = l.labels.get(labels::NAME).map(String::as_str);
        let Some(i) = names.iter().position(|n| Some(n.as_str()) == name) else {
            found.stale.push(l.id);
            continue;
        };
        let rc = l
            .labels
            .get(labels::RESTART)
            .and_then(|r| r.parse().ok())
            .unwrap_or(0);
        by_container.entry((k, i)).or_default().push((rc, l));
    }
    for ((k, i), mut insts) in by_container {
        insts.sort_by_key(|(rc, _)| std::cmp::Reverse(*rc));
        let older = insts.split_off(insts.len().min(2));
        found.stale.extend(older.into_iter().map(|(_, l)| l.id));
        found.instances.push((k, i, insts));
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(id: &str, kind: &str, name: &str, restart: i32) -> Listed {
        let labels = [
            (labels::KIND, kind.to_string()),
            (labels::NAME, name.to_string()),
            (labels::RESTART, restart.to_string()),
        ];
        Listed {
            id: id.into(),
            labels: labels.map(|(k, v)| (k.to_string(), v)).into(),
            image: String::new(),
        }
    }

    #[test]
    fn a_restarted_agent_keeps_each_containers_newest_two_instances_and_removes_the_rest() {
        let found = sort_found(
            vec![
                listed("web-0", "app", "web", 0),
                listed("sb", "sandbox", "", 0),
                listed("web-2", "app", "web", 2),
                listed("setup-0", "init", "setup", 0),
                listed("gone-0", "app", "gone", 0),
                listed("web-1", "app", "web", 1),
                listed("side-0", "app", "side", 0),
            ],
            &["setup".into()],
            &["side".into(), "web".into()],
        );
        assert_eq!(
            found.sandboxes.iter().map(|l| &l.id).collect::<Vec<_>>(),
            ["sb"]
        );
        let got: Vec<String> = found
            .instances
            .iter()
            .map(|(k, i, v)| {
                let ids: Vec<String> = v.iter().map(|(rc, l)| format!("{rc}:{}", l.id)).collect();
                format!("{k:?} {i} {}", ids.join(","))
            })
            .collect();
        assert_eq!(
            got,
            [
                "Init 0 0:setup-0",
                "App 0 0:side-0",
                "App 1 2:web-2,1:web-1"
            ]
        );
        let mut stale = found.stale.clone();
        stale.sort();
        assert_eq!(stale, ["gone-0", "web-0"]);
    }

    #[test]
    fn an_adopted_running_pod_starts_nothing_twice() {
        use super::super::lifecycle::{PodState, RestartPolicy, Step, plan};
        let inst = |id: &str, state: InstState| Instance {
            id: id.into(),
            restart_count: 0,
            started_at: None,
            state,
            image_id: String::new(),
        };
        let done = ContainerRecord {
            current: Some(inst(
                "setup-0",
                InstState::Exited {
                    code: 0,
                    reason: "Completed".into(),
                    message: None,
                    finished_at: Timestamp::UNIX_EPOCH,
                },
            )),
            ..Default::default()
        };
        let running = ContainerRecord {
            current: Some(inst("web-2", InstState::Running)),
            ..Default::default()
        };
        let mut state = PodState::default();
        state.created(Sandbox {
            id: "sb".into(),
            pid: 7,
            ip: None,
        });
        let step = plan(
            &state,
            RestartPolicy::Always,
            &[done],
            &[running],
            tokio::time::Instant::now(),
        );
        assert_eq!(step, Step::Containers(vec![], None));
    }
}
