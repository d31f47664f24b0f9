//! The real kubectl (v1.32) against `keelson server`, one server per test for a list of
//! scenarios: HTTPS with the generated CA and admin token, version and discovery, the seeded
//! namespaces, create/get/replace/patch/delete/watch of ConfigMaps with kube-apiserver's errors,
//! validation and defaults, subresources and Service allocation; the node and service-account
//! authorizers; bad requests; protobuf clients; and data that survives a SIGKILL of the server.
mod common;

use std::{
    path::PathBuf,
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use common::{Kubectl, Server};

/// Makes a key and a request for `subject` (openssl) and creates the kubelet-client
/// CertificateSigningRequest `STEM-client` for it with the join token, its body claiming to
/// be `system:admin` in `system:masters`; the key's path.
fn bootstrap_request(s: &Server, stem: &str, subject: &str) -> PathBuf {
    use base64::Engine;
    let dir = s.dir();
    let (key, req) = (
        dir.join(format!("{stem}.key")),
        dir.join(format!("{stem}.csr")),
    );
    common::openssl_request(&key, &req, subject, &[]);
    let b64 = base64::engine::general_purpose::STANDARD.encode(std::fs::read(&req).unwrap());
    let csr = s.write(
        &format!("{stem}-csr.yaml"),
        &format!(
            "apiVersion: certificates.k8s.io/v1\nkind: CertificateSigningRequest\nmetadata: {{name: {stem}-client}}\nspec:\n  signerName: kubernetes.io/kube-apiserver-client-kubelet\n  usages: [digital signature, key encipherment, client auth]\n  username: system:admin\n  groups: [system:masters]\n  request: {b64}\n"
        ),
    );
    // Approval and signing happen in the create itself.
    s.ok(&[&format!("--token={}", s.node_token()), "create", "-f", &csr]);
    key
}

/// A kubeconfig for node `node` made as kubelet's TLS bootstrap does: a key and a request
/// for `system:node:NODE` (openssl), a CertificateSigningRequest created with the join
/// token, and the certificate the server issued for it.
fn node_kubeconfig(s: &Server, node: &str) -> PathBuf {
    use base64::Engine;
    let dir = s.dir();
    let key = bootstrap_request(s, node, &format!("/O=system:nodes/CN=system:node:{node}"));
    let token = format!("--token={}", s.node_token());
    // The requester is whoever created it, never what the body claims.
    assert_eq!(
        s.field(
            "csr",
            &format!("{node}-client"),
            "{.spec.username} {.spec.groups}"
        ),
        r#"system:bootstrap:keelson ["system:bootstrappers","system:authenticated"]"#
    );
    let cert = s.ok(&[
        &token,
        "get",
        "csr",
        &format!("{node}-client"),
        "-o",
        "jsonpath={.status.certificate}",
    ]);
    assert!(
        !cert.is_empty(),
        "the node client certificate is issued at once"
    );
    let cert = base64::engine::general_purpose::STANDARD
        .decode(cert)
        .unwrap();
    let text = common::client_cert_kubeconfig(
        &dir.join("kubeconfig.yaml"),
        &cert,
        &std::fs::read(&key).unwrap(),
    );
    s.write(&format!("{node}.kubeconfig"), &text).into()
}

const CM: &str = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\n  labels: {app: web}\ndata:\n  color: blue\n";

#[test]
fn kubectl_works_against_keelson_server() {
    let s = Server::start(&[]);
    crate::scenarios!(&s;
        kubectl_reads_the_server_version_and_the_seeded_namespaces_as_a_table,
        a_request_without_a_token_is_unauthorized,
        a_config_map_is_created_once_selected_by_label_and_listed_as_a_table,
        a_replace_with_a_stale_resource_version_is_a_conflict,
        an_invalid_name_is_rejected_with_the_field_named,
        apply_label_patches_server_side_apply_and_server_dry_run_work,
        kubectls_generators_send_protobuf_bodies,
        strict_field_validation_rejects_unknown_fields_and_warn_stores_without_them,
        pods_are_validated_and_defaulted_as_kube_apiserver_does,
        a_finalizer_holds_an_object_until_it_is_removed,
        a_pod_bound_to_a_node_stays_terminating_until_forced,
        a_namespace_takes_its_contents_along,
        a_namespace_stays_terminating_while_a_finalizer_is_held,
        scale_status_and_binding_subresources_write_only_their_part,
        services_get_a_cluster_ip_and_node_ports_a_taken_one_refused_until_freed,
        a_watch_sees_the_deletion,
    );
}

/// kubectl reads the server's version, and the seeded namespaces as a Table with kubectl's
/// columns.
fn kubectl_reads_the_server_version_and_the_seeded_namespaces_as_a_table(s: &Server) {
    let v: serde_json::Value = serde_json::from_str(&s.ok(&["version", "-o", "json"])).unwrap();
    assert_eq!(v["serverVersion"]["minor"], keelson::api::KUBE_MINOR);
    let ns = s.ok(&["get", "namespaces"]);
    for n in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        assert!(
            ns.lines().any(|l| l.starts_with(n) && l.contains("Active")),
            "{ns}"
        );
    }
    assert!(
        ns.starts_with("NAME"),
        "a Table with kubectl's columns: {ns}"
    );
}

/// No token, no access.
fn a_request_without_a_token_is_unauthorized(s: &Server) {
    let anon = Command::new("curl")
        .args(["-sk", &format!("{}/api/v1/namespaces", s.url())])
        .output()
        .unwrap();
    let anon: serde_json::Value = serde_json::from_slice(&anon.stdout).unwrap();
    assert_eq!(
        (anon["code"].as_i64(), anon["reason"].as_str()),
        (Some(401), Some("Unauthorized"))
    );
}

/// A ConfigMap is created once (again: AlreadyExists; in a missing namespace: NotFound), is
/// selected by labels, and is listed as a Table with kubectl's columns.
fn a_config_map_is_created_once_selected_by_label_and_listed_as_a_table(s: &Server) {
    let f = s.write("cm.yaml", CM);
    assert_eq!(
        s.ok(&["create", "-f", &f]).trim(),
        "configmap/settings created"
    );
    assert!(
        s.fails(&["create", "-f", &f])
            .contains("configmaps \"settings\" already exists")
    );
    assert!(
        s.fails(&["create", "-f", &f, "-n", "nowhere"])
            .contains("namespaces \"nowhere\" not found")
    );
    assert!(s.ok(&["get", "cm", "-l", "app=web"]).contains("settings"));
    assert!(
        !s.ok(&["get", "cm", "-l", "app in (api, db)"])
            .contains("settings")
    );
    let table = s.ok(&["get", "cm"]);
    assert!(
        table
            .lines()
            .next()
            .unwrap()
            .split_whitespace()
            .eq(["NAME", "DATA", "AGE"]),
        "{table}"
    );
    assert!(
        s.fails(&["get", "cm", "nope"])
            .contains("configmaps \"nope\" not found")
    );
}

/// Optimistic concurrency: a replace with a stale resourceVersion is a Conflict. Builds on the
/// ConfigMap `settings`.
fn a_replace_with_a_stale_resource_version_is_a_conflict(s: &Server) {
    let current = s.ok(&["get", "cm", "settings", "-o", "json"]);
    let stale = s.write("stale.json", &current.replace("\"blue\"", "\"green\""));
    s.ok(&["replace", "-f", &stale]);
    assert_eq!(s.field("cm", "settings", "{.data.color}"), "green");
    let err = s.fails(&["replace", "-f", &stale]);
    assert!(
        err.contains(
            "the object has been modified; please apply your changes to the latest version"
        ),
        "{err}"
    );
}

/// Invalid names are 422 with the field named.
fn an_invalid_name_is_rejected_with_the_field_named(s: &Server) {
    let bad = s.write("bad.yaml", &CM.replace("name: settings", "name: Bad_Name"));
    let err = s.fails(&["create", "-f", &bad]);
    assert!(
        err.contains("metadata.name: Invalid value: \"Bad_Name\""),
        "{err}"
    );
}

/// Patches: apply twice (strategic merge), label (merge patch), JSON patch, server-side
/// apply (create, then update), server dry-run. Builds on the ConfigMap `settings`, which it
/// deletes and applies again.
fn apply_label_patches_server_side_apply_and_server_dry_run_work(s: &Server) {
    let f = s.write("cm.yaml", CM);
    s.ok(&["delete", "cm", "settings"]);
    assert_eq!(
        s.ok(&["apply", "-f", &f]).trim(),
        "configmap/settings created"
    );
    let f2 = s.write("cm2.yaml", &CM.replace("color: blue", "color: red"));
    assert_eq!(
        s.ok(&["apply", "-f", &f2]).trim(),
        "configmap/settings configured"
    );
    s.ok(&["label", "cm", "settings", "tier=front"]);
    s.ok(&[
        "patch",
        "cm",
        "settings",
        "--type",
        "json",
        "-p",
        r#"[{"op":"add","path":"/data/size","value":"small"}]"#,
    ]);
    s.ok(&[
        "patch",
        "cm",
        "settings",
        "--type",
        "merge",
        "-p",
        r#"{"data":{"extra":"1"}}"#,
    ]);
    let data: serde_json::Value =
        serde_json::from_str(&s.field("cm", "settings", "{.data}")).unwrap();
    assert_eq!(
        data,
        serde_json::json!({"color": "red", "size": "small", "extra": "1"})
    );
    assert_eq!(
        s.field("cm", "settings", "{.metadata.labels.tier}"),
        "front"
    );
    let ssa = s.write("ssa.yaml", &CM.replace("name: settings", "name: ssa"));
    assert_eq!(
        s.ok(&["apply", "--server-side", "-f", &ssa]).trim(),
        "configmap/ssa serverside-applied"
    );
    let ssa2 = s.write(
        "ssa2.yaml",
        &CM.replace("name: settings", "name: ssa")
            .replace("blue", "teal"),
    );
    s.ok(&["apply", "--server-side", "-f", &ssa2]);
    assert_eq!(s.field("cm", "ssa", "{.data.color}"), "teal");
    let dry = s.write("dry.yaml", &CM.replace("name: settings", "name: dry"));
    assert!(
        s.ok(&["create", "-f", &dry, "--dry-run=server"])
            .contains("(server dry run)")
    );
    assert!(
        s.fails(&["get", "cm", "dry"]).contains("not found"),
        "a dry run stores nothing"
    );
}

/// kubectl's generators send protobuf bodies.
fn kubectls_generators_send_protobuf_bodies(s: &Server) {
    s.ok(&["create", "configmap", "proto", "--from-literal=a=b"]);
    assert_eq!(s.field("cm", "proto", "{.data.a}"), "b");
    s.ok(&["create", "secret", "generic", "psec", "--from-literal=x=yz"]);
    assert_eq!(
        s.field("secret", "psec", "{.data.x} {.type}"),
        "eXo= Opaque"
    );
    s.ok(&["create", "namespace", "pns"]);
    assert_eq!(s.field("ns", "pns", "{.status.phase}"), "Active");
    s.ok(&["create", "service", "nodeport", "psvc", "--tcp=80:8080"]);
    let got = s.field(
        "svc",
        "psvc",
        "{.spec.type} {.spec.ports[0].port} {.spec.ports[0].targetPort} {.spec.selector.app}",
    );
    assert_eq!(got, "NodePort 80 8080 psvc");
    assert!(!s.field("svc", "psvc", "{.spec.clusterIP}").is_empty());
    s.ok(&[
        "create",
        "deployment",
        "pdep",
        "--image=busybox:1.36",
        "--port=80",
        "--replicas=0",
        "--",
        "sleep",
        "3600",
    ]);
    let got = s.field(
        "deploy",
        "pdep",
        "{.spec.replicas} {.spec.selector.matchLabels.app} {.spec.strategy.type} {.spec.strategy.rollingUpdate.maxSurge} {.spec.revisionHistoryLimit} {.spec.progressDeadlineSeconds}",
    );
    assert_eq!(got, "0 pdep RollingUpdate 25% 10 600");
    let got = s.field(
        "deploy",
        "pdep",
        "{.spec.template.spec.containers[0].command} {.spec.template.spec.containers[0].ports[0].containerPort} {.spec.template.spec.restartPolicy} {.spec.template.metadata.creationTimestamp}",
    );
    assert_eq!(got, "[\"sleep\",\"3600\"] 80 Always ");
}

/// Strict field validation (kubectl's default) rejects unknown fields, naming them; with
/// --validate=warn the object is stored without them and kubectl prints a warning.
fn strict_field_validation_rejects_unknown_fields_and_warn_stores_without_them(s: &Server) {
    let typo = s.write(
        "typo.yaml",
        &CM.replace("name: settings", "name: typo")
            .replace("  labels:", "  lables:"),
    );
    let err = s.fails(&["create", "-f", &typo]);
    assert!(
        err.contains("strict decoding error: unknown field \"metadata.lables\""),
        "{err}"
    );
    let o = s.kubectl(&["create", "-f", &typo, "--validate=warn"]);
    assert!(o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("Warning: unknown field \"metadata.lables\"")
    );
}

/// Pods are validated and defaulted as kube-apiserver does.
fn pods_are_validated_and_defaulted_as_kube_apiserver_does(s: &Server) {
    let bad_pod = s.write(
        "badpod.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p1}\nspec:\n  containers:\n  - {name: c, image: busybox}\n  - {name: c}\n",
    );
    let err = s.fails(&["create", "-f", &bad_pod]);
    assert!(err.contains("The Pod \"p1\" is invalid"), "{err}");
    assert!(
        err.contains("spec.containers[1].name: Duplicate value: \"c\""),
        "{err}"
    );
    assert!(
        err.contains("spec.containers[1].image: Required value"),
        "{err}"
    );
    let pod = s.write(
        "pod.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p2}\nspec:\n  containers:\n  - name: c\n    image: busybox:1.36\n    ports: [{containerPort: 80}]\n",
    );
    s.ok(&["create", "-f", &pod]);
    let got = s.field("pod", "p2", "{.spec.restartPolicy} {.spec.containers[0].imagePullPolicy} {.spec.containers[0].ports[0].protocol} {.status.phase}");
    assert_eq!(got, "Always IfNotPresent TCP Pending");
    assert_eq!(
        s.field("pod", "p2", "{.spec.serviceAccountName}"),
        "default"
    );
    // DefaultTolerationSeconds: 300 s for not-ready and unreachable nodes.
    let got = s.field(
        "pod",
        "p2",
        "{.spec.tolerations[*].key} {.spec.tolerations[*].tolerationSeconds}",
    );
    assert_eq!(
        got,
        "node.kubernetes.io/not-ready node.kubernetes.io/unreachable 300 300"
    );
    let pods = s.ok(&["get", "pods"]);
    assert!(
        pods.lines()
            .next()
            .unwrap()
            .split_whitespace()
            .eq(["NAME", "READY", "STATUS", "RESTARTS", "AGE"]),
        "{pods}"
    );
}

/// Deletion: finalizers hold an object until they are removed.
fn a_finalizer_holds_an_object_until_it_is_removed(s: &Server) {
    let fin = s.write("fin.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: fin\n  finalizers: [example.com/hold]\n");
    s.ok(&["create", "-f", &fin]);
    s.ok(&["delete", "cm", "fin", "--wait=false"]);
    assert!(
        !s.field("cm", "fin", "{.metadata.deletionTimestamp}")
            .is_empty()
    );
    s.ok(&[
        "patch",
        "cm",
        "fin",
        "--type",
        "json",
        "-p",
        r#"[{"op":"remove","path":"/metadata/finalizers"}]"#,
    ]);
    assert!(s.fails(&["get", "cm", "fin"]).contains("not found"));
}

/// A pod bound to a node is found by a field selector on its node; deleted, it stays
/// Terminating for the node to finish; --force deletes it at once.
fn a_pod_bound_to_a_node_stays_terminating_until_forced(s: &Server) {
    let bound = s.write("bound.yaml", "apiVersion: v1\nkind: Pod\nmetadata: {name: bound}\nspec:\n  nodeName: n1\n  containers: [{name: c, image: busybox:1}]\n");
    s.ok(&["create", "-f", &bound]);
    assert!(
        s.ok(&["get", "pods", "--field-selector", "spec.nodeName=n1"])
            .contains("bound")
    );
    assert!(
        !s.ok(&["get", "pods", "--field-selector", "spec.nodeName=n2"])
            .contains("bound")
    );
    s.ok(&["delete", "pod", "bound", "--wait=false"]);
    assert!(s.ok(&["get", "pod", "bound"]).contains("Terminating"));
    assert_eq!(
        s.field("pod", "bound", "{.metadata.deletionGracePeriodSeconds}"),
        "30"
    );
    s.ok(&["delete", "pod", "bound", "--grace-period=0", "--force"]);
    assert!(s.fails(&["get", "pod", "bound"]).contains("not found"));
}

/// Deleting a namespace takes its contents along.
fn a_namespace_takes_its_contents_along(s: &Server) {
    let f = s.write("cm.yaml", CM);
    let ns = s.write(
        "ns.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: scratch}\n",
    );
    s.ok(&["create", "-f", &ns]);
    s.ok(&["create", "-f", &f, "-n", "scratch"]);
    s.ok(&["delete", "namespace", "scratch"]);
    assert!(
        s.ok(&["get", "cm", "-A"])
            .lines()
            .all(|l| !l.starts_with("scratch"))
    );
}

/// NamespaceLifecycle and the namespace controller: a deleted namespace turns Terminating,
/// its contents are deleted, one held by a finalizer keeps it (its conditions say which), new
/// content is refused, and it goes once the finalizer is removed.
fn a_namespace_stays_terminating_while_a_finalizer_is_held(s: &Server) {
    s.ok(&["create", "namespace", "held"]);
    s.ok(&["create", "configmap", "plain", "-n", "held"]);
    let pinned = s.write(
        "pinned.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: pinned, namespace: held, finalizers: [example.com/hold]}\n",
    );
    s.ok(&["create", "-f", &pinned]);
    s.ok(&["delete", "namespace", "held", "--wait=false"]);
    let phase = s.field("namespace", "held", "{.status.phase}");
    assert_eq!(phase, "Terminating");
    let cond = "{.status.conditions[?(@.type==\"NamespaceFinalizersRemaining\")].message}";
    s.until(30, "the namespace controller to report the held finalizer", || {
        s.field("namespace", "held", cond)
            == "Some content in the namespace has finalizers remaining: example.com/hold in 1 resource instances"
    });
    // What it could delete is gone; what is held is only marked.
    assert!(
        !s.kubectl(&["get", "cm", "plain", "-n", "held"])
            .status
            .success()
    );
    assert!(
        !s.jsonpath(
            &["get", "cm", "pinned", "-n", "held"],
            "{.metadata.deletionTimestamp}"
        )
        .is_empty()
    );
    let o = s.kubectl(&["create", "configmap", "late", "-n", "held"]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains(
            "unable to create new content in namespace held because it is being terminated"
        ),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    s.ok(&[
        "patch",
        "cm",
        "pinned",
        "-n",
        "held",
        "--type=merge",
        "-p",
        "{\"metadata\":{\"finalizers\":null}}",
    ]);
    s.until(30, "the namespace to go once nothing holds it", || {
        !s.kubectl(&["get", "namespace", "held"]).status.success()
    });
}

/// Subresources: scale, status (the main resource keeps its status), binding (once).
fn scale_status_and_binding_subresources_write_only_their_part(s: &Server) {
    let dep = s.write("dep.yaml", "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec:\n  replicas: 2\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    spec:\n      containers: [{name: web, image: nginx:1.27}]\n");
    s.ok(&["apply", "-f", &dep]);
    assert_eq!(
        s.ok(&["scale", "deployment", "web", "--replicas=5"]).trim(),
        "deployment.apps/web scaled"
    );
    assert_eq!(
        s.field("deploy", "web", "{.spec.replicas} {.metadata.generation}"),
        "5 2"
    );
    let unbound = s.write("unbound.yaml", "apiVersion: v1\nkind: Pod\nmetadata: {name: unbound}\nspec:\n  containers: [{name: c, image: busybox:1}]\n");
    s.ok(&["create", "-f", &unbound]);
    let binding = s.write("binding.json", r#"{"apiVersion":"v1","kind":"Binding","metadata":{"name":"unbound"},"target":{"kind":"Node","name":"n1"}}"#);
    s.ok(&[
        "create",
        "--raw",
        "/api/v1/namespaces/default/pods/unbound/binding",
        "-f",
        &binding,
    ]);
    assert_eq!(s.field("pod", "unbound", "{.spec.nodeName}"), "n1");
    let err = s.fails(&[
        "create",
        "--raw",
        "/api/v1/namespaces/default/pods/unbound/binding",
        "-f",
        &binding,
    ]);
    assert!(err.contains("is already assigned to node"), "{err}");
    s.ok(&[
        "patch",
        "pod",
        "unbound",
        "--subresource=status",
        "--type",
        "merge",
        "-p",
        r#"{"status":{"phase":"Running","podIP":"10.0.0.9"}}"#,
    ]);
    s.ok(&[
        "patch",
        "pod",
        "unbound",
        "--type",
        "merge",
        "-p",
        r#"{"status":{"phase":"Failed"}}"#,
    ]);
    assert_eq!(
        s.field("pod", "unbound", "{.status.phase} {.status.podIP}"),
        "Running 10.0.0.9"
    );
}

/// Services get a ClusterIP from the service range and node ports from the node-port range;
/// a taken port is refused and freed again when its Service goes. `kubernetes` is there.
fn services_get_a_cluster_ip_and_node_ports_a_taken_one_refused_until_freed(s: &Server) {
    let k = s.ok(&["get", "svc", "kubernetes"]);
    assert!(k.contains("10.96.0.1") && k.contains("443/TCP"), "{k}");
    let svc = s.write("svc.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  type: NodePort\n  selector: {app: web}\n  ports: [{port: 80, nodePort: 31000}]\n");
    s.ok(&["apply", "-f", &svc]);
    let ip = s.field("svc", "web", "{.spec.clusterIP}");
    assert!(ip.starts_with("10.9") && ip != "10.96.0.1", "{ip}");
    let row = s.ok(&["get", "svc", "web"]);
    assert!(
        row.contains("NodePort") && row.contains("80:31000/TCP"),
        "{row}"
    );
    let clash = s.write(
        "clash.yaml",
        &std::fs::read_to_string(&svc)
            .unwrap()
            .replace("name: web", "name: clash"),
    );
    let err = s.fails(&["apply", "-f", &clash]);
    assert!(
        err.contains(
            "spec.ports[0].nodePort: Invalid value: 31000: provided port is already allocated"
        ),
        "{err}"
    );
    s.ok(&["delete", "svc", "web"]);
    s.ok(&["apply", "-f", &clash]);
}

/// A watch sees the deletion. Builds on the ConfigMap `settings`.
fn a_watch_sees_the_deletion(s: &Server) {
    let mut w = Command::new("kubectl")
        .args([
            "get",
            "cm",
            "-w",
            "--output-watch-events",
            "--request-timeout=5s",
        ])
        .env("KUBECONFIG", s.dir().join("kubeconfig.yaml"))
        .env("HOME", s.dir())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    assert!(s.ok(&["delete", "cm", "settings"]).contains("deleted"));
    std::thread::sleep(Duration::from_millis(800));
    let _ = w.kill();
    let out = w.wait_with_output().unwrap();
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.lines()
            .any(|l| l.starts_with("DELETED") && l.contains("settings")),
        "{out}"
    );
}

#[test]
fn objects_survive_a_sigkill_of_the_server() {
    let mut s = Server::start(&[]);
    let f = s.write("cm.yaml", CM);
    s.ok(&["create", "-f", &f]);
    let rv = s.field("cm", "settings", "{.metadata.resourceVersion}");
    s.restart();
    assert_eq!(s.field("cm", "settings", "{.metadata.resourceVersion}"), rv);
    assert_eq!(s.field("cm", "settings", "{.data.color}"), "blue");
}

/// A server, and the kubeconfig of node n1 (a client certificate for `system:node:n1`).
struct N1 {
    s: Server,
    kc: PathBuf,
}

impl N1 {
    /// kubectl as node n1.
    fn as_n1(&self, args: &[&str]) -> Output {
        self.s.kubectl_as(&self.kc, args)
    }
}

/// A command's stderr.
fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

#[test]
fn node_identities_write_only_their_own_objects() {
    let s = Server::start(&[]);
    let kc = node_kubeconfig(&s, "n1");
    let n = N1 { s, kc };
    crate::scenarios!(&n;
        a_node_reads_nodes_and_writes_only_its_own_node_object,
        a_node_reads_all_pods_but_writes_status_and_deletes_only_for_its_own,
        a_node_writes_only_its_own_lease_and_no_other_kinds,
        a_node_reads_a_secret_only_while_a_pod_bound_to_it_references_it,
        the_join_token_bootstraps_and_does_nothing_else,
        a_bootstrap_request_outside_system_nodes_is_left_unapproved,
        a_token_that_is_no_credential_is_unauthorized,
    );
}

/// The join token may ask for a node's client certificate, but a request whose subject is not
/// exactly `O=system:nodes, CN=system:node:NAME` gets no automatic approval and no
/// certificate (kube-controller-manager's nodeclient recognizer).
fn a_bootstrap_request_outside_system_nodes_is_left_unapproved(n: &N1) {
    bootstrap_request(&n.s, "n9", "/O=system:masters/CN=system:node:n9");
    assert_eq!(
        n.s.field(
            "csr",
            "n9-client",
            "{.status.conditions[*].type}|{.status.certificate}"
        ),
        "|",
        "neither approved nor signed"
    );
}

/// Node n1 reads nodes; it creates and labels its own Node object and no other.
fn a_node_reads_nodes_and_writes_only_its_own_node_object(n: &N1) {
    let s = &n.s;
    let as_n1 = |args: &[&str]| n.as_n1(args);
    assert!(as_n1(&["get", "nodes"]).status.success());
    let node = |name: &str| {
        s.write(
            &format!("{name}.yaml"),
            &format!("apiVersion: v1\nkind: Node\nmetadata: {{name: {name}}}\n"),
        )
    };
    assert!(as_n1(&["create", "-f", &node("n1")]).status.success());
    let o = as_n1(&["create", "-f", &node("n2")]);
    assert!(
        stderr(&o).contains(
            "User \"system:node:n1\" cannot create resource \"nodes\" in API group \"\" at the cluster scope: node \"n1\" is not allowed to modify node \"n2\""
        ),
        "{}",
        stderr(&o)
    );
    assert!(as_n1(&["label", "node", "n1", "a=b"]).status.success());
    s.ok(&["create", "-f", &node("n2")]);
    assert!(!as_n1(&["label", "node", "n2", "a=b"]).status.success());
}

/// Pods: reads are open, status writes and deletes only for pods bound to n1.
fn a_node_reads_all_pods_but_writes_status_and_deletes_only_for_its_own(n: &N1) {
    let s = &n.s;
    let as_n1 = |args: &[&str]| n.as_n1(args);
    let pod = |name: &str, node: &str| {
        s.write(
            &format!("{name}.yaml"),
            &format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec:\n  nodeName: {node}\n  containers: [{{name: c, image: busybox:1}}]\n"),
        )
    };
    s.ok(&["create", "-f", &pod("mine", "n1")]);
    s.ok(&["create", "-f", &pod("theirs", "n2")]);
    assert!(as_n1(&["get", "pods"]).status.success());
    let running = r#"{"status":{"phase":"Running"}}"#;
    let patch = |name: &str| {
        as_n1(&[
            "patch",
            "pod",
            name,
            "--subresource=status",
            "--type=merge",
            "-p",
            running,
        ])
    };
    assert!(patch("mine").status.success());
    assert_eq!(s.field("pod", "mine", "{.status.phase}"), "Running");
    let o = patch("theirs");
    assert!(
        stderr(&o).contains("can only modify pods bound to itself"),
        "{}",
        stderr(&o)
    );
    assert!(
        !as_n1(&["label", "pod", "mine", "x=y"]).status.success(),
        "no writes to the pod itself"
    );
    assert!(!as_n1(&["create", "-f", &pod("new", "n1")]).status.success());
    assert!(
        !as_n1(&["delete", "pod", "theirs", "--wait=false"])
            .status
            .success()
    );
    assert!(
        as_n1(&["delete", "pod", "mine", "--wait=false"])
            .status
            .success()
    );
}

/// Leases: only its own, in kube-node-lease. Other kinds: no writes.
fn a_node_writes_only_its_own_lease_and_no_other_kinds(n: &N1) {
    let s = &n.s;
    let as_n1 = |args: &[&str]| n.as_n1(args);
    let lease = |name: &str| {
        s.write(
            &format!("lease-{name}.yaml"),
            &format!("apiVersion: coordination.k8s.io/v1\nkind: Lease\nmetadata: {{name: {name}, namespace: kube-node-lease}}\nspec: {{holderIdentity: {name}}}\n"),
        )
    };
    assert!(as_n1(&["create", "-f", &lease("n1")]).status.success());
    assert!(!as_n1(&["create", "-f", &lease("n2")]).status.success());
    let o = as_n1(&["create", "configmap", "x", "--from-literal=a=b"]);
    assert!(
        stderr(&o).contains("cannot create resource \"configmaps\""),
        "{}",
        stderr(&o)
    );
}

/// Node authorizer: no listing of ConfigMaps or Secrets, and one by name only while a pod
/// bound to the node references it; no pod logs or exec on another node's pods.
fn a_node_reads_a_secret_only_while_a_pod_bound_to_it_references_it(n: &N1) {
    let s = &n.s;
    let as_n1 = |args: &[&str]| n.as_n1(args);
    let o = as_n1(&["get", "configmaps", "-A"]);
    assert!(
        stderr(&o).contains("may only get individual configmaps"),
        "{}",
        stderr(&o)
    );
    s.ok(&[
        "create",
        "secret",
        "generic",
        "for-n1",
        "--from-literal=k=v",
    ]);
    s.ok(&[
        "create",
        "secret",
        "generic",
        "for-n2",
        "--from-literal=k=v",
    ]);
    let uses = |name: &str, node: &str, secret: &str| {
        s.write(
            &format!("{name}.yaml"),
            &format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec:\n  nodeName: {node}\n  containers: [{{name: c, image: busybox:1}}]\n  volumes: [{{name: s, secret: {{secretName: {secret}}}}}]\n"),
        )
    };
    s.ok(&["create", "-f", &uses("uses1", "n1", "for-n1")]);
    s.ok(&["create", "-f", &uses("uses2", "n2", "for-n2")]);
    assert!(as_n1(&["get", "secret", "for-n1"]).status.success());
    let o = as_n1(&["get", "secret", "for-n2"]);
    assert!(
        stderr(&o).contains("no relationship found between node 'n1' and this object"),
        "{}",
        stderr(&o)
    );
    assert!(!as_n1(&["get", "secrets"]).status.success());
    assert!(!as_n1(&["get", "deployments"]).status.success());
    let o = as_n1(&["logs", "uses2"]);
    assert!(stderr(&o).contains("forbidden"), "{}", stderr(&o));
}

/// The join token bootstraps and does nothing else. Builds on the pod `uses2` (bound to n2).
fn the_join_token_bootstraps_and_does_nothing_else(n: &N1) {
    let s = &n.s;
    let token = format!("--token={}", s.node_token());
    let o = s.kubectl(&[&token, "get", "pods"]);
    assert!(
        stderr(&o).contains("only bootstraps a node's certificate"),
        "{}",
        stderr(&o)
    );
    let o = s.kubectl(&[&token, "delete", "pod", "uses2", "--wait=false"]);
    assert!(!o.status.success());
}

/// A token that is no credential is Unauthorized.
fn a_token_that_is_no_credential_is_unauthorized(n: &N1) {
    let s = &n.s;
    let o = s.kubectl(&["--token=not-a-credential", "get", "pods"]);
    assert!(stderr(&o).contains("Unauthorized"), "{}", stderr(&o));
}

/// A service account `granter` that may write Roles and RoleBindings and read ConfigMaps in
/// `default`, with a token.
struct Granter {
    s: Server,
    /// `--token=…` for kubectl.
    t: String,
}

impl Granter {
    /// kubectl as the service account.
    fn as_sa(&self, args: &[&str]) -> Output {
        let mut a = vec![self.t.as_str()];
        a.extend_from_slice(args);
        self.s.kubectl(&a)
    }
}

/// A Role reading Secrets (which the service account cannot).
const READ_SECRETS: &str = r#"apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: read-secrets, namespace: default}
rules: [{apiGroups: [""], resources: [secrets], verbs: [get, list]}]
"#;

#[test]
fn a_service_account_cannot_grant_itself_more_than_it_holds() {
    let s = Server::start(&[]);
    s.ok(&[
        "create",
        "-f",
        &s.write(
            "rbac.yaml",
            r#"apiVersion: v1
kind: ServiceAccount
metadata: {name: granter, namespace: default}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: rbac-writer, namespace: default}
rules:
- apiGroups: [rbac.authorization.k8s.io]
  resources: [roles, rolebindings]
  verbs: [create, get, list, update, patch]
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, list]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: granter, namespace: default}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: rbac-writer}
subjects: [{kind: ServiceAccount, name: granter, namespace: default}]
"#,
        ),
    ]);
    let t = format!("--token={}", s.sa_token("granter", &[]));
    let g = Granter { s, t };
    crate::scenarios!(&g;
        binding_cluster_admin_is_refused,
        a_role_beyond_what_it_holds_is_refused_and_one_within_is_allowed,
        widening_a_held_role_by_a_patch_is_the_same_escalation,
        binding_a_role_it_does_not_hold_needs_bind_on_that_role,
        server_side_apply_creating_an_object_needs_create,
    );
}

/// Binding cluster-admin (seeded, as kube-apiserver's bootstrap roles) is refused.
fn binding_cluster_admin_is_refused(g: &Granter) {
    let s = &g.s;
    let as_sa = |args: &[&str]| g.as_sa(args);
    assert!(
        s.ok(&["get", "clusterrole", "cluster-admin", "-o", "name"])
            .contains("cluster-admin")
    );
    let bind_admin = s.write(
        "bind-admin.yaml",
        r#"apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: take-over, namespace: default}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: cluster-admin}
subjects: [{kind: ServiceAccount, name: granter, namespace: default}]
"#,
    );
    let o = as_sa(&["create", "-f", &bind_admin]);
    assert!(
        stderr(&o).contains("is attempting to grant RBAC permissions not currently held"),
        "{}",
        stderr(&o)
    );
}

/// A Role with `*` is refused; one within what it holds is allowed.
fn a_role_beyond_what_it_holds_is_refused_and_one_within_is_allowed(g: &Granter) {
    let s = &g.s;
    let as_sa = |args: &[&str]| g.as_sa(args);
    let star = s.write(
        "star.yaml",
        r#"apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: everything, namespace: default}
rules: [{apiGroups: ["*"], resources: ["*"], verbs: ["*"]}]
"#,
    );
    let o = as_sa(&["create", "-f", &star]);
    assert!(
        stderr(&o).contains(r#"{APIGroups:["*"], Resources:["*"], Verbs:["*"]}"#),
        "{}",
        stderr(&o)
    );
    let secrets = s.write("secrets.yaml", READ_SECRETS);
    assert!(!as_sa(&["create", "-f", &secrets]).status.success());
    let held = s.write(
        "held.yaml",
        r#"apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: read-cms, namespace: default}
rules: [{apiGroups: [""], resources: [configmaps], verbs: [get]}]
"#,
    );
    assert!(as_sa(&["create", "-f", &held]).status.success());
}

/// Widening it by a patch is the same escalation. Builds on the Role `read-cms` made before.
fn widening_a_held_role_by_a_patch_is_the_same_escalation(g: &Granter) {
    let as_sa = |args: &[&str]| g.as_sa(args);
    let o = as_sa(&[
        "patch",
        "role",
        "read-cms",
        "--type=json",
        "-p",
        r#"[{"op": "add", "path": "/rules/-", "value": {"apiGroups": [""], "resources": ["secrets"], "verbs": ["list"]}}]"#,
    ]);
    assert!(stderr(&o).contains("not currently held"), "{}", stderr(&o));
}

/// Binding the admin-made secrets Role (rules it does not hold) is refused; with `bind` on
/// it, allowed (Kubernetes' escape hatch).
fn binding_a_role_it_does_not_hold_needs_bind_on_that_role(g: &Granter) {
    let s = &g.s;
    let as_sa = |args: &[&str]| g.as_sa(args);
    let secrets = s.write("secrets.yaml", READ_SECRETS);
    s.ok(&["create", "-f", &secrets]);
    let bind_secrets = s.write(
        "bind-secrets.yaml",
        r#"apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: secrets, namespace: default}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: read-secrets}
subjects: [{kind: ServiceAccount, name: granter, namespace: default}]
"#,
    );
    assert!(!as_sa(&["create", "-f", &bind_secrets]).status.success());
    assert!(
        !as_sa(&["get", "secrets"]).status.success(),
        "it still cannot list secrets"
    );
    s.ok(&["create", "-f", &s.write("binder.yaml", r#"apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: binder, namespace: default}
rules: [{apiGroups: [rbac.authorization.k8s.io], resources: [roles], verbs: [bind], resourceNames: [read-secrets]}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: binder, namespace: default}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: binder}
subjects: [{kind: ServiceAccount, name: granter, namespace: default}]
"#)]);
    assert!(as_sa(&["create", "-f", &bind_secrets]).status.success());
    assert!(as_sa(&["get", "secrets"]).status.success());
}

/// Server-side apply creating an object needs `create` and the URL's name.
fn server_side_apply_creating_an_object_needs_create(g: &Granter) {
    let s = &g.s;
    let as_sa = |args: &[&str]| g.as_sa(args);
    let o = as_sa(&["apply", "--server-side", "-f", &s.write("cm.yaml", CM)]);
    assert!(
        !o.status.success(),
        "no create on configmaps: {}",
        stderr(&o)
    );
}

#[test]
fn idle_connections_do_not_starve_the_server() {
    use std::io::Read;
    let s = Server::start(&[]);
    let addr = s.url().trim_start_matches("https://").to_string();
    // 1,100 connections that never start TLS.
    let idle: Vec<std::net::TcpStream> = (0..1100)
        .map(|_| std::net::TcpStream::connect(&addr).unwrap())
        .collect();
    let t0 = Instant::now();
    s.ok(&["get", "ns"]);
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "kubectl took {:?}",
        t0.elapsed()
    );
    // The server drops them after its handshake timeout (10 s after it accepted each).
    for c in &idle {
        c.set_nonblocking(true).unwrap();
    }
    let mut open: Vec<std::net::TcpStream> = idle;
    let mut closed = 0;
    let t0 = Instant::now();
    while !open.is_empty() && t0.elapsed() < Duration::from_secs(40) {
        std::thread::sleep(Duration::from_millis(500));
        open.retain_mut(|c| {
            let mut b = [0u8; 1];
            match c.read(&mut b) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => true,
                Ok(0) | Err(_) => {
                    closed += 1;
                    false
                }
                Ok(_) => true,
            }
        });
    }
    assert!(
        t0.elapsed() >= Duration::from_secs(5),
        "not before the handshake timeout"
    );
    assert_eq!(closed, 1100, "idle connections closed by the server");
    s.ok(&["get", "ns"]);
}

#[test]
fn node_certificates_come_only_through_approved_requests() {
    let s = Server::start(&[]);
    let token = format!("--token={}", s.node_token());
    // A serving certificate asked for by the bootstrapper is not approved (only a node, for
    // its own addresses); an administrator approves it with kubectl and it is signed.
    common::openssl_request(
        &s.dir().join("srv.key"),
        &s.dir().join("srv.csr"),
        "/O=system:nodes/CN=system:node:n9",
        &["-addext", "subjectAltName=IP:10.9.9.9"],
    );
    use base64::Engine;
    let req = base64::engine::general_purpose::STANDARD
        .encode(std::fs::read(s.dir().join("srv.csr")).unwrap());
    let csr = s.write("srv.yaml", &format!("apiVersion: certificates.k8s.io/v1\nkind: CertificateSigningRequest\nmetadata: {{name: srv}}\nspec:\n  signerName: kubernetes.io/kubelet-serving\n  usages: [digital signature, key encipherment, server auth]\n  request: {req}\n"));
    s.ok(&[&token, "create", "-f", &csr]);
    assert_eq!(s.field("csr", "srv", "{.status.certificate}"), "");
    assert!(
        s.ok(&["get", "csr", "srv"]).contains("Pending"),
        "{}",
        s.ok(&["get", "csr", "srv"])
    );
    let o = s.kubectl(&[&token, "certificate", "approve", "srv"]);
    assert!(!o.status.success(), "the bootstrapper cannot approve");
    s.ok(&["certificate", "approve", "srv"]);
    let cert = s.field("csr", "srv", "{.status.certificate}");
    let pem = base64::engine::general_purpose::STANDARD
        .decode(cert)
        .unwrap();
    std::fs::write(s.dir().join("srv.crt"), pem).unwrap();
    let o = Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(s.dir().join("pki/ca.crt"))
        .arg(s.dir().join("srv.crt"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    assert!(s.ok(&["get", "csr", "srv"]).contains("Approved,Issued"));
}

#[test]
fn kubectl_works_on_the_etcd_store() {
    let etcd_dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let peer = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let purl = format!("http://127.0.0.1:{peer}");
    let mut etcd = Command::new("etcd")
        .args(["--name", "e0", "--data-dir"])
        .arg(etcd_dir.path().join("data"))
        .args([
            "--listen-client-urls",
            &url,
            "--advertise-client-urls",
            &url,
        ])
        .args([
            "--listen-peer-urls",
            &purl,
            "--initial-advertise-peer-urls",
            &purl,
        ])
        .args(["--initial-cluster", &format!("e0={purl}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("etcd is installed");
    let args = ["--store", "etcd", "--etcd-endpoints", url.as_str()];
    let mut s = Server::start(&args);
    s.ok(&["create", "deployment", "web", "--image=busybox:1.36"]);
    let f = s.write("cm.yaml", CM);
    s.ok(&["apply", "-f", &f]);
    s.ok(&["label", "cm", "settings", "tier=front"]);
    let conflict = s.write(
        "stale.yaml",
        &CM.replace("name: settings", "name: settings\n  resourceVersion: \"1\""),
    );
    assert!(
        s.fails(&["replace", "-f", &conflict])
            .contains("the object has been modified")
    );
    // A new server process on the same etcd sees everything, with the same resourceVersions.
    s.restart();
    assert_eq!(
        s.field("cm", "settings", "{.metadata.labels.tier}"),
        "front"
    );
    assert_eq!(
        s.field("deploy", "web", "{.spec.template.spec.containers[0].image}"),
        "busybox:1.36"
    );
    assert!(s.ok(&["get", "ns"]).contains("kube-node-lease"));
    s.ok(&["delete", "deploy", "web"]);
    assert!(s.fails(&["get", "deploy", "web"]).contains("not found"));
    drop(s);
    let _ = etcd.kill();
    let _ = etcd.wait();
}

#[test]
fn aggregated_discovery_and_eviction_through_kubectl_drain() {
    let s = Server::start(&[]);
    // kubectl asks for aggregated discovery first and needs nothing else.
    let o = Command::new("kubectl")
        .args(["get", "ns", "-v=6"])
        .env("KUBECONFIG", s.dir().join("kubeconfig.yaml"))
        .env("HOME", s.dir())
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success());
    assert!(
        !log.contains("/apis/apps/v1?"),
        "no per-group discovery once /apis answered aggregated: {log}"
    );
    let res = s.ok(&["api-resources", "--no-headers"]);
    assert_eq!(res.lines().count(), 36, "{res}");
    for (plural, short) in [("jobs", ""), ("cronjobs", "cj")] {
        assert!(
            res.lines().any(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                w[0] == plural && (short.is_empty() || w[1] == short) && l.contains("batch/v1")
            }),
            "{res}"
        );
    }
    assert!(
        res.lines()
            .any(|l| l.starts_with("deployments") && l.contains("apps/v1"))
    );
    let url = format!("{}/api", s.url());
    let token = s.admin_token();
    let out = Command::new("curl")
        .args([
            "-sk",
            "-H",
            &format!("Authorization: Bearer {}", token.trim()),
        ])
        .args([
            "-H",
            "Accept: application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList",
            &url,
        ])
        .output()
        .unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let pods = doc["items"][0]["versions"][0]["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["resource"] == "pods")
        .unwrap()
        .clone();
    let subs: Vec<&str> = pods["subresources"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|x| x["subresource"].as_str())
        .collect();
    assert_eq!(subs, ["status", "binding", "log", "eviction"]);

    // kubectl drain cordons the node and evicts its pods through pods/eviction.
    let node = s.write(
        "n1.yaml",
        "apiVersion: v1\nkind: Node\nmetadata: {name: n1}\nstatus:\n  conditions: [{type: Ready, status: \"True\"}]\n",
    );
    s.ok(&["create", "-f", &node]);
    s.ok(&[
        "run",
        "p1",
        "--image=busybox:1.36",
        "--overrides={\"spec\":{\"nodeName\":\"n1\"}}",
    ]);
    let out = s.ok(&[
        "drain",
        "n1",
        "--force",
        "--grace-period=0",
        "--timeout=20s",
    ]);
    assert!(out.contains("pod/p1 evicted"), "{out}");
    assert!(s.fails(&["get", "pod", "p1"]).contains("not found"));
    assert_eq!(s.field("node", "n1", "{.spec.unschedulable}"), "true");
}

/// Sends `body` as `ctype` with `method` to `path` as the admin; the status code and the
/// answer as JSON (Null when it is not).
fn send(
    s: &Server,
    method: &str,
    path: &str,
    ctype: &str,
    body: &[u8],
) -> (u16, serde_json::Value) {
    let token = s.admin_token();
    let auth = format!("Authorization: Bearer {}", token.trim());
    let f = s.dir().join("body");
    std::fs::write(&f, body).unwrap();
    let out = Command::new("curl")
        .args([
            "-sk",
            "-X",
            method,
            "-H",
            &auth,
            "-H",
            &format!("Content-Type: {ctype}"),
        ])
        .arg("--data-binary")
        .arg(format!("@{}", f.display()))
        .args(["-w", "\n%{http_code}", &format!("{}{path}", s.url())])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (
        code.parse().unwrap(),
        serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
    )
}

#[test]
fn bad_requests_get_clear_errors_and_the_server_keeps_serving() {
    let s = Server::start(&[]);
    crate::scenarios!(&s;
        malformed_and_oversized_bodies_get_kube_apiservers_errors,
        the_server_keeps_serving_and_describe_and_wide_output_work,
        only_the_subresources_discovery_lists_are_served,
    );
}

/// A subresource is served for the kinds discovery lists it for (kube-apiserver has no
/// configmaps/status or pods/scale), and works where it is listed. Builds on the pod `p`.
fn only_the_subresources_discovery_lists_are_served(s: &Server) {
    s.ok(&["create", "configmap", "plain", "--from-literal=a=b"]);
    for path in [
        "/api/v1/namespaces/default/configmaps/plain/status",
        "/api/v1/namespaces/default/pods/p/scale",
        "/api/v1/namespaces/default/configmaps/plain/binding",
    ] {
        let err = s.fails(&["get", "--raw", path]);
        assert!(
            err.contains("NotFound") || err.contains("not found"),
            "{path}: {err}"
        );
    }
    let st = s.ok(&["get", "--raw", "/api/v1/namespaces/default/pods/p/status"]);
    assert!(st.contains("\"kind\":\"Pod\""), "{st}");
    let discovery = s.ok(&["get", "--raw", "/api/v1"]);
    assert!(discovery.contains("\"pods/status\""), "{discovery}");
    assert!(!discovery.contains("\"configmaps/status\""), "{discovery}");
}

/// Bodies that do not decode, name another kind, an invalid name, unclosed YAML, 4 MiB of
/// spaces and broken protobuf get kube-apiserver's status codes and messages.
fn malformed_and_oversized_bodies_get_kube_apiservers_errors(s: &Server) {
    let cms = "/api/v1/namespaces/default/configmaps";
    let (code, st) = send(
        s,
        "POST",
        cms,
        "application/json",
        b"{\"kind\": \"ConfigMap\", ",
    );
    assert_eq!(code, 400);
    assert!(
        st["message"]
            .as_str()
            .unwrap()
            .contains("could not be decoded as JSON"),
        "{st}"
    );
    let (code, st) = send(
        s,
        "POST",
        cms,
        "application/json",
        br#"{"apiVersion":"v1","kind":"Secret","metadata":{"name":"x"}}"#,
    );
    assert_eq!(code, 400);
    assert!(
        st["message"]
            .as_str()
            .unwrap()
            .contains("does not match the expected"),
        "{st}"
    );
    let (code, st) = send(
        s,
        "POST",
        cms,
        "application/json",
        br#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"Bad_Name"}}"#,
    );
    assert_eq!(code, 422, "{st}");
    assert!(
        st["message"].as_str().unwrap().contains("metadata.name"),
        "{st}"
    );
    let (code, st) = send(
        s,
        "PATCH",
        &format!("{cms}/x?fieldManager=t"),
        "application/apply-patch+yaml",
        b"metadata: [unclosed",
    );
    assert_eq!(code, 400);
    assert!(st["message"].as_str().unwrap().contains("YAML"), "{st}");
    let huge = vec![b' '; 4 << 20];
    let (code, _) = send(s, "POST", cms, "application/json", &huge);
    assert_eq!(code, 413);
    let (code, st) = send(
        s,
        "POST",
        cms,
        "application/vnd.kubernetes.protobuf",
        b"k8s\0\x0a\xff",
    );
    assert_eq!(code, 400);
    assert!(st["message"].as_str().unwrap().contains("protobuf"), "{st}");
}

/// Still serving (after the bad requests before); describe and wide output work.
fn the_server_keeps_serving_and_describe_and_wide_output_work(s: &Server) {
    let pod = s.write(
        "pod.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  nodeName: n1\n  containers: [{name: c, image: busybox:1.36}]\n",
    );
    s.ok(&["create", "-f", &pod]);
    let d = s.ok(&["describe", "pod", "p"]);
    assert!(
        d.contains("Name:") && d.contains("busybox:1.36") && d.contains("Node:"),
        "{d}"
    );
    let wide = s.ok(&["get", "pods", "-o", "wide"]);
    assert!(
        wide.lines().next().unwrap().contains("NODE") && wide.contains("n1"),
        "{wide}"
    );
}

const PB: &str = "application/vnd.kubernetes.protobuf";
const PB_OR_JSON: &str = "application/vnd.kubernetes.protobuf, application/json";

/// GET `path` as the admin with `Accept: ACCEPT`: the status code, the content type and the
/// body.
fn get(s: &Server, path: &str, accept: &str) -> (u16, String, Vec<u8>) {
    let admin = s.admin_token();
    let hdr = s.dir().join("headers");
    let out = Command::new("curl")
        .args(["-sk", "--max-time", "10", "-D"])
        .arg(&hdr)
        .args(["-H", &format!("Authorization: Bearer {}", admin.trim())])
        .args(["-H", &format!("Accept: {accept}")])
        .arg(format!("{}{path}", s.url()))
        .output()
        .unwrap();
    let headers = std::fs::read_to_string(&hdr).unwrap();
    let code = headers.split_whitespace().nth(1).unwrap().parse().unwrap();
    let ctype = headers
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type:")
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default();
    (code, ctype, out.stdout)
}

/// The `Unknown` envelope of a protobuf answer (after the `k8s\0` magic).
fn unknown(b: &[u8]) -> k8s_pb::apimachinery::pkg::runtime::Unknown {
    use k8s_pb::apimachinery::pkg::runtime::Unknown;
    use prost::Message;
    Unknown::decode(b.strip_prefix(b"k8s\0").expect("the k8s magic")).unwrap()
}

/// client-go's typed clients send protobuf and ask for it first in `Accept`: kubectl's generators
/// for every kind they make get (and decode) protobuf answers, a list, a Status and a watch decode
/// with an independent protobuf implementation (k8s-pb's prost types), and an answer with no
/// protobuf form is JSON when JSON is acceptable too, 406 when it is not.
#[test]
fn protobuf_clients_get_protobuf_answers() {
    let s = Server::start(&[]);
    crate::scenarios!(&s;
        kubectls_generators_get_and_decode_protobuf_answers_for_every_kind,
        a_list_is_protobuf_when_protobuf_is_asked_for_first,
        a_missing_object_is_a_protobuf_status,
        a_watch_streams_length_prefixed_protobuf_events,
        an_answer_with_no_protobuf_form_is_json_when_acceptable_and_406_when_not,
        json_clients_are_untouched,
    );
}

/// kubectl's generators make every kind they can through protobuf bodies and answers.
fn kubectls_generators_get_and_decode_protobuf_answers_for_every_kind(s: &Server) {
    s.ok(&["create", "serviceaccount", "robot"]);
    s.ok(&["create", "role", "reader", "--verb=get", "--resource=pods"]);
    s.ok(&[
        "create",
        "rolebinding",
        "rb",
        "--role=reader",
        "--serviceaccount=default:robot",
    ]);
    s.ok(&[
        "create",
        "clusterrole",
        "nodes",
        "--verb=list",
        "--resource=nodes",
    ]);
    s.ok(&[
        "create",
        "clusterrolebinding",
        "crb",
        "--clusterrole=nodes",
        "--user=u",
    ]);
    let token = s.ok(&["create", "token", "robot", "--duration=10m"]);
    assert_eq!(token.trim().split('.').count(), 3, "a JWT: {token}");
    s.ok(&[
        "create",
        "deployment",
        "web",
        "--image=busybox:1.36",
        "--replicas=0",
    ]);
    assert_eq!(s.field("rolebinding", "rb", "{.subjects[0].name}"), "robot");
}

/// A list asked for protobuf first is a protobuf `DeploymentList`. Builds on the Deployment
/// `web`.
fn a_list_is_protobuf_when_protobuf_is_asked_for_first(s: &Server) {
    use k8s_pb::api::apps::v1 as apps;
    use prost::Message;

    let (code, ctype, body) = get(
        s,
        "/apis/apps/v1/namespaces/default/deployments",
        PB_OR_JSON,
    );
    assert_eq!((code, ctype.as_str()), (200, PB));
    let u = unknown(&body);
    assert_eq!(u.type_meta.unwrap().kind.as_deref(), Some("DeploymentList"));
    let list = apps::DeploymentList::decode(u.raw.unwrap().as_slice()).unwrap();
    let d = &list.items[0];
    assert_eq!(d.metadata.as_ref().unwrap().name.as_deref(), Some("web"));
    assert_eq!(d.spec.as_ref().unwrap().replicas, Some(0));
}

/// A missing object is a protobuf `Status`, 404 NotFound.
fn a_missing_object_is_a_protobuf_status(s: &Server) {
    use k8s_pb::apimachinery::pkg::apis::meta::v1 as meta;
    use prost::Message;

    let (code, ctype, body) = get(
        s,
        "/api/v1/namespaces/default/configmaps/missing",
        PB_OR_JSON,
    );
    assert_eq!((code, ctype.as_str()), (404, PB));
    let st = meta::Status::decode(unknown(&body).raw.unwrap().as_slice()).unwrap();
    assert_eq!(
        (st.code, st.reason.as_deref()),
        (Some(404), Some("NotFound"))
    );
}

/// A watch streams length-prefixed protobuf `WatchEvent`s.
fn a_watch_streams_length_prefixed_protobuf_events(s: &Server) {
    use k8s_pb::api::core::v1 as core;
    use k8s_pb::apimachinery::pkg::apis::meta::v1 as meta;
    use prost::Message;

    s.ok(&["create", "configmap", "watched", "--from-literal=k=v"]);
    let (code, ctype, body) = get(
        s,
        "/api/v1/namespaces/default/configmaps?watch=1&timeoutSeconds=1&fieldSelector=metadata.name%3Dwatched",
        PB_OR_JSON,
    );
    assert_eq!(
        (code, ctype.as_str()),
        (200, "application/vnd.kubernetes.protobuf;stream=watch")
    );
    let len = u32::from_be_bytes(body[..4].try_into().unwrap()) as usize;
    let ev = meta::WatchEvent::decode(&body[4..4 + len]).unwrap();
    assert_eq!(ev.r#type.as_deref(), Some("ADDED"));
    let cm = core::ConfigMap::decode(
        unknown(&ev.object.unwrap().raw.unwrap())
            .raw
            .unwrap()
            .as_slice(),
    )
    .unwrap();
    assert_eq!(cm.data.get("k").map(String::as_str), Some("v"));
}

/// An answer with no protobuf form (OpenAPI) is JSON when JSON is acceptable too, 406 when
/// it is not.
fn an_answer_with_no_protobuf_form_is_json_when_acceptable_and_406_when_not(s: &Server) {
    let (code, ctype, body) = get(s, "/openapi/v3", PB_OR_JSON);
    assert_eq!((code, ctype.as_str()), (200, "application/json"));
    assert!(serde_json::from_slice::<serde_json::Value>(&body).unwrap()["paths"].is_object());
    let (code, _, _) = get(s, "/openapi/v3", PB);
    assert_eq!(code, 406);
}

/// JSON clients are untouched.
fn json_clients_are_untouched(s: &Server) {
    let (code, ctype, _) = get(
        s,
        "/apis/apps/v1/namespaces/default/deployments",
        "application/json",
    );
    assert_eq!((code, ctype.as_str()), (200, "application/json"));
}
