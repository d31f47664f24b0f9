//! Label and field selectors: parsing and matching objects against them.

use serde_json::Value;

use super::{handlers::ApiError, registry::Resource};

/// A parsed label selector (equality- and set-based).
#[derive(Debug, PartialEq)]
pub enum Requirement {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// Parses `a=b,c!=d,e in (x,y),f notin (z),g,!h`.
pub fn parse_selector(s: &str) -> Result<Vec<Requirement>, ApiError> {
    let mut out = vec![];
    let mut parts = vec![];
    let mut depth = 0;
    let mut cur = String::new();
    for ch in s.chars() {
        match ch {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(ch);
    }
    parts.push(cur);
    let bad = |p: &str| ApiError::bad_request(format!("unable to parse requirement: {p:?}"));
    for p in parts.iter().map(|p| p.trim()).filter(|p| !p.is_empty()) {
        let set = |rest: &str| -> Option<Vec<String>> {
            let inner = rest.trim().strip_prefix('(')?.strip_suffix(')')?;
            Some(
                inner
                    .split(',')
                    .map(|v| v.trim().to_string())
                    .filter(|v| !v.is_empty())
                    .collect(),
            )
        };
        if let Some((k, v)) = p.split_once("!=") {
            out.push(Requirement::NotEq(k.trim().into(), v.trim().into()));
        } else if let Some((k, v)) = p.split_once("==").or_else(|| p.split_once('=')) {
            out.push(Requirement::Eq(k.trim().into(), v.trim().into()));
        } else if let Some((k, rest)) = p.split_once(" notin ") {
            out.push(Requirement::NotIn(
                k.trim().into(),
                set(rest).ok_or_else(|| bad(p))?,
            ));
        } else if let Some((k, rest)) = p.split_once(" in ") {
            out.push(Requirement::In(
                k.trim().into(),
                set(rest).ok_or_else(|| bad(p))?,
            ));
        } else if let Some(k) = p.strip_prefix('!') {
            out.push(Requirement::NotExists(k.trim().into()));
        } else if p
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
        {
            out.push(Requirement::Exists(p.into()));
        } else {
            return Err(bad(p));
        }
    }
    Ok(out)
}

/// A label map (`{app: web, tier: front}`) as selector text `app=web,tier=front`; empty when
/// there is no map.
pub fn labels_to_string(map: Option<&Value>) -> String {
    map.and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default()
}

/// Fields a field selector may name, per kind (kube-apiserver's field label conversions).
fn field_supported(r: &Resource, field: &str) -> bool {
    field == "metadata.name"
        || field == "metadata.namespace"
        || r.strategy.field_selectors.contains(&field)
}

/// A label selector and a field selector together.
#[derive(Debug, Default)]
pub struct Filter {
    labels: Vec<Requirement>,
    /// (dotted path, equal?, value)
    fields: Vec<(String, bool, String)>,
}

impl Filter {
    pub fn parse(
        r: &Resource,
        labels: Option<&str>,
        fields: Option<&str>,
    ) -> Result<Filter, ApiError> {
        let mut f = Filter {
            labels: parse_selector(labels.unwrap_or(""))?,
            fields: vec![],
        };
        for part in fields
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
        {
            let (path, eq, value) = if let Some((a, b)) = part.split_once("!=") {
                (a, false, b)
            } else if let Some((a, b)) = part.split_once("==").or_else(|| part.split_once('=')) {
                (a, true, b)
            } else {
                return Err(ApiError::bad_request(format!(
                    "invalid field selector: {part:?}"
                )));
            };
            let path = path.trim();
            if !field_supported(r, path) {
                return Err(ApiError::bad_request(format!(
                    "field label not supported: {path}"
                )));
            }
            f.fields
                .push((path.to_string(), eq, value.trim().to_string()));
        }
        Ok(f)
    }

    /// Whether `obj` passes both selectors.
    /// Whether the filter selects everything (no labels, no fields).
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty() && self.fields.is_empty()
    }

    pub fn accepts(&self, obj: &Value) -> bool {
        matches(obj, &self.labels)
            && self.fields.iter().all(|(path, eq, want)| {
                let ptr = format!("/{}", path.replace('.', "/"));
                let got = match obj.pointer(&ptr) {
                    Some(Value::String(s)) => s.clone(),
                    Some(Value::Null) | None => String::new(),
                    Some(v) => v.to_string(),
                };
                (got == *want) == *eq
            })
    }
}

/// Whether an object's labels satisfy every requirement.
pub fn matches(obj: &Value, reqs: &[Requirement]) -> bool {
    let labels = obj.pointer("/metadata/labels").and_then(Value::as_object);
    let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
    reqs.iter().all(|r| match r {
        Requirement::Eq(k, v) => get(k) == Some(v.as_str()),
        Requirement::NotEq(k, v) => get(k) != Some(v.as_str()),
        Requirement::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
        Requirement::NotIn(k, vs) => get(k).is_none_or(|x| !vs.iter().any(|v| v == x)),
        Requirement::Exists(k) => get(k).is_some(),
        Requirement::NotExists(k) => get(k).is_none(),
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::api::registry;

    #[test]
    fn field_selectors_match_supported_fields_and_reject_others() {
        let pods = registry::find("", "v1", "pods").unwrap();
        let p = json!({"metadata": {"name": "a", "namespace": "ns"}, "spec": {"nodeName": "n1"}, "status": {"phase": "Running"}});
        let ok = |f: &str| Filter::parse(pods, None, Some(f)).unwrap().accepts(&p);
        assert!(ok("spec.nodeName=n1,status.phase!=Pending"));
        assert!(ok("metadata.name==a"));
        assert!(!ok("spec.nodeName=n2"));
        assert!(ok("spec.nodeName!=n2"));
        let e = Filter::parse(pods, None, Some("spec.bogus=x")).unwrap_err();
        assert_eq!(e.message, "field label not supported: spec.bogus");
        let events = registry::find("", "v1", "events").unwrap();
        assert!(
            Filter::parse(
                events,
                None,
                Some("involvedObject.name=a,involvedObject.uid=u")
            )
            .is_ok()
        );
    }

    #[test]
    fn label_selectors_support_equality_and_sets() {
        let obj = json!({"metadata": {"labels": {"app": "web", "tier": "front"}}});
        let ok = |s: &str| matches(&obj, &parse_selector(s).unwrap());
        assert!(ok("app=web"));
        assert!(ok("app==web,tier!=back"));
        assert!(ok("tier in (front, mid),!missing,app"));
        assert!(!ok("app notin (web)"));
        assert!(!ok("missing"));
        assert!(ok(""));
        assert!(parse_selector("a in b").is_err());
    }
}
