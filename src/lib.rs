//! keelson: a Kubernetes node agent (kubelet + kube-proxy) with a thin control plane.

pub mod agent;
#[cfg(feature = "server")]
pub mod api;
pub mod control;
#[cfg(feature = "server")]
pub mod controllers;
pub mod dns;
pub mod kinds;
#[cfg(feature = "server")]
pub mod lab;
pub mod net;
pub mod proxy;
#[cfg(feature = "server")]
pub mod roles;
pub mod runtime;
#[cfg(feature = "server")]
pub mod scheduler;
#[cfg(feature = "server")]
pub mod store;
pub mod stream;
pub mod systemd;
pub mod tls;
