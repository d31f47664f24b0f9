//! The pod worker on a recording runtime and pod network: what it asks of containerd and the
//! network, in what order, and what status it reports, for each lifecycle rule. Time is
//! paused (back-offs and grace periods pass at once).

use std::{
    collections::HashMap,
    net::Ipv4Addr,
    sync::{Arc, Mutex},
    time::Duration,
};

use k8s_openapi::api::core::v1::Pod;
use serde_json::json;

use super::{Msg, PodWorker, labels};
use crate::{
    agent::{AgentConfig, AgentCtx, logs::Rotation, statuses::PodStatuses},
    net::pod_network::fake::FakeNetwork,
    runtime::{Runtime, fake::FakeRuntime, image::ImageInfo},
};

struct Harness {
    ctx: Arc<AgentCtx>,
    rt: Arc<FakeRuntime>,
    net: Arc<FakeNetwork>,
    _dir: tempfile::TempDir,
}

fn harness() -> Harness {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = Arc::new(Mutex::new(vec![]));
    let rt = Arc::new(FakeRuntime::new(labels::NAME, log.clone()));
    let net = Arc::new(FakeNetwork::new(log));
    let data = dir.path().to_path_buf();
    let cfg = AgentConfig {
        node_name: "node-1".into(),
        pod_cidr: "10.88.0.0/24".parse().expect("cidr"),
        node_ip: Ipv4Addr::new(192, 168, 1, 1),
        data_dir: data.clone(),
        log_dir: data.join("logs"),
        manifests: None,
        containerd: data.join("containerd.sock"),
        namespace: "test".into(),
        bridge: "test0".into(),
        images_dir: data.join("images"),
        pulls: Default::default(),
        image_gc: Default::default(),
        rescan: Duration::from_secs(5),
        resync: Duration::from_secs(60),
        rotation: Rotation::default(),
        join: None,
        kubelet_port: 0,
        client_ca_file: None,
        reserved: Default::default(),
        node_labels: Default::default(),
        stream_idle_timeout: Duration::from_secs(60),
        cni: None,
        shim_per_node: false,
        node_lease: Duration::from_secs(40),
        proxy: None,
        cluster_cidr: "10.88.0.0/16".parse().expect("cidr"),
        service_cidr: None,
        cluster_dns: vec!["10.96.0.10".parse().expect("ip")],
        cluster_domain: "cluster.local".into(),
        resolv_conf: None,
        dns: None,
    };
    for d in [cfg.pods_dir(), cfg.fifo_dir(), cfg.log_dir.clone()] {
        std::fs::create_dir_all(d).expect("dirs");
    }
    let ctx = Arc::new(AgentCtx {
        images: crate::agent::images::Puller::new(rt.clone(), Default::default()),
        rt: rt.clone(),
        cfg,
        network: net.clone(),
        pause: ImageInfo {
            name: "keelson.local/pause:1".into(),
            ..Default::default()
        },
        store: PodStatuses::default(),
        client: None,
        recorder: None,
        routes: Mutex::new(HashMap::new()),
        attach: Mutex::new(HashMap::new()),
    });
    tokio::spawn(crate::agent::route_events(ctx.clone()));
    Harness {
        ctx,
        rt,
        net,
        _dir: dir,
    }
}

fn pod(spec: serde_json::Value) -> Pod {
    pod_named("web", "uid-1", spec)
}

fn pod_named(name: &str, uid: &str, spec: serde_json::Value) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "default", "uid": uid},
        "spec": spec,
    }))
    .expect("pod")
}

impl Harness {
    /// Starts a worker for `pod` (with what was found running, after an agent restart).
    fn run(&self, pod: Pod, adopted: Vec<crate::runtime::container::Listed>) -> Worker {
        let (w, tx) = PodWorker::new(self.ctx.clone(), pod);
        Worker {
            tx,
            join: tokio::spawn(w.run(adopted)),
        }
    }

    /// Waits (in paused time) until `f` holds of the calls so far.
    async fn until(&self, what: &str, f: impl Fn(&[String]) -> bool) {
        for _ in 0..2000 {
            if f(&self.rt.calls()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{what}: calls were {:#?}", self.rt.calls());
    }

    /// The pod's status as the worker last reported it.
    fn status(&self) -> serde_json::Value {
        self.status_of("uid-1")
    }

    fn status_of(&self, uid: &str) -> serde_json::Value {
        let pods = self.ctx.store.read().expect("statuses");
        serde_json::to_value(pods.get(uid).and_then(|p| p.status.clone())).expect("json")
    }

    /// Waits (in paused time) until the first container's waiting reason is `reason`.
    async fn until_waiting(&self, reason: &str) {
        for _ in 0..2000 {
            if self.status()["containerStatuses"][0]["state"]["waiting"]["reason"] == reason {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("never {reason}: {}", self.status());
    }
}

struct Worker {
    tx: tokio::sync::mpsc::UnboundedSender<Msg>,
    join: tokio::task::JoinHandle<()>,
}

fn count(calls: &[String], line: &str) -> usize {
    calls.iter().filter(|c| *c == line).count()
}

/// The position of `line` in the calls (its first occurrence).
fn at(calls: &[String], line: &str) -> usize {
    calls
        .iter()
        .position(|c| c == line)
        .unwrap_or_else(|| panic!("{line:?} not in {calls:#?}"))
}

#[tokio::test(start_paused = true)]
async fn init_containers_run_in_order_in_the_wired_sandbox_before_the_app() {
    let h = harness();
    h.rt.exit_on_start("init-a", 0);
    h.rt.exit_on_start("init-b", 0);
    let _w = h.run(
        pod(json!({
            "initContainers": [{"name": "init-a", "image": "i"}, {"name": "init-b", "image": "i"}],
            "containers": [{"name": "app", "image": "i"}],
        })),
        vec![],
    );
    h.until("app started", |c| c.contains(&"start app".into()))
        .await;
    let c = h.rt.calls();
    let order = [
        "reserve web",
        "create POD",
        "start POD",
        "attach web",
        "create init-a",
        "start init-a",
        "create init-b",
        "start init-b",
        "create app",
        "start app",
    ];
    let positions: Vec<usize> = order.iter().map(|l| at(&c, l)).collect();
    assert!(positions.is_sorted(), "out of order: {c:#?}");
    assert_eq!(count(&c, "start init-a"), 1, "{c:#?}");
    h.until("status reported", |_| h.status()["phase"] == "Running")
        .await;
    let s = h.status();
    assert_eq!(s["podIP"], "10.88.0.2");
    assert_eq!(
        s["initContainerStatuses"][1]["state"]["terminated"]["reason"],
        "Completed"
    );
    assert!(
        s["containerStatuses"][0]["state"]["running"].is_object(),
        "{s}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_crashing_container_restarts_at_once_then_backs_off_ten_seconds() {
    let h = harness();
    h.rt.exit_on_start("app", 1);
    let _w = h.run(
        pod(json!({"containers": [{"name": "app", "image": "i"}]})),
        vec![],
    );
    h.until("second start", |c| count(c, "start app") >= 2)
        .await;
    let t = tokio::time::Instant::now();
    h.until("third start", |c| count(c, "start app") >= 3).await;
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_secs(9) && waited <= Duration::from_secs(12),
        "the first back-off is kubelet's 10 s, was {waited:?}"
    );
    let s = h.status();
    let cs = &s["containerStatuses"][0];
    assert!(cs["restartCount"].as_i64() >= Some(2), "{s}");
    assert_eq!(cs["lastState"]["terminated"]["exitCode"], 1);
}

#[tokio::test(start_paused = true)]
async fn a_graceful_stop_runs_pre_stop_then_sigterm_and_removes_everything() {
    let h = harness();
    let w = h.run(
        pod(json!({"containers": [{"name": "app", "image": "i",
            "lifecycle": {"preStop": {"exec": {"command": ["/bin/drain"]}}}}]})),
        vec![],
    );
    h.until("app started", |c| c.contains(&"start app".into()))
        .await;
    let _ = w.tx.send(Msg::Terminate { grace: Some(30) });
    tokio::time::timeout(Duration::from_secs(120), w.join)
        .await
        .expect("the worker ends")
        .expect("no panic");
    let c = h.rt.calls();
    let order = [
        "exec app /bin/drain",
        "kill app 15",
        "delete app",
        "detach web sandbox",
        "delete POD",
        "release",
    ];
    let positions: Vec<usize> = order.iter().map(|l| at(&c, l)).collect();
    assert!(positions.is_sorted(), "out of order: {c:#?}");
    assert_eq!(count(&c, "kill app 9"), 0, "{c:#?}");
    assert!(h.rt.running().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_container_ignoring_sigterm_is_killed_when_its_grace_period_ends() {
    let h = harness();
    h.rt.ignore_sigterm("app");
    let w = h.run(
        pod(json!({"terminationGracePeriodSeconds": 20,
                   "containers": [{"name": "app", "image": "i"}]})),
        vec![],
    );
    h.until("app started", |c| c.contains(&"start app".into()))
        .await;
    let t = tokio::time::Instant::now();
    let _ = w.tx.send(Msg::Terminate { grace: None });
    h.until("SIGKILL", |c| c.contains(&"kill app 9".into()))
        .await;
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_secs(19) && waited <= Duration::from_secs(22),
        "SIGKILL after the pod's 20 s grace period, was {waited:?}"
    );
    tokio::time::timeout(Duration::from_secs(60), w.join)
        .await
        .expect("the worker ends")
        .expect("no panic");
}

#[tokio::test(start_paused = true)]
async fn a_lost_sandbox_is_made_again_and_its_containers_restart_in_it() {
    let h = harness();
    let _w = h.run(
        pod(json!({"containers": [{"name": "app", "image": "i"}]})),
        vec![],
    );
    h.until("app started", |c| c.contains(&"start app".into()))
        .await;
    h.rt.crash("POD", 137);
    h.until("sandbox made again", |c| count(c, "create POD") == 2)
        .await;
    h.until("app started again", |c| count(c, "start app") == 2)
        .await;
    let c = h.rt.calls();
    let second_sandbox = c
        .iter()
        .rposition(|l| l == "start POD")
        .expect("second start");
    let restart = c.iter().rposition(|l| l == "start app").expect("restart");
    assert!(second_sandbox < restart, "{c:#?}");
    assert_eq!(h.rt.running(), vec!["POD".to_string(), "app".to_string()]);
}

#[tokio::test(start_paused = true)]
async fn after_an_agent_restart_the_running_pod_is_adopted_and_nothing_starts_twice() {
    let h = harness();
    let spec = json!({"containers": [{"name": "app", "image": "i"}]});
    let w = h.run(pod(spec.clone()), vec![]);
    h.until("app started", |c| c.contains(&"start app".into()))
        .await;
    h.until("status reported", |_| h.status()["phase"] == "Running")
        .await;
    // The agent goes away without stopping anything.
    w.join.abort();
    let _ = w.join.await;
    let before = h.rt.calls().len();
    let found = h.rt.list_with_label(labels::POD_UID).await.expect("list");
    assert_eq!(found.len(), 2);
    let _w2 = h.run(pod(spec), found);
    h.until("adopted", |c| c[before..].contains(&"adopt web".into()))
        .await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    let after = &h.rt.calls()[before..];
    assert!(
        !after
            .iter()
            .any(|c| c.starts_with("create") || c.starts_with("start")),
        "nothing is made again: {after:#?}"
    );
    assert!(h.status()["containerStatuses"][0]["state"]["running"].is_object());
}

/// Runs `spec`'s pod until its app runs, then ends the worker as a killed agent would; the
/// containers found in the runtime for the next one, and the calls made so far.
async fn agent_gone(
    h: &Harness,
    spec: &serde_json::Value,
) -> (Vec<crate::runtime::container::Listed>, usize) {
    let w = h.run(pod(spec.clone()), vec![]);
    h.until("app started", |c| c.contains(&"start app".into()))
        .await;
    h.until("status reported", |_| h.status()["phase"] == "Running")
        .await;
    w.join.abort();
    let _ = w.join.await;
    let found = h.rt.list_with_label(labels::POD_UID).await.expect("list");
    (found, h.rt.calls().len())
}

/// Waits for the app to be started again after call `before`; the calls since, in which the
/// old app was killed before the new sandbox started, and the pod runs again.
async fn pod_made_again(h: &Harness, before: usize) -> Vec<String> {
    h.until("app started again", |c| {
        count(&c[before..], "start app") == 1
    })
    .await;
    let after = h.rt.calls()[before..].to_vec();
    let pos = |what: &str| after.iter().position(|l| l.starts_with(what));
    assert!(pos("kill app").is_some(), "{after:#?}");
    assert!(pos("kill app") < pos("start POD"), "{after:#?}");
    assert_eq!(h.rt.running(), vec!["POD".to_string(), "app".to_string()]);
    after
}

#[tokio::test(start_paused = true)]
async fn an_adopted_sandbox_without_an_address_is_replaced_with_its_containers() {
    let h = harness();
    let spec = json!({"containers": [{"name": "app", "image": "i"}]});
    let (found, before) = agent_gone(&h, &spec).await;
    // The network keeps no record of the pod's address (kubelet: "Sandbox for pod has no IP
    // address. Need to start a new one").
    h.net
        .forgets
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let _w2 = h.run(pod(spec), found);
    let after = pod_made_again(&h, before).await;
    let pos = |what: &str| after.iter().position(|l| l.starts_with(what));
    assert!(pos("start POD") < pos("start app"), "{after:#?}");
    h.until("status with the new address", |_| {
        h.status()["podIP"]
            .as_str()
            .is_some_and(|ip| ip.starts_with("10.88.0."))
            && h.status()["containerStatuses"][0]["state"]["running"].is_object()
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn containers_found_running_without_their_sandbox_are_killed_and_the_pod_made_again() {
    let h = harness();
    let spec = json!({"containers": [{"name": "app", "image": "i"}]});
    agent_gone(&h, &spec).await;
    // The pause died while the agent was away; the app still runs in its namespace.
    h.rt.crash("POD", 137);
    let found = h.rt.list_with_label(labels::POD_UID).await.expect("list");
    let before = h.rt.calls().len();
    let _w2 = h.run(pod(spec), found);
    pod_made_again(&h, before).await;
}

#[tokio::test(start_paused = true)]
async fn a_container_that_cannot_start_shows_why_and_is_tried_again() {
    let h = harness();
    h.rt.fail_start("app", "exec: \"/bin/app\": no such file");
    let _w = h.run(
        pod(json!({"containers": [{"name": "app", "image": "i:1"}]})),
        vec![],
    );
    h.until("tried twice", |c| count(c, "start app") >= 2).await;
    // kubelet's StartError: exit code 128 and runc's message, counted as a restart.
    let s = h.status();
    let cs = &s["containerStatuses"][0];
    assert_eq!(cs["state"]["terminated"]["reason"], "StartError", "{s}");
    assert_eq!(cs["state"]["terminated"]["exitCode"], 128);
    let msg = cs["state"]["terminated"]["message"].as_str().unwrap_or("");
    assert!(msg.contains("no such file"), "{msg}");
    assert!(cs["restartCount"].as_i64() >= Some(1), "{s}");
    assert_eq!(cs["ready"], false);
}

const IMAGE: &str = "reg.lab/app:1";

#[tokio::test(start_paused = true)]
async fn ten_pods_wanting_one_missing_image_wait_for_one_pull() {
    let h = harness();
    h.rt.absent(IMAGE);
    h.rt.pull_takes(Duration::from_secs(5));
    let workers: Vec<Worker> = (0..10)
        .map(|n| {
            h.run(
                pod_named(
                    &format!("p{n}"),
                    &format!("uid-p{n}"),
                    json!({"containers": [{"name": format!("app{n}"), "image": IMAGE}]}),
                ),
                vec![],
            )
        })
        .collect();
    h.until("all ten started", |c| {
        (0..10).all(|n| count(c, &format!("start app{n}")) == 1)
    })
    .await;
    assert_eq!(count(&h.rt.calls(), &format!("pull {IMAGE}")), 1);
    drop(workers);
}

#[tokio::test(start_paused = true)]
async fn a_failed_pull_shows_err_image_pull_then_backs_off_ten_then_twenty_seconds() {
    let h = harness();
    h.rt.absent(IMAGE);
    h.rt.pull_fails(IMAGE, Some("unauthorized: authentication required"));
    let _w = h.run(
        pod(json!({"containers": [{"name": "app", "image": IMAGE}]})),
        vec![],
    );
    h.until_waiting("ErrImagePull").await;
    let msg = h.status()["containerStatuses"][0]["state"]["waiting"]["message"].clone();
    assert!(msg.as_str().unwrap_or("").contains("unauthorized"), "{msg}");
    h.until_waiting("ImagePullBackOff").await;
    let t1 = tokio::time::Instant::now();
    h.until("a second pull", |c| count(c, &format!("pull {IMAGE}")) == 2)
        .await;
    let waited = t1.elapsed();
    assert!(
        waited >= Duration::from_secs(8) && waited <= Duration::from_secs(10),
        "the first back-off is 10 s: {waited:?}"
    );
    h.until_waiting("ImagePullBackOff").await;
    let t2 = tokio::time::Instant::now();
    h.rt.pull_fails(IMAGE, None);
    h.until("a third pull", |c| count(c, &format!("pull {IMAGE}")) == 3)
        .await;
    let waited = t2.elapsed();
    assert!(
        waited >= Duration::from_secs(18) && waited <= Duration::from_secs(20),
        "the second back-off is 20 s: {waited:?}"
    );
    h.until("started once pulled", |c| count(c, "start app") == 1)
        .await;
}

#[tokio::test(start_paused = true)]
async fn pull_policies_decide_whether_to_pull() {
    let h = harness();
    h.rt.absent("reg.lab/never:1");
    let _w = h.run(
        pod(json!({"containers": [
            {"name": "present", "image": "reg.lab/here:1", "imagePullPolicy": "IfNotPresent"},
            {"name": "always", "image": "reg.lab/here:2", "imagePullPolicy": "Always"},
            {"name": "latest", "image": "reg.lab/here"},
            {"name": "never", "image": "reg.lab/never:1", "imagePullPolicy": "Never"},
        ]})),
        vec![],
    );
    h.until("the three that may run", |c| {
        ["present", "always", "latest"]
            .iter()
            .all(|n| count(c, &format!("start {n}")) == 1)
    })
    .await;
    let calls = h.rt.calls();
    assert_eq!(count(&calls, "pull reg.lab/here:1"), 0, "{calls:#?}");
    assert_eq!(count(&calls, "pull reg.lab/here:2"), 1, "{calls:#?}");
    assert_eq!(count(&calls, "pull reg.lab/here:latest"), 1, "{calls:#?}");
    assert!(at(&calls, "pull reg.lab/here:2") < at(&calls, "start always"));
    assert_eq!(count(&calls, "pull reg.lab/never:1"), 0);
    let s = h.status();
    let never = s["containerStatuses"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["name"] == "never"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        never["state"]["waiting"]["reason"], "ErrImageNeverPull",
        "{s}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_malformed_image_name_is_invalid_image_name_and_never_pulled() {
    let h = harness();
    let _w = h.run(
        pod(json!({"containers": [{"name": "app", "image": "Bad Name"}]})),
        vec![],
    );
    h.until_waiting("InvalidImageName").await;
    assert!(!h.rt.calls().iter().any(|c| c.starts_with("pull")));
}

#[tokio::test(start_paused = true)]
async fn the_sandbox_gets_kubelets_resolv_conf_hostname_and_hosts_file() {
    let h = harness();
    let _w = h.run(
        pod(json!({
            "hostname": "db-0", "subdomain": "db", "setHostnameAsFQDN": true,
            "dnsConfig": {"options": [{"name": "ndots", "value": "2"}]},
            "hostAliases": [{"ip": "10.1.2.3", "hostnames": ["foo.local"]}],
            "containers": [{"name": "app", "image": "i"}],
        })),
        vec![],
    );
    h.until("app started", |c| c.contains(&"start app".into()))
        .await;
    let dir = h.ctx.cfg.pods_dir().join("uid-1");
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).expect("pod file");
    assert_eq!(
        read("resolv.conf"),
        "search default.svc.cluster.local svc.cluster.local cluster.local\nnameserver 10.96.0.10\noptions ndots:2\n"
    );
    assert_eq!(read("hostname"), "db-0.db.default.svc.cluster.local\n");
    let hosts = read("etc-hosts");
    assert!(
        hosts.contains("10.88.0.2\tdb-0.db.default.svc.cluster.local\tdb-0\n"),
        "{hosts}"
    );
    assert!(hosts.ends_with("10.1.2.3\tfoo.local\n"), "{hosts}");
}

#[tokio::test(start_paused = true)]
async fn a_host_name_too_long_for_the_kernel_keeps_the_sandbox_from_being_made() {
    let h = harness();
    let _w = h.run(
        pod(json!({
            "hostname": "h".repeat(40), "subdomain": "db", "setHostnameAsFQDN": true,
            "containers": [{"name": "app", "image": "i"}],
        })),
        vec![],
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        !h.rt.calls().contains(&"create POD".to_string()),
        "{:#?}",
        h.rt.calls()
    );
}
