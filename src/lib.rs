//! keelson: a Kubernetes node agent (kubelet + kube-proxy) with a thin control plane.

pub mod agent;
pub mod api;
pub mod net;
pub mod runtime;
pub mod store;
