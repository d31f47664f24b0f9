//! The node's half of keelson's local-path provisioner: the directory volumes live in
//! (`DATA_DIR/storage`, announced on the Node so the provisioner can place volumes here), and
//! the cleanup of a provisioned volume being deleted — its directory removed when its reclaim
//! policy is Delete (kept with Retain), then its cleanup finalizer lifted so the object goes.
//!
//! Only directories the sweep finds in that root are touched, each a real directory (not a
//! link) whose volume names this node and this very path: a volume cannot point the agent at
//! another place on the node. `remove_dir_all` does not follow links inside it.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use k8s_openapi::api::core::v1::PersistentVolume;
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};

use crate::kinds::storage::{CLEANUP_FINALIZER, PV_PROTECTION, volume_node};

/// How often the node looks for volumes to clean up.
const SWEEP: Duration = Duration::from_secs(2);

/// Where this node keeps local-path volumes.
pub fn root(data_dir: &Path) -> PathBuf {
    data_dir.join("storage")
}

/// Sweeps `root` for volumes being deleted, for as long as the agent runs.
pub fn start(client: Client, root: PathBuf, node: String) {
    tokio::spawn(async move {
        loop {
            if let Err(e) = sweep(&client, &root, &node).await {
                tracing::debug!(error = %e, "local-path volume sweep");
            }
            tokio::time::sleep(SWEEP).await;
        }
    });
}

/// What to do with a volume's directory.
#[derive(Debug, PartialEq, Eq)]
enum Cleanup {
    /// Not being deleted, or not ours: leave it.
    Keep,
    /// Deleted with reclaim policy Delete: remove the directory, then the finalizer.
    Remove,
    /// Deleted with Retain: the data stays, the finalizer goes.
    Release,
}

fn decide(pv: &PersistentVolume, dir: &Path, node: &str) -> Cleanup {
    let ours = volume_node(pv) == Some(node)
        && crate::kinds::has_finalizer(&pv.metadata, CLEANUP_FINALIZER)
        && pv
            .spec
            .as_ref()
            .and_then(|s| s.host_path.as_ref())
            .is_some_and(|hp| Path::new(&hp.path) == dir);
    // Still bound (pv-protection not lifted): a pod may be using it; nothing is touched.
    let protected = crate::kinds::has_finalizer(&pv.metadata, PV_PROTECTION);
    if !ours || protected || pv.metadata.deletion_timestamp.is_none() {
        return Cleanup::Keep;
    }
    let policy = pv
        .spec
        .as_ref()
        .and_then(|s| s.persistent_volume_reclaim_policy.as_deref());
    if policy == Some("Delete") {
        Cleanup::Remove
    } else {
        Cleanup::Release
    }
}

async fn sweep(client: &Client, root: &Path, node: &str) -> anyhow::Result<()> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Ok(());
    };
    let api: Api<PersistentVolume> = Api::all(client.clone());
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(pv_name) = name.split('_').next().filter(|n| n.starts_with("pvc-")) else {
            continue;
        };
        // One directory's trouble (a volume gone, a refused read) never stops the others.
        if let Err(err) = clean(&api, pv_name, &e.path(), node).await {
            tracing::debug!(volume = %pv_name, error = %err, "local-path cleanup");
        }
    }
    Ok(())
}

/// Cleans up the directory `dir` of volume `pv_name` if the volume is being deleted.
async fn clean(
    api: &Api<PersistentVolume>,
    pv_name: &str,
    dir: &Path,
    node: &str,
) -> anyhow::Result<()> {
    let Some(pv) = api.get_opt(pv_name).await? else {
        return Ok(());
    };
    let what = decide(&pv, dir, node);
    if what == Cleanup::Keep {
        return Ok(());
    }
    let is_dir = std::fs::symlink_metadata(dir).is_ok_and(|m| m.is_dir());
    if what == Cleanup::Remove && is_dir {
        std::fs::remove_dir_all(dir)?;
        tracing::info!(volume = %pv_name, dir = %dir.display(), "local-path volume removed");
    }
    let rest: Vec<String> = pv
        .metadata
        .finalizers
        .iter()
        .flatten()
        .filter(|f| *f != CLEANUP_FINALIZER)
        .cloned()
        .collect();
    api.patch(
        pv_name,
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"metadata": {"finalizers": rest}})),
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pv(node: &str, path: &str, policy: &str, deleting: bool) -> PersistentVolume {
        let mut v = serde_json::json!({
            "metadata": {"name": "pvc-1", "finalizers": [CLEANUP_FINALIZER],
                         "annotations": {"volume.kubernetes.io/selected-node": node}},
            "spec": {"hostPath": {"path": path}, "persistentVolumeReclaimPolicy": policy}});
        if deleting {
            v["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z".into();
        }
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn only_this_nodes_deleted_volumes_at_this_very_path_are_cleaned() {
        let dir = Path::new("/data/storage/pvc-1_default_www");
        let path = "/data/storage/pvc-1_default_www";
        assert_eq!(
            decide(&pv("n1", path, "Delete", true), dir, "n1"),
            Cleanup::Remove
        );
        assert_eq!(
            decide(&pv("n1", path, "Retain", true), dir, "n1"),
            Cleanup::Release
        );
        assert_eq!(
            decide(&pv("n1", path, "Delete", false), dir, "n1"),
            Cleanup::Keep
        );
        assert_eq!(
            decide(&pv("n2", path, "Delete", true), dir, "n1"),
            Cleanup::Keep
        );
        // A volume naming another path never makes this node remove a directory.
        assert_eq!(
            decide(&pv("n1", "/etc", "Delete", true), dir, "n1"),
            Cleanup::Keep
        );
    }
}
