//! keelson: a Kubernetes node agent (kubelet + kube-proxy) with a thin control plane.

pub mod agent;
pub mod api;
pub mod control;
pub mod controllers;
pub mod lab;
pub mod net;
pub mod proxy;
pub mod runtime;
pub mod scheduler;
pub mod store;
pub mod stream;
pub mod systemd;
pub mod tls;
