//! Namespace lifecycle: what a terminating namespace's status says about what is left in it
//! (kube-controller-manager's namespace controller conditions), decided from counts alone.

use std::collections::BTreeMap;

use serde_json::{Value, json};

/// The finalizer a namespace carries in `spec.finalizers` until its contents are gone.
pub const KUBERNETES: &str = "kubernetes";

/// What is left of one resource in a terminating namespace.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Remaining {
    /// The plural, e.g. `configmaps`.
    pub resource: String,
    /// The API group (empty for the core group).
    pub group: String,
    pub count: usize,
    /// Finalizers the remaining objects carry, with how many objects carry each.
    pub finalizers: BTreeMap<String, usize>,
}

fn condition(ty: &str, held: bool, reason: &str, message: &str) -> Value {
    json!({"type": ty, "status": if held { "True" } else { "False" },
           "reason": reason, "message": message})
}

/// The namespace's conditions (without transition times) for what `remaining` lists, in
/// kube's order and wording.
pub fn conditions(remaining: &[Remaining]) -> Vec<Value> {
    let mut out = vec![
        condition(
            "NamespaceDeletionDiscoveryFailure",
            false,
            "ResourcesDiscovered",
            "All resources successfully discovered",
        ),
        condition(
            "NamespaceDeletionGroupVersionParsingFailure",
            false,
            "ParsedGroupVersions",
            "All legacy kube types successfully parsed",
        ),
        condition(
            "NamespaceDeletionContentFailure",
            false,
            "ContentDeleted",
            "All content successfully deleted, may be waiting on finalization",
        ),
    ];
    let left: Vec<String> = remaining
        .iter()
        .filter(|r| r.count > 0)
        .map(|r| {
            format!(
                "{}.{} has {} resource instances",
                r.resource, r.group, r.count
            )
        })
        .collect();
    out.push(if left.is_empty() {
        condition(
            "NamespaceContentRemaining",
            false,
            "ContentRemoved",
            "All content successfully removed",
        )
    } else {
        condition(
            "NamespaceContentRemaining",
            true,
            "SomeResourcesRemain",
            &format!("Some resources are remaining: {}", left.join(", ")),
        )
    });
    let mut held: BTreeMap<&str, usize> = BTreeMap::new();
    for r in remaining {
        for (f, n) in &r.finalizers {
            *held.entry(f).or_default() += n;
        }
    }
    out.push(if held.is_empty() {
        condition(
            "NamespaceFinalizersRemaining",
            false,
            "ContentHasNoFinalizers",
            "All content-preserving finalizers finished",
        )
    } else {
        let list: Vec<String> = held
            .iter()
            .map(|(f, n)| format!("{f} in {n} resource instances"))
            .collect();
        condition(
            "NamespaceFinalizersRemaining",
            true,
            "SomeFinalizersRemain",
            &format!(
                "Some content in the namespace has finalizers remaining: {}",
                list.join(", ")
            ),
        )
    });
    out
}

/// The conditions to write: `new` with each one's `lastTransitionTime` kept from `old` when its
/// status did not change, `now` otherwise; None when nothing but times would change.
pub fn merge_conditions(old: &[Value], new: Vec<Value>, now: &str) -> Option<Vec<Value>> {
    let same = |a: &Value, b: &Value| {
        ["type", "status", "reason", "message"]
            .iter()
            .all(|k| a[*k] == b[*k])
    };
    if old.len() == new.len() && old.iter().zip(&new).all(|(a, b)| same(a, b)) {
        return None;
    }
    Some(
        new.into_iter()
            .map(|mut c| {
                let kept = old
                    .iter()
                    .find(|o| o["type"] == c["type"] && o["status"] == c["status"])
                    .and_then(|o| o.get("lastTransitionTime").cloned());
                c["lastTransitionTime"] = kept.unwrap_or_else(|| json!(now));
                c
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_left_is_named_in_kubes_words() {
        let cm = Remaining {
            resource: "configmaps".into(),
            group: String::new(),
            count: 2,
            finalizers: [("example.com/hold".to_string(), 1)].into(),
        };
        let c = conditions(std::slice::from_ref(&cm));
        let by = |t: &str| c.iter().find(|x| x["type"] == t).cloned().unwrap();
        assert_eq!(
            by("NamespaceContentRemaining")["message"],
            "Some resources are remaining: configmaps. has 2 resource instances"
        );
        assert_eq!(
            by("NamespaceFinalizersRemaining")["message"],
            "Some content in the namespace has finalizers remaining: example.com/hold in 1 resource instances"
        );
        let empty = conditions(&[]);
        assert!(empty.iter().all(|x| x["status"] == "False"), "{empty:?}");
    }

    #[test]
    fn transition_times_move_only_with_the_status() {
        let first = merge_conditions(&[], conditions(&[]), "t1").expect("new conditions");
        assert!(merge_conditions(&first, conditions(&[]), "t2").is_none());
        let left = Remaining {
            resource: "pods".into(),
            count: 1,
            ..Default::default()
        };
        let next = merge_conditions(&first, conditions(&[left]), "t2").expect("changed");
        let time = |t: &str| {
            next.iter()
                .find(|x| x["type"] == t)
                .map(|x| x["lastTransitionTime"].clone())
                .unwrap()
        };
        assert_eq!(time("NamespaceContentRemaining"), "t2");
        assert_eq!(time("NamespaceDeletionDiscoveryFailure"), "t1");
    }
}
