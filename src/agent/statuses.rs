//! The agent's status manager: the pods its workers run, with the status each last computed,
//! by UID. Workers put; readers (the local API, kubelet API, streams) read; the cluster
//! publisher is told of every change through a watch channel instead of polling.

use std::{
    collections::BTreeMap,
    sync::{LockResult, RwLock, RwLockReadGuard},
};

use k8s_openapi::api::core::v1::Pod;
use tokio::sync::watch;

pub struct PodStatuses {
    pods: RwLock<BTreeMap<String, Pod>>,
    /// Bumped on every change.
    changed: watch::Sender<u64>,
}

impl Default for PodStatuses {
    fn default() -> Self {
        PodStatuses {
            pods: RwLock::new(BTreeMap::new()),
            changed: watch::channel(0).0,
        }
    }
}

impl PodStatuses {
    pub fn read(&self) -> LockResult<RwLockReadGuard<'_, BTreeMap<String, Pod>>> {
        self.pods.read()
    }

    /// Records pod `uid` as `pod` (with its status); subscribers hear of it when it differs.
    pub fn put(&self, uid: &str, pod: Pod) {
        let Ok(mut pods) = self.pods.write() else {
            return;
        };
        if pods.get(uid) == Some(&pod) {
            return;
        }
        pods.insert(uid.to_string(), pod);
        drop(pods);
        self.changed.send_modify(|v| *v += 1);
    }

    /// Forgets pod `uid` (its worker ended).
    pub fn remove(&self, uid: &str) {
        let removed = self.pods.write().ok().and_then(|mut p| p.remove(uid));
        if removed.is_some() {
            self.changed.send_modify(|v| *v += 1);
        }
    }

    /// A receiver that sees every change from now on.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(phase: &str) -> Pod {
        Pod {
            status: Some(k8s_openapi::api::core::v1::PodStatus {
                phase: Some(phase.into()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn subscribers_hear_of_changes_and_only_of_changes() {
        let s = PodStatuses::default();
        let mut rx = s.subscribe();
        s.put("a", pod("Pending"));
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        s.put("a", pod("Pending"));
        assert!(
            !rx.has_changed().unwrap(),
            "the same status again is no change"
        );
        s.put("a", pod("Running"));
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        s.remove("b");
        assert!(
            !rx.has_changed().unwrap(),
            "removing an unknown pod is no change"
        );
        s.remove("a");
        assert!(rx.has_changed().unwrap());
        assert!(s.read().unwrap().is_empty());
    }
}
