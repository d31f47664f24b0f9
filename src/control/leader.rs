//! Leader election on a `coordination.k8s.io/v1` Lease in kube-system, with client-go's
//! defaults: a lease lasts 15 s, the holder renews every 2 s and gives up leading when it could
//! not renew for 10 s. A standby takes the lease once it has expired.

use std::time::Duration;

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
};
use kube::{Api, Client, api::PostParams};
use tokio::sync::watch;

/// Lease timings.
#[derive(Debug, Clone, Copy)]
pub struct Config {
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// Competes for lease `name` as `identity`; the receiver says whether this process leads.
pub fn elect(client: Client, name: String, identity: String, cfg: Config) -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let api: Api<Lease> = Api::namespaced(client, "kube-system");
        let mut last_renew: Option<tokio::time::Instant> = None;
        loop {
            match try_acquire(&api, &name, &identity, &cfg).await {
                Ok(true) => {
                    if !*tx.borrow() {
                        tracing::info!(lease = %name, %identity, "became leader");
                    }
                    last_renew = Some(tokio::time::Instant::now());
                    let _ = tx.send_if_modified(|l| !std::mem::replace(l, true));
                }
                Ok(false) => {
                    last_renew = None;
                    let _ = tx.send_if_modified(|l| std::mem::replace(l, false));
                }
                Err(e) => {
                    tracing::debug!(lease = %name, error = %e, "lease renewal failed");
                    if last_renew.is_some_and(|t| t.elapsed() > cfg.renew_deadline) {
                        tracing::warn!(lease = %name, "lost the lease");
                        last_renew = None;
                        let _ = tx.send_if_modified(|l| std::mem::replace(l, false));
                    }
                }
            }
            if tx.is_closed() {
                return;
            }
            tokio::time::sleep(cfg.retry_period).await;
        }
    });
    rx
}

/// One round: take or renew the lease if it is free, expired or ours. `Ok(true)` = we hold it.
async fn try_acquire(api: &Api<Lease>, name: &str, me: &str, cfg: &Config) -> kube::Result<bool> {
    let now = jiff::Timestamp::now();
    let secs = cfg.lease_duration.as_secs() as i32;
    let Some(mut lease) = api.get_opt(name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(me.into()),
                lease_duration_seconds: Some(secs),
                acquire_time: Some(MicroTime(now)),
                renew_time: Some(MicroTime(now)),
                lease_transitions: Some(0),
                ..Default::default()
            }),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        };
    };
    let spec = lease.spec.get_or_insert_with(Default::default);
    let holder = spec.holder_identity.clone().unwrap_or_default();
    let expired = match (&spec.renew_time, spec.lease_duration_seconds) {
        (Some(t), Some(d)) => now.as_millisecond() > t.0.as_millisecond() + i64::from(d) * 1000,
        _ => true,
    };
    if holder != me && !holder.is_empty() && !expired {
        return Ok(false);
    }
    if holder != me {
        spec.holder_identity = Some(me.into());
        spec.acquire_time = Some(MicroTime(now));
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    }
    spec.lease_duration_seconds = Some(secs);
    spec.renew_time = Some(MicroTime(now));
    match api.replace(name, &PostParams::default(), &lease).await {
        Ok(_) => Ok(true),
        // Someone else renewed or took it first.
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}
