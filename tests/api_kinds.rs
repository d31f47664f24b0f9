//! Kinds the ecosystem expects of kube-apiserver beyond workloads, with the real kubectl
//! against `keelson server`: PriorityClasses (the system ones seeded, validation, the Priority
//! admission giving pods their priority, the single global default) and the local APIServices
//! `kubectl get apiservices` lists.
mod common;

use std::process::Output;

use common::{Kubectl, Server};

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// Creates `yaml` expecting a refusal; kubectl's error.
fn refused(s: &Server, file: &str, yaml: &str) -> String {
    let o = s.kubectl(&["create", "-f", &s.write(file, yaml)]);
    assert!(!o.status.success(), "{file} was accepted");
    stderr(&o)
}

fn pod(name: &str, class: Option<&str>) -> String {
    let class = class
        .map(|c| format!("  priorityClassName: {c}\n"))
        .unwrap_or_default();
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec:\n{class}  containers: [{{name: c, image: busybox}}]\n"
    )
}

fn class(name: &str, value: i64, extra: &str) -> String {
    format!(
        "apiVersion: scheduling.k8s.io/v1\nkind: PriorityClass\nmetadata: {{name: {name}}}\nvalue: {value}\n{extra}"
    )
}

#[test]
fn priority_classes_and_api_services() {
    let s = Server::start(&[]);
    crate::scenarios!(&s;
        the_system_classes_are_there_with_kubectls_columns,
        a_pod_gets_its_class_priority_and_an_unknown_class_is_forbidden,
        classes_are_validated_as_kube_apiserver_does,
        one_global_default_gives_classless_pods_its_priority,
        the_served_groups_are_listed_as_local_api_services,
    );
}

fn the_system_classes_are_there_with_kubectls_columns(s: &Server) {
    let table = s.ok(&["get", "priorityclasses"]);
    let header: Vec<&str> = table
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        ["NAME", "VALUE", "GLOBAL-DEFAULT", "AGE", "PREEMPTIONPOLICY"],
        "{table}"
    );
    let row = |n: &str| {
        table
            .lines()
            .find(|l| l.starts_with(n))
            .map(|l| l.split_whitespace().map(String::from).collect::<Vec<_>>())
            .unwrap_or_default()
    };
    assert_eq!(
        row("system-node-critical")[1..3],
        ["2000001000", "false"],
        "{table}"
    );
    assert_eq!(row("system-cluster-critical")[1], "2000000000", "{table}");
    assert_eq!(
        s.ok(&["get", "pc", "-o", "name"]).lines().count(),
        2,
        "short name pc"
    );
}

fn a_pod_gets_its_class_priority_and_an_unknown_class_is_forbidden(s: &Server) {
    s.ok(&[
        "create",
        "-f",
        &s.write(
            "high.yaml",
            &class("high", 1000, "preemptionPolicy: Never\n"),
        ),
    ]);
    s.ok(&[
        "create",
        "-f",
        &s.write("p-high.yaml", &pod("p-high", Some("high"))),
    ]);
    assert_eq!(s.field("pod", "p-high", "{.spec.priority}"), "1000");
    assert_eq!(
        s.field("pod", "p-high", "{.spec.preemptionPolicy}"),
        "Never"
    );
    s.ok(&[
        "create",
        "-f",
        &s.write("p-crit.yaml", &pod("p-crit", Some("system-node-critical"))),
    ]);
    assert_eq!(s.field("pod", "p-crit", "{.spec.priority}"), "2000001000");
    let e = refused(s, "p-nope.yaml", &pod("p-nope", Some("nope")));
    assert!(
        e.contains("pods \"p-nope\" is forbidden: no PriorityClass with name nope was found"),
        "{e}"
    );
    // A priority of its own that the class does not give is refused.
    let own = pod("p-own", Some("high")).replace("  containers:", "  priority: 7\n  containers:");
    let e = refused(s, "p-own.yaml", &own);
    assert!(
        e.contains("the integer value of priority (7) must not be provided in pod spec"),
        "{e}"
    );
}

fn classes_are_validated_as_kube_apiserver_does(s: &Server) {
    let e = refused(s, "big.yaml", &class("big", 2_000_000_000, ""));
    assert!(
        e.contains("maximum allowed value of a user defined priority is 1000000000"),
        "{e}"
    );
    let e = refused(s, "sys.yaml", &class("system-mine", 5, ""));
    assert!(
        e.contains("priority class names with 'system-' prefix are reserved"),
        "{e}"
    );
    let e = refused(
        s,
        "policy.yaml",
        &class("odd", 5, "preemptionPolicy: Sometimes\n"),
    );
    assert!(
        e.contains("preemptionPolicy: Unsupported value: \"Sometimes\""),
        "{e}"
    );
    let o = s.kubectl(&[
        "patch",
        "pc",
        "high",
        "--type=merge",
        "-p",
        "{\"value\": 2000}",
    ]);
    assert!(
        stderr(&o).contains("value: Forbidden: may not be changed in an update."),
        "{}",
        stderr(&o)
    );
}

fn one_global_default_gives_classless_pods_its_priority(s: &Server) {
    s.ok(&[
        "create",
        "-f",
        &s.write("base.yaml", &class("base", 10, "globalDefault: true\n")),
    ]);
    s.ok(&[
        "create",
        "-f",
        &s.write("p-plain.yaml", &pod("p-plain", None)),
    ]);
    assert_eq!(s.field("pod", "p-plain", "{.spec.priority}"), "10");
    assert_eq!(
        s.field("pod", "p-plain", "{.spec.priorityClassName}"),
        "base"
    );
    let e = refused(
        s,
        "second.yaml",
        &class("second", 20, "globalDefault: true\n"),
    );
    assert!(
        e.contains("PriorityClass base is already marked as default. Only one default can exist"),
        "{e}"
    );
    let table = s.ok(&["get", "pc", "base"]);
    assert!(
        table.lines().nth(1).is_some_and(|l| l.contains(" true ")),
        "{table}"
    );
}

fn the_served_groups_are_listed_as_local_api_services(s: &Server) {
    let table = s.ok(&["get", "apiservices"]);
    let row = table
        .lines()
        .find(|l| l.starts_with("v1.apps "))
        .unwrap_or_else(|| panic!("{table}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cells[1..3], ["Local", "True"], "{table}");
    assert!(
        table.lines().any(|l| l.starts_with("v1. ")),
        "the core group: {table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("v1.scheduling.k8s.io ")),
        "{table}"
    );
    let group = s.ok(&[
        "get",
        "apiservice",
        "v1.batch",
        "-o",
        "jsonpath={.spec.group}",
    ]);
    assert_eq!(group, "batch");
}
