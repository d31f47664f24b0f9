//! Pod facts every role derives the same way.

use k8s_openapi::api::core::v1::{Container, Pod, PodSpec};

/// The pod's QoS class, as kubelet and kube-apiserver compute it: Guaranteed when every
/// container has equal cpu and memory limits and requests, BestEffort when none has any,
/// Burstable otherwise.
/// The pull policy kube-apiserver defaults for an image: `Always` for `:latest` or no tag
/// (and no digest), `IfNotPresent` otherwise.
pub fn default_pull_policy(image: &str) -> &'static str {
    let last = image.rsplit('/').next().unwrap_or("");
    let latest = (!last.contains(':') && !image.contains('@')) || last.ends_with(":latest");
    if latest { "Always" } else { "IfNotPresent" }
}

/// A container's pull policy: its own, else the default for its image (a static pod's
/// manifest is not defaulted by an API server).
pub fn image_pull_policy(c: &Container) -> &str {
    c.image_pull_policy
        .as_deref()
        .unwrap_or_else(|| default_pull_policy(c.image.as_deref().unwrap_or("")))
}

pub fn qos_class(spec: &PodSpec) -> String {
    let all: Vec<&Container> = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .collect();
    let mut any = false;
    let mut guaranteed = true;
    for c in all {
        let r = c.resources.as_ref();
        let lim = r.and_then(|r| r.limits.as_ref());
        let req = r.and_then(|r| r.requests.as_ref());
        for res in ["cpu", "memory"] {
            let l = lim.and_then(|m| m.get(res));
            let q = req.and_then(|m| m.get(res)).or(l);
            if l.is_some() || q.is_some() {
                any = true;
            }
            if l.is_none() || q.map(|q| &q.0) != l.map(|l| &l.0) {
                guaranteed = false;
            }
        }
    }
    if !any {
        "BestEffort".into()
    } else if guaranteed {
        "Guaranteed".into()
    } else {
        "Burstable".into()
    }
}

/// Whether a pod counts as alive for its controller: not terminating, not finished.
pub fn pod_active(p: &Pod) -> bool {
    p.metadata.deletion_timestamp.is_none()
        && !matches!(
            p.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        )
}

/// Whether the pod's Ready condition is True.
pub fn pod_ready(p: &Pod) -> bool {
    ready_since(p).is_some()
}

/// When the pod's Ready condition last turned True.
pub fn ready_since(p: &Pod) -> Option<jiff::Timestamp> {
    let c = p
        .status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready" && c.status == "True")?;
    Some(
        c.last_transition_time
            .as_ref()
            .map(|t| t.0)
            .unwrap_or(jiff::Timestamp::UNIX_EPOCH),
    )
}

/// Whether the pod has been ready for at least `min_ready` seconds (kube's "available").
pub fn pod_available(p: &Pod, min_ready: i32, now: jiff::Timestamp) -> bool {
    match ready_since(p) {
        Some(t) => min_ready <= 0 || now.as_second() - t.as_second() >= i64::from(min_ready),
        None => false,
    }
}
