//! Service accounts: the tokens the API server issues for them (`serviceaccounts/token`, the
//! TokenRequest the kubelet makes for a pod's projected token) and RBAC, which decides what a
//! service account may do from the ClusterRoles, Roles and their bindings in the store.
//!
//! A token is `keelson-sa.<base64url JSON claims>.<hex HMAC-SHA256>`, signed with the server's own
//! random key (`pki/sa.key`); it names the namespace, the service account and its UID, so
//! it stops working when the account is deleted (or recreated), its audiences (the API server
//! accepts only tokens for its own audience), the pod it is bound to (refused once that pod is
//! gone), and its expiry. As kube-apiserver does for the kubelet's projected tokens (pod-bound,
//! for the API's audience, 3607 seconds asked), those stay valid for a year with a warn-after
//! time at the requested expiry (the reported expiry is the requested one; the kubelet
//! refreshes before it). Lifetimes run from 10 minutes to 2^32 seconds, as kube-apiserver's
//! validation allows.

use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{
    ApiState,
    authz::UserInfo,
    handlers::{ApiError, Target},
    registry,
};

pub const PREFIX: &str = "keelson-sa.";
/// kube-apiserver's magic expiry of kubelet-requested tokens that get extended.
pub const KUBELET_EXPIRY: i64 = 3607;
const EXTENDED: i64 = 365 * 24 * 3600;
/// The API server's own audience (kube-apiserver's default `--api-audiences`).
pub const API_AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";
/// kube-apiserver's upper bound on `expirationSeconds`.
const MAX_EXPIRATION: i64 = 1 << 32;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Claims {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// Unix seconds after which the token is refused.
    pub exp: i64,
    /// The pod the token is bound to, if any (name, uid).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<(String, String)>,
    /// Who the token is for; the API server accepts only tokens naming `API_AUDIENCE`.
    #[serde(default)]
    pub aud: Vec<String>,
    /// For an extended token: when its requested lifetime ended (kube's
    /// `kubernetes.io/warnafter`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warnafter: Option<i64>,
}

pub(crate) fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
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

pub fn issue(key: &[u8], c: &Claims) -> String {
    let body = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(serde_json::to_vec(c).unwrap_or_default());
    let mac = hex::encode(hmac_sha256(key, body.as_bytes()));
    format!("{PREFIX}{body}.{mac}")
}

/// The claims of a well-signed, unexpired token.
pub fn verify(key: &[u8], token: &str, now: i64) -> Option<Claims> {
    let rest = token.strip_prefix(PREFIX)?;
    let (body, mac) = rest.rsplit_once('.')?;
    let want = hex::encode(hmac_sha256(key, body.as_bytes()));
    if !super::constant_time_eq(mac.as_bytes(), want.as_bytes()) {
        return None;
    }
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(body)
        .ok()?;
    let c: Claims = serde_json::from_slice(&raw).ok()?;
    (c.exp > now).then_some(c)
}

/// `POST .../serviceaccounts/NAME/token`: a TokenRequest answered with a token for `sa`.
/// `pod` is the bound pod as stored (looked up by the caller), if the request names one.
pub fn token_request(
    key: &[u8],
    sa: &Value,
    body: &[u8],
    pod: Option<&Value>,
) -> Result<Value, ApiError> {
    let req: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid TokenRequest: {e}")))?;
    if req.get("kind").and_then(Value::as_str) != Some("TokenRequest") {
        return Err(ApiError::bad_request(
            "the body of the request must be a TokenRequest (authentication.k8s.io/v1)",
        ));
    }
    let asked = asked_expiration(&req)?;
    let mut aud: Vec<String> = req
        .pointer("/spec/audiences")
        .and_then(Value::as_array)
        .map(|l| {
            l.iter()
                .filter_map(|a| a.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    if aud.is_empty() {
        aud.push(API_AUDIENCE.to_string());
    }
    let sa_ns = sa
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or("");
    let sa_name = sa
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("");
    let pod_claim = bound_pod(&req, pod, sa_name)?;
    // kube-apiserver's extension: pod-bound, for the API itself, the kubelet's 3607 seconds.
    let extend =
        pod_claim.is_some() && asked == KUBELET_EXPIRY && aud.iter().any(|a| a == API_AUDIENCE);
    let now = jiff::Timestamp::now().as_second();
    let claims = Claims {
        namespace: sa_ns.into(),
        name: sa_name.into(),
        uid: sa
            .pointer("/metadata/uid")
            .and_then(Value::as_str)
            .unwrap_or("")
            .into(),
        exp: now + if extend { EXTENDED } else { asked },
        pod: pod_claim,
        aud: aud.clone(),
        warnafter: extend.then_some(now + asked),
    };
    let expires = jiff::Timestamp::from_second(now + asked)
        .unwrap_or(jiff::Timestamp::now())
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    let mut out = req.clone();
    out["spec"]["audiences"] = serde_json::json!(aud);
    out["spec"]["expirationSeconds"] = serde_json::json!(asked);
    out["status"] =
        serde_json::json!({"token": issue(key, &claims), "expirationTimestamp": expires});
    if out.get("metadata").is_none() {
        out["metadata"] = serde_json::json!({});
    }
    out["metadata"]["name"] = Value::String(claims.name.clone());
    out["metadata"]["namespace"] = Value::String(claims.namespace.clone());
    Ok(out)
}

/// `spec.expirationSeconds` (default an hour), within kube-apiserver's bounds.
fn asked_expiration(req: &Value) -> Result<i64, ApiError> {
    let invalid = |msg: &str| {
        ApiError::new(
            axum::http::StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            format!("TokenRequest.authentication.k8s.io is invalid: {msg}"),
        )
    };
    let asked = match req.pointer("/spec/expirationSeconds") {
        None | Some(Value::Null) => 3600,
        Some(v) => v
            .as_i64()
            .ok_or_else(|| invalid("spec.expirationSeconds: Invalid value: must be an integer"))?,
    };
    if asked < 600 {
        return Err(invalid(
            "spec.expirationSeconds: Invalid value: may not specify a duration less than 10 minutes",
        ));
    }
    if asked > MAX_EXPIRATION {
        return Err(invalid(
            "spec.expirationSeconds: Invalid value: may not specify a duration larger than 2^32 seconds",
        ));
    }
    Ok(asked)
}

/// The pod a token is bound to, (name, uid), checked against the stored pod: only pods,
/// the same UID if the request gives one, and running as the token's service account.
fn bound_pod(
    req: &Value,
    pod: Option<&Value>,
    sa_name: &str,
) -> Result<Option<(String, String)>, ApiError> {
    let Some(b) = req.pointer("/spec/boundObjectRef").filter(|b| !b.is_null()) else {
        return Ok(None);
    };
    if b["kind"] != "Pod" {
        return Err(ApiError::bad_request(format!(
            "cannot bind token to object of kind {:?}: only pods are supported",
            b["kind"].as_str().unwrap_or("")
        )));
    }
    let name = b["name"].as_str().unwrap_or("");
    let p = pod.ok_or_else(|| {
        ApiError::new(
            axum::http::StatusCode::NOT_FOUND,
            "NotFound",
            format!("pods \"{name}\" not found"),
        )
    })?;
    let uid = p
        .pointer("/metadata/uid")
        .and_then(Value::as_str)
        .unwrap_or("");
    if let Some(want) = b["uid"].as_str().filter(|u| !u.is_empty())
        && want != uid
    {
        return Err(ApiError::new(
            axum::http::StatusCode::CONFLICT,
            "Conflict",
            format!(
                "the UID in the bound object reference ({want}) does not match the UID in record. The object might have been deleted and then recreated"
            ),
        ));
    }
    let uses = p
        .pointer("/spec/serviceAccountName")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .unwrap_or("default");
    if uses != sa_name {
        return Err(ApiError::bad_request(format!(
            "cannot bind token for serviceaccount \"{sa_name}\" to pod running with different serviceaccount name."
        )));
    }
    Ok(Some((name.to_string(), uid.to_string())))
}

/// What a request asks to do, in RBAC's terms.
#[derive(Debug, Clone, PartialEq)]
pub struct Attributes {
    pub verb: String,
    pub group: String,
    /// The plural, with `/subresource` when there is one.
    pub resource: String,
    pub namespace: Option<String>,
    pub name: Option<String>,
}

impl Attributes {
    pub fn of(method: &axum::http::Method, t: &Target, watch: bool) -> Self {
        use axum::http::Method;
        let verb = match *method {
            Method::GET | Method::HEAD if t.name.is_some() => "get",
            Method::GET | Method::HEAD if watch => "watch",
            Method::GET | Method::HEAD => "list",
            Method::POST => "create",
            Method::PUT => "update",
            Method::PATCH => "patch",
            Method::DELETE if t.name.is_none() => "deletecollection",
            Method::DELETE => "delete",
            _ => "get",
        };
        let mut resource = t.resource.plural.to_string();
        if let Some(s) = &t.subresource {
            resource = format!("{resource}/{s}");
        }
        Attributes {
            verb: verb.into(),
            group: t.resource.group.into(),
            resource,
            namespace: t.namespace.clone(),
            name: t.name.clone(),
        }
    }
}

fn has(list: &Value, want: &str) -> bool {
    list.as_array()
        .is_some_and(|l| l.iter().any(|x| x == "*" || x == want))
}

/// Whether one PolicyRule allows `a`.
pub fn rule_allows(rule: &Value, a: &Attributes) -> bool {
    let names_ok = match rule.get("resourceNames").and_then(Value::as_array) {
        Some(n) if !n.is_empty() => a.name.as_deref().is_some_and(|x| n.iter().any(|v| v == x)),
        _ => true,
    };
    let resource_ok = has(&rule["resources"], &a.resource)
        || rule["resources"].as_array().is_some_and(|l| {
            // "pods/*" covers every subresource of pods.
            l.iter().any(|r| {
                r.as_str().is_some_and(|r| {
                    r.strip_suffix("/*")
                        .is_some_and(|base| a.resource.starts_with(&format!("{base}/")))
                })
            })
        });
    has(&rule["verbs"], &a.verb) && has(&rule["apiGroups"], &a.group) && resource_ok && names_ok
}

/// Whether a binding's subjects include service account `ns/name`.
/// Whether one PolicyRule allows `verb` on the non-resource URL `path`: an exact URL, or a
/// prefix ending in `*`.
pub fn url_allows(rule: &Value, path: &str, verb: &str) -> bool {
    has(&rule["verbs"], verb)
        && rule["nonResourceURLs"].as_array().is_some_and(|urls| {
            urls.iter()
                .filter_map(Value::as_str)
                .any(|u| match u.strip_suffix('*') {
                    Some(prefix) => path.starts_with(prefix),
                    None => u == path,
                })
        })
}

/// Whether a (Cluster)RoleBinding names `who`: as that service account, that user, or one
/// of their groups.
fn binds(binding: &Value, who: &UserInfo) -> bool {
    binding["subjects"].as_array().is_some_and(|subs| {
        subs.iter().any(|s| {
            let name = s["name"].as_str().unwrap_or("");
            match s["kind"].as_str() {
                Some("ServiceAccount") => {
                    let ns = s["namespace"].as_str().unwrap_or("");
                    who.username == format!("system:serviceaccount:{ns}:{name}")
                }
                Some("User") => who.username == name,
                Some("Group") => who.groups.iter().any(|g| g == name),
                _ => false,
            }
        })
    })
}

async fn list_all(st: &ApiState, plural: &str, ns: Option<&str>) -> Result<Vec<Value>, ApiError> {
    let r = registry::find("rbac.authorization.k8s.io", "v1", plural)
        .ok_or_else(|| ApiError::internal(format!("no {plural} resource")))?;
    let prefix = match ns {
        Some(ns) => format!("{}{ns}/", r.prefix()),
        None => r.prefix(),
    };
    let mut out = vec![];
    let mut after: Option<String> = None;
    loop {
        let page = st
            .store
            .list(&prefix, after.as_deref(), 500)
            .await
            .map_err(ApiError::internal)?;
        for kv in &page.items {
            if let Ok(v) = serde_json::from_slice::<Value>(&kv.value) {
                out.push(v);
            }
        }
        if !page.more {
            break;
        }
        after = page.items.last().map(|kv| kv.key.clone());
    }
    Ok(out)
}

async fn role_rules(
    st: &ApiState,
    role_ref: &Value,
    binding_ns: Option<&str>,
) -> Result<Vec<Value>, ApiError> {
    let name = role_ref["name"].as_str().unwrap_or("");
    let (plural, ns) = match role_ref["kind"].as_str() {
        Some("ClusterRole") => ("clusterroles", None),
        Some("Role") => ("roles", binding_ns),
        _ => return Ok(vec![]),
    };
    let Some(r) = registry::find("rbac.authorization.k8s.io", "v1", plural) else {
        return Ok(vec![]);
    };
    let kv = st
        .store
        .get(&r.key(ns, name))
        .await
        .map_err(ApiError::internal)?;
    Ok(kv
        .and_then(|kv| serde_json::from_slice::<Value>(&kv.value).ok())
        .and_then(|v| v["rules"].as_array().cloned())
        .unwrap_or_default())
}

/// Whether `who` may do `a`, by the bindings in the store.
pub async fn allows(st: &ApiState, who: &UserInfo, a: &Attributes) -> Result<bool, ApiError> {
    for b in list_all(st, "clusterrolebindings", None).await? {
        if binds(&b, who)
            && role_rules(st, &b["roleRef"], None)
                .await?
                .iter()
                .any(|r| rule_allows(r, a))
        {
            return Ok(true);
        }
    }
    if let Some(target_ns) = a.namespace.as_deref() {
        for b in list_all(st, "rolebindings", Some(target_ns)).await? {
            if binds(&b, who)
                && role_rules(st, &b["roleRef"], Some(target_ns))
                    .await?
                    .iter()
                    .any(|r| rule_allows(r, a))
            {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// Every rule the bindings in the store give `who`: cluster-wide ones, plus those of
/// RoleBindings in `scope` (a namespace), as kube-apiserver's rule resolver.
pub async fn rules_of(
    st: &ApiState,
    who: &UserInfo,
    scope: Option<&str>,
) -> Result<Vec<Value>, ApiError> {
    let mut out = vec![];
    for b in list_all(st, "clusterrolebindings", None).await? {
        if binds(&b, who) {
            out.extend(role_rules(st, &b["roleRef"], None).await?);
        }
    }
    if let Some(scope) = scope {
        for b in list_all(st, "rolebindings", Some(scope)).await? {
            if binds(&b, who) {
                out.extend(role_rules(st, &b["roleRef"], Some(scope)).await?);
            }
        }
    }
    Ok(out)
}

/// The strings of a JSON list (others left out; not a list: none).
pub(super) fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|l| {
            l.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The parts of `wanted` that no rule of `owned` covers, one rule per uncovered atom
/// (group × resource × verb × name, or non-resource URL × verb), as Kubernetes' `Covers`.
/// A wildcard asked for is covered only by the same wildcard held.
pub fn uncovered(owned: &[Value], wanted: &[Value]) -> Vec<Value> {
    let mut missing = vec![];
    for w in wanted {
        let verbs = strings(&w["verbs"]);
        for url in strings(&w["nonResourceURLs"]) {
            for v in &verbs {
                let ok = owned.iter().any(|o| {
                    has(&o["verbs"], v)
                        && strings(&o["nonResourceURLs"]).iter().any(|u| {
                            u == "*"
                                || *u == url
                                || u.strip_suffix('*').is_some_and(|p| url.starts_with(p))
                        })
                });
                if !ok {
                    missing.push(serde_json::json!({"nonResourceURLs": [url], "verbs": [v]}));
                }
            }
        }
        let names = strings(&w["resourceNames"]);
        let names: Vec<Option<String>> = if names.is_empty() {
            vec![None]
        } else {
            names.into_iter().map(Some).collect()
        };
        for g in strings(&w["apiGroups"]) {
            for r in strings(&w["resources"]) {
                for v in &verbs {
                    for n in &names {
                        let a = Attributes {
                            verb: v.clone(),
                            group: g.clone(),
                            resource: r.clone(),
                            namespace: None,
                            name: n.clone(),
                        };
                        if !owned.iter().any(|o| rule_allows(o, &a)) {
                            let mut rule = serde_json::json!({"apiGroups": [g], "resources": [r], "verbs": [v]});
                            if let Some(n) = n {
                                rule["resourceNames"] = serde_json::json!([n]);
                            }
                            missing.push(rule);
                        }
                    }
                }
            }
        }
    }
    missing
}

/// Kubernetes' RBAC escalation prevention for a caller RBAC decides for writing RBAC objects: a Role
/// or ClusterRole only with rules the caller already holds (or the `escalate` verb on it), a
/// binding only to a role whose rules the caller holds (or the `bind` verb on that role).
/// Other kinds and other callers pass.
pub async fn check_escalation(
    st: &ApiState,
    caller: Option<&UserInfo>,
    kind: &str,
    ns: Option<&str>,
    obj: &Value,
) -> Result<(), ApiError> {
    let Some(who) = caller else {
        return Ok(());
    };
    const GROUP: &str = "rbac.authorization.k8s.io";
    let name = obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("");
    let (plural, wanted, verb, checked_role) = match kind {
        "Role" | "ClusterRole" => {
            let plural = if kind == "Role" {
                "roles"
            } else {
                "clusterroles"
            };
            let rules = obj["rules"].as_array().cloned().unwrap_or_default();
            (plural, rules, "escalate", (plural, name.to_string()))
        }
        "RoleBinding" | "ClusterRoleBinding" => {
            let plural = if kind == "RoleBinding" {
                "rolebindings"
            } else {
                "clusterrolebindings"
            };
            let role_ref = &obj["roleRef"];
            let ref_plural = match role_ref["kind"].as_str() {
                Some("Role") => "roles",
                _ => "clusterroles",
            };
            let ref_name = role_ref["name"].as_str().unwrap_or("").to_string();
            let exists = {
                let r = registry::find(GROUP, "v1", ref_plural)
                    .ok_or_else(|| ApiError::internal(format!("no {ref_plural} resource")))?;
                let key_ns = if ref_plural == "roles" { ns } else { None };
                st.store
                    .get(&r.key(key_ns, &ref_name))
                    .await
                    .map_err(ApiError::internal)?
                    .is_some()
            };
            let rules = role_rules(st, role_ref, ns).await?;
            if !exists {
                // kube-apiserver resolves the reference first: a binding to a missing role
                // cannot be checked, so it is refused (unless the caller may `bind` it).
                let a = Attributes {
                    verb: "bind".into(),
                    group: GROUP.into(),
                    resource: ref_plural.into(),
                    namespace: ns.map(str::to_string),
                    name: Some(ref_name.clone()),
                };
                if allows(st, who, &a).await? {
                    return Ok(());
                }
                return Err(ApiError::new(
                    axum::http::StatusCode::NOT_FOUND,
                    "NotFound",
                    format!("{ref_plural}.{GROUP} \"{ref_name}\" not found"),
                ));
            }
            (plural, rules, "bind", (ref_plural, ref_name))
        }
        _ => return Ok(()),
    };
    let a = Attributes {
        verb: verb.into(),
        group: GROUP.into(),
        resource: checked_role.0.into(),
        namespace: ns.map(str::to_string),
        name: Some(checked_role.1),
    };
    if allows(st, who, &a).await? {
        return Ok(());
    }
    let owned = rules_of(st, who, ns).await?;
    let missing = uncovered(&owned, &wanted);
    if missing.is_empty() {
        return Ok(());
    }
    let shown: Vec<String> = missing.iter().take(20).map(describe_rule).collect();
    Err(ApiError::new(
        axum::http::StatusCode::FORBIDDEN,
        "Forbidden",
        format!(
            "{plural}.{GROUP} \"{name}\" is forbidden: user \"{}\" (groups=[{}]) is attempting to grant RBAC permissions not currently held:\n{}",
            who.username,
            who.groups
                .iter()
                .map(|g| format!("{g:?}"))
                .collect::<Vec<_>>()
                .join(" "),
            shown.join("\n")
        ),
    ))
}

/// A rule as kube-apiserver prints one in its escalation error.
fn describe_rule(r: &Value) -> String {
    let list = |k: &str| {
        let v = strings(&r[k]);
        (!v.is_empty()).then(|| {
            format!(
                "{}:[{}]",
                match k {
                    "apiGroups" => "APIGroups",
                    "resources" => "Resources",
                    "resourceNames" => "ResourceNames",
                    "nonResourceURLs" => "NonResourceURLs",
                    _ => "Verbs",
                },
                v.iter()
                    .map(|s| format!("{s:?}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            )
        })
    };
    let parts: Vec<String> = [
        "apiGroups",
        "resources",
        "resourceNames",
        "nonResourceURLs",
        "verbs",
    ]
    .iter()
    .filter_map(|k| list(k))
    .collect();
    format!("{{{}}}", parts.join(", "))
}

/// Allows `a` for `who`, or answers kube-apiserver's 403.
pub async fn authorize(st: &ApiState, who: &UserInfo, a: &Attributes) -> Result<(), ApiError> {
    if allows(st, who, a).await? {
        return Ok(());
    }
    Err(forbidden(&who.username, a))
}

/// kube-apiserver's 403 for `user` asking `a`.
pub fn forbidden(user: &str, a: &Attributes) -> ApiError {
    let plural = a
        .resource
        .split_once('/')
        .map_or(a.resource.as_str(), |(p, _)| p);
    let scope = match &a.namespace {
        Some(n) => format!("in the namespace \"{n}\""),
        None => "at the cluster scope".into(),
    };
    let what = match &a.name {
        Some(n) => format!("{plural} \"{n}\" is forbidden"),
        None => format!("{plural} is forbidden"),
    };
    ApiError::new(
        axum::http::StatusCode::FORBIDDEN,
        "Forbidden",
        format!(
            "{what}: User \"{user}\" cannot {} resource \"{}\" in API group \"{}\" {scope}",
            a.verb, a.resource, a.group
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::authz::Identity;
    use serde_json::json;

    #[test]
    fn tokens_verify_until_they_expire_and_resist_tampering() {
        let key = b"node-token".to_vec();
        let c = Claims {
            namespace: "kube-system".into(),
            name: "keelson-proxy".into(),
            uid: "u1".into(),
            exp: 2_000,
            pod: None,
            aud: vec![API_AUDIENCE.into()],
            warnafter: None,
        };
        let t = issue(&key, &c);
        assert_eq!(verify(&key, &t, 1_000), Some(c.clone()));
        assert_eq!(verify(&key, &t, 2_000), None, "expired");
        assert_eq!(verify(b"other", &t, 1_000), None, "another cluster");
        let forged = issue(
            &key,
            &Claims {
                name: "admin".into(),
                ..c
            },
        )
        .rsplit_once('.')
        .map(|(b, _)| b.to_string())
        .unwrap()
            + "."
            + t.rsplit_once('.').unwrap().1;
        assert_eq!(
            verify(&key, &forged, 1_000),
            None,
            "claims swapped under a mac"
        );
        assert_eq!(verify(&key, "keelson-sa.x", 0), None);
    }

    #[test]
    fn only_pod_bound_kubelet_tokens_for_the_api_are_extended() {
        let key = b"t".to_vec();
        let sa = json!({"metadata": {"name": "d", "namespace": "ns", "uid": "u"}});
        let pod =
            json!({"metadata": {"name": "p", "uid": "pu"}, "spec": {"serviceAccountName": "d"}});
        let req = |secs: i64, bound: bool, aud: &[&str]| {
            let mut r = json!({"kind": "TokenRequest", "apiVersion": "authentication.k8s.io/v1",
                   "spec": {"expirationSeconds": secs, "audiences": aud}});
            if bound {
                r["spec"]["boundObjectRef"] = json!({"kind": "Pod", "name": "p", "uid": "pu"});
            }
            r.to_string()
        };
        let now = jiff::Timestamp::now().as_second();
        let claims = |out: Value| {
            let t = out["status"]["token"].as_str().unwrap().to_string();
            verify(&key, &t, now).unwrap()
        };
        let c = claims(
            token_request(
                &key,
                &sa,
                req(KUBELET_EXPIRY, true, &[]).as_bytes(),
                Some(&pod),
            )
            .unwrap(),
        );
        assert!(c.exp > now + 300 * 24 * 3600, "extended to a year");
        assert_eq!(c.warnafter, Some(c.exp - EXTENDED + KUBELET_EXPIRY));
        assert_eq!(c.pod, Some(("p".into(), "pu".into())));
        assert_eq!(c.aud, [API_AUDIENCE]);
        // Not bound, or for another audience: the lifetime asked for.
        let c = claims(
            token_request(&key, &sa, req(KUBELET_EXPIRY, false, &[]).as_bytes(), None).unwrap(),
        );
        assert!(c.exp <= now + KUBELET_EXPIRY + 5);
        let c = claims(
            token_request(
                &key,
                &sa,
                req(KUBELET_EXPIRY, true, &["vault"]).as_bytes(),
                Some(&pod),
            )
            .unwrap(),
        );
        assert!(c.exp <= now + KUBELET_EXPIRY + 5);
        assert_eq!(c.aud, ["vault"]);
        // Out of range, a missing pod, another pod's UID, another account's pod: refused.
        assert!(token_request(&key, &sa, req(60, false, &[]).as_bytes(), None).is_err());
        assert!(token_request(&key, &sa, req(i64::MAX, false, &[]).as_bytes(), None).is_err());
        assert!(token_request(&key, &sa, req(3600, true, &[]).as_bytes(), None).is_err());
        let other =
            json!({"metadata": {"name": "p", "uid": "zz"}, "spec": {"serviceAccountName": "d"}});
        assert!(token_request(&key, &sa, req(3600, true, &[]).as_bytes(), Some(&other)).is_err());
        let foreign =
            json!({"metadata": {"name": "p", "uid": "pu"}, "spec": {"serviceAccountName": "x"}});
        assert!(token_request(&key, &sa, req(3600, true, &[]).as_bytes(), Some(&foreign)).is_err());
        assert!(token_request(&key, &sa, b"{}", None).is_err());
    }

    #[test]
    fn rules_match_verbs_groups_resources_and_names() {
        let a = Attributes {
            verb: "watch".into(),
            group: "discovery.k8s.io".into(),
            resource: "endpointslices".into(),
            namespace: None,
            name: None,
        };
        let rule = json!({"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]});
        assert!(rule_allows(&rule, &a));
        assert!(!rule_allows(
            &rule,
            &Attributes {
                verb: "delete".into(),
                ..a.clone()
            }
        ));
        assert!(!rule_allows(
            &rule,
            &Attributes {
                group: "".into(),
                ..a.clone()
            }
        ));
        let star = json!({"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]});
        assert!(rule_allows(&star, &a));
        let sub = json!({"apiGroups": [""], "resources": ["pods/*"], "verbs": ["create"]});
        let exec = Attributes {
            verb: "create".into(),
            group: "".into(),
            resource: "pods/exec".into(),
            namespace: Some("d".into()),
            name: Some("p".into()),
        };
        assert!(rule_allows(&sub, &exec));
        let named = json!({"apiGroups": [""], "resources": ["pods/exec"], "verbs": ["create"], "resourceNames": ["q"]});
        assert!(!rule_allows(&named, &exec));
    }

    #[test]
    fn bindings_name_accounts_users_and_groups() {
        let sa = |ns: &str, n: &str| Identity::ServiceAccount(ns.into(), n.into()).info();
        let b = json!({"subjects": [{"kind": "ServiceAccount", "name": "p", "namespace": "kube-system"}]});
        assert!(binds(&b, &sa("kube-system", "p")));
        assert!(!binds(&b, &sa("default", "p")));
        let g = json!({"subjects": [{"kind": "Group", "name": "system:serviceaccounts:ci"}]});
        assert!(binds(&g, &sa("ci", "any")) && !binds(&g, &sa("other", "any")));
        let u = json!({"subjects": [{"kind": "User", "name": "system:serviceaccount:a:b"}]});
        assert!(binds(&u, &sa("a", "b")));
        // Plain users by name and by group.
        let jane = Identity::of_user("jane", &["dev".into()]).info();
        let by_name = json!({"subjects": [{"kind": "User", "name": "jane"}]});
        let by_group = json!({"subjects": [{"kind": "Group", "name": "dev"}]});
        let everyone = json!({"subjects": [{"kind": "Group", "name": "system:authenticated"}]});
        assert!(binds(&by_name, &jane) && binds(&by_group, &jane) && binds(&everyone, &jane));
        assert!(!binds(&b, &jane));
    }

    #[test]
    fn covering_needs_every_atom_and_the_same_wildcards() {
        let owned = vec![
            json!({"apiGroups": [""], "resources": ["configmaps", "pods/*"], "verbs": ["get", "list"]}),
            json!({"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["roles"], "verbs": ["create"]}),
            json!({"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"], "resourceNames": ["one"]}),
        ];
        let ok = [
            json!({"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]}),
            json!({"apiGroups": [""], "resources": ["pods/log"], "verbs": ["list"]}),
            json!({"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"], "resourceNames": ["one"]}),
        ];
        assert!(uncovered(&owned, &ok).is_empty());
        let star = [json!({"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]})];
        assert_eq!(uncovered(&owned, &star).len(), 1);
        let more = [
            json!({"apiGroups": [""], "resources": ["configmaps", "secrets"], "verbs": ["get", "delete"]}),
        ];
        // configmaps/delete, secrets/get (no name: the held rule names one), secrets/delete.
        assert_eq!(uncovered(&owned, &more).len(), 3);
        let urls = [json!({"nonResourceURLs": ["/metrics"], "verbs": ["get"]})];
        assert_eq!(uncovered(&owned, &urls).len(), 1);
        assert!(uncovered(&[json!({"nonResourceURLs": ["*"], "verbs": ["*"]})], &urls).is_empty());
        assert_eq!(
            describe_rule(&star[0]),
            r#"{APIGroups:["*"], Resources:["*"], Verbs:["*"]}"#
        );
    }

    #[test]
    fn hmac_matches_rfc4231_case_2() {
        let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(mac),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
