//! What a Kubernetes object means, independent of who asks: validation and defaulting rules,
//! printing (Table columns, ages, pod status), quantities, QoS class, and the scheduling
//! predicates (taints, tolerations, node affinity). Every role uses it; it imports nothing else
//! of keelson, so the API server, scheduler and controllers never import the agent.

pub mod cron;
pub mod cronjob;
pub mod disruption;
pub mod dns;
pub mod history;
pub mod job;
pub mod namespace;
pub mod node;
pub mod pod;
pub mod print;
pub mod priority;
pub mod quantity;
pub mod replication;
pub mod scheduling;
pub mod selector;
pub mod statefulset;
pub mod storage;
pub mod validate;

/// The Kubernetes minor version keelson presents, as API server and as kubelet (kubectl picks
/// its client by it).
pub const KUBE_MINOR: &str = "32";

/// Whether the object's metadata holds finalizer `f`.
pub fn has_finalizer(
    m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    f: &str,
) -> bool {
    m.finalizers.iter().flatten().any(|x| x == f)
}
