//! Launches the control-plane actors: the scheduler and the controllers, each under its own
//! leader-election lease, over one set of shared caches. `control/` is the toolkit they are
//! built from; this is the one place that knows which actors exist.

use kube::Client;

use crate::control::{Caches, leader};

/// Which actors a process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Actors {
    Scheduler,
    Controllers,
    Both,
}

/// Runs the chosen actors, each under its own leader-election lease.
pub async fn run(
    client: Client,
    actors: Actors,
    election: leader::Config,
    opts: crate::controllers::Options,
) {
    let host = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().to_string())
        .unwrap_or_default();
    let mut id = [0u8; 4];
    let _ = getrandom::fill(&mut id);
    let identity = format!("{host}_{}_{}", std::process::id(), hex::encode(id));
    let caches = Caches::start(&client);
    let sched = async {
        if actors != Actors::Controllers {
            let leading = leader::elect(
                client.clone(),
                "kube-scheduler".into(),
                identity.clone(),
                election,
            );
            crate::scheduler::run(client.clone(), caches.clone(), leading).await;
        }
    };
    let ctrl = async {
        if actors != Actors::Scheduler {
            let leading = leader::elect(
                client.clone(),
                "kube-controller-manager".into(),
                identity.clone(),
                election,
            );
            crate::controllers::run(client.clone(), caches.clone(), leading, opts).await;
        }
    };
    tokio::join!(sched, ctrl);
}
