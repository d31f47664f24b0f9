//! The three patch formats kubectl sends: JSON merge patch (RFC 7386), JSON patch (RFC 6902),
//! and strategic merge patch for the built-in kinds (lists merged by their merge keys, with the
//! `$patch`, `$setElementOrder`, `$retainKeys` and `$deleteFromPrimitiveList` directives).
//! Pure functions over JSON values.

use serde_json::{Map, Value};

/// RFC 7386: objects merge recursively, `null` deletes, anything else replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(t) = target else { return };
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

fn unescape(token: &str) -> String {
    token.replace("~1", "/").replace("~0", "~")
}

fn split_pointer(path: &str) -> Result<(Vec<String>, String), String> {
    if !path.starts_with('/') {
        return Err(format!("invalid JSON pointer {path:?}"));
    }
    let mut parts: Vec<String> = path[1..].split('/').map(unescape).collect();
    let last = parts.pop().unwrap_or_default();
    Ok((parts, last))
}

fn parent_mut<'a>(
    doc: &'a mut Value,
    parts: &[String],
    path: &str,
) -> Result<&'a mut Value, String> {
    let mut cur = doc;
    for p in parts {
        cur = match cur {
            Value::Object(m) => m.get_mut(p),
            Value::Array(a) => p.parse::<usize>().ok().and_then(|i| a.get_mut(i)),
            _ => None,
        }
        .ok_or_else(|| format!("path {path:?} does not exist"))?;
    }
    Ok(cur)
}

fn add(doc: &mut Value, path: &str, value: Value) -> Result<(), String> {
    if path.is_empty() {
        *doc = value;
        return Ok(());
    }
    let (parts, last) = split_pointer(path)?;
    match parent_mut(doc, &parts, path)? {
        Value::Object(m) => {
            m.insert(last, value);
            Ok(())
        }
        Value::Array(a) => {
            let i = if last == "-" {
                a.len()
            } else {
                last.parse()
                    .map_err(|_| format!("invalid index in {path:?}"))?
            };
            if i > a.len() {
                return Err(format!("index out of range in {path:?}"));
            }
            a.insert(i, value);
            Ok(())
        }
        _ => Err(format!("cannot add at {path:?}")),
    }
}

fn remove(doc: &mut Value, path: &str) -> Result<Value, String> {
    let (parts, last) = split_pointer(path)?;
    match parent_mut(doc, &parts, path)? {
        Value::Object(m) => m
            .remove(&last)
            .ok_or_else(|| format!("path {path:?} does not exist")),
        Value::Array(a) => {
            let i: usize = last
                .parse()
                .map_err(|_| format!("invalid index in {path:?}"))?;
            if i >= a.len() {
                return Err(format!("index out of range in {path:?}"));
            }
            Ok(a.remove(i))
        }
        _ => Err(format!("path {path:?} does not exist")),
    }
}

/// RFC 6902: applies the operations in order; any failure leaves `doc` unspecified (callers
/// patch a copy).
pub fn json_patch(doc: &mut Value, ops: &Value) -> Result<(), String> {
    let ops = ops
        .as_array()
        .ok_or("a JSON patch must be an array of operations")?;
    for (i, op) in ops.iter().enumerate() {
        let s = |f: &str| {
            op.get(f)
                .and_then(Value::as_str)
                .ok_or_else(|| format!("operation {i}: missing {f:?}"))
        };
        let path = s("path")?;
        match s("op")? {
            "add" => add(
                doc,
                path,
                op.get("value")
                    .cloned()
                    .ok_or(format!("operation {i}: missing \"value\""))?,
            )?,
            "remove" => {
                remove(doc, path)?;
            }
            "replace" => {
                remove(doc, path)?;
                add(
                    doc,
                    path,
                    op.get("value")
                        .cloned()
                        .ok_or(format!("operation {i}: missing \"value\""))?,
                )?;
            }
            "move" => {
                let v = remove(doc, s("from")?)?;
                add(doc, path, v)?;
            }
            "copy" => {
                let v = doc
                    .pointer(s("from")?)
                    .cloned()
                    .ok_or(format!("operation {i}: \"from\" does not exist"))?;
                add(doc, path, v)?;
            }
            "test" => {
                if doc.pointer(path) != op.get("value") {
                    return Err(format!("testing value {path} failed"));
                }
            }
            other => return Err(format!("operation {i}: unknown op {other:?}")),
        }
    }
    Ok(())
}

/// The merge key of a list field in the built-in kinds (kube's `patchMergeKey` tags).
fn merge_key(field: &str) -> Option<&'static str> {
    Some(match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "volumes"
        | "env"
        | "imagePullSecrets" => "name",
        "volumeMounts" | "volumeDevices" => "mountPath",
        "ports" => "containerPort",
        "conditions" => "type",
        "hostAliases" => "ip",
        "topologySpreadConstraints" => "topologyKey",
        "ownerReferences" => "uid",
        "finalizers" => return None,
        _ => return None,
    })
}

/// Service ports merge by `port`, container ports by `containerPort`: the key present wins.
fn item_key(item: &Value, key: &str) -> Option<Value> {
    item.get(key).cloned().or_else(|| {
        if key == "containerPort" {
            item.get("port").cloned()
        } else {
            None
        }
    })
}

/// Strategic merge patch of `patch` into `target`.
pub fn strategic_merge(target: &mut Value, patch: &Value) -> Result<(), String> {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return Ok(());
    };
    if p.get("$patch").and_then(Value::as_str) == Some("replace") {
        let mut v = patch.clone();
        if let Some(m) = v.as_object_mut() {
            m.remove("$patch");
        }
        *target = v;
        return Ok(());
    }
    if p.get("$patch").and_then(Value::as_str) == Some("delete") {
        *target = Value::Null;
        return Ok(());
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(t) = target else {
        return Ok(());
    };
    if let Some(Value::Array(keep)) = p.get("$retainKeys") {
        let keep: Vec<&str> = keep.iter().filter_map(Value::as_str).collect();
        t.retain(|k, _| keep.contains(&k.as_str()));
    }
    for (k, v) in p {
        if k.starts_with("$setElementOrder/") || k == "$retainKeys" || k == "$patch" {
            continue;
        }
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(cur)), Some(del)) = (t.get_mut(field), v.as_array()) {
                cur.retain(|x| !del.contains(x));
            }
            continue;
        }
        if v.is_null() {
            t.remove(k);
            continue;
        }
        match (merge_key(k), v) {
            (Some(key), Value::Array(items)) => {
                let cur = t.entry(k.clone()).or_insert_with(|| Value::Array(vec![]));
                if !cur.is_array() {
                    *cur = Value::Array(vec![]);
                }
                let Value::Array(list) = cur else { continue };
                for item in items {
                    let kv = item_key(item, key);
                    let pos = kv.as_ref().and_then(|kv| {
                        list.iter()
                            .position(|x| item_key(x, key).as_ref() == Some(kv))
                    });
                    let delete = item.get("$patch").and_then(Value::as_str) == Some("delete");
                    match (pos, delete) {
                        (Some(i), true) => {
                            list.remove(i);
                        }
                        (None, true) => {}
                        (Some(i), false) => strategic_merge(&mut list[i], item)?,
                        (None, false) => {
                            let mut fresh = Value::Null;
                            strategic_merge(&mut fresh, item)?;
                            list.push(fresh);
                        }
                    }
                }
                // `$setElementOrder/<field>` fixes the order of the merged list.
                if let Some(Value::Array(order)) = p.get(&format!("$setElementOrder/{k}")) {
                    let mut ordered = vec![];
                    for o in order {
                        if let Some(kv) = item_key(o, key)
                            && let Some(i) = list
                                .iter()
                                .position(|x| item_key(x, key).as_ref() == Some(&kv))
                        {
                            ordered.push(list.remove(i));
                        }
                    }
                    ordered.append(list);
                    *list = ordered;
                }
            }
            (_, Value::Object(_)) => {
                let cur = t.entry(k.clone()).or_insert(Value::Null);
                strategic_merge(cur, v)?;
                if cur.is_null() {
                    t.remove(k);
                }
            }
            _ => {
                t.insert(k.clone(), v.clone());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn merge_patch_merges_objects_and_null_deletes() {
        let mut t = json!({"metadata": {"labels": {"a": "1", "b": "2"}}, "spec": {"replicas": 1}});
        merge_patch(
            &mut t,
            &json!({"metadata": {"labels": {"a": null, "c": "3"}}, "spec": {"replicas": 3}}),
        );
        assert_eq!(
            t,
            json!({"metadata": {"labels": {"b": "2", "c": "3"}}, "spec": {"replicas": 3}})
        );
    }

    #[test]
    fn json_patch_applies_rfc6902_operations() {
        let mut t = json!({"spec": {"containers": [{"name": "a", "image": "x"}]}});
        json_patch(
            &mut t,
            &json!([
                {"op": "replace", "path": "/spec/containers/0/image", "value": "y"},
                {"op": "add", "path": "/spec/containers/-", "value": {"name": "b"}},
                {"op": "test", "path": "/spec/containers/1/name", "value": "b"},
                {"op": "copy", "from": "/spec/containers/1", "path": "/spec/first"},
                {"op": "remove", "path": "/spec/first"},
            ]),
        )
        .unwrap();
        assert_eq!(
            t,
            json!({"spec": {"containers": [{"name": "a", "image": "y"}, {"name": "b"}]}})
        );
        let err =
            json_patch(&mut t, &json!([{"op": "remove", "path": "/spec/nothing"}])).unwrap_err();
        assert!(err.contains("/spec/nothing"));
    }

    #[test]
    fn strategic_merge_merges_containers_by_name_with_directives() {
        let mut t = json!({"spec": {"template": {"spec": {"containers": [
            {"name": "web", "image": "nginx:1.26", "ports": [{"containerPort": 80}]},
            {"name": "side", "image": "busybox"}
        ]}}}});
        // kubectl apply's second-apply patch, plus a deletion by merge key.
        let p = json!({"spec": {"template": {"spec": {
            "$setElementOrder/containers": [{"name": "side"}, {"name": "web"}],
            "containers": [{"image": "nginx:1.27", "name": "web"}, {"name": "gone", "$patch": "delete"}]
        }}}});
        strategic_merge(&mut t, &p).unwrap();
        let cs = &t["spec"]["template"]["spec"]["containers"];
        assert_eq!(cs[0]["name"], "side", "$setElementOrder applied");
        assert_eq!(cs[1]["image"], "nginx:1.27");
        assert_eq!(
            cs[1]["ports"][0]["containerPort"], 80,
            "untouched fields of a merged item stay"
        );
        strategic_merge(&mut t, &json!({"spec": {"template": {"spec": {"containers": [{"name": "side", "$patch": "delete"}]}}}})).unwrap();
        assert_eq!(
            t["spec"]["template"]["spec"]["containers"]
                .as_array()
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn strategic_merge_retain_keys_and_primitive_list_deletion() {
        let mut t = json!({"strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1}}, "metadata": {"finalizers": ["a", "b"]}});
        strategic_merge(&mut t, &json!({"strategy": {"$retainKeys": ["type"], "type": "Recreate"},
                                        "metadata": {"$deleteFromPrimitiveList/finalizers": ["a"]}}))
        .unwrap();
        assert_eq!(t["strategy"], json!({"type": "Recreate"}));
        assert_eq!(t["metadata"]["finalizers"], json!(["b"]));
    }
}
