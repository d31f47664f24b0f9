//! The agent joining a cluster: `keelson server` and `keelson agent --server … --token-file …`
//! in one node namespace (no route out), a private containerd, and the real kubectl run inside
//! that namespace, one lab for a list of scenarios: the node registers and turns Ready, a
//! Deployment's pods run on it and report their status, a deleted pod is stopped and removed and
//! replaced, kubectl logs reaches the node, ConfigMaps and Secrets reach a container, a crash loop
//! is a BackOff event, a static pod gets a mirror pod, and the kubelet API wants a credential.
mod common;

use std::process::Command;

use common::*;

/// The lab's node with the server it joined: kubectl runs in the node's namespace, and a
/// failure shows both logs.
#[test]
fn an_agent_joins_registers_and_runs_the_pods_bound_to_it() {
    let mut lab = Lab::start("join");
    let server = Server::builder()
        .netns(&lab.netns)
        .dir(lab.dir.path().join("server"))
        .listen("127.0.0.1:6443")
        .start();
    lab.join(&server, &[]);
    let s = Joined { lab, server };
    crate::scenarios!(&s;
        the_node_registers_with_its_facts_gets_a_pod_cidr_and_renews_its_lease,
        a_deployments_pods_run_here_and_report_ready_with_addresses_from_the_nodes_cidr,
        a_deleted_pod_is_stopped_and_removed_by_the_agent_and_replaced,
        kubectl_logs_goes_through_the_api_server_to_the_nodes_kubelet_api,
        config_maps_and_secrets_reach_the_container_as_files_and_environment,
        a_crash_loop_is_reported_as_a_back_off_event,
        a_static_pod_shows_up_as_a_mirror_pod_that_comes_back_until_its_manifest_goes,
        the_kubelet_api_wants_the_api_servers_credential,
    );
}

/// The reasons of the events about the object `name`.
fn events(s: &Joined, name: &str) -> String {
    s.jsonpath(
        &[
            "get",
            "events",
            "--field-selector",
            &format!("involvedObject.name={name}"),
        ],
        "{.items[*].reason}",
    )
}

/// The node registers with its facts, gets a pod CIDR and renews its lease.
fn the_node_registers_with_its_facts_gets_a_pod_cidr_and_renews_its_lease(s: &Joined) {
    s.until(30, "node1 Ready", || {
        s.kubectl(&["get", "node", "node1"])
            .stdout
            .windows(5)
            .any(|w| w == b"Ready")
    });
    let info = s.jsonpath(&["get", "node", "node1"],
        "{.status.nodeInfo.containerRuntimeVersion} {.status.nodeInfo.operatingSystem} {.metadata.labels.kubernetes\\.io/os} {.spec.podCIDR}",
    );
    assert!(info.starts_with("containerd://1.6"), "{info}");
    assert!(info.ends_with("linux linux 10.244.0.0/24"), "{info}");
    assert!(
        !s.jsonpath(&["get", "node", "node1"], "{.status.capacity.cpu}")
            .is_empty()
    );
    assert_eq!(
        s.jsonpath(
            &["get", "lease", "-n", "kube-node-lease", "node1"],
            "{.spec.holderIdentity}"
        ),
        "node1"
    );
}

/// A Deployment's pods run here and report Running/Ready with addresses from the node's CIDR.
fn a_deployments_pods_run_here_and_report_ready_with_addresses_from_the_nodes_cidr(s: &Joined) {
    s.ok(&[
        "create",
        "deployment",
        "web",
        &format!("--image={BUSYBOX}"),
        "--replicas=2",
        "--",
        "httpd",
        "-f",
        "-p",
        "8080",
        "-h",
        "/etc",
    ]);
    s.ok(&["rollout", "status", "deployment/web", "--timeout=90s"]);
    let ips = s.jsonpath(
        &["get", "pods", "-l", "app=web"],
        "{.items[*].status.podIP}",
    );
    let ips: Vec<&str> = ips.split_whitespace().collect();
    assert_eq!(ips.len(), 2, "{ips:?}");
    assert!(ips.iter().all(|ip| ip.starts_with("10.244.0.")), "{ips:?}");
    let body = s.lab.node_http(&format!("http://{}:8080/passwd", ips[0]));
    assert!(
        body.is_some_and(|b| b.contains("root:x:0:0")),
        "the pod serves on its IP"
    );
    let ready = s.jsonpath(
        &["get", "pods", "-l", "app=web"],
        "{.items[*].status.conditions[?(@.type==\"Ready\")].status}",
    );
    assert_eq!(ready, "True True");
}

/// A deleted pod is stopped by the agent, which then removes the object; the ReplicaSet
/// replaces it. Builds on the Deployment `web` of the scenario before.
fn a_deleted_pod_is_stopped_and_removed_by_the_agent_and_replaced(s: &Joined) {
    let victim = s.jsonpath(
        &["get", "pods", "-l", "app=web"],
        "{.items[0].metadata.name}",
    );
    let seen = events(s, &victim);
    for r in ["Scheduled", "Pulled", "Created", "Started"] {
        assert!(seen.split_whitespace().any(|x| x == r), "{r} in {seen}");
    }
    s.ok(&["delete", "pod", &victim, "--wait=false"]);
    s.until(60, "the deleted pod to disappear", || {
        !String::from_utf8_lossy(&s.kubectl(&["get", "pods", "-o", "name"]).stdout)
            .contains(&victim)
    });
    assert!(
        events(s, &victim).contains("Killing"),
        "{}",
        events(s, &victim)
    );
    s.ok(&["rollout", "status", "deployment/web", "--timeout=90s"]);
    s.until(60, "two Ready pods again", || {
        s.jsonpath(
            &["get", "pods", "-l", "app=web"],
            "{.items[*].status.conditions[?(@.type==\"Ready\")].status}",
        ) == "True True"
    });
}

/// kubectl logs goes through the API server to the node's kubelet API.
fn kubectl_logs_goes_through_the_api_server_to_the_nodes_kubelet_api(s: &Joined) {
    s.ok(&[
        "run",
        "talker",
        &format!("--image={BUSYBOX}"),
        "--restart=Never",
        "--command",
        "--",
        "sh",
        "-c",
        "for i in 1 2 3; do echo line $i; done; sleep 3600",
    ]);
    s.until(60, "talker's three lines", || {
        String::from_utf8_lossy(&s.kubectl(&["logs", "talker"]).stdout)
            == "line 1\nline 2\nline 3\n"
    });
    assert_eq!(s.ok(&["logs", "talker", "--tail=1"]), "line 3\n");
    assert_eq!(
        s.ok(&["logs", "talker", "-c", "talker", "--tail=2"]),
        "line 2\nline 3\n"
    );
    let stamped = s.ok(&["logs", "talker", "--timestamps", "--tail=1"]);
    assert!(
        stamped.starts_with("20") && stamped.trim_end().ends_with("Z line 3")
            || stamped.contains("Z line 3"),
        "{stamped}"
    );
    let follow = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", s.lab.netns))
        .args(["timeout", "3", "kubectl", "logs", "-f", "talker"])
        .env("KUBECONFIG", s.kubeconfig())
        .env("HOME", s.lab.dir.path())
        .output()
        .unwrap();
    assert_eq!(
        follow.status.code(),
        Some(124),
        "-f keeps following until stopped"
    );
    assert_eq!(
        String::from_utf8_lossy(&follow.stdout),
        "line 1\nline 2\nline 3\n"
    );
    let err =
        String::from_utf8_lossy(&s.kubectl(&["logs", "talker", "-c", "nope"]).stderr).to_string();
    assert!(
        err.contains("container nope is not valid for pod talker"),
        "{err}"
    );
}

/// ConfigMaps and Secrets reach the container as files and environment; a missing one is
/// CreateContainerConfigError until it exists.
fn config_maps_and_secrets_reach_the_container_as_files_and_environment(s: &Joined) {
    s.ok(&[
        "create",
        "configmap",
        "cfg",
        "--from-literal=color=blue",
        "--from-literal=size=L",
    ]);
    s.ok(&[
        "create",
        "secret",
        "generic",
        "pw",
        "--from-literal=pass=s3cr3t",
    ]);
    let pod = s.lab.dir.path().join("refs.yaml");
    std::fs::write(
        &pod,
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: refs}}\nspec:\n  restartPolicy: Never\n  containers:\n  - name: c\n    image: {BUSYBOX}\n    command: [sh, -c, 'echo env=$PASS/$CFG_size; cat /cfg/colour; echo; cat /sec/pass; echo; cat /late/x; echo; sleep 3600']\n    envFrom: [{{prefix: CFG_, configMapRef: {{name: cfg}}}}]\n    env: [{{name: PASS, valueFrom: {{secretKeyRef: {{name: pw, key: pass}}}}}}]\n    volumeMounts: [{{name: a, mountPath: /cfg}}, {{name: b, mountPath: /sec}}, {{name: l, mountPath: /late}}]\n  volumes:\n  - {{name: a, configMap: {{name: cfg, items: [{{key: color, path: colour}}]}}}}\n  - {{name: b, secret: {{secretName: pw}}}}\n  - {{name: l, configMap: {{name: late}}}}\n"
        ),
    )
    .unwrap();
    s.ok(&["create", "-f", pod.to_str().unwrap()]);
    s.until(
        60,
        "CreateContainerConfigError for the missing ConfigMap",
        || {
            s.jsonpath(
                &["get", "pod", "refs"],
                "{.status.containerStatuses[0].state.waiting.reason}",
            ) == "CreateContainerConfigError"
        },
    );
    let msg = s.jsonpath(
        &["get", "pod", "refs"],
        "{.status.containerStatuses[0].state.waiting.message}",
    );
    assert!(msg.contains("configmap \"late\" not found"), "{msg}");
    s.ok(&["create", "configmap", "late", "--from-literal=x=here"]);
    s.until(60, "the pod to start and print what it got", || {
        String::from_utf8_lossy(&s.kubectl(&["logs", "refs"]).stdout)
            == "env=s3cr3t/L\nblue\ns3cr3t\nhere\n"
    });
}

/// A crash loop is reported as a BackOff event.
fn a_crash_loop_is_reported_as_a_back_off_event(s: &Joined) {
    s.ok(&[
        "run",
        "crasher",
        &format!("--image={BUSYBOX}"),
        "--command",
        "--",
        "sh",
        "-c",
        "exit 1",
    ]);
    s.until(60, "a BackOff event for the crash loop", || {
        events(s, "crasher").contains("BackOff")
    });
}

/// A static pod beside the API pods shows up as a mirror pod with its status; a deleted
/// mirror comes back; removing the manifest removes the mirror.
fn a_static_pod_shows_up_as_a_mirror_pod_that_comes_back_until_its_manifest_goes(s: &Joined) {
    s.lab
        .write_manifest("static.yaml", &pod_yaml("static", "sleep 3600", "", ""));
    s.until(60, "the mirror pod, Running", || {
        s.kubectl(&[
            "get",
            "pod",
            "static-node1",
            "-o",
            "jsonpath={.status.phase}",
        ])
        .stdout
            == b"Running"
    });
    let ann = s.jsonpath(
        &["get", "pod", "static-node1"],
        "{.metadata.annotations.kubernetes\\.io/config\\.mirror}",
    );
    assert!(!ann.is_empty());
    let uid = s.jsonpath(&["get", "pod", "static-node1"], "{.metadata.uid}");
    s.ok(&["delete", "pod", "static-node1", "--wait=false"]);
    s.until(60, "a new mirror pod", || {
        let now = String::from_utf8_lossy(
            &s.kubectl(&[
                "get",
                "pod",
                "static-node1",
                "-o",
                "jsonpath={.metadata.uid}",
            ])
            .stdout,
        )
        .to_string();
        !now.is_empty() && now != uid
    });
    s.lab.remove_manifest("static.yaml");
    s.until(60, "the mirror pod to go", || {
        !String::from_utf8_lossy(&s.kubectl(&["get", "pods", "-o", "name"]).stdout)
            .contains("static-node1")
    });
}

/// The kubelet API wants the API server's credential.
fn the_kubelet_api_wants_the_api_servers_credential(s: &Joined) {
    let anon = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", s.lab.netns))
        .args([
            "curl",
            "-sk",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "https://10.244.0.1:10250/pods",
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&anon.stdout), "401");
}
