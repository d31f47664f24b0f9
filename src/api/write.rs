//! The write paths of the REST API: create, replace, patch and delete, with admission
//! (typed decoding, defaulting, validation), Service allocation and finalizers.

use axum::{
    body::Bytes,
    http::{HeaderMap, StatusCode},
    response::Response,
};
use serde_json::{Value, json};

use super::handlers::*;
use super::strategy::Hook;
use super::{
    ApiState,
    registry::{self, Resource},
};
use crate::store::{self, Precondition};

pub(super) fn is_dns_subdomain(s: &str) -> bool {
    crate::kinds::validate::is_dns1123_subdomain(s)
}

/// The parts of DeleteOptions keelson honours.
#[derive(serde::Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub(super) struct DeleteOptions {
    grace_period_seconds: Option<i64>,
    preconditions: Option<DeletePreconditions>,
    dry_run: Option<Vec<String>>,
    propagation_policy: Option<String>,
    orphan_dependents: Option<bool>,
}

#[derive(serde::Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub(super) struct DeletePreconditions {
    uid: Option<String>,
    resource_version: Option<String>,
}

/// DELETE: preconditions, then finalizers and pod grace turn it into setting
/// `deletionTimestamp` (the object stays until its finalizers are gone / its node confirms);
/// otherwise the object goes at once. A namespace turns `Terminating` until the namespace
/// controller has removed its contents and its `kubernetes` finalizer.
pub(super) async fn delete(
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
    let kv = get_existing(st, r, &key, name).await?;
    let mut obj = decode(&kv)?;
    check_preconditions(r, name, opts.preconditions.as_ref(), &obj, kv.mod_revision)?;
    add_policy_finalizer(r, &opts, &mut obj)?;
    let has_finalizers = obj
        .pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .is_some_and(|f| !f.is_empty());
    // Pods on a node stop gracefully: the kubelet finishes the delete.
    let grace = opts.grace_period_seconds.or(grace_param);
    let pod_grace = (r.strategy.delete_grace)(&obj, grace);
    if has_finalizers || pod_grace.is_some() {
        if r.strategy.has(Hook::NamespaceContents) {
            obj["status"]["phase"] = json!("Terminating");
        }
        return mark_deleting(
            st,
            r,
            &key,
            name,
            obj,
            kv.mod_revision,
            pod_grace.unwrap_or(0),
            dry,
        )
        .await;
    }
    if dry {
        return Ok(json_response(StatusCode::OK, &obj));
    }
    let gone = st
        .store
        .delete(&key, Precondition::ModRevision(kv.mod_revision))
        .await
        .map_err(|e| ApiError::from_store(e, r, name))?;
    if r.strategy.has(Hook::NamespaceContents) {
        delete_namespace_contents(st, name).await;
    }
    if r.strategy.has(Hook::ServiceAddresses) {
        super::alloc::release(st.store.as_ref(), &obj).await;
    }
    Ok(json_response(StatusCode::OK, &decode(&gone)?))
}

/// DeleteOptions' preconditions: the object's UID and resourceVersion.
fn check_preconditions(
    r: &'static Resource,
    name: &str,
    p: Option<&DeletePreconditions>,
    obj: &Value,
    mod_revision: i64,
) -> Result<(), ApiError> {
    let Some(p) = p else {
        return Ok(());
    };
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
        .filter(|w| *w != mod_revision.to_string())
    {
        return Err(conflict(format!(
            "Precondition failed: ResourceVersion in precondition: {want}, ResourceVersion in object meta: {mod_revision}"
        )));
    }
    Ok(())
}

/// Foreground and Orphan deletion: the garbage collector finishes them through a finalizer
/// (a namespace's contents go with it whatever the policy).
fn add_policy_finalizer(
    r: &'static Resource,
    opts: &DeleteOptions,
    obj: &mut Value,
) -> Result<(), ApiError> {
    let policy_finalizer = match (opts.propagation_policy.as_deref(), opts.orphan_dependents) {
        (Some("Foreground"), _) => Some("foregroundDeletion"),
        (Some("Orphan"), _) | (None, Some(true)) => Some("orphan"),
        (Some("Background") | None, _) => None,
        (Some(other), _) => {
            return Err(ApiError::bad_request(format!(
                "DeleteOptions.propagationPolicy: Unsupported value: \"{other}\": supported values: \"Foreground\", \"Background\", \"Orphan\""
            )));
        }
    };
    if let Some(f) = policy_finalizer.filter(|_| !r.strategy.has(Hook::NamespaceContents)) {
        let list = obj["metadata"]
            .as_object_mut()
            .map(|m| m.entry("finalizers").or_insert_with(|| json!([])));
        if let Some(Value::Array(a)) = list
            && !a.iter().any(|x| x == f)
        {
            a.push(json!(f));
        }
    }
    Ok(())
}

/// A graceful delete: sets deletionTimestamp and the grace period (when not set, or
/// shortened); finalizers or the pod's node finish the deletion.
#[allow(clippy::too_many_arguments)]
async fn mark_deleting(
    st: &ApiState,
    r: &'static Resource,
    key: &str,
    name: &str,
    obj: Value,
    mod_revision: i64,
    g: i64,
    dry: bool,
) -> Result<Response, ApiError> {
    let mut marked = obj.clone();
    let already = obj.pointer("/metadata/deletionTimestamp").is_some();
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
        .put(key, bytes, Precondition::ModRevision(mod_revision))
        .await
        .map_err(|e| ApiError::from_store(e, r, name))?;
    Ok(json_response(
        StatusCode::OK,
        &with_rv(stored, kv.mod_revision),
    ))
}

/// An update of an object being deleted that leaves no finalizers completes the deletion.
pub(super) async fn finish_delete(
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
    if !deleting || finalizers || (r.strategy.confirmed_delete)(obj) {
        return Ok(None);
    }
    let gone = st
        .store
        .delete(key, pre)
        .await
        .map_err(|e| ApiError::from_store(e, r, name))?;
    Ok(Some(json_response(StatusCode::OK, &decode(&gone)?)))
}

/// Removes every object of a namespace deleted at once (one whose `spec.finalizers` someone
/// emptied; others wait for the namespace controller).
pub(super) async fn delete_namespace_contents(st: &ApiState, ns: &str) {
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
pub(super) struct WriteOpts<'a> {
    /// `dryRun=All`: validate and answer, store nothing.
    pub(super) dry: bool,
    /// `fieldValidation`: Strict, Warn (default) or Ignore.
    pub(super) field_validation: Option<&'a str>,
    /// The user making the request, when RBAC governs it: RBAC objects it writes go through
    /// the escalation check.
    pub(super) caller: Option<&'a super::authz::UserInfo>,
    /// Who makes the request (CertificateSigningRequests record it).
    pub(super) identity: &'a super::authz::Identity,
}

/// Decodes, defaults and validates an object about to be stored (kube-apiserver's admission
/// chain for the parts keelson has): returns the canonical object and warnings.
pub(super) fn admit(
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
    (r.strategy.defaults)(&mut obj);
    let errs = (r.strategy.validate)(&obj);
    if !errs.is_empty() {
        return Err(invalid_all(r, name, &errs));
    }
    Ok((obj, warnings))
}

/// A 422 Invalid listing every `field: message` error, as kube-apiserver words it.
fn invalid_all(r: &Resource, name: &str, errs: &[String]) -> ApiError {
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
    e
}

/// Adds `Warning` headers (kubectl prints them as `Warning: ...`).
pub(super) fn warn(mut resp: Response, warnings: &[String]) -> Response {
    for w in warnings {
        let v = format!("299 - {}", serde_json::to_string(w).unwrap_or_default());
        if let Ok(h) = axum::http::HeaderValue::from_str(&v) {
            resp.headers_mut().append("warning", h);
        }
    }
    resp
}

/// kube-apiserver's NamespaceLifecycle admission for a create of `r` `name` in `ns`: the
/// namespace must exist and not be terminating.
pub(super) async fn ensure_namespace(
    st: &ApiState,
    ns: Option<&str>,
    r: &Resource,
    name: &str,
) -> Result<(), ApiError> {
    let Some(ns) = ns else { return Ok(()) };
    let nsr = registry::find("", "v1", "namespaces")
        .ok_or_else(|| ApiError::internal("no namespaces"))?;
    let Some(kv) = st
        .store
        .get(&nsr.key(None, ns))
        .await
        .map_err(ApiError::internal)?
    else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("namespaces \"{ns}\" not found"),
        )
        .with(ns, nsr));
    };
    let namespace = decode(&kv)?;
    if namespace.pointer("/metadata/deletionTimestamp").is_some() {
        let mut e = ApiError::new(
            StatusCode::FORBIDDEN,
            "Forbidden",
            format!(
                "{} \"{name}\" is forbidden: unable to create new content in namespace {ns} because it is being terminated",
                r.qualified()
            ),
        );
        e.details = Some(json!({"name": name, "kind": r.plural, "group": r.group,
            "causes": [{"reason": "NamespaceTerminating", "message": format!("namespace {ns} is being terminated"),
                        "field": "metadata.namespace"}]}));
        return Err(e);
    }
    Ok(())
}

pub(super) async fn create(
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
    obj["metadata"] = Value::Object(meta);
    let (mut obj, warnings) = admit(r, obj, &name, field_validation)?;
    super::rbac::check_escalation(st, o.caller, r.kind, ns, &obj).await?;
    if r.strategy.has(Hook::CertificateRequest) {
        super::csr::on_create(st, o.identity, &mut obj).await?;
    }
    if r.strategy.has(Hook::ServiceAccountPullSecrets) {
        service_account_pull_secrets(st, ns.unwrap_or("default"), &mut obj).await;
    }
    if r.strategy.has(Hook::DefaultStorageClass) {
        default_storage_class(st, &mut obj).await?;
    }
    priority_admission(st, r, &name, &mut obj).await?;
    single_default_priority(st, r, &name, &obj).await?;
    (r.strategy.on_create)(&mut obj);
    (r.strategy.initial_status)(&mut obj);
    ensure_namespace(st, ns.filter(|_| r.namespaced), r, &name).await?;
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
    allocate_service(st, r, &mut obj, None, &key, &name).await?;
    let bytes = serde_json::to_vec(&obj).map_err(ApiError::internal)?;
    let kv = match st.store.put(&key, bytes, Precondition::Absent).await {
        Ok(kv) => kv,
        Err(e) => {
            if r.strategy.has(Hook::ServiceAddresses) {
                super::alloc::release(st.store.as_ref(), &obj).await;
            }
            return Err(ApiError::from_store(e, r, &name));
        }
    };
    if r.strategy.has(Hook::NamespaceContents) {
        // kube-controller-manager's root CA publisher answers a new namespace at once; pods
        // created right after it mount the ConfigMap.
        let _ = super::put_root_ca(st.store.as_ref(), &name, &st.ca_pem).await;
    }
    let resp = json_response(StatusCode::CREATED, &with_rv(obj, kv.mod_revision));
    Ok(warn(resp, &warnings))
}

/// Allocates a Service's ClusterIP and node ports (`old` keeps its allocations); other kinds
/// pass through.
async fn allocate_service(
    st: &ApiState,
    r: &Resource,
    obj: &mut Value,
    old: Option<&Value>,
    key: &str,
    name: &str,
) -> Result<(), ApiError> {
    if !r.strategy.has(Hook::ServiceAddresses) {
        return Ok(());
    }
    super::alloc::allocate(st.store.as_ref(), &st.services, obj, old, key)
        .await
        .map_err(|e| invalid(r, name, &format!("{}: {}", e.field, e.message)))
}

/// The new version of an existing object, ready to store: immutable metadata and (for kinds
/// with a status subresource) the status carried over from `old`, admitted, and allocated.
async fn prepare_update(
    st: &ApiState,
    r: &Resource,
    old: &Value,
    mut new: Value,
    name: &str,
    key: &str,
    o: WriteOpts<'_>,
) -> Result<(Value, Vec<String>), ApiError> {
    carry_over(old, &mut new);
    if super::subresource::has_status(r) {
        new["status"] = old.get("status").cloned().unwrap_or(Value::Null);
    }
    let (mut new, warnings) = admit(r, new, name, o.field_validation)?;
    let errs = (r.strategy.validate_update)(old, &new);
    if !errs.is_empty() {
        return Err(invalid_all(r, name, &errs));
    }
    let ns = new
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .filter(|_| r.namespaced)
        .map(str::to_string);
    super::rbac::check_escalation(st, o.caller, r.kind, ns.as_deref(), &new).await?;
    single_default_priority(st, r, name, &new).await?;
    if !o.dry {
        allocate_service(st, r, &mut new, Some(old), key, name).await?;
    }
    Ok((new, warnings))
}

/// Every PriorityClass, as stored.
async fn priority_classes(st: &ApiState) -> Result<Vec<Value>, ApiError> {
    let Some(r) = registry::find("scheduling.k8s.io", "v1", "priorityclasses") else {
        return Ok(vec![]);
    };
    let page = st
        .cache
        .list(&r.prefix(), &r.prefix(), None, 0)
        .await
        .map_err(ApiError::internal)?;
    Ok(page
        .items
        .iter()
        .filter_map(|kv| serde_json::from_slice(&kv.value).ok())
        .collect())
}

/// The Priority admission of a new pod: its class's priority and preemption policy, or
/// kube-apiserver's 403.
async fn priority_admission(
    st: &ApiState,
    r: &Resource,
    name: &str,
    obj: &mut Value,
) -> Result<(), ApiError> {
    if !r.strategy.has(Hook::Priority) {
        return Ok(());
    }
    let classes = priority_classes(st).await?;
    crate::kinds::priority::admit(obj, &classes).map_err(|why| {
        ApiError::new(
            StatusCode::FORBIDDEN,
            "Forbidden",
            format!("{} \"{name}\" is forbidden: {why}", r.qualified()),
        )
    })
}

/// Only one PriorityClass may be the global default (kube-apiserver's 422).
async fn single_default_priority(
    st: &ApiState,
    r: &Resource,
    name: &str,
    class: &Value,
) -> Result<(), ApiError> {
    if !r.strategy.has(Hook::SingleDefaultPriority) {
        return Ok(());
    }
    let classes = priority_classes(st).await?;
    match crate::kinds::priority::second_default(class, &classes) {
        Some(why) => Err(invalid(r, name, &why)),
        None => Ok(()),
    }
}

/// The body of a write to `.../NAME` must name the same object (kube-apiserver's 400).
fn same_name(obj: &Value, name: &str) -> Result<(), ApiError> {
    let body_name = obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("");
    if body_name != name {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({body_name}) does not match the name on the URL ({name})"
        )));
    }
    Ok(())
}

/// A 422 Invalid with one field cause (`field: message`), as kube-apiserver words it.
pub(super) fn invalid(r: &Resource, name: &str, cause: &str) -> ApiError {
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

pub(super) async fn update(
    st: &ApiState,
    r: &'static Resource,
    ns: Option<&str>,
    name: &str,
    body: &Bytes,
    o: WriteOpts<'_>,
) -> Result<Response, ApiError> {
    let dry = o.dry;
    let obj = parse_body(body, r)?;
    let key = r.key(ns, name);
    let cur = get_existing(st, r, &key, name).await?;
    let old: Value = serde_json::from_slice(&cur.value).map_err(ApiError::internal)?;
    same_name(&obj, name)?;
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
    let (obj, warnings) = prepare_update(st, r, &old, obj, name, &key, o).await?;
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
pub(super) async fn patch(
    st: &ApiState,
    r: &'static Resource,
    ns: Option<&str>,
    name: &str,
    headers: &HeaderMap,
    body: &Bytes,
    o: WriteOpts<'_>,
) -> Result<Response, ApiError> {
    let dry = o.dry;
    let (ctype, doc) = patch_document(headers, body)?;
    let key = r.key(ns, name);
    for _ in 0..8 {
        let cur = st.store.get(&key).await.map_err(ApiError::internal)?;
        let Some(cur) = cur else {
            if ctype == APPLY_PATCH {
                return apply_creates(st, r, ns, name, &doc, o).await;
            }
            return Err(ApiError::not_found(r, name));
        };
        let old: Value = serde_json::from_slice(&cur.value).map_err(ApiError::internal)?;
        let mut new = with_rv(old.clone(), cur.mod_revision);
        apply_patch(&ctype, &mut new, &doc)?;
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
        let (new, warnings) = prepare_update(st, r, &old, new, name, &key, o).await?;
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

const APPLY_PATCH: &str = "application/apply-patch+yaml";

/// The patch's type (from Content-Type) and its document.
fn patch_document(headers: &HeaderMap, body: &Bytes) -> Result<(String, Value), ApiError> {
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
        APPLY_PATCH => serde_saphyr::from_slice(body)
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
    Ok((ctype, doc))
}

/// Server-side apply of a missing object creates it: the object must carry the URL's name,
/// and the caller needs `create` as well as `patch`.
async fn apply_creates(
    st: &ApiState,
    r: &'static Resource,
    ns: Option<&str>,
    name: &str,
    doc: &Value,
    o: WriteOpts<'_>,
) -> Result<Response, ApiError> {
    same_name(doc, name)?;
    if let Some(who) = o.caller {
        let a = super::rbac::Attributes {
            verb: "create".into(),
            group: r.group.into(),
            resource: r.plural.into(),
            namespace: ns.map(str::to_string),
            name: None,
        };
        super::rbac::authorize(st, who, &a).await?;
    }
    let bytes = Bytes::from(serde_json::to_vec(doc).map_err(ApiError::internal)?);
    create(st, r, ns, &bytes, o).await
}

/// Applies a JSON, strategic-merge or merge patch (apply patches merge) to `new`.
fn apply_patch(ctype: &str, new: &mut Value, doc: &Value) -> Result<(), ApiError> {
    let applied = match ctype {
        "application/json-patch+json" => super::patch::json_patch(new, doc),
        "application/strategic-merge-patch+json" => super::patch::strategic_merge(new, doc),
        _ => {
            super::patch::merge_patch(new, doc);
            Ok(())
        }
    };
    applied.map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            format!("the patch could not be applied: {e}"),
        )
    })
}

pub(super) fn uuid() -> String {
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

/// kube-apiserver's DefaultStorageClass admission: a new claim that names no class (the
/// field absent, not empty) gets the default class, if there is one.
async fn default_storage_class(st: &ApiState, claim: &mut Value) -> Result<(), ApiError> {
    if claim
        .pointer("/spec/storageClassName")
        .is_some_and(|v| !v.is_null())
    {
        return Ok(());
    }
    let Some(r) = super::registry::find("storage.k8s.io", "v1", "storageclasses") else {
        return Ok(());
    };
    let page = st
        .cache
        .list(&r.prefix(), &r.prefix(), None, 0)
        .await
        .map_err(ApiError::internal)?;
    let classes: Vec<k8s_openapi::api::storage::v1::StorageClass> = page
        .items
        .iter()
        .filter_map(|kv| serde_json::from_slice(&kv.value).ok())
        .collect();
    if let Some(name) = crate::kinds::storage::default_class(classes.iter())
        && let Some(spec) = claim.get_mut("spec").and_then(Value::as_object_mut)
    {
        spec.insert("storageClassName".into(), name.into());
    }
    Ok(())
}

/// kube-apiserver's ServiceAccount admission for image pull secrets: a new pod that names
/// none gets those of its service account (mirror pods are left alone).
async fn service_account_pull_secrets(st: &ApiState, ns: &str, pod: &mut Value) {
    let mirror = pod
        .pointer("/metadata/annotations/kubernetes.io~1config.mirror")
        .is_some();
    let has = pod
        .pointer("/spec/imagePullSecrets")
        .and_then(Value::as_array)
        .is_some_and(|a| !a.is_empty());
    if mirror || has {
        return;
    }
    let sa_name = pod
        .pointer("/spec/serviceAccountName")
        .and_then(Value::as_str)
        .unwrap_or("default")
        .to_string();
    let Some(r) = super::registry::find("", "v1", "serviceaccounts") else {
        return;
    };
    let Ok(Some(kv)) = st.store.get(&r.key(Some(ns), &sa_name)).await else {
        return;
    };
    let Ok(sa) = serde_json::from_slice::<Value>(&kv.value) else {
        return;
    };
    if let Some(secrets) = sa
        .get("imagePullSecrets")
        .and_then(Value::as_array)
        .filter(|a| !a.is_empty())
        && let Some(spec) = pod.get_mut("spec").and_then(Value::as_object_mut)
    {
        spec.insert("imagePullSecrets".into(), Value::Array(secrets.clone()));
    }
}
