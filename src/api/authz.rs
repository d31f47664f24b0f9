//! Who a request comes from, and what node identities may write (kube-apiserver's Node
//! authorizer plus the NodeRestriction admission, reduced to what keelson serves).
//!
//! A node authenticates as `system:node:<name>` with a credential derived from the cluster's
//! node token: `keelson-node:<name>:<hex HMAC-SHA256(node token, name)>`. Anyone holding the node
//! token can join a node (as with a k3s join token), but a joined node's credential names the
//! node, and the server then lets it write only its own Node and Lease, the status of pods bound
//! to it, the deletion of those pods, its mirror pods, and events.

use axum::{
    body::Bytes,
    http::{Method, StatusCode},
};
use serde_json::Value;
use sha2::{Digest, Sha256};

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
}

impl Identity {
    pub fn user(&self) -> String {
        match self {
            Identity::Admin => "admin".into(),
            Identity::Node(n) => format!("system:node:{n}"),
            Identity::ServiceAccount(ns, n) => format!("system:serviceaccount:{ns}:{n}"),
        }
    }
}

const PREFIX: &str = "keelson-node:";

pub(crate) fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let pad = |b: u8| k.map(|x| x ^ b);
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(msg)
        .finalize();
    Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize()
        .into()
}

/// The bearer credential of node `name`, derived from the cluster's node token.
pub fn node_credential(node_token: &str, name: &str) -> String {
    format!(
        "{PREFIX}{name}:{}",
        hex::encode(hmac_sha256(node_token.trim().as_bytes(), name.as_bytes()))
    )
}

/// The bearer credential the API server presents to kubelets (derived from the node token, so
/// every joined agent can check it without further setup).
pub fn kubelet_client_credential(node_token: &str) -> String {
    format!(
        "keelson-kubelet:{}",
        hex::encode(hmac_sha256(node_token.trim().as_bytes(), b"kubelet-client"))
    )
}

/// The identity a bearer token proves, if any.
pub fn authenticate(token: &str, admin_token: &str, node_token: &str) -> Option<Identity> {
    if super::constant_time_eq(token.as_bytes(), admin_token.as_bytes()) {
        return Some(Identity::Admin);
    }
    let rest = token.strip_prefix(PREFIX)?;
    let (name, _) = rest.rsplit_once(':')?;
    if name.is_empty() {
        return None;
    }
    let want = node_credential(node_token, name);
    super::constant_time_eq(token.as_bytes(), want.as_bytes())
        .then(|| Identity::Node(name.to_string()))
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
        _ => deny(&format!("node \"{node}\" may not modify {}", r.plural)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc4231_case_2() {
        let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(mac),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn node_credentials_name_their_node() {
        let c = node_credential("secret", "n1");
        assert_eq!(
            authenticate(&c, "admin", "secret"),
            Some(Identity::Node("n1".into()))
        );
        assert_eq!(
            authenticate("admin", "admin", "secret"),
            Some(Identity::Admin)
        );
        // Renaming the node in the credential breaks it; so does another node token.
        let forged = c.replacen("n1", "n2", 1);
        assert_eq!(authenticate(&forged, "admin", "secret"), None);
        assert_eq!(authenticate(&c, "admin", "other"), None);
        assert_eq!(authenticate("secret", "admin", "secret"), None);
        assert_eq!(authenticate("keelson-node::x", "admin", "secret"), None);
    }
}
