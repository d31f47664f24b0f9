//! Pod volumes on the node: emptyDir, hostPath, and the projected kinds (ConfigMap, Secret,
//! downwardAPI, projected with service account tokens) written like kubelet's AtomicWriter
//! (a timestamped directory, then the `..data` symlink swapped), so updates reach running
//! containers whole.

use std::path::PathBuf;

use super::*;

/// A pod volume's host directory, created on first use.
pub fn volume_dir(pod: &Pod, sb: &SandboxInfo, name: &str) -> Result<String, ConfigError> {
    let vol = pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.as_ref())
        .and_then(|v| v.iter().find(|v| v.name == name))
        .ok_or_else(|| ConfigError(format!("volume {name:?} not found")))?;
    if let Some(hp) = &vol.host_path {
        return host_path(hp);
    }
    if let Some(ed) = &vol.empty_dir {
        return empty_dir(pod, sb, name, ed);
    }
    if let Some(c) = &vol.persistent_volume_claim {
        return claim_volume(pod, sb, name, &c.claim_name);
    }
    let projected = match (&vol.config_map, &vol.secret) {
        (Some(c), _) => Some((
            false,
            c.name.clone(),
            c.items.clone(),
            c.default_mode,
            c.optional.unwrap_or(false),
        )),
        (None, Some(sv)) => Some((
            true,
            sv.secret_name.clone().unwrap_or_default(),
            sv.items.clone(),
            sv.default_mode,
            sv.optional.unwrap_or(false),
        )),
        _ => None,
    };
    if let Some(p) = projected {
        return config_map_or_secret(sb, name, p);
    }
    if let Some(da) = &vol.downward_api {
        return downward_api(pod, sb, name, da);
    }
    if let Some(pv) = &vol.projected {
        return projected_volume(pod, sb, name, pv);
    }
    Err(ConfigError(format!(
        "volume {name:?}: this volume type is not supported"
    )))
}

/// A hostPath volume: the path itself, after kubelet's type check (or creation).
fn host_path(hp: &k8s_openapi::api::core::v1::HostPathVolumeSource) -> Result<String, ConfigError> {
    let p = Path::new(&hp.path);
    match hp.type_.as_deref().unwrap_or("") {
        "DirectoryOrCreate" => std::fs::create_dir_all(p)
            .map_err(|e| ConfigError(format!("hostPath {:?}: {e}", hp.path)))?,
        "FileOrCreate" => {
            if let Some(d) = p.parent() {
                let _ = std::fs::create_dir_all(d);
            }
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| ConfigError(format!("hostPath {:?}: {e}", hp.path)))?;
        }
        "Directory" if !p.is_dir() => {
            return Err(ConfigError(format!(
                "hostPath type check failed: {} is not a directory",
                hp.path
            )));
        }
        "File" if !p.is_file() => {
            return Err(ConfigError(format!(
                "hostPath type check failed: {} is not a file",
                hp.path
            )));
        }
        _ => {}
    }
    Ok(hp.path.clone())
}

/// A persistentVolumeClaim volume: its bound volume's directory (hostPath or local). A
/// directory keelson's provisioner made is created on first use, world-writable and, with an
/// fsGroup, group-owned by it and setgid (as k3s's local-path helper and kubelet's ownership
/// management leave it).
fn claim_volume(
    pod: &Pod,
    sb: &SandboxInfo,
    name: &str,
    claim: &str,
) -> Result<String, ConfigError> {
    let fail = |why: String| {
        ConfigError(format!(
            "MountVolume.SetUp failed for volume \"{name}\" : {why}"
        ))
    };
    let Some((pvc, pv)) = sb.refs.claims.get(claim) else {
        return Err(fail(format!("persistentvolumeclaim \"{claim}\" not found")));
    };
    // Only a volume bound to this very claim: a claim naming someone else's volume in its
    // spec.volumeName gets nothing (kubelet checks the same).
    let bound = pv
        .as_ref()
        .filter(|pv| crate::kinds::storage::bound_to(pv, pvc));
    let Some(pv) = bound else {
        return Err(fail(format!(
            "PersistentVolumeClaim \"{claim}\" is not bound"
        )));
    };
    let spec = pv.spec.clone().unwrap_or_default();
    if let Some(l) = &spec.local {
        if !Path::new(&l.path).is_dir() {
            return Err(fail(format!(
                "local volume path {:?} is not a directory",
                l.path
            )));
        }
        return Ok(l.path.clone());
    }
    let Some(hp) = &spec.host_path else {
        return Err(fail(
            "the volume's type is not supported on this node".into(),
        ));
    };
    let fresh = !Path::new(&hp.path).exists();
    let path = host_path(hp)?;
    if fresh && crate::kinds::storage::provisioned_here(pv) {
        shared_with_fs_group(pod, Path::new(&path)).map_err(fail)?;
    }
    Ok(path)
}

/// Makes `dir` world-writable, and with the pod's fsGroup group-owned by it and setgid (as
/// kubelet leaves the volumes it manages).
fn shared_with_fs_group(pod: &Pod, dir: &Path) -> Result<(), String> {
    let fs_group = pod
        .spec
        .as_ref()
        .and_then(|s| s.security_context.as_ref())
        .and_then(|s| s.fs_group);
    if let Some(g) = fs_group {
        nix::unistd::chown(dir, None, Some(nix::unistd::Gid::from_raw(g as u32)))
            .map_err(|e| format!("chown to fsGroup {g}: {e}"))?;
    }
    let mode = if fs_group.is_some() { 0o2777 } else { 0o777 };
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(mode))
        .map_err(|e| e.to_string())
}

/// An emptyDir: a directory under the pod's (a tmpfs for `medium: Memory`), world-writable
/// and setgid to fsGroup, as kubelet makes it.
fn empty_dir(
    pod: &Pod,
    sb: &SandboxInfo,
    name: &str,
    ed: &k8s_openapi::api::core::v1::EmptyDirVolumeSource,
) -> Result<String, ConfigError> {
    let dir = sb.pod_dir.join("volumes/empty-dir").join(name);
    if !dir.exists() {
        std::fs::create_dir_all(&dir)
            .map_err(|e| ConfigError(format!("emptyDir {name:?}: {e}")))?;
        if ed.medium.as_deref() == Some("Memory") {
            let size = ed
                .size_limit
                .as_ref()
                .and_then(|q| quantity::bytes(&q.0))
                .map(|b| format!("size={b}"));
            nix::mount::mount(
                Some("tmpfs"),
                &dir,
                Some("tmpfs"),
                nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
                size.as_deref(),
            )
            .map_err(|e| ConfigError(format!("emptyDir {name:?}: mount tmpfs: {e}")))?;
        }
        // kubelet makes emptyDirs world-writable, group-owned by fsGroup (setgid) if set.
        shared_with_fs_group(pod, &dir)
            .map_err(|e| ConfigError(format!("emptyDir {name:?}: {e}")))?;
    }
    Ok(dir.to_string_lossy().into())
}

/// A ConfigMap or Secret volume: (is a Secret, its name, picked items, default mode, optional).
type Source = (bool, String, Option<Vec<KeyToPath>>, Option<i32>, bool);

/// A ConfigMap or Secret volume, written as a projection.
fn config_map_or_secret(
    sb: &SandboxInfo,
    name: &str,
    source: Source,
) -> Result<String, ConfigError> {
    let (secret, source, items, mode, optional) = source;
    let dir = sb.pod_dir.join("volumes/projected").join(name);
    let entries = match sb.refs.entries(secret, &source) {
        Some(e) => e,
        None if optional => vec![],
        None => {
            let kind = if secret { "secret" } else { "configmap" };
            return Err(ConfigError(format!(
                "MountVolume.SetUp failed for volume \"{name}\" : {kind} \"{source}\" not found"
            )));
        }
    };
    write_projection(&dir, &entries, items.as_deref(), mode.unwrap_or(0o644))
        .map_err(|e| ConfigError(format!("volume {name:?}: {e}")))?;
    Ok(dir.to_string_lossy().into())
}

/// A downwardAPI volume, written as a projection.
fn downward_api(
    pod: &Pod,
    sb: &SandboxInfo,
    name: &str,
    da: &k8s_openapi::api::core::v1::DownwardAPIVolumeSource,
) -> Result<String, ConfigError> {
    let dir = sb.pod_dir.join("volumes/downward-api").join(name);
    let (entries, items) = downward_entries(pod, sb, name, da.items.iter().flatten())?;
    write_projection(
        &dir,
        &entries,
        Some(&items),
        da.default_mode.unwrap_or(0o644),
    )
    .map_err(|e| ConfigError(format!("volume {name:?}: {e}")))?;
    Ok(dir.to_string_lossy().into())
}

/// A projected volume: service account tokens, ConfigMaps, Secrets and downward API items in
/// one directory (entry keys made unique per source).
fn projected_volume(
    pod: &Pod,
    sb: &SandboxInfo,
    name: &str,
    pv: &k8s_openapi::api::core::v1::ProjectedVolumeSource,
) -> Result<String, ConfigError> {
    // Every source lands in one directory; entry keys are made unique per source.
    let dir = sb.pod_dir.join("volumes/projected").join(name);
    let mut entries: Vec<(String, Vec<u8>)> = vec![];
    let mut items: Vec<KeyToPath> = vec![];
    for (i, src) in pv.sources.iter().flatten().enumerate() {
        if let Some(t) = &src.service_account_token {
            let aud = t.audience.clone().unwrap_or_default();
            let token = sb.refs.tokens.get(&aud).ok_or_else(|| {
                ConfigError(format!(
                    "MountVolume.SetUp failed for volume \"{name}\" : failed to fetch token: no token for the pod's service account yet"
                ))
            })?;
            let key = format!("{i}/token");
            entries.push((key.clone(), token.token.clone().into_bytes()));
            items.push(KeyToPath {
                key,
                path: t.path.clone(),
                mode: None,
            });
        }
        let cm_or_secret = match (&src.config_map, &src.secret) {
            (Some(c), _) => Some((false, &c.name, &c.items, c.optional)),
            (None, Some(sc)) => Some((true, &sc.name, &sc.items, sc.optional)),
            _ => None,
        };
        if let Some((secret, source, picked, optional)) = cm_or_secret {
            let found = match sb.refs.entries(secret, source) {
                Some(e) => e,
                None if optional.unwrap_or(false) => vec![],
                None => {
                    let kind = if secret { "secret" } else { "configmap" };
                    return Err(ConfigError(format!(
                        "MountVolume.SetUp failed for volume \"{name}\" : {kind} \"{source}\" not found"
                    )));
                }
            };
            for (k, v) in found {
                let key = format!("{i}/{k}");
                match picked {
                    Some(list) => {
                        for it in list.iter().filter(|it| it.key == k) {
                            items.push(KeyToPath {
                                key: key.clone(),
                                path: it.path.clone(),
                                mode: it.mode,
                            });
                        }
                    }
                    None => items.push(KeyToPath {
                        key: key.clone(),
                        path: k.clone(),
                        mode: None,
                    }),
                }
                entries.push((key, v));
            }
        }
        if let Some(da) = &src.downward_api {
            let (e, its) = downward_entries(pod, sb, name, da.items.iter().flatten())?;
            for ((k, v), it) in e.into_iter().zip(its) {
                let key = format!("{i}/{k}");
                entries.push((key.clone(), v));
                items.push(KeyToPath { key, ..it });
            }
        }
    }
    write_projection(
        &dir,
        &entries,
        Some(&items),
        pv.default_mode.unwrap_or(0o644),
    )
    .map_err(|e| ConfigError(format!("volume {name:?}: {e}")))?;
    Ok(dir.to_string_lossy().into())
}

/// Named contents of a projection: (key, bytes).
type Entries = Vec<(String, Vec<u8>)>;

/// The files of a downwardAPI volume (or projection source): (key, content) and where each goes.
fn downward_entries<'a>(
    pod: &Pod,
    sb: &SandboxInfo,
    name: &str,
    list: impl Iterator<Item = &'a k8s_openapi::api::core::v1::DownwardAPIVolumeFile>,
) -> Result<(Entries, Vec<KeyToPath>), ConfigError> {
    let mut entries = vec![];
    let mut items = vec![];
    for it in list {
        let value = match (&it.field_ref, &it.resource_field_ref) {
            (Some(f), _) => match f.field_path.as_str() {
                // Whole maps as kubelet writes them: `key="value"` lines, sorted.
                "metadata.labels" | "metadata.annotations" => {
                    let m = if f.field_path == "metadata.labels" {
                        &pod.metadata.labels
                    } else {
                        &pod.metadata.annotations
                    };
                    m.iter()
                        .flatten()
                        .map(|(k, v)| format!("{k}={v:?}"))
                        .collect::<Vec<_>>()
                        .join("\n")
                }
                p => field_ref(pod, sb, p)?,
            },
            (None, Some(r)) => {
                let spec = pod.spec.as_ref();
                let c = spec
                    .and_then(|s| {
                        s.containers.iter().find(|c| {
                            r.container_name
                                .as_deref()
                                .is_none_or(|n| n.is_empty() || c.name == n)
                        })
                    })
                    .ok_or_else(|| {
                        ConfigError(format!(
                            "downwardAPI volume {name:?}: no container for {:?}",
                            r.resource
                        ))
                    })?;
                resource_ref(c, &r.resource, r.divisor.as_ref().map(|d| d.0.as_str()))?
            }
            (None, None) => continue,
        };
        entries.push((it.path.clone(), value.into_bytes()));
        items.push(KeyToPath {
            key: it.path.clone(),
            path: it.path.clone(),
            mode: it.mode,
        });
    }
    Ok((entries, items))
}

/// The generation (`..<timestamp>` directory) and content digest each projection directory
/// was last written with, by this process. The agent trusts this, not the `..data` link inside
/// the directory, which the pod could have changed.
static GENERATIONS: std::sync::Mutex<Option<HashMap<PathBuf, Generation>>> =
    std::sync::Mutex::new(None);

/// A projection's current `..<timestamp>` directory and the digest of what it holds.
type Generation = (String, [u8; 32]);

fn generation(dir: &Path) -> Option<Generation> {
    GENERATIONS
        .lock()
        .ok()?
        .as_ref()
        .and_then(|m| m.get(dir).cloned())
}

fn remember(dir: &Path, stamp: String, digest: [u8; 32]) {
    if let Ok(mut g) = GENERATIONS.lock() {
        g.get_or_insert_with(HashMap::new)
            .insert(dir.to_path_buf(), (stamp, digest));
    }
}

/// Forgets the projections below `dir` (a pod's directory being removed).
pub fn forget_projections(dir: &Path) {
    if let Ok(mut g) = GENERATIONS.lock()
        && let Some(m) = g.as_mut()
    {
        m.retain(|k, _| !k.starts_with(dir));
    }
}

/// A generation name as this writer makes them: `..` and no slash, not one of the fixed names.
fn is_generation(name: &str) -> bool {
    name.starts_with("..")
        && name.len() > 2
        && !name.contains('/')
        && name != "..data"
        && name != "..data_tmp"
}

/// Writes a ConfigMap/Secret/downwardAPI projection the way kubelet's AtomicWriter does, so
/// that a running container sees an update all at once: the files live in a fresh
/// `..<timestamp>` directory, `..data` is a symlink swapped to it by one rename, and every
/// top-level name is a symlink through `..data`. Nothing is rewritten when the content and
/// modes are unchanged. Every operation goes through the directory's descriptor and never
/// follows a symlink (containers mount it read-only, but the agent does not rely on it).
pub(super) fn write_projection(
    dir: &Path,
    entries: &[(String, Vec<u8>)],
    items: Option<&[KeyToPath]>,
    default_mode: i32,
) -> std::io::Result<()> {
    use sha2::Digest;
    let files: Vec<(String, &[u8], u32)> = match items {
        Some(items) => items
            .iter()
            .filter_map(|it| {
                let (_, v) = entries.iter().find(|(k, _)| *k == it.key)?;
                Some((
                    it.path.clone(),
                    v.as_slice(),
                    it.mode.unwrap_or(default_mode) as u32 & 0o7777,
                ))
            })
            .collect(),
        None => entries
            .iter()
            .map(|(k, v)| (k.clone(), v.as_slice(), default_mode as u32 & 0o7777))
            .collect(),
    };
    for (path, _, _) in &files {
        if path.is_empty()
            || path.starts_with('/')
            || path.starts_with("..")
            || path.split('/').any(|p| p == ".." || p.is_empty())
        {
            return Err(std::io::Error::other(format!(
                "item path {path:?} must be relative without '..'"
            )));
        }
    }
    let mut h = sha2::Sha256::new();
    for (p, d, m) in &files {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p.as_bytes());
        h.update((d.len() as u64).to_le_bytes());
        h.update(d);
        h.update(m.to_le_bytes());
    }
    let digest: [u8; 32] = h.finalize().into();
    let known = generation(dir);
    if known.as_ref().is_some_and(|(_, d)| *d == digest) {
        return Ok(());
    }
    std::fs::create_dir_all(dir)?;
    let d = safe_fs::open_dir(dir)?;
    // The generation to remove after the swap: ours, or (after an agent restart) the one
    // `..data` names if it has our form.
    let old = known.map(|(s, _)| s).or_else(|| {
        nix::fcntl::readlinkat(&d, "..data")
            .ok()
            .map(|s| s.to_string_lossy().into_owned())
            .filter(|s| is_generation(s))
    });
    let stamp = format!(
        "..{}.{}",
        jiff::Timestamp::now().strftime("%Y_%m_%d_%H_%M_%S"),
        crate::runtime::random_hex(4)
    );
    let fresh = safe_fs::make_dirs_at(&d, &stamp, 0o755)?;
    for (path, bytes, mode) in &files {
        let (parent, name) = match path.rsplit_once('/') {
            Some((p, n)) => (safe_fs::make_dirs_at(&fresh, p, 0o755)?, n),
            None => (
                nix::unistd::dup(&fresh).map_err(std::io::Error::from)?,
                path.as_str(),
            ),
        };
        safe_fs::create_file_at(&parent, name, bytes, *mode)?;
    }
    let _ = nix::unistd::unlinkat(&d, "..data_tmp", nix::unistd::UnlinkatFlags::NoRemoveDir);
    nix::unistd::symlinkat(stamp.as_str(), &d, "..data_tmp").map_err(std::io::Error::from)?;
    nix::fcntl::renameat(&d, "..data_tmp", &d, "..data").map_err(std::io::Error::from)?;
    // Top-level names: a symlink through ..data for each; stale ones go.
    let tops: std::collections::BTreeSet<&str> = files
        .iter()
        .filter_map(|(p, _, _)| p.split('/').next())
        .collect();
    for t in &tops {
        if safe_fs::lstat_at(&d, t).is_none() {
            nix::unistd::symlinkat(format!("..data/{t}").as_str(), &d, *t)
                .map_err(std::io::Error::from)?;
        }
    }
    for n in safe_fs::names_in(&d)? {
        if !n.starts_with("..") && !tops.contains(n.as_str()) {
            let _ = nix::unistd::unlinkat(&d, n.as_str(), nix::unistd::UnlinkatFlags::NoRemoveDir);
        }
    }
    if let Some(old) = old.filter(|o| *o != stamp) {
        let _ = safe_fs::remove_at(&d, &old);
    }
    remember(dir, stamp, digest);
    Ok(())
}

/// Rewrites the pod's ConfigMap, Secret and downwardAPI volumes from `sb.refs` (kubelet's
/// periodic volume sync): a container sees updates without a restart.
pub fn refresh_projections(pod: &Pod, sb: &SandboxInfo) -> Result<usize, ConfigError> {
    let mut n = 0;
    for v in pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.as_ref())
        .into_iter()
        .flatten()
    {
        if v.config_map.is_some() || v.secret.is_some() || v.downward_api.is_some() {
            volume_dir(pod, sb, &v.name)?;
            n += 1;
        }
    }
    Ok(n)
}

/// Whether the pod's volume `name` is one the agent writes (ConfigMap, Secret, downwardAPI,
/// projected): containers get those read-only.
pub(super) fn agent_written(pod: &Pod, name: &str) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.volumes.as_ref())
        .and_then(|v| v.iter().find(|v| v.name == name))
        .is_some_and(|v| {
            v.config_map.is_some()
                || v.secret.is_some()
                || v.downward_api.is_some()
                || v.projected.is_some()
                || v.persistent_volume_claim
                    .as_ref()
                    .is_some_and(|c| c.read_only == Some(true))
        })
}
