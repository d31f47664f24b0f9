//! Pod validation with kube-apiserver's field paths and wording
//! (`spec.containers[0].image: Required value`). Pure functions over the Pod object.

use std::collections::HashSet;

use k8s_openapi::{
    api::core::v1::{Container, Pod, Probe},
    apimachinery::pkg::util::intstr::IntOrString,
};

use super::quantity;

/// One field error.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

pub(super) fn err(errs: &mut Vec<FieldError>, path: impl Into<String>, message: impl Into<String>) {
    errs.push(FieldError {
        path: path.into(),
        message: message.into(),
    });
}

pub(super) const DNS1123_LABEL_MSG: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')";
const DNS1123_SUBDOMAIN_MSG: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";

/// RFC 1123 label: `[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most 63 characters.
pub fn is_dns1123_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// RFC 1123 subdomain: dot-separated labels, at most 253 characters.
pub fn is_dns1123_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns1123_label)
}

fn check_name(errs: &mut Vec<FieldError>, path: &str, v: &str, subdomain: bool) {
    let ok = if subdomain {
        is_dns1123_subdomain(v)
    } else {
        is_dns1123_label(v)
    };
    if !ok {
        let msg = if subdomain {
            DNS1123_SUBDOMAIN_MSG
        } else {
            DNS1123_LABEL_MSG
        };
        err(errs, path, format!("Invalid value: {v:?}: {msg}"));
    }
}

fn non_negative(errs: &mut Vec<FieldError>, path: String, v: Option<i32>) {
    if let Some(v) = v
        && v < 0
    {
        err(
            errs,
            path,
            format!("Invalid value: {v}: must be greater than or equal to 0"),
        );
    }
}

fn port_ok(errs: &mut Vec<FieldError>, path: String, p: &IntOrString) {
    match p {
        IntOrString::Int(n) if !(1..=65535).contains(n) => err(
            errs,
            path,
            format!("Invalid value: {n}: must be between 1 and 65535, inclusive"),
        ),
        IntOrString::String(s) if s.is_empty() || s.len() > 15 => err(
            errs,
            path,
            format!("Invalid value: {s:?}: must be no more than 15 characters"),
        ),
        _ => {}
    }
}

fn validate_probe(errs: &mut Vec<FieldError>, path: &str, p: &Probe) {
    let mut handlers = vec![];
    if p.exec.is_some() {
        handlers.push("exec");
    }
    if p.http_get.is_some() {
        handlers.push("httpGet");
    }
    if p.tcp_socket.is_some() {
        handlers.push("tcpSocket");
    }
    if p.grpc.is_some() {
        handlers.push("grpc");
    }
    match handlers.len() {
        0 => err(errs, path, "Required value: must specify a handler type"),
        1 => {}
        _ => err(
            errs,
            format!("{path}.{}", handlers[1]),
            "Forbidden: may not specify more than 1 handler type",
        ),
    }
    if let Some(e) = &p.exec
        && e.command.as_ref().is_none_or(|c| c.is_empty())
    {
        err(errs, format!("{path}.exec.command"), "Required value");
    }
    if let Some(h) = &p.http_get {
        port_ok(errs, format!("{path}.httpGet.port"), &h.port);
        if let Some(s) = &h.scheme
            && s != "HTTP"
            && s != "HTTPS"
        {
            err(
                errs,
                format!("{path}.httpGet.scheme"),
                format!("Unsupported value: {s:?}: supported values: \"HTTP\", \"HTTPS\""),
            );
        }
    }
    if let Some(t) = &p.tcp_socket {
        port_ok(errs, format!("{path}.tcpSocket.port"), &t.port);
    }
    non_negative(
        errs,
        format!("{path}.initialDelaySeconds"),
        p.initial_delay_seconds,
    );
    for (f, v) in [
        ("timeoutSeconds", p.timeout_seconds),
        ("periodSeconds", p.period_seconds),
        ("successThreshold", p.success_threshold),
        ("failureThreshold", p.failure_threshold),
    ] {
        if let Some(v) = v
            && v < 1
        {
            err(
                errs,
                format!("{path}.{f}"),
                format!("Invalid value: {v}: must be greater than or equal to 1"),
            );
        }
    }
}

fn validate_container(
    errs: &mut Vec<FieldError>,
    path: &str,
    c: &Container,
    names: &mut HashSet<String>,
    volumes: &HashSet<String>,
    is_init: bool,
) {
    if c.name.is_empty() {
        err(errs, format!("{path}.name"), "Required value");
    } else {
        check_name(errs, &format!("{path}.name"), &c.name, false);
        if !names.insert(c.name.clone()) {
            err(
                errs,
                format!("{path}.name"),
                format!("Duplicate value: {:?}", c.name),
            );
        }
    }
    if c.image.as_deref().is_none_or(|i| i.trim().is_empty()) {
        err(errs, format!("{path}.image"), "Required value");
    }
    if let Some(p) = &c.image_pull_policy
        && !["Always", "IfNotPresent", "Never"].contains(&p.as_str())
    {
        err(
            errs,
            format!("{path}.imagePullPolicy"),
            format!(
                "Unsupported value: {p:?}: supported values: \"Always\", \"IfNotPresent\", \"Never\""
            ),
        );
    }
    container_ports(errs, path, c);
    for (i, e) in c.env.iter().flatten().enumerate() {
        if e.name.is_empty() {
            err(errs, format!("{path}.env[{i}].name"), "Required value");
        }
    }
    for (i, m) in c.volume_mounts.iter().flatten().enumerate() {
        if !volumes.contains(&m.name) {
            err(
                errs,
                format!("{path}.volumeMounts[{i}].name"),
                format!("Not found: {:?}", m.name),
            );
        }
        if !m.mount_path.starts_with('/') {
            err(
                errs,
                format!("{path}.volumeMounts[{i}].mountPath"),
                format!(
                    "Invalid value: {:?}: must be an absolute path",
                    m.mount_path
                ),
            );
        }
    }
    container_resources(errs, path, c);
    container_probes(errs, path, c, is_init);
}

fn container_ports(errs: &mut Vec<FieldError>, path: &str, c: &Container) {
    for (i, p) in c.ports.iter().flatten().enumerate() {
        if !(1..=65535).contains(&p.container_port) {
            err(
                errs,
                format!("{path}.ports[{i}].containerPort"),
                format!(
                    "Invalid value: {}: must be between 1 and 65535, inclusive",
                    p.container_port
                ),
            );
        }
        if let Some(proto) = &p.protocol
            && !["TCP", "UDP", "SCTP"].contains(&proto.as_str())
        {
            err(
                errs,
                format!("{path}.ports[{i}].protocol"),
                format!(
                    "Unsupported value: {proto:?}: supported values: \"SCTP\", \"TCP\", \"UDP\""
                ),
            );
        }
    }
}

/// Every limit and request is a quantity, and not negative.
fn container_resources(errs: &mut Vec<FieldError>, path: &str, c: &Container) {
    if let Some(r) = &c.resources {
        for (kind, list) in [("limits", &r.limits), ("requests", &r.requests)] {
            for (k, q) in list.iter().flatten() {
                if quantity::parse(&q.0).is_none_or(|v| v < 0.0) {
                    err(
                        errs,
                        format!("{path}.resources.{kind}[{k}]"),
                        format!(
                            "Invalid value: {:?}: quantities must match the regular expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'",
                            q.0
                        ),
                    );
                }
            }
        }
    }
}

/// Probes are for app (and sidecar) containers; liveness and startup succeed once.
fn container_probes(errs: &mut Vec<FieldError>, path: &str, c: &Container, is_init: bool) {
    let probes = [
        ("livenessProbe", &c.liveness_probe),
        ("readinessProbe", &c.readiness_probe),
        ("startupProbe", &c.startup_probe),
    ];
    for (name, p) in probes {
        if let Some(p) = p {
            if is_init && c.restart_policy.as_deref() != Some("Always") {
                err(
                    errs,
                    format!("{path}.{name}"),
                    "Forbidden: may not be set for init containers without restartPolicy=Always",
                );
            }
            validate_probe(errs, &format!("{path}.{name}"), p);
            if (name == "livenessProbe" || name == "startupProbe")
                && let Some(s) = p.success_threshold
                && s != 1
            {
                err(
                    errs,
                    format!("{path}.{name}.successThreshold"),
                    format!("Invalid value: {s}: must be 1"),
                );
            }
        }
    }
}

/// Validates a pod; an empty result means valid.
pub fn validate_pod(pod: &Pod) -> Vec<FieldError> {
    let mut errs = vec![];
    match pod.metadata.name.as_deref() {
        None | Some("") => err(
            &mut errs,
            "metadata.name",
            "Required value: name or generateName is required",
        ),
        Some(n) => check_name(&mut errs, "metadata.name", n, true),
    }
    if let Some(ns) = pod.metadata.namespace.as_deref() {
        check_name(&mut errs, "metadata.namespace", ns, false);
    }
    let Some(spec) = &pod.spec else {
        err(&mut errs, "spec", "Required value");
        return errs;
    };
    let mut volumes = HashSet::new();
    for (i, v) in spec.volumes.iter().flatten().enumerate() {
        check_name(
            &mut errs,
            &format!("spec.volumes[{i}].name"),
            &v.name,
            false,
        );
        if !volumes.insert(v.name.clone()) {
            err(
                &mut errs,
                format!("spec.volumes[{i}].name"),
                format!("Duplicate value: {:?}", v.name),
            );
        }
        let sources = [
            v.empty_dir.is_some(),
            v.host_path.is_some(),
            v.config_map.is_some(),
            v.secret.is_some(),
            v.downward_api.is_some(),
            v.projected.is_some(),
            v.persistent_volume_claim.is_some(),
        ];
        if let Some(c) = &v.persistent_volume_claim
            && c.claim_name.is_empty()
        {
            err(
                &mut errs,
                format!("spec.volumes[{i}].persistentVolumeClaim.claimName"),
                "Required value",
            );
        }
        if sources.iter().filter(|s| **s).count() == 0 {
            err(
                &mut errs,
                format!("spec.volumes[{i}]"),
                "Required value: must specify a volume type",
            );
        }
        if let Some(hp) = &v.host_path
            && !hp.path.starts_with('/')
        {
            err(
                &mut errs,
                format!("spec.volumes[{i}].hostPath.path"),
                format!("Invalid value: {:?}: must be an absolute path", hp.path),
            );
        }
    }
    if spec.containers.is_empty() {
        err(&mut errs, "spec.containers", "Required value");
    }
    let mut names = HashSet::new();
    for (i, c) in spec.init_containers.iter().flatten().enumerate() {
        validate_container(
            &mut errs,
            &format!("spec.initContainers[{i}]"),
            c,
            &mut names,
            &volumes,
            true,
        );
    }
    for (i, c) in spec.containers.iter().enumerate() {
        validate_container(
            &mut errs,
            &format!("spec.containers[{i}]"),
            c,
            &mut names,
            &volumes,
            false,
        );
    }
    if let Some(rp) = &spec.restart_policy
        && !["Always", "OnFailure", "Never"].contains(&rp.as_str())
    {
        err(
            &mut errs,
            "spec.restartPolicy",
            format!(
                "Unsupported value: {rp:?}: supported values: \"Always\", \"OnFailure\", \"Never\""
            ),
        );
    }
    non_negative(
        &mut errs,
        "spec.terminationGracePeriodSeconds".into(),
        spec.termination_grace_period_seconds
            .map(|v| v.clamp(i32::MIN as i64, i32::MAX as i64) as i32),
    );
    errs
}

/// A workload's selector and pod template as kube-apiserver checks them: a selector that is
/// given, not empty and matches the template's labels, a restart policy among `restart`, and
/// the template's pod (named by the controller later).
pub fn validate_template(
    errs: &mut Vec<FieldError>,
    selector: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector>,
    template: &k8s_openapi::api::core::v1::PodTemplateSpec,
    restart: &[&str],
    kind: &str,
) {
    let policy = template
        .spec
        .as_ref()
        .and_then(|s| s.restart_policy.as_deref())
        .unwrap_or("Always");
    if !restart.contains(&policy) {
        let list: Vec<String> = restart.iter().map(|r| format!("\"{r}\"")).collect();
        err(
            errs,
            "spec.template.spec.restartPolicy",
            format!(
                "Unsupported value: \"{policy}\": supported values: {}",
                list.join(", ")
            ),
        );
    }
    let labels = template.metadata.as_ref().and_then(|m| m.labels.clone());
    match selector {
        None => err(errs, "spec.selector", "Required value"),
        // A Job's selector is generated; the apps kinds refuse an empty one.
        Some(sel)
            if kind != "job"
                && sel.match_labels.as_ref().is_none_or(|l| l.is_empty())
                && sel.match_expressions.as_ref().is_none_or(|e| e.is_empty()) =>
        {
            err(
                errs,
                "spec.selector",
                format!("Invalid value: {{}}: empty selector is invalid for {kind}"),
            )
        }
        Some(sel) if !super::selector::selector_matches(sel, labels.as_ref()) => err(
            errs,
            "spec.template.metadata.labels",
            format!(
                "Invalid value: {}: `selector` does not match template `labels`",
                serde_json::to_string(&labels.unwrap_or_default()).unwrap_or_default()
            ),
        ),
        Some(_) => {}
    }
    if let Some(ps) = &template.spec {
        let mut metadata = template.metadata.clone().unwrap_or_default();
        metadata.name = Some(format!("{kind}-pod"));
        let pod = Pod {
            metadata,
            spec: Some(ps.clone()),
            status: None,
        };
        for mut e in validate_pod(&pod) {
            e.path = format!("spec.template.{}", e.path);
            errs.push(e);
        }
    }
}

/// kube-apiserver's "field is immutable" for each JSON pointer in `paths` whose value
/// differs between `old` and `new` (the field path dotted, as kube names it).
pub fn immutable(
    old: &serde_json::Value,
    new: &serde_json::Value,
    paths: &[&str],
) -> Vec<FieldError> {
    let mut errs = vec![];
    for p in paths {
        let (a, b) = (old.pointer(p), new.pointer(p));
        if a != b {
            let shown = b.map_or_else(|| "null".to_string(), |v| v.to_string());
            err(
                &mut errs,
                p.trim_start_matches('/').replace('/', "."),
                format!("Invalid value: {shown}: field is immutable"),
            );
        }
    }
    errs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(yaml: &str) -> Pod {
        serde_saphyr::from_str(yaml).unwrap()
    }

    #[test]
    fn a_valid_pod_has_no_errors() {
        let p =
            pod("metadata: {name: web}\nspec:\n  containers:\n  - name: c\n    image: busybox\n");
        assert!(validate_pod(&p).is_empty());
    }

    #[test]
    fn missing_image_and_duplicate_names_are_reported_with_field_paths() {
        let p = pod(
            "metadata: {name: web}\nspec:\n  containers:\n  - name: c\n  - name: c\n    image: x\n",
        );
        let e: Vec<String> = validate_pod(&p).iter().map(|e| e.to_string()).collect();
        assert!(
            e.contains(&"spec.containers[0].image: Required value".to_string()),
            "{e:?}"
        );
        assert!(
            e.contains(&"spec.containers[1].name: Duplicate value: \"c\"".to_string()),
            "{e:?}"
        );
    }

    #[test]
    fn an_invalid_name_quotes_the_value() {
        let p = pod("metadata: {name: Web_1}\nspec:\n  containers:\n  - name: c\n    image: x\n");
        let e = validate_pod(&p);
        assert_eq!(e[0].path, "metadata.name");
        assert!(e[0].message.starts_with("Invalid value: \"Web_1\""));
    }

    #[test]
    fn a_probe_needs_exactly_one_handler() {
        let p = pod(
            "metadata: {name: w}\nspec:\n  containers:\n  - name: c\n    image: x\n    livenessProbe: {periodSeconds: 0}\n    readinessProbe:\n      exec: {command: [true]}\n      tcpSocket: {port: 80}\n",
        );
        let e: Vec<String> = validate_pod(&p).iter().map(|e| e.to_string()).collect();
        assert!(
            e.contains(
                &"spec.containers[0].livenessProbe: Required value: must specify a handler type"
                    .to_string()
            ),
            "{e:?}"
        );
        assert!(e.contains(&"spec.containers[0].livenessProbe.periodSeconds: Invalid value: 0: must be greater than or equal to 1".to_string()), "{e:?}");
        assert!(e.contains(&"spec.containers[0].readinessProbe.tcpSocket: Forbidden: may not specify more than 1 handler type".to_string()), "{e:?}");
    }

    #[test]
    fn bad_restart_policy_quantity_and_volume_reference() {
        let p = pod(
            "metadata: {name: w}\nspec:\n  restartPolicy: Sometimes\n  containers:\n  - name: c\n    image: x\n    resources: {limits: {memory: lots}}\n    volumeMounts: [{name: data, mountPath: /d}]\n",
        );
        let e: Vec<String> = validate_pod(&p).iter().map(|e| e.path.clone()).collect();
        assert!(e.contains(&"spec.restartPolicy".to_string()));
        assert!(e.contains(&"spec.containers[0].resources.limits[memory]".to_string()));
        assert!(e.contains(&"spec.containers[0].volumeMounts[0].name".to_string()));
    }
}
