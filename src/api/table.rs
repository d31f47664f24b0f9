//! `meta.k8s.io/v1` Table responses with kubectl's usual columns, so `kubectl get` prints what
//! users expect. Rows carry the object's metadata (for `-A`, `--show-labels`).

use serde_json::{Value, json};

use super::registry::Resource;

fn age(obj: &Value) -> String {
    let created = obj
        .pointer("/metadata/creationTimestamp")
        .and_then(Value::as_str)
        .and_then(|t| t.parse().ok());
    crate::agent::print::age_since(created)
}

fn col(name: &str, typ: &str, priority: i32) -> Value {
    json!({"name": name, "type": typ, "format": if name == "Name" { "name" } else { "" }, "description": "", "priority": priority})
}

/// Columns and cells for one kind.
fn columns(r: &Resource) -> Vec<Value> {
    match r.kind {
        "Namespace" => vec![
            col("Name", "string", 0),
            col("Status", "string", 0),
            col("Age", "string", 0),
        ],
        "Pod" => vec![
            col("Name", "string", 0),
            col("Ready", "string", 0),
            col("Status", "string", 0),
            col("Restarts", "string", 0),
            col("Age", "string", 0),
            col("IP", "string", 1),
            col("Node", "string", 1),
        ],
        "ConfigMap" | "Secret" => vec![
            col("Name", "string", 0),
            col("Data", "integer", 0),
            col("Age", "string", 0),
        ],
        "Service" => vec![
            col("Name", "string", 0),
            col("Type", "string", 0),
            col("Cluster-IP", "string", 0),
            col("External-IP", "string", 0),
            col("Port(s)", "string", 0),
            col("Age", "string", 0),
            col("Selector", "string", 1),
        ],
        "Deployment" => vec![
            col("Name", "string", 0),
            col("Ready", "string", 0),
            col("Up-to-date", "string", 0),
            col("Available", "string", 0),
            col("Age", "string", 0),
        ],
        _ => vec![col("Name", "string", 0), col("Age", "string", 0)],
    }
}

fn cells(r: &Resource, obj: &Value) -> Vec<Value> {
    let name = obj
        .pointer("/metadata/name")
        .cloned()
        .unwrap_or(Value::Null);
    match r.kind {
        "Namespace" => vec![
            name,
            obj.pointer("/status/phase")
                .cloned()
                .unwrap_or_else(|| json!("Active")),
            json!(age(obj)),
        ],
        "Pod" => {
            let pod: Option<k8s_openapi::api::core::v1::Pod> =
                serde_json::from_value(obj.clone()).ok();
            let (ready, status, restarts) = match &pod {
                Some(p) => {
                    let (ready, restarts) = crate::agent::print::ready_and_restarts(p);
                    (
                        ready,
                        crate::agent::print::pod_status(p),
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
        "ConfigMap" | "Secret" => {
            let n = ["data", "binaryData", "stringData"]
                .iter()
                .filter_map(|f| obj.get(*f).and_then(Value::as_object).map(|m| m.len()))
                .sum::<usize>();
            vec![name, json!(n), json!(age(obj))]
        }
        "Service" => {
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
        "Deployment" => {
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
        _ => vec![name, json!(age(obj))],
    }
}

/// A Table of `objs`. `event` marks a one-row table sent in a watch.
pub fn table(r: &Resource, objs: &[Value], _event: Option<&str>) -> Value {
    let rows: Vec<Value> = objs
        .iter()
        .map(|o| {
            json!({
                "cells": cells(r, o),
                "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                           "metadata": o.get("metadata").cloned().unwrap_or_else(|| json!({}))},
            })
        })
        .collect();
    json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {},
           "columnDefinitions": columns(r), "rows": rows})
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
