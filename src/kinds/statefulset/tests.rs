use super::*;

fn set(replicas: i32, policy: &str, extra: Value) -> StatefulSet {
    let mut v = json!({
        "metadata": {"name": "web", "namespace": "default", "uid": "set-uid", "generation": 2},
        "spec": {
            "replicas": replicas, "serviceName": "nginx", "podManagementPolicy": policy,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "web"}},
                         "spec": {"containers": [{"name": "c", "image": "img"}]}},
            "volumeClaimTemplates": [{"metadata": {"name": "www"},
                "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Mi"}}}}]
        }
    });
    merge(&mut v, &extra);
    default_statefulset(&mut v);
    serde_json::from_value(v).unwrap()
}

fn merge(t: &mut Value, p: &Value) {
    match (t, p) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                merge(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (t, p) => *t = p.clone(),
    }
}

fn revs(current: &str, update: &str) -> Revisions {
    Revisions {
        current: current.into(),
        current_template: PodTemplateSpec::default(),
        update: update.into(),
        update_template: PodTemplateSpec::default(),
    }
}

fn now() -> Timestamp {
    "2026-01-01T00:10:00Z".parse().unwrap()
}

/// A pod of the set at `ord` on revision `rev`: running and ready, or pending.
fn pod(ord: i32, rev: &str, ready: bool) -> Pod {
    let conds = if ready {
        json!([{"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}])
    } else {
        json!([])
    };
    serde_json::from_value(json!({
        "metadata": {"name": format!("web-{ord}"), "namespace": "default", "uid": format!("pod-{ord}"),
                     "labels": {"app": "web", HASH_LABEL: rev}},
        "spec": {"containers": []},
        "status": {"phase": if ready { "Running" } else { "Pending" }, "conditions": conds}
    }))
    .unwrap()
}

fn run(set: &StatefulSet, pods: &[Pod], r: &Revisions) -> SetPlan {
    let refs: Vec<&Pod> = pods.iter().collect();
    plan(set, &refs, &BTreeMap::new(), r, now())
}

fn names(ps: &[Pod]) -> Vec<String> {
    ps.iter()
        .map(|p| p.metadata.name.clone().unwrap())
        .collect()
}

#[test]
fn an_ordered_set_starts_its_first_pod_with_identity_and_claim_then_waits() {
    let s = set(3, "OrderedReady", json!({}));
    let p = run(&s, &[], &revs("web-a", "web-a"));
    assert_eq!(names(&p.create), ["web-0"]);
    let made = &p.create[0];
    let ps = made.spec.as_ref().unwrap();
    assert_eq!(ps.hostname.as_deref(), Some("web-0"));
    assert_eq!(ps.subdomain.as_deref(), Some("nginx"));
    let labels = made.metadata.labels.as_ref().unwrap();
    assert_eq!(labels[HASH_LABEL], "web-a");
    assert_eq!(labels[POD_NAME_LABEL], "web-0");
    assert_eq!(labels[POD_INDEX_LABEL], "0");
    let vol = &ps.volumes.as_ref().unwrap()[0];
    assert_eq!(
        vol.persistent_volume_claim.as_ref().unwrap().claim_name,
        "www-web-0"
    );
    assert_eq!(p.claims.len(), 1);
    assert_eq!(p.claims[0].metadata.name.as_deref(), Some("www-web-0"));
    assert_eq!(p.claims[0].metadata.labels.as_ref().unwrap()["app"], "web");
    // Pending web-0: nothing more; ready web-0: web-1 follows.
    assert!(
        run(&s, &[pod(0, "web-a", false)], &revs("web-a", "web-a"))
            .create
            .is_empty()
    );
    let next = run(&s, &[pod(0, "web-a", true)], &revs("web-a", "web-a"));
    assert_eq!(names(&next.create), ["web-1"]);
}

#[test]
fn a_parallel_set_starts_every_pod_at_once() {
    let s = set(3, "Parallel", json!({}));
    let p = run(&s, &[], &revs("web-a", "web-a"));
    assert_eq!(names(&p.create), ["web-0", "web-1", "web-2"]);
    assert_eq!(p.claims.len(), 3);
}

#[test]
fn an_ordered_set_scales_down_from_the_highest_ordinal_one_at_a_time() {
    let s = set(1, "OrderedReady", json!({}));
    let pods: Vec<Pod> = (0..3).map(|i| pod(i, "web-a", true)).collect();
    let p = run(&s, &pods, &revs("web-a", "web-a"));
    assert_eq!(p.delete, ["web-2"]);
    assert!(p.claim_owners.is_empty(), "claims are retained by default");
    // Parallel: both at once.
    let s = set(1, "Parallel", json!({}));
    assert_eq!(
        run(&s, &pods, &revs("web-a", "web-a")).delete,
        ["web-2", "web-1"]
    );
}

#[test]
fn claims_of_pods_scaled_away_get_the_pod_as_owner_when_retention_says_delete() {
    let s = set(
        1,
        "OrderedReady",
        json!({"spec": {"persistentVolumeClaimRetentionPolicy": {"whenScaled": "Delete"}}}),
    );
    let pods: Vec<Pod> = (0..2).map(|i| pod(i, "web-a", true)).collect();
    let claim: PersistentVolumeClaim =
        serde_json::from_value(json!({"metadata": {"name": "www-web-1"}})).unwrap();
    let claims = BTreeMap::from([("www-web-1".to_string(), &claim)]);
    let refs: Vec<&Pod> = pods.iter().collect();
    let p = plan(&s, &refs, &claims, &revs("web-a", "web-a"), now());
    assert_eq!(p.delete, ["web-1"]);
    assert_eq!(p.claim_owners.len(), 1);
    assert_eq!(p.claim_owners[0].0, "www-web-1");
    assert_eq!(p.claim_owners[0].1.uid, "pod-1");
}

#[test]
fn a_rolling_update_replaces_from_the_top_down_to_the_partition() {
    let s = set(
        3,
        "OrderedReady",
        json!({"spec": {"updateStrategy": {"rollingUpdate": {"partition": 1}}}}),
    );
    let r = revs("web-a", "web-b");
    let old: Vec<Pod> = (0..3).map(|i| pod(i, "web-a", true)).collect();
    assert_eq!(run(&s, &old, &r).delete, ["web-2"]);
    // web-2 replaced but not ready yet: wait.
    let mut pods = vec![
        pod(0, "web-a", true),
        pod(1, "web-a", true),
        pod(2, "web-b", false),
    ];
    assert!(run(&s, &pods, &r).delete.is_empty());
    pods[2] = pod(2, "web-b", true);
    assert_eq!(run(&s, &pods, &r).delete, ["web-1"]);
    // Below the partition nothing is replaced, and a missing pod there keeps the old revision.
    pods[1] = pod(1, "web-b", true);
    assert!(run(&s, &pods, &r).delete.is_empty());
    let p = run(&s, &pods[1..], &r);
    assert_eq!(
        p.create[0].metadata.labels.as_ref().unwrap()[HASH_LABEL],
        "web-a"
    );
}

#[test]
fn on_delete_replaces_nothing_itself() {
    let s = set(
        2,
        "OrderedReady",
        json!({"spec": {"updateStrategy": {"type": "OnDelete"}}}),
    );
    let pods: Vec<Pod> = (0..2).map(|i| pod(i, "web-a", true)).collect();
    let p = run(&s, &pods, &revs("web-a", "web-b"));
    assert!(p.delete.is_empty() && p.create.is_empty());
}

#[test]
fn the_status_counts_revisions_and_the_update_becomes_current_when_all_are_on_it() {
    let s = set(2, "OrderedReady", json!({}));
    let pods = vec![pod(0, "web-b", true), pod(1, "web-a", true)];
    let st = run(&s, &pods, &revs("web-a", "web-b")).status.unwrap();
    assert_eq!(
        (
            st.replicas,
            st.ready_replicas,
            st.current_replicas,
            st.updated_replicas
        ),
        (2, Some(2), Some(1), Some(1))
    );
    assert_eq!(st.current_revision.as_deref(), Some("web-a"));
    assert_eq!(st.observed_generation, Some(2));
    let pods = vec![pod(0, "web-b", true), pod(1, "web-b", true)];
    let st = run(&s, &pods, &revs("web-a", "web-b")).status.unwrap();
    assert_eq!(st.current_revision.as_deref(), Some("web-b"));
    assert_eq!(st.current_replicas, Some(2));
}

#[test]
fn ordinals_start_where_the_set_says() {
    let s = set(2, "Parallel", json!({"spec": {"ordinals": {"start": 5}}}));
    assert_eq!(
        names(&run(&s, &[], &revs("a", "a")).create),
        ["web-5", "web-6"]
    );
    assert_eq!(ordinal_of("web", "web-12"), Some(12));
    assert_eq!(ordinal_of("web", "web-012"), None);
    assert_eq!(ordinal_of("web", "webx-1"), None);
    assert_eq!(ordinal_of("web", "web-"), None);
}

#[test]
fn validation_names_the_field() {
    let s = set(
        1,
        "Sometimes",
        json!({"spec": {"template": {"spec": {"restartPolicy": "Never"}}}}),
    );
    let errs: Vec<String> = validate_statefulset(&s)
        .iter()
        .map(|e| e.to_string())
        .collect();
    assert!(
        errs.iter()
            .any(|e| e.starts_with("spec.podManagementPolicy: Unsupported value")),
        "{errs:?}"
    );
    assert!(
        errs.iter().any(
            |e| e.starts_with("spec.template.spec.restartPolicy: Unsupported value: \"Never\"")
        ),
        "{errs:?}"
    );
    let old = set(1, "OrderedReady", json!({}));
    let new = set(4, "OrderedReady", json!({"spec": {"serviceName": "other"}}));
    let errs = validate_update(&old, &new);
    assert_eq!(errs.len(), 1);
    assert!(
        errs[0]
            .message
            .starts_with("Forbidden: updates to statefulset spec")
    );
    let scaled = set(4, "OrderedReady", json!({}));
    assert!(validate_update(&old, &scaled).is_empty());
}
