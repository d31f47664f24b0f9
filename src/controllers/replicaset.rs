//! The ReplicaSet controller: keeps `replicas` active pods matching the selector.
//!
//! It adopts orphans that match (adding its controller reference), releases pods that stopped
//! matching, creates missing pods from the template and deletes extras in kube's order
//! (unscheduled, then pending, then not ready, then the newest). Writes it made and has not yet
//! seen in its cache are "expectations": a ReplicaSet with outstanding ones is skipped, so a
//! lagging cache never doubles a pod. Status: replicas, fullyLabeledReplicas, readyReplicas,
//! availableReplicas (ready for minReadySeconds), observedGeneration.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use k8s_openapi::api::{apps::v1::ReplicaSet, core::v1::Pod};
use kube::{
    Api, Client,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use tokio::{sync::watch, time::Instant};

use crate::control::{Caches, controller_ref, controller_uid, next_pass, recorder::Recorder};
use crate::kinds::{
    pod::{pod_active, pod_available, pod_ready},
    selector::selector_matches,
};

/// Writes not yet seen in the cache.
#[derive(Default)]
struct Expect {
    created: HashSet<String>,
    deleted: HashSet<String>,
    until: Option<Instant>,
}

/// How long a write may stay unseen before the controller stops waiting for it.
const EXPECT_TIMEOUT: Duration = Duration::from_secs(30);

pub async fn run(client: Client, caches: Caches, leading: watch::Receiver<bool>) {
    let rec = Recorder::new(client.clone(), "replicaset-controller");
    caches.ready().await;
    let mut a = caches.replicasets.changed.clone();
    let mut b = caches.pods.changed.clone();
    let mut expect: HashMap<String, Expect> = HashMap::new();
    loop {
        // The periodic pass also notices pods that became available (minReadySeconds).
        next_pass(&mut [&mut a, &mut b], Duration::from_secs(1)).await;
        if !*leading.borrow() {
            continue;
        }
        let pods = caches.pods.all();
        let mut by_ns: HashMap<&str, Vec<&Arc<Pod>>> = HashMap::new();
        for p in &pods {
            by_ns
                .entry(p.metadata.namespace.as_deref().unwrap_or(""))
                .or_default()
                .push(p);
        }
        let sets = caches.replicasets.all();
        let live: HashSet<String> = sets.iter().filter_map(|r| r.metadata.uid.clone()).collect();
        expect.retain(|k, _| live.contains(k));
        for rs in sets {
            let ns = rs.metadata.namespace.as_deref().unwrap_or("");
            let in_ns = by_ns.get(ns).map(Vec::as_slice).unwrap_or(&[]);
            if let Err(e) = sync(&client, &rec, &rs, in_ns, &mut expect).await {
                tracing::debug!(rs = ?rs.metadata.name, error = %e, "replicaset sync");
            }
        }
    }
}

fn pod_name(p: &Pod) -> String {
    p.metadata.name.clone().unwrap_or_default()
}

/// Deletion preference: lower sorts first (deleted first).
fn delete_rank(p: &Pod) -> (u8, u8, u8, std::cmp::Reverse<Option<jiff::Timestamp>>) {
    let unscheduled = p
        .spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .unwrap_or("")
        .is_empty();
    let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
    (
        u8::from(!unscheduled),
        match phase {
            Some("Pending") | None => 0,
            Some("Unknown") => 1,
            _ => 2,
        },
        u8::from(pod_ready(p)),
        std::cmp::Reverse(p.metadata.creation_timestamp.as_ref().map(|t| t.0)),
    )
}

async fn sync(
    client: &Client,
    rec: &Recorder,
    rs: &Arc<ReplicaSet>,
    pods: &[&Arc<Pod>],
    expect: &mut HashMap<String, Expect>,
) -> kube::Result<()> {
    let uid = rs.metadata.uid.clone().unwrap_or_default();
    let ns = rs.metadata.namespace.clone().unwrap_or_default();
    let name = rs.metadata.name.clone().unwrap_or_default();
    let spec = rs.spec.clone().unwrap_or_default();
    let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let names: HashSet<String> = pods.iter().map(|p| pod_name(p)).collect();
    let gone_or_going = |n: &String| {
        !pods
            .iter()
            .any(|p| &pod_name(p) == n && p.metadata.deletion_timestamp.is_none())
    };
    if let Some(e) = expect.get(&uid) {
        let satisfied =
            e.created.iter().all(|n| names.contains(n)) && e.deleted.iter().all(gone_or_going);
        let expired = e.until.is_some_and(|t| t < Instant::now());
        if !satisfied && !expired {
            return Ok(());
        }
        expect.remove(&uid);
    }
    let deleting = rs.metadata.deletion_timestamp.is_some();
    let mut owned: Vec<&Arc<Pod>> = vec![];
    for p in pods {
        let matches = selector_matches(&spec.selector, p.metadata.labels.as_ref());
        match controller_uid(p.as_ref()) {
            Some(o) if o == uid => {
                if matches {
                    owned.push(p);
                } else {
                    release(&api, p, &uid).await?;
                }
            }
            None if matches && !deleting && pod_active(p) => {
                adopt(&api, rs, p).await?;
                owned.push(p);
            }
            _ => {}
        }
    }
    let mut active: Vec<&Arc<Pod>> = owned.iter().copied().filter(|p| pod_active(p)).collect();
    let want = if deleting {
        0
    } else {
        spec.replicas.unwrap_or(1)
    } as usize;
    let mut e = Expect {
        until: Some(Instant::now() + EXPECT_TIMEOUT),
        ..Default::default()
    };
    if active.len() < want {
        let template = spec.template.clone().unwrap_or_default();
        let mut meta = template.metadata.clone().unwrap_or_default();
        meta.name = None;
        meta.generate_name = Some(format!("{name}-"));
        meta.namespace = Some(ns.clone());
        meta.owner_references = controller_ref(rs.as_ref()).map(|r| vec![r]);
        let pod = Pod {
            metadata: meta,
            spec: template.spec.clone(),
            status: None,
        };
        tracing::info!(rs = %format!("{ns}/{name}"), active = active.len(), owned = owned.len(), want, "creating missing pods");
        for _ in active.len()..want {
            match api.create(&PostParams::default(), &pod).await {
                Ok(created) => {
                    let n = pod_name(&created);
                    rec.event(
                        rs.as_ref(),
                        false,
                        "SuccessfulCreate",
                        format!("Created pod: {n}"),
                    );
                    e.created.insert(n);
                }
                Err(err) => {
                    rec.event(
                        rs.as_ref(),
                        true,
                        "FailedCreate",
                        format!("Error creating: {err}"),
                    );
                    break;
                }
            }
        }
    } else if active.len() > want {
        active.sort_by_key(|p| delete_rank(p));
        let extra = active.len() - want;
        tracing::info!(rs = %format!("{ns}/{name}"), active = active.len(), want, "deleting surplus pods");
        for p in active.drain(..extra) {
            let n = pod_name(p);
            match api.delete(&n, &DeleteParams::default()).await {
                Ok(_) => {
                    rec.event(
                        rs.as_ref(),
                        false,
                        "SuccessfulDelete",
                        format!("Deleted pod: {n}"),
                    );
                    e.deleted.insert(n);
                }
                Err(kube::Error::Api(ae)) if ae.code == 404 => {}
                Err(err) => return Err(err),
            }
        }
    }
    if !e.created.is_empty() || !e.deleted.is_empty() {
        expect.insert(uid.clone(), e);
    }

    // Status, from what the cache shows now (the next pass reports the writes above).
    let live: Vec<&&Arc<Pod>> = owned.iter().filter(|p| pod_active(p)).collect();
    let now = jiff::Timestamp::now();
    let min_ready = spec.min_ready_seconds.unwrap_or(0);
    let template_labels = spec
        .template
        .as_ref()
        .and_then(|t| t.metadata.as_ref())
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    let fully = live
        .iter()
        .filter(|p| {
            let l = p.metadata.labels.clone().unwrap_or_default();
            template_labels.iter().all(|(k, v)| l.get(k) == Some(v))
        })
        .count();
    let status = serde_json::json!({
        "replicas": live.len(),
        "fullyLabeledReplicas": fully,
        "readyReplicas": live.iter().filter(|p| pod_ready(p)).count(),
        "availableReplicas": live.iter().filter(|p| pod_available(p, min_ready, now)).count(),
        "observedGeneration": rs.metadata.generation.unwrap_or(0),
    });
    let cur = rs.status.as_ref();
    let same = cur.is_some_and(|c| {
        i64::from(c.replicas) == status["replicas"].as_i64().unwrap_or(0)
            && c.fully_labeled_replicas.map(i64::from).unwrap_or(0)
                == status["fullyLabeledReplicas"].as_i64().unwrap_or(0)
            && c.ready_replicas.map(i64::from).unwrap_or(0)
                == status["readyReplicas"].as_i64().unwrap_or(0)
            && c.available_replicas.map(i64::from).unwrap_or(0)
                == status["availableReplicas"].as_i64().unwrap_or(0)
            && c.observed_generation.unwrap_or(0)
                == status["observedGeneration"].as_i64().unwrap_or(0)
    });
    if !same {
        let rsapi: Api<ReplicaSet> = Api::namespaced(client.clone(), &ns);
        rsapi
            .patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(&serde_json::json!({ "status": status })),
            )
            .await?;
    }
    Ok(())
}

/// Replaces a pod's ownerReferences (guarded by its resourceVersion; a pod that changed or
/// went meanwhile is left to the next pass).
async fn set_owners(
    api: &Api<Pod>,
    p: &Pod,
    refs: Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference>,
) -> kube::Result<()> {
    let refs = if refs.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::json!(refs)
    };
    let patch = serde_json::json!({"metadata": {"ownerReferences": refs, "resourceVersion": p.metadata.resource_version}});
    match api
        .patch(&pod_name(p), &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

async fn adopt(api: &Api<Pod>, rs: &ReplicaSet, p: &Pod) -> kube::Result<()> {
    let mut refs = p.metadata.owner_references.clone().unwrap_or_default();
    refs.extend(controller_ref(rs));
    set_owners(api, p, refs).await
}

async fn release(api: &Api<Pod>, p: &Pod, uid: &str) -> kube::Result<()> {
    let refs = p
        .metadata
        .owner_references
        .iter()
        .flatten()
        .filter(|r| r.uid != uid)
        .cloned()
        .collect();
    set_owners(api, p, refs).await
}
