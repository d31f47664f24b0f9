//! The kubelet API: HTTPS on port 10250 (`--kubelet-port`) with kubelet's paths — `/healthz`,
//! `/pods`, `/containerLogs/NS/POD/CONTAINER`, `/metrics`, exec/attach/port-forward — for
//! callers that present a client certificate signed by `--client-ca-file` (the API server's
//! kubelet-client certificate, as kubelet's x509 authentication); no bearer credential is
//! accepted. `/healthz` needs none. The serving certificate is the one the cluster issued for
//! the node (`bootstrap::serving_certificate`), else self-signed for its name and address.

use std::{net::SocketAddr, sync::Arc};

use anyhow::Context;
use axum::{
    extract::Request,
    http::StatusCode,
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
};

use super::AgentCtx;

/// Common names of API servers' kubelet-client certificates (keelson's and kubeadm's, so kind's;
/// k3s's carries `system:masters`).
const KUBELET_CLIENT_NAMES: &[&str] = &["kube-apiserver-kubelet-client", "system:kube-apiserver"];

async fn auth(req: Request, next: Next) -> Response {
    // Liveness checks of the agent (a DaemonSet's probe) carry no credential.
    if req.uri().path() == "/healthz" {
        return next.run(req).await;
    }
    // A certificate from the client CA is not enough (that CA signs node and user
    // certificates too): it must be the API server's kubelet client, by name, or a cluster
    // admin (kubelet asks a SubjectAccessReview for nodes/proxy; these are who holds it).
    let ok = req
        .extensions()
        .get::<crate::tls::ClientCertVerified>()
        .is_some_and(|c| {
            KUBELET_CLIENT_NAMES.contains(&c.common_name.as_str())
                || c.organizations.iter().any(|o| o == "system:masters")
        });
    if ok {
        next.run(req).await
    } else {
        (StatusCode::UNAUTHORIZED, "Unauthorized").into_response()
    }
}

/// Prometheus text: pods and containers running, restarts, ready pods.
fn metrics(ctx: &AgentCtx) -> String {
    let pods: Vec<k8s_openapi::api::core::v1::Pod> = ctx
        .store
        .read()
        .map(|s| s.values().cloned().collect())
        .unwrap_or_default();
    let statuses = || {
        pods.iter().flat_map(|p| {
            p.status
                .as_ref()
                .and_then(|s| s.container_statuses.clone())
                .unwrap_or_default()
        })
    };
    let running_pods = pods
        .iter()
        .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        .count();
    let running_containers = statuses()
        .filter(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()))
        .count();
    let restarts: i64 = statuses().map(|c| i64::from(c.restart_count)).sum();
    let ready = pods
        .iter()
        .filter(|p| crate::kinds::pod::pod_ready(p))
        .count();
    format!(
        "# HELP kubelet_running_pods Number of pods that have a running pod sandbox.\n# TYPE kubelet_running_pods gauge\nkubelet_running_pods {running_pods}\n\
         # HELP kubelet_running_containers Number of containers currently running.\n# TYPE kubelet_running_containers gauge\nkubelet_running_containers{{container_state=\"running\"}} {running_containers}\n\
         # HELP keelson_ready_pods Pods whose Ready condition is True.\n# TYPE keelson_ready_pods gauge\nkeelson_ready_pods {ready}\n\
         # HELP keelson_container_restarts_total Container restarts of the pods on this node.\n# TYPE keelson_container_restarts_total counter\nkeelson_container_restarts_total {restarts}\n{}",
        super::metrics::get().render()
    )
}

/// A self-signed serving certificate for the node's name and address (until the cluster
/// issues one).
pub fn self_signed(ctx: &AgentCtx) -> anyhow::Result<super::bootstrap::Credential> {
    let names = vec![ctx.cfg.node_name.clone(), ctx.cfg.node_ip.to_string()];
    let c = rcgen::generate_simple_self_signed(names).context("kubelet serving certificate")?;
    Ok(super::bootstrap::Credential {
        cert_pem: c.cert.pem(),
        key_pem: c.signing_key.serialize_pem(),
    })
}

/// Serves the kubelet API on `port` (all addresses of the agent's network namespace) with the
/// certificate `serving` holds (it may be replaced while serving) to callers with a
/// certificate from `client_ca`.
pub async fn start(
    ctx: Arc<AgentCtx>,
    port: u16,
    serving: Arc<crate::tls::CertSwitch>,
    client_ca: Option<String>,
) -> anyhow::Result<()> {
    let tls = crate::tls::switched_server_config(serving, client_ca.as_deref())
        .context("--client-ca-file")?;
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], port)))
        .await
        .with_context(|| format!("kubelet API on port {port}"))?;
    let m = ctx.clone();
    let app = super::server::router(ctx)
        .route(
            "/metrics",
            get(move || {
                let m = m.clone();
                async move { ([("content-type", "text/plain; version=0.0.4")], metrics(&m)) }
            }),
        )
        .layer(middleware::from_fn(auth));
    tracing::info!(port, "kubelet API serving");
    tokio::spawn(crate::tls::serve(
        listener,
        tls,
        app,
        std::future::pending(),
    ));
    Ok(())
}
