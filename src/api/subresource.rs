//! Subresources: `status` (writes only the status; the main resource keeps it), `pods/binding`
//! (the scheduler's bind: sets `spec.nodeName` once), and `scale` of Deployments and
//! ReplicaSets (an `autoscaling/v1` Scale view of `spec.replicas`).

use axum::{
    body::Bytes,
    http::{HeaderMap, Method, StatusCode},
    response::Response,
};
use serde_json::{Value, json};

use super::{
    ApiState,
    handlers::{ApiError, decode, get_existing, json_response, parse_body, with_rv},
    patch,
    registry::Resource,
    write::carry_over,
};
use crate::store::{self, Precondition};

/// Kinds whose status is written only through `/status`.
pub fn has_status(r: &Resource) -> bool {
    super::registry::has_subresource(r, "status")
}

fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "NotFound",
        "the server could not find the requested resource",
    )
}

/// Applies a PATCH body in the format its Content-Type names.
fn apply_patch(headers: &HeaderMap, target: &mut Value, body: &Bytes) -> Result<(), ApiError> {
    let ctype = headers
        .get("content-type")
        .and_then(|c| c.to_str().ok())
        .unwrap_or("");
    let ctype = ctype.split(';').next().unwrap_or("").trim();
    let doc: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?;
    let r = match ctype {
        "application/json-patch+json" => patch::json_patch(target, &doc),
        "application/strategic-merge-patch+json" => patch::strategic_merge(target, &doc),
        "application/merge-patch+json" | "application/apply-patch+yaml" => {
            patch::merge_patch(target, &doc);
            Ok(())
        }
        other => {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "UnsupportedMediaType",
                format!("unsupported patch type {other:?}"),
            ));
        }
    };
    r.map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            format!("the patch could not be applied: {e}"),
        )
    })
}

/// The object a subresource request is about, and how to write it back.
struct Target<'a> {
    st: &'a ApiState,
    r: &'static Resource,
    ns: Option<&'a str>,
    name: &'a str,
    key: String,
    /// The stored object's revision (writes are conditional on it).
    revision: i64,
    cur: Value,
}

impl Target<'_> {
    /// Stores `new` if the object is still at `revision`; it, with its new resourceVersion.
    async fn write(&self, new: Value) -> Result<Value, ApiError> {
        let mut stored = new;
        if let Some(m) = stored.get_mut("metadata").and_then(Value::as_object_mut) {
            m.remove("resourceVersion");
        }
        let bytes = serde_json::to_vec(&stored).map_err(ApiError::internal)?;
        let kv = self
            .st
            .store
            .put(&self.key, bytes, Precondition::ModRevision(self.revision))
            .await
            .map_err(|e| ApiError::from_store(e, self.r, self.name))?;
        Ok(with_rv(stored, kv.mod_revision))
    }
}

/// Serves `/<resource>/<name>/<sub>`.
#[allow(clippy::too_many_arguments)]
pub async fn handle(
    st: &ApiState,
    r: &'static Resource,
    ns: Option<&str>,
    name: &str,
    sub: &str,
    method: &Method,
    headers: &HeaderMap,
    body: &Bytes,
    query: Option<&str>,
) -> Result<Response, ApiError> {
    // The registry's table says which kinds serve which subresources (and discovery lists the
    // same table); past this check only the method matters.
    if !super::registry::has_subresource(r, sub) {
        return Err(not_found());
    }
    let key = r.key(ns, name);
    let kv = get_existing(st, r, &key, name).await?;
    let t = Target {
        cur: decode(&kv)?,
        revision: kv.mod_revision,
        st,
        r,
        ns,
        name,
        key,
    };
    match (sub, method) {
        ("status", &Method::GET) => Ok(json_response(StatusCode::OK, &t.cur)),
        ("status", &Method::PUT) | ("status", &Method::PATCH) => {
            status(&t, method, headers, body).await
        }
        ("binding", &Method::POST) => binding(&t, body).await,
        ("finalize", &Method::PUT) => finalize(&t, body).await,
        ("approval", &Method::PUT) => {
            let b = parse_body(body, r)?;
            let new = super::csr::approve(st, &t.cur, &b)?;
            Ok(json_response(StatusCode::OK, &t.write(new).await?))
        }
        ("log", &Method::GET) => super::logs::proxy(st, &t.cur, query).await,
        ("token", &Method::POST) => token(&t, body).await,
        ("eviction", &Method::POST) => eviction(&t, body).await,
        ("scale", m) => scale(&t, m, headers, body).await,
        _ => Err(not_found()),
    }
}

/// `PUT`/`PATCH .../status`: only the status changes.
async fn status(
    t: &Target<'_>,
    method: &Method,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Response, ApiError> {
    let incoming = if method == Method::PUT {
        let b = parse_body(body, t.r)?;
        if let Some(rv) = b
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            && rv != t.revision.to_string()
        {
            return Err(ApiError::from_store(
                store::Error::Conflict {
                    key: t.key.clone(),
                    expected: 0,
                    actual: t.revision,
                },
                t.r,
                t.name,
            ));
        }
        b
    } else {
        let mut v = t.cur.clone();
        apply_patch(headers, &mut v, body)?;
        v
    };
    let mut new = t.cur.clone();
    new["status"] = incoming.get("status").cloned().unwrap_or(Value::Null);
    Ok(json_response(StatusCode::OK, &t.write(new).await?))
}

/// `PUT namespaces/NAME/finalize`: only `spec.finalizers` changes; a terminating namespace
/// left with none goes.
async fn finalize(t: &Target<'_>, body: &Bytes) -> Result<Response, ApiError> {
    let b = parse_body(body, t.r)?;
    let mut new = t.cur.clone();
    new["spec"]["finalizers"] = b
        .pointer("/spec/finalizers")
        .cloned()
        .unwrap_or_else(|| json!([]));
    let written = t.write(new).await?;
    let rev = written
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .and_then(|r| r.parse().ok())
        .unwrap_or(0);
    let pre = store::Precondition::ModRevision(rev);
    if let Some(gone) =
        super::write::finish_delete(t.st, t.r, &t.key, t.name, &written, pre).await?
    {
        return Ok(gone);
    }
    Ok(json_response(StatusCode::OK, &written))
}

/// `POST pods/NAME/binding`, the scheduler's bind: sets `spec.nodeName` once.
async fn binding(t: &Target<'_>, body: &Bytes) -> Result<Response, ApiError> {
    let name = t.name;
    let b: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid Binding: {e}")))?;
    let node = b
        .pointer("/target/name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty());
    let node = node.ok_or_else(|| ApiError::bad_request("Binding: target.name: Required value"))?;
    if let Some(on) = t
        .cur
        .pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on pods/binding \"{name}\": pod {name} is already assigned to node \"{on}\""
            ),
        ));
    }
    if t.cur.pointer("/metadata/deletionTimestamp").is_some() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "Conflict",
            format!("pod {name} is being deleted, cannot be assigned to a host"),
        ));
    }
    let mut new = t.cur.clone();
    new["spec"]["nodeName"] = json!(node);
    t.write(new).await?;
    Ok(json_response(
        StatusCode::CREATED,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
    ))
}

/// `POST serviceaccounts/NAME/token`: a token for the account, bound to a pod when asked.
async fn token(t: &Target<'_>, body: &Bytes) -> Result<Response, ApiError> {
    // The bound pod as stored, when the request names one.
    let req: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let pod = match req
        .pointer("/spec/boundObjectRef/name")
        .and_then(Value::as_str)
    {
        Some(p) if req.pointer("/spec/boundObjectRef/kind") == Some(&json!("Pod")) => {
            let pods = super::registry::find("", "v1", "pods")
                .ok_or_else(|| ApiError::internal("no pods resource"))?;
            t.st.store
                .get(&pods.key(t.ns, p))
                .await
                .map_err(ApiError::internal)?
                .and_then(|kv| serde_json::from_slice::<Value>(&kv.value).ok())
        }
        _ => None,
    };
    let out = super::rbac::token_request(&t.st.sa_key, &t.cur, body, pod.as_ref())?;
    Ok(json_response(StatusCode::CREATED, &out))
}

/// `POST pods/NAME/eviction`: the pod is deleted with the Eviction's DeleteOptions unless the
/// PodDisruptionBudget that covers it allows no disruption now (429, as kube-apiserver, so
/// `kubectl drain` retries). A pod that is pending, finished or already going ignores budgets;
/// an eviction that spends the budget records itself in the budget's status first.
async fn eviction(t: &Target<'_>, body: &Bytes) -> Result<Response, ApiError> {
    let b: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid Eviction: {e}")))?;
    if b.get("kind").and_then(Value::as_str) != Some("Eviction") {
        return Err(ApiError::bad_request(
            "the body of the request must be an Eviction (policy/v1)",
        ));
    }
    let pod: k8s_openapi::api::core::v1::Pod =
        serde_json::from_value(t.cur.clone()).map_err(ApiError::internal)?;
    let ignores_budgets = pod.metadata.deletion_timestamp.is_some()
        || matches!(
            pod.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Pending" | "Succeeded" | "Failed")
        );
    if !ignores_budgets {
        check_budget(t, &pod).await?;
    }
    let opts = b.get("deleteOptions").cloned().unwrap_or(json!({}));
    let bytes = Bytes::from(opts.to_string());
    super::write::delete(t.st, t.r, t.ns, t.name, &bytes, None, false).await?;
    Ok(json_response(
        StatusCode::CREATED,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
    ))
}

/// The budget covering `pod`: refuses the eviction, or lets it through (spending one
/// disruption, written conditionally so two evictions cannot spend the same one).
async fn check_budget(
    t: &Target<'_>,
    pod: &k8s_openapi::api::core::v1::Pod,
) -> Result<(), ApiError> {
    use crate::kinds::disruption::{Eviction, covers, evict, spent};
    use k8s_openapi::api::policy::v1::PodDisruptionBudget;
    let Some(r) = super::registry::find("policy", "v1", "poddisruptionbudgets") else {
        return Ok(());
    };
    let ns = t.ns.unwrap_or("default");
    for _ in 0..5 {
        let page =
            t.st.store
                .list(&format!("{}{ns}/", r.prefix()), None, 0)
                .await
                .map_err(ApiError::internal)?;
        let budgets: Vec<(PodDisruptionBudget, i64, String)> = page
            .items
            .iter()
            .filter_map(|kv| {
                Some((
                    serde_json::from_slice(&kv.value).ok()?,
                    kv.mod_revision,
                    kv.key.clone(),
                ))
            })
            .filter(|(b, _, _)| covers(b, pod))
            .collect();
        let (pdb, rev, key) = match budgets.as_slice() {
            [] => return Ok(()),
            [one] => one,
            _ => {
                return Err(ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "InternalError",
                    "This pod has more than one PodDisruptionBudget, which the eviction subresource does not support.",
                ));
            }
        };
        match evict(pdb, pod) {
            Eviction::Allow => return Ok(()),
            Eviction::Refuse(why) => {
                let mut e = ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "TooManyRequests",
                    "Cannot evict pod as it would violate the pod's disruption budget.",
                );
                e.details =
                    Some(json!({"causes": [{"reason": "DisruptionBudget", "message": why}]}));
                return Err(e);
            }
            Eviction::Spend => {
                let mut v = serde_json::to_value(pdb).map_err(ApiError::internal)?;
                v["status"] = serde_json::to_value(spent(pdb, t.name, jiff::Timestamp::now()))
                    .map_err(ApiError::internal)?;
                let bytes = serde_json::to_vec(&v).map_err(ApiError::internal)?;
                match t
                    .st
                    .store
                    .put(key, bytes, Precondition::ModRevision(*rev))
                    .await
                {
                    Ok(_) => return Ok(()),
                    Err(store::Error::Conflict { .. }) => continue,
                    Err(e) => return Err(ApiError::internal(e)),
                }
            }
        }
    }
    Err(ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "TooManyRequests",
        "Cannot evict pod as the disruption budget kept changing; try again.",
    ))
}

/// `GET`/`PUT`/`PATCH .../scale`: an `autoscaling/v1` Scale view of `spec.replicas`.
async fn scale(
    t: &Target<'_>,
    m: &Method,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Response, ApiError> {
    let name = t.name;
    let view = |o: &Value| {
        // A ReplicationController's selector is the label map itself.
        let sel = super::selector::labels_to_string(
            o.pointer("/spec/selector/matchLabels").or_else(|| {
                o.pointer("/spec/selector")
                    .filter(|_| o["kind"] == "ReplicationController")
            }),
        );
        json!({"kind": "Scale", "apiVersion": "autoscaling/v1",
                "metadata": {"name": o.pointer("/metadata/name"), "namespace": o.pointer("/metadata/namespace"),
                             "uid": o.pointer("/metadata/uid"), "resourceVersion": o.pointer("/metadata/resourceVersion"),
                             "creationTimestamp": o.pointer("/metadata/creationTimestamp")},
                "spec": {"replicas": o.pointer("/spec/replicas").cloned().unwrap_or(json!(1))},
                "status": {"replicas": o.pointer("/status/replicas").cloned().unwrap_or(json!(0)), "selector": sel}})
    };
    let mut scale = view(&t.cur);
    match *m {
        Method::GET => return Ok(json_response(StatusCode::OK, &scale)),
        Method::PUT => {
            scale = serde_json::from_slice(body)
                .map_err(|e| ApiError::bad_request(format!("invalid Scale: {e}")))?
        }
        Method::PATCH => apply_patch(headers, &mut scale, body)?,
        _ => return Err(not_found()),
    }
    let replicas = scale
        .pointer("/spec/replicas")
        .and_then(Value::as_i64)
        .unwrap_or(0);
    if replicas < 0 {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            format!(
                "Scale.autoscaling \"{name}\" is invalid: spec.replicas: Invalid value: {replicas}: must be greater than or equal to 0"
            ),
        ));
    }
    let mut new = t.cur.clone();
    new["spec"]["replicas"] = json!(replicas);
    carry_over(&t.cur, &mut new);
    Ok(json_response(StatusCode::OK, &view(&t.write(new).await?)))
}
