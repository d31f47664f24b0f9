//! The static-pod source: reads a manifest directory (`.yaml`, `.yml`, `.json`; several
//! documents per file allowed) into Pods named and labelled as kubelet does. Bad files are
//! reported with the file and the field and change nothing. Never starts anything itself.

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
};

use k8s_openapi::api::core::v1::{Pod, Toleration};
use sha2::{Digest, Sha256};

use crate::kinds::validate::validate_pod;

/// Largest manifest file read (kubelet's limit).
pub const MAX_FILE: u64 = 10 << 20;

/// A manifest problem, naming the file (and the document and field where known).
#[derive(Debug, thiserror::Error)]
#[error("{file}: {message}")]
pub struct ManifestError {
    pub file: PathBuf,
    pub message: String,
}

fn merr(file: &Path, message: impl Into<String>) -> ManifestError {
    ManifestError {
        file: file.to_path_buf(),
        message: message.into(),
    }
}

/// A static pod and the file it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct StaticPod {
    pub pod: Pod,
    pub file: PathBuf,
}

/// Parses the text of one manifest file into pods (names suffixed with the node name, UIDs
/// derived from content, node and path; source annotations set).
pub fn parse_file(file: &Path, text: &str, node: &str) -> Result<Vec<Pod>, ManifestError> {
    let docs: Vec<serde_json::Value> = if file.extension().is_some_and(|e| e == "json") {
        let mut out = vec![];
        for v in serde_json::Deserializer::from_str(text).into_iter::<serde_json::Value>() {
            out.push(v.map_err(|e| merr(file, format!("invalid JSON: {e}")))?);
        }
        out
    } else {
        serde_saphyr::from_multiple::<serde_json::Value>(text)
            .map_err(|e| merr(file, format!("invalid YAML: {}", one_line(&e.to_string()))))?
    };
    let mut pods = vec![];
    for (i, doc) in docs.into_iter().enumerate() {
        if doc.is_null() {
            continue;
        }
        let at = |m: String| merr(file, format!("document {i}: {m}"));
        let kind = doc.get("kind").and_then(|k| k.as_str()).unwrap_or("");
        let api = doc.get("apiVersion").and_then(|k| k.as_str()).unwrap_or("");
        if kind != "Pod" {
            return Err(at(format!(
                "kind {kind:?} is not supported here (only Pod)"
            )));
        }
        if api != "v1" {
            return Err(at(format!(
                "apiVersion {api:?} is not supported for Pod (want \"v1\")"
            )));
        }
        let canonical = serde_json::to_vec(&doc).map_err(|e| at(e.to_string()))?;
        let mut pod: Pod = serde_path_to_error::deserialize(doc)
            .map_err(|e| at(format!("{}: {}", e.path(), e.inner())))?;
        let errs = validate_pod(&pod);
        if !errs.is_empty() {
            let list: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
            return Err(at(format!("invalid Pod: {}", list.join(", "))));
        }
        let mut h = Sha256::new();
        h.update(&canonical);
        h.update(node.as_bytes());
        h.update(file.to_string_lossy().as_bytes());
        let uid = hex::encode(&h.finalize()[..16]);
        let m = &mut pod.metadata;
        let name = format!(
            "{}-{}",
            m.name.clone().unwrap_or_default(),
            node.to_lowercase()
        );
        m.name = Some(name);
        if m.namespace.as_deref().is_none_or(str::is_empty) {
            m.namespace = Some("default".into());
        }
        m.uid = Some(uid.clone());
        let ann = m.annotations.get_or_insert_with(BTreeMap::new);
        ann.insert("kubernetes.io/config.source".into(), "file".into());
        ann.insert("kubernetes.io/config.hash".into(), uid);
        ann.insert(
            "kubernetes.io/config.seen".into(),
            jiff::Timestamp::now().to_string(),
        );
        if let Some(spec) = pod.spec.as_mut() {
            spec.node_name = Some(node.to_string());
            let tol = spec.tolerations.get_or_insert_with(Vec::new);
            tol.push(Toleration {
                operator: Some("Exists".into()),
                effect: Some("NoExecute".into()),
                ..Default::default()
            });
        }
        pods.push(pod);
    }
    Ok(pods)
}

/// The parser's multi-line message (with a source snippet) as one log-friendly line.
fn one_line(msg: &str) -> String {
    let lines: Vec<&str> = msg
        .lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty()
                && !l.starts_with('|')
                && !l
                    .chars()
                    .all(|c| c.is_ascii_digit() || c == '|' || c == ' ')
        })
        .collect();
    let mut parts: Vec<String> = lines
        .iter()
        .map(|l| {
            l.trim_start_matches(|c: char| c.is_ascii_digit() || c == '|' || c == '^' || c == ' ')
                .to_string()
        })
        .filter(|l| !l.is_empty())
        .collect();
    parts.dedup();
    parts.join("; ")
}

fn is_manifest(p: &Path) -> bool {
    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
    !name.starts_with('.')
        && p.extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"))
}

/// Keeps the last good pods of each file, so a broken edit changes nothing.
#[derive(Debug, Default)]
pub struct ManifestSource {
    last_good: HashMap<PathBuf, Vec<Pod>>,
    last_error: HashMap<PathBuf, String>,
}

impl ManifestSource {
    /// Rescans `dir`; returns the desired static pods and the new errors (each reported once).
    pub fn scan(&mut self, dir: &Path, node: &str) -> (Vec<StaticPod>, Vec<ManifestError>) {
        let mut errors = vec![];
        let mut seen = vec![];
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) => {
                errors.push(merr(dir, format!("cannot read manifest directory: {e}")));
                return (self.current(), errors);
            }
        };
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && is_manifest(p))
            .collect();
        files.sort();
        for f in files {
            seen.push(f.clone());
            let result = match std::fs::metadata(&f) {
                Ok(m) if m.len() > MAX_FILE => {
                    Err(merr(&f, format!("file is larger than {MAX_FILE} bytes")))
                }
                _ => std::fs::read_to_string(&f)
                    .map_err(|e| merr(&f, format!("cannot read: {e}")))
                    .and_then(|t| parse_file(&f, &t, node)),
            };
            match result {
                Ok(pods) => {
                    self.last_error.remove(&f);
                    // Keep config.seen stable for pods whose UID did not change.
                    let pods = pods.into_iter().map(|p| self.keep_seen(&f, p)).collect();
                    self.last_good.insert(f, pods);
                }
                Err(e) => {
                    if self.last_error.get(&f) != Some(&e.message) {
                        self.last_error.insert(f.clone(), e.message.clone());
                        errors.push(e);
                    }
                }
            }
        }
        self.last_good.retain(|f, _| seen.contains(f));
        self.last_error.retain(|f, _| seen.contains(f));
        (self.current(), errors)
    }

    fn keep_seen(&self, f: &Path, mut p: Pod) -> Pod {
        let uid = p.metadata.uid.clone();
        if let Some(old) = self
            .last_good
            .get(f)
            .and_then(|v| v.iter().find(|o| o.metadata.uid == uid))
            && let (Some(a), Some(b)) = (
                old.metadata.annotations.as_ref(),
                p.metadata.annotations.as_mut(),
            )
            && let Some(seen) = a.get("kubernetes.io/config.seen")
        {
            b.insert("kubernetes.io/config.seen".into(), seen.clone());
        }
        p
    }

    fn current(&self) -> Vec<StaticPod> {
        let mut out = vec![];
        for (f, pods) in &self.last_good {
            for p in pods {
                out.push(StaticPod {
                    pod: p.clone(),
                    file: f.clone(),
                });
            }
        }
        out.sort_by(|a, b| a.pod.metadata.name.cmp(&b.pod.metadata.name));
        // Two files naming the same pod: the first file wins (kubelet reports a conflict too).
        out.dedup_by(|b, a| {
            a.pod.metadata.name == b.pod.metadata.name
                && a.pod.metadata.namespace == b.pod.metadata.namespace
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: web}\nspec:\n  containers:\n  - name: c\n    image: busybox\n";

    #[test]
    fn static_pods_get_the_node_suffix_a_stable_uid_and_source_annotations() {
        let a = parse_file(Path::new("/m/web.yaml"), POD, "Node1").unwrap();
        let b = parse_file(Path::new("/m/web.yaml"), POD, "Node1").unwrap();
        let p = &a[0];
        assert_eq!(p.metadata.name.as_deref(), Some("web-node1"));
        assert_eq!(p.metadata.namespace.as_deref(), Some("default"));
        assert_eq!(p.metadata.uid, b[0].metadata.uid);
        let ann = p.metadata.annotations.as_ref().unwrap();
        assert_eq!(ann["kubernetes.io/config.source"], "file");
        assert_eq!(
            &ann["kubernetes.io/config.hash"],
            p.metadata.uid.as_ref().unwrap()
        );
        let other = parse_file(
            Path::new("/m/web.yaml"),
            &POD.replace("busybox", "nginx"),
            "Node1",
        )
        .unwrap();
        assert_ne!(
            other[0].metadata.uid, p.metadata.uid,
            "changed spec → new UID"
        );
    }

    #[test]
    fn multi_document_files_yield_every_pod() {
        let text = format!("{POD}---\n{}", POD.replace("web", "api"));
        assert_eq!(
            parse_file(Path::new("/m/a.yaml"), &text, "n")
                .unwrap()
                .len(),
            2
        );
    }

    #[test]
    fn errors_name_the_file_and_field() {
        let e = parse_file(Path::new("/m/bad.yaml"), "a: [", "n").unwrap_err();
        assert!(
            e.to_string().starts_with("/m/bad.yaml: invalid YAML"),
            "{e}"
        );
        let e = parse_file(
            Path::new("/m/d.yaml"),
            &POD.replace("kind: Pod", "kind: Deployment"),
            "n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("kind \"Deployment\""), "{e}");
        let e = parse_file(
            Path::new("/m/t.yaml"),
            &POD.replace(
                "image: busybox",
                "image: busybox\n    ports: [{containerPort: many}]",
            ),
            "n",
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("spec.containers[0].ports[0].containerPort"),
            "{e}"
        );
        let e = parse_file(
            Path::new("/m/v.yaml"),
            &POD.replace("    image: busybox\n", ""),
            "n",
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("spec.containers[0].image: Required value"),
            "{e}"
        );
    }

    #[test]
    fn a_broken_edit_keeps_the_last_good_pods_and_reports_once() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("web.yaml");
        std::fs::write(&f, POD).unwrap();
        std::fs::write(d.path().join(".hidden.yaml"), POD).unwrap();
        std::fs::write(d.path().join("notes.txt"), "x").unwrap();
        let mut s = ManifestSource::default();
        let (pods, errs) = s.scan(d.path(), "n");
        assert_eq!((pods.len(), errs.len()), (1, 0));
        std::fs::write(&f, "kind: [").unwrap();
        let (pods2, errs) = s.scan(d.path(), "n");
        assert_eq!(errs.len(), 1);
        assert_eq!(pods2[0].pod.metadata.uid, pods[0].pod.metadata.uid);
        let (_, errs) = s.scan(d.path(), "n");
        assert!(errs.is_empty(), "the same error is not reported again");
        std::fs::remove_file(&f).unwrap();
        assert!(s.scan(d.path(), "n").0.is_empty());
    }
}
