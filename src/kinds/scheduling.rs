//! Scheduling predicates shared by the scheduler, the DaemonSet controller and the node
//! lifecycle controller: taints and tolerations, node selectors and required node affinity.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, NodeSelectorRequirement, Pod, Taint, Toleration};

/// Whether one of `tols` tolerates the taint.
pub fn tolerates(tols: &[Toleration], t: &Taint) -> bool {
    toleration_for(tols, t).is_some()
}

/// The first toleration in `tols` that tolerates the taint.
pub fn toleration_for<'a>(tols: &'a [Toleration], t: &Taint) -> Option<&'a Toleration> {
    tols.iter().find(|tol| {
        let effect_ok = tol
            .effect
            .as_deref()
            .is_none_or(|e| e.is_empty() || e == t.effect);
        let key_ok = match tol.key.as_deref() {
            None | Some("") => tol.operator.as_deref() == Some("Exists"),
            Some(k) => k == t.key,
        };
        let value_ok = match tol.operator.as_deref() {
            Some("Exists") => true,
            _ => tol.value.as_deref().unwrap_or("") == t.value.as_deref().unwrap_or(""),
        };
        effect_ok && key_ok && value_ok
    })
}

pub fn requirement_matches(r: &NodeSelectorRequirement, labels: &BTreeMap<String, String>) -> bool {
    let have = labels.get(&r.key);
    let vals = r.values.as_deref().unwrap_or(&[]);
    match r.operator.as_str() {
        "In" => have.is_some_and(|v| vals.contains(v)),
        "NotIn" => !have.is_some_and(|v| vals.contains(v)),
        "Exists" => have.is_some(),
        "DoesNotExist" => have.is_none(),
        "Gt" | "Lt" => {
            let (Some(h), Some(v)) = (
                have.and_then(|h| h.parse::<i64>().ok()),
                vals.first().and_then(|v| v.parse::<i64>().ok()),
            ) else {
                return false;
            };
            if r.operator == "Gt" { h > v } else { h < v }
        }
        _ => false,
    }
}

pub fn affinity_matches(p: &Pod, n: &Node) -> bool {
    let empty = BTreeMap::new();
    let labels = n.metadata.labels.as_ref().unwrap_or(&empty);
    let Some(spec) = &p.spec else { return true };
    if let Some(sel) = &spec.node_selector
        && sel.iter().any(|(k, v)| labels.get(k) != Some(v))
    {
        return false;
    }
    let required = spec
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|na| {
            na.required_during_scheduling_ignored_during_execution
                .as_ref()
        });
    required.is_none_or(|req| selector_terms_match(req, n))
}

/// Whether node `n` matches a NodeSelector: its terms ORed, each term's expressions (on
/// labels) and fields (`metadata.name`) ANDed.
pub fn selector_terms_match(sel: &k8s_openapi::api::core::v1::NodeSelector, n: &Node) -> bool {
    let empty = BTreeMap::new();
    let labels = n.metadata.labels.as_ref().unwrap_or(&empty);
    sel.node_selector_terms.iter().any(|term| {
        term.match_expressions
            .iter()
            .flatten()
            .all(|r| requirement_matches(r, labels))
            && term.match_fields.iter().flatten().all(|r| {
                r.key == "metadata.name"
                    && requirement_matches(
                        &NodeSelectorRequirement {
                            key: "name".into(),
                            ..r.clone()
                        },
                        &[(
                            "name".to_string(),
                            n.metadata.name.clone().unwrap_or_default(),
                        )]
                        .into(),
                    )
            })
    })
}
