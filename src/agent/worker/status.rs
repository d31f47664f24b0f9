//! The pod status the worker publishes: conditions, phase, container statuses, QoS class.

use super::*;

impl PodWorker {
    pub(super) fn condition(
        &self,
        typ: &str,
        ok: bool,
        reason: Option<&str>,
        message: Option<String>,
    ) -> PodCondition {
        let status = if ok { "True" } else { "False" };
        let prev = self.conditions.iter().find(|c| c.type_ == typ);
        let changed = prev.is_none_or(|p| p.status != status);
        PodCondition {
            type_: typ.to_string(),
            status: status.to_string(),
            reason: reason.map(str::to_string),
            message,
            last_transition_time: if changed {
                Some(Time(Timestamp::now()))
            } else {
                prev.and_then(|p| p.last_transition_time.clone())
            },
            last_probe_time: None,
            observed_generation: None,
        }
    }

    /// The containers' statuses (init, app), with the sandbox's error as their waiting
    /// message while it is being retried.
    fn container_statuses(&self) -> (Vec<ContainerStatus>, Vec<ContainerStatus>) {
        let spec = spec_of(&self.pod);
        let has_init = spec.init_containers.as_ref().is_some_and(|v| !v.is_empty());
        let with_sandbox_error = |rec: &ContainerRecord, mut s: ContainerStatus| {
            if let Some(e) = self.state.error().filter(|_| rec.current.is_none()) {
                s.state = Some(waiting_state("ContainerCreating", e));
            }
            s
        };
        let image = |c: &Container| c.image.clone().unwrap_or_default();
        let init_st = spec
            .init_containers
            .iter()
            .flatten()
            .zip(&self.init)
            .map(|(c, r)| with_sandbox_error(r, r.status(&c.name, &image(c), "PodInitializing")))
            .collect();
        let default_wait = if has_init {
            "PodInitializing"
        } else {
            "ContainerCreating"
        };
        let app_st = spec
            .containers
            .iter()
            .zip(&self.app)
            .map(|(c, r)| with_sandbox_error(r, r.status(&c.name, &image(c), default_wait)))
            .collect();
        (init_st, app_st)
    }

    /// Computes the pod status and publishes it to the agent's store; whether the pod is
    /// Succeeded or Failed.
    pub(super) fn publish(&mut self) -> bool {
        let spec = spec_of(&self.pod).clone();
        let has_init = spec.init_containers.as_ref().is_some_and(|v| !v.is_empty());
        let (init_st, app_st) = self.container_statuses();
        let init_done = self
            .init
            .iter()
            .all(|r| r.current.as_ref().and_then(Instance::exit_code) == Some(0));
        let policy = self.restart_policy();
        let ph = phase(&init_st, &app_st, policy.as_str(), init_done);
        let terminal = ph == "Succeeded" || ph == "Failed";
        let unready: Vec<String> = app_st
            .iter()
            .filter(|s| !s.ready)
            .map(|s| s.name.clone())
            .collect();
        let incomplete: Vec<String> = init_st
            .iter()
            .filter(|s| {
                s.state
                    .as_ref()
                    .and_then(|st| st.terminated.as_ref())
                    .is_none_or(|t| t.exit_code != 0)
            })
            .map(|s| s.name.clone())
            .collect();
        let list = |v: &[String]| format!("[{}]", v.join(" "));
        let mut conds = vec![
            self.condition(
                "PodReadyToStartContainers",
                self.state.sandbox().is_some(),
                None,
                None,
            ),
            if init_done {
                self.condition(
                    "Initialized",
                    true,
                    if ph == "Succeeded" && has_init {
                        Some("PodCompleted")
                    } else {
                        None
                    },
                    None,
                )
            } else {
                self.condition(
                    "Initialized",
                    false,
                    Some("ContainersNotInitialized"),
                    Some(format!(
                        "containers with incomplete status: {}",
                        list(&incomplete)
                    )),
                )
            },
        ];
        let (ready, reason, msg) = if terminal {
            (
                false,
                Some(if ph == "Succeeded" {
                    "PodCompleted"
                } else {
                    "PodFailed"
                }),
                None,
            )
        } else if unready.is_empty() {
            (true, None, None)
        } else {
            (
                false,
                Some("ContainersNotReady"),
                Some(format!(
                    "containers with unready status: {}",
                    list(&unready)
                )),
            )
        };
        conds.push(self.condition("ContainersReady", ready, reason, msg.clone()));
        conds.push(self.condition("Ready", ready, reason, msg));
        conds.push(self.condition("PodScheduled", true, None, None));
        self.conditions = conds.clone();
        let sb = self.sandbox_info();
        let status = PodStatus {
            phase: Some(ph.to_string()),
            conditions: Some(conds),
            host_ip: Some(sb.host_ip.clone()),
            host_ips: Some(vec![HostIP {
                ip: sb.host_ip.clone(),
            }]),
            pod_ip: sb.pod_ip.clone(),
            pod_ips: sb.pod_ip.clone().map(|ip| vec![PodIP { ip }]),
            start_time: self.start_time.map(Time),
            init_container_statuses: has_init.then_some(init_st),
            container_statuses: Some(app_st),
            qos_class: Some(crate::kinds::pod::qos_class(&spec)),
            ..Default::default()
        };
        let mut pod = self.pod.clone();
        pod.status = Some(status);
        self.ctx.store.put(&self.uid, pod);
        terminal
    }
}

fn waiting_state(reason: &str, message: &str) -> k8s_openapi::api::core::v1::ContainerState {
    k8s_openapi::api::core::v1::ContainerState {
        waiting: Some(k8s_openapi::api::core::v1::ContainerStateWaiting {
            reason: Some(reason.into()),
            message: Some(message.into()),
        }),
        ..Default::default()
    }
}
