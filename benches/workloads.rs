//! `cargo bench --bench workloads`: the workload controllers on a 2-node `keelson lab`, each
//! against a floor measured in the same run on the same lab:
//! - a Job of 200 completions, parallelism 20, from creation to Complete (and the server's
//!   CPU, where the controllers run), against 200 bare pods run to completion 20 at a time by
//!   this process;
//! - a StatefulSet of 20 (Parallel, then OrderedReady) scaled from 0 to all Ready, against 20
//!   plain pods created at once;
//! - 100 CronJobs on one schedule: from the minute to all 100 Jobs made (their Jobs suspended,
//!   so no pods run), and the controller's pure decision for all 100, per pass.
//!
//! Prints lines beginning `workloads`. Needs root.
#[path = "../tests/common/mod.rs"]
mod common;

use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use common::{BUSYBOX, Kubectl, cluster::Cluster, floor::cpu_ticks};
use futures::StreamExt;
use k8s_openapi::api::{
    apps::v1::StatefulSet,
    batch::v1::{CronJob, Job},
    core::v1::Pod,
};
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
    runtime::{WatchStreamExt, watcher},
};
use serde_json::json;

const COMPLETIONS: usize = 200;
const PARALLELISM: usize = 20;
const SET: usize = 20;
const CRONJOBS: usize = 100;

fn phase(p: &Pod) -> &str {
    p.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("")
}

fn ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The server's CPU seconds so far.
fn server_cpu(c: &Cluster) -> f64 {
    let st: serde_json::Value =
        serde_json::from_slice(&std::fs::read(c.lab_dir().join("lab.json")).unwrap()).unwrap();
    st["server"]["pid"]
        .as_u64()
        .map_or(0, |p| cpu_ticks(p as u32)) as f64
        / 100.0
}

/// Waits until `done` holds for the pods with `labels` (watched); the time it took.
async fn wait_pods(
    api: &Api<Pod>,
    labels: &str,
    want: usize,
    done: fn(&Pod) -> bool,
    t0: Instant,
) -> Duration {
    let mut s = std::pin::pin!(
        watcher(api.clone(), watcher::Config::default().labels(labels)).applied_objects()
    );
    let mut finished = HashSet::new();
    while finished.len() < want {
        let p = tokio::time::timeout(Duration::from_secs(300), s.next())
            .await
            .expect("pods in time")
            .expect("the watch goes on")
            .expect("a pod");
        if done(&p) {
            finished.insert(p.metadata.name.clone().unwrap_or_default());
        }
    }
    t0.elapsed()
}

async fn delete_pods(api: &Api<Pod>, labels: &str) {
    let dp = DeleteParams {
        grace_period_seconds: Some(0),
        ..Default::default()
    };
    let _ = api
        .delete_collection(&dp, &ListParams::default().labels(labels))
        .await;
    while !api
        .list(&ListParams::default().labels(labels))
        .await
        .map(|l| l.items.is_empty())
        .unwrap_or(true)
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn bare_pod(name: &str, labels: serde_json::Value, command: &str, restart: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels},
        "spec": {"restartPolicy": restart, "terminationGracePeriodSeconds": 1,
                 "containers": [{"name": "c", "image": BUSYBOX, "command": ["sh", "-c", command]}]}
    }))
    .unwrap()
}

/// The floor: 200 bare pods run to completion, 20 at a time (a new one as each finishes).
async fn bare_run(api: &Api<Pod>) -> Duration {
    let t0 = Instant::now();
    let mut s = std::pin::pin!(
        watcher(api.clone(), watcher::Config::default().labels("bench=bare")).applied_objects()
    );
    let mut made = 0;
    let mut done = HashSet::new();
    while made < PARALLELISM {
        let p = bare_pod(
            &format!("bare-{made}"),
            json!({"bench": "bare"}),
            "true",
            "Never",
        );
        api.create(&PostParams::default(), &p).await.unwrap();
        made += 1;
    }
    while done.len() < COMPLETIONS {
        let p = tokio::time::timeout(Duration::from_secs(300), s.next())
            .await
            .expect("bare pods in time")
            .expect("the watch goes on")
            .expect("a pod");
        if phase(&p) == "Succeeded"
            && done.insert(p.metadata.name.clone().unwrap_or_default())
            && made < COMPLETIONS
        {
            let p = bare_pod(
                &format!("bare-{made}"),
                json!({"bench": "bare"}),
                "true",
                "Never",
            );
            api.create(&PostParams::default(), &p).await.unwrap();
            made += 1;
        }
    }
    t0.elapsed()
}

async fn job_run(client: &Client) -> Duration {
    let jobs: Api<Job> = Api::namespaced(client.clone(), "default");
    let job: Job = serde_json::from_value(json!({
        "metadata": {"name": "bench"},
        "spec": {"completions": COMPLETIONS, "parallelism": PARALLELISM, "template": {
            "metadata": {"labels": {"bench": "job"}},
            "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 1,
                     "containers": [{"name": "c", "image": BUSYBOX, "command": ["true"]}]}}}
    }))
    .unwrap();
    let t0 = Instant::now();
    jobs.create(&PostParams::default(), &job).await.unwrap();
    let mut s = std::pin::pin!(
        watcher(
            jobs.clone(),
            watcher::Config::default().fields("metadata.name=bench")
        )
        .applied_objects()
    );
    loop {
        let j = tokio::time::timeout(Duration::from_secs(600), s.next())
            .await
            .expect("the Job in time")
            .expect("the watch goes on")
            .expect("a Job");
        let complete = j
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| {
                c.iter()
                    .any(|c| c.type_ == "Complete" && c.status == "True")
            });
        if complete {
            return t0.elapsed();
        }
    }
}

async fn set_run(client: &Client, policy: &str) -> Duration {
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), "default");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let name = format!("bench-{}", policy.to_lowercase());
    let set: StatefulSet = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"replicas": 0, "serviceName": name, "podManagementPolicy": policy,
                 "selector": {"matchLabels": {"bench": name}},
                 "template": {"metadata": {"labels": {"bench": name}},
                     "spec": {"terminationGracePeriodSeconds": 1,
                              "containers": [{"name": "c", "image": BUSYBOX, "command": ["sleep", "3600"]}]}}}
    }))
    .unwrap();
    sets.create(&PostParams::default(), &set).await.unwrap();
    let t0 = Instant::now();
    sets.patch(
        &name,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": SET}})),
    )
    .await
    .unwrap();
    let took = wait_pods(&pods, &format!("bench={name}"), SET, ready, t0).await;
    sets.delete(&name, &DeleteParams::default()).await.unwrap();
    delete_pods(&pods, &format!("bench={name}")).await;
    took
}

async fn plain_run(api: &Api<Pod>) -> Duration {
    let t0 = Instant::now();
    for i in 0..SET {
        let p = bare_pod(
            &format!("plain-{i}"),
            json!({"bench": "plain"}),
            "exec sleep 3600",
            "Always",
        );
        api.create(&PostParams::default(), &p).await.unwrap();
    }
    let took = wait_pods(api, "bench=plain", SET, ready, t0).await;
    delete_pods(api, "bench=plain").await;
    took
}

fn cronjob(i: usize) -> serde_json::Value {
    json!({"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": format!("tick-{i:03}"), "namespace": "default", "uid": format!("u{i}"),
        "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"schedule": "*/1 * * * *", "jobTemplate": {"spec": {"suspend": true, "template": {
            "spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": BUSYBOX}]}}}}}})
}

/// 100 CronJobs due at the same minute: from the minute to all their Jobs made.
async fn cron_run(client: &Client) -> Duration {
    let cjs: Api<CronJob> = Api::namespaced(client.clone(), "default");
    let jobs: Api<Job> = Api::namespaced(client.clone(), "default");
    for i in 0..CRONJOBS {
        let mut v = cronjob(i);
        v["metadata"]
            .as_object_mut()
            .unwrap()
            .retain(|k, _| k == "name");
        let cj: CronJob = serde_json::from_value(v).unwrap();
        cjs.create(&PostParams::default(), &cj).await.unwrap();
    }
    // Wait for the next minute (to the millisecond), then for the Jobs.
    let now = jiff::Timestamp::now().as_millisecond();
    let next_minute = (now / 60_000 + 1) * 60_000;
    tokio::time::sleep(Duration::from_millis((next_minute - now).max(0) as u64)).await;
    let t0 = Instant::now();
    let ticks = |l: Vec<Job>| {
        l.iter()
            .filter(|j| {
                j.metadata
                    .name
                    .as_deref()
                    .is_some_and(|n| n.starts_with("tick-"))
            })
            .count()
    };
    let before = ticks(jobs.list(&ListParams::default()).await.unwrap().items);
    assert_eq!(before, 0, "Jobs were made before their minute");
    loop {
        let n = ticks(jobs.list(&ListParams::default()).await.unwrap().items);
        if n >= CRONJOBS {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "only {n} of {CRONJOBS} Jobs"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = t0.elapsed();
    let _ = cjs
        .delete_collection(&DeleteParams::background(), &ListParams::default())
        .await;
    took
}

/// The CronJob controller's pure decision for 100 CronJobs, per pass.
fn cron_plan_us() -> f64 {
    let cjs: Vec<CronJob> = (0..CRONJOBS)
        .map(|i| serde_json::from_value(cronjob(i)).unwrap())
        .collect();
    let now: jiff::Timestamp = "2026-01-01T00:10:00.5Z".parse().unwrap();
    let rounds = 200;
    let t0 = Instant::now();
    for _ in 0..rounds {
        for cj in &cjs {
            let _ = std::hint::black_box(keelson::kinds::cronjob::plan(cj, &[], now));
        }
    }
    t0.elapsed().as_secs_f64() * 1e6 / rounds as f64
}

fn main() {
    let c = Cluster::up("wlbench", 2, &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = keelson::control::client_from(&c.kubeconfig())
            .await
            .unwrap();
        let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
        // Warm-up: the image is on both nodes, the caches are filled.
        let floor = bare_run(&pods).await;
        delete_pods(&pods, "bench=bare").await;
        let floor = floor.min(bare_run(&pods).await);
        delete_pods(&pods, "bench=bare").await;
        let cpu0 = server_cpu(&c);
        let job = job_run(&client).await;
        let cpu = server_cpu(&c) - cpu0;
        println!(
            "workloads job completions={COMPLETIONS} parallelism={PARALLELISM} complete_s={:.2} bare_pods_s={:.2} ratio={:.2} (target <= 1.30) server_cpu_s={cpu:.2}",
            job.as_secs_f64(),
            floor.as_secs_f64(),
            job.as_secs_f64() / floor.as_secs_f64()
        );
        let _ = Api::<Job>::namespaced(client.clone(), "default")
            .delete("bench", &DeleteParams::background())
            .await;
        delete_pods(&pods, "bench=job").await;
        // Interleaved, best of two each: the two sides see the same machine.
        let plain = plain_run(&pods).await;
        let parallel = set_run(&client, "Parallel").await;
        let plain = plain.min(plain_run(&pods).await);
        let parallel = parallel.min(set_run(&client, "Parallel").await);
        let ordered = set_run(&client, "OrderedReady").await;
        println!(
            "workloads statefulset replicas={SET} parallel_all_ready_s={:.2} plain_pods_s={:.2} ratio={:.2} (target <= 1.20) ordered_all_ready_s={:.2}",
            parallel.as_secs_f64(),
            plain.as_secs_f64(),
            parallel.as_secs_f64() / plain.as_secs_f64(),
            ordered.as_secs_f64()
        );
        let cron = cron_run(&client).await;
        println!(
            "workloads cronjobs={CRONJOBS} minute_to_all_jobs_ms={:.0} pure_plan_per_pass_us={:.0}",
            cron.as_secs_f64() * 1000.0,
            cron_plan_us()
        );
    });
    let _ = c.kubectl(&["get", "nodes"]);
}
