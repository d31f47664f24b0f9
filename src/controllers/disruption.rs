//! The disruption controller: each PodDisruptionBudget's status (healthy pods, how many must
//! stay, how many may go) from the pods it covers and the replicas their controllers want, as
//! `kinds::disruption::status` works it out; the eviction subresource reads it.

use std::time::Duration;

use k8s_openapi::api::{core::v1::Pod, policy::v1::PodDisruptionBudget};
use kube::{Api, Client, api::PostParams};
use tokio::sync::watch;

use crate::{
    control::{
        Caches,
        runner::{self, Controller, PassError},
    },
    kinds::disruption::{covers, status},
};

pub async fn run(client: Client, caches: Caches, leading: watch::Receiver<bool>) {
    let c = Budgets {
        client,
        caches: caches.clone(),
    };
    runner::run(c, &caches, leading).await;
}

struct Budgets {
    client: Client,
    caches: Caches,
}

impl Controller for Budgets {
    fn name(&self) -> &'static str {
        "disruption-controller"
    }

    fn signals(&self, caches: &Caches) -> Vec<watch::Receiver<u64>> {
        vec![caches.budgets.changed.clone(), caches.pods.changed.clone()]
    }

    /// Disrupted pods expire without an event.
    fn period(&self) -> Duration {
        Duration::from_secs(5)
    }

    async fn pass(&mut self) -> Result<(), PassError> {
        let pods = self.caches.pods.all();
        for pdb in self.caches.budgets.all() {
            let mine: Vec<&Pod> = pods
                .iter()
                .map(|p| p.as_ref())
                .filter(|p| {
                    covers(&pdb, p)
                        && !matches!(
                            p.status.as_ref().and_then(|s| s.phase.as_deref()),
                            Some("Succeeded" | "Failed")
                        )
                })
                .collect();
            let expected = self.expected(&pdb, &mine);
            let st = status(&pdb, &mine, expected, jiff::Timestamp::now());
            let old = pdb.status.clone().unwrap_or_default();
            let same = |a: &k8s_openapi::api::policy::v1::PodDisruptionBudgetStatus| {
                (
                    a.observed_generation,
                    a.current_healthy,
                    a.desired_healthy,
                    a.expected_pods,
                    a.disruptions_allowed,
                    a.disrupted_pods.clone(),
                )
            };
            if same(&old) == same(&st) {
                continue;
            }
            // The whole status, conditional on the budget's resourceVersion: an eviction that
            // spent a disruption meanwhile is never overwritten (the next pass sees it).
            let ns = pdb.metadata.namespace.clone().unwrap_or_default();
            let name = pdb.metadata.name.clone().unwrap_or_default();
            let mut next = (*pdb).clone();
            next.status = Some(st);
            let api: Api<PodDisruptionBudget> = Api::namespaced(self.client.clone(), &ns);
            if let Err(e) = api
                .replace_status(&name, &PostParams::default(), &next)
                .await
            {
                tracing::debug!(pdb = %name, error = %e, "budget status");
            }
        }
        Ok(())
    }
}

impl Budgets {
    /// How many pods the budget expects: with an integer minAvailable the pods themselves,
    /// else the replicas their controllers (ReplicaSets, ReplicationControllers, StatefulSets)
    /// want, a pod without
    /// one counting once.
    fn expected(&self, pdb: &PodDisruptionBudget, pods: &[&Pod]) -> i64 {
        let spec = pdb.spec.clone().unwrap_or_default();
        if matches!(
            spec.min_available,
            Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(_))
        ) {
            return pods.len() as i64;
        }
        let mut seen = std::collections::HashSet::new();
        let mut total = 0i64;
        for p in pods {
            let owner = p
                .metadata
                .owner_references
                .iter()
                .flatten()
                .find(|r| r.controller == Some(true));
            let ns = p.metadata.namespace.as_deref();
            let replicas = owner.and_then(|r| match r.kind.as_str() {
                // A Deployment's ReplicaSets count as the Deployment (its replicas, once).
                "ReplicaSet" => self.caches.replicasets.get(ns, &r.name).and_then(|rs| {
                    let deploy = rs
                        .metadata
                        .owner_references
                        .iter()
                        .flatten()
                        .find(|o| o.controller == Some(true) && o.kind == "Deployment")
                        .and_then(|o| self.caches.deployments.get(ns, &o.name));
                    match deploy {
                        Some(d) => d.spec.as_ref()?.replicas,
                        None => rs.spec.as_ref()?.replicas,
                    }
                }),
                "ReplicationController" => self
                    .caches
                    .replication_controllers
                    .get(ns, &r.name)
                    .and_then(|o| o.spec.as_ref()?.replicas),
                "StatefulSet" => self
                    .caches
                    .statefulsets
                    .get(ns, &r.name)
                    .and_then(|o| o.spec.as_ref()?.replicas),
                _ => None,
            });
            let key = owner.map(|r| {
                // ReplicaSets of one Deployment share its count.
                let rs = (r.kind == "ReplicaSet")
                    .then(|| self.caches.replicasets.get(ns, &r.name))
                    .flatten();
                rs.and_then(|rs| {
                    rs.metadata
                        .owner_references
                        .iter()
                        .flatten()
                        .find(|o| o.controller == Some(true))
                        .map(|o| o.uid.clone())
                })
                .unwrap_or_else(|| r.uid.clone())
            });
            match (key, replicas) {
                (Some(k), Some(n)) => {
                    if seen.insert(k) {
                        total += i64::from(n);
                    }
                }
                _ => total += 1,
            }
        }
        total
    }
}
