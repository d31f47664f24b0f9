//! The controllers of the control plane, each a loop over the shared caches that writes only
//! through the API server: ReplicaSets, Deployments, Endpoints and EndpointSlices.

pub mod deployment;
pub mod endpoints;
pub mod replicaset;

use kube::Client;
use tokio::sync::watch;

use crate::control::Caches;

/// Runs every controller while `leading` is true (returns never).
pub async fn run(client: Client, caches: Caches, leading: watch::Receiver<bool>) {
    tokio::join!(
        replicaset::run(client.clone(), caches.clone(), leading.clone()),
        deployment::run(client.clone(), caches.clone(), leading.clone()),
        endpoints::run(client.clone(), caches.clone(), leading.clone()),
    );
}
