//! What a v1 ReplicationController means: kube-apiserver's defaults (the selector and the
//! object's labels from its template) and validation. The ReplicaSet controller runs it.

use k8s_openapi::api::core::v1::{PodTemplateSpec, ReplicationController};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use serde_json::Value;

use super::validate::{FieldError, err, validate_template};

/// kube-apiserver's defaults: one replica; selector and labels from the template's labels.
pub fn default_rc(obj: &mut Value) {
    let labels = obj.pointer("/spec/template/metadata/labels").cloned();
    if let Some(spec) = obj.get_mut("spec").and_then(Value::as_object_mut) {
        spec.entry("replicas").or_insert(1.into());
        if let Some(l) = labels
            .clone()
            .filter(|l| l.as_object().is_some_and(|m| !m.is_empty()))
        {
            let empty = spec
                .get("selector")
                .and_then(Value::as_object)
                .is_none_or(|m| m.is_empty());
            if empty {
                spec.insert("selector".into(), l);
            }
        }
    }
    if let (Some(meta), Some(l)) = (
        obj.get_mut("metadata").and_then(Value::as_object_mut),
        labels,
    ) {
        let empty = meta
            .get("labels")
            .and_then(Value::as_object)
            .is_none_or(|m| m.is_empty());
        if empty {
            meta.insert("labels".into(), l);
        }
    }
}

/// kube-apiserver's validation of a (defaulted) ReplicationController.
pub fn validate_rc(rc: &ReplicationController) -> Vec<FieldError> {
    let mut errs = vec![];
    let spec = rc.spec.clone().unwrap_or_default();
    if let Some(n) = spec.replicas.filter(|n| *n < 0) {
        err(
            &mut errs,
            "spec.replicas",
            format!("Invalid value: {n}: must be greater than or equal to 0"),
        );
    }
    let Some(template) = spec.template.as_ref() else {
        err(&mut errs, "spec.template", "Required value");
        return errs;
    };
    let selector = LabelSelector {
        match_labels: spec.selector.clone(),
        match_expressions: None,
    };
    validate_template(
        &mut errs,
        Some(&selector),
        &PodTemplateSpec::clone(template),
        &["Always"],
        "replicationcontroller",
    );
    errs
}
