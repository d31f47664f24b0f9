//! `meta.k8s.io/v1` Table responses with kubectl's usual columns, so `kubectl get` prints what
//! users expect. Rows carry the object's metadata (for `-A`, `--show-labels`).

use serde_json::{Value, json};

use super::registry::Resource;

mod storage;
pub use storage::{PERSISTENT_VOLUME, PERSISTENT_VOLUME_CLAIM, STORAGE_CLASS};

fn age(obj: &Value) -> String {
    let created = obj
        .pointer("/metadata/creationTimestamp")
        .and_then(Value::as_str)
        .and_then(|t| t.parse().ok());
    crate::kinds::print::age_since(created)
}

fn columns(t: &Columns) -> Vec<Value> {
    t.columns
        .iter()
        .map(|(name, typ, priority)| {
            json!({"name": name, "type": typ, "format": if *name == "Name" { "name" } else { "" },
                   "description": "", "priority": priority})
        })
        .collect()
}

fn name(obj: &Value) -> Value {
    obj.pointer("/metadata/name")
        .cloned()
        .unwrap_or(Value::Null)
}

fn int(obj: &Value, p: &str) -> i64 {
    obj.pointer(p).and_then(Value::as_i64).unwrap_or(0)
}

fn text(obj: &Value, p: &str, default: &str) -> Value {
    obj.pointer(p)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map_or_else(|| json!(default), |s| json!(s))
}

/// A list shown as kubectl does: the first few, then `+ N more...`.
fn some(items: Vec<String>, none: &str) -> Value {
    if items.is_empty() {
        return json!(none);
    }
    let mut s = items.iter().take(3).cloned().collect::<Vec<_>>().join(",");
    if items.len() > 3 {
        s.push_str(&format!(" + {} more...", items.len() - 3));
    }
    json!(s)
}

fn containers_and_images(obj: &Value, p: &str) -> (Value, Value) {
    let cs = obj.pointer(p).and_then(Value::as_array);
    let pick = |k: &str| {
        json!(
            cs.into_iter()
                .flatten()
                .filter_map(|c| c.get(k).and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join(",")
        )
    };
    (pick("name"), pick("image"))
}

fn node_status(obj: &Value) -> String {
    let ready = obj
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"))
        .and_then(|c| c["status"].as_str());
    let mut s = match ready {
        Some("True") => "Ready".to_string(),
        _ => "NotReady".to_string(),
    };
    if obj.pointer("/spec/unschedulable") == Some(&json!(true)) {
        s.push_str(",SchedulingDisabled");
    }
    s
}

/// One kind's Table: kubectl's columns (name, type, priority) and a row's cells.
#[derive(Debug)]
pub struct Columns {
    pub columns: &'static [(&'static str, &'static str, i32)],
    pub cells: fn(&Value) -> Vec<Value>,
}

/// Kinds without their own columns: Name and Age.
pub const PLAIN: Columns = Columns {
    columns: &[("Name", "string", 0), ("Age", "string", 0)],
    cells: |obj| vec![name(obj), json!(age(obj))],
};

/// Namespace.
pub const NAMESPACE: Columns = Columns {
    columns: &[
        ("Name", "string", 0),
        ("Status", "string", 0),
        ("Age", "string", 0),
    ],
    cells: namespace_cells,
};

fn namespace_cells(obj: &Value) -> Vec<Value> {
    let name = name(obj);
    vec![
        name,
        obj.pointer("/status/phase")
            .cloned()
            .unwrap_or_else(|| json!("Active")),
        json!(age(obj)),
    ]
}

/// Pod.
pub const POD: Columns = Columns {
    columns: &[
        ("Name", "string", 0),
        ("Ready", "string", 0),
        ("Status", "string", 0),
        ("Restarts", "string", 0),
        ("Age", "string", 0),
        ("IP", "string", 1),
        ("Node", "string", 1),
    ],
    cells: pod_cells,
};

fn pod_cells(obj: &Value) -> Vec<Value> {
    let name = name(obj);
    let pod: Option<k8s_openapi::api::core::v1::Pod> = serde_json::from_value(obj.clone()).ok();
    let (ready, status, restarts) = match &pod {
        Some(p) => {
            let (ready, restarts) = crate::kinds::print::ready_and_restarts(p);
            (
                ready,
                crate::kinds::print::pod_status(p),
                restarts.to_string(),
            )
        }
        None => ("0/0".into(), "Unknown".into(), "0".into()),
    };
    vec![
        name,
        json!(ready),
        json!(status),
        json!(restarts),
        json!(age(obj)),
        obj.pointer("/status/podIP")
            .cloned()
            .unwrap_or_else(|| json!("<none>")),
        obj.pointer("/spec/nodeName")
            .cloned()
            .unwrap_or_else(|| json!("<none>")),
    ]
}

/// ConfigMap, Secret.
pub const CONFIG: Columns = Columns {
    columns: &[
        ("Name", "string", 0),
        ("Data", "integer", 0),
        ("Age", "string", 0),
    ],
    cells: config_cells,
};

fn config_cells(obj: &Value) -> Vec<Value> {
    let name = name(obj);
    let n = ["data", "binaryData", "stringData"]
        .iter()
        .filter_map(|f| obj.get(*f).and_then(Value::as_object).map(|m| m.len()))
        .sum::<usize>();
    vec![name, json!(n), json!(age(obj))]
}

/// Service.
pub const SERVICE: Columns = Columns {
    columns: &[
        ("Name", "string", 0),
        ("Type", "string", 0),
        ("Cluster-IP", "string", 0),
        ("External-IP", "string", 0),
        ("Port(s)", "string", 0),
        ("Age", "string", 0),
        ("Selector", "string", 1),
    ],
    cells: service_cells,
};

fn service_cells(obj: &Value) -> Vec<Value> {
    let name = name(obj);
    let ports: Vec<String> = obj
        .pointer("/spec/ports")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|p| {
            let port = p.get("port").and_then(Value::as_i64).unwrap_or(0);
            let proto = p.get("protocol").and_then(Value::as_str).unwrap_or("TCP");
            match p.get("nodePort").and_then(Value::as_i64) {
                Some(np) => format!("{port}:{np}/{proto}"),
                None => format!("{port}/{proto}"),
            }
        })
        .collect();
    let selector = Some(super::selector::labels_to_string(
        obj.pointer("/spec/selector"),
    ))
    .filter(|s| !s.is_empty())
    .unwrap_or_else(|| "<none>".into());
    let external = obj
        .pointer("/spec/externalIPs")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(",")
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "<none>".into());
    vec![
        name,
        obj.pointer("/spec/type")
            .cloned()
            .unwrap_or_else(|| json!("ClusterIP")),
        obj.pointer("/spec/clusterIP")
            .cloned()
            .unwrap_or_else(|| json!("<none>")),
        json!(external),
        json!(if ports.is_empty() {
            "<none>".to_string()
        } else {
            ports.join(",")
        }),
        json!(age(obj)),
        json!(selector),
    ]
}

/// Deployment.
pub const DEPLOYMENT: Columns = Columns {
    columns: &[
        ("Name", "string", 0),
        ("Ready", "string", 0),
        ("Up-to-date", "string", 0),
        ("Available", "string", 0),
        ("Age", "string", 0),
    ],
    cells: deployment_cells,
};

fn deployment_cells(obj: &Value) -> Vec<Value> {
    let name = name(obj);
    let n = |p: &str| obj.pointer(p).and_then(Value::as_i64).unwrap_or(0);
    vec![
        name,
        json!(format!(
            "{}/{}",
            n("/status/readyReplicas"),
            obj.pointer("/spec/replicas")
                .and_then(Value::as_i64)
                .unwrap_or(1)
        )),
        json!(n("/status/updatedReplicas")),
        json!(n("/status/availableReplicas")),
        json!(age(obj)),
    ]
}

/// Node.
pub const NODE: Columns = Columns {
    columns: &[
        ("Name", "string", 0),
        ("Status", "string", 0),
        ("Roles", "string", 0),
        ("Age", "string", 0),
        ("Version", "string", 0),
        ("Internal-IP", "string", 1),
        ("OS-Image", "string", 1),
        ("Kernel-Version", "string", 1),
        ("Container-Runtime", "string", 1),
    ],
    cells: node_cells,
};

fn node_cells(obj: &Value) -> Vec<Value> {
    let name = name(obj);
    let roles: Vec<String> = obj
        .pointer("/metadata/labels")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .filter_map(|(k, _)| {
            k.strip_prefix("node-role.kubernetes.io/")
                .map(str::to_string)
        })
        .collect();
    let internal = obj
        .pointer("/status/addresses")
        .and_then(Value::as_array)
        .and_then(|a| a.iter().find(|x| x["type"] == "InternalIP"))
        .and_then(|x| x["address"].as_str())
        .unwrap_or("<none>")
        .to_string();
    vec![
        name,
        json!(node_status(obj)),
        json!(if roles.is_empty() {
            "<none>".to_string()
        } else {
            roles.join(",")
        }),
        json!(age(obj)),
        text(obj, "/status/nodeInfo/kubeletVersion", ""),
        json!(internal),
        text(obj, "/status/nodeInfo/osImage", "<unknown>"),
        text(obj, "/status/nodeInfo/kernelVersion", "<unknown>"),
        text(obj, "/status/nodeInfo/containerRuntimeVersion", "<unknown>"),
    ]
}

/// ReplicaSet.
pub const REPLICA_SET: Columns = Columns {
    columns: &[
        ("Name", "string", 0),
        ("Desired", "integer", 0),
        ("Current", "integer", 0),
        ("Ready", "integer", 0),
        ("Age", "string", 0),
        ("Containers", "string", 1),
        ("Images", "string", 1),
        ("Selector", "string", 1),
    ],
    cells: replica_set_cells,
};

fn replica_set_cells(obj: &Value) -> Vec<Value> {
    let name = name(obj);
    let (cs, images) = containers_and_images(obj, "/spec/template/spec/containers");
    vec![
        name,
        json!(int(obj, "/spec/replicas")),
        json!(int(obj, "/status/replicas")),
        json!(int(obj, "/status/readyReplicas")),
        json!(age(obj)),
        cs,
        images,
        json!(super::selector::labels_to_string(
            obj.pointer("/spec/selector/matchLabels")
        )),
    ]
}

/// Job: kube's STATUS (Complete, Failed, Terminating, Suspended, FailureTarget, Running),
/// COMPLETIONS (`succeeded/completions`, `n/1 of P` for a work queue) and DURATION.
pub const JOB: Columns = Columns {
    columns: &[
        ("Name", "string", 0),
        ("Status", "string", 0),
        ("Completions", "string", 0),
        ("Duration", "string", 0),
        ("Age", "string", 0),
        ("Containers", "string", 1),
        ("Images", "string", 1),
        ("Selector", "string", 1),
    ],
    cells: job_cells,
};

fn job_cells(obj: &Value) -> Vec<Value> {
    let succeeded = int(obj, "/status/succeeded");
    let completions = match obj.pointer("/spec/completions").and_then(Value::as_i64) {
        Some(c) => format!("{succeeded}/{c}"),
        None => match int(obj, "/spec/parallelism") {
            p if p > 1 => format!("{succeeded}/1 of {p}"),
            _ => format!("{succeeded}/1"),
        },
    };
    let has = |ty: &str| {
        obj.pointer("/status/conditions")
            .and_then(Value::as_array)
            .is_some_and(|cs| cs.iter().any(|c| c["type"] == ty && c["status"] == "True"))
    };
    let status = if has("Complete") {
        "Complete"
    } else if has("Failed") {
        "Failed"
    } else if obj.pointer("/metadata/deletionTimestamp").is_some() {
        "Terminating"
    } else if has("Suspended") {
        "Suspended"
    } else if has("FailureTarget") {
        "FailureTarget"
    } else {
        "Running"
    };
    let time = |p: &str| -> Option<jiff::Timestamp> {
        obj.pointer(p)
            .and_then(Value::as_str)
            .and_then(|t| t.parse().ok())
    };
    let duration = match (time("/status/startTime"), time("/status/completionTime")) {
        (None, _) => String::new(),
        (Some(s), None) => crate::kinds::print::age_since(Some(s)),
        (Some(s), Some(c)) => crate::kinds::print::age_of_secs(c.as_second() - s.as_second()),
    };
    let containers = obj
        .pointer("/spec/template/spec/containers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let list = |k: &str| {
        containers
            .iter()
            .filter_map(|c| c[k].as_str().map(str::to_string))
            .collect::<Vec<_>>()
            .join(",")
    };
    let selector = obj
        .pointer("/spec/selector/matchLabels")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default();
    vec![
        name(obj),
        json!(status),
        json!(completions),
        json!(duration),
        json!(age(obj)),
        json!(list("name")),
        json!(list("image")),
        json!(selector),
    ]
}

/// CronJob: kube's SCHEDULE, TIMEZONE, SUSPEND, ACTIVE and LAST SCHEDULE.
pub const CRON_JOB: Columns = Columns {
    columns: &[
        ("Name", "string", 0),
        ("Schedule", "string", 0),
        ("Timezone", "string", 0),
        ("Suspend", "boolean", 0),
        ("Active", "integer", 0),
        ("Last Schedule", "string", 0),
        ("Age", "string", 0),
    ],
    cells: cron_job_cells,
};

fn cron_job_cells(obj: &Value) -> Vec<Value> {
    let last = obj
        .pointer("/status/lastScheduleTime")
        .and_then(Value::as_str)
        .and_then(|t| t.parse().ok())
        .map_or_else(
            || "<none>".to_string(),
            |t| crate::kinds::print::age_since(Some(t)),
        );
    let active = obj
        .pointer("/status/active")
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    vec![
        name(obj),
        text(obj, "/spec/schedule", ""),
        text(obj, "/spec/timeZone", "<none>"),
        json!(
            obj.pointer("/spec/suspend")
                .and_then(Value::as_bool)
                .unwrap_or(false)
        ),
        json!(active),
        json!(last),
        json!(age(obj)),
    ]
}

/// DaemonSet.
pub const DAEMON_SET: Columns = Columns {
    columns: &[
        ("Name", "string", 0),
        ("Desired", "integer", 0),
        ("Current", "integer", 0),
        ("Ready", "integer", 0),
        ("Up-to-date", "integer", 0),
        ("Available", "integer", 0),
        ("Node Selector", "string", 0),
        ("Age", "string", 0),
    ],
    cells: daemon_set_cells,
};

fn daemon_set_cells(obj: &Value) -> Vec<Value> {
    let name = name(obj);
    vec![
        name,
        json!(int(obj, "/status/desiredNumberScheduled")),
        json!(int(obj, "/status/currentNumberScheduled")),
        json!(int(obj, "/status/numberReady")),
        json!(int(obj, "/status/updatedNumberScheduled")),
        json!(int(obj, "/status/numberAvailable")),
        json!(
            Some(super::selector::labels_to_string(
                obj.pointer("/spec/template/spec/nodeSelector")
            ))
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "<none>".into())
        ),
        json!(age(obj)),
    ]
}

/// StatefulSet.
pub const STATEFUL_SET: Columns = Columns {
    columns: &[
        ("Name", "string", 0),
        ("Ready", "string", 0),
        ("Age", "string", 0),
        ("Containers", "string", 1),
        ("Images", "string", 1),
    ],
    cells: stateful_set_cells,
};

fn stateful_set_cells(obj: &Value) -> Vec<Value> {
    let (containers, images) = containers_and_images(obj, "/spec/template/spec/containers");
    vec![
        name(obj),
        json!(format!(
            "{}/{}",
            int(obj, "/status/readyReplicas"),
            obj.pointer("/spec/replicas")
                .and_then(Value::as_i64)
                .unwrap_or(1)
        )),
        json!(age(obj)),
        containers,
        images,
    ]
}

/// ControllerRevision.
pub const CONTROLLER_REVISION: Columns = Columns {
    columns: &[
        ("Name", "string", 0),
        ("Controller", "string", 0),
        ("Revision", "integer", 0),
        ("Age", "string", 0),
    ],
    cells: controller_revision_cells,
};

fn controller_revision_cells(obj: &Value) -> Vec<Value> {
    let owner = obj
        .pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .and_then(|rs| rs.iter().find(|r| r["controller"] == json!(true)));
    let controller = match owner {
        Some(r) => {
            let kind = r["kind"].as_str().unwrap_or("").to_lowercase();
            let group = r["apiVersion"]
                .as_str()
                .and_then(|a| a.split_once('/'))
                .map(|(g, _)| format!(".{g}"))
                .unwrap_or_default();
            format!("{kind}{group}/{}", r["name"].as_str().unwrap_or(""))
        }
        None => "<none>".into(),
    };
    vec![
        name(obj),
        json!(controller),
        json!(int(obj, "/revision")),
        json!(age(obj)),
    ]
}

/// PriorityClass: kubectl's columns.
pub const PRIORITY_CLASS: Columns = Columns {
    columns: &[
        ("Name", "string", 0),
        ("Value", "integer", 0),
        ("Global-Default", "boolean", 0),
        ("Age", "string", 0),
        ("PreemptionPolicy", "string", 0),
    ],
    cells: |obj| {
        vec![
            name(obj),
            json!(int(obj, "/value")),
            json!(
                obj.get("globalDefault")
                    .and_then(Value::as_bool)
                    .unwrap_or(false)
            ),
            json!(age(obj)),
            text(obj, "/preemptionPolicy", "PreemptLowerPriority"),
        ]
    },
};

/// APIService: where it is served and whether it is available.
pub const API_SERVICE: Columns = Columns {
    columns: &[
        ("Name", "string", 0),
        ("Service", "string", 0),
        ("Available", "string", 0),
        ("Age", "string", 0),
    ],
    cells: |obj| {
        let service = match obj.pointer("/spec/service") {
            Some(s) if s.is_object() => format!(
                "{}/{}",
                s["namespace"].as_str().unwrap_or(""),
                s["name"].as_str().unwrap_or("")
            ),
            _ => "Local".into(),
        };
        let available = obj
            .pointer("/status/conditions")
            .and_then(Value::as_array)
            .and_then(|c| c.iter().find(|c| c["type"] == "Available"))
            .map(|c| {
                let status = c["status"].as_str().unwrap_or("Unknown");
                match c["reason"].as_str().filter(|_| status != "True") {
                    Some(r) => format!("{status} ({r})"),
                    None => status.to_string(),
                }
            })
            .unwrap_or_else(|| "Unknown".into());
        vec![name(obj), json!(service), json!(available), json!(age(obj))]
    },
};

/// PodDisruptionBudget.
pub const POD_DISRUPTION_BUDGET: Columns = Columns {
    columns: &[
        ("Name", "string", 0),
        ("Min Available", "string", 0),
        ("Max Unavailable", "string", 0),
        ("Allowed Disruptions", "integer", 0),
        ("Age", "string", 0),
    ],
    cells: pdb_cells,
};

fn pdb_cells(obj: &Value) -> Vec<Value> {
    let int_or_str = |p: &str| match obj.pointer(p) {
        Some(Value::Number(n)) => json!(n.to_string()),
        Some(Value::String(s)) => json!(s),
        _ => json!("N/A"),
    };
    vec![
        name(obj),
        int_or_str("/spec/minAvailable"),
        int_or_str("/spec/maxUnavailable"),
        json!(int(obj, "/status/disruptionsAllowed")),
        json!(age(obj)),
    ]
}

/// Event.
pub const EVENT: Columns = Columns {
    columns: &[
        ("Last Seen", "string", 0),
        ("Type", "string", 0),
        ("Reason", "string", 0),
        ("Object", "string", 0),
        ("Message", "string", 0),
    ],
    cells: event_cells,
};

fn event_cells(obj: &Value) -> Vec<Value> {
    let last = obj
        .pointer("/lastTimestamp")
        .or_else(|| obj.pointer("/eventTime"))
        .or_else(|| obj.pointer("/metadata/creationTimestamp"))
        .and_then(Value::as_str)
        .and_then(|t| t.parse().ok());
    let kind = obj
        .pointer("/involvedObject/kind")
        .and_then(Value::as_str)
        .unwrap_or("");
    let oname = obj
        .pointer("/involvedObject/name")
        .and_then(Value::as_str)
        .unwrap_or("");
    vec![
        json!(crate::kinds::print::age_since(last)),
        text(obj, "/type", ""),
        text(obj, "/reason", ""),
        json!(format!("{}/{oname}", kind.to_lowercase())),
        text(obj, "/message", ""),
    ]
}

/// Endpoints.
pub const ENDPOINTS: Columns = Columns {
    columns: &[
        ("Name", "string", 0),
        ("Endpoints", "string", 0),
        ("Age", "string", 0),
    ],
    cells: endpoints_cells,
};

fn endpoints_cells(obj: &Value) -> Vec<Value> {
    let name = name(obj);
    let mut eps = vec![];
    for ss in obj
        .pointer("/subsets")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let ports: Vec<i64> = ss["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["port"].as_i64())
            .collect();
        for a in ss["addresses"].as_array().into_iter().flatten() {
            let ip = a["ip"].as_str().unwrap_or("");
            if ports.is_empty() {
                eps.push(ip.to_string());
            }
            eps.extend(ports.iter().map(|p| format!("{ip}:{p}")));
        }
    }
    vec![name, some(eps, "<none>"), json!(age(obj))]
}

/// EndpointSlice.
pub const ENDPOINT_SLICE: Columns = Columns {
    columns: &[
        ("Name", "string", 0),
        ("AddressType", "string", 0),
        ("Ports", "string", 0),
        ("Endpoints", "string", 0),
        ("Age", "string", 0),
    ],
    cells: endpoint_slice_cells,
};

fn endpoint_slice_cells(obj: &Value) -> Vec<Value> {
    let name = name(obj);
    let ports: Vec<String> = obj
        .pointer("/ports")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|p| p["port"].as_i64().map(|n| n.to_string()))
        .collect();
    let eps: Vec<String> = obj
        .pointer("/endpoints")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .flat_map(|e| e["addresses"].as_array().cloned().unwrap_or_default())
        .filter_map(|a| a.as_str().map(str::to_string))
        .collect();
    vec![
        name,
        text(obj, "/addressType", ""),
        json!(if ports.is_empty() {
            "<unset>".to_string()
        } else {
            ports.join(",")
        }),
        some(eps, "<unset>"),
        json!(age(obj)),
    ]
}

/// Lease.
pub const LEASE: Columns = Columns {
    columns: &[
        ("Name", "string", 0),
        ("Holder", "string", 0),
        ("Age", "string", 0),
    ],
    cells: lease_cells,
};

fn lease_cells(obj: &Value) -> Vec<Value> {
    let name = name(obj);
    vec![
        name,
        text(obj, "/spec/holderIdentity", "<none>"),
        json!(age(obj)),
    ]
}

/// ServiceAccount.
pub const SERVICE_ACCOUNT: Columns = Columns {
    columns: &[
        ("Name", "string", 0),
        ("Secrets", "integer", 0),
        ("Age", "string", 0),
    ],
    cells: service_account_cells,
};

fn service_account_cells(obj: &Value) -> Vec<Value> {
    let name = name(obj);
    vec![
        name,
        json!(
            obj.pointer("/secrets")
                .and_then(Value::as_array)
                .map_or(0, Vec::len)
        ),
        json!(age(obj)),
    ]
}

/// CertificateSigningRequest.
pub const CSR: Columns = Columns {
    columns: &[
        ("Name", "string", 0),
        ("Age", "string", 0),
        ("SignerName", "string", 0),
        ("Requestor", "string", 0),
        ("RequestedDuration", "string", 0),
        ("Condition", "string", 0),
    ],
    cells: csr_cells,
};

fn csr_cells(obj: &Value) -> Vec<Value> {
    let name = name(obj);
    vec![
        name,
        json!(age(obj)),
        text(obj, "/spec/signerName", "<none>"),
        text(obj, "/spec/username", "<none>"),
        json!(
            obj.pointer("/spec/expirationSeconds")
                .and_then(Value::as_i64)
                .map_or("<none>".to_string(), crate::kinds::print::age_of_secs)
        ),
        json!(csr_condition(obj)),
    ]
}

/// kubectl's CONDITION column of a CertificateSigningRequest: Pending, or the conditions
/// (Approved, Denied, Failed) joined, with Issued once a certificate is there.
fn csr_condition(obj: &Value) -> String {
    let mut out: Vec<String> = obj
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|c| c["type"].as_str().map(str::to_string))
        .collect();
    if out.is_empty() {
        out.push("Pending".into());
    }
    if obj
        .pointer("/status/certificate")
        .and_then(Value::as_str)
        .is_some_and(|c| !c.is_empty())
    {
        out.push("Issued".into());
    }
    out.join(",")
}

/// A Table of `objs`. `event` marks a one-row table sent in a watch.
pub fn table(r: &Resource, objs: &[Value], _event: Option<&str>) -> Value {
    let rows: Vec<Value> = objs
        .iter()
        .map(|o| {
            json!({
                "cells": (r.strategy.table.cells)(o),
                "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                           "metadata": o.get("metadata").cloned().unwrap_or_else(|| json!({}))},
            })
        })
        .collect();
    json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {},
           "columnDefinitions": columns(r.strategy.table), "rows": rows})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_as_many_cells_as_columns() {
        for r in super::super::registry::RESOURCES {
            let t = table(
                r,
                &[json!({"metadata": {"name": "x"}, "spec": {"ports": [{"port": 80}]}})],
                None,
            );
            assert_eq!(
                t["columnDefinitions"].as_array().unwrap().len(),
                t["rows"][0]["cells"].as_array().unwrap().len(),
                "{}",
                r.kind
            );
        }
    }

    #[test]
    fn namespaces_show_their_phase_and_rows_carry_metadata() {
        let r = super::super::registry::find("", "v1", "namespaces").unwrap();
        let t = table(
            r,
            &[
                json!({"metadata": {"name": "default", "labels": {"a": "b"}}, "status": {"phase": "Active"}}),
            ],
            None,
        );
        assert_eq!(t["columnDefinitions"][1]["name"], "Status");
        assert_eq!(t["rows"][0]["cells"][0], "default");
        assert_eq!(t["rows"][0]["cells"][1], "Active");
        assert_eq!(t["rows"][0]["object"]["metadata"]["labels"]["a"], "b");
    }
}
