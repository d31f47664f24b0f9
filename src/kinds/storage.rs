//! What PersistentVolumes, PersistentVolumeClaims and StorageClasses mean: kube-apiserver's
//! defaults and validation, and the decisions of kube-controller-manager's volume controllers
//! (binding, reclaiming, the protection finalizers) and of k3s's local-path provisioner (a
//! directory per volume on the node the claim's first pod is scheduled to), pure over what
//! the caches hold, so the controller only carries them out.

use std::collections::{BTreeMap, HashSet};

use k8s_openapi::{
    api::{
        core::v1::{
            HostPathVolumeSource, Node, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm,
            ObjectReference, PersistentVolume, PersistentVolumeClaim, PersistentVolumeSpec, Pod,
            VolumeNodeAffinity,
        },
        storage::v1::StorageClass,
    },
    apimachinery::pkg::{api::resource::Quantity, apis::meta::v1::ObjectMeta},
};
use serde_json::{Value, json};

use super::{
    quantity,
    scheduling::selector_terms_match,
    selector::selector_matches,
    validate::{FieldError, err},
};

/// The StorageClass annotation that makes it the default.
pub const DEFAULT_CLASS: &str = "storageclass.kubernetes.io/is-default-class";
/// The node the scheduler chose for a claim whose class waits for its first consumer.
pub const SELECTED_NODE: &str = "volume.kubernetes.io/selected-node";
/// keelson's provisioner (like k3s's `rancher.io/local-path`).
pub const PROVISIONER: &str = "keelson.io/local-path";
/// The default class keelson's server creates.
pub const DEFAULT_CLASS_NAME: &str = "local-path";
/// Held on a provisioned volume until its node removed the directory.
pub const CLEANUP_FINALIZER: &str = "keelson.io/local-path-cleanup";
pub const PVC_PROTECTION: &str = "kubernetes.io/pvc-protection";
pub const PV_PROTECTION: &str = "kubernetes.io/pv-protection";
pub const PROVISIONED_BY: &str = "pv.kubernetes.io/provisioned-by";
pub const BOUND_BY_CONTROLLER: &str = "pv.kubernetes.io/bound-by-controller";
pub const BIND_COMPLETED: &str = "pv.kubernetes.io/bind-completed";
/// The Node annotation naming where the node keeps local-path volumes.
pub const LOCAL_PATH_ROOT: &str = "keelson.io/local-path-root";

const ACCESS_MODES: &[&str] = &[
    "ReadWriteOnce",
    "ReadOnlyMany",
    "ReadWriteMany",
    "ReadWriteOncePod",
];

fn name_of(m: &ObjectMeta) -> &str {
    m.name.as_deref().unwrap_or_default()
}

/// kube-apiserver's defaults for a claim: a Filesystem volume.
pub fn default_pvc(obj: &mut Value) {
    if let Some(s) = obj.get_mut("spec").and_then(Value::as_object_mut) {
        s.entry("volumeMode").or_insert("Filesystem".into());
    }
}

/// kube-apiserver's defaults for a volume: Retain, Filesystem.
pub fn default_pv(obj: &mut Value) {
    if let Some(s) = obj.get_mut("spec").and_then(Value::as_object_mut) {
        s.entry("persistentVolumeReclaimPolicy")
            .or_insert("Retain".into());
        s.entry("volumeMode").or_insert("Filesystem".into());
    }
}

/// kube-apiserver's defaults for a class: Delete, Immediate.
pub fn default_storage_class(obj: &mut Value) {
    if let Some(o) = obj.as_object_mut() {
        o.entry("reclaimPolicy").or_insert("Delete".into());
        o.entry("volumeBindingMode").or_insert("Immediate".into());
    }
}

fn access_modes(errs: &mut Vec<FieldError>, path: &str, modes: Option<&Vec<String>>) {
    let modes = modes.map(Vec::as_slice).unwrap_or_default();
    if modes.is_empty() {
        err(
            errs,
            path,
            "Required value: at least 1 access mode is required",
        );
    }
    for m in modes.iter().filter(|m| !ACCESS_MODES.contains(&m.as_str())) {
        err(
            errs,
            path,
            format!(
                "Unsupported value: \"{m}\": supported values: \"ReadOnlyMany\", \"ReadWriteMany\", \"ReadWriteOnce\", \"ReadWriteOncePod\""
            ),
        );
    }
}

fn storage_quantity(errs: &mut Vec<FieldError>, path: &str, q: Option<&Quantity>) {
    match q {
        None => err(errs, path, "Required value"),
        Some(q) => match quantity::bytes(&q.0) {
            Some(b) if b > 0 => {}
            _ => err(
                errs,
                path,
                format!("Invalid value: \"{}\": must be greater than zero", q.0),
            ),
        },
    }
}

/// kube-apiserver's validation of a claim.
pub fn validate_pvc(c: &PersistentVolumeClaim) -> Vec<FieldError> {
    let mut errs = vec![];
    let spec = c.spec.clone().unwrap_or_default();
    access_modes(&mut errs, "spec.accessModes", spec.access_modes.as_ref());
    storage_quantity(
        &mut errs,
        "spec.resources[storage]",
        spec.resources
            .as_ref()
            .and_then(|r| r.requests.as_ref())
            .and_then(|r| r.get("storage")),
    );
    errs
}

/// A claim's spec may not change once made, but for its requests, the volume the binder
/// names and a class given to a claim that had none.
pub fn validate_pvc_update(
    old: &PersistentVolumeClaim,
    new: &PersistentVolumeClaim,
) -> Vec<FieldError> {
    let mut o = old.spec.clone().unwrap_or_default();
    let n = new.spec.clone().unwrap_or_default();
    if o.volume_name.as_deref().unwrap_or_default().is_empty() {
        o.volume_name = n.volume_name.clone();
    }
    if o.storage_class_name.is_none() {
        o.storage_class_name = n.storage_class_name.clone();
    }
    let storage = |s: &k8s_openapi::api::core::v1::PersistentVolumeClaimSpec| {
        bytes_of(
            s.resources
                .as_ref()
                .and_then(|r| r.requests.as_ref())
                .and_then(|r| r.get("storage")),
        )
    };
    let mut errs = vec![];
    if storage(&n) < storage(&o) {
        err(
            &mut errs,
            "spec.resources.requests.storage",
            "Forbidden: field can not be less than previous value",
        );
    }
    o.resources = n.resources.clone();
    if o != n {
        err(
            &mut errs,
            "spec",
            "Forbidden: spec is immutable after creation except resources.requests and volumeAttributesClassName for bound claims",
        );
    }
    errs
}

/// kube-apiserver's validation of a volume.
pub fn validate_pv(pv: &PersistentVolume) -> Vec<FieldError> {
    let mut errs = vec![];
    let spec = pv.spec.clone().unwrap_or_default();
    access_modes(&mut errs, "spec.accessModes", spec.access_modes.as_ref());
    storage_quantity(
        &mut errs,
        "spec.capacity",
        spec.capacity.as_ref().and_then(|c| c.get("storage")),
    );
    let sources = [
        spec.host_path.is_some(),
        spec.local.is_some(),
        spec.nfs.is_some(),
        spec.csi.is_some(),
    ];
    match sources.iter().filter(|s| **s).count() {
        0 => err(
            &mut errs,
            "spec",
            "Required value: must specify a volume type",
        ),
        1 => {}
        _ => err(
            &mut errs,
            "spec",
            "Forbidden: may not specify more than 1 volume type",
        ),
    }
    if let Some(hp) = &spec.host_path
        && !hp.path.starts_with('/')
    {
        err(
            &mut errs,
            "spec.hostPath.path",
            format!("Invalid value: \"{}\": must be an absolute path", hp.path),
        );
    }
    if let Some(l) = &spec.local {
        if !l.path.starts_with('/') {
            err(
                &mut errs,
                "spec.local.path",
                format!("Invalid value: \"{}\": must be an absolute path", l.path),
            );
        }
        if spec.node_affinity.is_none() {
            err(
                &mut errs,
                "spec.nodeAffinity",
                "Required value: Local volume requires node affinity",
            );
        }
    }
    if let Some(p) = spec
        .persistent_volume_reclaim_policy
        .as_deref()
        .filter(|p| !["Retain", "Delete", "Recycle"].contains(p))
    {
        err(
            &mut errs,
            "spec.persistentVolumeReclaimPolicy",
            format!(
                "Unsupported value: \"{p}\": supported values: \"Delete\", \"Recycle\", \"Retain\""
            ),
        );
    }
    errs
}

/// kube-apiserver's validation of a class.
pub fn validate_storage_class(sc: &StorageClass) -> Vec<FieldError> {
    let mut errs = vec![];
    if sc.provisioner.is_empty() {
        err(&mut errs, "provisioner", "Required value");
    }
    if let Some(p) = sc
        .reclaim_policy
        .as_deref()
        .filter(|p| !["Retain", "Delete"].contains(p))
    {
        err(
            &mut errs,
            "reclaimPolicy",
            format!("Unsupported value: \"{p}\": supported values: \"Delete\", \"Retain\""),
        );
    }
    if let Some(m) = sc
        .volume_binding_mode
        .as_deref()
        .filter(|m| !["Immediate", "WaitForFirstConsumer"].contains(m))
    {
        err(
            &mut errs,
            "volumeBindingMode",
            format!(
                "Unsupported value: \"{m}\": supported values: \"Immediate\", \"WaitForFirstConsumer\""
            ),
        );
    }
    errs
}

/// A class's provisioner, parameters, reclaim policy and binding mode are fixed.
pub fn validate_storage_class_update(old: &StorageClass, new: &StorageClass) -> Vec<FieldError> {
    let mut errs = vec![];
    if old.parameters != new.parameters {
        err(
            &mut errs,
            "parameters",
            "Forbidden: updates to parameters are forbidden.",
        );
    }
    if old.provisioner != new.provisioner {
        err(
            &mut errs,
            "provisioner",
            "Forbidden: updates to provisioner are forbidden.",
        );
    }
    if old.reclaim_policy != new.reclaim_policy {
        err(
            &mut errs,
            "reclaimPolicy",
            "Forbidden: updates to reclaimPolicy are forbidden.",
        );
    }
    if old.volume_binding_mode != new.volume_binding_mode {
        err(
            &mut errs,
            "volumeBindingMode",
            "Forbidden: updates to volumeBindingMode are forbidden.",
        );
    }
    errs
}

/// The name of the default class among `classes` (the newest if several say so).
pub fn default_class<'a>(classes: impl Iterator<Item = &'a StorageClass>) -> Option<String> {
    classes
        .filter(|c| {
            c.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(DEFAULT_CLASS))
                .is_some_and(|v| v == "true")
        })
        .max_by_key(|c| c.metadata.creation_timestamp.as_ref().map(|t| t.0))
        .and_then(|c| c.metadata.name.clone())
}

/// Whether volume `pv` may be used on node `n` (its node affinity).
pub fn pv_fits_node(pv: &PersistentVolume, n: &Node) -> bool {
    pv.spec
        .as_ref()
        .and_then(|s| s.node_affinity.as_ref())
        .and_then(|a| a.required.as_ref())
        .is_none_or(|req| selector_terms_match(req, n))
}

fn bytes_of(q: Option<&Quantity>) -> i64 {
    q.and_then(|q| quantity::bytes(&q.0)).unwrap_or(0)
}

fn request(c: &PersistentVolumeClaim) -> i64 {
    bytes_of(
        c.spec
            .as_ref()
            .and_then(|s| s.resources.as_ref())
            .and_then(|r| r.requests.as_ref())
            .and_then(|r| r.get("storage")),
    )
}

fn capacity(pv: &PersistentVolume) -> i64 {
    bytes_of(
        pv.spec
            .as_ref()
            .and_then(|s| s.capacity.as_ref())
            .and_then(|c| c.get("storage")),
    )
}

/// The claim a volume is bound or pre-bound to: (namespace, name, uid if known).
fn claim_ref(pv: &PersistentVolume) -> Option<&ObjectReference> {
    pv.spec.as_ref()?.claim_ref.as_ref()
}

fn refers_to(r: &ObjectReference, c: &PersistentVolumeClaim) -> bool {
    r.namespace == c.metadata.namespace
        && r.name == c.metadata.name
        && r.uid
            .as_deref()
            .is_none_or(|u| u.is_empty() || Some(u) == c.metadata.uid.as_deref())
}

/// Whether volume `pv` can serve claim `c`: free or pre-bound to it, same class and volume
/// mode, every access mode the claim asks for, enough capacity, the claim's selector.
fn fits(pv: &PersistentVolume, c: &PersistentVolumeClaim) -> bool {
    let (Some(ps), Some(cs)) = (pv.spec.as_ref(), c.spec.as_ref()) else {
        return false;
    };
    if pv.metadata.deletion_timestamp.is_some() {
        return false;
    }
    if let Some(r) = claim_ref(pv)
        && !refers_to(r, c)
    {
        return false;
    }
    let phase = pv.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Released" | "Failed")) {
        return false;
    }
    let class = |s: &Option<String>| s.clone().unwrap_or_default();
    let mode = |s: &Option<String>| s.clone().unwrap_or_else(|| "Filesystem".into());
    let modes: HashSet<&String> = ps.access_modes.iter().flatten().collect();
    class(&ps.storage_class_name) == class(&cs.storage_class_name)
        && mode(&ps.volume_mode) == mode(&cs.volume_mode)
        && cs.access_modes.iter().flatten().all(|m| modes.contains(m))
        && capacity(pv) >= request(c)
        && cs
            .selector
            .as_ref()
            .is_none_or(|sel| selector_matches(sel, pv.metadata.labels.as_ref()))
}

/// The volume the binder picks for `c`: the one it names, one pre-bound to it, else the
/// smallest that fits.
pub fn best_volume<'a>(
    c: &PersistentVolumeClaim,
    pvs: &[&'a PersistentVolume],
) -> Option<&'a PersistentVolume> {
    let named = c
        .spec
        .as_ref()
        .and_then(|s| s.volume_name.as_deref())
        .filter(|n| !n.is_empty());
    if let Some(n) = named {
        return pvs
            .iter()
            .find(|pv| name_of(&pv.metadata) == n && fits(pv, c))
            .copied();
    }
    let fitting: Vec<&&PersistentVolume> = pvs.iter().filter(|pv| fits(pv, c)).collect();
    fitting
        .iter()
        .find(|pv| claim_ref(pv).is_some())
        .or_else(|| {
            fitting
                .iter()
                .min_by_key(|pv| (capacity(pv), name_of(&pv.metadata)))
        })
        .map(|pv| **pv)
}

/// The volume keelson's provisioner makes for `c` of class `sc` on `node` (whose local-path
/// root is `root`): a directory `<root>/<pv>_<namespace>_<claim>`, pinned to the node,
/// pre-bound to the claim, cleaned up by the node before it goes.
pub fn provisioned_volume(
    c: &PersistentVolumeClaim,
    sc: &StorageClass,
    node: &str,
    root: &str,
) -> PersistentVolume {
    let uid = c.metadata.uid.clone().unwrap_or_default();
    let name = format!("pvc-{uid}");
    let ns = c.metadata.namespace.clone().unwrap_or_default();
    let claim = name_of(&c.metadata).to_string();
    let spec = c.spec.clone().unwrap_or_default();
    let size = spec
        .resources
        .as_ref()
        .and_then(|r| r.requests.as_ref())
        .and_then(|r| r.get("storage"))
        .cloned()
        .unwrap_or_else(|| Quantity("0".into()));
    PersistentVolume {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            annotations: Some(BTreeMap::from([
                (PROVISIONED_BY.to_string(), PROVISIONER.to_string()),
                (SELECTED_NODE.to_string(), node.to_string()),
            ])),
            finalizers: Some(vec![CLEANUP_FINALIZER.into()]),
            ..Default::default()
        },
        spec: Some(PersistentVolumeSpec {
            access_modes: spec.access_modes.clone(),
            capacity: Some(BTreeMap::from([("storage".to_string(), size)])),
            claim_ref: Some(ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("PersistentVolumeClaim".into()),
                namespace: Some(ns.clone()),
                name: Some(claim.clone()),
                uid: Some(uid),
                ..Default::default()
            }),
            host_path: Some(HostPathVolumeSource {
                path: format!("{}/{name}_{ns}_{claim}", root.trim_end_matches('/')),
                type_: Some("DirectoryOrCreate".into()),
            }),
            node_affinity: Some(VolumeNodeAffinity {
                required: Some(NodeSelector {
                    node_selector_terms: vec![NodeSelectorTerm {
                        match_expressions: Some(vec![NodeSelectorRequirement {
                            key: "kubernetes.io/hostname".into(),
                            operator: "In".into(),
                            values: Some(vec![node.to_string()]),
                        }]),
                        match_fields: None,
                    }],
                }),
            }),
            persistent_volume_reclaim_policy: sc.reclaim_policy.clone().or(Some("Delete".into())),
            storage_class_name: sc.metadata.name.clone(),
            volume_mode: spec.volume_mode.clone(),
            ..Default::default()
        }),
        status: None,
    }
}

/// The node a provisioned volume lives on.
pub fn volume_node(pv: &PersistentVolume) -> Option<&str> {
    pv.metadata
        .annotations
        .as_ref()?
        .get(SELECTED_NODE)
        .map(String::as_str)
}

/// One write the volume controllers decide.
#[derive(Debug, Clone, PartialEq)]
pub enum StorageWrite {
    /// Bind the claim (namespace, name) to the volume: the volume's claimRef first, then the
    /// claim's volumeName, then both statuses.
    Bind {
        ns: String,
        claim: String,
        claim_uid: String,
        pv: String,
    },
    /// A claim's status (phase, capacity, access modes).
    ClaimStatus {
        ns: String,
        claim: String,
        status: Value,
    },
    /// A volume's status phase (and message).
    VolumeStatus {
        pv: String,
        status: Value,
    },
    Provision(Box<PersistentVolume>),
    /// Delete a released volume whose policy says so.
    DeleteVolume(String),
    /// Remove a protection finalizer: from a claim (namespace, name) or a volume.
    ReleaseClaim {
        ns: String,
        claim: String,
    },
    ReleaseVolume(String),
    /// An event on a claim: (namespace, name, warning, reason, message).
    ClaimEvent {
        ns: String,
        claim: String,
        warning: bool,
        reason: &'static str,
        message: String,
    },
}

/// What the caches hold that the volume controllers read.
pub struct World<'a> {
    pub claims: &'a [&'a PersistentVolumeClaim],
    pub volumes: &'a [&'a PersistentVolume],
    pub classes: &'a [&'a StorageClass],
    pub pods: &'a [&'a Pod],
    /// Each Ready node's local-path root (from its annotation).
    pub roots: &'a BTreeMap<String, String>,
    /// The nodes (a claim that waits for its first consumer binds only volumes its node may use).
    pub nodes: &'a [&'a Node],
}

fn key(m: &ObjectMeta) -> (String, String) {
    (
        m.namespace.clone().unwrap_or_default(),
        name_of(m).to_string(),
    )
}

/// Every write the binder, provisioner, reclaimer and protection controllers want now.
pub fn plan(w: &World) -> Vec<StorageWrite> {
    let mut out = vec![];
    let claims: BTreeMap<(String, String), &PersistentVolumeClaim> =
        w.claims.iter().map(|c| (key(&c.metadata), *c)).collect();
    // Volumes some claim names already are nobody else's, whatever order the claims come in.
    let mut taken: HashSet<String> = w
        .claims
        .iter()
        .filter_map(|c| c.spec.as_ref()?.volume_name.clone())
        .filter(|v| !v.is_empty())
        .collect();
    for c in w.claims {
        plan_claim(w, c, &mut taken, &mut out);
    }
    for pv in w.volumes {
        plan_volume(pv, &claims, &mut out);
    }
    out
}

fn class_of<'a>(w: &World<'a>, c: &PersistentVolumeClaim) -> Option<&'a StorageClass> {
    let name = c.spec.as_ref()?.storage_class_name.as_deref()?;
    w.classes
        .iter()
        .find(|sc| name_of(&sc.metadata) == name)
        .copied()
}

/// Whether a pod that has not finished uses the claim.
fn in_use(w: &World, c: &PersistentVolumeClaim) -> bool {
    let (ns, name) = key(&c.metadata);
    w.pods.iter().any(|p| {
        p.metadata.namespace.as_deref() == Some(ns.as_str())
            && !matches!(
                p.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            )
            && p.spec
                .as_ref()
                .and_then(|s| s.volumes.as_ref())
                .is_some_and(|vs| {
                    vs.iter().any(|v| {
                        v.persistent_volume_claim
                            .as_ref()
                            .is_some_and(|c| c.claim_name == name)
                    })
                })
    })
}

fn plan_claim(
    w: &World,
    c: &PersistentVolumeClaim,
    taken: &mut HashSet<String>,
    out: &mut Vec<StorageWrite>,
) {
    let (ns, claim) = key(&c.metadata);
    if c.metadata.deletion_timestamp.is_some() {
        let protected = super::has_finalizer(&c.metadata, PVC_PROTECTION);
        if protected && !in_use(w, c) {
            out.push(StorageWrite::ReleaseClaim { ns, claim });
        }
        return;
    }
    let uid = c.metadata.uid.clone().unwrap_or_default();
    let bound_to = c
        .spec
        .as_ref()
        .and_then(|s| s.volume_name.clone())
        .filter(|v| !v.is_empty());
    let phase = c.status.as_ref().and_then(|s| s.phase.as_deref());
    if let Some(v) = &bound_to {
        taken.insert(v.clone());
        let pv = w.volumes.iter().find(|pv| name_of(&pv.metadata) == v);
        match pv {
            Some(pv) if claim_ref(pv).is_some_and(|r| refers_to(r, c)) => {
                let have = c.status.as_ref().and_then(|s| s.capacity.as_ref());
                let cap = pv.spec.as_ref().and_then(|s| s.capacity.as_ref());
                if phase != Some("Bound") || have != cap {
                    out.push(StorageWrite::ClaimStatus {
                        ns,
                        claim,
                        status: claim_status("Bound", Some(pv)),
                    });
                }
            }
            None if phase == Some("Bound") => out.push(StorageWrite::ClaimStatus {
                ns,
                claim,
                status: json!({"phase": "Lost"}),
            }),
            Some(pv) if claim_ref(pv).is_none() => out.push(StorageWrite::Bind {
                ns,
                claim,
                claim_uid: uid,
                pv: v.clone(),
            }),
            _ => {}
        }
        return;
    }
    // A claim of a class that waits for its first consumer binds only a volume pre-bound to it
    // before the scheduler chose a node, then volumes that node may use.
    let waits = class_of(w, c)
        .is_some_and(|sc| sc.volume_binding_mode.as_deref() == Some("WaitForFirstConsumer"));
    let selected = c
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(SELECTED_NODE));
    let node = selected.and_then(|n| w.nodes.iter().find(|x| x.metadata.name.as_ref() == Some(n)));
    let free: Vec<&PersistentVolume> = w
        .volumes
        .iter()
        .filter(|pv| !taken.contains(name_of(&pv.metadata)))
        .filter(|pv| {
            !waits
                || claim_ref(pv).is_some_and(|r| refers_to(r, c))
                || node.is_some_and(|n| pv_fits_node(pv, n))
        })
        .copied()
        .collect();
    if let Some(pv) = best_volume(c, &free) {
        let name = name_of(&pv.metadata).to_string();
        taken.insert(name.clone());
        out.push(StorageWrite::Bind {
            ns,
            claim,
            claim_uid: uid,
            pv: name,
        });
        return;
    }
    no_volume_fits(w, c, out);
}

/// No volume serves claim `c`: keelson's class provisions one; another class or none says why
/// the claim waits.
fn no_volume_fits(w: &World, c: &PersistentVolumeClaim, out: &mut Vec<StorageWrite>) {
    let (ns, claim) = key(&c.metadata);
    let class = class_of(w, c);
    let class_name = c
        .spec
        .as_ref()
        .and_then(|s| s.storage_class_name.clone())
        .unwrap_or_default();
    match class {
        Some(sc) if sc.provisioner == PROVISIONER => provision(w, c, sc, out),
        Some(sc) => out.push(StorageWrite::ClaimEvent {
            ns,
            claim,
            warning: false,
            reason: "ExternalProvisioning",
            message: format!(
                "Waiting for a volume to be created either by the external provisioner '{}' or manually by the system administrator. If volume creation is delayed, please verify that the provisioner is running and correctly registered.",
                sc.provisioner
            ),
        }),
        None if class_name.is_empty() => out.push(StorageWrite::ClaimEvent {
            ns,
            claim,
            warning: false,
            reason: "FailedBinding",
            message: "no persistent volumes available for this claim and no storage class is set".into(),
        }),
        None => out.push(StorageWrite::ClaimEvent {
            ns,
            claim,
            warning: true,
            reason: "ProvisioningFailed",
            message: format!("storageclass.storage.k8s.io \"{class_name}\" not found"),
        }),
    }
}

/// Provisions a volume for `c` on its selected node (a class that waits for the first
/// consumer), or on the first Ready node with a local-path root (Immediate).
fn provision(w: &World, c: &PersistentVolumeClaim, sc: &StorageClass, out: &mut Vec<StorageWrite>) {
    let (ns, claim) = key(&c.metadata);
    let wait = sc.volume_binding_mode.as_deref() == Some("WaitForFirstConsumer");
    let selected = c
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(SELECTED_NODE))
        .cloned();
    let node = match (wait, selected) {
        (_, Some(n)) => n,
        (true, None) => {
            out.push(StorageWrite::ClaimEvent {
                ns,
                claim,
                warning: false,
                reason: "WaitForFirstConsumer",
                message: "waiting for first consumer to be created before binding".into(),
            });
            return;
        }
        (false, None) => match w.roots.keys().next() {
            Some(n) => n.clone(),
            None => return,
        },
    };
    let Some(root) = w.roots.get(&node) else {
        out.push(StorageWrite::ClaimEvent {
            ns,
            claim,
            warning: true,
            reason: "ProvisioningFailed",
            message: format!(
                "node \"{node}\" has no local-path root (annotation {LOCAL_PATH_ROOT})"
            ),
        });
        return;
    };
    let pv = provisioned_volume(c, sc, &node, root);
    if w.volumes
        .iter()
        .any(|v| v.metadata.name == pv.metadata.name)
    {
        return;
    }
    out.push(StorageWrite::Provision(Box::new(pv)));
}

/// The status a claim shows bound to `pv` (or in `phase` without one).
pub fn claim_status(phase: &str, pv: Option<&PersistentVolume>) -> Value {
    let spec = pv.and_then(|p| p.spec.as_ref());
    json!({
        "phase": phase,
        "accessModes": spec.and_then(|s| s.access_modes.clone()),
        "capacity": spec.and_then(|s| s.capacity.clone()),
    })
}

fn plan_volume(
    pv: &PersistentVolume,
    claims: &BTreeMap<(String, String), &PersistentVolumeClaim>,
    out: &mut Vec<StorageWrite>,
) {
    let name = name_of(&pv.metadata).to_string();
    let phase = pv.status.as_ref().and_then(|s| s.phase.clone());
    let want = match claim_ref(pv) {
        None => "Available",
        Some(r) => {
            let k = (
                r.namespace.clone().unwrap_or_default(),
                r.name.clone().unwrap_or_default(),
            );
            match claims.get(&k) {
                Some(c) if refers_to(r, c) => {
                    let bound = c.spec.as_ref().and_then(|s| s.volume_name.as_deref())
                        == Some(name.as_str());
                    if bound { "Bound" } else { "Available" }
                }
                // Pre-bound to a claim not made yet: still available for it.
                None if r.uid.as_deref().unwrap_or_default().is_empty() => "Available",
                _ => "Released",
            }
        }
    };
    if pv.metadata.deletion_timestamp.is_some() {
        let protected = super::has_finalizer(&pv.metadata, PV_PROTECTION);
        if protected && want != "Bound" {
            out.push(StorageWrite::ReleaseVolume(name));
        }
        return;
    }
    let policy = pv
        .spec
        .as_ref()
        .and_then(|s| s.persistent_volume_reclaim_policy.as_deref())
        .unwrap_or("Retain");
    if want == "Released" && policy == "Delete" {
        if provisioned_here(pv) {
            out.push(StorageWrite::DeleteVolume(name));
        } else if phase.as_deref() != Some("Failed") {
            out.push(StorageWrite::VolumeStatus {
                pv: name,
                status: json!({"phase": "Failed", "message": "error getting deleter volume plugin for volume: no deletable volume plugin matched"}),
            });
        }
        return;
    }
    if phase.as_deref() != Some(want) && phase.as_deref() != Some("Failed") {
        out.push(StorageWrite::VolumeStatus {
            pv: name,
            status: json!({"phase": want}),
        });
    }
}

/// Whether volume `pv` is bound to claim `c`: the claim names it and the volume's claimRef
/// names the claim, uid included.
pub fn bound_to(pv: &PersistentVolume, c: &PersistentVolumeClaim) -> bool {
    c.spec.as_ref().and_then(|s| s.volume_name.as_deref()) == pv.metadata.name.as_deref()
        && claim_ref(pv).is_some_and(|r| {
            r.namespace == c.metadata.namespace
                && r.name == c.metadata.name
                && r.uid.is_some()
                && r.uid == c.metadata.uid
        })
}

/// Whether keelson's provisioner made the volume.
pub fn provisioned_here(pv: &PersistentVolume) -> bool {
    pv.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(PROVISIONED_BY))
        .is_some_and(|p| p == PROVISIONER)
}

#[cfg(test)]
mod tests;
