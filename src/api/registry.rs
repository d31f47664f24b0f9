//! The one table of served kinds (not a handler per kind): group, version, kind, plural,
//! scope, short names, verbs. Discovery documents are generated from it.

use serde_json::{Value, json};

use super::strategy::{self, Strategy};

/// One served resource.
#[derive(Debug, Clone, Copy)]
pub struct Resource {
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    pub plural: &'static str,
    pub namespaced: bool,
    pub short: &'static [&'static str],
    /// What the kind does beyond storage (`strategy.rs`).
    pub strategy: &'static Strategy,
}

impl PartialEq for Resource {
    fn eq(&self, other: &Self) -> bool {
        (self.group, self.version, self.plural) == (other.group, other.version, other.plural)
    }
}

impl Eq for Resource {}

impl Resource {
    /// `v1` or `apps/v1`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `pods` or `deployments.apps` (how errors name the resource).
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_string()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    /// The storage key prefix of this resource (etcd's layout: `/registry/<resource>/`).
    pub fn prefix(&self) -> String {
        format!("/registry/{}/", self.qualified())
    }

    /// The storage key of one object.
    pub fn key(&self, namespace: Option<&str>, name: &str) -> String {
        match namespace {
            Some(ns) if self.namespaced => format!("{}{ns}/{name}", self.prefix()),
            _ => format!("{}{name}", self.prefix()),
        }
    }
}

const fn r(
    group: &'static str,
    version: &'static str,
    kind: &'static str,
    plural: &'static str,
    namespaced: bool,
    short: &'static [&'static str],
    strategy: &'static Strategy,
) -> Resource {
    Resource {
        group,
        version,
        kind,
        plural,
        namespaced,
        short,
        strategy,
    }
}

/// Every kind keelson serves.
pub const RESOURCES: &[Resource] = &[
    r(
        "",
        "v1",
        "Namespace",
        "namespaces",
        false,
        &["ns"],
        &strategy::NAMESPACE,
    ),
    r("", "v1", "Node", "nodes", false, &["no"], &strategy::NODE),
    r("", "v1", "Pod", "pods", true, &["po"], &strategy::POD),
    r(
        "",
        "v1",
        "Service",
        "services",
        true,
        &["svc"],
        &strategy::SERVICE,
    ),
    r(
        "",
        "v1",
        "Endpoints",
        "endpoints",
        true,
        &["ep"],
        &strategy::ENDPOINTS,
    ),
    r("", "v1", "Event", "events", true, &["ev"], &strategy::EVENT),
    r(
        "",
        "v1",
        "ReplicationController",
        "replicationcontrollers",
        true,
        &["rc"],
        &strategy::REPLICATION_CONTROLLER,
    ),
    r(
        "",
        "v1",
        "ConfigMap",
        "configmaps",
        true,
        &["cm"],
        &strategy::CONFIG_MAP,
    ),
    r("", "v1", "Secret", "secrets", true, &[], &strategy::SECRET),
    r(
        "",
        "v1",
        "ServiceAccount",
        "serviceaccounts",
        true,
        &["sa"],
        &strategy::SERVICE_ACCOUNT,
    ),
    r(
        "apps",
        "v1",
        "Deployment",
        "deployments",
        true,
        &["deploy"],
        &strategy::DEPLOYMENT,
    ),
    r(
        "apps",
        "v1",
        "ReplicaSet",
        "replicasets",
        true,
        &["rs"],
        &strategy::REPLICA_SET,
    ),
    r(
        "apps",
        "v1",
        "DaemonSet",
        "daemonsets",
        true,
        &["ds"],
        &strategy::DAEMON_SET,
    ),
    r(
        "apps",
        "v1",
        "StatefulSet",
        "statefulsets",
        true,
        &["sts"],
        &strategy::STATEFUL_SET,
    ),
    r(
        "apps",
        "v1",
        "ControllerRevision",
        "controllerrevisions",
        true,
        &[],
        &strategy::CONTROLLER_REVISION,
    ),
    r(
        "",
        "v1",
        "PersistentVolumeClaim",
        "persistentvolumeclaims",
        true,
        &["pvc"],
        &strategy::PERSISTENT_VOLUME_CLAIM,
    ),
    r(
        "",
        "v1",
        "PersistentVolume",
        "persistentvolumes",
        false,
        &["pv"],
        &strategy::PERSISTENT_VOLUME,
    ),
    r("batch", "v1", "Job", "jobs", true, &[], &strategy::JOB),
    r(
        "batch",
        "v1",
        "CronJob",
        "cronjobs",
        true,
        &["cj"],
        &strategy::CRON_JOB,
    ),
    r(
        "discovery.k8s.io",
        "v1",
        "EndpointSlice",
        "endpointslices",
        true,
        &[],
        &strategy::ENDPOINT_SLICE,
    ),
    r(
        "coordination.k8s.io",
        "v1",
        "Lease",
        "leases",
        true,
        &[],
        &strategy::LEASE,
    ),
    r(
        "certificates.k8s.io",
        "v1",
        "CertificateSigningRequest",
        "certificatesigningrequests",
        false,
        &["csr"],
        &strategy::CSR,
    ),
    r(
        "rbac.authorization.k8s.io",
        "v1",
        "ClusterRole",
        "clusterroles",
        false,
        &[],
        &strategy::CLUSTER_ROLE,
    ),
    r(
        "rbac.authorization.k8s.io",
        "v1",
        "ClusterRoleBinding",
        "clusterrolebindings",
        false,
        &[],
        &strategy::CLUSTER_ROLE_BINDING,
    ),
    r(
        "rbac.authorization.k8s.io",
        "v1",
        "Role",
        "roles",
        true,
        &[],
        &strategy::ROLE,
    ),
    r(
        "rbac.authorization.k8s.io",
        "v1",
        "RoleBinding",
        "rolebindings",
        true,
        &[],
        &strategy::ROLE_BINDING,
    ),
    r(
        "storage.k8s.io",
        "v1",
        "StorageClass",
        "storageclasses",
        false,
        &["sc"],
        &strategy::STORAGE_CLASS,
    ),
    r(
        "policy",
        "v1",
        "PodDisruptionBudget",
        "poddisruptionbudgets",
        true,
        &["pdb"],
        &strategy::POD_DISRUPTION_BUDGET,
    ),
    r(
        "scheduling.k8s.io",
        "v1",
        "PriorityClass",
        "priorityclasses",
        false,
        &["pc"],
        &strategy::PRIORITY_CLASS,
    ),
    r(
        "apiregistration.k8s.io",
        "v1",
        "APIService",
        "apiservices",
        false,
        &[],
        &strategy::API_SERVICE,
    ),
    r(
        "authorization.k8s.io",
        "v1",
        "SelfSubjectAccessReview",
        "selfsubjectaccessreviews",
        false,
        &[],
        &strategy::SELF_SUBJECT_ACCESS_REVIEW,
    ),
    r(
        "authorization.k8s.io",
        "v1",
        "SubjectAccessReview",
        "subjectaccessreviews",
        false,
        &[],
        &strategy::SUBJECT_ACCESS_REVIEW,
    ),
    r(
        "authorization.k8s.io",
        "v1",
        "LocalSubjectAccessReview",
        "localsubjectaccessreviews",
        true,
        &[],
        &strategy::LOCAL_SUBJECT_ACCESS_REVIEW,
    ),
    r(
        "authorization.k8s.io",
        "v1",
        "SelfSubjectRulesReview",
        "selfsubjectrulesreviews",
        false,
        &[],
        &strategy::SELF_SUBJECT_RULES_REVIEW,
    ),
    r(
        "authentication.k8s.io",
        "v1",
        "TokenReview",
        "tokenreviews",
        false,
        &[],
        &strategy::TOKEN_REVIEW,
    ),
    r(
        "authentication.k8s.io",
        "v1",
        "SelfSubjectReview",
        "selfsubjectreviews",
        false,
        &[],
        &strategy::SELF_SUBJECT_REVIEW,
    ),
];

/// The resource served at `group/version/plural`.
pub fn find(group: &str, version: &str, plural: &str) -> Option<&'static Resource> {
    RESOURCES
        .iter()
        .find(|r| r.group == group && r.version == version && r.plural == plural)
}

/// The resource `plural` of `group` in the first version served (access reviews name no
/// version).
pub fn find_any_version(group: &str, plural: &str) -> Option<&'static Resource> {
    RESOURCES
        .iter()
        .find(|r| r.group == group && r.plural == plural)
}

const VERBS: &[&str] = &[
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];
/// Kinds deleted one by one (kube-apiserver serves no deletecollection for Namespaces).
const NAMESPACE_VERBS: &[&str] = &[
    "create", "delete", "get", "list", "patch", "update", "watch",
];

impl Resource {
    /// Discovery categories (`kubectl get all` lists the kinds in `all`).
    pub fn categories(&self) -> &'static [&'static str] {
        self.strategy.categories
    }

    /// The verbs discovery lists for this resource.
    pub fn verbs(&self) -> &'static [&'static str] {
        if self.strategy.review.is_some() {
            &["create"]
        } else if self.strategy.delete_collection {
            VERBS
        } else {
            NAMESPACE_VERBS
        }
    }
}

/// The resource of `kind` (the first served version).
pub fn by_kind(kind: &str) -> Option<&'static Resource> {
    RESOURCES.iter().find(|r| r.kind == kind)
}

/// `APIResourceList` for one group/version, or None if not served.
pub fn resource_list(group: &str, version: &str) -> Option<Value> {
    let rs: Vec<Value> = RESOURCES
        .iter()
        .filter(|r| r.group == group && r.version == version)
        .map(|r| {
            json!({
                "name": r.plural, "singularName": r.kind.to_lowercase(), "namespaced": r.namespaced,
                "kind": r.kind, "verbs": r.verbs(), "shortNames": r.short,
                "categories": r.categories(),
            })
        })
        .chain(
            RESOURCES
                .iter()
                .filter(|r| r.group == group && r.version == version)
                .flat_map(|r| {
                    subresources_of(r).map(move |s| {
                        let mut v = json!({"name": format!("{}/{}", s.plural, s.name), "singularName": "",
                                           "namespaced": r.namespaced, "kind": s.kind, "verbs": s.verbs});
                        if s.group != r.group {
                            v["group"] = json!(s.group);
                            v["version"] = json!(s.version);
                        }
                        v
                    })
                }),
        )
        .collect();
    if rs.is_empty() {
        return None;
    }
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Some(
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": rs}),
    )
}

/// A served subresource and the kind its requests and responses carry.
struct Sub {
    plural: &'static str,
    name: &'static str,
    group: &'static str,
    version: &'static str,
    kind: &'static str,
    verbs: &'static [&'static str],
}

const fn sub(
    plural: &'static str,
    name: &'static str,
    (group, version, kind): (&'static str, &'static str, &'static str),
    verbs: &'static [&'static str],
) -> Sub {
    Sub {
        plural,
        name,
        group,
        version,
        kind,
        verbs,
    }
}

const STATUS_VERBS: &[&str] = &["get", "patch", "update"];

const SUBRESOURCES: &[Sub] = &[
    sub(
        "namespaces",
        "status",
        ("", "v1", "Namespace"),
        STATUS_VERBS,
    ),
    sub(
        "namespaces",
        "finalize",
        ("", "v1", "Namespace"),
        &["update"],
    ),
    sub("nodes", "status", ("", "v1", "Node"), STATUS_VERBS),
    sub("pods", "status", ("", "v1", "Pod"), STATUS_VERBS),
    sub("pods", "binding", ("", "v1", "Binding"), &["create"]),
    sub("pods", "log", ("", "v1", "Pod"), &["get"]),
    sub(
        "serviceaccounts",
        "token",
        ("authentication.k8s.io", "v1", "TokenRequest"),
        &["create"],
    ),
    sub(
        "pods",
        "eviction",
        ("policy", "v1", "Eviction"),
        &["create"],
    ),
    sub("services", "status", ("", "v1", "Service"), STATUS_VERBS),
    sub(
        "certificatesigningrequests",
        "status",
        ("certificates.k8s.io", "v1", "CertificateSigningRequest"),
        STATUS_VERBS,
    ),
    sub(
        "certificatesigningrequests",
        "approval",
        ("certificates.k8s.io", "v1", "CertificateSigningRequest"),
        &["get", "patch", "update"],
    ),
    sub(
        "deployments",
        "status",
        ("apps", "v1", "Deployment"),
        STATUS_VERBS,
    ),
    sub(
        "deployments",
        "scale",
        ("autoscaling", "v1", "Scale"),
        STATUS_VERBS,
    ),
    sub(
        "replicasets",
        "status",
        ("apps", "v1", "ReplicaSet"),
        STATUS_VERBS,
    ),
    sub(
        "replicasets",
        "scale",
        ("autoscaling", "v1", "Scale"),
        STATUS_VERBS,
    ),
    sub(
        "daemonsets",
        "status",
        ("apps", "v1", "DaemonSet"),
        STATUS_VERBS,
    ),
    sub(
        "statefulsets",
        "status",
        ("apps", "v1", "StatefulSet"),
        STATUS_VERBS,
    ),
    sub(
        "statefulsets",
        "scale",
        ("autoscaling", "v1", "Scale"),
        STATUS_VERBS,
    ),
    sub(
        "persistentvolumeclaims",
        "status",
        ("", "v1", "PersistentVolumeClaim"),
        STATUS_VERBS,
    ),
    sub(
        "persistentvolumes",
        "status",
        ("", "v1", "PersistentVolume"),
        STATUS_VERBS,
    ),
    sub(
        "poddisruptionbudgets",
        "status",
        ("policy", "v1", "PodDisruptionBudget"),
        STATUS_VERBS,
    ),
    sub(
        "replicationcontrollers",
        "status",
        ("", "v1", "ReplicationController"),
        STATUS_VERBS,
    ),
    sub(
        "replicationcontrollers",
        "scale",
        ("autoscaling", "v1", "Scale"),
        STATUS_VERBS,
    ),
    sub("jobs", "status", ("batch", "v1", "Job"), STATUS_VERBS),
    sub(
        "cronjobs",
        "status",
        ("batch", "v1", "CronJob"),
        STATUS_VERBS,
    ),
];

fn subresources_of(r: &Resource) -> impl Iterator<Item = &'static Sub> {
    let plural = r.plural;
    SUBRESOURCES.iter().filter(move |s| s.plural == plural)
}

/// Whether resource `r` serves subresource `name` (what discovery lists is what is served).
pub fn has_subresource(r: &Resource, name: &str) -> bool {
    subresources_of(r).any(|s| s.name == name)
}

/// The content type of aggregated discovery (kubectl asks for it first).
pub const AGGREGATED: &str = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList";

/// `APIGroupDiscoveryList` (apidiscovery.k8s.io/v2) for `/api` (core) or `/apis` (named groups).
pub fn aggregated(core: bool) -> Value {
    let mut groups: Vec<&str> = RESOURCES
        .iter()
        .map(|r| r.group)
        .filter(|g| g.is_empty() == core)
        .collect();
    groups.dedup();
    let items: Vec<Value> = groups
        .into_iter()
        .map(|g| {
            let resources: Vec<Value> = RESOURCES
                .iter()
                .filter(|r| r.group == g)
                .map(|r| {
                    let subs: Vec<Value> = subresources_of(r)
                        .map(|s| {
                            json!({"subresource": s.name, "responseKind": {"group": s.group, "version": s.version, "kind": s.kind}, "verbs": s.verbs})
                        })
                        .collect();
                    json!({
                        "resource": r.plural,
                        "responseKind": {"group": r.group, "version": r.version, "kind": r.kind},
                        "scope": if r.namespaced { "Namespaced" } else { "Cluster" },
                        "singularResource": r.kind.to_lowercase(),
                        "verbs": r.verbs(),
                        "shortNames": r.short,
                        "categories": r.categories(),
                        "subresources": subs,
                    })
                })
                .collect();
            json!({"metadata": {"name": g, "creationTimestamp": null},
                   "versions": [{"version": "v1", "resources": resources, "freshness": "Current"}]})
        })
        .collect();
    json!({"kind": "APIGroupDiscoveryList", "apiVersion": "apidiscovery.k8s.io/v2", "metadata": {}, "items": items})
}

/// `APIGroupList` of every named group.
pub fn group_list() -> Value {
    let mut groups: Vec<&str> = RESOURCES
        .iter()
        .map(|r| r.group)
        .filter(|g| !g.is_empty())
        .collect();
    groups.dedup();
    let groups: Vec<Value> = groups
        .into_iter()
        .map(|g| {
            let gv = json!({"groupVersion": format!("{g}/v1"), "version": "v1"});
            json!({"name": g, "versions": [gv.clone()], "preferredVersion": gv})
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// The group/versions served, as `api/v1` / `apis/<group>/<version>` paths.
/// Every served group/version, in the table's order.
pub fn group_versions() -> Vec<(&'static str, &'static str)> {
    let mut gvs: Vec<(&str, &str)> = RESOURCES.iter().map(|r| (r.group, r.version)).collect();
    gvs.dedup();
    gvs
}

fn gv_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

/// The OpenAPI v3 index kubectl reads before `apply`/`create` to learn that the server
/// validates fields itself (`fieldValidation`).
pub fn openapi_index() -> Value {
    let paths: serde_json::Map<String, Value> = group_versions()
        .into_iter()
        .map(|(g, v)| {
            let p = gv_path(g, v);
            (p.clone(), json!({"serverRelativeURL": format!("/openapi/v3/{p}?hash=keelson-{}", env!("CARGO_PKG_VERSION"))}))
        })
        .collect();
    json!({"paths": paths})
}

/// A minimal OpenAPI v3 document for one group/version: a `patch` operation per kind with its
/// group-version-kind and the `fieldValidation` parameter. No schemas.
pub fn openapi_doc(path: &str) -> Option<Value> {
    let (g, v) = group_versions()
        .into_iter()
        .find(|(g, v)| gv_path(g, v) == path)?;
    let mut paths = serde_json::Map::new();
    for r in RESOURCES.iter().filter(|r| r.group == g && r.version == v) {
        let base = if r.namespaced {
            format!(
                "/{}/namespaces/{{namespace}}/{}/{{name}}",
                gv_path(g, v),
                r.plural
            )
        } else {
            format!("/{}/{}/{{name}}", gv_path(g, v), r.plural)
        };
        let op = |verb: &str| {
            json!({"operationId": format!("{verb}{}", r.kind),
                   "x-kubernetes-group-version-kind": {"group": g, "version": v, "kind": r.kind},
                   "parameters": [{"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
                                  {"name": "dryRun", "in": "query", "schema": {"type": "string"}},
                                  {"name": "fieldManager", "in": "query", "schema": {"type": "string"}}],
                   "responses": {"200": {"description": "OK"}}})
        };
        paths.insert(base, json!({"patch": op("patch"), "put": op("replace")}));
    }
    Some(
        json!({"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": format!("v1.{}.0", super::KUBE_MINOR)}, "paths": paths}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_keys_follow_etcds_layout() {
        let pods = find("", "v1", "pods").unwrap();
        assert_eq!(
            pods.key(Some("default"), "web"),
            "/registry/pods/default/web"
        );
        let ns = find("", "v1", "namespaces").unwrap();
        assert_eq!(
            ns.key(None, "kube-system"),
            "/registry/namespaces/kube-system"
        );
        let d = find("apps", "v1", "deployments").unwrap();
        assert_eq!(d.key(Some("a"), "b"), "/registry/deployments.apps/a/b");
        assert_eq!(d.api_version(), "apps/v1");
    }

    #[test]
    fn discovery_lists_every_group_and_resource() {
        let core = resource_list("", "v1").unwrap();
        assert!(
            core["resources"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["name"] == "pods" && r["namespaced"] == true)
        );
        let groups = group_list();
        let names: Vec<&str> = groups["groups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "apps",
                "batch",
                "discovery.k8s.io",
                "coordination.k8s.io",
                "certificates.k8s.io",
                "rbac.authorization.k8s.io",
                "storage.k8s.io",
                "policy",
                "scheduling.k8s.io",
                "apiregistration.k8s.io",
                "authorization.k8s.io",
                "authentication.k8s.io"
            ]
        );
        assert!(resource_list("nope", "v1").is_none());
        // Reviews are answered, never stored: create is their only verb.
        let authz = resource_list("authorization.k8s.io", "v1").unwrap();
        for r in authz["resources"].as_array().unwrap() {
            assert_eq!(r["verbs"], json!(["create"]), "{r}");
        }
    }
}
