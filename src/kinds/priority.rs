//! PriorityClasses (scheduling.k8s.io/v1): the two system classes, validation, and the
//! Priority admission that gives a new pod its class's integer priority and preemption policy
//! (kube-apiserver's `Priority` admission plugin).

use serde_json::{Value, json};

/// The classes kube-apiserver creates at start: (name, value, description).
pub const SYSTEM_CLASSES: [(&str, i32, &str); 2] = [
    (
        "system-node-critical",
        2_000_001_000,
        "Used for system critical pods that must not be moved from their current node.",
    ),
    (
        "system-cluster-critical",
        2_000_000_000,
        "Used for system critical pods that must run in the cluster, but can be moved to another node if necessary.",
    ),
];

/// The highest value a user-defined class may have.
pub const HIGHEST_USER_DEFINABLE: i64 = 1_000_000_000;

const POLICIES: [&str; 2] = ["PreemptLowerPriority", "Never"];

/// kube's defaults: `preemptionPolicy: PreemptLowerPriority`.
pub fn default_class(obj: &mut Value) {
    if obj.get("preemptionPolicy").is_none_or(Value::is_null) {
        obj["preemptionPolicy"] = json!("PreemptLowerPriority");
    }
}

/// kube-apiserver's validation of a PriorityClass, as `field: message` lines.
pub fn validate_class(obj: &Value) -> Vec<String> {
    let mut errs = vec![];
    let name = obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("");
    let system = SYSTEM_CLASSES.iter().find(|(n, ..)| *n == name);
    let value = obj.get("value").and_then(Value::as_i64);
    match (value, system) {
        (None, _) => errs.push("value: Required value".into()),
        (Some(v), Some((_, want, _))) if v != i64::from(*want) => errs.push(format!(
            "value: Invalid value: {v}: value of {name} must be {want}"
        )),
        (Some(v), None) if v > HIGHEST_USER_DEFINABLE => errs.push(format!(
            "value: Forbidden: maximum allowed value of a user defined priority is {HIGHEST_USER_DEFINABLE}"
        )),
        _ => {}
    }
    if system.is_none() && name.starts_with("system-") {
        errs.push(format!(
            "metadata.name: Invalid value: \"{name}\": priority class names with 'system-' prefix are reserved for system use only"
        ));
    }
    if let Some(p) = obj.get("preemptionPolicy").and_then(Value::as_str)
        && !POLICIES.contains(&p)
    {
        errs.push(format!(
            "preemptionPolicy: Unsupported value: \"{p}\": supported values: \"Never\", \"PreemptLowerPriority\""
        ));
    }
    errs
}

/// What an update may not change.
pub fn validate_class_update(old: &Value, new: &Value) -> Vec<String> {
    let mut errs = vec![];
    if old.get("value") != new.get("value") {
        errs.push("value: Forbidden: may not be changed in an update.".into());
    }
    if old.get("preemptionPolicy") != new.get("preemptionPolicy") {
        errs.push(format!(
            "preemptionPolicy: Invalid value: {}: field is immutable",
            new.get("preemptionPolicy").unwrap_or(&Value::Null)
        ));
    }
    errs
}

/// The class a pod without one gets: the global default with the lowest value, if any.
fn global_default(classes: &[Value]) -> Option<&Value> {
    classes
        .iter()
        .filter(|c| c.get("globalDefault").and_then(Value::as_bool) == Some(true))
        .min_by_key(|c| c.get("value").and_then(Value::as_i64).unwrap_or(0))
}

/// The Priority admission for a new pod, given the classes that exist: sets `priority` and
/// `preemptionPolicy` (and the default class's name), or says why the pod is forbidden.
pub fn admit(pod: &mut Value, classes: &[Value]) -> Result<(), String> {
    let spec = &pod["spec"];
    let named = spec["priorityClassName"]
        .as_str()
        .filter(|n| !n.is_empty())
        .map(str::to_string);
    let (name, priority, policy) = match &named {
        Some(n) => {
            let class = classes
                .iter()
                .find(|c| c.pointer("/metadata/name").and_then(Value::as_str) == Some(n))
                .ok_or_else(|| format!("no PriorityClass with name {n} was found"))?;
            (
                Some(n.clone()),
                class["value"].as_i64().unwrap_or(0),
                class["preemptionPolicy"].clone(),
            )
        }
        None => match global_default(classes) {
            Some(c) => (
                c.pointer("/metadata/name")
                    .and_then(Value::as_str)
                    .map(str::to_string),
                c["value"].as_i64().unwrap_or(0),
                c["preemptionPolicy"].clone(),
            ),
            None => (None, 0, json!("PreemptLowerPriority")),
        },
    };
    if let Some(given) = spec["priority"].as_i64()
        && given != priority
    {
        return Err(format!(
            "the integer value of priority ({given}) must not be provided in pod spec; priority admission controller computed {priority} from the given PriorityClass name"
        ));
    }
    if let (Some(given), Some(computed)) = (spec["preemptionPolicy"].as_str(), policy.as_str())
        && given != computed
    {
        return Err(format!(
            "the string value of PreemptionPolicy ({given}) must not be provided in pod spec; priority admission controller computed {computed} from the given PriorityClass name"
        ));
    }
    let spec = &mut pod["spec"];
    if let Some(n) = name {
        spec["priorityClassName"] = json!(n);
    }
    spec["priority"] = json!(priority);
    if !policy.is_null() {
        spec["preemptionPolicy"] = policy;
    }
    Ok(())
}

/// A second global default is refused (kube: only one may exist).
pub fn second_default(class: &Value, classes: &[Value]) -> Option<String> {
    if class.get("globalDefault").and_then(Value::as_bool) != Some(true) {
        return None;
    }
    let me = class.pointer("/metadata/name").and_then(Value::as_str);
    let other = classes.iter().find(|c| {
        c.get("globalDefault").and_then(Value::as_bool) == Some(true)
            && c.pointer("/metadata/name").and_then(Value::as_str) != me
    })?;
    Some(format!(
        "globalDefault: Invalid value: true: PriorityClass {} is already marked as default. Only one default can exist",
        other
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(name: &str, value: i64, default: bool) -> Value {
        let mut c = json!({"metadata": {"name": name}, "value": value, "globalDefault": default});
        default_class(&mut c);
        c
    }

    #[test]
    fn a_pod_gets_its_class_priority_or_the_global_default() {
        let classes = [class("high", 1000, false), class("base", 10, true)];
        let mut pod = json!({"spec": {"priorityClassName": "high", "containers": []}});
        admit(&mut pod, &classes).expect("admitted");
        assert_eq!(pod["spec"]["priority"], 1000);
        assert_eq!(pod["spec"]["preemptionPolicy"], "PreemptLowerPriority");
        let mut plain = json!({"spec": {}});
        admit(&mut plain, &classes).expect("admitted");
        assert_eq!(
            (
                plain["spec"]["priority"].clone(),
                plain["spec"]["priorityClassName"].clone()
            ),
            (json!(10), json!("base"))
        );
        let mut none = json!({"spec": {}});
        admit(&mut none, &[]).expect("admitted");
        assert_eq!(none["spec"]["priority"], 0);
    }

    #[test]
    fn unknown_classes_and_a_priority_of_ones_own_are_refused() {
        let classes = [class("high", 1000, false)];
        let mut pod = json!({"spec": {"priorityClassName": "nope"}});
        assert_eq!(
            admit(&mut pod, &classes).unwrap_err(),
            "no PriorityClass with name nope was found"
        );
        let mut own = json!({"spec": {"priorityClassName": "high", "priority": 5}});
        assert!(
            admit(&mut own, &classes)
                .unwrap_err()
                .contains("computed 1000")
        );
    }

    #[test]
    fn classes_are_validated_as_kube_does() {
        assert!(
            validate_class(&class("big", 2_000_000_000, false))[0]
                .contains("maximum allowed value")
        );
        assert!(
            validate_class(&class("system-mine", 5, false))[0].contains("reserved for system use")
        );
        assert!(validate_class(&class("system-node-critical", 2_000_001_000, false)).is_empty());
        let a = class("a", 1, false);
        let b = class("a", 2, false);
        assert_eq!(
            validate_class_update(&a, &b),
            ["value: Forbidden: may not be changed in an update."]
        );
        let d1 = class("d1", 1, true);
        assert!(second_default(&class("d2", 2, true), std::slice::from_ref(&d1)).is_some());
        assert!(second_default(&d1, std::slice::from_ref(&d1)).is_none());
    }
}
