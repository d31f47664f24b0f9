use super::*;

fn meta(name: &str) -> Vec<u8> {
    let mut m = Vec::new();
    put_bytes(1, name.as_bytes(), &mut m);
    put_bytes(2, b"", &mut m);
    let mut t = Vec::new();
    put_int(1, GO_ZERO_TIME, &mut t);
    put_int(2, 0, &mut t);
    put_bytes(8, &t, &mut m);
    let mut label = Vec::new();
    put_bytes(1, b"app", &mut label);
    put_bytes(2, name.as_bytes(), &mut label);
    put_bytes(11, &label, &mut m);
    m
}

#[test]
fn deployment_like_kubectl_create() {
    let mut container = Vec::new();
    put_bytes(1, b"busybox", &mut container);
    put_bytes(2, b"busybox:1", &mut container);
    put_bytes(3, b"sleep", &mut container);
    put_bytes(3, b"3600", &mut container);
    put_bytes(8, b"", &mut container);
    let mut pspec = Vec::new();
    put_bytes(2, &container, &mut pspec);
    let mut tmpl = Vec::new();
    put_bytes(1, &meta("web"), &mut tmpl);
    put_bytes(2, &pspec, &mut tmpl);
    let mut sel = Vec::new();
    let mut e = Vec::new();
    put_bytes(1, b"app", &mut e);
    put_bytes(2, b"web", &mut e);
    put_bytes(1, &e, &mut sel);
    let mut spec = Vec::new();
    put_int(1, 0, &mut spec);
    put_bytes(2, &sel, &mut spec);
    put_bytes(3, &tmpl, &mut spec);
    put_bytes(4, b"", &mut spec);
    put_int(5, 0, &mut spec);
    let mut d = Vec::new();
    put_bytes(1, &meta("web"), &mut d);
    put_bytes(2, &spec, &mut d);
    put_bytes(3, b"", &mut d);
    let v = decode_body(&envelope("apps/v1", "Deployment", &d)).unwrap();
    assert_eq!(v["kind"], "Deployment");
    assert_eq!(v["apiVersion"], "apps/v1");
    assert_eq!(v["metadata"]["name"], "web");
    assert!(v["metadata"].get("generateName").is_none());
    assert!(v["metadata"].get("creationTimestamp").is_none());
    assert_eq!(v["spec"]["replicas"], 0, "pointer zero kept");
    assert!(v["spec"].get("minReadySeconds").is_none());
    assert_eq!(v["spec"]["selector"]["matchLabels"]["app"], "web");
    let c = &v["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["image"], "busybox:1");
    assert_eq!(c["command"], serde_json::json!(["sleep", "3600"]));
    assert_eq!(c["resources"], serde_json::json!({}));
}

#[test]
fn service_target_port_and_secret_bytes() {
    let mut tp = Vec::new();
    put_int(1, 0, &mut tp);
    put_int(2, 8080, &mut tp);
    let mut port = Vec::new();
    put_bytes(1, b"80-8080", &mut port);
    put_bytes(2, b"TCP", &mut port);
    put_int(3, 80, &mut port);
    put_bytes(4, &tp, &mut port);
    let mut spec = Vec::new();
    put_bytes(1, &port, &mut spec);
    put_bytes(4, b"ClusterIP", &mut spec);
    let mut s = Vec::new();
    put_bytes(1, &meta("web"), &mut s);
    put_bytes(2, &spec, &mut s);
    let v = decode_body(&envelope("v1", "Service", &s)).unwrap();
    assert_eq!(v["spec"]["ports"][0]["targetPort"], 8080);
    assert_eq!(v["spec"]["type"], "ClusterIP");

    let mut entry = Vec::new();
    put_bytes(1, b"k", &mut entry);
    put_bytes(2, &[0, 1, 2], &mut entry);
    let mut sec = Vec::new();
    put_bytes(1, &meta("s"), &mut sec);
    put_bytes(2, &entry, &mut sec);
    put_bytes(3, b"Opaque", &mut sec);
    let v = decode_body(&envelope("v1", "Secret", &sec)).unwrap();
    assert_eq!(v["data"]["k"], "AAEC");
}

#[test]
fn unknown_fields_and_garbage_are_errors() {
    let mut d = Vec::new();
    put_bytes(1, &meta("x"), &mut d);
    put_bytes(99, b"data", &mut d);
    let e = decode_body(&envelope("v1", "ConfigMap", &d)).unwrap_err();
    assert!(e.to_string().contains("field 99 of ConfigMap"), "{e}");
    let e = decode_body(&envelope("example.com/v1", "Frobnicator", &d)).unwrap_err();
    assert!(e.to_string().contains("Frobnicator"), "{e}");
    let e = decode_body(b"k8s\0\x0a\xff").unwrap_err();
    assert!(
        e.to_string().contains("truncated") || e.to_string().contains("past"),
        "{e}"
    );
}

// Cross-checks against k8s-pb: prost's encoding of the Kubernetes types, generated independently
// of our schema, decoded by us; and ours decoded by prost.

use k8s_pb::api::apps::v1 as apps;
use k8s_pb::api::core::v1 as core;
use k8s_pb::apimachinery::pkg::api::resource::Quantity;
use k8s_pb::apimachinery::pkg::apis::meta::v1 as meta;
use k8s_pb::apimachinery::pkg::runtime::{TypeMeta, Unknown};
use k8s_pb::apimachinery::pkg::util::intstr::IntOrString;
use prost::Message;
use serde_json::json;

fn s(v: &str) -> Option<String> {
    Some(v.to_string())
}

fn wrap(api: &str, kind: &str, m: &impl Message) -> Vec<u8> {
    let u = Unknown {
        type_meta: Some(TypeMeta {
            api_version: s(api),
            kind: s(kind),
        }),
        raw: Some(m.encode_to_vec()),
        content_encoding: s(""),
        content_type: s(""),
    };
    [b"k8s\0".as_slice(), &u.encode_to_vec()].concat()
}

fn unwrap(body: &[u8]) -> Unknown {
    Unknown::decode(body.strip_prefix(b"k8s\0").expect("magic")).expect("an Unknown")
}

/// A pod as client-go would send it: gogo writes every non-pointer scalar, zero or not.
fn pod() -> core::Pod {
    core::Pod {
        metadata: Some(meta::ObjectMeta {
            name: s("web"),
            generate_name: s(""),
            namespace: s("default"),
            generation: Some(0),
            creation_timestamp: Some(meta::Time {
                seconds: Some(1_700_000_000),
                nanos: Some(0),
            }),
            labels: [("app".to_string(), "web".to_string())].into(),
            ..Default::default()
        }),
        spec: Some(core::PodSpec {
            host_network: Some(false),
            termination_grace_period_seconds: Some(0),
            automount_service_account_token: Some(false),
            security_context: Some(core::PodSecurityContext {
                run_as_user: Some(0),
                supplemental_groups: vec![1, 2],
                ..Default::default()
            }),
            volumes: vec![
                core::Volume {
                    name: s("scratch"),
                    volume_source: Some(core::VolumeSource {
                        empty_dir: Some(core::EmptyDirVolumeSource::default()),
                        ..Default::default()
                    }),
                },
                core::Volume {
                    name: s("cfg"),
                    volume_source: Some(core::VolumeSource {
                        config_map: Some(core::ConfigMapVolumeSource {
                            local_object_reference: Some(core::LocalObjectReference {
                                name: s("settings"),
                            }),
                            default_mode: Some(0),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                },
            ],
            tolerations: vec![core::Toleration {
                key: s("k"),
                operator: s("Exists"),
                toleration_seconds: Some(0),
                ..Default::default()
            }],
            containers: vec![core::Container {
                name: s("web"),
                image: s("nginx:1"),
                command: vec!["nginx".into(), "-g".into()],
                tty: Some(false),
                stdin: Some(false),
                ports: vec![core::ContainerPort {
                    container_port: Some(80),
                    host_port: Some(0),
                    protocol: s("TCP"),
                    ..Default::default()
                }],
                resources: Some(core::ResourceRequirements {
                    limits: [("cpu".to_string(), Quantity { string: s("100m") })].into(),
                    ..Default::default()
                }),
                readiness_probe: Some(core::Probe {
                    handler: Some(core::ProbeHandler {
                        http_get: Some(core::HttpGetAction {
                            path: s("/healthz"),
                            port: Some(IntOrString {
                                r#type: Some(1),
                                int_val: Some(0),
                                str_val: s("http"),
                            }),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    period_seconds: Some(0),
                    failure_threshold: Some(3),
                    ..Default::default()
                }),
                security_context: Some(core::SecurityContext {
                    allow_privilege_escalation: Some(false),
                    run_as_non_root: Some(false),
                    ..Default::default()
                }),
                env: vec![core::EnvVar {
                    name: s("NODE"),
                    value: s(""),
                    value_from: Some(core::EnvVarSource {
                        field_ref: Some(core::ObjectFieldSelector {
                            field_path: s("spec.nodeName"),
                            api_version: s("v1"),
                        }),
                        ..Default::default()
                    }),
                }],
                ..Default::default()
            }],
            ..Default::default()
        }),
        status: Some(core::PodStatus::default()),
    }
}

#[test]
fn decodes_what_prost_encodes_as_go_would_show_it() {
    let v = decode_body(&wrap("v1", "Pod", &pod())).unwrap();
    let md = &v["metadata"];
    assert_eq!(md["creationTimestamp"], "2023-11-14T22:13:20Z");
    assert!(md.get("generateName").is_none() && md.get("generation").is_none());
    let spec = &v["spec"];
    assert!(
        spec.get("hostNetwork").is_none(),
        "non-pointer false dropped"
    );
    assert_eq!(
        spec["terminationGracePeriodSeconds"], 0,
        "pointer zero kept"
    );
    assert_eq!(spec["automountServiceAccountToken"], false);
    assert_eq!(spec["securityContext"]["runAsUser"], 0);
    assert_eq!(spec["securityContext"]["supplementalGroups"], json!([1, 2]));
    assert_eq!(
        spec["volumes"][0],
        json!({"name": "scratch", "emptyDir": {}})
    );
    assert_eq!(
        spec["volumes"][1],
        json!({"name": "cfg", "configMap": {"name": "settings", "defaultMode": 0}})
    );
    assert_eq!(spec["tolerations"][0]["tolerationSeconds"], 0);
    let c = &spec["containers"][0];
    assert!(c.get("tty").is_none() && c.get("stdin").is_none());
    assert_eq!(
        c["ports"][0],
        json!({"containerPort": 80, "protocol": "TCP"})
    );
    assert_eq!(c["resources"]["limits"]["cpu"], "100m");
    let probe = &c["readinessProbe"];
    assert_eq!(probe["httpGet"]["port"], "http");
    assert_eq!(probe["failureThreshold"], 3);
    assert!(probe.get("periodSeconds").is_none());
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(
        c["env"][0]["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.nodeName"
    );
    // The result is a valid Pod.
    let typed: k8s_openapi::api::core::v1::Pod = serde_json::from_value(v).unwrap();
    assert_eq!(
        typed.spec.unwrap().containers[0].image.as_deref(),
        Some("nginx:1")
    );
}

#[test]
fn prost_decodes_what_we_encode() {
    let v = decode_body(&wrap("v1", "Pod", &pod())).unwrap();
    let body = encode_object(&v).unwrap();
    let u = unwrap(&body);
    let tm = u.type_meta.unwrap();
    assert_eq!(
        (tm.api_version.as_deref(), tm.kind.as_deref()),
        (Some("v1"), Some("Pod"))
    );
    let back = core::Pod::decode(u.raw.unwrap().as_slice()).unwrap();
    let (orig, back_spec) = (pod().spec.unwrap(), back.spec.clone().unwrap());
    assert_eq!(back_spec.volumes, orig.volumes);
    assert_eq!(back_spec.security_context, orig.security_context);
    assert_eq!(back_spec.tolerations, orig.tolerations);
    let (c0, c1) = (&orig.containers[0], &back_spec.containers[0]);
    assert_eq!(c1.resources, c0.resources);
    assert_eq!(c1.security_context, c0.security_context);
    assert_eq!(
        c1.readiness_probe.as_ref().unwrap().handler,
        c0.readiness_probe.as_ref().unwrap().handler
    );
    assert_eq!(c1.env[0].value_from, c0.env[0].value_from);
    assert_eq!(
        back.metadata.unwrap().creation_timestamp.unwrap().seconds,
        Some(1_700_000_000)
    );
    // And once more through us: a fixed point.
    assert_eq!(decode_body(&body).unwrap(), v);
}

#[test]
fn lists_status_and_watch_frames_decode_with_prost() {
    let list = json!({"apiVersion": "apps/v1", "kind": "DeploymentList",
        "metadata": {"resourceVersion": "42", "continue": "abc", "remainingItemCount": 0},
        "items": [{"metadata": {"name": "a", "uid": "u1"}, "spec": {"replicas": 0,
            "selector": {"matchLabels": {"app": "a"}},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": 1}},
            "template": {"metadata": {"labels": {"app": "a"}}, "spec": {"containers": [{"name": "c", "image": "i"}]}}},
            "status": {"replicas": 2, "conditions": [{"type": "Available", "status": "True",
                "lastUpdateTime": "2024-01-02T03:04:05Z"}]}}]});
    let u = unwrap(&encode_object(&list).unwrap());
    let l = apps::DeploymentList::decode(u.raw.unwrap().as_slice()).unwrap();
    let lm = l.metadata.unwrap();
    assert_eq!(lm.resource_version.as_deref(), Some("42"));
    assert_eq!(lm.remaining_item_count, Some(0));
    let d = &l.items[0];
    let spec = d.spec.as_ref().unwrap();
    assert_eq!(spec.replicas, Some(0));
    let ru = spec
        .strategy
        .as_ref()
        .unwrap()
        .rolling_update
        .as_ref()
        .unwrap();
    assert_eq!(
        ru.max_surge.as_ref().unwrap().str_val.as_deref(),
        Some("25%")
    );
    assert_eq!(ru.max_unavailable.as_ref().unwrap().int_val, Some(1));
    let cond = &d.status.as_ref().unwrap().conditions[0];
    assert_eq!(
        cond.last_update_time.as_ref().unwrap().seconds,
        Some(1_704_164_645)
    );

    let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404,
        "reason": "NotFound", "message": "deployments.apps \"x\" not found",
        "details": {"name": "x", "group": "apps", "kind": "deployments"}});
    let u = unwrap(&encode_object(&status).unwrap());
    let st = meta::Status::decode(u.raw.unwrap().as_slice()).unwrap();
    assert_eq!(
        (st.code, st.reason.as_deref()),
        (Some(404), Some("NotFound"))
    );

    let ev = json!({"type": "MODIFIED", "object": {"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "c", "resourceVersion": "7"}, "data": {"k": "v"}}});
    let frame = encode_watch_event(&ev).unwrap();
    let len = u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize;
    assert_eq!(len, frame.len() - 4);
    let we = meta::WatchEvent::decode(&frame[4..]).unwrap();
    assert_eq!(we.r#type.as_deref(), Some("MODIFIED"));
    let inner = unwrap(&we.object.unwrap().raw.unwrap());
    let cm = core::ConfigMap::decode(inner.raw.unwrap().as_slice()).unwrap();
    assert_eq!(cm.data.get("k").map(String::as_str), Some("v"));
}

#[test]
fn custom_resource_definitions_round_trip() {
    let crd = json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.example.com"},
        "spec": {"group": "example.com", "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "listKind": "WidgetList"},
            "versions": [{"name": "v1", "served": true, "storage": true,
                "subresources": {"status": {}},
                "schema": {"openAPIV3Schema": {"type": "object",
                    "properties": {"spec": {"type": "object",
                        "x-kubernetes-preserve-unknown-fields": true,
                        "default": {"size": 1},
                        "additionalProperties": false,
                        "properties": {"tags": {"type": "array", "items": {"type": "string"}},
                                       "size": {"type": "integer", "minimum": 1.5, "enum": [1, 2]}}}}}}}]}});
    let back = decode_body(&encode_object(&crd).unwrap()).unwrap();
    assert_eq!(back, crd);
}

#[test]
fn go_durations() {
    for (ns, s) in [
        (0, "0s"),
        (1_500, "1.5µs"),
        (2_000_000, "2ms"),
        (90_000_000_000, "1m30s"),
        (3_600_000_000_000, "1h0m0s"),
        (1_500_000_000, "1.5s"),
        (-5_000_000_000, "-5s"),
    ] {
        assert_eq!(go_duration(ns), s);
        assert_eq!(parse_go_duration(s), Some(ns), "{s}");
    }
    assert_eq!(parse_go_duration("5x"), None);
}
