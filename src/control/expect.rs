//! Expectations, as kube-controller-manager keeps them: the pods a controller created or
//! deleted and its cache has not shown yet, per owner. An owner with outstanding ones is
//! skipped, so a lagging cache never makes a controller create a pod twice; they expire after
//! [`TIMEOUT`] in case a write's event never comes.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use k8s_openapi::api::core::v1::Pod;
use tokio::time::Instant;

/// How long a write may stay unseen before the controller stops waiting for it.
pub const TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Default)]
struct Pending {
    created: HashSet<String>,
    deleted: HashSet<String>,
    until: Option<Instant>,
}

#[derive(Default)]
pub struct Expectations {
    by_owner: HashMap<String, Pending>,
}

fn name(p: &Pod) -> &str {
    p.metadata.name.as_deref().unwrap_or_default()
}

impl Expectations {
    /// Records pods `owner` created and deleted (nothing recorded when both are empty).
    pub fn record(&mut self, owner: &str, created: HashSet<String>, deleted: HashSet<String>) {
        if created.is_empty() && deleted.is_empty() {
            return;
        }
        self.by_owner.insert(
            owner.to_string(),
            Pending {
                created,
                deleted,
                until: Some(Instant::now() + TIMEOUT),
            },
        );
    }

    /// Whether `owner` still waits for its writes to show in `pods` (its pods as the cache
    /// has them): a created pod not there yet, or a deleted one still there and not being
    /// deleted. Forgets the owner once they all showed or expired.
    pub fn waiting(&mut self, owner: &str, pods: &[&Arc<Pod>]) -> bool {
        let Some(e) = self.by_owner.get(owner) else {
            return false;
        };
        let names: HashSet<&str> = pods.iter().map(|p| name(p)).collect();
        let gone_or_going = |n: &String| {
            !pods
                .iter()
                .any(|p| name(p) == n && p.metadata.deletion_timestamp.is_none())
        };
        let satisfied = e.created.iter().all(|n| names.contains(n.as_str()))
            && e.deleted.iter().all(gone_or_going);
        let expired = e.until.is_some_and(|t| t < Instant::now());
        if !satisfied && !expired {
            return true;
        }
        self.by_owner.remove(owner);
        false
    }

    /// Forgets owners that are gone.
    pub fn retain(&mut self, live: &HashSet<String>) {
        self.by_owner.retain(|k, _| live.contains(k));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, deleting: bool) -> Arc<Pod> {
        let mut p: Pod =
            serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).expect("pod");
        if deleting {
            p.metadata.deletion_timestamp = Some(
                k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::now()),
            );
        }
        Arc::new(p)
    }

    #[tokio::test(start_paused = true)]
    async fn an_owner_waits_until_its_writes_show_or_expire() {
        let mut e = Expectations::default();
        e.record("rs", ["a".to_string()].into(), ["b".to_string()].into());
        let (a, b, b_going) = (pod("a", false), pod("b", false), pod("b", true));
        assert!(e.waiting("rs", &[&b]), "a not seen yet");
        assert!(e.waiting("rs", &[&a, &b]), "b still there");
        assert!(
            !e.waiting("rs", &[&a, &b_going]),
            "b being deleted is enough"
        );
        assert!(!e.waiting("rs", &[]), "forgotten once satisfied");
        e.record("rs", ["c".to_string()].into(), HashSet::new());
        tokio::time::advance(TIMEOUT + Duration::from_secs(1)).await;
        assert!(!e.waiting("rs", &[]), "expired");
    }
}
