//! Access and identity reviews (authorization.k8s.io and authentication.k8s.io): kinds that
//! are never stored. A create is answered from the caller's identity and the same authorizers
//! that decide real requests, as kube-apiserver does: `kubectl auth can-i` (with `--list`,
//! `--as`), `kubectl auth whoami`, and webhooks that check a token or a user's rights.

use axum::{
    body::Bytes,
    http::{Method, StatusCode},
    response::Response,
};
use serde_json::{Value, json};

use super::{
    ApiState,
    authz::{self, Identity},
    handlers::{ApiError, Target, json_response},
    rbac::{self, Attributes, strings},
    registry,
    strategy::Review,
};

/// Answers a create of review kind `kind` by `id` (in namespace `ns` for the local one).
pub async fn answer(
    st: &ApiState,
    id: &Identity,
    kind: Review,
    ns: Option<&str>,
    body: &Bytes,
) -> Result<Response, ApiError> {
    let mut obj: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the request body is not JSON: {e}")))?;
    if !obj.is_object() {
        return Err(ApiError::bad_request("the request body is not an object"));
    }
    let spec = obj["spec"].clone();
    let status = match kind {
        Review::SelfAccess => access(st, id, &spec, "SelfSubjectAccessReview").await?,
        Review::Access | Review::LocalAccess => {
            let subject = subject_of(&spec, kind_name(kind))?;
            if kind == Review::LocalAccess {
                local_namespace(&mut obj, ns)?;
            }
            access(st, &subject, &obj["spec"].clone(), kind_name(kind)).await?
        }
        Review::SelfRules => rules(st, id, &spec).await?,
        Review::Token => token(st, &spec).await,
        Review::SelfSubject => json!({"userInfo": user_info(id)}),
    };
    obj["status"] = status;
    obj["metadata"]["creationTimestamp"] = Value::Null;
    Ok(json_response(StatusCode::CREATED, &obj))
}

fn kind_name(kind: Review) -> &'static str {
    match kind {
        Review::SelfAccess => "SelfSubjectAccessReview",
        Review::Access => "SubjectAccessReview",
        Review::LocalAccess => "LocalSubjectAccessReview",
        Review::SelfRules => "SelfSubjectRulesReview",
        Review::Token => "TokenReview",
        Review::SelfSubject => "SelfSubjectReview",
    }
}

fn invalid(kind: &str, causes: &[String]) -> ApiError {
    ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "Invalid",
        format!(
            "{kind}.authorization.k8s.io \"\" is invalid: {}",
            causes.join(", ")
        ),
    )
}

/// The user a SubjectAccessReview asks about (`spec.user`, `spec.groups`).
fn subject_of(spec: &Value, kind: &str) -> Result<Identity, ApiError> {
    let user = spec["user"].as_str().unwrap_or("");
    let groups = strings(&spec["groups"]);
    if user.is_empty() && groups.is_empty() {
        return Err(invalid(
            kind,
            &[
                "spec.user: Invalid value: \"\": at least one of user or group must be specified"
                    .into(),
            ],
        ));
    }
    Ok(Identity::of_user(user, &groups))
}

/// A LocalSubjectAccessReview asks about its own namespace only.
fn local_namespace(obj: &mut Value, ns: Option<&str>) -> Result<(), ApiError> {
    let ns = ns.unwrap_or("");
    let attrs = &mut obj["spec"]["resourceAttributes"];
    if !attrs.is_object() {
        return Err(invalid(
            "LocalSubjectAccessReview",
            &[
                "spec.resourceAttributes: Required value: disallowed on this kind of request"
                    .into(),
            ],
        ));
    }
    match attrs["namespace"].as_str() {
        None | Some("") => attrs["namespace"] = json!(ns),
        Some(n) if n == ns => {}
        Some(n) => {
            return Err(invalid(
                "LocalSubjectAccessReview",
                &[format!(
                    "spec.resourceAttributes.namespace: Invalid value: \"{n}\": must match metadata.namespace"
                )],
            ));
        }
    }
    obj["metadata"]["namespace"] = json!(ns);
    Ok(())
}

/// Whether `who` may do what `spec` asks (exactly one of resource and non-resource
/// attributes): the status of an access review.
async fn access(
    st: &ApiState,
    who: &Identity,
    spec: &Value,
    kind: &str,
) -> Result<Value, ApiError> {
    let res = spec["resourceAttributes"].is_object();
    let non = spec["nonResourceAttributes"].is_object();
    if res == non {
        return Err(invalid(
            kind,
            &["spec.resourceAttributes: Invalid value: \"null\": exactly one of nonResourceAttributes or resourceAttributes must be specified".into()],
        ));
    }
    let (allowed, reason) = if res {
        may(st, who, &attributes(&spec["resourceAttributes"])).await?
    } else {
        let a = &spec["nonResourceAttributes"];
        may_url(
            st,
            who,
            a["path"].as_str().unwrap_or(""),
            a["verb"].as_str().unwrap_or(""),
        )
        .await?
    };
    let mut status = json!({"allowed": allowed});
    if !reason.is_empty() {
        status["reason"] = json!(reason);
    }
    Ok(status)
}

/// A review's resource attributes in RBAC's terms.
fn attributes(a: &Value) -> Attributes {
    let s = |k: &str| a[k].as_str().unwrap_or("").to_string();
    let some = |k: &str| Some(s(k)).filter(|v| !v.is_empty());
    let mut resource = s("resource");
    if let Some(sub) = some("subresource") {
        resource = format!("{resource}/{sub}");
    }
    Attributes {
        verb: s("verb"),
        group: s("group"),
        resource,
        namespace: some("namespace"),
        name: some("name"),
    }
}

/// The request a node or the bootstrap token would make for `a`, for their authorizers.
fn request_of(a: &Attributes) -> Option<(Method, Target)> {
    let (plural, sub) = match a.resource.split_once('/') {
        Some((p, s)) => (p, Some(s.to_string())),
        None => (a.resource.as_str(), None),
    };
    let resource = registry::find_any_version(&a.group, plural)?;
    let method = match a.verb.as_str() {
        "get" | "list" | "watch" => Method::GET,
        "create" => Method::POST,
        "update" => Method::PUT,
        "patch" => Method::PATCH,
        "delete" | "deletecollection" => Method::DELETE,
        _ => return None,
    };
    let name = match a.verb.as_str() {
        "list" | "watch" | "deletecollection" => None,
        _ => a.name.clone(),
    };
    Some((
        method,
        Target {
            resource,
            namespace: a.namespace.clone().filter(|_| resource.namespaced),
            name,
            subresource: sub,
        },
    ))
}

/// Whether `who` may do `a`, and why not: the authorizer chain of real requests (an
/// administrator; the Node authorizer or the bootstrap rules, then RBAC; RBAC for the rest).
pub async fn may(
    st: &ApiState,
    who: &Identity,
    a: &Attributes,
) -> Result<(bool, String), ApiError> {
    let first = match who {
        Identity::Admin => return Ok((true, String::new())),
        Identity::Node(node) => match request_of(a) {
            Some((method, t)) => {
                let body = Bytes::new();
                let read = authz::node_may_read(st, node, &method, &t).await;
                let decided = match read {
                    Ok(()) => authz::node_may_write(st, node, &method, &t, &body).await,
                    Err(e) => Err(e),
                };
                Some(decided)
            }
            None => None,
        },
        Identity::Bootstrap => request_of(a).map(|(method, t)| authz::bootstrap_may(&method, &t)),
        Identity::ServiceAccount(..) | Identity::User(_) => None,
    };
    if let Some(Ok(())) = first {
        return Ok((true, String::new()));
    }
    if rbac::allows(st, &who.info(), a).await? {
        return Ok((true, String::new()));
    }
    Ok((
        false,
        match first {
            Some(Err(e)) => e.message,
            _ => String::new(),
        },
    ))
}

/// Whether `who` may `verb` the non-resource URL `path` (`/healthz`, `/metrics`, …).
async fn may_url(
    st: &ApiState,
    who: &Identity,
    path: &str,
    verb: &str,
) -> Result<(bool, String), ApiError> {
    if *who == Identity::Admin {
        return Ok((true, String::new()));
    }
    let rules = rbac::rules_of(st, &who.info(), None).await?;
    Ok((
        rules.iter().any(|r| rbac::url_allows(r, path, verb)),
        String::new(),
    ))
}

/// What `who` may do in `spec.namespace`: the status of a SelfSubjectRulesReview.
async fn rules(st: &ApiState, who: &Identity, spec: &Value) -> Result<Value, ApiError> {
    let ns = spec["namespace"].as_str().filter(|n| !n.is_empty());
    let mut resource_rules = vec![];
    let mut non_resource_rules = vec![];
    let mut status = json!({"incomplete": false});
    if *who == Identity::Admin {
        resource_rules.push(json!({"verbs": ["*"], "apiGroups": ["*"], "resources": ["*"]}));
        non_resource_rules.push(json!({"verbs": ["*"], "nonResourceURLs": ["*"]}));
    } else {
        if matches!(who, Identity::Node(_) | Identity::Bootstrap) {
            // As kube-apiserver's Node authorizer: it decides per object, it lists nothing.
            status["incomplete"] = json!(true);
            status["evaluationError"] = json!(match who {
                Identity::Node(_) => "node authorizer does not support user rule resolution",
                _ => "the bootstrap token's authorizer does not support user rule resolution",
            });
        }
        for r in rbac::rules_of(st, &who.info(), ns).await? {
            if r.get("nonResourceURLs")
                .is_some_and(|u| !strings(u).is_empty())
            {
                non_resource_rules
                    .push(json!({"verbs": r["verbs"], "nonResourceURLs": r["nonResourceURLs"]}));
            } else {
                let mut rule = json!({"verbs": r["verbs"], "apiGroups": r["apiGroups"], "resources": r["resources"]});
                if !strings(&r["resourceNames"]).is_empty() {
                    rule["resourceNames"] = r["resourceNames"].clone();
                }
                resource_rules.push(rule);
            }
        }
    }
    status["resourceRules"] = json!(resource_rules);
    status["nonResourceRules"] = json!(non_resource_rules);
    Ok(status)
}

/// `authentication.k8s.io` UserInfo of an identity.
fn user_info(id: &Identity) -> Value {
    let u = id.info();
    json!({"username": u.username, "groups": u.groups})
}

/// Who `spec.token` proves to be, for `spec.audiences` (the API server's when none): the status
/// of a TokenReview. A token that proves nothing is `authenticated: false`, with the reason.
async fn token(st: &ApiState, spec: &Value) -> Value {
    let token = spec["token"].as_str().unwrap_or("").trim();
    let mut wanted = strings(&spec["audiences"]);
    if wanted.is_empty() {
        wanted.push(rbac::API_AUDIENCE.to_string());
    }
    let refused = |why: &str| json!({"authenticated": false, "error": why, "user": {}});
    if token.starts_with(rbac::PREFIX) {
        let Some(t) = super::service_account_token(st, token).await else {
            return refused("invalid bearer token, service account token is invalid");
        };
        let audiences: Vec<&String> = wanted.iter().filter(|a| t.audiences.contains(*a)).collect();
        if audiences.is_empty() {
            return refused(&format!(
                "invalid bearer token, token audiences {:?} is invalid for the target audiences {wanted:?}",
                t.audiences
            ));
        }
        let mut user = user_info(&t.identity);
        user["uid"] = json!(t.sa_uid);
        if let Some((name, uid)) = &t.pod {
            user["extra"] = json!({"authentication.kubernetes.io/pod-name": [name],
                                   "authentication.kubernetes.io/pod-uid": [uid]});
        }
        return json!({"authenticated": true, "user": user, "audiences": audiences});
    }
    // The administrator's and the node token: for the API server's audience only.
    match authz::authenticate(token, &st.admin_token, &st.node_token) {
        Some(id) if wanted.iter().any(|a| a == rbac::API_AUDIENCE) => json!({
            "authenticated": true, "user": user_info(&id), "audiences": [rbac::API_AUDIENCE]}),
        Some(_) => refused("token audiences are invalid for the target audiences"),
        None => refused("invalid bearer token"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn review_attributes_become_rbac_attributes() {
        let a = attributes(
            &json!({"verb": "get", "resource": "pods", "subresource": "log",
                                   "namespace": "default", "name": "web", "group": ""}),
        );
        assert_eq!(a.resource, "pods/log");
        assert_eq!(a.namespace.as_deref(), Some("default"));
        assert_eq!(a.name.as_deref(), Some("web"));
        let all = attributes(&json!({"verb": "list", "resource": "nodes"}));
        assert_eq!((all.namespace, all.name), (None, None));
    }

    #[test]
    fn a_node_request_is_rebuilt_for_the_node_authorizer() {
        let a = attributes(
            &json!({"verb": "list", "resource": "pods", "namespace": "default", "name": "x"}),
        );
        let (m, t) = request_of(&a).expect("pods are served");
        assert_eq!(m, Method::GET);
        assert_eq!(t.name, None, "a list names nothing");
        let a = attributes(
            &json!({"verb": "update", "resource": "nodes", "subresource": "status",
                                   "namespace": "ignored", "name": "n1"}),
        );
        let (m, t) = request_of(&a).expect("nodes are served");
        assert_eq!(
            (m, t.namespace, t.subresource.as_deref()),
            (Method::PUT, None, Some("status"))
        );
        assert!(request_of(&attributes(&json!({"verb": "get", "resource": "widgets"}))).is_none());
    }

    #[test]
    fn a_subject_review_needs_a_user_or_a_group() {
        assert!(subject_of(&json!({}), "SubjectAccessReview").is_err());
        assert_eq!(
            subject_of(
                &json!({"user": "system:serviceaccount:ci:bot"}),
                "SubjectAccessReview"
            )
            .ok(),
            Some(Identity::ServiceAccount("ci".into(), "bot".into()))
        );
        assert_eq!(
            subject_of(
                &json!({"groups": ["system:masters"]}),
                "SubjectAccessReview"
            )
            .ok(),
            Some(Identity::Admin)
        );
    }

    #[test]
    fn a_local_review_keeps_to_its_namespace() {
        let mut o = json!({"spec": {"resourceAttributes": {"verb": "get", "resource": "pods"}}});
        local_namespace(&mut o, Some("team")).expect("fills the namespace");
        assert_eq!(o["spec"]["resourceAttributes"]["namespace"], "team");
        let mut other = json!({"spec": {"resourceAttributes": {"namespace": "x"}}});
        let e = local_namespace(&mut other, Some("team")).expect_err("another namespace");
        assert!(
            e.message.contains("must match metadata.namespace"),
            "{}",
            e.message
        );
    }
}
