//! `pods/log`: the API server asks the pod's kubelet (`/containerLogs/...` on the node's
//! InternalIP and kubelet port) with its kubelet-client credential and streams the answer back,
//! so `kubectl logs` works with `-f`, `--tail`, `--previous`, `--timestamps` and `-c`.

use axum::{
    body::Body,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde_json::Value;

use super::{
    ApiState,
    handlers::{ApiError, decode},
    registry,
};

/// Query parameters passed on to the kubelet.
const PASSED: &[&str] = &[
    "follow",
    "tailLines",
    "timestamps",
    "previous",
    "sinceSeconds",
    "limitBytes",
];

pub(super) async fn proxy(
    st: &ApiState,
    pod: &Value,
    query: Option<&str>,
) -> Result<Response, ApiError> {
    let name = pod
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("");
    let ns = pod
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or("default");
    let params: Vec<(String, String)> = query
        .map(|q| {
            q.split('&')
                .map(|kv| {
                    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                    (k.to_string(), v.to_string())
                })
                .collect()
        })
        .unwrap_or_default();
    let requested = params
        .iter()
        .find(|(k, _)| k == "container")
        .map(|(_, v)| v.as_str());
    let container = container_of(pod, requested)?;
    let (addr, node) = kubelet_of(st, pod, name).await?;
    let passed: Vec<String> = params
        .iter()
        .filter(|(k, _)| PASSED.contains(&k.as_str()))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let path = format!(
        "/containerLogs/{ns}/{name}/{container}?{}",
        passed.join("&")
    );
    let resp = crate::tls::get(addr, &node, &st.kubelet_tls, &path)
        .await
        .map_err(|e| kubelet_unreachable(addr, &path, &e))?;
    let code = resp.status();
    if !code.is_success() {
        return Err(kubelet_error(resp).await);
    }
    Ok((
        StatusCode::OK,
        [("content-type", "text/plain")],
        Body::new(resp.into_body()),
    )
        .into_response())
}

/// The container a request names, or the pod's only container; an error naming the choices
/// otherwise (kube-apiserver's wording).
pub(super) fn container_of(pod: &Value, requested: Option<&str>) -> Result<String, ApiError> {
    let name = pod
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("");
    let names = |list: &str| -> Vec<String> {
        pod.pointer(&format!("/spec/{list}"))
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|c| c["name"].as_str().map(str::to_string))
            .collect()
    };
    let app = names("containers");
    let init = names("initContainers");
    let container = match requested.filter(|c| !c.is_empty()) {
        Some(c) => c.to_string(),
        None if app.len() == 1 => app[0].clone(),
        None => {
            let mut msg = format!(
                "a container name must be specified for pod {name}, choose one of: [{}]",
                app.join(" ")
            );
            if !init.is_empty() {
                msg += &format!(" or one of the init containers: [{}]", init.join(" "));
            }
            return Err(ApiError::bad_request(msg));
        }
    };
    if !app.contains(&container) && !init.contains(&container) {
        return Err(ApiError::bad_request(format!(
            "container {container} is not valid for pod {name}"
        )));
    }
    Ok(container)
}

/// The error for a kubelet that could not be reached.
pub(super) fn kubelet_unreachable(
    addr: std::net::SocketAddr,
    path: &str,
    e: &anyhow::Error,
) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "InternalError",
        format!("Get \"https://{addr}{path}\": {e:#}"),
    )
}

/// A kubelet's error answer, as an API error with the kubelet's message.
pub(super) async fn kubelet_error(resp: hyper::Response<hyper::body::Incoming>) -> ApiError {
    let code = resp.status();
    let body = axum::body::to_bytes(Body::new(resp.into_body()), 1 << 20)
        .await
        .unwrap_or_default();
    let msg = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(&body).trim().to_string());
    let code = StatusCode::from_u16(code.as_u16()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let reason = match code {
        StatusCode::NOT_FOUND => "NotFound",
        StatusCode::INTERNAL_SERVER_ERROR => "InternalError",
        _ => "BadRequest",
    };
    ApiError::new(code, reason, msg)
}

/// The kubelet API address of the pod's node (its InternalIP and kubelet port).
pub(super) async fn kubelet_of(
    st: &ApiState,
    pod: &Value,
    name: &str,
) -> Result<(std::net::SocketAddr, String), ApiError> {
    let node = pod
        .pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| {
            ApiError::bad_request(format!("pod {name} does not have a host assigned"))
        })?;
    let nodes =
        registry::find("", "v1", "nodes").ok_or_else(|| ApiError::internal("no nodes resource"))?;
    let kv = st
        .store
        .get(&nodes.key(None, node))
        .await
        .map_err(ApiError::internal)?
        .ok_or_else(|| {
            ApiError::bad_request(format!("node {node} of pod {name} is not registered"))
        })?;
    let n = decode(&kv)?;
    let ip = n
        .pointer("/status/addresses")
        .and_then(Value::as_array)
        .and_then(|a| a.iter().find(|x| x["type"] == "InternalIP"))
        .and_then(|x| x["address"].as_str())
        .and_then(|a| a.parse::<std::net::IpAddr>().ok())
        .ok_or_else(|| ApiError::bad_request(format!("node {node} has no InternalIP address")))?;
    let port = n
        .pointer("/status/daemonEndpoints/kubeletEndpoint/Port")
        .and_then(Value::as_u64)
        .and_then(|p| u16::try_from(p).ok())
        .unwrap_or(10250);
    Ok((std::net::SocketAddr::new(ip, port), node.to_string()))
}
