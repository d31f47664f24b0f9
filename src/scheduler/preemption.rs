//! Preemption (kube-scheduler's DefaultPreemption): a pod that fits nowhere may evict pods of
//! lower priority from one node. For each node, every lower-priority pod is removed in thought;
//! if the pod then fits, victims are let back in from the highest priority down while it still
//! fits, and those that cannot be are the node's victims. The node whose victims matter least
//! wins: the lowest highest victim priority, then the smallest sum of priorities, then the
//! fewest victims.

use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;

use super::NodeInfo;

pub fn priority(p: &Pod) -> i32 {
    p.spec.as_ref().and_then(|s| s.priority).unwrap_or(0)
}

/// Whether `p` may preempt at all (`preemptionPolicy: Never` may not), and not while pods it
/// already evicted on its nominated node are still going (kube's PodEligibleToPreemptOthers).
pub fn eligible(p: &Pod, nominated: Option<&str>, infos: &[NodeInfo]) -> bool {
    if p.spec.as_ref().and_then(|s| s.preemption_policy.as_deref()) == Some("Never") {
        return false;
    }
    let Some(nominated) = nominated else {
        return true;
    };
    let mine = priority(p);
    !infos
        .iter()
        .filter(|ni| ni.node.metadata.name.as_deref() == Some(nominated))
        .flat_map(|ni| ni.members.iter())
        .any(|v| v.metadata.deletion_timestamp.is_some() && priority(v) < mine)
}

/// How much a node's victims matter: their highest priority, the sum of their priorities,
/// how many they are (lower is better, in this order).
type Cost = (i32, i64, usize);

/// The node to preempt on and its victims, if removing lower-priority pods lets `p` fit
/// somewhere; `fits` runs the filters.
pub fn plan(
    p: &Pod,
    infos: &[NodeInfo],
    fits: impl Fn(&NodeInfo) -> bool,
) -> Option<(usize, Vec<Arc<Pod>>)> {
    let mine = priority(p);
    let mut best: Option<(Cost, usize, Vec<Arc<Pod>>)> = None;
    for (i, ni) in infos.iter().enumerate() {
        let mut lower: Vec<Arc<Pod>> = ni
            .members
            .iter()
            .filter(|v| priority(v) < mine && v.metadata.deletion_timestamp.is_none())
            .cloned()
            .collect();
        if lower.is_empty() {
            continue;
        }
        let uid = |v: &Pod| v.metadata.uid.clone().unwrap_or_default();
        let gone: Vec<String> = lower.iter().map(|v| uid(v)).collect();
        let mut cur = ni.without(&gone);
        if !fits(&cur) {
            continue;
        }
        // Reprieve from the highest priority down.
        lower.sort_by_key(|v| std::cmp::Reverse(priority(v)));
        let mut victims = vec![];
        for v in lower {
            let mut with = cur.clone();
            with.add_member(v.clone());
            if fits(&with) {
                cur = with;
            } else {
                victims.push(v);
            }
        }
        if victims.is_empty() {
            continue;
        }
        let key: Cost = (
            victims.iter().map(|v| priority(v)).max().unwrap_or(0),
            victims.iter().map(|v| i64::from(priority(v))).sum(),
            victims.len(),
        );
        if best.as_ref().is_none_or(|(k, ..)| key < *k) {
            best = Some((key, i, victims));
        }
    }
    best.map(|(_, i, v)| (i, v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::{filter, pod_request};

    fn node(name: &str, cpu: &str) -> Arc<k8s_openapi::api::core::v1::Node> {
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": name},
                "status": {"allocatable": {"cpu": cpu, "memory": "1Gi", "pods": "10"},
                           "conditions": [{"type": "Ready", "status": "True"}]},
            }))
            .unwrap(),
        )
    }

    fn pod(name: &str, cpu: &str, priority: i32) -> Arc<Pod> {
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "uid": name},
                "spec": {"priority": priority, "containers": [{"name": "c", "image": "x",
                          "resources": {"requests": {"cpu": cpu}}}]},
            }))
            .unwrap(),
        )
    }

    fn info(name: &str, cpu: &str, pods: &[Arc<Pod>]) -> NodeInfo {
        let mut ni = NodeInfo::new(node(name, cpu));
        for p in pods {
            ni.add_member(p.clone());
        }
        ni
    }

    fn names(v: &[Arc<Pod>]) -> Vec<String> {
        let mut n: Vec<String> = v.iter().filter_map(|p| p.metadata.name.clone()).collect();
        n.sort();
        n
    }

    #[test]
    fn the_fewest_and_least_important_victims_are_chosen() {
        let high = pod("high", "600m", 100);
        let fits = |ni: &NodeInfo| filter(&high, pod_request(&high), ni, None).is_ok();
        let infos = [
            // Needs both 500m pods of priority 50 gone.
            info("n1", "1", &[pod("a", "500m", 50), pod("b", "500m", 50)]),
            // One 500m pod of priority 10 is enough; the 100m one of priority 5 is reprieved.
            info("n2", "1", &[pod("c", "500m", 10), pod("d", "100m", 5)]),
        ];
        let (i, victims) = plan(&high, &infos, fits).expect("a node to preempt on");
        assert_eq!(i, 1);
        assert_eq!(names(&victims), ["c"]);
    }

    #[test]
    fn equal_or_higher_priorities_are_never_victims() {
        let p = pod("p", "600m", 100);
        let fits = |ni: &NodeInfo| filter(&p, pod_request(&p), ni, None).is_ok();
        let infos = [info(
            "n1",
            "1",
            &[pod("same", "500m", 100), pod("low", "100m", 1)],
        )];
        assert!(
            plan(&p, &infos, fits).is_none(),
            "removing the low one is not enough"
        );
    }

    #[test]
    fn never_and_pending_evictions_make_a_pod_ineligible() {
        let mut never = (*pod("n", "1", 100)).clone();
        never.spec.as_mut().unwrap().preemption_policy = Some("Never".into());
        assert!(!eligible(&never, None, &[]));
        let nominated = (*pod("x", "1", 100)).clone();
        let mut going = (*pod("going", "500m", 1)).clone();
        going.metadata.deletion_timestamp = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::UNIX_EPOCH),
        );
        let infos = [info("n1", "1", &[Arc::new(going)])];
        assert!(!eligible(&nominated, Some("n1"), &infos));
        assert!(eligible(&nominated, Some("n1"), &[info("n1", "1", &[])]));
        assert!(eligible(&nominated, None, &infos));
    }
}
