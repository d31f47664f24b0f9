//! Priority and preemption on the workloads lab: a pod of a higher PriorityClass that fits
//! nowhere takes the place of a lower one.

use crate::common::{BUSYBOX, Kubectl, cluster::Cluster};

/// A node's allocatable CPU in millicores.
fn allocatable_millicores(c: &Cluster, node: &str) -> i64 {
    let cpu = c.field("node", node, "{.status.allocatable.cpu}");
    match cpu.strip_suffix('m') {
        Some(m) => m.parse().unwrap_or(0),
        None => cpu.parse::<i64>().unwrap_or(0) * 1000,
    }
}

/// Two low-priority pods each take most of a node's CPU; a high-priority one that fits
/// nowhere preempts one of them (Preempted event, DisruptionTarget condition), is nominated
/// and runs; the evicted one's replacement waits.
pub fn a_higher_priority_pod_preempts_a_lower_one(c: &Cluster) {
    let cpu = c
        .nodes
        .iter()
        .map(|n| allocatable_millicores(c, n))
        .min()
        .unwrap_or(0)
        * 3
        / 4;
    assert!(cpu > 0, "nodes report allocatable CPU");
    c.apply("apiVersion: scheduling.k8s.io/v1\nkind: PriorityClass\nmetadata: {name: low}\nvalue: 100\n---\napiVersion: scheduling.k8s.io/v1\nkind: PriorityClass\nmetadata: {name: high}\nvalue: 1000\n");
    // The pod spec's fields after `priorityClassName`, at `i` spaces.
    let container = |i: usize| {
        let p = " ".repeat(i);
        format!(
            "{p}terminationGracePeriodSeconds: 1\n{p}containers:\n{p}- name: c\n{p}  image: {BUSYBOX}\n{p}  command: [\"sh\", \"-c\", \"exec sleep 3600\"]\n{p}  resources: {{requests: {{cpu: {cpu}m}}}}\n"
        )
    };
    c.apply(&format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: filler}}\nspec:\n  replicas: {}\n  selector: {{matchLabels: {{app: filler}}}}\n  template:\n    metadata: {{labels: {{app: filler}}}}\n    spec:\n      priorityClassName: low\n{}",
        c.nodes.len(),
        container(6)
    ));
    let running = |app: &str| {
        c.sorted_words(
            &[
                "get",
                "pods",
                "-l",
                &format!("app={app}"),
                "--field-selector=status.phase=Running",
            ],
            "{.items[*].metadata.name}",
        )
    };
    c.until(90, "a filler pod on every node", || {
        running("filler").len() == c.nodes.len()
    });
    let before = running("filler");
    c.apply(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: vip, labels: {{app: vip}}}}\nspec:\n  priorityClassName: high\n{}",
        container(2)
    ));
    let mut nominated = String::new();
    c.until(90, "the high-priority pod running", || {
        let n = c.field("pod", "vip", "{.status.nominatedNodeName}");
        if !n.is_empty() {
            nominated = n;
        }
        running("vip").len() == 1
    });
    assert_eq!(c.field("pod", "vip", "{.spec.priority}"), "1000");
    let node = c.field("pod", "vip", "{.spec.nodeName}");
    assert_eq!(nominated, node, "nominated where it runs");
    let events = c.ok(&["get", "events", "--field-selector", "reason=Preempted"]);
    assert!(events.contains("Preempted by pod"), "{events}");
    // One filler went; its replacement fits nowhere (each node is taken) and waits.
    let after = running("filler");
    assert_eq!(after.len(), c.nodes.len() - 1, "{after:?}");
    assert!(
        after.iter().all(|p| before.contains(p)),
        "the survivor kept running"
    );
    let pending = c.sorted_words(
        &[
            "get",
            "pods",
            "-l",
            "app=filler",
            "--field-selector=status.phase=Pending",
        ],
        "{.items[*].metadata.name}",
    );
    assert_eq!(pending.len(), 1, "the replacement waits: {pending:?}");
    c.ok(&["delete", "deployment", "filler"]);
    c.ok(&["delete", "pod", "vip", "--wait=false"]);
    c.ok(&["delete", "priorityclass", "low", "high"]);
}
