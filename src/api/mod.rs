//! Owns the Kubernetes REST API over HTTPS: credentials, authentication, discovery, and the
//! generic resource handlers over the store. Never runs containers or programs the network.

pub mod alloc;
pub mod authz;
pub mod cache;
pub mod csr;
pub mod handlers;
mod logs;
mod negotiate;
pub mod patch;
pub mod pki;
mod protobuf;
pub mod rbac;
pub mod registry;
mod review;
pub mod selector;
pub mod strategy;
pub mod stream;
pub mod subresource;
pub mod table;
pub mod typed;
pub mod write;

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use anyhow::Context;
use axum::{
    Router,
    extract::{Request, State},
    http::StatusCode,
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{any, get},
};
use serde_json::json;

use crate::store::{Precondition, Store, embedded::Embedded};
use handlers::{ApiError, json_response};

pub use crate::kinds::KUBE_MINOR;

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    /// Inherited listening sockets served as well (file descriptors).
    pub listen_fds: Vec<i32>,
    pub services: alloc::ServiceNet,
    pub store: StoreConfig,
    /// How often history older than one interval is compacted (kube-apiserver: 5 minutes).
    pub compaction_interval: std::time::Duration,
    /// Notified once the server serves and `kubeconfig.yaml` is written.
    pub ready: Option<Arc<tokio::sync::Notify>>,
    /// DefaultTolerationSeconds for not-ready and unreachable nodes.
    pub default_tolerations: (i64, i64),
    /// Extra names and addresses the serving certificate is valid for (`--tls-san`).
    pub tls_sans: Vec<String>,
    /// Longest lifetime of a certificate signed for a CertificateSigningRequest.
    pub signing_duration: std::time::Duration,
}

/// Compacts the store every `every`, to the revision seen one interval earlier, so watches
/// can resume from any resourceVersion younger than one interval and older ones get 410 Gone.
async fn compactor(store: Arc<dyn Store>, every: std::time::Duration) {
    let mut previous: Option<crate::store::Revision> = None;
    loop {
        tokio::time::sleep(every).await;
        let now = match store.revision().await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "compaction: reading the revision");
                continue;
            }
        };
        if let Some(p) = previous {
            let done = store.compacted().await.unwrap_or(0);
            if p > done {
                match store.compact(p).await {
                    Ok(()) => tracing::debug!(revision = p, "compacted"),
                    Err(e) => tracing::warn!(error = %e, "compaction failed"),
                }
            }
        }
        previous = Some(now);
    }
}

/// Which storage engine the server runs on.
#[derive(Debug, Clone, Default)]
pub enum StoreConfig {
    /// The embedded database under `DATA_DIR/store`.
    #[default]
    Embedded,
    /// An etcd v3 cluster at these client URLs.
    Etcd(Vec<String>),
}

/// Shared state of the API handlers.
pub struct ApiState {
    pub store: Arc<dyn Store>,
    /// Lists and watches are served from here.
    pub cache: cache::WatchCaches,
    pub admin_token: String,
    /// The join token: it only bootstraps a node's certificate.
    pub node_token: String,
    /// The cluster CA (PEM), published in every namespace's `kube-root-ca.crt`.
    pub ca_pem: String,
    /// The cluster CA's key: approved CertificateSigningRequests are signed with it.
    pub ca_key_pem: String,
    /// Service account tokens are signed with this (its own random key).
    pub sa_key: Vec<u8>,
    /// Longest lifetime of a certificate signed for a CertificateSigningRequest.
    pub signing_duration: std::time::Duration,
    pub services: alloc::ServiceNet,
    /// TLS towards kubelets: presents the kubelet-client certificate.
    pub kubelet_tls: Arc<rustls::ClientConfig>,
}

async fn auth(State(st): State<Arc<ApiState>>, mut req: Request, next: Next) -> Response {
    let token = req
        .headers()
        .get("authorization")
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
        .map(|t| t.trim().to_string());
    let cert = req
        .extensions()
        .get::<crate::tls::ClientCertVerified>()
        .and_then(authz::from_certificate);
    let id = match token {
        Some(t) if t.starts_with("keelson-sa.") => service_account(&st, &t).await,
        Some(t) => authz::authenticate(&t, &st.admin_token, &st.node_token),
        None => cert,
    };
    let Some(id) = id else {
        return ApiError::new(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized")
            .into_response();
    };
    let id = match authz::impersonate(&st, id, req.headers()).await {
        Ok(id) => id,
        Err(e) => return e.into_response(),
    };
    req.extensions_mut().insert(id);
    next.run(req).await
}

/// What a verified service account token proves.
pub(crate) struct SaToken {
    pub identity: authz::Identity,
    /// The service account's UID.
    pub sa_uid: String,
    /// The pod the token is bound to (name, UID), if any.
    pub pod: Option<(String, String)>,
    pub audiences: Vec<String>,
}

/// The service account a token names, if it verifies, is for the API server's audience, the
/// account still exists as issued, and the pod it is bound to (if any) still exists with the
/// same UID and has not passed its deletion time.
async fn service_account(st: &ApiState, token: &str) -> Option<authz::Identity> {
    let t = service_account_token(st, token).await?;
    t.audiences
        .iter()
        .any(|a| a == rbac::API_AUDIENCE)
        .then_some(t.identity)
}

/// A service account token checked as `service_account` does, for any audience (TokenReview
/// asks for others).
pub(crate) async fn service_account_token(st: &ApiState, token: &str) -> Option<SaToken> {
    let c = rbac::verify(&st.sa_key, token, jiff::Timestamp::now().as_second())?;
    let uid_of =
        |kv: crate::store::KeyValue| serde_json::from_slice::<serde_json::Value>(&kv.value).ok();
    let r = registry::find("", "v1", "serviceaccounts")?;
    let sa = uid_of(
        st.store
            .get(&r.key(Some(&c.namespace), &c.name))
            .await
            .ok()??,
    )?;
    if sa.pointer("/metadata/uid").and_then(|u| u.as_str()) != Some(c.uid.as_str()) {
        return None;
    }
    if let Some((pod_name, pod_uid)) = &c.pod {
        let pods = registry::find("", "v1", "pods")?;
        let pod = uid_of(
            st.store
                .get(&pods.key(Some(&c.namespace), pod_name))
                .await
                .ok()??,
        )?;
        // As kube's validator: gone, recreated, or past its deletion time (a pod in graceful
        // termination keeps its token until then).
        let deleted = pod
            .pointer("/metadata/deletionTimestamp")
            .and_then(|t| t.as_str())
            .and_then(|t| t.parse::<jiff::Timestamp>().ok())
            .is_some_and(|t| t < jiff::Timestamp::now());
        if pod.pointer("/metadata/uid").and_then(|u| u.as_str()) != Some(pod_uid.as_str())
            || deleted
        {
            return None;
        }
    }
    Some(SaToken {
        identity: authz::Identity::ServiceAccount(c.namespace, c.name),
        sa_uid: c.uid,
        pod: c.pod,
        audiences: c.aud,
    })
}

pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn version() -> serde_json::Value {
    json!({"major": "1", "minor": KUBE_MINOR, "gitVersion": format!("v1.{KUBE_MINOR}.0-keelson.{}", env!("CARGO_PKG_VERSION")),
           "gitCommit": "", "gitTreeState": "clean", "buildDate": "", "goVersion": "n/a",
           "compiler": "rustc", "platform": "linux/amd64"})
}

/// The API router (authenticated except health and version).
pub fn router(st: Arc<ApiState>) -> Router {
    let api = Router::new()
        .route("/api", get(|h: axum::http::HeaderMap| async move {
            if wants_aggregated(&h) {
                return aggregated_response(true);
            }
            json_response(StatusCode::OK, &json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}))
        }))
        .route("/apis", get(|h: axum::http::HeaderMap| async move {
            if wants_aggregated(&h) {
                return aggregated_response(false);
            }
            json_response(StatusCode::OK, &registry::group_list())
        }))
        .route("/openapi/v3", get(|| async { json_response(StatusCode::OK, &registry::openapi_index()) }))
        .route(
            "/openapi/v3/{*path}",
            get(|axum::extract::Path(p): axum::extract::Path<String>| async move {
                match registry::openapi_doc(p.trim_matches('/')) {
                    Some(doc) => json_response(StatusCode::OK, &doc),
                    None => ApiError::new(StatusCode::NOT_FOUND, "NotFound", "the server could not find the requested resource").into_response(),
                }
            }),
        )
        .route("/api/v1/namespaces/{ns}/pods/{name}/exec", any(stream::exec))
        .route("/api/v1/namespaces/{ns}/pods/{name}/attach", any(stream::attach))
        .route("/api/v1/namespaces/{ns}/pods/{name}/portforward", any(stream::portforward))
        .route("/api/{*rest}", any(handlers::resource))
        .route("/apis/{*rest}", any(handlers::resource))
        .layer(middleware::from_fn_with_state(st.clone(), auth))
        .layer(middleware::from_fn(negotiate::negotiate))
        .with_state(st);
    Router::new()
        .route(
            "/version",
            get(|| async { json_response(StatusCode::OK, &version()) }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route("/livez", get(|| async { "ok" }))
        .route("/readyz", get(|| async { "ok" }))
        .merge(api)
}

/// Whether the client asks for aggregated discovery (apidiscovery.k8s.io/v2).
fn wants_aggregated(h: &axum::http::HeaderMap) -> bool {
    h.get("accept")
        .and_then(|a| a.to_str().ok())
        .is_some_and(|a| {
            a.split(',').any(|m| {
                m.contains("as=APIGroupDiscoveryList")
                    && m.contains("v=v2")
                    && !m.contains("v=v2beta1")
            })
        })
}

fn aggregated_response(core: bool) -> Response {
    (
        StatusCode::OK,
        [("content-type", registry::AGGREGATED)],
        registry::aggregated(core).to_string(),
    )
        .into_response()
}

/// `APIResourceList` of a group/version, or 404.
pub fn discovery(group: &str, version: &str) -> Response {
    match registry::resource_list(group, version) {
        Some(v) => json_response(StatusCode::OK, &v),
        None => ApiError::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        )
        .into_response(),
    }
}

/// Creates the namespaces kube-apiserver makes at start, if missing.
/// Stores `obj` at `key` unless something is there already (seeding is idempotent).
async fn put_absent(store: &dyn Store, key: &str, obj: &serde_json::Value) -> anyhow::Result<()> {
    match store
        .put(key, serde_json::to_vec(obj)?, Precondition::Absent)
        .await
    {
        Ok(_) | Err(crate::store::Error::AlreadyExists(_)) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

pub async fn seed(store: &dyn Store) -> anyhow::Result<()> {
    let ns = registry::find("", "v1", "namespaces").context("namespaces resource")?;
    for name in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        let obj = json!({"kind": "Namespace", "apiVersion": "v1",
            "metadata": {"name": name, "uid": crate::runtime::random_hex(16),
                         "creationTimestamp": jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
                         "labels": {"kubernetes.io/metadata.name": name}},
            "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}});
        put_absent(store, &ns.key(None, name), &obj).await?;
    }
    // kube-apiserver's bootstrap ClusterRoles that users and manifests refer to by name.
    let roles = registry::find("rbac.authorization.k8s.io", "v1", "clusterroles")
        .context("clusterroles resource")?;
    for (name, rules) in [
        (
            "cluster-admin",
            json!([{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]},
                   {"nonResourceURLs": ["*"], "verbs": ["*"]}]),
        ),
        (
            "system:certificates.k8s.io:certificatesigningrequests:nodeclient",
            json!([{"apiGroups": ["certificates.k8s.io"],
                    "resources": ["certificatesigningrequests/nodeclient"], "verbs": ["create"]}]),
        ),
        // What every user may do (kube-apiserver binds these to every authenticated user):
        // ask about itself, and read discovery and health.
        (
            "system:basic-user",
            json!([{"apiGroups": ["authorization.k8s.io"],
                    "resources": ["selfsubjectaccessreviews", "selfsubjectrulesreviews"], "verbs": ["create"]},
                   {"apiGroups": ["authentication.k8s.io"], "resources": ["selfsubjectreviews"], "verbs": ["create"]}]),
        ),
        (
            "system:discovery",
            json!([{"nonResourceURLs": ["/api", "/api/*", "/apis", "/apis/*", "/healthz", "/livez",
                                        "/openapi", "/openapi/*", "/readyz", "/version", "/version/"],
                    "verbs": ["get"]}]),
        ),
        (
            "system:public-info-viewer",
            json!([{"nonResourceURLs": ["/healthz", "/livez", "/readyz", "/version", "/version/"],
                    "verbs": ["get"]}]),
        ),
    ] {
        let obj = json!({"kind": "ClusterRole", "apiVersion": "rbac.authorization.k8s.io/v1",
            "metadata": bootstrap_meta(name), "rules": rules});
        put_absent(store, &roles.key(None, name), &obj).await?;
    }
    let bindings = registry::find("rbac.authorization.k8s.io", "v1", "clusterrolebindings")
        .context("clusterrolebindings resource")?;
    for (name, groups) in [
        ("system:basic-user", &["system:authenticated"][..]),
        ("system:discovery", &["system:authenticated"][..]),
        (
            "system:public-info-viewer",
            &["system:authenticated", "system:unauthenticated"][..],
        ),
    ] {
        let subjects: Vec<_> = groups
            .iter()
            .map(|g| json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": g}))
            .collect();
        let obj = json!({"kind": "ClusterRoleBinding", "apiVersion": "rbac.authorization.k8s.io/v1",
            "metadata": bootstrap_meta(name),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
            "subjects": subjects});
        put_absent(store, &bindings.key(None, name), &obj).await?;
    }
    seed_priority_classes(store).await?;
    seed_api_services(store).await
}

/// kube-apiserver's two system PriorityClasses.
async fn seed_priority_classes(store: &dyn Store) -> anyhow::Result<()> {
    let r = registry::find("scheduling.k8s.io", "v1", "priorityclasses")
        .context("priorityclasses resource")?;
    for (name, value, description) in crate::kinds::priority::SYSTEM_CLASSES {
        let obj = json!({"kind": "PriorityClass", "apiVersion": "scheduling.k8s.io/v1",
            "metadata": seeded_meta(name), "value": value, "description": description,
            "preemptionPolicy": "PreemptLowerPriority"});
        put_absent(store, &r.key(None, name), &obj).await?;
    }
    Ok(())
}

/// An APIService for every group/version the server serves itself, `Available` as kube-
/// apiserver's local ones are (`kubectl get apiservices`).
async fn seed_api_services(store: &dyn Store) -> anyhow::Result<()> {
    let r = registry::find("apiregistration.k8s.io", "v1", "apiservices")
        .context("apiservices resource")?;
    let now = jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    for (i, (group, version)) in registry::group_versions().into_iter().enumerate() {
        let name = format!("{version}.{group}");
        let mut meta = seeded_meta(&name);
        meta["labels"] = json!({"kube-aggregator.kubernetes.io/automanaged": "onstart"});
        let obj = json!({"kind": "APIService", "apiVersion": "apiregistration.k8s.io/v1",
            "metadata": meta,
            "spec": {"group": group, "version": version, "groupPriorityMinimum": 18000 - 100 * i as i64,
                     "versionPriority": 15},
            "status": {"conditions": [{"type": "Available", "status": "True", "reason": "Local",
                        "message": "Local APIServices are always available", "lastTransitionTime": now}]}});
        put_absent(store, &r.key(None, &name), &obj).await?;
    }
    Ok(())
}

/// The metadata of an object the server makes at start.
fn seeded_meta(name: &str) -> serde_json::Value {
    json!({"name": name, "uid": crate::runtime::random_hex(16),
           "creationTimestamp": jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string()})
}

/// The metadata of an RBAC object the server makes at start (kube's `rbac-defaults`).
fn bootstrap_meta(name: &str) -> serde_json::Value {
    let mut meta = seeded_meta(name);
    meta["labels"] = json!({"kubernetes.io/bootstrapping": "rbac-defaults"});
    meta["annotations"] = json!({"rbac.authorization.kubernetes.io/autoupdate": "true"});
    meta
}

/// Keeps the `kube-root-ca.crt` ConfigMap (the cluster CA, for in-cluster clients' projected
/// volumes) in every namespace, as kube-controller-manager's root CA publisher does.
const ROOT_CA_CONFIGMAP: &str = "kube-root-ca.crt";

/// Writes namespace `ns`'s `kube-root-ca.crt` ConfigMap unless it exists.
pub(crate) async fn put_root_ca(store: &dyn Store, ns: &str, ca_pem: &str) -> anyhow::Result<()> {
    let cm_r = registry::find("", "v1", "configmaps").context("configmaps resource")?;
    let cm = json!({"kind": "ConfigMap", "apiVersion": "v1",
        "metadata": {"name": ROOT_CA_CONFIGMAP, "namespace": ns, "uid": crate::runtime::random_hex(16),
                     "creationTimestamp": jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
                     "annotations": {"kubernetes.io/description": "Contains a CA bundle that can be used to verify the kube-apiserver when using internal endpoints such as the internal service IP or kubernetes.default.svc. No other usage is guaranteed across distributions of Kubernetes clusters."}},
        "data": {"ca.crt": ca_pem}});
    put_absent(store, &cm_r.key(Some(ns), ROOT_CA_CONFIGMAP), &cm).await
}

/// Keeps the ConfigMap in every namespace (a new namespace gets it at its creation already;
/// this repairs deletions).
async fn publish_root_ca(store: Arc<dyn Store>, ca_pem: String) {
    let (Some(ns_r), Some(cm_r)) = (
        registry::find("", "v1", "namespaces"),
        registry::find("", "v1", "configmaps"),
    ) else {
        return;
    };
    loop {
        if let Ok(page) = store.list(&ns_r.prefix(), None, 0).await {
            for kv in page.items {
                let Ok(ns) = serde_json::from_slice::<serde_json::Value>(&kv.value) else {
                    continue;
                };
                if ns.pointer("/metadata/deletionTimestamp").is_some() {
                    continue;
                }
                let Some(name) = ns.pointer("/metadata/name").and_then(|n| n.as_str()) else {
                    continue;
                };
                let key = cm_r.key(Some(name), ROOT_CA_CONFIGMAP);
                if matches!(store.get(&key).await, Ok(Some(_))) {
                    continue;
                }
                let _ = put_root_ca(store.as_ref(), name, &ca_pem).await;
            }
        }
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    }
}

/// The `kubernetes` Service in `default` (the range's first address, port 443) and its
/// Endpoints pointing at this server, as kube-apiserver keeps them.
/// The address the `kubernetes` Service's endpoints carry (kube-apiserver's
/// `--advertise-address`): the listening address, or when that is every address, the host's
/// first non-loopback IPv4 address (loopback if it has none).
fn advertise(listen: SocketAddr) -> SocketAddr {
    if !listen.ip().is_unspecified() {
        return listen;
    }
    let first = nix::ifaddrs::getifaddrs().ok().and_then(|addrs| {
        addrs
            .filter_map(|a| a.address?.as_sockaddr_in().map(|s| s.ip()))
            .find(|ip| !ip.is_loopback())
    });
    SocketAddr::from((
        first.unwrap_or(std::net::Ipv4Addr::LOCALHOST),
        listen.port(),
    ))
}

async fn seed_kubernetes_service(
    store: &dyn Store,
    net: &alloc::ServiceNet,
    addr: SocketAddr,
) -> anyhow::Result<()> {
    let svc_r = registry::find("", "v1", "services").context("services resource")?;
    let ep_r = registry::find("", "v1", "endpoints").context("endpoints resource")?;
    let now = jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    let ip = net.first().to_string();
    let svc_key = svc_r.key(Some("default"), "kubernetes");
    if store.get(&svc_key).await?.is_none() {
        let mut svc = json!({"kind": "Service", "apiVersion": "v1",
            "metadata": {"name": "kubernetes", "namespace": "default", "uid": crate::runtime::random_hex(16), "creationTimestamp": now,
                         "labels": {"component": "apiserver", "provider": "kubernetes"}},
            "spec": {"clusterIP": ip, "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": addr.port()}]}});
        alloc::allocate(store, net, &mut svc, None, &svc_key)
            .await
            .map_err(|e| anyhow::anyhow!("kubernetes Service: {}: {}", e.field, e.message))?;
        match store
            .put(&svc_key, serde_json::to_vec(&svc)?, Precondition::Absent)
            .await
        {
            Ok(_) | Err(crate::store::Error::AlreadyExists(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let ep = json!({"kind": "Endpoints", "apiVersion": "v1",
        "metadata": {"name": "kubernetes", "namespace": "default", "uid": crate::runtime::random_hex(16), "creationTimestamp": now,
                     "labels": {"endpointslice.kubernetes.io/skip-mirror": "true"}},
        "subsets": [{"addresses": [{"ip": addr.ip().to_string()}], "ports": [{"name": "https", "port": addr.port(), "protocol": "TCP"}]}]});
    store
        .put(
            &ep_r.key(Some("default"), "kubernetes"),
            serde_json::to_vec(&ep)?,
            Precondition::None,
        )
        .await?;
    // And its EndpointSlice, which is what service proxies read (kube-apiserver's endpoint
    // reconciler writes both; the slice controllers leave selectorless Services alone). Not for
    // a loopback address, which no other network namespace reaches and which kube's
    // validation refuses in a slice.
    let slice_r = registry::find("discovery.k8s.io", "v1", "endpointslices")
        .context("endpointslices resource")?;
    let slice_key = slice_r.key(Some("default"), "kubernetes");
    if addr.ip().is_loopback() {
        // One an earlier run on a routable address wrote would send clients to it.
        return match store.delete(&slice_key, Precondition::None).await {
            Ok(_) | Err(crate::store::Error::NotFound(_)) => Ok(()),
            Err(e) => Err(e.into()),
        };
    }
    let slice = json!({"kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
        "metadata": {"name": "kubernetes", "namespace": "default", "uid": crate::runtime::random_hex(16), "creationTimestamp": now,
                     "labels": {"kubernetes.io/service-name": "kubernetes"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [addr.ip().to_string()], "conditions": {"ready": true}}],
        "ports": [{"name": "https", "port": addr.port(), "protocol": "TCP"}]});
    store
        .put(&slice_key, serde_json::to_vec(&slice)?, Precondition::None)
        .await?;
    Ok(())
}

/// The `kube-dns` Service in `kube-system` on the range's tenth address (where kubelets'
/// `--cluster-dns` points by convention), as the DNS add-on of kubeadm, k3s and kind makes it.
/// It has no endpoints: every node's agent answers on that address itself. Made once; a
/// cluster whose tenth address is taken keeps working, without it (said in the log).
async fn seed_dns_service(store: &dyn Store, net: &alloc::ServiceNet) {
    let made = async {
        let svc_r = registry::find("", "v1", "services").context("services resource")?;
        let key = svc_r.key(Some("kube-system"), "kube-dns");
        if store.get(&key).await?.is_some() {
            return Ok(());
        }
        let ip = crate::kinds::dns::default_cluster_dns(net.cidr.network());
        let now = jiff::Timestamp::now()
            .strftime("%Y-%m-%dT%H:%M:%SZ")
            .to_string();
        let mut svc = json!({"kind": "Service", "apiVersion": "v1",
            "metadata": {"name": "kube-dns", "namespace": "kube-system", "uid": crate::runtime::random_hex(16), "creationTimestamp": now,
                         "labels": {"k8s-app": "kube-dns", "kubernetes.io/cluster-service": "true", "kubernetes.io/name": "CoreDNS"}},
            "spec": {"clusterIP": ip.to_string(), "ports": [
                {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53},
                {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 53},
                {"name": "metrics", "port": 9153, "protocol": "TCP", "targetPort": 9153}]}});
        alloc::allocate(store, net, &mut svc, None, &key)
            .await
            .map_err(|e| anyhow::anyhow!("{}: {}", e.field, e.message))?;
        match store
            .put(&key, serde_json::to_vec(&svc)?, Precondition::Absent)
            .await
        {
            Ok(_) | Err(crate::store::Error::AlreadyExists(_)) => Ok(()),
            Err(e) => Err(anyhow::Error::from(e)),
        }
    };
    if let Err(e) = made.await {
        tracing::warn!(error = %format!("{e:#}"), "the kube-dns Service could not be made");
    }
}

/// The default StorageClass, `local-path` on keelson's provisioner, made at start when absent
/// (k3s's packaged manifest does the same); one an administrator changed is left as it is.
async fn seed_storage_class(store: &dyn Store) {
    use crate::kinds::storage::{DEFAULT_CLASS, DEFAULT_CLASS_NAME, PROVISIONER};
    let made = async {
        let r =
            registry::find("storage.k8s.io", "v1", "storageclasses").context("storageclasses")?;
        let key = r.key(None, DEFAULT_CLASS_NAME);
        let now = jiff::Timestamp::now()
            .strftime("%Y-%m-%dT%H:%M:%SZ")
            .to_string();
        let sc = json!({"kind": "StorageClass", "apiVersion": "storage.k8s.io/v1",
            "metadata": {"name": DEFAULT_CLASS_NAME, "uid": crate::runtime::random_hex(16),
                         "creationTimestamp": now, "annotations": {DEFAULT_CLASS: "true"}},
            "provisioner": PROVISIONER, "reclaimPolicy": "Delete",
            "volumeBindingMode": "WaitForFirstConsumer"});
        match store
            .put(&key, serde_json::to_vec(&sc)?, Precondition::Absent)
            .await
        {
            Ok(_) | Err(crate::store::Error::AlreadyExists(_)) => Ok(()),
            Err(e) => Err(anyhow::Error::from(e)),
        }
    };
    if let Err(e) = made.await {
        let e: anyhow::Error = e;
        tracing::warn!(error = %format!("{e:#}"), "the local-path StorageClass could not be made");
    }
}

/// The store the configuration names: the embedded one in DATA_DIR, or etcd.
async fn open_store(cfg: &ServerConfig) -> anyhow::Result<Arc<dyn Store>> {
    Ok(match &cfg.store {
        StoreConfig::Embedded => Arc::new(
            Embedded::open(&cfg.data_dir.join("store/keelson.redb"))
                .context("opening the store")?,
        ),
        StoreConfig::Etcd(endpoints) => Arc::new(
            crate::store::etcd::EtcdStore::connect(endpoints)
                .await
                .with_context(|| format!("connecting to etcd at {}", endpoints.join(",")))?,
        ),
    })
}

/// The names and addresses the serving certificate is valid for: the in-cluster names, the
/// host's name, loopback, the kubernetes Service's address, the listen address (every address
/// the host has when it listens on all) and the --tls-san extras.
fn serving_names(cfg: &ServerConfig) -> (Vec<String>, Vec<std::net::IpAddr>) {
    let host = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().to_string())
        .unwrap_or_default();
    let mut names: Vec<String> = [
        "localhost",
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if !host.is_empty() {
        names.push(host);
    }
    let mut ips = vec![
        std::net::IpAddr::from([127, 0, 0, 1]),
        std::net::IpAddr::V4(cfg.services.first()),
    ];
    if !cfg.listen.ip().is_unspecified() && !ips.contains(&cfg.listen.ip()) {
        ips.push(cfg.listen.ip());
    }
    if cfg.listen.ip().is_unspecified() {
        // Serving on every address: valid for every address the host has now.
        if let Ok(addrs) = nix::ifaddrs::getifaddrs() {
            for a in addrs {
                if let Some(v4) = a.address.as_ref().and_then(|s| s.as_sockaddr_in()) {
                    let ip = std::net::IpAddr::V4(v4.ip());
                    if !ips.contains(&ip) {
                        ips.push(ip);
                    }
                }
            }
        }
    }
    for san in &cfg.tls_sans {
        match san.parse::<std::net::IpAddr>() {
            Ok(ip) if !ips.contains(&ip) => ips.push(ip),
            Ok(_) => {}
            Err(_) if !names.contains(san) => names.push(san.clone()),
            Err(_) => {}
        }
    }
    (names, ips)
}

/// Runs the API server until `shutdown` resolves. Writes `DATA_DIR/kubeconfig.yaml` once it serves.
pub async fn run(
    cfg: ServerConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    crate::runtime::private_dir(&cfg.data_dir, 0o700)
        .with_context(|| cfg.data_dir.display().to_string())?;
    let store = open_store(&cfg).await?;
    typed::set_default_tolerations(cfg.default_tolerations.0, cfg.default_tolerations.1);
    seed(store.as_ref()).await?;
    let compaction = tokio::spawn(compactor(store.clone(), cfg.compaction_interval));
    let csr_cleaner = tokio::spawn(csr::cleaner(store.clone()));
    let (names, ips) = serving_names(&cfg);
    let pki = pki::ensure(&cfg.data_dir.join("pki"), &names, &ips).context("credentials")?;
    let root_ca = tokio::spawn(publish_root_ca(store.clone(), pki.ca_pem.clone()));
    let tls = tls_config(&pki)?;
    let (cache, store) = cache::WatchCaches::new(store);
    let st = Arc::new(ApiState {
        cache,
        store,
        admin_token: pki.admin_token.clone(),
        node_token: pki.node_token.clone(),
        ca_pem: pki.ca_pem.clone(),
        ca_key_pem: pki.ca_key_pem.clone(),
        sa_key: pki.sa_key.clone(),
        signing_duration: cfg.signing_duration,
        services: cfg.services.clone(),
        kubelet_tls: crate::tls::kubelet_client_config(
            (&pki.kubelet_client_pem, &pki.kubelet_client_key_pem),
            &pki.ca_pem,
        )?,
    });
    let app = router(st.clone());
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("listening on {}", cfg.listen))?;
    let addr = listener.local_addr()?;
    let shown = if addr.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], addr.port()))
    } else {
        addr
    };
    seed_kubernetes_service(st.store.as_ref(), &cfg.services, advertise(addr)).await?;
    seed_dns_service(st.store.as_ref(), &cfg.services).await;
    seed_storage_class(st.store.as_ref()).await;
    let kc = pki::kubeconfig(&format!("https://{shown}"), &pki.ca_pem, &pki.admin_token);
    // Agents join with this token: it lets them ask for their node's certificate.
    pki::write_private(&cfg.data_dir.join("node-token"), &pki.node_token)?;
    pki::write_private(&cfg.data_dir.join("kubeconfig.yaml"), &kc)?;
    if let Some(r) = &cfg.ready {
        r.notify_one();
    }
    tracing::info!(%addr, kubeconfig = %cfg.data_dir.join("kubeconfig.yaml").display(), "API server serving");
    crate::systemd::notify("READY=1");
    let mut extra = Vec::new();
    for fd in &cfg.listen_fds {
        let l = inherited_listener(*fd)?;
        tracing::info!(addr = ?l.local_addr().ok(), fd, "also serving on an inherited socket");
        extra.push(tokio::spawn(crate::tls::serve(
            l,
            tls.clone(),
            app.clone(),
            std::future::pending(),
        )));
    }
    crate::tls::serve(listener, tls, app, shutdown).await;
    extra.iter().for_each(|t| t.abort());
    compaction.abort();
    csr_cleaner.abort();
    root_ca.abort();
    Ok(())
}

/// Takes over an inherited file descriptor that must be a listening TCP socket.
fn inherited_listener(fd: i32) -> anyhow::Result<tokio::net::TcpListener> {
    use nix::sys::socket::{SockaddrStorage, getsockname, getsockopt, sockopt};
    use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd};
    // SAFETY: fcntl(F_GETFD) only asks whether the descriptor is open.
    let open = fd > 2 && unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0;
    anyhow::ensure!(open, "--listen-fd {fd}: not an open file descriptor");
    // SAFETY: the descriptor is open (checked above) and was handed to this process to own.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    let listening = getsockopt(&borrowed, sockopt::AcceptConn).unwrap_or(false);
    let inet = getsockname::<SockaddrStorage>(borrowed.as_raw_fd())
        .ok()
        .is_some_and(|a| a.as_sockaddr_in().is_some() || a.as_sockaddr_in6().is_some());
    anyhow::ensure!(
        listening && inet,
        "--listen-fd {fd}: not a listening TCP socket"
    );
    // SAFETY: as above; from here on the listener owns the descriptor.
    let l = unsafe { std::net::TcpListener::from_raw_fd(fd) };
    l.set_nonblocking(true)?;
    Ok(tokio::net::TcpListener::from_std(l)?)
}

/// Serving TLS; clients may present a certificate from the cluster CA (nodes do).
fn tls_config(p: &pki::Pki) -> anyhow::Result<rustls::ServerConfig> {
    crate::tls::server_config(&p.cert_pem, &p.key_pem, Some(&p.ca_pem))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_kubernetes_slice_follows_the_advertised_address() {
        let dir = tempfile::tempdir().unwrap();
        let store = Embedded::open(&dir.path().join("s.redb")).unwrap();
        let net = alloc::ServiceNet::default();
        let slice = &registry::find("discovery.k8s.io", "v1", "endpointslices")
            .unwrap()
            .key(Some("default"), "kubernetes");
        seed_kubernetes_service(&store, &net, "10.250.0.1:6443".parse().unwrap())
            .await
            .unwrap();
        let kv = store
            .get(slice)
            .await
            .unwrap()
            .expect("a routable address gets a slice");
        let v: serde_json::Value = serde_json::from_slice(&kv.value).unwrap();
        assert_eq!(v["endpoints"][0]["addresses"][0], "10.250.0.1");
        // Restarted on loopback: no slice (no other namespace reaches it), and the old one goes.
        seed_kubernetes_service(&store, &net, "127.0.0.1:6443".parse().unwrap())
            .await
            .unwrap();
        assert!(store.get(slice).await.unwrap().is_none());
        let ep = store
            .get(
                &registry::find("", "v1", "endpoints")
                    .unwrap()
                    .key(Some("default"), "kubernetes"),
            )
            .await
            .unwrap()
            .unwrap();
        let ep: serde_json::Value = serde_json::from_slice(&ep.value).unwrap();
        assert_eq!(ep["subsets"][0]["addresses"][0]["ip"], "127.0.0.1");
        // And again: nothing to delete is fine.
        seed_kubernetes_service(&store, &net, "127.0.0.1:6443".parse().unwrap())
            .await
            .unwrap();
    }
}
