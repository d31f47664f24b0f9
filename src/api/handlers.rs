//! The REST handlers: parse the request path into (resource, namespace, name), read or write
//! the store, and answer with objects, lists, Tables, watch streams or Status errors. One
//! generic handler serves every kind in the registry.

use std::{sync::Arc, time::Duration};

use axum::{
    body::{Body, Bytes},
    extract::{Query, State},
    http::{HeaderMap, Method, StatusCode, Uri},
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};

use super::{
    ApiState,
    registry::{self, Resource},
    table,
};
use crate::store::{self, EventKind, Precondition};

/// How often a watch that allows bookmarks gets one.
const BOOKMARK_EVERY: Duration = Duration::from_secs(10);

/// A Kubernetes `Status` failure response.
#[derive(Debug)]
pub struct ApiError {
    pub code: StatusCode,
    pub reason: &'static str,
    pub message: String,
    pub details: Option<Value>,
}

impl ApiError {
    pub fn new(code: StatusCode, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }
    fn with(mut self, name: &str, r: &Resource) -> Self {
        self.details = Some(json!({"name": name, "kind": r.plural, "group": r.group}));
        self
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "BadRequest", message)
    }
    pub(super) fn not_found(r: &Resource, name: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("{} \"{name}\" not found", r.qualified()),
        )
        .with(name, r)
    }
    pub(super) fn internal(e: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            format!("Internal error occurred: {e}"),
        )
    }
    pub(super) fn from_store(e: store::Error, r: &Resource, name: &str) -> Self {
        match e {
            store::Error::AlreadyExists(_) => Self::new(
                StatusCode::CONFLICT,
                "AlreadyExists",
                format!("{} \"{name}\" already exists", r.qualified()),
            )
            .with(name, r),
            store::Error::NotFound(_) => Self::not_found(r, name),
            store::Error::Conflict { .. } => Self::new(
                StatusCode::CONFLICT,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                    r.qualified()
                ),
            )
            .with(name, r),
            store::Error::Compacted { requested, .. } => Self::new(
                StatusCode::GONE,
                "Expired",
                format!("too old resource version: {requested}"),
            ),
            other => Self::internal(other),
        }
    }
    pub fn status(&self) -> Value {
        let mut s = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": self.message, "reason": self.reason, "code": self.code.as_u16()});
        if let Some(d) = &self.details {
            s["details"] = d.clone();
        }
        s
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        json_response(self.code, &self.status())
    }
}

pub fn json_response(code: StatusCode, v: &Value) -> Response {
    (code, [("content-type", "application/json")], v.to_string()).into_response()
}

/// What a request path names.
#[derive(Debug)]
pub struct Target {
    pub resource: &'static Resource,
    pub namespace: Option<String>,
    pub name: Option<String>,
    /// `status`, `scale`, `binding`…
    pub subresource: Option<String>,
}

/// Parses `/api/v1/...` or `/apis/<group>/<version>/...` into a target.
pub fn parse_path(path: &str) -> Result<Target, ApiError> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "NotFound",
                "the server could not find the requested resource",
            ));
        }
    };
    let nf = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        )
    };
    let find = |plural: &str| registry::find(group, version, plural).ok_or_else(nf);
    let (resource, namespace, name, subresource) = match rest {
        ["namespaces", ns, plural, name, sub] => (
            find(plural)?,
            Some(ns.to_string()),
            Some(name.to_string()),
            Some(sub.to_string()),
        ),
        [plural, name, sub]
            if *plural != "namespaces" || registry::find(group, version, sub).is_none() =>
        {
            (
                find(plural)?,
                None,
                Some(name.to_string()),
                Some(sub.to_string()),
            )
        }
        ["namespaces", ns, plural] => (find(plural)?, Some(ns.to_string()), None, None),
        ["namespaces", ns, plural, name] => (
            find(plural)?,
            Some(ns.to_string()),
            Some(name.to_string()),
            None,
        ),
        [plural] => (find(plural)?, None, None, None),
        [plural, name] => (find(plural)?, None, Some(name.to_string()), None),
        _ => return Err(nf()),
    };
    if namespace.is_some() && !resource.namespaced {
        return Err(nf());
    }
    Ok(Target {
        resource,
        namespace,
        name,
        subresource,
    })
}

fn now() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

/// The object as stored, with the store's revision as its resourceVersion.
pub(super) fn with_rv(mut v: Value, rev: i64) -> Value {
    if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        m.insert("resourceVersion".into(), Value::String(rev.to_string()));
    }
    v
}

pub(super) fn decode(kv: &store::KeyValue) -> Result<Value, ApiError> {
    let v: Value = serde_json::from_slice(&kv.value).map_err(ApiError::internal)?;
    Ok(with_rv(v, kv.mod_revision))
}

fn wants_table(headers: &HeaderMap) -> bool {
    headers
        .get("accept")
        .and_then(|a| a.to_str().ok())
        .is_some_and(|a| a.contains("as=Table"))
}

/// Parses a request body as a JSON object, naming what is wrong.
pub(super) fn parse_body(body: &Bytes, r: &Resource) -> Result<Value, ApiError> {
    if body.len() > 3 * 1024 * 1024 {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "RequestEntityTooLarge",
            "the request body is larger than 3 MiB",
        ));
    }
    if body.starts_with(b"k8s\0") {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            "protobuf request bodies are not supported yet; send JSON",
        ));
    }
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!(
            "the body of the request could not be decoded as JSON: {e}"
        ))
    })?;
    if !v.is_object() {
        return Err(ApiError::bad_request(
            "the body of the request must be a JSON object",
        ));
    }
    let kind = v.get("kind").and_then(Value::as_str).unwrap_or("");
    let api = v.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    if kind != r.kind || api != r.api_version() {
        return Err(ApiError::bad_request(format!(
            "the API version in the data ({api}) does not match the expected API version ({}), or the kind ({kind}) does not match the expected kind ({})",
            r.api_version(),
            r.kind
        )));
    }
    Ok(v)
}

fn is_dns_subdomain(s: &str) -> bool {
    crate::agent::validate::is_dns1123_subdomain(s)
}

#[derive(serde::Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Params {
    watch: Option<String>,
    resource_version: Option<String>,
    limit: Option<usize>,
    #[serde(rename = "continue")]
    continue_: Option<String>,
    label_selector: Option<String>,
    field_selector: Option<String>,
    allow_watch_bookmarks: Option<bool>,
    timeout_seconds: Option<u64>,
    dry_run: Option<String>,
    field_validation: Option<String>,
    grace_period_seconds: Option<i64>,
}

/// The parts of DeleteOptions keelson honours.
#[derive(serde::Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct DeleteOptions {
    grace_period_seconds: Option<i64>,
    preconditions: Option<DeletePreconditions>,
    dry_run: Option<Vec<String>>,
}

#[derive(serde::Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct DeletePreconditions {
    uid: Option<String>,
    resource_version: Option<String>,
}

/// DELETE: preconditions, then finalizers and pod grace turn it into setting
/// `deletionTimestamp` (the object stays until its finalizers are gone / its node confirms);
/// otherwise the object goes at once. A namespace takes its contents with it.
async fn delete(
    st: &ApiState,
    r: &'static Resource,
    ns: Option<&str>,
    name: &str,
    body: &Bytes,
    grace_param: Option<i64>,
    dry: bool,
) -> Result<Response, ApiError> {
    let opts: DeleteOptions = if body.iter().all(u8::is_ascii_whitespace) {
        DeleteOptions::default()
    } else {
        serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("invalid DeleteOptions: {e}")))?
    };
    let dry = dry
        || opts
            .dry_run
            .as_ref()
            .is_some_and(|d| d.iter().any(|x| x == "All"));
    let key = r.key(ns, name);
    let kv = st
        .store
        .get(&key)
        .await
        .map_err(ApiError::internal)?
        .ok_or_else(|| ApiError::not_found(r, name))?;
    let obj = decode(&kv)?;
    let conflict = |msg: String| {
        ApiError::new(
            StatusCode::CONFLICT,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": {msg}",
                r.qualified()
            ),
        )
    };
    if let Some(p) = &opts.preconditions {
        let uid = obj
            .pointer("/metadata/uid")
            .and_then(Value::as_str)
            .unwrap_or("");
        if let Some(want) = p.uid.as_deref().filter(|w| *w != uid) {
            return Err(conflict(format!(
                "Precondition failed: UID in precondition: {want}, UID in object meta: {uid}"
            )));
        }
        if let Some(want) = p
            .resource_version
            .as_deref()
            .filter(|w| *w != kv.mod_revision.to_string())
        {
            return Err(conflict(format!(
                "Precondition failed: ResourceVersion in precondition: {want}, ResourceVersion in object meta: {}",
                kv.mod_revision
            )));
        }
    }
    let has_finalizers = obj
        .pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .is_some_and(|f| !f.is_empty());
    // Pods on a node stop gracefully: the kubelet finishes the delete.
    let grace = opts.grace_period_seconds.or(grace_param);
    let pod_grace = (r.kind == "Pod"
        && obj
            .pointer("/spec/nodeName")
            .and_then(Value::as_str)
            .is_some_and(|n| !n.is_empty())
        && !matches!(
            obj.pointer("/status/phase").and_then(Value::as_str),
            Some("Succeeded" | "Failed")
        ))
    .then(|| {
        grace
            .or_else(|| {
                obj.pointer("/spec/terminationGracePeriodSeconds")
                    .and_then(Value::as_i64)
            })
            .unwrap_or(30)
    })
    .filter(|g| *g > 0);
    if has_finalizers || pod_grace.is_some() {
        let mut marked = obj.clone();
        let already = obj.pointer("/metadata/deletionTimestamp").is_some();
        let g = pod_grace.unwrap_or(0);
        let shorter = obj
            .pointer("/metadata/deletionGracePeriodSeconds")
            .and_then(Value::as_i64)
            .is_none_or(|old| g < old);
        if !already || shorter {
            let at = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(g);
            marked["metadata"]["deletionTimestamp"] =
                json!(at.strftime("%Y-%m-%dT%H:%M:%SZ").to_string());
            marked["metadata"]["deletionGracePeriodSeconds"] = json!(g);
        }
        if dry {
            return Ok(json_response(StatusCode::OK, &marked));
        }
        let mut stored = marked.clone();
        if let Some(m) = stored.get_mut("metadata").and_then(Value::as_object_mut) {
            m.remove("resourceVersion");
        }
        let bytes = serde_json::to_vec(&stored).map_err(ApiError::internal)?;
        let kv = st
            .store
            .put(&key, bytes, Precondition::ModRevision(kv.mod_revision))
            .await
            .map_err(|e| ApiError::from_store(e, r, name))?;
        return Ok(json_response(
            StatusCode::OK,
            &with_rv(stored, kv.mod_revision),
        ));
    }
    if dry {
        return Ok(json_response(StatusCode::OK, &obj));
    }
    let gone = st
        .store
        .delete(&key, Precondition::ModRevision(kv.mod_revision))
        .await
        .map_err(|e| ApiError::from_store(e, r, name))?;
    if r.kind == "Namespace" {
        delete_namespace_contents(st, name).await;
    }
    if r.kind == "Service" {
        super::alloc::release(st.store.as_ref(), &obj).await;
    }
    Ok(json_response(StatusCode::OK, &decode(&gone)?))
}

/// An update of an object being deleted that leaves no finalizers completes the deletion.
async fn finish_delete(
    st: &ApiState,
    r: &'static Resource,
    key: &str,
    name: &str,
    obj: &Value,
    pre: Precondition,
) -> Result<Option<Response>, ApiError> {
    let deleting = obj.pointer("/metadata/deletionTimestamp").is_some();
    let finalizers = obj
        .pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .is_some_and(|f| !f.is_empty());
    let graceful_pod = r.kind == "Pod" && obj.pointer("/spec/nodeName").is_some();
    if !deleting || finalizers || graceful_pod {
        return Ok(None);
    }
    let gone = st
        .store
        .delete(key, pre)
        .await
        .map_err(|e| ApiError::from_store(e, r, name))?;
    Ok(Some(json_response(StatusCode::OK, &decode(&gone)?)))
}

/// Removes every object in a deleted namespace (until the namespace controller exists).
async fn delete_namespace_contents(st: &ApiState, ns: &str) {
    for r in registry::RESOURCES.iter().filter(|r| r.namespaced) {
        let Ok(page) = st
            .store
            .list(&format!("{}{ns}/", r.prefix()), None, 0)
            .await
        else {
            continue;
        };
        for kv in page.items {
            let _ = st.store.delete(&kv.key, Precondition::None).await;
        }
    }
}

/// Options of a write request.
#[derive(Clone, Copy)]
struct WriteOpts<'a> {
    /// `dryRun=All`: validate and answer, store nothing.
    dry: bool,
    /// `fieldValidation`: Strict, Warn (default) or Ignore.
    field_validation: Option<&'a str>,
}

/// Decodes, defaults and validates an object about to be stored (kube-apiserver's admission
/// chain for the parts keelson has): returns the canonical object and warnings.
fn admit(
    r: &Resource,
    obj: Value,
    name: &str,
    field_validation: Option<&str>,
) -> Result<(Value, Vec<String>), ApiError> {
    let d = super::typed::decode(r, &obj).map_err(ApiError::bad_request)?;
    let mut warnings = vec![];
    if !d.unknown.is_empty() {
        let list: Vec<String> = d
            .unknown
            .iter()
            .map(|f| format!("unknown field \"{f}\""))
            .collect();
        match field_validation.unwrap_or("Warn") {
            "Strict" => {
                return Err(ApiError::bad_request(format!(
                    "{} in version \"{}\" cannot be handled as a {}: strict decoding error: {}",
                    r.kind,
                    r.api_version(),
                    r.kind,
                    list.join(", ")
                )));
            }
            "Ignore" => {}
            _ => warnings = list,
        }
    }
    let mut obj = d.canonical;
    if r.kind == "Pod" {
        super::typed::default_pod(&mut obj);
    }
    let errs = super::typed::validate(r, &obj);
    if !errs.is_empty() {
        let causes: Vec<Value> = errs
            .iter()
            .map(|e| {
                let (field, msg) = e.split_once(": ").unwrap_or(("", e));
                json!({"reason": "FieldValueInvalid", "message": msg, "field": field})
            })
            .collect();
        let mut e = ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            format!("{} \"{name}\" is invalid: [{}]", r.kind, errs.join(", ")),
        );
        e.details = Some(json!({"name": name, "kind": r.kind, "group": r.group, "causes": causes}));
        return Err(e);
    }
    Ok((obj, warnings))
}

/// Adds `Warning` headers (kubectl prints them as `Warning: ...`).
fn warn(mut resp: Response, warnings: &[String]) -> Response {
    for w in warnings {
        let v = format!("299 - {}", serde_json::to_string(w).unwrap_or_default());
        if let Ok(h) = axum::http::HeaderValue::from_str(&v) {
            resp.headers_mut().append("warning", h);
        }
    }
    resp
}

/// The generic handler for every resource path.
pub async fn resource(
    State(st): State<Arc<ApiState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Query(q): Query<Params>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let segs: Vec<&str> = uri.path().trim_matches('/').split('/').collect();
    match segs.as_slice() {
        ["api", v] if method == Method::GET => return Ok(super::discovery("", v)),
        ["apis", g, v] if method == Method::GET => return Ok(super::discovery(g, v)),
        _ => {}
    }
    let t = parse_path(uri.path())?;
    if let (Some(sub), Some(name)) = (t.subresource.as_deref(), t.name.as_deref()) {
        return super::subresource::handle(
            &st,
            t.resource,
            t.namespace.as_deref(),
            name,
            sub,
            &method,
            &headers,
            &body,
        )
        .await;
    }
    let r = t.resource;
    let dry = q.dry_run.as_deref() == Some("All");
    let wo = WriteOpts {
        dry,
        field_validation: q.field_validation.as_deref(),
    };
    match (method, t.name.as_deref()) {
        (Method::GET, None) if q.watch.as_deref().is_some_and(|w| w == "true" || w == "1") => {
            watch(st, r, t.namespace, q, wants_table(&headers)).await
        }
        (Method::GET, None) => {
            list(&st, r, t.namespace.as_deref(), &q, wants_table(&headers)).await
        }
        (Method::GET, Some(name)) => {
            let kv = st
                .store
                .get(&r.key(t.namespace.as_deref(), name))
                .await
                .map_err(ApiError::internal)?;
            let obj = decode(&kv.ok_or_else(|| ApiError::not_found(r, name))?)?;
            Ok(if wants_table(&headers) {
                json_response(StatusCode::OK, &table::table(r, &[obj], None))
            } else {
                json_response(StatusCode::OK, &obj)
            })
        }
        (Method::POST, None) => create(&st, r, t.namespace.as_deref(), &body, wo).await,
        (Method::PUT, Some(name)) => update(&st, r, t.namespace.as_deref(), name, &body, wo).await,
        (Method::PATCH, Some(name)) => {
            patch(&st, r, t.namespace.as_deref(), name, &headers, &body, wo).await
        }
        (Method::DELETE, Some(name)) => {
            delete(
                &st,
                r,
                t.namespace.as_deref(),
                name,
                &body,
                q.grace_period_seconds,
                dry,
            )
            .await
        }
        _ => Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        )),
    }
}

async fn ensure_namespace(st: &ApiState, ns: Option<&str>) -> Result<(), ApiError> {
    let Some(ns) = ns else { return Ok(()) };
    let nsr = registry::find("", "v1", "namespaces")
        .ok_or_else(|| ApiError::internal("no namespaces"))?;
    if st
        .store
        .get(&nsr.key(None, ns))
        .await
        .map_err(ApiError::internal)?
        .is_none()
    {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("namespaces \"{ns}\" not found"),
        )
        .with(ns, nsr));
    }
    Ok(())
}

async fn create(
    st: &ApiState,
    r: &'static Resource,
    ns: Option<&str>,
    body: &Bytes,
    o: WriteOpts<'_>,
) -> Result<Response, ApiError> {
    let (dry, field_validation) = (o.dry, o.field_validation);
    let mut obj = parse_body(body, r)?;
    let meta = obj
        .as_object_mut()
        .and_then(|o| {
            Some(
                o.entry("metadata")
                    .or_insert_with(|| json!({}))
                    .as_object_mut()?
                    .clone(),
            )
        })
        .unwrap_or_default();
    let mut meta = meta;
    let mut name = meta
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    if name.is_empty()
        && let Some(g) = meta.get("generateName").and_then(Value::as_str)
    {
        name = format!("{g}{}", &crate::runtime::random_hex(3)[..5]);
    }
    if name.is_empty() {
        return Err(invalid(
            r,
            "",
            "metadata.name: Required value: name or generateName is required",
        ));
    }
    if !is_dns_subdomain(&name) {
        return Err(invalid(
            r,
            &name,
            &format!(
                "metadata.name: Invalid value: \"{name}\": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
            ),
        ));
    }
    if r.namespaced {
        let body_ns = meta.get("namespace").and_then(Value::as_str).unwrap_or("");
        let ns = ns.unwrap_or("");
        if !body_ns.is_empty() && body_ns != ns {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        meta.insert("namespace".into(), Value::String(ns.to_string()));
    }
    meta.insert("name".into(), Value::String(name.clone()));
    meta.insert("uid".into(), Value::String(uuid()));
    meta.insert("creationTimestamp".into(), Value::String(now()));
    meta.remove("resourceVersion");
    if obj.get("spec").is_some() {
        meta.insert("generation".into(), json!(1));
    }
    if r.kind == "Namespace" {
        obj["spec"] = json!({"finalizers": ["kubernetes"]});
        obj["status"] = json!({"phase": "Active"});
    }
    obj["metadata"] = Value::Object(meta);
    let (obj, warnings) = admit(r, obj, &name, field_validation)?;
    ensure_namespace(st, ns.filter(|_| r.namespaced)).await?;
    let key = r.key(ns, &name);
    if dry {
        if st
            .store
            .get(&key)
            .await
            .map_err(ApiError::internal)?
            .is_some()
        {
            return Err(ApiError::from_store(
                store::Error::AlreadyExists(key),
                r,
                &name,
            ));
        }
        return Ok(warn(json_response(StatusCode::CREATED, &obj), &warnings));
    }
    let mut obj = obj;
    if r.kind == "Service" {
        super::alloc::allocate(st.store.as_ref(), &st.services, &mut obj, None, &key)
            .await
            .map_err(|e| invalid(r, &name, &format!("{}: {}", e.field, e.message)))?;
    }
    let bytes = serde_json::to_vec(&obj).map_err(ApiError::internal)?;
    let kv = match st.store.put(&key, bytes, Precondition::Absent).await {
        Ok(kv) => kv,
        Err(e) => {
            if r.kind == "Service" {
                super::alloc::release(st.store.as_ref(), &obj).await;
            }
            return Err(ApiError::from_store(e, r, &name));
        }
    };
    let resp = json_response(StatusCode::CREATED, &with_rv(obj, kv.mod_revision));
    Ok(warn(resp, &warnings))
}

/// A 422 Invalid with one field cause (`field: message`), as kube-apiserver words it.
fn invalid(r: &Resource, name: &str, cause: &str) -> ApiError {
    let (field, msg) = cause.split_once(": ").unwrap_or(("", cause));
    let reason = if msg.starts_with("Required value") {
        "FieldValueRequired"
    } else {
        "FieldValueInvalid"
    };
    let mut e = ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "Invalid",
        format!("{} \"{name}\" is invalid: {cause}", r.kind),
    );
    e.details = Some(json!({"name": name, "kind": r.kind, "group": r.group,
        "causes": [{"reason": reason, "message": msg, "field": field}]}));
    e
}

async fn update(
    st: &ApiState,
    r: &'static Resource,
    ns: Option<&str>,
    name: &str,
    body: &Bytes,
    o: WriteOpts<'_>,
) -> Result<Response, ApiError> {
    let (dry, field_validation) = (o.dry, o.field_validation);
    let mut obj = parse_body(body, r)?;
    let key = r.key(ns, name);
    let cur = st
        .store
        .get(&key)
        .await
        .map_err(ApiError::internal)?
        .ok_or_else(|| ApiError::not_found(r, name))?;
    let old: Value = serde_json::from_slice(&cur.value).map_err(ApiError::internal)?;
    let body_name = obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("");
    if body_name != name {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({body_name}) does not match the name on the URL ({name})"
        )));
    }
    let pre = match obj
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
    {
        Some(rv) if !rv.is_empty() => Precondition::ModRevision(rv.parse().map_err(|_| {
            invalid(
                r,
                name,
                &format!("metadata.resourceVersion: Invalid value: \"{rv}\": must be a number"),
            )
        })?),
        _ => Precondition::Exists,
    };
    carry_over(&old, &mut obj);
    if super::subresource::has_status(r) {
        obj["status"] = old.get("status").cloned().unwrap_or(Value::Null);
    }
    let (mut obj, warnings) = admit(r, obj, name, field_validation)?;
    if r.kind == "Service" && !dry {
        super::alloc::allocate(st.store.as_ref(), &st.services, &mut obj, Some(&old), &key)
            .await
            .map_err(|e| invalid(r, name, &format!("{}: {}", e.field, e.message)))?;
    }
    if dry {
        if let Precondition::ModRevision(rv) = pre
            && rv != cur.mod_revision
        {
            return Err(ApiError::from_store(
                store::Error::Conflict {
                    key,
                    expected: rv,
                    actual: cur.mod_revision,
                },
                r,
                name,
            ));
        }
        let resp = json_response(StatusCode::OK, &with_rv(obj, cur.mod_revision));
        return Ok(warn(resp, &warnings));
    }
    if let Some(resp) = finish_delete(st, r, &key, name, &obj, pre).await? {
        return Ok(resp);
    }
    let bytes = serde_json::to_vec(&obj).map_err(ApiError::internal)?;
    let kv = st
        .store
        .put(&key, bytes, pre)
        .await
        .map_err(|e| ApiError::from_store(e, r, name))?;
    let resp = json_response(StatusCode::OK, &with_rv(obj, kv.mod_revision));
    Ok(warn(resp, &warnings))
}

/// Keeps immutable metadata of `old` in `new`, moves `generation` when the spec changed, and
/// drops the resourceVersion (the store assigns it).
pub(super) fn carry_over(old: &Value, new: &mut Value) {
    if !new.get("metadata").is_some_and(Value::is_object) {
        new["metadata"] = json!({});
    }
    for f in ["name", "uid", "creationTimestamp", "namespace"] {
        if let Some(v) = old.pointer(&format!("/metadata/{f}")) {
            new["metadata"][f] = v.clone();
        }
    }
    if let Some(g) = old.pointer("/metadata/generation").and_then(Value::as_i64) {
        let changed = old.get("spec") != new.get("spec");
        new["metadata"]["generation"] = json!(if changed { g + 1 } else { g });
    }
    if let Some(m) = new.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("resourceVersion");
    }
}

/// PATCH in the format the Content-Type names, retried on a concurrent write (a patch applies
/// to whatever is current).
async fn patch(
    st: &ApiState,
    r: &'static Resource,
    ns: Option<&str>,
    name: &str,
    headers: &HeaderMap,
    body: &Bytes,
    o: WriteOpts<'_>,
) -> Result<Response, ApiError> {
    let (dry, field_validation) = (o.dry, o.field_validation);
    let ctype = headers
        .get("content-type")
        .and_then(|c| c.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_string();
    let doc: Value = match ctype.as_str() {
        "application/apply-patch+yaml" => serde_saphyr::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))?,
        "application/merge-patch+json"
        | "application/json-patch+json"
        | "application/strategic-merge-patch+json" => serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?,
        other => {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "UnsupportedMediaType",
                format!(
                    "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json (got {other:?})"
                ),
            ));
        }
    };
    let key = r.key(ns, name);
    for _ in 0..8 {
        let cur = st.store.get(&key).await.map_err(ApiError::internal)?;
        let Some(cur) = cur else {
            if ctype == "application/apply-patch+yaml" {
                // Server-side apply of a missing object creates it.
                let bytes = Bytes::from(serde_json::to_vec(&doc).map_err(ApiError::internal)?);
                return create(st, r, ns, &bytes, o).await;
            }
            return Err(ApiError::not_found(r, name));
        };
        let old: Value = serde_json::from_slice(&cur.value).map_err(ApiError::internal)?;
        let mut new = with_rv(old.clone(), cur.mod_revision);
        let applied = match ctype.as_str() {
            "application/json-patch+json" => super::patch::json_patch(&mut new, &doc),
            "application/strategic-merge-patch+json" => {
                super::patch::strategic_merge(&mut new, &doc)
            }
            _ => {
                super::patch::merge_patch(&mut new, &doc);
                Ok(())
            }
        };
        applied.map_err(|e| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Invalid",
                format!("the patch could not be applied: {e}"),
            )
        })?;
        // A patch may carry a resourceVersion precondition of its own.
        let pre = match doc
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
        {
            Some(rv) if rv != cur.mod_revision.to_string() => {
                return Err(ApiError::from_store(
                    store::Error::Conflict {
                        key,
                        expected: 0,
                        actual: cur.mod_revision,
                    },
                    r,
                    name,
                ));
            }
            _ => Precondition::ModRevision(cur.mod_revision),
        };
        if new.get("kind") != old.get("kind") || new.get("apiVersion") != old.get("apiVersion") {
            return Err(ApiError::bad_request(
                "a patch may not change kind or apiVersion",
            ));
        }
        carry_over(&old, &mut new);
        if super::subresource::has_status(r) {
            new["status"] = old.get("status").cloned().unwrap_or(Value::Null);
        }
        let (mut new, warnings) = admit(r, new, name, field_validation)?;
        if r.kind == "Service" && !dry {
            super::alloc::allocate(st.store.as_ref(), &st.services, &mut new, Some(&old), &key)
                .await
                .map_err(|e| invalid(r, name, &format!("{}: {}", e.field, e.message)))?;
        }
        if dry {
            let resp = json_response(StatusCode::OK, &with_rv(new, cur.mod_revision));
            return Ok(warn(resp, &warnings));
        }
        if let Some(resp) = finish_delete(st, r, &key, name, &new, pre).await? {
            return Ok(resp);
        }
        let bytes = serde_json::to_vec(&new).map_err(ApiError::internal)?;
        match st.store.put(&key, bytes, pre).await {
            Ok(kv) => {
                let resp = json_response(StatusCode::OK, &with_rv(new, kv.mod_revision));
                return Ok(warn(resp, &warnings));
            }
            Err(store::Error::Conflict { .. }) => continue,
            Err(e) => return Err(ApiError::from_store(e, r, name)),
        }
    }
    Err(ApiError::from_store(
        store::Error::Conflict {
            key,
            expected: 0,
            actual: 0,
        },
        r,
        name,
    ))
}

fn uuid() -> String {
    let h = crate::runtime::random_hex(16);
    format!(
        "{}-{}-4{}-a{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

/// A parsed label selector (equality- and set-based).
#[derive(Debug, PartialEq)]
pub enum Requirement {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// Parses `a=b,c!=d,e in (x,y),f notin (z),g,!h`.
pub fn parse_selector(s: &str) -> Result<Vec<Requirement>, ApiError> {
    let mut out = vec![];
    let mut parts = vec![];
    let mut depth = 0;
    let mut cur = String::new();
    for ch in s.chars() {
        match ch {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(ch);
    }
    parts.push(cur);
    let bad = |p: &str| ApiError::bad_request(format!("unable to parse requirement: {p:?}"));
    for p in parts.iter().map(|p| p.trim()).filter(|p| !p.is_empty()) {
        let set = |rest: &str| -> Option<Vec<String>> {
            let inner = rest.trim().strip_prefix('(')?.strip_suffix(')')?;
            Some(
                inner
                    .split(',')
                    .map(|v| v.trim().to_string())
                    .filter(|v| !v.is_empty())
                    .collect(),
            )
        };
        if let Some((k, v)) = p.split_once("!=") {
            out.push(Requirement::NotEq(k.trim().into(), v.trim().into()));
        } else if let Some((k, v)) = p.split_once("==").or_else(|| p.split_once('=')) {
            out.push(Requirement::Eq(k.trim().into(), v.trim().into()));
        } else if let Some((k, rest)) = p.split_once(" notin ") {
            out.push(Requirement::NotIn(
                k.trim().into(),
                set(rest).ok_or_else(|| bad(p))?,
            ));
        } else if let Some((k, rest)) = p.split_once(" in ") {
            out.push(Requirement::In(
                k.trim().into(),
                set(rest).ok_or_else(|| bad(p))?,
            ));
        } else if let Some(k) = p.strip_prefix('!') {
            out.push(Requirement::NotExists(k.trim().into()));
        } else if p
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
        {
            out.push(Requirement::Exists(p.into()));
        } else {
            return Err(bad(p));
        }
    }
    Ok(out)
}

/// Fields a field selector may name, per kind (kube-apiserver's field label conversions).
fn field_supported(kind: &str, field: &str) -> bool {
    if field == "metadata.name" || field == "metadata.namespace" {
        return true;
    }
    let extra: &[&str] = match kind {
        "Pod" => &[
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "spec.hostNetwork",
            "status.phase",
            "status.podIP",
            "status.nominatedNodeName",
        ],
        "Event" => &[
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
        "Secret" => &["type"],
        "Node" => &["spec.unschedulable"],
        "Namespace" => &["status.phase"],
        "ReplicaSet" => &["status.replicas"],
        _ => &[],
    };
    extra.contains(&field)
}

/// A label selector and a field selector together.
#[derive(Debug, Default)]
pub struct Filter {
    labels: Vec<Requirement>,
    /// (dotted path, equal?, value)
    fields: Vec<(String, bool, String)>,
}

impl Filter {
    pub fn parse(
        r: &Resource,
        labels: Option<&str>,
        fields: Option<&str>,
    ) -> Result<Filter, ApiError> {
        let mut f = Filter {
            labels: parse_selector(labels.unwrap_or(""))?,
            fields: vec![],
        };
        for part in fields
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
        {
            let (path, eq, value) = if let Some((a, b)) = part.split_once("!=") {
                (a, false, b)
            } else if let Some((a, b)) = part.split_once("==").or_else(|| part.split_once('=')) {
                (a, true, b)
            } else {
                return Err(ApiError::bad_request(format!(
                    "invalid field selector: {part:?}"
                )));
            };
            let path = path.trim();
            if !field_supported(r.kind, path) {
                return Err(ApiError::bad_request(format!(
                    "field label not supported: {path}"
                )));
            }
            f.fields
                .push((path.to_string(), eq, value.trim().to_string()));
        }
        Ok(f)
    }

    /// Whether `obj` passes both selectors.
    pub fn accepts(&self, obj: &Value) -> bool {
        matches(obj, &self.labels)
            && self.fields.iter().all(|(path, eq, want)| {
                let ptr = format!("/{}", path.replace('.', "/"));
                let got = match obj.pointer(&ptr) {
                    Some(Value::String(s)) => s.clone(),
                    Some(Value::Null) | None => String::new(),
                    Some(v) => v.to_string(),
                };
                (got == *want) == *eq
            })
    }
}

/// Whether an object's labels satisfy every requirement.
pub fn matches(obj: &Value, reqs: &[Requirement]) -> bool {
    let labels = obj.pointer("/metadata/labels").and_then(Value::as_object);
    let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
    reqs.iter().all(|r| match r {
        Requirement::Eq(k, v) => get(k) == Some(v.as_str()),
        Requirement::NotEq(k, v) => get(k) != Some(v.as_str()),
        Requirement::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
        Requirement::NotIn(k, vs) => get(k).is_none_or(|x| !vs.iter().any(|v| v == x)),
        Requirement::Exists(k) => get(k).is_some(),
        Requirement::NotExists(k) => get(k).is_none(),
    })
}

fn scope_prefix(r: &Resource, ns: Option<&str>) -> String {
    match ns {
        Some(ns) if r.namespaced => format!("{}{ns}/", r.prefix()),
        _ => r.prefix(),
    }
}

async fn list(
    st: &ApiState,
    r: &'static Resource,
    ns: Option<&str>,
    q: &Params,
    as_table: bool,
) -> Result<Response, ApiError> {
    let filter = Filter::parse(r, q.label_selector.as_deref(), q.field_selector.as_deref())?;
    let prefix = scope_prefix(r, ns);
    let after = match q.continue_.as_deref() {
        Some(c) if !c.is_empty() => {
            use base64::Engine;
            let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(c)
                .map_err(|_| ApiError::bad_request("invalid continue token"))?;
            Some(
                String::from_utf8(raw)
                    .map_err(|_| ApiError::bad_request("invalid continue token"))?,
            )
        }
        _ => None,
    };
    let limit = q.limit.unwrap_or(0);
    let mut items = vec![];
    let mut last_key = after.clone();
    let mut revision;
    let mut more;
    // Filtering by labels happens after the range read; keep reading until the page is full.
    loop {
        let page = st
            .store
            .list(&prefix, last_key.as_deref(), limit)
            .await
            .map_err(ApiError::internal)?;
        revision = page.revision;
        more = page.more;
        last_key = page.items.last().map(|kv| kv.key.clone()).or(last_key);
        for kv in &page.items {
            let obj = decode(kv)?;
            if filter.accepts(&obj) {
                items.push(obj);
            }
        }
        if !more || limit == 0 || items.len() >= limit {
            break;
        }
    }
    let cont = if more {
        use base64::Engine;
        last_key.map(|k| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(k))
    } else {
        None
    };
    let mut metadata = json!({"resourceVersion": revision.to_string()});
    if let Some(c) = &cont {
        metadata["continue"] = Value::String(c.clone());
    }
    if as_table {
        let mut t = table::table(r, &items, None);
        t["metadata"] = metadata;
        return Ok(json_response(StatusCode::OK, &t));
    }
    Ok(json_response(
        StatusCode::OK,
        &json!({"kind": format!("{}List", r.kind), "apiVersion": r.api_version(), "metadata": metadata, "items": items}),
    ))
}

async fn watch(
    st: Arc<ApiState>,
    r: &'static Resource,
    ns: Option<String>,
    q: Params,
    as_table: bool,
) -> Result<Response, ApiError> {
    let filter = Filter::parse(r, q.label_selector.as_deref(), q.field_selector.as_deref())?;
    let bookmarks = q.allow_watch_bookmarks.unwrap_or(false);
    let prefix = scope_prefix(r, ns.as_deref());
    let rv = q.resource_version.as_deref().unwrap_or("");
    // No version (or "0"): the current state as ADDED events, then changes.
    let (initial, from) = if rv.is_empty() || rv == "0" {
        let page = st
            .store
            .list(&prefix, None, 0)
            .await
            .map_err(ApiError::internal)?;
        let objs: Result<Vec<Value>, ApiError> = page.items.iter().map(decode).collect();
        (objs?, page.revision)
    } else {
        let from: i64 = rv
            .parse()
            .map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {rv:?}")))?;
        (vec![], from)
    };
    let mut rx = st
        .store
        .watch(&prefix, from)
        .await
        .map_err(|e| ApiError::from_store(e, r, ""))?;
    let timeout = Duration::from_secs(q.timeout_seconds.unwrap_or(1800).clamp(1, 3600));
    let (tx, body_rx) = tokio::sync::mpsc::channel::<Result<String, std::io::Error>>(64);
    let line = move |typ: &str, obj: Value| -> String {
        let obj = if as_table {
            table::table(r, &[obj], Some(typ))
        } else {
            obj
        };
        format!("{}\n", json!({"type": typ, "object": obj}))
    };
    tokio::spawn(async move {
        for obj in initial {
            if filter.accepts(&obj) && tx.send(Ok(line("ADDED", obj))).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let mut progress = from;
        let mut tick = tokio::time::interval(BOOKMARK_EVERY);
        tick.tick().await;
        loop {
            let ev = tokio::select! {
                ev = rx.recv() => ev,
                _ = tokio::time::sleep_until(deadline) => return,
                _ = tick.tick(), if bookmarks => {
                    // Everything up to `progress` has been delivered to this watcher.
                    let b = json!({"type": "BOOKMARK", "object": {"kind": r.kind, "apiVersion": r.api_version(),
                        "metadata": {"resourceVersion": progress.to_string()}}});
                    if tx.send(Ok(format!("{b}\n"))).await.is_err() {
                        return;
                    }
                    continue;
                }
            };
            let Some(ev) = ev else { return };
            progress = ev.kv.mod_revision;
            let typ = match ev.kind {
                EventKind::Put if ev.prev.is_none() => "ADDED",
                EventKind::Put => "MODIFIED",
                EventKind::Delete => "DELETED",
            };
            let Ok(v) = serde_json::from_slice::<Value>(&ev.kv.value) else {
                continue;
            };
            let obj = with_rv(v, ev.kv.mod_revision);
            // A change that moves an object out of the selector is a deletion for this watcher.
            let now_in = filter.accepts(&obj);
            let was_in = ev
                .prev
                .as_ref()
                .and_then(|p| serde_json::from_slice::<Value>(&p.value).ok())
                .is_some_and(|p| filter.accepts(&p));
            let typ = match (typ, was_in, now_in) {
                ("MODIFIED", false, true) => "ADDED",
                ("MODIFIED", true, false) => "DELETED",
                (t, _, true) => t,
                ("DELETED", true, _) => "DELETED",
                _ => continue,
            };
            if tx.send(Ok(line(typ, obj))).await.is_err() {
                return;
            }
        }
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(body_rx);
    Ok((
        StatusCode::OK,
        [("content-type", "application/json")],
        Body::from_stream(stream),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_name_resource_namespace_and_name() {
        let t = parse_path("/api/v1/namespaces/default/pods/web").unwrap();
        assert_eq!(
            (t.resource.plural, t.namespace.as_deref(), t.name.as_deref()),
            ("pods", Some("default"), Some("web"))
        );
        let t = parse_path("/api/v1/namespaces/kube-system").unwrap();
        assert_eq!(
            (t.resource.plural, t.name.as_deref()),
            ("namespaces", Some("kube-system"))
        );
        let t = parse_path("/apis/apps/v1/deployments").unwrap();
        assert_eq!((t.resource.plural, t.namespace), ("deployments", None));
        assert!(
            parse_path("/api/v1/namespaces/default/nodes").is_err(),
            "nodes are cluster-scoped"
        );
        assert!(parse_path("/api/v1/widgets").is_err());
    }

    #[test]
    fn field_selectors_match_supported_fields_and_reject_others() {
        let pods = registry::find("", "v1", "pods").unwrap();
        let p = json!({"metadata": {"name": "a", "namespace": "ns"}, "spec": {"nodeName": "n1"}, "status": {"phase": "Running"}});
        let ok = |f: &str| Filter::parse(pods, None, Some(f)).unwrap().accepts(&p);
        assert!(ok("spec.nodeName=n1,status.phase!=Pending"));
        assert!(ok("metadata.name==a"));
        assert!(!ok("spec.nodeName=n2"));
        assert!(ok("spec.nodeName!=n2"));
        let e = Filter::parse(pods, None, Some("spec.bogus=x")).unwrap_err();
        assert_eq!(e.message, "field label not supported: spec.bogus");
        let events = registry::find("", "v1", "events").unwrap();
        assert!(
            Filter::parse(
                events,
                None,
                Some("involvedObject.name=a,involvedObject.uid=u")
            )
            .is_ok()
        );
    }

    #[test]
    fn label_selectors_support_equality_and_sets() {
        let obj = json!({"metadata": {"labels": {"app": "web", "tier": "front"}}});
        let ok = |s: &str| matches(&obj, &parse_selector(s).unwrap());
        assert!(ok("app=web"));
        assert!(ok("app==web,tier!=back"));
        assert!(ok("tier in (front, mid),!missing,app"));
        assert!(!ok("app notin (web)"));
        assert!(!ok("missing"));
        assert!(ok(""));
        assert!(parse_selector("a in b").is_err());
    }
}
