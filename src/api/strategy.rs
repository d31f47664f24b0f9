//! What each served kind does beyond storing JSON, declared in one place per kind (kube-
//! apiserver's registry strategies): how it decodes, its defaults and validation, the status a
//! new object starts with, the fields a field selector may name, its Table columns, its
//! discovery categories and verbs, admission on create, how a delete waits, and the work
//! around writes that needs the server's state (`Hook`). The generic handlers consult `Resource::strategy`; a kind
//! with nothing special uses `PLAIN` (served, stored, listed, watched as JSON).
//!
//! Adding a kind: a `Strategy` here (or `PLAIN`) and its line in `registry::RESOURCES`.

use k8s_openapi::api::{
    apps::v1::{ControllerRevision, DaemonSet, Deployment, ReplicaSet, StatefulSet},
    batch::v1::{CronJob, Job},
    certificates::v1::CertificateSigningRequest,
    coordination::v1::Lease,
    core::v1::{
        ConfigMap, Endpoints, Event, Namespace, Node, PersistentVolume, PersistentVolumeClaim, Pod,
        Secret, Service, ServiceAccount,
    },
    discovery::v1::EndpointSlice,
    policy::v1::PodDisruptionBudget,
    rbac::v1 as rbac,
    scheduling::v1::PriorityClass,
    storage::v1::StorageClass,
};
use k8s_openapi::kube_aggregator::pkg::apis::apiregistration::v1::APIService;
use serde_json::{Value, json};

use super::{
    table::{self, Columns},
    typed,
};

/// A served kind's behaviour.
#[derive(Debug)]
pub struct Strategy {
    /// Decodes into the kind's type and back (the canonical form; unknown fields dropped), or
    /// says which field does not fit.
    pub roundtrip: fn(&Value, &str, &str) -> Result<Value, String>,
    /// kube-apiserver's defaults, applied on create and update.
    pub defaults: fn(&mut Value),
    /// Validation errors as `field: message` lines.
    pub validate: fn(&Value) -> Vec<String>,
    /// What an update may not change (old, new), as `field: message` lines.
    pub validate_update: fn(&Value, &Value) -> Vec<String>,
    /// The status a created object starts with (the request's is not kept).
    pub initial_status: fn(&mut Value),
    /// Fields a field selector may name besides `metadata.name` and `metadata.namespace`.
    pub field_selectors: &'static [&'static str],
    /// `kubectl get` columns.
    pub table: &'static Columns,
    /// Discovery categories (`kubectl get all` lists the kinds in `all`).
    pub categories: &'static [&'static str],
    /// Whether `deletecollection` is served (kube-apiserver serves none for Namespaces).
    pub delete_collection: bool,
    /// Admission on create, after validation (the ServiceAccount token volume of a Pod, a
    /// Namespace's finalizer and phase).
    pub on_create: fn(&mut Value),
    /// The grace period a delete of `obj` waits (the request's, if any, is given), or None to
    /// delete at once. Bound pods wait for their kubelet.
    pub delete_grace: fn(&Value, Option<i64>) -> Option<i64>,
    /// Whether an object marked for deletion is removed only when someone confirms it (a bound
    /// pod: its kubelet), not when its finalizers are gone.
    pub confirmed_delete: fn(&Value) -> bool,
    /// Server-side work around the kind's writes that needs the server's state.
    pub hooks: &'static [Hook],
    /// A kind never stored: a create is answered (`api::review`), nothing else is served.
    pub review: Option<Review>,
}

/// The kinds a create of which asks the server a question (access and identity reviews).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Review {
    /// SelfSubjectAccessReview: may I …?
    SelfAccess,
    /// SubjectAccessReview: may this user …?
    Access,
    /// LocalSubjectAccessReview: may this user … in this namespace?
    LocalAccess,
    /// SelfSubjectRulesReview: what may I do in this namespace?
    SelfRules,
    /// TokenReview: whose is this token?
    Token,
    /// SelfSubjectReview: who am I?
    SelfSubject,
}

/// Work the write handlers do for the kinds that name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// ClusterIP and node ports allocated on create and update, released on delete.
    ServiceAddresses,
    /// The namespace's root CA ConfigMap published on create; its contents deleted with it.
    NamespaceContents,
    /// The requester recorded, and approval and signing, on create.
    CertificateRequest,
    /// The ServiceAccount admission on create: a pod without `imagePullSecrets` gets its
    /// service account's.
    ServiceAccountPullSecrets,
    /// The DefaultStorageClass admission on create: a claim without a class gets the
    /// default one.
    DefaultStorageClass,
    /// The Priority admission on create: a pod gets its PriorityClass's priority and
    /// preemption policy (or the global default's), an unknown class is forbidden.
    Priority,
    /// Only one PriorityClass may be the global default (create and update).
    SingleDefaultPriority,
}

impl Strategy {
    pub fn has(&self, hook: Hook) -> bool {
        self.hooks.contains(&hook)
    }
}

/// Keeps the object as it came (a kind without a typed form).
fn as_json(v: &Value, _kind: &str, _api: &str) -> Result<Value, String> {
    Ok(v.clone())
}

/// No errors.
fn valid(_: &Value) -> Vec<String> {
    vec![]
}

/// A kind with nothing special.
pub const PLAIN: Strategy = Strategy {
    roundtrip: as_json,
    defaults: |_| {},
    validate: valid,
    validate_update: |_, _| vec![],
    initial_status: |_| {},
    field_selectors: &[],
    table: &table::PLAIN,
    categories: &[],
    delete_collection: true,
    on_create: |_| {},
    delete_grace: |_, _| None,
    confirmed_delete: |_| false,
    hooks: &[],
    review: None,
};

const fn review(kind: Review) -> Strategy {
    Strategy {
        delete_collection: false,
        review: Some(kind),
        ..PLAIN
    }
}

pub const SELF_SUBJECT_ACCESS_REVIEW: Strategy = review(Review::SelfAccess);
pub const SUBJECT_ACCESS_REVIEW: Strategy = review(Review::Access);
pub const LOCAL_SUBJECT_ACCESS_REVIEW: Strategy = review(Review::LocalAccess);
pub const SELF_SUBJECT_RULES_REVIEW: Strategy = review(Review::SelfRules);
pub const TOKEN_REVIEW: Strategy = review(Review::Token);
pub const SELF_SUBJECT_REVIEW: Strategy = review(Review::SelfSubject);

const ALL: &[&str] = &["all"];

pub const NAMESPACE: Strategy = Strategy {
    roundtrip: typed::roundtrip::<Namespace>,
    field_selectors: &["status.phase"],
    table: &table::NAMESPACE,
    delete_collection: false,
    on_create: |obj| {
        obj["spec"] = json!({"finalizers": ["kubernetes"]});
        obj["status"] = json!({"phase": "Active"});
    },
    // A namespace with `spec.finalizers` waits for them (the namespace controller removes
    // `kubernetes` once its contents are gone, through `namespaces/NAME/finalize`).
    delete_grace: |ns, _| (!namespace_finalized(ns)).then_some(0),
    confirmed_delete: |ns| !namespace_finalized(ns),
    hooks: &[Hook::NamespaceContents],
    ..PLAIN
};

/// Whether a namespace's `spec.finalizers` are all gone.
fn namespace_finalized(ns: &Value) -> bool {
    ns.pointer("/spec/finalizers")
        .and_then(Value::as_array)
        .is_none_or(|f| f.is_empty())
}

pub const NODE: Strategy = Strategy {
    roundtrip: typed::roundtrip::<Node>,
    field_selectors: &["spec.unschedulable"],
    table: &table::NODE,
    ..PLAIN
};

pub const POD: Strategy = Strategy {
    roundtrip: typed::roundtrip::<Pod>,
    defaults: typed::default_pod,
    validate: validate_pod,
    initial_status: pod_status,
    field_selectors: &[
        "spec.nodeName",
        "spec.restartPolicy",
        "spec.schedulerName",
        "spec.serviceAccountName",
        "spec.hostNetwork",
        "status.phase",
        "status.podIP",
        "status.nominatedNodeName",
    ],
    table: &table::POD,
    categories: ALL,
    on_create: typed::mount_service_account_token,
    hooks: &[Hook::ServiceAccountPullSecrets, Hook::Priority],
    delete_grace: pod_delete_grace,
    confirmed_delete: awaits_kubelet,
    ..PLAIN
};

/// A bound pod being deleted waits for its kubelet's last word (a delete with grace 0), unless
/// it had it already: then the last finalizer's removal finishes the delete.
fn awaits_kubelet(pod: &Value) -> bool {
    bound(pod)
        && pod
            .pointer("/metadata/deletionGracePeriodSeconds")
            .and_then(Value::as_i64)
            != Some(0)
}

fn bound(pod: &Value) -> bool {
    pod.pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .is_some_and(|n| !n.is_empty())
}

/// A pod on a node that has not finished stops gracefully (the request's grace, else its
/// terminationGracePeriodSeconds, else 30 s); its kubelet finishes the delete.
fn pod_delete_grace(pod: &Value, requested: Option<i64>) -> Option<i64> {
    let finished = matches!(
        pod.pointer("/status/phase").and_then(Value::as_str),
        Some("Succeeded" | "Failed")
    );
    if !bound(pod) || finished {
        return None;
    }
    let grace = requested
        .or_else(|| {
            pod.pointer("/spec/terminationGracePeriodSeconds")
                .and_then(Value::as_i64)
        })
        .unwrap_or(30);
    (grace > 0).then_some(grace)
}

/// Decodes `obj` as `T` and checks it with `check` (kinds/): its errors as `field: message`.
fn checked<T: serde::de::DeserializeOwned>(
    obj: &Value,
    check: fn(&T) -> Vec<crate::kinds::validate::FieldError>,
) -> Vec<String> {
    match serde_json::from_value::<T>(obj.clone()) {
        Ok(o) => check(&o).iter().map(|e| e.to_string()).collect(),
        Err(e) => vec![e.to_string()],
    }
}

/// Decodes both sides of an update as `T` and checks them with `check` (kinds/).
fn checked_update<T: serde::de::DeserializeOwned>(
    old: &Value,
    new: &Value,
    check: fn(&T, &T) -> Vec<crate::kinds::validate::FieldError>,
) -> Vec<String> {
    match (
        serde_json::from_value::<T>(old.clone()),
        serde_json::from_value::<T>(new.clone()),
    ) {
        (Ok(o), Ok(n)) => check(&o, &n).iter().map(|e| e.to_string()).collect(),
        (_, Err(e)) | (Err(e), _) => vec![e.to_string()],
    }
}

/// The fields at `paths` may not change on update.
fn fixed(old: &Value, new: &Value, paths: &[&str]) -> Vec<String> {
    crate::kinds::validate::immutable(old, new, paths)
        .iter()
        .map(|e| e.to_string())
        .collect()
}

fn validate_pod(obj: &Value) -> Vec<String> {
    checked(obj, crate::kinds::validate::validate_pod)
}

/// A new Pod is Pending, with its QoS class.
fn pod_status(obj: &mut Value) {
    let qos = serde_json::from_value::<k8s_openapi::api::core::v1::PodSpec>(
        obj.get("spec").cloned().unwrap_or(Value::Null),
    )
    .map(|spec| crate::kinds::pod::qos_class(&spec))
    .unwrap_or_else(|_| "BestEffort".into());
    obj["status"] = json!({"phase": "Pending", "qosClass": qos});
}

/// A new object of a workload kind starts with an empty status.
fn empty_status(obj: &mut Value) {
    obj["status"] = json!({});
}

pub const SERVICE: Strategy = Strategy {
    roundtrip: typed::roundtrip::<Service>,
    initial_status: |obj| obj["status"] = json!({"loadBalancer": {}}),
    table: &table::SERVICE,
    categories: ALL,
    hooks: &[Hook::ServiceAddresses],
    ..PLAIN
};

pub const ENDPOINTS: Strategy = Strategy {
    roundtrip: typed::roundtrip::<Endpoints>,
    table: &table::ENDPOINTS,
    ..PLAIN
};

pub const EVENT: Strategy = Strategy {
    roundtrip: typed::roundtrip::<Event>,
    field_selectors: &[
        "involvedObject.kind",
        "involvedObject.namespace",
        "involvedObject.name",
        "involvedObject.uid",
        "involvedObject.apiVersion",
        "involvedObject.resourceVersion",
        "involvedObject.fieldPath",
        "reason",
        "reportingComponent",
        "source",
        "type",
    ],
    table: &table::EVENT,
    ..PLAIN
};

pub const CONFIG_MAP: Strategy = Strategy {
    roundtrip: typed::roundtrip::<ConfigMap>,
    table: &table::CONFIG,
    ..PLAIN
};

pub const SECRET: Strategy = Strategy {
    roundtrip: typed::roundtrip::<Secret>,
    defaults: |obj| {
        if obj
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("")
            .is_empty()
        {
            obj["type"] = "Opaque".into();
        }
    },
    field_selectors: &["type"],
    table: &table::CONFIG,
    ..PLAIN
};

pub const SERVICE_ACCOUNT: Strategy = Strategy {
    roundtrip: typed::roundtrip::<ServiceAccount>,
    table: &table::SERVICE_ACCOUNT,
    ..PLAIN
};

pub const DEPLOYMENT: Strategy = Strategy {
    roundtrip: typed::roundtrip::<Deployment>,
    defaults: |obj| typed::default_workload("Deployment", obj),
    initial_status: empty_status,
    table: &table::DEPLOYMENT,
    categories: ALL,
    validate_update: |old, new| fixed(old, new, &["/spec/selector"]),
    ..PLAIN
};

pub const REPLICA_SET: Strategy = Strategy {
    roundtrip: typed::roundtrip::<ReplicaSet>,
    defaults: |obj| typed::default_workload("ReplicaSet", obj),
    initial_status: empty_status,
    field_selectors: &["status.replicas"],
    table: &table::REPLICA_SET,
    categories: ALL,
    validate_update: |old, new| fixed(old, new, &["/spec/selector"]),
    ..PLAIN
};

pub const DAEMON_SET: Strategy = Strategy {
    roundtrip: typed::roundtrip::<DaemonSet>,
    defaults: |obj| typed::default_workload("DaemonSet", obj),
    initial_status: empty_status,
    table: &table::DAEMON_SET,
    categories: ALL,
    validate_update: |old, new| fixed(old, new, &["/spec/selector"]),
    ..PLAIN
};

pub const JOB: Strategy = Strategy {
    roundtrip: typed::roundtrip::<Job>,
    defaults: default_job,
    validate: |obj| checked(obj, crate::kinds::job::validate_job),
    initial_status: empty_status,
    table: &table::JOB,
    categories: ALL,
    validate_update: |old, new| {
        fixed(
            old,
            new,
            &[
                "/spec/selector",
                "/spec/template",
                "/spec/completionMode",
                "/spec/podFailurePolicy",
                "/spec/manualSelector",
            ],
        )
    },
    ..PLAIN
};

/// A Job's defaults: its own (the generated selector needs the uid, set before this runs)
/// and its pod template's.
fn default_job(obj: &mut Value) {
    crate::kinds::job::default_job(obj);
    typed::default_template(obj);
}

pub const CRON_JOB: Strategy = Strategy {
    roundtrip: typed::roundtrip::<CronJob>,
    defaults: default_cronjob,
    validate: |obj| checked(obj, crate::kinds::cronjob::validate_cronjob),
    initial_status: empty_status,
    table: &table::CRON_JOB,
    categories: ALL,
    ..PLAIN
};

/// A CronJob's defaults and its Job template's pod defaults.
fn default_cronjob(obj: &mut Value) {
    crate::kinds::cronjob::default_cronjob(obj);
    if let Some(ps) = obj
        .pointer_mut("/spec/jobTemplate/spec/template/spec")
        .and_then(Value::as_object_mut)
    {
        typed::default_pod_spec(ps);
    }
}

pub const STATEFUL_SET: Strategy = Strategy {
    roundtrip: typed::roundtrip::<StatefulSet>,
    defaults: default_statefulset,
    validate: |obj| checked(obj, crate::kinds::statefulset::validate_statefulset),
    validate_update: |old, new| {
        checked_update(old, new, crate::kinds::statefulset::validate_update)
    },
    initial_status: |obj| obj["status"] = json!({"replicas": 0, "availableReplicas": 0}),
    table: &table::STATEFUL_SET,
    categories: ALL,
    ..PLAIN
};

/// A StatefulSet's defaults and its pod template's.
fn default_statefulset(obj: &mut Value) {
    crate::kinds::statefulset::default_statefulset(obj);
    typed::default_template(obj);
}

pub const CONTROLLER_REVISION: Strategy = Strategy {
    roundtrip: typed::roundtrip::<ControllerRevision>,
    table: &table::CONTROLLER_REVISION,
    ..PLAIN
};

pub const PERSISTENT_VOLUME_CLAIM: Strategy = Strategy {
    roundtrip: typed::roundtrip::<PersistentVolumeClaim>,
    defaults: crate::kinds::storage::default_pvc,
    validate: |obj| checked(obj, crate::kinds::storage::validate_pvc),
    validate_update: |old, new| {
        checked_update(old, new, crate::kinds::storage::validate_pvc_update)
    },
    initial_status: |obj| obj["status"] = json!({"phase": "Pending"}),
    table: &table::PERSISTENT_VOLUME_CLAIM,
    on_create: |obj| protect(obj, crate::kinds::storage::PVC_PROTECTION),
    hooks: &[Hook::DefaultStorageClass],
    ..PLAIN
};

pub const PERSISTENT_VOLUME: Strategy = Strategy {
    roundtrip: typed::roundtrip::<PersistentVolume>,
    defaults: crate::kinds::storage::default_pv,
    validate: |obj| checked(obj, crate::kinds::storage::validate_pv),
    initial_status: |obj| obj["status"] = json!({"phase": "Pending"}),
    table: &table::PERSISTENT_VOLUME,
    on_create: |obj| protect(obj, crate::kinds::storage::PV_PROTECTION),
    ..PLAIN
};

pub const STORAGE_CLASS: Strategy = Strategy {
    roundtrip: typed::roundtrip::<StorageClass>,
    defaults: crate::kinds::storage::default_storage_class,
    validate: |obj| checked(obj, crate::kinds::storage::validate_storage_class),
    validate_update: |old, new| {
        checked_update(
            old,
            new,
            crate::kinds::storage::validate_storage_class_update,
        )
    },
    table: &table::STORAGE_CLASS,
    ..PLAIN
};

pub const PRIORITY_CLASS: Strategy = Strategy {
    roundtrip: typed::roundtrip::<PriorityClass>,
    defaults: crate::kinds::priority::default_class,
    validate: crate::kinds::priority::validate_class,
    validate_update: crate::kinds::priority::validate_class_update,
    table: &table::PRIORITY_CLASS,
    hooks: &[Hook::SingleDefaultPriority],
    ..PLAIN
};

pub const API_SERVICE: Strategy = Strategy {
    roundtrip: typed::roundtrip::<APIService>,
    table: &table::API_SERVICE,
    ..PLAIN
};

/// The storage-object-in-use-protection admission: the finalizer that holds a claim while
/// pods use it, and a volume while it is bound.
fn protect(obj: &mut Value, finalizer: &str) {
    let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) else {
        return;
    };
    let fs = meta.entry("finalizers").or_insert_with(|| json!([]));
    if let Some(a) = fs.as_array_mut()
        && !a.iter().any(|f| f == finalizer)
    {
        a.push(finalizer.into());
    }
}

pub const REPLICATION_CONTROLLER: Strategy = Strategy {
    roundtrip: typed::roundtrip::<k8s_openapi::api::core::v1::ReplicationController>,
    defaults: default_replication_controller,
    validate: |obj| checked(obj, crate::kinds::replication::validate_rc),
    initial_status: |obj| obj["status"] = json!({"replicas": 0}),
    table: &table::REPLICA_SET,
    categories: ALL,
    ..PLAIN
};

/// A ReplicationController's defaults (its selector and labels from its template) and its
/// template's.
fn default_replication_controller(obj: &mut Value) {
    crate::kinds::replication::default_rc(obj);
    typed::default_template(obj);
}

pub const POD_DISRUPTION_BUDGET: Strategy = Strategy {
    roundtrip: typed::roundtrip::<PodDisruptionBudget>,
    validate: |obj| checked(obj, crate::kinds::disruption::validate_pdb),
    initial_status: |obj| obj["status"] = json!({"currentHealthy": 0, "desiredHealthy": 0, "disruptionsAllowed": 0, "expectedPods": 0}),
    table: &table::POD_DISRUPTION_BUDGET,
    ..PLAIN
};

pub const ENDPOINT_SLICE: Strategy = Strategy {
    roundtrip: typed::roundtrip::<EndpointSlice>,
    table: &table::ENDPOINT_SLICE,
    ..PLAIN
};

pub const LEASE: Strategy = Strategy {
    roundtrip: typed::roundtrip::<Lease>,
    table: &table::LEASE,
    ..PLAIN
};

pub const CSR: Strategy = Strategy {
    roundtrip: typed::roundtrip::<CertificateSigningRequest>,
    table: &table::CSR,
    hooks: &[Hook::CertificateRequest],
    ..PLAIN
};

pub const CLUSTER_ROLE: Strategy = Strategy {
    roundtrip: typed::roundtrip::<rbac::ClusterRole>,
    ..PLAIN
};

pub const CLUSTER_ROLE_BINDING: Strategy = Strategy {
    roundtrip: typed::roundtrip::<rbac::ClusterRoleBinding>,
    ..PLAIN
};

pub const ROLE: Strategy = Strategy {
    roundtrip: typed::roundtrip::<rbac::Role>,
    ..PLAIN
};

pub const ROLE_BINDING: Strategy = Strategy {
    roundtrip: typed::roundtrip::<rbac::RoleBinding>,
    ..PLAIN
};
