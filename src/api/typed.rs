//! Decoding objects into their Kubernetes types: the canonical form that is stored, the
//! unknown fields (for `fieldValidation` Strict/Warn/Ignore), type errors with the field path,
//! and the defaulting and validation kube-apiserver applies to the kinds keelson serves.

use serde_json::Value;

use super::registry::Resource;

/// The outcome of decoding an object.
pub struct Decoded {
    /// The object as its type serializes it (unknown fields gone).
    pub canonical: Value,
    /// Paths of fields the type does not know (`spec.foo`).
    pub unknown: Vec<String>,
}

/// Decodes `v` as `T` and encodes it again: the canonical form, or the field that does not fit.
pub fn roundtrip<T: serde::de::DeserializeOwned + serde::Serialize>(
    v: &Value,
    kind: &str,
    api: &str,
) -> Result<Value, String> {
    let typed: T = serde_path_to_error::deserialize(v.clone()).map_err(|e| {
        format!(
            "{kind} in version \"{api}\" cannot be handled as a {kind}: {}: {}",
            e.path(),
            e.inner()
        )
    })?;
    serde_json::to_value(typed).map_err(|e| e.to_string())
}

fn unknown_fields(input: &Value, known: &Value, path: &str, out: &mut Vec<String>) {
    match (input, known) {
        (Value::Object(i), Value::Object(k)) => {
            for (key, v) in i {
                if v.is_null() {
                    continue;
                }
                let p = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                match k.get(key) {
                    Some(kv) => unknown_fields(v, kv, &p, out),
                    // Empty values may be dropped by the type's serializer; they are not unknown.
                    None if matches!(v, Value::Object(m) if m.is_empty())
                        || matches!(v, Value::Array(a) if a.is_empty()) => {}
                    None if v == &Value::String(String::new()) || v == &Value::Bool(false) => {}
                    None => out.push(p),
                }
            }
        }
        (Value::Array(i), Value::Array(k)) => {
            for (n, (a, b)) in i.iter().zip(k).enumerate() {
                unknown_fields(a, b, &format!("{path}[{n}]"), out);
            }
        }
        _ => {}
    }
}

/// Decodes `obj` as the resource's type.
pub fn decode(r: &Resource, obj: &Value) -> Result<Decoded, String> {
    let canonical = (r.strategy.roundtrip)(obj, r.kind, &r.api_version())?;
    let mut unknown = vec![];
    unknown_fields(obj, &canonical, "", &mut unknown);
    unknown.sort();
    Ok(Decoded { canonical, unknown })
}

/// kube-apiserver's defaults for a Deployment, ReplicaSet or DaemonSet: the workload's own
/// spec defaults and its pod template's.
pub fn default_workload(kind: &str, obj: &mut Value) {
    let Some(spec) = obj.get_mut("spec").and_then(Value::as_object_mut) else {
        return;
    };
    if kind != "DaemonSet" {
        spec.entry("replicas").or_insert(1.into());
    }
    if kind != "ReplicaSet" {
        spec.entry("revisionHistoryLimit").or_insert(10.into());
    }
    if kind == "Deployment" {
        spec.entry("progressDeadlineSeconds").or_insert(600.into());
    }
    let strategy_key = match kind {
        "Deployment" => Some("strategy"),
        "DaemonSet" => Some("updateStrategy"),
        _ => None,
    };
    if let Some(key) = strategy_key {
        let st = spec
            .entry(key)
            .or_insert_with(|| serde_json::json!({}))
            .as_object_mut();
        if let Some(st) = st {
            let ty = st
                .entry("type")
                .or_insert_with(|| "RollingUpdate".into())
                .clone();
            if ty == "RollingUpdate" {
                let ru = st
                    .entry("rollingUpdate")
                    .or_insert_with(|| serde_json::json!({}));
                if let Some(ru) = ru.as_object_mut() {
                    let (unavailable, surge): (Value, Value) = if kind == "Deployment" {
                        ("25%".into(), "25%".into())
                    } else {
                        (1.into(), 0.into())
                    };
                    ru.entry("maxUnavailable").or_insert(unavailable);
                    ru.entry("maxSurge").or_insert(surge);
                }
            }
        }
    }
    default_template(obj);
}

/// The pod defaults of a workload's `spec.template.spec`.
pub fn default_template(obj: &mut Value) {
    if let Some(ps) = obj
        .pointer_mut("/spec/template/spec")
        .and_then(Value::as_object_mut)
    {
        default_pod_spec(ps);
    }
}

/// Seconds a new pod tolerates a not-ready and an unreachable node before it is evicted
/// (kube-apiserver's DefaultTolerationSeconds admission; `--default-*-toleration-seconds`).
static DEFAULT_TOLERATIONS: std::sync::OnceLock<(i64, i64)> = std::sync::OnceLock::new();

/// Sets the DefaultTolerationSeconds values (once, at server start; 300 s each otherwise).
pub fn set_default_tolerations(not_ready: i64, unreachable: i64) {
    let _ = DEFAULT_TOLERATIONS.set((not_ready, unreachable));
}

/// Where in-cluster clients find their credentials.
pub const SA_MOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// The ServiceAccount admission's token volume, on create: a `kube-api-access-xxxxx` projected
/// volume (the account's token, the cluster CA from `kube-root-ca.crt`, the namespace) mounted
/// read-only at `SA_MOUNT` in every container — unless the pod opts out
/// (`automountServiceAccountToken: false`), already mounts something there, or is a mirror pod.
pub fn mount_service_account_token(obj: &mut Value) {
    if obj
        .pointer("/metadata/annotations/kubernetes.io~1config.mirror")
        .is_some()
    {
        return;
    }
    let Some(spec) = obj.get_mut("spec").and_then(Value::as_object_mut) else {
        return;
    };
    if spec.get("automountServiceAccountToken") == Some(&Value::Bool(false)) {
        return;
    }
    let lists = ["containers", "initContainers"];
    let mounted = lists.iter().any(|l| {
        spec.get(*l).and_then(Value::as_array).is_some_and(|cs| {
            cs.iter().any(|c| {
                c["volumeMounts"]
                    .as_array()
                    .is_some_and(|ms| ms.iter().any(|m| m["mountPath"] == SA_MOUNT))
            })
        })
    });
    if mounted {
        return;
    }
    let name = format!("kube-api-access-{}", &crate::runtime::random_hex(3)[..5]);
    let vol = serde_json::json!({"name": name, "projected": {"defaultMode": 420, "sources": [
        {"serviceAccountToken": {"expirationSeconds": super::rbac::KUBELET_EXPIRY, "path": "token"}},
        {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
        {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}}
    ]}});
    if let Some(v) = spec
        .entry("volumes")
        .or_insert_with(|| serde_json::json!([]))
        .as_array_mut()
    {
        v.push(vol);
    }
    for l in lists {
        for c in spec
            .get_mut(l)
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten()
        {
            if let Some(ms) = c
                .as_object_mut()
                .map(|c| {
                    c.entry("volumeMounts")
                        .or_insert_with(|| serde_json::json!([]))
                })
                .and_then(Value::as_array_mut)
            {
                ms.push(serde_json::json!({"name": name, "mountPath": SA_MOUNT, "readOnly": true}));
            }
        }
    }
}

/// kube-apiserver's defaults for a Pod (those kubelet and kubectl rely on).
pub fn default_pod(obj: &mut Value) {
    if let Some(spec) = obj.get_mut("spec").and_then(Value::as_object_mut) {
        default_pod_spec(spec);
        // The ServiceAccount admission: a pod runs as `default` unless it names another.
        let sa = spec
            .get("serviceAccountName")
            .or_else(|| spec.get("serviceAccount"))
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .unwrap_or("default")
            .to_string();
        spec.insert("serviceAccountName".into(), sa.clone().into());
        spec.insert("serviceAccount".into(), sa.into());
        let (not_ready, unreachable) = *DEFAULT_TOLERATIONS.get_or_init(|| (300, 300));
        let tols = spec
            .entry("tolerations")
            .or_insert_with(|| serde_json::json!([]));
        if let Some(list) = tols.as_array_mut() {
            for (key, secs) in [
                ("node.kubernetes.io/not-ready", not_ready),
                ("node.kubernetes.io/unreachable", unreachable),
            ] {
                let covered = list.iter().any(|t| {
                    let effect = t["effect"].as_str().unwrap_or("");
                    (t["key"] == key
                        || (t["key"].as_str().unwrap_or("").is_empty()
                            && t["operator"] == "Exists"))
                        && (effect.is_empty() || effect == "NoExecute")
                });
                if !covered {
                    list.push(serde_json::json!({"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": secs}));
                }
            }
        }
    }
    if obj.get("status").is_none() {
        obj["status"] = serde_json::json!({"phase": "Pending"});
    }
}

pub fn default_pod_spec(spec: &mut serde_json::Map<String, Value>) {
    let mut set = |k: &str, v: Value| {
        spec.entry(k.to_string()).or_insert(v);
    };
    set("restartPolicy", "Always".into());
    set("terminationGracePeriodSeconds", 30.into());
    set("dnsPolicy", "ClusterFirst".into());
    set("schedulerName", "default-scheduler".into());
    set("securityContext", serde_json::json!({}));
    set("enableServiceLinks", true.into());
    for list in ["initContainers", "containers"] {
        let Some(cs) = spec.get_mut(list).and_then(Value::as_array_mut) else {
            continue;
        };
        for c in cs.iter_mut().filter_map(Value::as_object_mut) {
            let image = c
                .get("image")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            c.entry("imagePullPolicy")
                .or_insert_with(|| crate::kinds::pod::default_pull_policy(&image).into());
            c.entry("terminationMessagePath")
                .or_insert_with(|| "/dev/termination-log".into());
            c.entry("terminationMessagePolicy")
                .or_insert_with(|| "File".into());
            if let Some(ports) = c.get_mut("ports").and_then(Value::as_array_mut) {
                for p in ports.iter_mut().filter_map(Value::as_object_mut) {
                    p.entry("protocol").or_insert_with(|| "TCP".into());
                }
            }
            for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
                if let Some(p) = c.get_mut(probe).and_then(Value::as_object_mut) {
                    p.entry("timeoutSeconds").or_insert(1.into());
                    p.entry("periodSeconds").or_insert(10.into());
                    p.entry("successThreshold").or_insert(1.into());
                    p.entry("failureThreshold").or_insert(3.into());
                    if let Some(h) = p.get_mut("httpGet").and_then(Value::as_object_mut) {
                        h.entry("path").or_insert_with(|| "/".into());
                        h.entry("scheme").or_insert_with(|| "HTTP".into());
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn pods_get_the_service_account_volume_unless_they_opt_out() {
        let mut p = serde_json::json!({"metadata": {"name": "p"}, "spec": {
            "containers": [{"name": "a"}], "initContainers": [{"name": "i"}]}});
        mount_service_account_token(&mut p);
        let vol = &p["spec"]["volumes"][0];
        let name = vol["name"].as_str().unwrap();
        assert!(
            name.starts_with("kube-api-access-") && name.len() == 21,
            "{name}"
        );
        let srcs = vol["projected"]["sources"].as_array().unwrap();
        assert_eq!(srcs[0]["serviceAccountToken"]["path"], "token");
        assert_eq!(srcs[1]["configMap"]["name"], "kube-root-ca.crt");
        for c in ["containers", "initContainers"] {
            assert_eq!(p["spec"][c][0]["volumeMounts"][0]["mountPath"], SA_MOUNT);
            assert_eq!(p["spec"][c][0]["volumeMounts"][0]["readOnly"], true);
        }
        let before = p.clone();
        mount_service_account_token(&mut p);
        assert_eq!(p, before, "already mounted: nothing added twice");
        let mut off = serde_json::json!({"spec": {"automountServiceAccountToken": false, "containers": [{"name": "a"}]}});
        mount_service_account_token(&mut off);
        assert!(off["spec"].get("volumes").is_none());
        let mut mirror = serde_json::json!({"metadata": {"annotations": {"kubernetes.io/config.mirror": "x"}},
            "spec": {"containers": [{"name": "a"}]}});
        mount_service_account_token(&mut mirror);
        assert!(mirror["spec"].get("volumes").is_none());
    }

    use serde_json::json;

    use super::*;
    use crate::api::registry::find;

    #[test]
    fn unknown_fields_are_found_with_their_paths() {
        let r = find("", "v1", "configmaps").unwrap();
        let d = decode(r, &json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a", "colour": "x"}, "data": {"k": "v"}, "spce": {}, "extra": 1})).unwrap();
        assert_eq!(
            d.unknown,
            vec!["extra".to_string(), "metadata.colour".to_string()]
        );
        assert!(d.canonical.get("extra").is_none());
    }

    #[test]
    fn type_errors_name_the_field() {
        let r = find("", "v1", "configmaps").unwrap();
        let e = decode(r, &json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a"}, "data": {"k": 5}})).err().unwrap();
        assert!(
            e.contains("cannot be handled as a ConfigMap: data.k"),
            "{e}"
        );
    }

    #[test]
    fn pods_get_kube_apiserver_defaults() {
        let mut p = json!({"spec": {"containers": [{"name": "a", "image": "busybox", "ports": [{"containerPort": 80}]},
                                                   {"name": "b", "image": "nginx:1.27"}]}});
        default_pod(&mut p);
        assert_eq!(p["spec"]["restartPolicy"], "Always");
        assert_eq!(p["spec"]["terminationGracePeriodSeconds"], 30);
        assert_eq!(p["spec"]["containers"][0]["imagePullPolicy"], "Always");
        assert_eq!(
            p["spec"]["containers"][1]["imagePullPolicy"],
            "IfNotPresent"
        );
        assert_eq!(p["spec"]["containers"][0]["ports"][0]["protocol"], "TCP");
        assert_eq!(p["status"]["phase"], "Pending");
    }

    #[test]
    fn workloads_get_strategy_and_template_defaults() {
        let mut d = json!({"spec": {"strategy": {}, "template": {"spec": {"containers": [{"name": "a", "image": "x:1"}]}}}});
        default_workload("Deployment", &mut d);
        assert_eq!(d["spec"]["replicas"], 1);
        assert_eq!(d["spec"]["strategy"]["type"], "RollingUpdate");
        assert_eq!(d["spec"]["strategy"]["rollingUpdate"]["maxSurge"], "25%");
        assert_eq!(d["spec"]["revisionHistoryLimit"], 10);
        assert_eq!(d["spec"]["progressDeadlineSeconds"], 600);
        assert_eq!(d["spec"]["template"]["spec"]["restartPolicy"], "Always");
        let mut r = json!({"spec": {"strategy": {"type": "Recreate"}}});
        default_workload("Deployment", &mut r);
        assert!(r["spec"]["strategy"].get("rollingUpdate").is_none());
        let mut ds = json!({"spec": {}});
        default_workload("DaemonSet", &mut ds);
        assert_eq!(
            ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"],
            1
        );
        assert!(ds["spec"].get("replicas").is_none());
    }
}
