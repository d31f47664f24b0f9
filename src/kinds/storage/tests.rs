use super::*;

fn claim(name: &str, size: &str, class: Option<&str>, extra: Value) -> PersistentVolumeClaim {
    let mut v = json!({
        "metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}")},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": size}},
                 "storageClassName": class}
    });
    if let (Some(m), Some(e)) = (v["metadata"].as_object_mut(), extra.get("metadata")) {
        for (k, x) in e.as_object().unwrap() {
            m.insert(k.clone(), x.clone());
        }
    }
    if let Some(st) = extra.get("status") {
        v["status"] = st.clone();
    }
    if let Some(vn) = extra.get("volumeName") {
        v["spec"]["volumeName"] = vn.clone();
    }
    serde_json::from_value(v).unwrap()
}

fn volume(name: &str, size: &str, class: &str, extra: Value) -> PersistentVolume {
    let mut v = json!({
        "metadata": {"name": name},
        "spec": {"accessModes": ["ReadWriteOnce"], "capacity": {"storage": size},
                 "storageClassName": class, "hostPath": {"path": format!("/data/{name}")},
                 "persistentVolumeReclaimPolicy": "Retain"}
    });
    for (k, x) in extra.as_object().unwrap() {
        if k == "metadata" || k == "status" {
            v[k] = x.clone();
            v["metadata"]["name"] = name.into();
        } else {
            v["spec"][k] = x.clone();
        }
    }
    serde_json::from_value(v).unwrap()
}

fn class(name: &str, mode: &str) -> StorageClass {
    serde_json::from_value(
        json!({"metadata": {"name": name}, "provisioner": PROVISIONER,
        "reclaimPolicy": "Delete", "volumeBindingMode": mode}),
    )
    .unwrap()
}

fn run(
    claims: &[PersistentVolumeClaim],
    vols: &[PersistentVolume],
    classes: &[StorageClass],
    pods: &[Pod],
) -> Vec<StorageWrite> {
    let c: Vec<&PersistentVolumeClaim> = claims.iter().collect();
    let v: Vec<&PersistentVolume> = vols.iter().collect();
    let s: Vec<&StorageClass> = classes.iter().collect();
    let p: Vec<&Pod> = pods.iter().collect();
    let roots = BTreeMap::from([("n1".to_string(), "/var/lib/keelson/storage".to_string())]);
    let nodes: Vec<Node> = ["n1", "n2"]
        .iter()
        .map(|n| {
            serde_json::from_value(
                json!({"metadata": {"name": n, "labels": {"kubernetes.io/hostname": n}}}),
            )
            .unwrap()
        })
        .collect();
    let node_refs: Vec<&Node> = nodes.iter().collect();
    plan(&World {
        claims: &c,
        volumes: &v,
        classes: &s,
        pods: &p,
        roots: &roots,
        nodes: &node_refs,
    })
}

#[test]
fn a_claim_binds_the_smallest_volume_that_fits() {
    let c = claim("data", "2Gi", Some(""), json!({}));
    let vols = [
        volume("big", "10Gi", "", json!({})),
        volume("small", "1Gi", "", json!({})),
        volume("right", "3Gi", "", json!({})),
        volume("other-class", "2Gi", "fast", json!({})),
    ];
    let w = run(&[c], &vols, &[], &[]);
    assert!(
        w.contains(&StorageWrite::Bind {
            ns: "default".into(),
            claim: "data".into(),
            claim_uid: "uid-data".into(),
            pv: "right".into()
        }),
        "{w:?}"
    );
}

#[test]
fn a_waiting_class_provisions_only_once_a_node_is_selected() {
    let sc = class("local-path", "WaitForFirstConsumer");
    let c = claim("data", "1Mi", Some("local-path"), json!({}));
    let w = run(&[c], &[], std::slice::from_ref(&sc), &[]);
    assert!(
        matches!(
            &w[..],
            [StorageWrite::ClaimEvent {
                reason: "WaitForFirstConsumer",
                ..
            }]
        ),
        "{w:?}"
    );
    let c = claim(
        "data",
        "1Mi",
        Some("local-path"),
        json!({"metadata": {"annotations": {SELECTED_NODE: "n1"}}}),
    );
    let w = run(&[c], &[], &[sc], &[]);
    let [StorageWrite::Provision(pv)] = &w[..] else {
        panic!("{w:?}")
    };
    let spec = pv.spec.as_ref().unwrap();
    assert_eq!(pv.metadata.name.as_deref(), Some("pvc-uid-data"));
    assert_eq!(
        spec.host_path.as_ref().unwrap().path,
        "/var/lib/keelson/storage/pvc-uid-data_default_data"
    );
    assert_eq!(
        spec.claim_ref.as_ref().unwrap().uid.as_deref(),
        Some("uid-data")
    );
    assert_eq!(
        spec.persistent_volume_reclaim_policy.as_deref(),
        Some("Delete")
    );
    let node: Node = serde_json::from_value(
        json!({"metadata": {"name": "n1", "labels": {"kubernetes.io/hostname": "n1"}}}),
    )
    .unwrap();
    let other: Node = serde_json::from_value(
        json!({"metadata": {"name": "n2", "labels": {"kubernetes.io/hostname": "n2"}}}),
    )
    .unwrap();
    assert!(pv_fits_node(pv, &node) && !pv_fits_node(pv, &other));
    // The pre-bound volume is then bound to its claim.
    let c = claim("data", "1Mi", Some("local-path"), json!({}));
    let w = run(
        &[c],
        &[(**pv).clone()],
        &[class("local-path", "WaitForFirstConsumer")],
        &[],
    );
    assert!(
        matches!(&w[0], StorageWrite::Bind { pv, .. } if pv == "pvc-uid-data"),
        "{w:?}"
    );
}

#[test]
fn a_released_volume_goes_by_its_policy() {
    let gone = json!({"claimRef": {"namespace": "default", "name": "old", "uid": "uid-old"}});
    let mut provisioned = volume("pvc-1", "1Gi", "local-path", gone.clone());
    provisioned
        .spec
        .as_mut()
        .unwrap()
        .persistent_volume_reclaim_policy = Some("Delete".into());
    provisioned.metadata.annotations =
        Some([(PROVISIONED_BY.to_string(), PROVISIONER.to_string())].into());
    let retained = volume("kept", "1Gi", "", gone);
    let w = run(&[], &[provisioned, retained], &[], &[]);
    assert!(
        w.contains(&StorageWrite::DeleteVolume("pvc-1".into())),
        "{w:?}"
    );
    assert!(
        w.contains(&StorageWrite::VolumeStatus {
            pv: "kept".into(),
            status: json!({"phase": "Released"})
        }),
        "{w:?}"
    );
}

#[test]
fn a_bound_claim_reports_its_volume_and_a_deleted_one_waits_for_its_pods() {
    let pv = volume(
        "v",
        "1Gi",
        "",
        json!({"claimRef": {"namespace": "default", "name": "data", "uid": "uid-data"}}),
    );
    let c = claim("data", "1Gi", Some(""), json!({"volumeName": "v"}));
    let w = run(
        std::slice::from_ref(&c),
        std::slice::from_ref(&pv),
        &[],
        &[],
    );
    assert!(w.iter().any(|x| matches!(x, StorageWrite::ClaimStatus { status, .. } if status["phase"] == "Bound" && status["capacity"]["storage"] == "1Gi")), "{w:?}");
    assert!(
        w.contains(&StorageWrite::VolumeStatus {
            pv: "v".into(),
            status: json!({"phase": "Bound"})
        }),
        "{w:?}"
    );
    let deleting = claim(
        "data",
        "1Gi",
        Some(""),
        json!({"volumeName": "v",
        "metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z", "finalizers": [PVC_PROTECTION]}}),
    );
    let user: Pod = serde_json::from_value(json!({"metadata": {"name": "p", "namespace": "default"},
        "spec": {"containers": [], "volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": "data"}}]},
        "status": {"phase": "Running"}})).unwrap();
    let w = run(
        std::slice::from_ref(&deleting),
        std::slice::from_ref(&pv),
        &[],
        &[user],
    );
    assert!(
        !w.iter()
            .any(|x| matches!(x, StorageWrite::ReleaseClaim { .. })),
        "{w:?}"
    );
    let w = run(&[deleting], &[pv], &[], &[]);
    assert!(
        w.contains(&StorageWrite::ReleaseClaim {
            ns: "default".into(),
            claim: "data".into()
        }),
        "{w:?}"
    );
}

#[test]
fn validation_names_the_field() {
    let c: PersistentVolumeClaim =
        serde_json::from_value(json!({"metadata": {"name": "x"}, "spec": {}})).unwrap();
    let errs: Vec<String> = validate_pvc(&c).iter().map(|e| e.to_string()).collect();
    assert_eq!(
        errs,
        [
            "spec.accessModes: Required value: at least 1 access mode is required",
            "spec.resources[storage]: Required value"
        ]
    );
    let old = claim("d", "1Gi", Some("a"), json!({}));
    let mut new = claim("d", "1Gi", Some("a"), json!({"volumeName": "v"}));
    assert!(validate_pvc_update(&old, &new).is_empty());
    new.spec.as_mut().unwrap().access_modes = Some(vec!["ReadWriteMany".into()]);
    assert_eq!(validate_pvc_update(&old, &new)[0].path, "spec");
    let pv: PersistentVolume = serde_json::from_value(json!({"metadata": {"name": "x"},
        "spec": {"accessModes": ["ReadWriteOnce"], "capacity": {"storage": "1Gi"}, "local": {"path": "/d"}}})).unwrap();
    let errs: Vec<String> = validate_pv(&pv).iter().map(|e| e.to_string()).collect();
    assert_eq!(
        errs,
        ["spec.nodeAffinity: Required value: Local volume requires node affinity"]
    );
}

#[test]
fn a_waiting_claim_binds_a_static_volume_only_on_its_node() {
    let sc: StorageClass = serde_json::from_value(json!({"metadata": {"name": "local"},
        "provisioner": "kubernetes.io/no-provisioner", "volumeBindingMode": "WaitForFirstConsumer"}))
    .unwrap();
    let pinned = volume(
        "on-n2",
        "1Gi",
        "local",
        json!({"nodeAffinity": {"required": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": ["n2"]}]}]}}}),
    );
    let on = |node: Option<&str>| {
        let meta = match node {
            Some(n) => json!({"metadata": {"annotations": {SELECTED_NODE: n}}}),
            None => json!({}),
        };
        run(
            &[claim("data", "1Gi", Some("local"), meta)],
            std::slice::from_ref(&pinned),
            std::slice::from_ref(&sc),
            &[],
        )
    };
    let binds = |w: &[StorageWrite]| w.iter().any(|x| matches!(x, StorageWrite::Bind { .. }));
    assert!(!binds(&on(None)), "bound before a node was chosen");
    assert!(
        !binds(&on(Some("n1"))),
        "bound a volume its node cannot use"
    );
    assert!(binds(&on(Some("n2"))));
}
