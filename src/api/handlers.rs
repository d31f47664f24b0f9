//! The REST entry point: parses the request path into (resource, namespace, name,
//! subresource), serves reads (get, list, watch; objects, lists, Tables) and hands writes to
//! `write`. One generic handler serves every kind in the registry; errors are Status objects.

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
    selector::Filter,
    table,
    write::{WriteOpts, create, delete, patch, update},
};
use crate::store::{self, EventKind};

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
    pub(super) fn with(mut self, name: &str, r: &Resource) -> Self {
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

pub(super) fn now() -> String {
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

/// The stored object at `key`, or the resource's NotFound.
pub(super) async fn get_existing(
    st: &ApiState,
    r: &Resource,
    key: &str,
    name: &str,
) -> Result<store::KeyValue, ApiError> {
    st.store
        .get(key)
        .await
        .map_err(ApiError::internal)?
        .ok_or_else(|| ApiError::not_found(r, name))
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
/// Largest request body accepted (kube-apiserver's 3 MiB).
const MAX_BODY: usize = 3 * 1024 * 1024;
/// How much of a larger body is still read (and dropped) before the 413 goes out, so that the
/// client is not reset while it is still sending and sees the answer (Go's lingering close).
const DRAIN_BODY: usize = 64 * 1024 * 1024;

/// The request body, at most `MAX_BODY`; a larger one is read on (up to `DRAIN_BODY`, for
/// 10 s at most) and answered 413.
async fn read_body(body: axum::body::Body) -> Result<Bytes, ApiError> {
    use http_body_util::BodyExt;
    let mut body = body;
    let mut buf = bytes::BytesMut::new();
    let mut seen = 0usize;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(Some(Ok(f))) => f,
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                return Err(ApiError::bad_request(format!(
                    "reading the request body: {e}"
                )));
            }
            Err(_) => break,
        };
        if let Ok(data) = frame.into_data() {
            seen += data.len();
            if seen <= MAX_BODY {
                buf.extend_from_slice(&data);
            } else if seen > DRAIN_BODY {
                break;
            }
        }
    }
    if seen > MAX_BODY {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "RequestEntityTooLarge",
            "the request body is larger than 3 MiB",
        ));
    }
    Ok(buf.freeze())
}

/// The object a write carries. `resource` bounded the body and turned protobuf into JSON
/// before any handler sees it.
pub(super) fn parse_body(body: &Bytes, r: &Resource) -> Result<Value, ApiError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!(
            "the body of the request could not be decoded as JSON: {e}"
        ))
    })?;
    let mut v = v;
    let Some(o) = v.as_object_mut() else {
        return Err(ApiError::bad_request(
            "the body of the request must be a JSON object",
        ));
    };
    // kube-apiserver fills an empty kind and apiVersion from the URL (clients such as the
    // Python one send none) and refuses only values that disagree.
    for (field, want) in [
        ("kind", r.kind.to_string()),
        ("apiVersion", r.api_version()),
    ] {
        if o.get(field)
            .is_none_or(|x| x.is_null() || x.as_str() == Some(""))
        {
            o.insert(field.into(), Value::String(want));
        }
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

impl Params {
    /// Whether the request asks for a watch (`watch=true` or `watch=1`).
    fn is_watch(&self) -> bool {
        self.watch
            .as_deref()
            .is_some_and(|w| w == "true" || w == "1")
    }
}

/// The generic handler for every resource path.
pub async fn resource(
    State(st): State<Arc<ApiState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    axum::Extension(id): axum::Extension<super::authz::Identity>,
    Query(q): Query<Params>,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    let body = read_body(body).await?;
    let segs: Vec<&str> = uri.path().trim_matches('/').split('/').collect();
    match segs.as_slice() {
        ["api", v] if method == Method::GET => return Ok(super::discovery("", v)),
        ["apis", g, v] if method == Method::GET => return Ok(super::discovery(g, v)),
        _ => {}
    }
    let t = parse_path(uri.path())?;
    // A protobuf body (client-go's default for typed clients: objects, DeleteOptions,
    // Eviction, Scale, TokenRequest, ...) becomes the JSON every handler below reads.
    let body = if body.starts_with(b"k8s\0") {
        let v = super::protobuf::decode_body(&body).map_err(|e| {
            ApiError::bad_request(format!(
                "the body of the request could not be decoded as protobuf: {e}"
            ))
        })?;
        Bytes::from(serde_json::to_vec(&v).map_err(ApiError::internal)?)
    } else {
        body
    };
    super::authz::authorize(&st, &id, &method, &t, &body, q.is_watch()).await?;
    if let Some(kind) = t.resource.strategy.review {
        // Never stored: only a create is served, and it is answered.
        if method != Method::POST || t.name.is_some() || t.subresource.is_some() {
            return Err(ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                format!(
                    "the server does not allow this method on the requested resource ({})",
                    t.resource.qualified()
                ),
            ));
        }
        return super::review::answer(&st, &id, kind, t.namespace.as_deref(), &body).await;
    }
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
            uri.query(),
        )
        .await;
    }
    let r = t.resource;
    let dry = q.dry_run.as_deref() == Some("All");
    let subject = id.rbac_subject();
    let wo = WriteOpts {
        dry,
        field_validation: q.field_validation.as_deref(),
        identity: &id,
        caller: subject.as_ref(),
    };
    match (method, t.name.as_deref()) {
        (Method::GET, None) if q.is_watch() => {
            watch(st, r, t.namespace, q, wants_table(&headers)).await
        }
        (Method::GET, None) => {
            list(&st, r, t.namespace.as_deref(), &q, wants_table(&headers)).await
        }
        (Method::GET, Some(name)) => {
            let kv = get_existing(&st, r, &r.key(t.namespace.as_deref(), name), name).await?;
            let obj = decode(&kv)?;
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
        (Method::DELETE, None) => {
            delete_collection(&st, r, t.namespace.as_deref(), &q, &body).await
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

/// `DELETE` on a collection (`deletecollection`): every object of the namespace (or of the
/// cluster, for cluster-scoped kinds) that the label and field selectors select, deleted with
/// the request's DeleteOptions as one `DELETE` each; the answer lists what was deleted, as
/// kube-apiserver's does.
async fn delete_collection(
    st: &ApiState,
    r: &'static Resource,
    ns: Option<&str>,
    q: &Params,
    body: &Bytes,
) -> Result<Response, ApiError> {
    if r.namespaced && ns.is_none() {
        return Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        ));
    }
    if !r.strategy.delete_collection {
        return Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        ));
    }
    let filter = Filter::parse(r, q.label_selector.as_deref(), q.field_selector.as_deref())?;
    let page = st
        .cache
        .list(&r.prefix(), &scope_prefix(r, ns), None, 0)
        .await
        .map_err(ApiError::internal)?;
    let dry = q.dry_run.as_deref() == Some("All");
    let mut deleted = vec![];
    for kv in &page.items {
        let obj = decode(kv)?;
        if !filter.accepts(&obj) {
            continue;
        }
        let name = obj
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let obj_ns = obj.pointer("/metadata/namespace").and_then(Value::as_str);
        match delete(st, r, obj_ns, &name, body, q.grace_period_seconds, dry).await {
            Ok(_) => deleted.push(obj),
            // Gone meanwhile: nothing to do.
            Err(e) if e.code == StatusCode::NOT_FOUND => {}
            Err(e) => return Err(e),
        }
    }
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({"kind": format!("{}List", r.kind), "apiVersion": r.api_version(),
                            "metadata": {"resourceVersion": page.revision.to_string()}, "items": deleted}),
    ))
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
    // Without a Table, the list is assembled from the stored bytes (no object is parsed unless
    // a selector needs it), so listing 10,000 pods costs about their size in memory.
    let mut raw: Vec<u8> = vec![];
    let mut count = 0usize;
    let mut last_key = after.clone();
    let mut revision;
    let mut more;
    // Filtering by labels happens after the range read; keep reading until the page is full,
    // and never past it: the continue token names the last object examined.
    'read: loop {
        let page = st
            .cache
            .list(&r.prefix(), &prefix, last_key.as_deref(), limit)
            .await
            .map_err(ApiError::internal)?;
        revision = page.revision;
        more = page.more;
        let n = page.items.len();
        for (i, kv) in page.items.iter().enumerate() {
            last_key = Some(kv.key.clone());
            let accepted = if as_table {
                let obj = decode(kv)?;
                let ok = filter.accepts(&obj);
                if ok {
                    items.push(obj);
                }
                ok
            } else {
                let ok = filter.is_empty() || {
                    let obj: Value =
                        serde_json::from_slice(&kv.value).map_err(ApiError::internal)?;
                    filter.accepts(&obj)
                };
                if ok {
                    if count > 0 {
                        raw.push(b',');
                    }
                    splice_rv(&kv.value, kv.mod_revision, &mut raw)?;
                }
                ok
            };
            if accepted {
                count += 1;
                if limit > 0 && count >= limit {
                    more = more || i + 1 < n;
                    break 'read;
                }
            }
        }
        if !more || limit == 0 {
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
    let head = json!({"kind": format!("{}List", r.kind), "apiVersion": r.api_version(), "metadata": metadata});
    let mut body = head.to_string().into_bytes();
    body.pop(); // the closing brace
    body.extend_from_slice(b",\"items\":[");
    body.extend_from_slice(&raw);
    body.extend_from_slice(b"]}");
    Ok((StatusCode::OK, [("content-type", "application/json")], body).into_response())
}

/// Appends a stored object with `metadata.resourceVersion` set, without parsing it: the
/// object's own `"metadata":{` is found by a scan that follows nesting and strings (a field
/// before it may hold objects with a `metadata` of their own, as a ControllerRevision's `data`
/// does).
fn splice_rv(stored: &[u8], rev: i64, out: &mut Vec<u8>) -> Result<(), ApiError> {
    const KEY: &[u8] = b"\"metadata\":{";
    let Some(at) = top_level_key(stored, KEY) else {
        // No metadata object: fall back to parsing.
        let v: Value = serde_json::from_slice(stored).map_err(ApiError::internal)?;
        out.extend_from_slice(with_rv(v, rev).to_string().as_bytes());
        return Ok(());
    };
    let at = at + KEY.len();
    out.extend_from_slice(&stored[..at]);
    out.extend_from_slice(format!("\"resourceVersion\":\"{rev}\"").as_bytes());
    if stored.get(at) != Some(&b'}') {
        out.push(b',');
    }
    out.extend_from_slice(&stored[at..]);
    Ok(())
}

/// Where `key` (a quoted key, its colon and what follows) starts as a key of the outermost
/// object of compact JSON `json`.
fn top_level_key(json: &[u8], key: &[u8]) -> Option<usize> {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for (i, &b) in json.iter().enumerate() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' if depth == 1 && json[i..].starts_with(key) => return Some(i),
            b'"' => in_string = true,
            b'{' | b'[' => depth += 1,
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    None
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
            .cache
            .list(&r.prefix(), &prefix, None, 0)
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
    let mut rx = match st.cache.watch(&r.prefix(), &prefix, from).await {
        Ok(rx) => rx,
        // As kube-apiserver does: the watch starts (200), and its one event is a 410 Status,
        // which tells clients (kubectl, kube-rs' watcher) to list again.
        Err(e @ store::Error::Compacted { .. }) => {
            let status = ApiError::from_store(e, r, "").status();
            let line = format!("{}\n", json!({"type": "ERROR", "object": status}));
            return Ok((
                StatusCode::OK,
                [("content-type", "application/json")],
                axum::Extension(super::negotiate::WatchStream),
                line,
            )
                .into_response());
        }
        Err(e) => return Err(ApiError::from_store(e, r, "")),
    };
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
        axum::Extension(super::negotiate::WatchStream),
        Body::from_stream(stream),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_versions_are_spliced_into_the_objects_own_metadata() {
        for obj in [
            json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
                   "spec": {"template": {"metadata": {"labels": {"a": "b"}}}}}),
            json!({"apiVersion": "v1", "kind": "ConfigMap", "data": {"metadata": "{\"metadata\":{"}, "metadata": {}}),
            json!({"kind": "Event", "involvedObject": {"name": "x"}, "metadata": {"name": "e"}}),
            // A ControllerRevision: its data (before its metadata) holds a template's metadata.
            json!({"apiVersion": "apps/v1", "kind": "ControllerRevision",
                   "data": {"spec": {"template": {"metadata": {"labels": {"a": "b"}}, "x": "\\\"}"}}},
                   "metadata": {"name": "web-1"}, "revision": 1}),
        ] {
            let stored = serde_json::to_vec(&obj).unwrap();
            let mut out = vec![];
            splice_rv(&stored, 42, &mut out).unwrap();
            let got: Value = serde_json::from_slice(&out).unwrap();
            assert_eq!(got, with_rv(obj.clone(), 42));
        }
        let mut out = vec![];
        splice_rv(br#"{"kind":"X"}"#, 7, &mut out).unwrap();
        assert_eq!(out, br#"{"kind":"X"}"#);
    }

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
}
