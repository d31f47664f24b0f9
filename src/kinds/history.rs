//! ControllerRevisions, as the StatefulSet and DaemonSet controllers keep them: each pod
//! template a workload has had, stored as the strategic-merge patch that restores it
//! (`{"spec":{"template":{…,"$patch":"replace"}}}`, what `kubectl rollout undo` applies), named
//! `<owner>-<hash>`, numbered in the order the templates were last used, the oldest unused ones
//! pruned past `revisionHistoryLimit`.

use std::collections::{BTreeMap, HashSet};

use k8s_openapi::{
    api::{apps::v1::ControllerRevision, core::v1::PodTemplateSpec},
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, runtime::RawExtension},
};
use serde_json::{Value, json};
use sha2::Digest;

/// The pod label naming the revision a workload's pod was made from.
pub const HASH_LABEL: &str = "controller-revision-hash";

const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";

/// A short, stable hash of a pod template (or any JSON value), in kube's safe alphabet.
pub fn template_hash(template: &Value) -> String {
    let digest = sha2::Sha256::digest(template.to_string().as_bytes());
    let mut n = u64::from_be_bytes(digest[..8].try_into().unwrap_or([0; 8]));
    let mut out = String::new();
    for _ in 0..10 {
        out.push(ALPHABET[(n % ALPHABET.len() as u64) as usize] as char);
        n /= ALPHABET.len() as u64;
    }
    out
}

/// The patch a revision stores for `template`.
pub fn patch_of(template: &PodTemplateSpec) -> Value {
    let mut t = serde_json::to_value(template).unwrap_or_else(|_| json!({}));
    if let Some(m) = t.as_object_mut() {
        m.insert("$patch".into(), "replace".into());
    }
    json!({"spec": {"template": t}})
}

/// The pod template a revision restores, if its data holds one.
pub fn template_of(rev: &ControllerRevision) -> Option<PodTemplateSpec> {
    let mut t = rev.data.as_ref()?.0.pointer("/spec/template")?.clone();
    if let Some(m) = t.as_object_mut() {
        m.remove("$patch");
    }
    serde_json::from_value(t).ok()
}

/// The hash of the revision for `template`.
pub fn hash_of(template: &PodTemplateSpec) -> String {
    template_hash(&serde_json::to_value(template).unwrap_or_default())
}

/// What an owner's history needs, worked out from the revisions it controls.
#[derive(Debug, Default, PartialEq)]
pub struct HistoryPlan {
    /// The revision of the current template, to be created.
    pub create: Option<ControllerRevision>,
    /// An existing revision whose template is current again (after an undo): renumbered.
    pub renumber: Option<(String, i64)>,
    /// Old revisions past the limit that no pod uses.
    pub delete: Vec<String>,
    /// The name of the current template's revision (`<owner>-<hash>`).
    pub update: String,
    /// The current template's hash.
    pub hash: String,
}

/// The history of `owner` (its metadata) with pod template `template`, given the revisions it
/// controls and the revision names its pods or status still use; keeps `limit` unused ones.
pub fn plan(
    owner: &ObjectMeta,
    template: &PodTemplateSpec,
    revisions: &[&ControllerRevision],
    in_use: &HashSet<String>,
    limit: i32,
) -> HistoryPlan {
    let hash = hash_of(template);
    let owner_name = owner.name.clone().unwrap_or_default();
    let name = format!("{owner_name}-{hash}");
    let max = revisions.iter().map(|r| r.revision).max().unwrap_or(0);
    let mut p = HistoryPlan {
        update: name.clone(),
        hash: hash.clone(),
        ..Default::default()
    };
    match revisions
        .iter()
        .find(|r| r.metadata.name.as_deref() == Some(&name))
    {
        Some(r) if r.revision < max => p.renumber = Some((name.clone(), max + 1)),
        Some(_) => {}
        None => {
            let mut labels: BTreeMap<String, String> = template
                .metadata
                .as_ref()
                .and_then(|m| m.labels.clone())
                .unwrap_or_default();
            labels.insert(HASH_LABEL.into(), hash.clone());
            p.create = Some(ControllerRevision {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    namespace: owner.namespace.clone(),
                    labels: Some(labels),
                    annotations: owner.annotations.clone().map(|mut a| {
                        a.remove("kubectl.kubernetes.io/last-applied-configuration");
                        a
                    }),
                    ..Default::default()
                },
                data: Some(RawExtension(patch_of(template))),
                revision: max + 1,
            })
        }
    }
    let mut old: Vec<&&ControllerRevision> = revisions
        .iter()
        .filter(|r| {
            let n = r.metadata.name.as_deref().unwrap_or_default();
            n != name && !in_use.contains(n)
        })
        .collect();
    old.sort_by_key(|r| r.revision);
    let extra = old.len().saturating_sub(limit.max(0) as usize);
    p.delete = old[..extra]
        .iter()
        .filter_map(|r| r.metadata.name.clone())
        .collect();
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(image: &str) -> PodTemplateSpec {
        serde_json::from_value(json!({"metadata": {"labels": {"app": "web"}},
            "spec": {"containers": [{"name": "c", "image": image}]}}))
        .unwrap()
    }

    fn owner() -> ObjectMeta {
        ObjectMeta {
            name: Some("web".into()),
            namespace: Some("default".into()),
            ..Default::default()
        }
    }

    fn made(image: &str, revision: i64) -> ControllerRevision {
        let mut r = plan(&owner(), &template(image), &[], &HashSet::new(), 10)
            .create
            .unwrap();
        r.revision = revision;
        r
    }

    #[test]
    fn a_new_template_gets_the_next_revision_and_its_patch_restores_it() {
        let a = made("a", 1);
        let p = plan(&owner(), &template("b"), &[&a], &HashSet::new(), 10);
        let b = p.create.unwrap();
        assert_eq!(b.revision, 2);
        assert_eq!(b.metadata.name.as_deref(), Some(p.update.as_str()));
        assert!(p.update.starts_with("web-"));
        assert_eq!(b.metadata.labels.as_ref().unwrap()[HASH_LABEL], p.hash);
        assert_eq!(template_of(&b), Some(template("b")));
        assert_eq!(b.data.unwrap().0["spec"]["template"]["$patch"], "replace");
    }

    #[test]
    fn an_old_template_again_is_renumbered_not_copied() {
        let (a, b) = (made("a", 1), made("b", 2));
        let p = plan(&owner(), &template("a"), &[&a, &b], &HashSet::new(), 10);
        assert_eq!(p.create, None);
        assert_eq!(p.renumber, Some((a.metadata.name.clone().unwrap(), 3)));
    }

    #[test]
    fn unused_revisions_past_the_limit_go_oldest_first() {
        let revs: Vec<ControllerRevision> = (1..=4).map(|i| made(&format!("i{i}"), i)).collect();
        let refs: Vec<&ControllerRevision> = revs.iter().collect();
        let in_use: HashSet<String> = [revs[0].metadata.name.clone().unwrap()].into();
        let p = plan(&owner(), &template("i4"), &refs, &in_use, 1);
        // i4 is current, i1 in use; of i2 and i3 one is kept: i2 goes.
        assert_eq!(p.delete, vec![revs[1].metadata.name.clone().unwrap()]);
    }
}
