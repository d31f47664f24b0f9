//! The DaemonSet controller: one pod per eligible node.
//!
//! A node is eligible when it matches the template's nodeSelector and required node affinity
//! and the pod tolerates its NoSchedule/NoExecute taints (with the tolerations kube adds to
//! every daemon pod: not-ready and unreachable NoExecute, memory/disk/pid pressure and
//! unschedulable NoSchedule). Daemon pods are created bound to their node. Pods on nodes that
//! are no longer eligible, and extra pods on a node, are deleted. `RollingUpdate` replaces pods
//! of an older template (`controller-revision-hash`) while at most `maxUnavailable` are
//! unavailable; `OnDelete` replaces them only when they are deleted.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{Node, Pod, Taint, Toleration},
};
use kube::{
    Api, Client,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use tokio::{sync::watch, time::Instant};

use crate::{
    control::{
        Caches, controller_ref, controller_uid,
        recorder::Recorder,
        runner::{self, Controller, PassError},
    },
    controllers::deployment::{resolve, template_hash},
    kinds::pod::{pod_active, pod_available, pod_ready},
    kinds::scheduling::{affinity_matches, tolerates},
};

const HASH_LABEL: &str = "controller-revision-hash";

pub async fn run(client: Client, caches: Caches, leading: watch::Receiver<bool>) {
    let c = DaemonSets {
        rec: Recorder::new(client.clone(), "daemonset-controller"),
        client,
        caches: caches.clone(),
        expect: HashMap::new(),
    };
    runner::run(c, &caches, leading).await;
}

struct DaemonSets {
    client: Client,
    rec: Recorder,
    caches: Caches,
    /// DaemonSet uid → (pod names created and not yet seen, give up at).
    expect: HashMap<String, (HashSet<String>, Instant)>,
}

impl Controller for DaemonSets {
    fn name(&self) -> &'static str {
        "daemonset-controller"
    }

    fn signals(&self, caches: &Caches) -> Vec<watch::Receiver<u64>> {
        vec![
            caches.daemonsets.changed.clone(),
            caches.pods.changed.clone(),
            caches.nodes.changed.clone(),
        ]
    }

    fn period(&self) -> Duration {
        Duration::from_secs(2)
    }

    async fn pass(&mut self) -> Result<(), PassError> {
        let nodes = self.caches.nodes.all();
        let pods = self.caches.pods.all();
        for ds in self.caches.daemonsets.all() {
            if ds.metadata.deletion_timestamp.is_some() {
                continue;
            }
            if let Err(e) = sync(
                &self.client,
                &self.rec,
                &ds,
                &nodes,
                &pods,
                &mut self.expect,
            )
            .await
            {
                tracing::debug!(ds = ?ds.metadata.name, error = %e, "daemonset sync");
            }
        }
        Ok(())
    }
}

/// The tolerations kube's DaemonSet controller adds to every daemon pod.
fn daemon_tolerations(mut tols: Vec<Toleration>) -> Vec<Toleration> {
    let add = [
        ("node.kubernetes.io/not-ready", "NoExecute"),
        ("node.kubernetes.io/unreachable", "NoExecute"),
        ("node.kubernetes.io/disk-pressure", "NoSchedule"),
        ("node.kubernetes.io/memory-pressure", "NoSchedule"),
        ("node.kubernetes.io/pid-pressure", "NoSchedule"),
        ("node.kubernetes.io/unschedulable", "NoSchedule"),
    ];
    for (key, effect) in add {
        if !tols
            .iter()
            .any(|t| t.key.as_deref() == Some(key) && t.effect.as_deref() == Some(effect))
        {
            tols.push(Toleration {
                key: Some(key.into()),
                operator: Some("Exists".into()),
                effect: Some(effect.into()),
                ..Default::default()
            });
        }
    }
    tols
}

fn eligible(template: &Pod, n: &Node) -> bool {
    if n.metadata.deletion_timestamp.is_some() || !affinity_matches(template, n) {
        return false;
    }
    let tols = template
        .spec
        .as_ref()
        .and_then(|s| s.tolerations.clone())
        .unwrap_or_default();
    let taints: Vec<Taint> = n
        .spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default();
    taints
        .iter()
        .filter(|t| t.effect == "NoSchedule" || t.effect == "NoExecute")
        .all(|t| tolerates(&tols, t))
}

fn name_of<K: kube::Resource>(k: &K) -> String {
    k.meta().name.clone().unwrap_or_default()
}

async fn sync(
    client: &Client,
    rec: &Recorder,
    ds: &Arc<DaemonSet>,
    nodes: &[Arc<Node>],
    pods: &[Arc<Pod>],
    expect: &mut HashMap<String, (HashSet<String>, Instant)>,
) -> kube::Result<()> {
    let uid = ds.metadata.uid.clone().unwrap_or_default();
    let ns = ds.metadata.namespace.clone().unwrap_or_default();
    let spec = ds.spec.clone().unwrap_or_default();
    let owned: Vec<&Arc<Pod>> = pods
        .iter()
        .filter(|p| controller_uid(p.as_ref()) == Some(uid.as_str()))
        .collect();
    if let Some((names, until)) = expect.get(&uid) {
        let seen: HashSet<String> = owned.iter().map(|p| name_of(p.as_ref())).collect();
        if !names.iter().all(|n| seen.contains(n)) && *until > Instant::now() {
            return Ok(());
        }
        expect.remove(&uid);
    }
    let hash = template_hash(&serde_json::to_value(&spec.template).unwrap_or_default());
    let mut template_meta = spec.template.metadata.clone().unwrap_or_default();
    let mut template_spec = spec.template.spec.clone().unwrap_or_default();
    template_spec.tolerations = Some(daemon_tolerations(
        template_spec.tolerations.unwrap_or_default(),
    ));
    let probe = Pod {
        metadata: template_meta.clone(),
        spec: Some(template_spec.clone()),
        status: None,
    };
    let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let mut by_node: HashMap<String, Vec<&Arc<Pod>>> = HashMap::new();
    for p in owned.iter().filter(|p| pod_active(p)) {
        let node = p
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default();
        by_node.entry(node).or_default().push(p);
    }
    let now = jiff::Timestamp::now();
    let min_ready = spec.min_ready_seconds.unwrap_or(0);
    let (mut desired, mut current, mut ready, mut updated, mut available, mut misscheduled) =
        (0, 0, 0, 0, 0, 0);
    let mut created = HashSet::new();
    let mut to_delete: Vec<&Arc<Pod>> = vec![];
    let mut outdated: Vec<&Arc<Pod>> = vec![];
    let mut unavailable = 0;
    template_meta
        .labels
        .get_or_insert_with(Default::default)
        .insert(HASH_LABEL.into(), hash.clone());
    template_meta.name = None;
    template_meta.generate_name = Some(format!("{}-", name_of(ds.as_ref())));
    template_meta.namespace = Some(ns.clone());
    template_meta.owner_references = controller_ref(ds.as_ref()).map(|r| vec![r]);
    for n in nodes {
        let node = name_of(n.as_ref());
        let here = by_node.remove(&node).unwrap_or_default();
        if !eligible(&probe, n) {
            misscheduled += here.len();
            to_delete.extend(here);
            continue;
        }
        desired += 1;
        if here.is_empty() {
            let mut s = template_spec.clone();
            s.node_name = Some(node.clone());
            let pod = Pod {
                metadata: template_meta.clone(),
                spec: Some(s),
                status: None,
            };
            match api.create(&PostParams::default(), &pod).await {
                Ok(p) => {
                    rec.event(
                        ds.as_ref(),
                        false,
                        "SuccessfulCreate",
                        format!("Created pod: {}", name_of(&p)),
                    );
                    created.insert(name_of(&p));
                }
                Err(e) => rec.event(
                    ds.as_ref(),
                    true,
                    "FailedCreate",
                    format!("Error creating: {e}"),
                ),
            }
            unavailable += 1;
            continue;
        }
        current += 1;
        // Keep the newest-template, oldest pod; delete the rest.
        let mut here = here;
        here.sort_by_key(|p| {
            (
                p.metadata.labels.as_ref().and_then(|l| l.get(HASH_LABEL)) != Some(&hash),
                p.metadata.creation_timestamp.as_ref().map(|t| t.0),
            )
        });
        let keep = here[0];
        to_delete.extend(here.into_iter().skip(1));
        let is_new = keep
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(HASH_LABEL))
            == Some(&hash);
        if is_new {
            updated += 1;
        } else {
            outdated.push(keep);
        }
        if pod_ready(keep) {
            ready += 1;
        }
        if pod_available(keep, min_ready, now) {
            available += 1;
        } else {
            unavailable += 1;
        }
    }
    // Pods on nodes that no longer exist.
    for (_, rest) in by_node {
        misscheduled += rest.len();
        to_delete.extend(rest);
    }
    // Rolling update: replace outdated pods while few enough are unavailable.
    let strategy = spec.update_strategy.clone().unwrap_or_default();
    if strategy.type_.as_deref() != Some("OnDelete") {
        let ru = strategy.rolling_update.clone().unwrap_or_default();
        let max_unavailable = resolve(ru.max_unavailable.as_ref(), desired, "1", false).max(1);
        let mut budget = (max_unavailable - unavailable).max(0) as usize;
        // Unavailable outdated pods first: replacing them costs nothing.
        outdated.sort_by_key(|p| pod_available(p, min_ready, now));
        for p in outdated {
            if !pod_available(p, min_ready, now) {
                to_delete.push(p);
            } else if budget > 0 {
                budget -= 1;
                to_delete.push(p);
            }
        }
    }
    for p in to_delete {
        let n = name_of(p.as_ref());
        match api.delete(&n, &DeleteParams::default()).await {
            Ok(_) => rec.event(
                ds.as_ref(),
                false,
                "SuccessfulDelete",
                format!("Deleted pod: {n}"),
            ),
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    if !created.is_empty() {
        expect.insert(uid, (created, Instant::now() + Duration::from_secs(30)));
    }
    let status = serde_json::json!({
        "desiredNumberScheduled": desired,
        "currentNumberScheduled": current,
        "numberMisscheduled": misscheduled,
        "numberReady": ready,
        "updatedNumberScheduled": updated,
        "numberAvailable": available,
        "numberUnavailable": (desired - available).max(0),
        "observedGeneration": ds.metadata.generation.unwrap_or(0),
    });
    let mut old = serde_json::to_value(ds.status.clone().unwrap_or_default()).unwrap_or_default();
    if let Some(o) = old.as_object_mut() {
        for k in [
            "numberAvailable",
            "numberUnavailable",
            "updatedNumberScheduled",
            "observedGeneration",
        ] {
            o.entry(k).or_insert(0.into());
        }
        o.remove("conditions");
        o.remove("collisionCount");
    }
    if old != status {
        let dsapi: Api<DaemonSet> = Api::namespaced(client.clone(), &ns);
        dsapi
            .patch_status(
                &name_of(ds.as_ref()),
                &PatchParams::default(),
                &Patch::Merge(&serde_json::json!({ "status": status })),
            )
            .await?;
    }
    Ok(())
}
