//! The pod manager: which pods this node runs. `reconcile` is a pure function from the
//! desired pods (manifests, and in a cluster the API's pods bound here) and the workers that
//! run or are stopping to the actions that bring them together; `PodManager` keeps that
//! bookkeeping and carries the actions out. Deletion is decided here and only here: a worker
//! stops because its pod left the desired set (grace from the spec) or was deleted in the API
//! (grace from the deletion), and the API object goes once its worker has finished.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use k8s_openapi::api::core::v1::Pod;
use tokio::{sync::mpsc, task::JoinHandle};
use tracing::Instrument;

use super::{
    AgentCtx, cluster,
    manifest::StaticPod,
    worker::{Msg, PodWorker},
};
use crate::runtime::container::Listed;

/// What the pod manager does next.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Start a worker for this pod.
    Start(StaticPod),
    /// Stop the worker of pod `uid` (`grace` overrides the spec's); when the pod was deleted
    /// in the API, `deleted` is that pod, whose object goes once the worker has finished.
    Stop {
        uid: String,
        grace: Option<i64>,
        deleted: Option<Pod>,
    },
    /// Remove the API object of a deleted pod that nothing runs (grace 0, its uid).
    FinishDelete(Pod),
}

/// What runs on the node, as the pod manager sees it.
#[derive(Debug, Default)]
pub struct Running {
    /// Pods with a live worker: UID → `namespace/name`.
    pub workers: HashMap<String, String>,
    /// Workers told to stop and not finished yet: UID → `namespace/name`.
    pub stopping: HashMap<String, String>,
    /// API pods being deleted that were already acted on.
    pub deleting: HashSet<String>,
}

/// `namespace/name` of a pod.
pub fn full_name(p: &Pod) -> String {
    format!(
        "{}/{}",
        p.metadata.namespace.as_deref().unwrap_or("default"),
        p.metadata.name.as_deref().unwrap_or("")
    )
}

fn is_mirror(p: &Pod) -> bool {
    p.metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(cluster::MIRROR))
}

/// The actions that bring `running` to the desired pods: the static pods of the manifests,
/// and `api`, the pods the API binds to this node (mirror pods excluded: their manifest is
/// the source).
pub fn reconcile(statics: Vec<StaticPod>, api: &[Arc<Pod>], running: &Running) -> Vec<Action> {
    let mut actions = vec![];
    let mut desired = statics;
    for p in api {
        let uid = p.metadata.uid.clone().unwrap_or_default();
        let deleted = p.metadata.deletion_timestamp.is_some();
        if deleted && running.deleting.contains(&uid) {
            continue;
        }
        if is_mirror(p) {
            // A deleted mirror pod goes at once; the mirror sync makes it again if wanted.
            if deleted {
                actions.push(Action::FinishDelete((**p).clone()));
            }
            continue;
        }
        if !deleted {
            desired.push(StaticPod {
                pod: (**p).clone(),
                file: "api".into(),
            });
            continue;
        }
        if running.workers.contains_key(&uid) {
            actions.push(Action::Stop {
                uid,
                grace: p.metadata.deletion_grace_period_seconds,
                deleted: Some((**p).clone()),
            });
        } else if !running.stopping.contains_key(&uid) {
            actions.push(Action::FinishDelete((**p).clone()));
        }
    }
    let want: HashSet<&str> = desired
        .iter()
        .filter_map(|p| p.pod.metadata.uid.as_deref())
        .collect();
    let mut stopping: HashSet<&str> = running.stopping.values().map(String::as_str).collect();
    let mut gone: Vec<&String> = running
        .workers
        .keys()
        .filter(|u| !want.contains(u.as_str()))
        .collect();
    gone.sort();
    for uid in gone {
        let already = actions
            .iter()
            .any(|a| matches!(a, Action::Stop { uid: u, .. } if u == uid));
        if !already {
            actions.push(Action::Stop {
                uid: uid.clone(),
                grace: None,
                deleted: None,
            });
        }
    }
    for a in &actions {
        if let Action::Stop { uid, .. } = a
            && let Some(name) = running.workers.get(uid)
        {
            stopping.insert(name);
        }
    }
    for sp in desired {
        let uid = sp.pod.metadata.uid.as_deref().unwrap_or_default();
        if running.workers.contains_key(uid) {
            continue;
        }
        // A new version of a pod starts once the previous one has terminated, as kubelet
        // does for static pods.
        if stopping.contains(full_name(&sp.pod).as_str()) {
            tracing::debug!(pod = %full_name(&sp.pod), "waiting for the previous instance to terminate");
            continue;
        }
        actions.push(Action::Start(sp));
    }
    actions
}

struct WorkerHandle {
    tx: mpsc::UnboundedSender<Msg>,
    join: JoinHandle<()>,
    full_name: String,
}

/// The pod manager's state and the side of it that acts.
pub struct PodManager {
    ctx: Arc<AgentCtx>,
    workers: HashMap<String, WorkerHandle>,
    /// Stopping workers: UID → (`namespace/name`, task).
    stopping: HashMap<String, (String, JoinHandle<()>)>,
    /// API pods being deleted whose worker was told to stop: UID → the pod.
    deleting: HashMap<String, Pod>,
    /// Containers found at start, by pod UID, not yet handed to a worker.
    adopted: HashMap<String, Vec<Listed>>,
    /// Workers report their UID here when they end.
    done: mpsc::UnboundedSender<String>,
}

impl PodManager {
    pub fn new(
        ctx: Arc<AgentCtx>,
        adopted: HashMap<String, Vec<Listed>>,
    ) -> (Self, mpsc::UnboundedReceiver<String>) {
        let (done, done_rx) = mpsc::unbounded_channel();
        let m = PodManager {
            ctx,
            workers: HashMap::new(),
            stopping: HashMap::new(),
            deleting: HashMap::new(),
            adopted,
            done,
        };
        (m, done_rx)
    }

    fn running(&self) -> Running {
        Running {
            workers: self
                .workers
                .iter()
                .map(|(u, h)| (u.clone(), h.full_name.clone()))
                .collect(),
            stopping: self
                .stopping
                .iter()
                .map(|(u, (n, _))| (u.clone(), n.clone()))
                .collect(),
            deleting: self.deleting.keys().cloned().collect(),
        }
    }

    /// One pass: the desired pods against the workers.
    pub fn sync(&mut self, statics: Vec<StaticPod>, api: Option<&[Arc<Pod>]>) {
        self.stopping.retain(|_, (_, j)| !j.is_finished());
        if let Some(api) = api {
            let live: HashSet<&str> = api
                .iter()
                .filter_map(|p| p.metadata.uid.as_deref())
                .collect();
            let stopping = &self.stopping;
            self.deleting
                .retain(|u, _| live.contains(u.as_str()) || stopping.contains_key(u));
        }
        let actions = reconcile(statics, api.unwrap_or_default(), &self.running());
        for a in actions {
            self.apply(a);
        }
    }

    fn apply(&mut self, action: Action) {
        match action {
            Action::Start(sp) => self.start(sp),
            Action::Stop {
                uid,
                grace,
                deleted,
            } => {
                let Some(h) = self.workers.remove(&uid) else {
                    return;
                };
                match &deleted {
                    Some(_) => {
                        tracing::info!(pod = %h.full_name, ?grace, "pod deleted in the API: stopping it")
                    }
                    None => tracing::info!(pod = %h.full_name, "pod no longer wanted: stopping it"),
                }
                if let Some(p) = deleted {
                    self.deleting.insert(uid.clone(), p);
                }
                let _ = h.tx.send(Msg::Terminate { grace });
                self.stopping.insert(uid, (h.full_name, h.join));
            }
            Action::FinishDelete(pod) => {
                if let Some(uid) = pod.metadata.uid.clone() {
                    self.deleting.insert(uid, pod.clone());
                }
                self.finish_delete(pod);
            }
        }
    }

    fn start(&mut self, sp: StaticPod) {
        let uid = sp.pod.metadata.uid.clone().unwrap_or_default();
        let full_name = full_name(&sp.pod);
        tracing::info!(pod = %full_name, file = %sp.file.display(), "starting pod");
        let (w, tx) = PodWorker::new(self.ctx.clone(), sp.pod);
        let found = self.adopted.remove(&uid).unwrap_or_default();
        let done = self.done.clone();
        let key = uid.clone();
        // One span per pod: the worker's logs need not name the pod.
        let span = tracing::info_span!("pod", pod = %full_name);
        let join = tokio::spawn(
            async move {
                w.run(found).await;
                let _ = done.send(uid);
            }
            .instrument(span),
        );
        self.workers.insert(
            key,
            WorkerHandle {
                tx,
                join,
                full_name,
            },
        );
    }

    fn finish_delete(&self, pod: Pod) {
        if let Some(client) = &self.ctx.client {
            let client = client.clone();
            tokio::spawn(async move { cluster::finish_delete(&client, &pod).await });
        }
    }

    /// Worker `uid` ended: a pod deleted in the API now goes from it.
    pub fn finished(&mut self, uid: &str) {
        if let Some(pod) = self.deleting.get(uid) {
            self.finish_delete(pod.clone());
        }
    }

    /// Containers found at start that no pod claimed (called after the first pass).
    pub fn take_orphans(&mut self) -> HashMap<String, Vec<Listed>> {
        std::mem::take(&mut self.adopted)
    }

    /// UIDs with a live worker.
    pub fn live(&self) -> HashSet<String> {
        self.workers.keys().cloned().collect()
    }

    /// Ends every worker task (the agent stops; pods keep running).
    pub fn abort(self) {
        for (_, h) in self.workers {
            h.join.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn pod(uid: &str, name: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"uid": uid, "name": name, "namespace": "default"},
        }))
        .unwrap()
    }

    fn deleted(mut p: Pod, grace: i64) -> Pod {
        p.metadata.deletion_timestamp = Some(Time(jiff::Timestamp::UNIX_EPOCH));
        p.metadata.deletion_grace_period_seconds = Some(grace);
        p
    }

    fn mirror(mut p: Pod) -> Pod {
        p.metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert(cluster::MIRROR.into(), "static-uid".into());
        p
    }

    fn manifest(uid: &str, name: &str) -> StaticPod {
        StaticPod {
            pod: pod(uid, name),
            file: format!("/etc/manifests/{name}.yaml").into(),
        }
    }

    fn api(pods: Vec<Pod>) -> Vec<Arc<Pod>> {
        pods.into_iter().map(Arc::new).collect()
    }

    fn running(workers: &[(&str, &str)]) -> Running {
        Running {
            workers: workers
                .iter()
                .map(|(u, n)| (u.to_string(), format!("default/{n}")))
                .collect(),
            ..Default::default()
        }
    }

    fn started(actions: &[Action]) -> Vec<String> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Start(sp) => sp.pod.metadata.uid.clone(),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn manifest_and_api_pods_without_a_worker_start() {
        let actions = reconcile(
            vec![manifest("s1", "web-node1")],
            &api(vec![pod("a1", "api-pod"), pod("a2", "running")]),
            &running(&[("a2", "running")]),
        );
        assert_eq!(started(&actions), ["s1", "a1"]);
        assert_eq!(actions.len(), 2, "{actions:?}");
    }

    #[test]
    fn a_pod_no_longer_desired_stops_with_its_own_grace() {
        let actions = reconcile(vec![], &[], &running(&[("s1", "web-node1")]));
        assert_eq!(
            actions,
            [Action::Stop {
                uid: "s1".into(),
                grace: None,
                deleted: None
            }]
        );
    }

    #[test]
    fn a_pod_deleted_in_the_api_stops_with_the_deletions_grace_once() {
        let gone = deleted(pod("a1", "web"), 5);
        let r = running(&[("a1", "web")]);
        let actions = reconcile(vec![], &api(vec![gone.clone()]), &r);
        assert_eq!(
            actions,
            [Action::Stop {
                uid: "a1".into(),
                grace: Some(5),
                deleted: Some(gone.clone())
            }]
        );
        // Acted on: the next pass leaves it to its worker.
        let r = Running {
            deleting: ["a1".to_string()].into(),
            stopping: [("a1".to_string(), "default/web".to_string())].into(),
            ..Default::default()
        };
        assert!(reconcile(vec![], &api(vec![gone]), &r).is_empty());
    }

    #[test]
    fn a_deleted_api_pod_nothing_runs_is_removed_at_once_and_once() {
        let gone = deleted(pod("a1", "web"), 30);
        let actions = reconcile(vec![], &api(vec![gone.clone()]), &Running::default());
        assert_eq!(actions, [Action::FinishDelete(gone.clone())]);
        let acted = Running {
            deleting: ["a1".to_string()].into(),
            ..Default::default()
        };
        assert!(reconcile(vec![], &api(vec![gone]), &acted).is_empty());
    }

    #[test]
    fn mirror_pods_are_not_run_and_a_deleted_one_goes() {
        let m = mirror(pod("m1", "web-node1"));
        assert!(reconcile(vec![], &api(vec![m.clone()]), &Running::default()).is_empty());
        let gone = deleted(m, 30);
        assert_eq!(
            reconcile(vec![], &api(vec![gone.clone()]), &Running::default()),
            [Action::FinishDelete(gone)]
        );
    }

    #[test]
    fn a_new_version_of_a_pod_waits_until_the_old_one_has_stopped() {
        // The manifest changed: a new UID under the same name.
        let actions = reconcile(
            vec![manifest("v2", "web-node1")],
            &[],
            &running(&[("v1", "web-node1")]),
        );
        assert_eq!(
            actions,
            [Action::Stop {
                uid: "v1".into(),
                grace: None,
                deleted: None
            }]
        );
        let stopping = Running {
            stopping: [("v1".to_string(), "default/web-node1".to_string())].into(),
            ..Default::default()
        };
        assert!(reconcile(vec![manifest("v2", "web-node1")], &[], &stopping).is_empty());
        // Once it has stopped, the new version starts.
        let actions = reconcile(vec![manifest("v2", "web-node1")], &[], &Running::default());
        assert_eq!(started(&actions), ["v2"]);
    }
}
