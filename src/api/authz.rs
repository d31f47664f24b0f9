//! Who a request comes from, and what node identities may write (kube-apiserver's Node
//! authorizer plus the NodeRestriction admission, reduced to what keelson serves).
//!
//! A node authenticates as `system:node:<name>` with a client certificate the cluster CA
//! signed for it through a CertificateSigningRequest (kubelet's TLS bootstrap, `api::csr`);
//! the cluster's node token only *bootstraps* that: its holder may create such requests and
//! read them back, nothing else. A node's credential names the node: the server then lets it
//! write only its own Node and Lease, the status of pods bound to it, the deletion of those
//! pods, its mirror pods and events (NodeRestriction), and read only what the kubelet and the
//! proxy read: Nodes, Pods, Services, Endpoints(Slices), and the Secrets, ConfigMaps and
//! ServiceAccounts of pods bound to it (kube-apiserver's Node authorizer).

use axum::{
    body::Bytes,
    http::{Method, StatusCode},
};
use serde_json::Value;

use super::{
    ApiState,
    handlers::{ApiError, Target, get_existing},
};

/// The authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    Admin,
    Node(String),
    /// A service account (namespace, name), by a token the server issued; RBAC decides.
    ServiceAccount(String, String),
    /// The holder of the node (join) token: may only ask for a node client certificate.
    Bootstrap,
    /// Any other user, known by name and groups (an administrator impersonating one, as
    /// `kubectl --as=jane --as-group=dev` does); RBAC decides.
    User(UserInfo),
}

/// A user as authenticators report one (authentication.k8s.io's `UserInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UserInfo {
    pub username: String,
    pub groups: Vec<String>,
}

pub const AUTHENTICATED: &str = "system:authenticated";
pub const MASTERS: &str = "system:masters";

impl Identity {
    pub fn user(&self) -> String {
        self.info().username
    }

    /// The user name and groups the API server records for the caller (what its
    /// authenticator would report).
    pub fn info(&self) -> UserInfo {
        let auth = AUTHENTICATED.to_string();
        let (username, groups) = match self {
            Identity::Admin => ("kubernetes-admin".into(), vec![MASTERS.into(), auth]),
            Identity::Bootstrap => (
                "system:bootstrap:keelson".into(),
                vec!["system:bootstrappers".into(), auth],
            ),
            Identity::Node(n) => (
                format!("system:node:{n}"),
                vec!["system:nodes".into(), auth],
            ),
            Identity::ServiceAccount(ns, n) => (
                format!("system:serviceaccount:{ns}:{n}"),
                vec![
                    "system:serviceaccounts".into(),
                    format!("system:serviceaccounts:{ns}"),
                    auth,
                ],
            ),
            Identity::User(u) => return u.clone(),
        };
        UserInfo { username, groups }
    }

    /// The user RBAC decides for, when RBAC decides (service accounts and other users;
    /// administrators, nodes and the bootstrap token have their own authorizers).
    pub fn rbac_subject(&self) -> Option<UserInfo> {
        matches!(self, Identity::ServiceAccount(..) | Identity::User(_)).then(|| self.info())
    }

    /// The identity a user name and groups stand for (impersonation, SubjectAccessReview):
    /// `system:masters` is an administrator, `system:node:NAME` in `system:nodes` that node,
    /// `system:serviceaccount:NS:NAME` that service account, anyone else a plain user.
    pub fn of_user(username: &str, groups: &[String]) -> Identity {
        let has = |g: &str| groups.iter().any(|x| x == g);
        if has(MASTERS) {
            return Identity::Admin;
        }
        if let Some(n) = username.strip_prefix("system:node:")
            && !n.is_empty()
            && has("system:nodes")
        {
            return Identity::Node(n.to_string());
        }
        if let Some((ns, n)) = username
            .strip_prefix("system:serviceaccount:")
            .and_then(|r| r.split_once(':'))
            && !ns.is_empty()
            && !n.is_empty()
        {
            return Identity::ServiceAccount(ns.to_string(), n.to_string());
        }
        let mut groups = groups.to_vec();
        if !groups.iter().any(|g| g == AUTHENTICATED) {
            groups.push(AUTHENTICATED.into());
        }
        Identity::User(UserInfo {
            username: username.to_string(),
            groups,
        })
    }
}

/// The identity a bearer token proves, if any (service account tokens aside).
pub fn authenticate(token: &str, admin_token: &str, node_token: &str) -> Option<Identity> {
    if super::constant_time_eq(token.as_bytes(), admin_token.as_bytes()) {
        return Some(Identity::Admin);
    }
    super::constant_time_eq(token.as_bytes(), node_token.trim().as_bytes())
        .then_some(Identity::Bootstrap)
}

/// The identity a verified client certificate proves: `system:node:NAME` in `system:nodes` is
/// that node; `system:masters` is an administrator.
pub fn from_certificate(c: &crate::tls::ClientCertVerified) -> Option<Identity> {
    if c.organizations.iter().any(|o| o == "system:masters") {
        return Some(Identity::Admin);
    }
    let node = c.common_name.strip_prefix("system:node:")?;
    (!node.is_empty() && c.organizations.iter().any(|o| o == "system:nodes"))
        .then(|| Identity::Node(node.to_string()))
}

/// Authorizes a request of `id` (kube-apiserver's chain): administrators may do anything;
/// a node what the Node authorizer and NodeRestriction allow, the bootstrap token its
/// certificate requests, each else what RBAC grants its user; service accounts and other
/// users what RBAC grants.
pub async fn authorize(
    st: &ApiState,
    id: &Identity,
    method: &Method,
    t: &Target,
    body: &Bytes,
    watch: bool,
) -> Result<(), ApiError> {
    let first = match id {
        Identity::Admin => return Ok(()),
        Identity::Node(node) => match node_may_read(st, node, method, t).await {
            Ok(()) => node_may_write(st, node, method, t, body).await,
            Err(e) => Err(e),
        },
        Identity::Bootstrap => bootstrap_may(method, t),
        Identity::ServiceAccount(..) | Identity::User(_) => {
            let a = super::rbac::Attributes::of(method, t, watch);
            return super::rbac::authorize(st, &id.info(), &a).await;
        }
    };
    let Err(denied) = first else { return Ok(()) };
    let a = super::rbac::Attributes::of(method, t, watch);
    if super::rbac::allows(st, &id.info(), &a).await? {
        return Ok(());
    }
    Err(denied)
}

/// The identity a request acts as: the caller's own, or the one its `Impersonate-User` and
/// `Impersonate-Group` headers name when the caller may impersonate them (administrators;
/// RBAC's `impersonate` verb on `users`, `groups` and `serviceaccounts` for others).
pub async fn impersonate(
    st: &ApiState,
    id: Identity,
    headers: &axum::http::HeaderMap,
) -> Result<Identity, ApiError> {
    let header = |name: &str| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let user = header("impersonate-user").into_iter().next();
    let groups = header("impersonate-group");
    let Some(user) = user else {
        if groups.is_empty() {
            return Ok(id);
        }
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "Forbidden",
            format!("requested {groups:?} without impersonating a user"),
        ));
    };
    let target = Identity::of_user(&user, &groups);
    if id != Identity::Admin {
        let mut asked = vec![];
        match &target {
            Identity::ServiceAccount(ns, n) => {
                asked.push(("serviceaccounts", Some(ns.clone()), n.clone()))
            }
            _ => asked.push(("users", None, user.clone())),
        }
        asked.extend(groups.iter().map(|g| ("groups", None, g.clone())));
        let who = id.info();
        for (resource, namespace, name) in asked {
            let a = super::rbac::Attributes {
                verb: "impersonate".into(),
                group: String::new(),
                resource: resource.into(),
                namespace,
                name: Some(name),
            };
            if !super::rbac::allows(st, &who, &a).await? {
                return Err(super::rbac::forbidden(&who.username, &a));
            }
        }
    }
    tracing::debug!(user = %id.user(), as_user = %target.user(), "impersonating");
    Ok(target)
}

/// What the bootstrap token may do: create CertificateSigningRequests and read them
/// (kube's `system:node-bootstrapper` role).
pub fn bootstrap_may(method: &Method, t: &Target) -> Result<(), ApiError> {
    let csr = t.resource.group == "certificates.k8s.io"
        && t.resource.plural == "certificatesigningrequests"
        && t.subresource.is_none();
    let ok = csr
        && match *method {
            Method::GET | Method::HEAD => true,
            Method::POST => t.name.is_none(),
            _ => false,
        };
    if ok {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        "Forbidden",
        format!(
            "{} is forbidden: User \"system:bootstrap:keelson\" cannot {} resource \"{}\" in API group \"{}\": the node token only bootstraps a node's certificate",
            t.resource.plural,
            verb(method, t),
            t.resource.plural,
            t.resource.group
        ),
    ))
}

/// The names of the Secrets and ConfigMaps a pod (JSON) references: volumes, projected
/// sources, env and envFrom of every container, image pull secrets.
fn pod_references(pod: &Value) -> (Vec<String>, Vec<String>) {
    let mut secrets = vec![];
    let mut cms = vec![];
    let spec = &pod["spec"];
    let name = |v: &Value, k: &str| v[k].as_str().map(str::to_string);
    for v in spec["volumes"].as_array().into_iter().flatten() {
        secrets.extend(name(&v["secret"], "secretName"));
        cms.extend(name(&v["configMap"], "name"));
        for s in v["projected"]["sources"].as_array().into_iter().flatten() {
            secrets.extend(name(&s["secret"], "name"));
            cms.extend(name(&s["configMap"], "name"));
        }
    }
    for s in spec["imagePullSecrets"].as_array().into_iter().flatten() {
        secrets.extend(name(s, "name"));
    }
    for list in ["containers", "initContainers", "ephemeralContainers"] {
        for c in spec[list].as_array().into_iter().flatten() {
            for e in c["envFrom"].as_array().into_iter().flatten() {
                secrets.extend(name(&e["secretRef"], "name"));
                cms.extend(name(&e["configMapRef"], "name"));
            }
            for e in c["env"].as_array().into_iter().flatten() {
                secrets.extend(name(&e["valueFrom"]["secretKeyRef"], "name"));
                cms.extend(name(&e["valueFrom"]["configMapKeyRef"], "name"));
            }
        }
    }
    (secrets, cms)
}

/// Checks a read by node `node` (kube-apiserver's Node authorizer): what the kubelet and the
/// proxy read, and a Secret, ConfigMap or ServiceAccount only by name and only while a pod
/// bound to the node references it. Pod logs, exec, attach and port-forward are refused.
pub async fn node_may_read(
    st: &ApiState,
    node: &str,
    method: &Method,
    t: &Target,
) -> Result<(), ApiError> {
    if !matches!(*method, Method::GET | Method::HEAD) {
        return Ok(());
    }
    let r = t.resource;
    let deny = |why: &str| Err(forbidden(node, method, t, why));
    match (r.group, r.plural, t.subresource.as_deref()) {
        ("", "nodes" | "services" | "endpoints" | "events", None | Some("status"))
        | ("", "pods", None | Some("status"))
        | ("discovery.k8s.io", "endpointslices", None)
        | ("coordination.k8s.io", "leases", None)
        | ("certificates.k8s.io", "certificatesigningrequests", None) => Ok(()),
        ("", "secrets" | "configmaps" | "serviceaccounts", None) => {
            let (Some(ns), Some(name)) = (t.namespace.as_deref(), t.name.as_deref()) else {
                return deny(&format!(
                    "node \"{node}\" may only get individual {} referenced by pods bound to it",
                    r.plural
                ));
            };
            let referenced = pods_on(st, ns, node).await?.iter().any(|pod| {
                let (secrets, cms) = pod_references(pod);
                match r.plural {
                    "secrets" => secrets.iter().any(|s| s == name),
                    "configmaps" => cms.iter().any(|s| s == name),
                    _ => {
                        pod["spec"]["serviceAccountName"]
                            .as_str()
                            .unwrap_or("default")
                            == name
                    }
                }
            });
            if referenced {
                Ok(())
            } else {
                deny(&format!(
                    "no relationship found between node '{node}' and this object"
                ))
            }
        }
        ("", "persistentvolumeclaims" | "persistentvolumes", None) => {
            let Some(name) = t.name.as_deref() else {
                return deny(&format!(
                    "node \"{node}\" may only get individual {} referenced by pods bound to it",
                    r.plural
                ));
            };
            let (ns, claim) = if r.plural == "persistentvolumes" {
                let pv = stored(st, r, None, name).await?;
                if volume_pinned_to(&pv, node) {
                    return Ok(());
                }
                let cr = &pv["spec"]["claimRef"];
                (
                    cr["namespace"].as_str().unwrap_or("").to_string(),
                    cr["name"].as_str().unwrap_or("").to_string(),
                )
            } else {
                (t.namespace.clone().unwrap_or_default(), name.to_string())
            };
            if claim_used_on(st, &ns, &claim, node).await? {
                Ok(())
            } else {
                deny(&format!(
                    "no relationship found between node '{node}' and this object"
                ))
            }
        }
        _ => deny(&format!("node \"{node}\" may not read {}", r.plural)),
    }
}

/// The stored object `name` of `r` (Null when absent).
async fn stored(
    st: &ApiState,
    r: &super::registry::Resource,
    ns: Option<&str>,
    name: &str,
) -> Result<Value, ApiError> {
    let kv = st
        .store
        .get(&r.key(ns, name))
        .await
        .map_err(ApiError::internal)?;
    Ok(kv
        .and_then(|kv| serde_json::from_slice(&kv.value).ok())
        .unwrap_or(Value::Null))
}

/// Whether a volume was provisioned on `node` (keelson's local-path volumes name it).
fn volume_pinned_to(pv: &Value, node: &str) -> bool {
    serde_json::from_value::<k8s_openapi::api::core::v1::PersistentVolume>(pv.clone())
        .is_ok_and(|pv| crate::kinds::storage::volume_node(&pv) == Some(node))
}

/// Whether `body` (a merge patch of volume `pv`) only removes keelson's cleanup finalizer,
/// on a volume provisioned on `node`.
fn lifts_own_finalizer(pv: &Value, node: &str, body: &Bytes) -> bool {
    let patch: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let only_finalizers = patch.as_object().is_some_and(|o| o.len() == 1)
        && patch["metadata"]
            .as_object()
            .is_some_and(|m| m.len() == 1 && m.contains_key("finalizers"));
    let kept: Vec<&Value> = patch["metadata"]["finalizers"]
        .as_array()
        .map(|a| a.iter().collect())
        .unwrap_or_default();
    let had = pv["metadata"]["finalizers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let removes_own_only = had
        .iter()
        .filter(|f| !kept.contains(f))
        .all(|f| f == crate::kinds::storage::CLEANUP_FINALIZER)
        && kept.iter().all(|f| had.contains(f));
    volume_pinned_to(pv, node) && only_finalizers && removes_own_only
}

/// The pods of namespace `ns` bound to `node`, from the watch cache.
async fn pods_on(st: &ApiState, ns: &str, node: &str) -> Result<Vec<Value>, ApiError> {
    let pods = super::registry::find("", "v1", "pods")
        .ok_or_else(|| ApiError::internal("no pods resource"))?;
    let page = st
        .cache
        .list(&pods.prefix(), &format!("{}{ns}/", pods.prefix()), None, 0)
        .await
        .map_err(ApiError::internal)?;
    Ok(page
        .items
        .iter()
        .filter_map(|kv| serde_json::from_slice::<Value>(&kv.value).ok())
        .filter(|pod| pod["spec"]["nodeName"].as_str() == Some(node))
        .collect())
}

/// Whether a pod bound to `node` uses claim `ns/claim`.
async fn claim_used_on(st: &ApiState, ns: &str, claim: &str, node: &str) -> Result<bool, ApiError> {
    Ok(pods_on(st, ns, node).await?.iter().any(|pod| {
        pod["spec"]["volumes"].as_array().is_some_and(|vs| {
            vs.iter()
                .any(|v| v["persistentVolumeClaim"]["claimName"].as_str() == Some(claim))
        })
    }))
}

fn verb(method: &Method, t: &Target) -> &'static str {
    match *method {
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE if t.name.is_none() => "deletecollection",
        Method::DELETE => "delete",
        _ => "get",
    }
}

fn forbidden(node: &str, method: &Method, t: &Target, why: &str) -> ApiError {
    let r = t.resource;
    let resource = match &t.subresource {
        Some(s) => format!("{}/{s}", r.plural),
        None => r.plural.to_string(),
    };
    let scope = match &t.namespace {
        Some(ns) => format!("in the namespace \"{ns}\""),
        None => "at the cluster scope".into(),
    };
    let name = t.name.as_deref().unwrap_or("");
    ApiError::new(
        StatusCode::FORBIDDEN,
        "Forbidden",
        format!(
            "{} \"{name}\" is forbidden: User \"system:node:{node}\" cannot {} resource \"{resource}\" in API group \"{}\" {scope}: {why}",
            r.plural,
            verb(method, t),
            r.group
        ),
    )
}

/// The name a write targets: the path's, or the body's for a create.
fn target_name(t: &Target, body: &Bytes) -> String {
    if let Some(n) = &t.name {
        return n.clone();
    }
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v["metadata"]["name"].as_str().map(str::to_string))
        .unwrap_or_default()
}

/// Checks a write by node `node`; reads are not restricted.
pub async fn node_may_write(
    st: &ApiState,
    node: &str,
    method: &Method,
    t: &Target,
    body: &Bytes,
) -> Result<(), ApiError> {
    if matches!(*method, Method::GET | Method::HEAD) {
        return Ok(());
    }
    let r = t.resource;
    let deny = |why: &str| Err(forbidden(node, method, t, why));
    match (r.group, r.kind) {
        ("", "Event") | ("events.k8s.io", "Event") => Ok(()),
        // Its own certificates (renewals, serving); what gets approved is csr's to decide.
        ("certificates.k8s.io", "CertificateSigningRequest")
            if *method == Method::POST && t.name.is_none() =>
        {
            Ok(())
        }
        // A token for the service account of a pod bound to this node (kubelet's TokenRequest
        // for the pod's projected volume).
        ("", "ServiceAccount")
            if *method == Method::POST && t.subresource.as_deref() == Some("token") =>
        {
            let sa = t.name.as_deref().unwrap_or("");
            let req: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
            let pod_name = req
                .pointer("/spec/boundObjectRef/name")
                .and_then(Value::as_str)
                .unwrap_or("");
            let pods = super::registry::find("", "v1", "pods")
                .ok_or_else(|| ApiError::internal("no pods resource"))?;
            let kv = st
                .store
                .get(&pods.key(t.namespace.as_deref(), pod_name))
                .await
                .map_err(ApiError::internal)?;
            let pod: Value = kv
                .and_then(|kv| serde_json::from_slice(&kv.value).ok())
                .unwrap_or(Value::Null);
            let uses = pod["spec"]["serviceAccountName"]
                .as_str()
                .unwrap_or("default")
                == sa;
            if pod["spec"]["nodeName"].as_str() != Some(node) || !uses {
                return deny(&format!(
                    "node \"{node}\" may only request tokens for service accounts of pods bound to it"
                ));
            }
            Ok(())
        }
        ("", "Node") => {
            let name = target_name(t, body);
            if name != node {
                return deny(&format!(
                    "node \"{node}\" is not allowed to modify node \"{name}\""
                ));
            }
            Ok(())
        }
        ("coordination.k8s.io", "Lease") => {
            let name = target_name(t, body);
            if t.namespace.as_deref() != Some("kube-node-lease") || name != node {
                return deny(
                    "can only access node lease with the same name as the requesting node",
                );
            }
            Ok(())
        }
        ("", "Pod") => {
            if *method == Method::POST && t.name.is_none() {
                let pod: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
                let bound = pod["spec"]["nodeName"].as_str() == Some(node);
                let mirror = pod["metadata"]["annotations"]
                    .get("kubernetes.io/config.mirror")
                    .is_some();
                if !(bound && mirror) {
                    return deny(&format!(
                        "node \"{node}\" can only create mirror pods bound to itself"
                    ));
                }
                return Ok(());
            }
            let writable = matches!(
                (method, t.subresource.as_deref()),
                (&Method::PUT | &Method::PATCH, Some("status")) | (&Method::DELETE, None)
            );
            let Some(name) = t.name.as_deref().filter(|_| writable) else {
                return deny(&format!(
                    "node \"{node}\" may only update the status of its pods and delete them"
                ));
            };
            let key = r.key(t.namespace.as_deref(), name);
            let kv = get_existing(st, r, &key, name).await?;
            let pod: Value = serde_json::from_slice(&kv.value).map_err(ApiError::internal)?;
            if pod["spec"]["nodeName"].as_str() != Some(node) {
                return deny(&format!(
                    "node \"{node}\" can only modify pods bound to itself"
                ));
            }
            Ok(())
        }
        // The cleanup of a volume provisioned on this node: only its own finalizer removed.
        ("", "PersistentVolume") if *method == Method::PATCH && t.subresource.is_none() => {
            let pv = stored(st, r, None, t.name.as_deref().unwrap_or("")).await?;
            if lifts_own_finalizer(&pv, node, body) {
                return Ok(());
            }
            deny(&format!(
                "node \"{node}\" may only remove its cleanup finalizer from volumes provisioned on it"
            ))
        }
        _ => deny(&format!("node \"{node}\" may not modify {}", r.plural)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_node_token_only_bootstraps() {
        assert_eq!(
            authenticate("admin", "admin", "secret"),
            Some(Identity::Admin)
        );
        assert_eq!(
            authenticate("secret", "admin", "secret\n"),
            Some(Identity::Bootstrap)
        );
        // The old derived node credentials are nothing now.
        assert_eq!(authenticate("keelson-node:n1:00", "admin", "secret"), None);
        assert_eq!(authenticate("secre", "admin", "secret"), None);
    }

    #[test]
    fn certificates_name_nodes_only_in_the_nodes_group() {
        let c = |cn: &str, o: &[&str]| crate::tls::ClientCertVerified {
            common_name: cn.into(),
            organizations: o.iter().map(|s| s.to_string()).collect(),
        };
        assert_eq!(
            from_certificate(&c("system:node:n1", &["system:nodes"])),
            Some(Identity::Node("n1".into()))
        );
        assert_eq!(from_certificate(&c("system:node:n1", &[])), None);
        assert_eq!(
            from_certificate(&c("kube-apiserver-kubelet-client", &[])),
            None
        );
        assert_eq!(
            from_certificate(&c("x", &["system:masters"])),
            Some(Identity::Admin)
        );
    }

    #[test]
    fn pod_references_cover_volumes_projections_env_and_pull_secrets() {
        let pod = serde_json::json!({"spec": {
            "volumes": [{"name": "a", "secret": {"secretName": "s1"}}, {"name": "b", "configMap": {"name": "c1"}},
                        {"name": "p", "projected": {"sources": [{"secret": {"name": "s2"}}, {"configMap": {"name": "c2"}}]}}],
            "imagePullSecrets": [{"name": "s3"}],
            "containers": [{"name": "x", "envFrom": [{"secretRef": {"name": "s4"}}],
                            "env": [{"name": "E", "valueFrom": {"configMapKeyRef": {"name": "c3", "key": "k"}}}]}]}});
        let (mut s, mut c) = pod_references(&pod);
        s.sort();
        c.sort();
        assert_eq!(s, ["s1", "s2", "s3", "s4"]);
        assert_eq!(c, ["c1", "c2", "c3"]);
    }
}
