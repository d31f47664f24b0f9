//! The storage kinds' Table columns: claims, volumes, classes (kubectl's).

use serde_json::{Value, json};

use super::{Columns, age, name, text};

/// kubectl's short access modes.
fn modes(obj: &Value, p: &str) -> Value {
    let short: Vec<&str> = obj
        .pointer(p)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|m| match m.as_str()? {
            "ReadWriteOnce" => Some("RWO"),
            "ReadOnlyMany" => Some("ROX"),
            "ReadWriteMany" => Some("RWX"),
            "ReadWriteOncePod" => Some("RWOP"),
            _ => None,
        })
        .collect();
    json!(short.join(","))
}

/// PersistentVolumeClaim.
pub const PERSISTENT_VOLUME_CLAIM: Columns = Columns {
    columns: &[
        ("Name", "string", 0),
        ("Status", "string", 0),
        ("Volume", "string", 0),
        ("Capacity", "string", 0),
        ("Access Modes", "string", 0),
        ("StorageClass", "string", 0),
        ("VolumeAttributesClass", "string", 0),
        ("Age", "string", 0),
        ("VolumeMode", "string", 1),
    ],
    cells: claim_cells,
};

fn claim_cells(obj: &Value) -> Vec<Value> {
    let status = if obj.pointer("/metadata/deletionTimestamp").is_some() {
        json!("Terminating")
    } else {
        text(obj, "/status/phase", "Pending")
    };
    vec![
        name(obj),
        status,
        text(obj, "/spec/volumeName", ""),
        text(obj, "/status/capacity/storage", ""),
        modes(obj, "/status/accessModes"),
        text(obj, "/spec/storageClassName", "<unset>"),
        text(obj, "/spec/volumeAttributesClassName", "<unset>"),
        json!(age(obj)),
        text(obj, "/spec/volumeMode", "Filesystem"),
    ]
}

/// PersistentVolume.
pub const PERSISTENT_VOLUME: Columns = Columns {
    columns: &[
        ("Name", "string", 0),
        ("Capacity", "string", 0),
        ("Access Modes", "string", 0),
        ("Reclaim Policy", "string", 0),
        ("Status", "string", 0),
        ("Claim", "string", 0),
        ("StorageClass", "string", 0),
        ("VolumeAttributesClass", "string", 0),
        ("Reason", "string", 0),
        ("Age", "string", 0),
        ("VolumeMode", "string", 1),
    ],
    cells: volume_cells,
};

fn volume_cells(obj: &Value) -> Vec<Value> {
    let claim = match (
        obj.pointer("/spec/claimRef/namespace")
            .and_then(Value::as_str),
        obj.pointer("/spec/claimRef/name").and_then(Value::as_str),
    ) {
        (Some(ns), Some(n)) => format!("{ns}/{n}"),
        _ => String::new(),
    };
    let status = if obj.pointer("/metadata/deletionTimestamp").is_some() {
        json!("Terminating")
    } else {
        text(obj, "/status/phase", "Pending")
    };
    vec![
        name(obj),
        text(obj, "/spec/capacity/storage", ""),
        modes(obj, "/spec/accessModes"),
        text(obj, "/spec/persistentVolumeReclaimPolicy", "Retain"),
        status,
        json!(claim),
        text(obj, "/spec/storageClassName", ""),
        text(obj, "/spec/volumeAttributesClassName", "<unset>"),
        text(obj, "/status/reason", ""),
        json!(age(obj)),
        text(obj, "/spec/volumeMode", "Filesystem"),
    ]
}

/// StorageClass.
pub const STORAGE_CLASS: Columns = Columns {
    columns: &[
        ("Name", "string", 0),
        ("Provisioner", "string", 0),
        ("ReclaimPolicy", "string", 0),
        ("VolumeBindingMode", "string", 0),
        ("AllowVolumeExpansion", "string", 0),
        ("Age", "string", 0),
    ],
    cells: storage_class_cells,
};

fn storage_class_cells(obj: &Value) -> Vec<Value> {
    let mut n = obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    if obj
        .pointer("/metadata/annotations/storageclass.kubernetes.io~1is-default-class")
        .and_then(Value::as_str)
        == Some("true")
    {
        n.push_str(" (default)");
    }
    vec![
        json!(n),
        text(obj, "/provisioner", ""),
        text(obj, "/reclaimPolicy", "Delete"),
        text(obj, "/volumeBindingMode", "Immediate"),
        json!(
            obj.get("allowVolumeExpansion")
                .and_then(Value::as_bool)
                .unwrap_or(false)
                .to_string()
        ),
        json!(age(obj)),
    ]
}
