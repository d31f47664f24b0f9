//! The controllers of the control plane, each a loop over the shared caches that writes only
//! through the API server: ReplicaSets, Deployments, DaemonSets, Jobs, CronJobs, StatefulSets,
//! volume binding and provisioning, disruption budgets, namespace deletion, Endpoints and EndpointSlices, node
//! lifecycle and IPAM, garbage collection and default ServiceAccounts.

pub mod cronjob;
pub mod daemonset;
pub mod deployment;
pub mod disruption;
pub mod endpoints;
pub mod gc;
pub mod job;
pub mod namespace;
pub mod node;
pub mod replicaset;
pub mod statefulset;
pub mod volume;

use kube::Client;
use tokio::sync::watch;

use crate::control::Caches;

/// The controllers' settings (kube-controller-manager's flags).
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    pub node: node::Options,
    /// The CronJob controller's clock (a test clock may run faster than the real one).
    pub cron_clock: cronjob::Clock,
}

/// Runs every controller while `leading` is true (returns never).
pub async fn run(client: Client, caches: Caches, leading: watch::Receiver<bool>, opts: Options) {
    tokio::join!(
        replicaset::run(client.clone(), caches.clone(), leading.clone()),
        deployment::run(client.clone(), caches.clone(), leading.clone()),
        endpoints::run(client.clone(), caches.clone(), leading.clone()),
        node::run(client.clone(), caches.clone(), leading.clone(), opts.node),
        gc::run(client.clone(), caches.clone(), leading.clone()),
        daemonset::run(client.clone(), caches.clone(), leading.clone()),
        job::run(client.clone(), caches.clone(), leading.clone()),
        cronjob::run(
            client.clone(),
            caches.clone(),
            leading.clone(),
            opts.cron_clock
        ),
        statefulset::run(client.clone(), caches.clone(), leading.clone()),
        volume::run(client.clone(), caches.clone(), leading.clone()),
        disruption::run(client.clone(), caches.clone(), leading.clone()),
        namespace::run(client.clone(), caches.clone(), leading.clone()),
    );
}
