//! The scheduler and controllers inside `keelson server`, driven by the real kubectl, with Node
//! objects made by the test and a stand-in kubelet (a task of the test that reports bound pods
//! Running and Ready after a short delay, and confirms deletions). No agents, no containers.
mod common;

use std::{
    collections::{HashMap, HashSet},
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use common::{KillOnDrop, Kubectl, Server};
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, Patch, PatchParams},
};

fn node_yaml(name: &str, cpu: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n  labels: {{kubernetes.io/hostname: {name}}}\nstatus:\n  allocatable: {{cpu: \"{cpu}\", memory: 4Gi, pods: \"110\"}}\n  capacity: {{cpu: \"{cpu}\", memory: 4Gi, pods: \"110\"}}\n  conditions: [{{type: Ready, status: \"True\", reason: KubeletReady}}]\n"
    )
}

/// The stand-in kubelet: bound pods turn Running and Ready `delay` after they are seen (unless
/// their name is in `hold`), deleted pods are confirmed at once.
struct FakeKubelet {
    stop: Arc<AtomicBool>,
    hold: Arc<Mutex<HashSet<String>>>,
}

impl FakeKubelet {
    fn start(client: Client, delay: Duration) -> FakeKubelet {
        let stop = Arc::new(AtomicBool::new(false));
        let hold = Arc::new(Mutex::new(HashSet::<String>::new()));
        let (s, h) = (stop.clone(), hold.clone());
        tokio::spawn(async move {
            let pods: Api<Pod> = Api::all(client.clone());
            let mut seen: HashMap<String, Instant> = HashMap::new();
            let mut next_ip = 1u32;
            while !s.load(Ordering::Relaxed) {
                let Ok(list) = pods.list(&ListParams::default()).await else {
                    continue;
                };
                for p in list.items {
                    let ns = p.metadata.namespace.clone().unwrap_or_default();
                    let name = p.metadata.name.clone().unwrap_or_default();
                    let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
                    if p.metadata.deletion_timestamp.is_some() {
                        let _ = api
                            .delete(&name, &DeleteParams::default().grace_period(0))
                            .await;
                        continue;
                    }
                    let node = p
                        .spec
                        .as_ref()
                        .and_then(|s| s.node_name.clone())
                        .unwrap_or_default();
                    if node.is_empty() {
                        continue;
                    }
                    let held = h
                        .lock()
                        .unwrap()
                        .iter()
                        .any(|x| name.starts_with(x.as_str()));
                    let ready = p
                        .status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .is_some_and(|cs| {
                            cs.iter().any(|c| c.type_ == "Ready" && c.status == "True")
                        });
                    let first = *seen.entry(name.clone()).or_insert_with(Instant::now);
                    let want_ready = !held && first.elapsed() >= delay;
                    if ready == want_ready
                        && p.status.as_ref().and_then(|s| s.pod_ip.as_ref()).is_some()
                    {
                        continue;
                    }
                    let ip = p
                        .status
                        .as_ref()
                        .and_then(|s| s.pod_ip.clone())
                        .unwrap_or_else(|| {
                            next_ip += 1;
                            format!("10.244.{}.{}", next_ip / 250, next_ip % 250 + 2)
                        });
                    let now = jiff::Timestamp::now()
                        .strftime("%Y-%m-%dT%H:%M:%SZ")
                        .to_string();
                    let st = if want_ready { "True" } else { "False" };
                    let patch = serde_json::json!({"status": {"phase": "Running", "podIP": ip, "conditions": [
                        {"type": "Ready", "status": st, "lastTransitionTime": now},
                        {"type": "ContainersReady", "status": st, "lastTransitionTime": now}]}});
                    let _ = api
                        .patch_status(&name, &PatchParams::default(), &Patch::Strategic(&patch))
                        .await;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        FakeKubelet { stop, hold }
    }
}

impl Drop for FakeKubelet {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A server with Node objects and the stand-in kubelet, and the runtime the kubelet (and any
/// API client or observer of a scenario) runs on; the scenarios themselves block.
struct Plane {
    kubelet: FakeKubelet,
    server: Server,
    /// The nodes whose Lease is renewed, when [`renew_leases`] was started with it.
    alive: Arc<Mutex<HashSet<String>>>,
    /// Stops the Lease renewals.
    stop: Arc<AtomicBool>,
    rt: tokio::runtime::Runtime,
}

impl Plane {
    /// A kube-rs client with the admin kubeconfig.
    fn client(&self) -> Client {
        self.rt.block_on(self.server.client())
    }
}

/// The runtime of a [`Plane`]: two workers, as the tests had when they were async.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// kubectl goes to the server (`s.ok(...)` through `Deref`).
impl std::ops::Deref for Plane {
    type Target = Server;
    fn deref(&self) -> &Server {
        &self.server
    }
}

impl Drop for Plane {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[test]
fn deployments_roll_replicasets_heal_services_get_endpoints() {
    let rt = runtime();
    let s = Server::start(&[]);
    for n in ["n1", "n2", "n3"] {
        s.apply(&node_yaml(n, "2"));
    }
    let kubelet =
        rt.block_on(async { FakeKubelet::start(s.client().await, Duration::from_millis(300)) });
    let p = Plane {
        kubelet,
        server: s,
        alive: Arc::default(),
        stop: Arc::default(),
        rt,
    };
    crate::scenarios!(&p;
        a_deployment_spreads_over_the_nodes_and_its_rollout_completes,
        a_rolling_update_keeps_within_max_surge_and_max_unavailable_at_every_step,
        a_rollback_returns_the_pods_to_the_first_template,
        restart_rolls_every_pod_and_a_paused_rollout_waits_for_resume,
        a_rollout_whose_pods_never_get_ready_exceeds_its_progress_deadline,
        a_deleted_pod_is_replaced_by_its_replica_set,
        a_services_endpoints_and_endpoint_slice_follow_readiness,
        a_pod_that_fits_nowhere_says_why_like_kube_scheduler,
        a_recreate_rollout_never_runs_old_and_new_pods_together,
        a_pending_pod_lands_on_a_node_that_fits_when_it_arrives,
        capacity_freed_by_a_deleted_pod_lets_a_waiting_pod_in,
    );
}

/// A Deployment spreads over the nodes and its rollout completes.
fn a_deployment_spreads_over_the_nodes_and_its_rollout_completes(s: &Plane) {
    s.ok(&[
        "create",
        "deployment",
        "web",
        "--image=busybox:1.36",
        "--replicas=3",
        "--port=8080",
    ]);
    s.ok(&["rollout", "status", "deployment/web", "--timeout=60s"]);
    let nodes = s.jsonpath(
        &["get", "pods", "-l", "app=web"],
        "{.items[*].spec.nodeName}",
    );
    let distinct: HashSet<&str> = nodes.split_whitespace().collect();
    assert_eq!(distinct.len(), 3, "one pod per node: {nodes}");
    let events = s.ok(&["get", "events"]);
    assert!(
        events.contains("Scheduled") && events.contains("Successfully assigned default/web-"),
        "{events}"
    );
    assert!(events.contains("ScalingReplicaSet"), "{events}");
    assert!(events.contains("SuccessfulCreate"), "{events}");
}

/// Scale, then a rolling update that keeps within maxSurge/maxUnavailable at every step.
/// Builds on the Deployment `web` (3 replicas on busybox:1.36).
fn a_rolling_update_keeps_within_max_surge_and_max_unavailable_at_every_step(s: &Plane) {
    s.ok(&["scale", "deployment", "web", "--replicas=4"]);
    s.ok(&["rollout", "status", "deployment/web", "--timeout=60s"]);
    let client = s.client();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let watching = Arc::new(AtomicBool::new(true));
    let (w, p2) = (watching.clone(), pods.clone());
    let observer = s.rt.spawn(async move {
        // (max pods alive, min ready) over the rollout
        let (mut max_alive, mut min_ready) = (0usize, usize::MAX);
        while w.load(Ordering::Relaxed) {
            if let Ok(l) = p2.list(&ListParams::default().labels("app=web")).await {
                let alive: Vec<&Pod> = l
                    .items
                    .iter()
                    .filter(|p| p.metadata.deletion_timestamp.is_none())
                    .collect();
                let ready = alive
                    .iter()
                    .filter(|p| {
                        p.status
                            .as_ref()
                            .and_then(|s| s.conditions.as_ref())
                            .is_some_and(|cs| {
                                cs.iter().any(|c| c.type_ == "Ready" && c.status == "True")
                            })
                    })
                    .count();
                max_alive = max_alive.max(alive.len());
                min_ready = min_ready.min(ready);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        (max_alive, min_ready)
    });
    s.ok(&["set", "image", "deployment/web", "busybox=busybox:1.37"]);
    s.ok(&["rollout", "status", "deployment/web", "--timeout=90s"]);
    watching.store(false, Ordering::Relaxed);
    let (max_alive, min_ready) = s.rt.block_on(observer).unwrap();
    // 4 replicas, 25%: maxSurge 1, maxUnavailable 1.
    assert!(
        max_alive <= 5,
        "at most replicas + maxSurge pods: {max_alive}"
    );
    assert!(
        min_ready >= 3,
        "at least replicas - maxUnavailable ready: {min_ready}"
    );
    let images = s.jsonpath(
        &["get", "pods", "-l", "app=web"],
        "{.items[*].spec.containers[0].image}",
    );
    assert_eq!(
        images
            .split_whitespace()
            .filter(|i| *i == "busybox:1.37")
            .count(),
        4,
        "{images}"
    );
    let rs = s.ok(&["get", "rs", "-l", "app=web"]);
    assert_eq!(
        rs.lines().count(),
        3,
        "header + new + old (kept for history): {rs}"
    );
}

/// Rollback to the first template. Builds on the rolling update of `web` to busybox:1.37.
fn a_rollback_returns_the_pods_to_the_first_template(s: &Plane) {
    s.ok(&["rollout", "undo", "deployment/web"]);
    s.ok(&["rollout", "status", "deployment/web", "--timeout=90s"]);
    s.until(30, "pods back on busybox:1.36", || {
        let images = s.jsonpath(
            &["get", "pods", "-l", "app=web"],
            "{.items[*].spec.containers[0].image}",
        );
        images
            .split_whitespace()
            .filter(|i| *i == "busybox:1.36")
            .count()
            == 4
            && images.split_whitespace().count() == 4
    });
    let history = s.ok(&["rollout", "history", "deployment/web"]);
    assert!(history.contains('2') && history.contains('3'), "{history}");
}

/// restart rolls every pod; pause stops a rollout, resume finishes it. Builds on `web`'s 4
/// pods.
fn restart_rolls_every_pod_and_a_paused_rollout_waits_for_resume(s: &Plane) {
    let before = s.jsonpath(
        &["get", "pods", "-l", "app=web"],
        "{.items[*].metadata.name}",
    );
    s.ok(&["rollout", "restart", "deployment/web"]);
    s.ok(&["rollout", "status", "deployment/web", "--timeout=90s"]);
    s.until(30, "all pods replaced by the restart", || {
        let now = s.jsonpath(
            &["get", "pods", "-l", "app=web"],
            "{.items[*].metadata.name}",
        );
        now.split_whitespace().count() == 4 && now.split_whitespace().all(|n| !before.contains(n))
    });
    s.ok(&["rollout", "pause", "deployment/web"]);
    s.ok(&["set", "image", "deployment/web", "busybox=busybox:1.38"]);
    std::thread::sleep(Duration::from_secs(2));
    let images = s.jsonpath(
        &["get", "pods", "-l", "app=web"],
        "{.items[*].spec.containers[0].image}",
    );
    assert!(
        !images.contains("busybox:1.38"),
        "a paused deployment does not roll: {images}"
    );
    s.ok(&["rollout", "resume", "deployment/web"]);
    s.ok(&["rollout", "status", "deployment/web", "--timeout=90s"]);
    s.until(30, "the resumed rollout", || {
        s.jsonpath(
            &["get", "pods", "-l", "app=web"],
            "{.items[*].spec.containers[0].image}",
        )
        .split_whitespace()
        .filter(|i| *i == "busybox:1.38")
        .count()
            == 4
    });
}

/// A rollout whose pods never get ready runs into its progress deadline.
fn a_rollout_whose_pods_never_get_ready_exceeds_its_progress_deadline(s: &Plane) {
    s.kubelet.hold.lock().unwrap().insert("stuck-".into());
    s.apply("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: stuck}\nspec:\n  replicas: 1\n  progressDeadlineSeconds: 2\n  selector: {matchLabels: {app: stuck}}\n  template:\n    metadata: {labels: {app: stuck}}\n    spec:\n      containers: [{name: c, image: busybox:1.36}]\n",
    );
    let o = s.kubectl(&["rollout", "status", "deployment/stuck", "--timeout=30s"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("exceeded its progress deadline"),
        "{err}"
    );
    assert_eq!(
        s.jsonpath(
            &["get", "deploy", "stuck"],
            "{.status.conditions[?(@.type==\"Progressing\")].reason}"
        ),
        "ProgressDeadlineExceeded"
    );
    s.ok(&["delete", "deploy", "stuck"]);
}

/// A deleted pod is replaced. Builds on `web`'s 4 pods.
fn a_deleted_pod_is_replaced_by_its_replica_set(s: &Plane) {
    let victim = s.jsonpath(
        &["get", "pods", "-l", "app=web"],
        "{.items[0].metadata.name}",
    );
    s.ok(&["delete", "pod", &victim]);
    s.until(30, "the ReplicaSet to replace the pod", || {
        let names = s.jsonpath(
            &["get", "pods", "-l", "app=web"],
            "{.items[*].metadata.name}",
        );
        !names.contains(&victim) && names.split_whitespace().count() == 4
    });
}

/// A Service gets Endpoints and an EndpointSlice that follow readiness. Builds on `web`'s 4
/// pods; one of them stays held not ready afterwards.
fn a_services_endpoints_and_endpoint_slice_follow_readiness(s: &Plane) {
    s.ok(&[
        "expose",
        "deployment",
        "web",
        "--port=80",
        "--target-port=8080",
    ]);
    s.until(20, "4 endpoints", || {
        s.jsonpath(
            &["get", "endpoints", "web"],
            "{.subsets[*].addresses[*].ip}",
        )
        .split_whitespace()
        .count()
            == 4
    });
    assert_eq!(
        s.jsonpath(&["get", "endpoints", "web"], "{.subsets[0].ports[0].port}"),
        "8080"
    );
    let slice = s.jsonpath(
        &[
            "get",
            "endpointslices",
            "-l",
            "kubernetes.io/service-name=web",
        ],
        "{.items[0].endpoints[*].conditions.ready}",
    );
    assert_eq!(
        slice.split_whitespace().filter(|r| *r == "true").count(),
        4,
        "{slice}"
    );
    let one = s.jsonpath(
        &["get", "pods", "-l", "app=web"],
        "{.items[0].metadata.name}",
    );
    s.kubelet.hold.lock().unwrap().insert(one.clone());
    s.until(20, "a not-ready pod to move to notReadyAddresses", || {
        s.jsonpath(
            &["get", "endpoints", "web"],
            "{.subsets[*].notReadyAddresses[*].targetRef.name}",
        ) == one
    });
    let ready = s.jsonpath(
        &[
            "get",
            "endpointslices",
            "-l",
            "kubernetes.io/service-name=web",
        ],
        "{.items[0].endpoints[*].conditions.ready}",
    );
    assert_eq!(
        ready.split_whitespace().filter(|r| *r == "false").count(),
        1,
        "{ready}"
    );
}

/// A pod that fits nowhere says why, like kube-scheduler. The pod `big` (3 CPUs, more than
/// any of the 2-CPU nodes has) stays pending for the scenarios after.
fn a_pod_that_fits_nowhere_says_why_like_kube_scheduler(s: &Plane) {
    s.apply("apiVersion: v1\nkind: Pod\nmetadata: {name: picky}\nspec:\n  nodeSelector: {disk: none}\n  containers: [{name: c, image: busybox:1.36}]\n",
    );
    s.apply("apiVersion: v1\nkind: Pod\nmetadata: {name: big}\nspec:\n  containers: [{name: c, image: busybox:1.36, resources: {requests: {cpu: \"3\"}}}]\n",
    );
    s.until(20, "PodScheduled=False on picky", || {
        s.jsonpath(
            &["get", "pod", "picky"],
            "{.status.conditions[?(@.type==\"PodScheduled\")].message}",
        ) == "0/3 nodes are available: 3 node(s) didn't match Pod's node affinity/selector."
    });
    s.until(20, "PodScheduled=False on big", || {
        s.jsonpath(
            &["get", "pod", "big"],
            "{.status.conditions[?(@.type==\"PodScheduled\")].message}",
        ) == "0/3 nodes are available: 3 Insufficient cpu."
    });
    let ev = s.ok(&[
        "get",
        "events",
        "--field-selector",
        "reason=FailedScheduling",
    ]);
    assert!(ev.contains("pod/picky") && ev.contains("Warning"), "{ev}");
}

/// Recreate: every old pod is gone before a new one is made.
fn a_recreate_rollout_never_runs_old_and_new_pods_together(s: &Plane) {
    s.apply("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: re}\nspec:\n  replicas: 2\n  strategy: {type: Recreate}\n  selector: {matchLabels: {app: re}}\n  template:\n    metadata: {labels: {app: re}}\n    spec:\n      containers: [{name: c, image: busybox:1.36}]\n",
    );
    s.ok(&["rollout", "status", "deployment/re", "--timeout=60s"]);
    let pods_api: Api<Pod> = Api::namespaced(s.client(), "default");
    let mixed = Arc::new(AtomicBool::new(false));
    let watching = Arc::new(AtomicBool::new(true));
    let (m, w) = (mixed.clone(), watching.clone());
    let observer = s.rt.spawn(async move {
        while w.load(Ordering::Relaxed) {
            if let Ok(l) = pods_api.list(&ListParams::default().labels("app=re")).await {
                let images: HashSet<String> = l
                    .items
                    .iter()
                    .filter_map(|p| {
                        p.spec
                            .as_ref()
                            .map(|s| s.containers[0].image.clone().unwrap_or_default())
                    })
                    .collect();
                if images.len() > 1 {
                    m.store(true, Ordering::Relaxed);
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    s.ok(&["set", "image", "deployment/re", "c=busybox:1.37"]);
    s.ok(&["rollout", "status", "deployment/re", "--timeout=60s"]);
    watching.store(false, Ordering::Relaxed);
    s.rt.block_on(observer).unwrap();
    assert!(
        !mixed.load(Ordering::Relaxed),
        "Recreate never runs old and new pods together"
    );
    s.ok(&["delete", "deploy", "re"]);
}

/// A node that fits arrives: the pod is scheduled there. Builds on the pending pod `big`.
fn a_pending_pod_lands_on_a_node_that_fits_when_it_arrives(s: &Plane) {
    s.apply(&node_yaml("n4", "8"));
    s.until(20, "big to land on n4", || {
        s.jsonpath(&["get", "pod", "big"], "{.spec.nodeName}") == "n4"
    });
}

/// Capacity freed by a deleted pod lets a waiting pod in. Builds on `big` running on n4, the
/// only node with room for either pod.
fn capacity_freed_by_a_deleted_pod_lets_a_waiting_pod_in(s: &Plane) {
    s.apply("apiVersion: v1\nkind: Pod\nmetadata: {name: big2}\nspec:\n  containers: [{name: c, image: busybox:1.36, resources: {requests: {cpu: \"7\"}}}]\n",
    );
    s.until(20, "big2 to wait", || {
        s.jsonpath(
            &["get", "pod", "big2"],
            "{.status.conditions[?(@.type==\"PodScheduled\")].reason}",
        ) == "Unschedulable"
    });
    s.ok(&["delete", "pod", "big"]);
    s.until(20, "big2 to land on n4", || {
        s.jsonpath(&["get", "pod", "big2"], "{.spec.nodeName}") == "n4"
    });
}

/// Renews the Lease of each named node every 500 ms while it is in `alive`.
fn renew_leases(client: Client, alive: Arc<Mutex<HashSet<String>>>, stop: Arc<AtomicBool>) {
    use k8s_openapi::api::coordination::v1::Lease;
    tokio::spawn(async move {
        let leases: Api<Lease> = Api::namespaced(client, "kube-node-lease");
        while !stop.load(Ordering::Relaxed) {
            let names: Vec<String> = alive.lock().unwrap().iter().cloned().collect();
            for n in names {
                let now = jiff::Timestamp::now()
                    .strftime("%Y-%m-%dT%H:%M:%S.%6fZ")
                    .to_string();
                let lease = serde_json::json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": n, "namespace": "kube-node-lease"},
                    "spec": {"holderIdentity": n, "leaseDurationSeconds": 40, "renewTime": now}});
                let _ = leases
                    .patch(
                        &n,
                        &PatchParams::apply("test").force(),
                        &Patch::Apply(&lease),
                    )
                    .await;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
}

#[test]
fn lost_nodes_garbage_collection_and_node_ipam() {
    let rt = runtime();
    let s = Server::start(&[
        "--node-monitor-grace-period",
        "3s",
        "--default-unreachable-toleration-seconds",
        "2",
    ]);
    let client = rt.block_on(s.client());
    let alive = Arc::new(Mutex::new(HashSet::from([
        "n1".to_string(),
        "n2".to_string(),
    ])));
    let stop = Arc::new(AtomicBool::new(false));
    rt.block_on(async { renew_leases(client.clone(), alive.clone(), stop.clone()) });
    for n in ["n1", "n2"] {
        s.apply(&node_yaml(n, "4"));
    }
    let kubelet =
        rt.block_on(async { FakeKubelet::start(client.clone(), Duration::from_millis(100)) });
    let p = Plane {
        kubelet,
        server: s,
        alive,
        stop,
        rt,
    };
    crate::scenarios!(&p;
        node_ipam_gives_each_node_a_block_lowest_first_and_reuses_a_deleted_nodes_block,
        a_deployment_spreads_its_pods_over_both_nodes,
        a_silent_node_turns_unknown_is_tainted_and_its_pods_move_to_the_other_node,
        a_node_that_comes_back_loses_its_taints,
        a_daemon_set_runs_one_pod_per_eligible_node_and_rolls,
        orphaning_a_deployment_keeps_its_replica_set_without_an_owner,
        foreground_deletion_keeps_the_replica_set_until_its_pods_are_gone,
        background_deletion_removes_the_dependents_after_their_owner,
        a_new_namespace_gets_its_default_service_account,
    );
}

/// How many of the Deployment `web`'s pods are on `node`.
fn web_pods_on(s: &Plane, node: &str) -> usize {
    s.jsonpath(
        &[
            "get",
            "pods",
            "-l",
            "app=web",
            "--field-selector",
            &format!("spec.nodeName={node}"),
        ],
        "{.items[*].metadata.name}",
    )
    .split_whitespace()
    .count()
}

/// Node IPAM: a block each, lowest first; a deleted node's block is handed out again.
fn node_ipam_gives_each_node_a_block_lowest_first_and_reuses_a_deleted_nodes_block(s: &Plane) {
    s.until(10, "pod CIDRs", || {
        s.jsonpath(&["get", "nodes"], "{.items[*].spec.podCIDR}")
            .split_whitespace()
            .count()
            == 2
    });
    let cidrs = s.jsonpath(&["get", "nodes"], "{.items[*].spec.podCIDR}");
    assert_eq!(cidrs, "10.244.0.0/24 10.244.1.0/24");
    s.apply(&node_yaml("n9", "4"));
    s.until(10, "n9's CIDR", || {
        s.jsonpath(&["get", "node", "n9"], "{.spec.podCIDR}") == "10.244.2.0/24"
    });
    s.ok(&["delete", "node", "n9"]);
    s.apply(&node_yaml("n8", "4"));
    s.until(10, "n8 reuses n9's block", || {
        s.jsonpath(&["get", "node", "n8"], "{.spec.podCIDR}") == "10.244.2.0/24"
    });
    s.ok(&["delete", "node", "n8"]);
}

/// The Deployment `web` spreads its 4 pods over n1 and n2. Pods tolerate an unreachable node
/// for 2 s (the server's DefaultTolerationSeconds), which the scenario after relies on.
fn a_deployment_spreads_its_pods_over_both_nodes(s: &Plane) {
    s.apply("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec:\n  replicas: 4\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    spec:\n      containers: [{name: web, image: busybox:1.36}]\n",
    );
    s.ok(&["rollout", "status", "deployment/web", "--timeout=60s"]);
    let on = |node: &str| web_pods_on(s, node);
    assert_eq!(on("n1") + on("n2"), 4);
    assert!(on("n2") > 0, "spread over both nodes");
}

/// n2 goes silent: Unknown, tainted, its pods evicted and replaced on n1. Builds on `web`'s
/// pods on both nodes.
fn a_silent_node_turns_unknown_is_tainted_and_its_pods_move_to_the_other_node(s: &Plane) {
    let on = |node: &str| web_pods_on(s, node);
    s.alive.lock().unwrap().remove("n2");
    s.until(20, "n2 to turn NotReady", || {
        s.ok(&["get", "node", "n2"]).contains("NotReady")
    });
    assert_eq!(
        s.jsonpath(
            &["get", "node", "n2"],
            "{.status.conditions[?(@.type==\"Ready\")].reason}"
        ),
        "NodeStatusUnknown"
    );
    let taints = s.jsonpath(&["get", "node", "n2"], "{.spec.taints[*].key}");
    assert_eq!(
        taints,
        "node.kubernetes.io/unreachable node.kubernetes.io/unreachable"
    );
    s.until(30, "all 4 pods to run on n1", || on("n1") == 4);
    s.ok(&["rollout", "status", "deployment/web", "--timeout=60s"]);
}

/// n2 comes back (its lease renewed, Ready posted as a kubelet does): the taints go. Builds on
/// n2 gone silent.
fn a_node_that_comes_back_loses_its_taints(s: &Plane) {
    s.alive.lock().unwrap().insert("n2".into());
    s.until(20, "n2's taints to go", || {
        s.ok(&[
            "patch", "node", "n2", "--subresource=status", "--type=merge", "-p",
            r#"{"status":{"conditions":[{"type":"Ready","status":"True","reason":"KubeletReady"}]}}"#,
        ]);
        s.jsonpath(&["get", "node", "n2"], "{.spec.taints}").is_empty()
    });
}

/// A DaemonSet runs one pod per eligible node (not on a node labelled away), and rolls.
fn a_daemon_set_runs_one_pod_per_eligible_node_and_rolls(s: &Plane) {
    s.ok(&["label", "node", "n1", "daemons=yes"]);
    s.ok(&["label", "node", "n2", "daemons=yes"]);
    s.apply("apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {name: agent}\nspec:\n  selector: {matchLabels: {app: agent}}\n  template:\n    metadata: {labels: {app: agent}}\n    spec:\n      nodeSelector: {daemons: \"yes\"}\n      containers: [{name: a, image: busybox:1.36}]\n",
    );
    let ds_nodes = || {
        let mut v: Vec<String> = s
            .jsonpath(
                &["get", "pods", "-l", "app=agent"],
                "{.items[*].spec.nodeName}",
            )
            .split_whitespace()
            .map(str::to_string)
            .collect();
        v.sort();
        v.join(" ")
    };
    s.until(20, "a daemon pod on n1 and n2", || ds_nodes() == "n1 n2");
    s.until(20, "the DaemonSet to report 2 ready", || {
        s.jsonpath(
            &["get", "ds", "agent"],
            "{.status.desiredNumberScheduled} {.status.numberReady}",
        ) == "2 2"
    });
    s.ok(&["label", "node", "n2", "daemons-"]);
    s.until(20, "the pod to leave n2", || ds_nodes() == "n1");
    s.ok(&["set", "image", "ds/agent", "a=busybox:1.37"]);
    s.until(30, "the daemon pod to be replaced", || {
        s.jsonpath(
            &["get", "pods", "-l", "app=agent"],
            "{.items[*].spec.containers[0].image}",
        ) == "busybox:1.37"
    });
    s.ok(&["delete", "ds", "agent"]);
}

/// Garbage collection: orphaning keeps the pods, without their owner. Builds on the
/// Deployment `web`.
fn orphaning_a_deployment_keeps_its_replica_set_without_an_owner(s: &Plane) {
    let rs = s.jsonpath(&["get", "rs", "-l", "app=web"], "{.items[0].metadata.name}");
    s.ok(&["delete", "deployment", "web", "--cascade=orphan"]);
    s.until(20, "the deployment to go", || {
        !s.ok(&["get", "deploy"]).contains("web")
    });
    s.until(20, "the ReplicaSet to lose its owner", || {
        s.jsonpath(&["get", "rs", &rs], "{.metadata.ownerReferences}")
            .is_empty()
    });
}

/// Foreground: the ReplicaSet stays until its pods are gone. Builds on `web`'s ReplicaSet,
/// orphaned with its pods.
fn foreground_deletion_keeps_the_replica_set_until_its_pods_are_gone(s: &Plane) {
    let rs = s.jsonpath(&["get", "rs", "-l", "app=web"], "{.items[0].metadata.name}");
    s.ok(&["delete", "rs", &rs, "--cascade=foreground", "--wait=false"]);
    s.until(30, "pods and ReplicaSet gone", || {
        s.jsonpath(
            &["get", "pods", "-l", "app=web"],
            "{.items[*].metadata.name}",
        )
        .is_empty()
            && !s.ok(&["get", "rs"]).contains(&rs)
    });
}

/// Background (kubectl's default): dependents go after the owner.
fn background_deletion_removes_the_dependents_after_their_owner(s: &Plane) {
    s.ok(&[
        "create",
        "deployment",
        "bg",
        "--image=busybox:1.36",
        "--replicas=2",
    ]);
    s.ok(&["rollout", "status", "deployment/bg", "--timeout=60s"]);
    s.ok(&["delete", "deployment", "bg"]);
    s.until(30, "bg's ReplicaSet and pods gone", || {
        s.ok(&["get", "rs,pods", "-l", "app=bg", "-o", "name"])
            .trim()
            .is_empty()
    });
}

/// A new namespace gets its default ServiceAccount.
fn a_new_namespace_gets_its_default_service_account(s: &Plane) {
    s.ok(&["create", "namespace", "team"]);
    s.until(10, "the default ServiceAccount", || {
        s.ok(&["get", "sa", "-n", "team"]).contains("default")
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_controller_manager_takes_over_without_doubling_pods() {
    let s = Server::start(&["--no-controllers"]);
    let kc = s.kubeconfig();
    let election = [
        "--leader-elect-lease-duration",
        "3s",
        "--leader-elect-renew-deadline",
        "2s",
        "--leader-elect-retry-period",
        "500ms",
    ];
    let spawn = |what: &str| {
        KillOnDrop(
            Command::new(env!("CARGO_BIN_EXE_keelson"))
                .arg(what)
                .arg("--kubeconfig")
                .arg(&kc)
                .args(election)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        )
    };
    let _scheduler = spawn("scheduler");
    let a = spawn("controllers");
    let b = spawn("controllers");
    for n in ["n1", "n2"] {
        s.apply(&node_yaml(n, "4"));
    }
    let kubelet = FakeKubelet::start(s.client().await, Duration::from_millis(100));
    s.ok(&[
        "create",
        "deployment",
        "web",
        "--image=busybox:1.36",
        "--replicas=3",
    ]);
    s.ok(&["rollout", "status", "deployment/web", "--timeout=60s"]);
    let count = || {
        s.jsonpath(
            &["get", "pods", "-l", "app=web"],
            "{.items[*].metadata.name}",
        )
        .split_whitespace()
        .count()
    };
    assert_eq!(count(), 3);
    let holder = s.jsonpath(
        &[
            "get",
            "lease",
            "-n",
            "kube-system",
            "kube-controller-manager",
        ],
        "{.spec.holderIdentity}",
    );
    let pid_of = |h: &str| {
        h.split('_')
            .nth(1)
            .and_then(|p| p.parse::<u32>().ok())
            .unwrap()
    };
    let leader_pid = pid_of(&holder);
    assert!(leader_pid == a.0.id() || leader_pid == b.0.id(), "{holder}");
    let (leader, standby) = if leader_pid == a.0.id() {
        (a, b)
    } else {
        (b, a)
    };
    drop(leader);
    s.ok(&["scale", "deployment", "web", "--replicas=5"]);
    s.until(30, "the standby to take over and scale", || count() == 5);
    let holder = s.jsonpath(
        &[
            "get",
            "lease",
            "-n",
            "kube-system",
            "kube-controller-manager",
        ],
        "{.spec.holderIdentity}",
    );
    assert_eq!(pid_of(&holder), standby.0.id());
    s.ok(&["rollout", "status", "deployment/web", "--timeout=60s"]);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(count(), 5, "no pod doubled");
    let rs = s.ok(&["get", "rs", "-o", "name"]);
    assert_eq!(rs.lines().count(), 1, "{rs}");
    drop(kubelet);
}
