//! The one controller loop: once the caches have their first lists, a pass runs whenever a
//! cache the controller watches changes (a burst settles into one pass) and at least every
//! `period`, and only while this process holds the controllers' lease. Each pass runs in its
//! own tracing span, and a failed pass is logged and retried on the next trigger.

use std::{future::Future, time::Duration};

use tokio::sync::watch;
use tracing::Instrument;

use super::{Caches, next_pass};

/// Why a controller pass stopped short.
#[derive(Debug, thiserror::Error)]
pub enum PassError {
    #[error(transparent)]
    Api(#[from] kube::Error),
}

/// A controller: its name, what wakes it, and one pass over the caches.
pub trait Controller: Send {
    /// The name in logs and spans (kube-controller-manager's, e.g. `replicaset-controller`).
    fn name(&self) -> &'static str;
    /// The cache change signals that trigger a pass.
    fn signals(&self, caches: &Caches) -> Vec<watch::Receiver<u64>>;
    /// The longest time between passes (time-based rules: availability, grace periods).
    fn period(&self) -> Duration;
    /// One pass: look at the caches, write what differs.
    fn pass(&mut self) -> impl Future<Output = Result<(), PassError>> + Send;
    /// Leadership was lost: forget what this term observed.
    fn demoted(&mut self) {}
}

/// Runs `c` forever, as the module says.
pub async fn run<C: Controller>(mut c: C, caches: &Caches, leading: watch::Receiver<bool>) {
    caches.ready().await;
    let mut signals = c.signals(caches);
    loop {
        let mut refs: Vec<&mut watch::Receiver<u64>> = signals.iter_mut().collect();
        next_pass(&mut refs, c.period()).await;
        if !*leading.borrow() {
            c.demoted();
            continue;
        }
        let name = c.name();
        let span = tracing::debug_span!("controller", name);
        if let Err(e) = c.pass().instrument(span).await {
            tracing::debug!(controller = name, error = %e, "pass failed");
        }
    }
}
