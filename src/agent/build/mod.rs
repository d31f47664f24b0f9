//! Turns a Pod's container (with the pod's sandbox and volumes) into a runtime config:
//! command/args against the image, env with `$(VAR)` expansion and field refs, security
//! context, resources → cgroup limits, volume mounts. Pure, apart from preparing volume dirs.

use std::{collections::HashMap, path::Path};

use k8s_openapi::api::core::v1::{
    ConfigMap, Container, KeyToPath, PersistentVolume, PersistentVolumeClaim, Pod, Secret,
};

use crate::kinds::quantity;

pub mod safe_fs;
mod volumes;
use crate::runtime::{
    image::ImageInfo,
    spec::{MountSpec, Ns, ProcessConfig, RuntimeConfig},
};
pub use volumes::{forget_projections, refresh_projections, volume_dir};

/// Why a container cannot be configured (kubelet's `CreateContainerConfigError`).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Facts about the pod's sandbox that containers need.
#[derive(Debug, Clone)]
pub struct SandboxInfo {
    pub pause_pid: u32,
    pub pod_ip: Option<String>,
    pub host_ip: String,
    pub node_name: String,
    /// `DATA_DIR/pods/<uid>`.
    pub pod_dir: std::path::PathBuf,
    pub host_network: bool,
    /// The ConfigMaps and Secrets the pod references that exist (fetched from the API).
    pub refs: Refs,
}

/// ConfigMaps and Secrets of the pod's namespace, by name.
#[derive(Debug, Clone, Default)]
pub struct Refs {
    pub config_maps: HashMap<String, ConfigMap>,
    pub secrets: HashMap<String, Secret>,
    /// Service account tokens for projected volumes, by audience ("" = the API server's).
    pub tokens: HashMap<String, Token>,
    /// The pod's claims by name, each with its bound volume (if it is bound).
    pub claims: HashMap<String, (PersistentVolumeClaim, Option<PersistentVolume>)>,
    /// The `kubernetes` Service (ClusterIP, port): the environment every container gets.
    pub kubernetes: Option<(String, i32)>,
}

/// A service account token the agent requested for the pod.
#[derive(Debug, Clone)]
pub struct Token {
    pub token: String,
    pub fetched: std::time::Instant,
    /// The lifetime the API server reported.
    pub ttl: std::time::Duration,
}

impl Token {
    /// kubelet renews a token once 80% of its lifetime passed.
    pub fn stale(&self) -> bool {
        self.fetched.elapsed() >= self.ttl.mul_f64(0.8)
    }
}

/// The projected service account tokens a pod asks for: (audience, expirationSeconds).
pub fn token_requests(pod: &Pod) -> Vec<(String, i64)> {
    let mut out: Vec<(String, i64)> = vec![];
    for v in pod.spec.iter().flat_map(|s| s.volumes.iter().flatten()) {
        for src in v.projected.iter().flat_map(|p| p.sources.iter().flatten()) {
            if let Some(t) = &src.service_account_token {
                let aud = t.audience.clone().unwrap_or_default();
                if !out.iter().any(|(a, _)| *a == aud) {
                    out.push((aud, t.expiration_seconds.unwrap_or(3600)));
                }
            }
        }
    }
    out
}

impl Refs {
    /// The key/value pairs of a ConfigMap (data and binaryData) or a Secret.
    fn entries(&self, secret: bool, name: &str) -> Option<Vec<(String, Vec<u8>)>> {
        if secret {
            let s = self.secrets.get(name)?;
            let mut out: Vec<(String, Vec<u8>)> = s
                .data
                .iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.0.clone()))
                .collect();
            for (k, v) in s.string_data.iter().flatten() {
                out.push((k.clone(), v.clone().into_bytes()));
            }
            Some(out)
        } else {
            let c = self.config_maps.get(name)?;
            let mut out: Vec<(String, Vec<u8>)> = c
                .data
                .iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.clone().into_bytes()))
                .collect();
            for (k, v) in c.binary_data.iter().flatten() {
                out.push((k.clone(), v.0.clone()));
            }
            Some(out)
        }
    }
}

/// The names of the ConfigMaps and Secrets a pod references (volumes, env, envFrom).
pub fn referenced(pod: &Pod) -> (Vec<String>, Vec<String>) {
    let (mut cms, mut secrets) = (vec![], vec![]);
    let Some(spec) = &pod.spec else {
        return (cms, secrets);
    };
    for v in spec.volumes.iter().flatten() {
        for src in v.projected.iter().flat_map(|p| p.sources.iter().flatten()) {
            if let Some(c) = &src.config_map {
                cms.push(c.name.clone());
            }
            if let Some(sc) = &src.secret {
                secrets.push(sc.name.clone());
            }
        }
        if let Some(c) = &v.config_map {
            cms.push(c.name.clone());
        }
        if let Some(sv) = v.secret.as_ref().and_then(|sv| sv.secret_name.clone()) {
            secrets.push(sv);
        }
    }
    for r in spec.image_pull_secrets.iter().flatten() {
        secrets.push(r.name.clone());
    }
    for c in spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
    {
        for e in c.env.iter().flatten() {
            if let Some(vf) = &e.value_from {
                if let Some(k) = &vf.config_map_key_ref {
                    cms.push(k.name.clone());
                }
                if let Some(k) = &vf.secret_key_ref {
                    secrets.push(k.name.clone());
                }
            }
        }
        for ef in c.env_from.iter().flatten() {
            if let Some(r) = &ef.config_map_ref {
                cms.push(r.name.clone());
            }
            if let Some(r) = &ef.secret_ref {
                secrets.push(r.name.clone());
            }
        }
    }
    cms.sort();
    cms.dedup();
    secrets.sort();
    secrets.dedup();
    (cms, secrets)
}

/// One key of a ConfigMap or Secret, with kubelet's errors.
fn key_of(
    sb: &SandboxInfo,
    secret: bool,
    ns: &str,
    name: &str,
    key: &str,
    optional: bool,
) -> Result<Option<String>, ConfigError> {
    let kind = if secret { "secret" } else { "configmap" };
    let Some(entries) = sb.refs.entries(secret, name) else {
        return if optional {
            Ok(None)
        } else {
            Err(ConfigError(format!("{kind} \"{name}\" not found")))
        };
    };
    match entries.into_iter().find(|(k, _)| k == key) {
        Some((_, v)) => Ok(Some(String::from_utf8_lossy(&v).into_owned())),
        None if optional => Ok(None),
        None => Err(ConfigError(format!(
            "couldn't find key {key} in {} {ns}/{name}",
            if secret { "Secret" } else { "ConfigMap" }
        ))),
    }
}

/// Expands `$(VAR)` references as Kubernetes does (`$$` escapes; unknown refs stay as they are).
pub fn expand(s: &str, vars: &HashMap<String, String>) -> String {
    let b = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'$' && i + 1 < b.len() {
            if b[i + 1] == b'$' {
                out.push('$');
                i += 2;
                continue;
            }
            if b[i + 1] == b'('
                && let Some(end) = s[i + 2..].find(')')
            {
                let name = &s[i + 2..i + 2 + end];
                match vars.get(name) {
                    Some(v) => out.push_str(v),
                    None => out.push_str(&s[i..i + 3 + end]),
                }
                i += 3 + end;
                continue;
            }
        }
        let ch = s[i..].chars().next().unwrap_or('\u{fffd}');
        out.push(ch);
        i += ch.len_utf8();
    }
    out
}

fn field_ref(pod: &Pod, sb: &SandboxInfo, path: &str) -> Result<String, ConfigError> {
    let m = &pod.metadata;
    Ok(match path {
        "metadata.name" => m.name.clone().unwrap_or_default(),
        "metadata.namespace" => m.namespace.clone().unwrap_or_else(|| "default".into()),
        "metadata.uid" => m.uid.clone().unwrap_or_default(),
        "spec.nodeName" => sb.node_name.clone(),
        "spec.serviceAccountName" => pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_default(),
        "status.podIP" | "status.podIPs" => sb.pod_ip.clone().unwrap_or_default(),
        "status.hostIP" | "status.hostIPs" => sb.host_ip.clone(),
        p if p.starts_with("metadata.labels['") || p.starts_with("metadata.annotations['") => {
            let (map, key) = p
                .split_once("['")
                .map(|(a, b)| (a, b.trim_end_matches("']")))
                .unwrap_or((p, ""));
            let src = if map == "metadata.labels" {
                &m.labels
            } else {
                &m.annotations
            };
            src.as_ref()
                .and_then(|l| l.get(key))
                .cloned()
                .unwrap_or_default()
        }
        other => {
            return Err(ConfigError(format!(
                "unsupported fieldRef fieldPath {other:?}"
            )));
        }
    })
}

fn resource_ref(
    c: &Container,
    resource: &str,
    divisor: Option<&str>,
) -> Result<String, ConfigError> {
    let r = c.resources.as_ref();
    let (list, key) = resource
        .split_once('.')
        .ok_or_else(|| ConfigError(format!("unsupported resourceFieldRef {resource:?}")))?;
    let map = match list {
        "limits" => r.and_then(|r| r.limits.as_ref()),
        "requests" => r.and_then(|r| r.requests.as_ref()),
        _ => None,
    };
    let value = map
        .and_then(|m| m.get(key))
        .and_then(|q| quantity::parse(&q.0));
    let divisor = divisor.and_then(quantity::parse).unwrap_or(1.0);
    let v = match (value, key) {
        (Some(v), _) => v,
        (None, "cpu") => num_cpus() as f64,
        (None, _) => total_memory() as f64,
    };
    Ok(((v / divisor).ceil() as i64).to_string())
}

fn num_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

fn total_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// Resolves the container's environment (image env, then the container's, in order).
pub fn environment(
    pod: &Pod,
    c: &Container,
    img: &ImageInfo,
    sb: &SandboxInfo,
) -> Result<Vec<(String, String)>, ConfigError> {
    let mut vars: Vec<(String, String)> = img
        .env
        .iter()
        .filter_map(|e| {
            e.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect();
    let set = |vars: &mut Vec<(String, String)>, k: String, v: String| {
        if let Some(slot) = vars.iter_mut().find(|(n, _)| *n == k) {
            slot.1 = v;
        } else {
            vars.push((k, v));
        }
    };
    // kubelet's master service variables, before the container's own (which override them).
    if let Some((ip, port)) = &sb.refs.kubernetes {
        for (k, v) in [
            ("KUBERNETES_SERVICE_HOST", ip.clone()),
            ("KUBERNETES_SERVICE_PORT", port.to_string()),
            ("KUBERNETES_SERVICE_PORT_HTTPS", port.to_string()),
            ("KUBERNETES_PORT", format!("tcp://{ip}:{port}")),
            (
                &format!("KUBERNETES_PORT_{port}_TCP"),
                format!("tcp://{ip}:{port}"),
            ),
            (&format!("KUBERNETES_PORT_{port}_TCP_PROTO"), "tcp".into()),
            (
                &format!("KUBERNETES_PORT_{port}_TCP_PORT"),
                port.to_string(),
            ),
            (&format!("KUBERNETES_PORT_{port}_TCP_ADDR"), ip.clone()),
        ] {
            set(&mut vars, k.to_string(), v);
        }
    }
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let mut declared: HashMap<String, String> = HashMap::new();
    for ef in c.env_from.iter().flatten() {
        let prefix = ef.prefix.clone().unwrap_or_default();
        let (secret, name, optional) = match (&ef.config_map_ref, &ef.secret_ref) {
            (Some(r), _) => (false, r.name.clone(), r.optional.unwrap_or(false)),
            (None, Some(r)) => (true, r.name.clone(), r.optional.unwrap_or(false)),
            (None, None) => continue,
        };
        match sb.refs.entries(secret, &name) {
            Some(entries) => {
                for (k, v) in entries {
                    let v = String::from_utf8_lossy(&v).into_owned();
                    declared.insert(format!("{prefix}{k}"), v.clone());
                    set(&mut vars, format!("{prefix}{k}"), v);
                }
            }
            None if optional => {}
            None => {
                let kind = if secret { "secret" } else { "configmap" };
                return Err(ConfigError(format!("{kind} \"{name}\" not found")));
            }
        }
    }
    for e in c.env.iter().flatten() {
        let v = if let Some(vf) = &e.value_from {
            if let Some(f) = &vf.field_ref {
                field_ref(pod, sb, &f.field_path)?
            } else if let Some(r) = &vf.resource_field_ref {
                resource_ref(c, &r.resource, r.divisor.as_ref().map(|d| d.0.as_str()))?
            } else if let Some(k) = &vf.config_map_key_ref {
                match key_of(sb, false, ns, &k.name, &k.key, k.optional.unwrap_or(false))? {
                    Some(v) => v,
                    None => continue,
                }
            } else if let Some(k) = &vf.secret_key_ref {
                match key_of(sb, true, ns, &k.name, &k.key, k.optional.unwrap_or(false))? {
                    Some(v) => v,
                    None => continue,
                }
            } else {
                String::new()
            }
        } else {
            expand(e.value.as_deref().unwrap_or(""), &declared)
        };
        declared.insert(e.name.clone(), v.clone());
        set(&mut vars, e.name.clone(), v);
    }
    if !vars.iter().any(|(k, _)| k == "HOSTNAME") {
        vars.push((
            "HOSTNAME".into(),
            pod.metadata.name.clone().unwrap_or_default(),
        ));
    }
    Ok(vars)
}

/// The argv: `command` replaces the image entrypoint, `args` the image cmd, `$(VAR)` expanded.
pub fn argv(c: &Container, img: &ImageInfo, env: &HashMap<String, String>) -> Vec<String> {
    let ex = |v: &Vec<String>| v.iter().map(|s| expand(s, env)).collect::<Vec<_>>();
    match (&c.command, &c.args) {
        (Some(cmd), args) if !cmd.is_empty() => {
            let mut v = ex(cmd);
            v.extend(args.as_ref().map(ex).unwrap_or_default());
            v
        }
        (_, Some(args)) if !args.is_empty() => {
            let mut v = img.entrypoint.clone();
            v.extend(ex(args));
            v
        }
        _ => {
            let mut v = img.entrypoint.clone();
            v.extend(img.cmd.clone());
            v
        }
    }
}

fn parse_user(u: &str) -> (Option<u32>, Option<u32>) {
    let (a, b) = u.split_once(':').unwrap_or((u, ""));
    (a.parse().ok(), b.parse().ok())
}

/// Prepares a volume mount's `subPath` as kubelet does: `sub` is opened beneath the volume's
/// directory (symlinks followed only while they stay inside; missing directories made with
/// `mkdirat`), and that descriptor is bind-mounted onto
/// `POD_DIR/volume-subpaths/VOLUME/CONTAINER/INDEX`, which the runtime mounts. The
/// container gets the inode that was checked, whatever the path says afterwards.
fn subpath_mount(
    sb: &SandboxInfo,
    volume: &str,
    sub: &str,
    name: &str,
    container: &str,
    index: usize,
) -> Result<String, ConfigError> {
    let fail = |e: std::io::Error| {
        ConfigError(format!(
            "failed to prepare subPath for volumeMount \"{name}\" of container \"{container}\": {e}"
        ))
    };
    let base = safe_fs::open_dir(Path::new(volume)).map_err(fail)?;
    let fd = safe_fs::open_beneath(&base, sub).map_err(fail)?;
    let target = sb
        .pod_dir
        .join("volume-subpaths")
        .join(name)
        .join(container)
        .join(index.to_string());
    safe_fs::bind_fd(&fd, &target).map_err(fail)?;
    Ok(target.to_string_lossy().into_owned())
}

/// Builds the runtime config of an app or init container joined to the sandbox.
pub fn runtime_config(
    pod: &Pod,
    c: &Container,
    img: &ImageInfo,
    sb: &SandboxInfo,
    container_id: &str,
    termination_log: &Path,
) -> Result<RuntimeConfig, ConfigError> {
    let spec = pod
        .spec
        .as_ref()
        .ok_or_else(|| ConfigError("pod has no spec".into()))?;
    let env = environment(pod, c, img, sb)?;
    let process = process_config(spec, c, img, &env)?;
    let mounts = container_mounts(pod, c, sb, termination_log)?;
    let (memory_limit, cpu_limit, cpu_request) = resource_limits(c);
    let ns = |kind: &str| Ns::Join(format!("/proc/{}/ns/{kind}", sb.pause_pid));
    // hostPID: the sandbox joined the node's PID namespace, so joining the sandbox's joins the
    // node's (as with shareProcessNamespace, which shares the sandbox's own).
    let share_pid = spec.share_process_namespace.unwrap_or(false) || spec.host_pid.unwrap_or(false);
    Ok(RuntimeConfig {
        process,
        hostname: if sb.host_network {
            String::new()
        } else {
            pod.metadata.name.clone().unwrap_or_default()
        },
        readonly_rootfs: c
            .security_context
            .as_ref()
            .and_then(|s| s.read_only_root_filesystem)
            .unwrap_or(false),
        mounts,
        net: ns("net"),
        ipc: ns("ipc"),
        uts: ns("uts"),
        pid: if share_pid { ns("pid") } else { Ns::New },
        cgroups_path: format!("/keelson/{container_id}"),
        memory_limit,
        // kubelet: quota = limit(millicores) * period / 1000, minimum 1000 µs.
        cpu_quota: cpu_limit.map(|m| (m * 100).max(1000)),
        cpu_period: cpu_limit.map(|_| 100_000),
        // kubelet: shares = request(millicores) * 1024 / 1000, minimum 2.
        cpu_shares: cpu_request.map(|m| ((m * 1024) / 1000).max(2) as u64),
        oom_score_adj: None,
        seccomp: seccomp_profile(pod, c, sb)?,
    })
}

/// The process: argv, environment, working directory, identity and privileges (the
/// container's security context over the pod's over the image's).
fn process_config(
    spec: &k8s_openapi::api::core::v1::PodSpec,
    c: &Container,
    img: &ImageInfo,
    env: &[(String, String)],
) -> Result<ProcessConfig, ConfigError> {
    let env_map: HashMap<String, String> = env.iter().cloned().collect();
    let args = argv(c, img, &env_map);
    if args.is_empty() {
        return Err(ConfigError("no command specified".into()));
    }
    let psc = spec.security_context.as_ref();
    let sc = c.security_context.as_ref();
    let (img_uid, img_gid) = parse_user(&img.user);
    let uid = sc
        .and_then(|s| s.run_as_user)
        .or(psc.and_then(|s| s.run_as_user))
        .map(|u| u as u32)
        .or(img_uid)
        .unwrap_or(0);
    let gid = sc
        .and_then(|s| s.run_as_group)
        .or(psc.and_then(|s| s.run_as_group))
        .map(|g| g as u32)
        .or(img_gid)
        .unwrap_or(0);
    if sc
        .and_then(|s| s.run_as_non_root)
        .or(psc.and_then(|s| s.run_as_non_root))
        == Some(true)
        && uid == 0
    {
        return Err(ConfigError(
            "container has runAsNonRoot and image will run as root".into(),
        ));
    }
    let mut additional_gids: Vec<u32> = psc
        .and_then(|s| s.supplemental_groups.clone())
        .unwrap_or_default()
        .into_iter()
        .map(|g| g as u32)
        .collect();
    if let Some(fs) = psc.and_then(|s| s.fs_group) {
        additional_gids.push(fs as u32);
    }
    let caps = sc.and_then(|s| s.capabilities.as_ref());
    Ok(ProcessConfig {
        args,
        env: env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
        cwd: c
            .working_dir
            .clone()
            .filter(|w| !w.is_empty())
            .unwrap_or_else(|| img.working_dir.clone()),
        uid,
        gid,
        additional_gids,
        privileged: sc.and_then(|s| s.privileged).unwrap_or(false),
        cap_add: caps.and_then(|c| c.add.clone()).unwrap_or_default(),
        cap_drop: caps.and_then(|c| c.drop.clone()).unwrap_or_default(),
        no_new_privileges: sc.and_then(|s| s.allow_privilege_escalation) == Some(false),
        terminal: c.tty.unwrap_or(false),
    })
}

/// The pod's files (hosts, hostname, resolv.conf), the termination log and the volumes.
fn container_mounts(
    pod: &Pod,
    c: &Container,
    sb: &SandboxInfo,
    termination_log: &Path,
) -> Result<Vec<MountSpec>, ConfigError> {
    let pod_file =
        |f: &str, at: &str| MountSpec::bind(sb.pod_dir.join(f).to_string_lossy(), at, false);
    let mut mounts = vec![
        pod_file("etc-hosts", "/etc/hosts"),
        pod_file("hostname", "/etc/hostname"),
        pod_file("resolv.conf", "/etc/resolv.conf"),
    ];
    let tpath = c
        .termination_message_path
        .clone()
        .unwrap_or_else(|| "/dev/termination-log".into());
    mounts.push(MountSpec::bind(
        termination_log.to_string_lossy(),
        tpath,
        false,
    ));
    for (i, m) in c.volume_mounts.iter().flatten().enumerate() {
        let mut src = volume_dir(pod, sb, &m.name)?;
        if let Some(sub) = m.sub_path.as_deref().filter(|s| !s.is_empty()) {
            src = subpath_mount(sb, &src, sub, &m.name, &c.name, i)?;
        }
        // ConfigMap, Secret, downwardAPI and projected volumes are the agent's to write: a
        // container always gets them read-only (kubelet does the same since 1.10).
        let read_only = m.read_only.unwrap_or(false) || volumes::agent_written(pod, &m.name);
        let mut ms = MountSpec::bind(src, m.mount_path.clone(), read_only);
        if m.mount_propagation.as_deref() == Some("Bidirectional") {
            ms.options[1] = "rshared".into();
        }
        mounts.push(ms);
    }
    Ok(mounts)
}

/// (memory limit in bytes, CPU limit and CPU request in millicores; the request defaults
/// to the limit).
fn resource_limits(c: &Container) -> (Option<i64>, Option<i64>, Option<i64>) {
    let limits = c.resources.as_ref().and_then(|r| r.limits.as_ref());
    let requests = c.resources.as_ref().and_then(|r| r.requests.as_ref());
    let memory_limit = limits
        .and_then(|l| l.get("memory"))
        .and_then(|q| quantity::bytes(&q.0));
    let cpu_limit = limits
        .and_then(|l| l.get("cpu"))
        .and_then(|q| quantity::millicores(&q.0));
    let cpu_request = requests
        .and_then(|l| l.get("cpu"))
        .and_then(|q| quantity::millicores(&q.0))
        .or(cpu_limit);
    (memory_limit, cpu_limit, cpu_request)
}

/// The container's seccomp profile from its `securityContext.seccompProfile`, else the pod's
/// (Kubernetes' default: Unconfined). `Localhost` profiles are read from the node's seccomp
/// directory, `DATA_DIR/seccomp` (kubelet's `/var/lib/kubelet/seccomp`).
fn seccomp_profile(
    pod: &Pod,
    c: &Container,
    sb: &SandboxInfo,
) -> Result<crate::runtime::seccomp::Profile, ConfigError> {
    use crate::runtime::seccomp;
    let chosen = c
        .security_context
        .as_ref()
        .and_then(|s| s.seccomp_profile.as_ref())
        .or(pod
            .spec
            .as_ref()
            .and_then(|s| s.security_context.as_ref())
            .and_then(|s| s.seccomp_profile.as_ref()));
    let Some(p) = chosen else {
        return Ok(seccomp::Profile::Unconfined);
    };
    match p.type_.as_str() {
        "Unconfined" => Ok(seccomp::Profile::Unconfined),
        "RuntimeDefault" => Ok(seccomp::Profile::RuntimeDefault),
        "Localhost" => {
            let rel = p.localhost_profile.as_deref().unwrap_or("");
            let dir = sb
                .pod_dir
                .parent()
                .and_then(Path::parent)
                .map(|d| d.join("seccomp"))
                .unwrap_or_default();
            let path =
                seccomp::localhost_path(&dir, rel).map_err(|e| ConfigError(e.to_string()))?;
            let profile = seccomp::localhost(&path).map_err(|e| ConfigError(e.to_string()))?;
            Ok(seccomp::Profile::Custom(Box::new(profile)))
        }
        other => Err(ConfigError(format!(
            "seccompProfile.type {other:?} is not one of Unconfined, RuntimeDefault, Localhost"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::volumes::write_projection;
    use super::*;

    #[test]
    fn projections_update_atomically_through_the_data_symlink() {
        use std::os::unix::fs::MetadataExt;
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("vol");
        let e = |pairs: &[(&str, &str)]| -> Vec<(String, Vec<u8>)> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
                .collect()
        };
        write_projection(&dir, &e(&[("a", "1"), ("b", "2")]), None, 0o644).unwrap();
        let ino = std::fs::metadata(&dir).unwrap().ino();
        assert_eq!(std::fs::read_to_string(dir.join("a")).unwrap(), "1");
        assert!(
            std::fs::symlink_metadata(dir.join("a"))
                .unwrap()
                .is_symlink()
        );
        let first = std::fs::read_link(dir.join("..data")).unwrap();
        // Same content: nothing is rewritten.
        write_projection(&dir, &e(&[("a", "1"), ("b", "2")]), None, 0o644).unwrap();
        assert_eq!(std::fs::read_link(dir.join("..data")).unwrap(), first);
        // An update: new value, a key gone, a key added; the directory itself stays (a bind
        // mount of it keeps showing the current content).
        write_projection(&dir, &e(&[("a", "9"), ("c", "3")]), None, 0o600).unwrap();
        assert_eq!(std::fs::metadata(&dir).unwrap().ino(), ino);
        assert_ne!(std::fs::read_link(dir.join("..data")).unwrap(), first);
        assert_eq!(std::fs::read_to_string(dir.join("a")).unwrap(), "9");
        assert_eq!(std::fs::read_to_string(dir.join("c")).unwrap(), "3");
        assert!(std::fs::symlink_metadata(dir.join("b")).is_err());
        assert!(!dir.join(&first).exists(), "the old generation is removed");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(dir.join("a"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
        // Nested item paths and bad ones.
        let items = [KeyToPath {
            key: "a".into(),
            path: "sub/dir/file".into(),
            mode: None,
        }];
        write_projection(&dir, &e(&[("a", "x")]), Some(&items), 0o644).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("sub/dir/file")).unwrap(),
            "x"
        );
        let bad = [KeyToPath {
            key: "a".into(),
            path: "../escape".into(),
            mode: None,
        }];
        let err = write_projection(&dir, &e(&[("a", "x")]), Some(&bad), 0o644).unwrap_err();
        assert!(err.to_string().contains("../escape"), "{err}");
    }

    fn img() -> ImageInfo {
        ImageInfo {
            name: "docker.io/library/busybox:latest".into(),
            image_id: "x".into(),
            chain_id: "sha256:x".into(),
            entrypoint: vec!["/bin/sh".into()],
            cmd: vec!["-c".into(), "echo image".into()],
            env: vec!["PATH=/bin".into(), "A=image".into()],
            working_dir: String::new(),
            user: String::new(),
        }
    }
    fn sb() -> SandboxInfo {
        SandboxInfo {
            pause_pid: 42,
            pod_ip: Some("10.1.0.5".into()),
            host_ip: "192.168.1.1".into(),
            node_name: "n1".into(),
            pod_dir: "/tmp/pod".into(),
            host_network: false,
            refs: Refs::default(),
        }
    }
    fn pod(yaml: &str) -> Pod {
        serde_saphyr::from_str(yaml).unwrap()
    }

    fn refs() -> Refs {
        let cm: ConfigMap = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "cfg"}, "data": {"color": "blue", "size": "L"}}))
        .unwrap();
        let sec: Secret = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "pw"}, "data": {"pass": "czNjcjN0"}}))
        .unwrap();
        Refs {
            config_maps: [("cfg".to_string(), cm)].into(),
            secrets: [("pw".to_string(), sec)].into(),
            ..Default::default()
        }
    }

    #[test]
    fn env_from_configmaps_and_secrets_with_kubelets_errors() {
        let p = pod(
            "metadata: {name: p, namespace: ns}\nspec:\n  containers:\n  - name: c\n    envFrom: [{prefix: CFG_, configMapRef: {name: cfg}}]\n    env:\n    - {name: PASS, valueFrom: {secretKeyRef: {name: pw, key: pass}}}\n    - {name: MAYBE, valueFrom: {configMapKeyRef: {name: nope, key: x, optional: true}}}\n",
        );
        let c = &p.spec.as_ref().unwrap().containers[0];
        let mut s = sb();
        s.refs = refs();
        let env = environment(&p, c, &img(), &s).unwrap();
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        assert_eq!(get("CFG_color").as_deref(), Some("blue"));
        assert_eq!(get("PASS").as_deref(), Some("s3cr3t"));
        assert_eq!(get("MAYBE"), None);
        let bad = pod(
            "metadata: {name: p, namespace: ns}\nspec:\n  containers:\n  - name: c\n    env:\n    - {name: X, valueFrom: {configMapKeyRef: {name: cfg, key: missing}}}\n",
        );
        let e =
            environment(&bad, &bad.spec.as_ref().unwrap().containers[0], &img(), &s).unwrap_err();
        assert_eq!(e.0, "couldn't find key missing in ConfigMap ns/cfg");
        let e = environment(
            &bad,
            &bad.spec.as_ref().unwrap().containers[0],
            &img(),
            &sb(),
        )
        .unwrap_err();
        assert_eq!(e.0, "configmap \"cfg\" not found");
    }

    #[test]
    fn downward_api_volumes_carry_fields_labels_and_resources() {
        let dir = tempfile::tempdir().unwrap();
        let p = pod(
            "metadata: {name: p, namespace: ns, labels: {app: web, tier: front}}\nspec:\n  containers: [{name: c, resources: {limits: {memory: 64Mi}}}]\n  volumes:\n  - name: d\n    downwardAPI:\n      items:\n      - {path: name, fieldRef: {fieldPath: metadata.name}}\n      - {path: labels, fieldRef: {fieldPath: metadata.labels}}\n      - {path: mem, resourceFieldRef: {containerName: c, resource: limits.memory, divisor: 1Mi}}\n",
        );
        let mut s = sb();
        s.pod_dir = dir.path().to_path_buf();
        let d = volume_dir(&p, &s, "d").unwrap();
        let read = |f: &str| std::fs::read_to_string(format!("{d}/{f}")).unwrap();
        assert_eq!(read("name"), "p");
        assert_eq!(read("labels"), "app=\"web\"\ntier=\"front\"");
        assert_eq!(read("mem"), "64");
    }

    #[test]
    fn the_service_account_volume_holds_token_ca_and_namespace_and_env_names_the_api() {
        let dir = tempfile::tempdir().unwrap();
        let p = pod(
            "metadata: {name: p, namespace: team}\nspec:\n  containers: [{name: c}]\n  volumes:\n  - name: kube-api-access-abcde\n    projected:\n      sources:\n      - serviceAccountToken: {expirationSeconds: 3607, path: token}\n      - configMap: {name: kube-root-ca.crt, items: [{key: ca.crt, path: ca.crt}]}\n      - downwardAPI: {items: [{path: namespace, fieldRef: {fieldPath: metadata.namespace}}]}\n",
        );
        let mut s = sb();
        s.pod_dir = dir.path().to_path_buf();
        let ca: ConfigMap = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "kube-root-ca.crt"}, "data": {"ca.crt": "PEM"}}))
        .unwrap();
        s.refs.config_maps.insert("kube-root-ca.crt".into(), ca);
        // No token yet: kubelet's mount error, nothing written.
        let e = volume_dir(&p, &s, "kube-api-access-abcde").unwrap_err();
        assert!(e.0.contains("failed to fetch token"), "{}", e.0);
        s.refs.tokens.insert(
            String::new(),
            Token {
                token: "keelson-sa.x.y".into(),
                fetched: std::time::Instant::now(),
                ttl: std::time::Duration::from_secs(3607),
            },
        );
        let v = volume_dir(&p, &s, "kube-api-access-abcde").unwrap();
        let read = |f: &str| std::fs::read_to_string(format!("{v}/{f}")).unwrap();
        assert_eq!(read("token"), "keelson-sa.x.y");
        assert_eq!(read("ca.crt"), "PEM");
        assert_eq!(read("namespace"), "team");
        assert!(!s.refs.tokens[""].stale());
        assert_eq!(token_requests(&p), vec![(String::new(), 3607)]);
        // The master service environment, which the container's own variables override.
        s.refs.kubernetes = Some(("10.96.0.1".into(), 443));
        let c: Container = serde_saphyr::from_str(
            "name: c\nenv: [{name: KUBERNETES_SERVICE_HOST, value: 10.0.0.9}]",
        )
        .unwrap();
        let env = environment(&p, &c, &img(), &s).unwrap();
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("KUBERNETES_SERVICE_HOST"), Some("10.0.0.9"));
        assert_eq!(get("KUBERNETES_SERVICE_PORT"), Some("443"));
        assert_eq!(get("KUBERNETES_PORT_443_TCP_ADDR"), Some("10.96.0.1"));
    }

    #[test]
    fn configmap_and_secret_volumes_are_projected_with_items_and_modes() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = pod(
            "metadata: {name: p}\nspec:\n  containers: [{name: c}]\n  volumes:\n  - {name: a, configMap: {name: cfg, items: [{key: color, path: sub/colour, mode: 384}]}}\n  - {name: b, secret: {secretName: pw, defaultMode: 256}}\n",
        );
        let mut s = sb();
        s.pod_dir = dir.path().to_path_buf();
        s.refs = refs();
        let a = volume_dir(&p, &s, "a").unwrap();
        assert_eq!(
            std::fs::read_to_string(format!("{a}/sub/colour")).unwrap(),
            "blue"
        );
        assert!(
            !Path::new(&format!("{a}/size")).exists(),
            "only the listed items"
        );
        let mode = std::fs::metadata(format!("{a}/sub/colour"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let b = volume_dir(&p, &s, "b").unwrap();
        assert_eq!(
            std::fs::read_to_string(format!("{b}/pass")).unwrap(),
            "s3cr3t"
        );
        let mode = std::fs::metadata(format!("{b}/pass"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o400);
        s.refs = Refs::default();
        let e = volume_dir(&p, &s, "b").unwrap_err();
        assert!(e.0.contains("secret \"pw\" not found"), "{}", e.0);
    }

    #[test]
    fn var_references_expand_and_dollar_dollar_escapes() {
        let v: HashMap<String, String> = [("A".to_string(), "1".to_string())].into();
        assert_eq!(expand("x$(A)y$(B)$$(A)", &v), "x1y$(B)$(A)");
    }

    #[test]
    fn command_replaces_entrypoint_and_args_replace_cmd() {
        let p = pod(
            "metadata: {name: p}\nspec:\n  containers:\n  - name: c\n    image: b\n    args: [\"-c\", \"echo $(A)\"]\n",
        );
        let c = &p.spec.as_ref().unwrap().containers[0];
        let env: HashMap<String, String> = [("A".to_string(), "z".to_string())].into();
        assert_eq!(argv(c, &img(), &env), vec!["/bin/sh", "-c", "echo z"]);
        let p = pod(
            "metadata: {name: p}\nspec:\n  containers:\n  - name: c\n    image: b\n    command: [sleep]\n",
        );
        assert_eq!(
            argv(&p.spec.as_ref().unwrap().containers[0], &img(), &env),
            vec!["sleep"]
        );
    }

    #[test]
    fn env_overrides_image_env_and_resolves_field_refs() {
        let p = pod(
            "metadata: {name: p, namespace: ns1, labels: {app: web}}\nspec:\n  containers:\n  - name: c\n    image: b\n    env:\n    - {name: A, value: mine}\n    - {name: B, value: \"$(A)-x\"}\n    - name: IP\n      valueFrom: {fieldRef: {fieldPath: status.podIP}}\n    - name: APP\n      valueFrom: {fieldRef: {fieldPath: \"metadata.labels['app']\"}}\n    - name: MEM\n      valueFrom: {resourceFieldRef: {resource: limits.memory, divisor: 1Mi}}\n    resources: {limits: {memory: 64Mi}}\n",
        );
        let c = &p.spec.as_ref().unwrap().containers[0];
        let env: HashMap<_, _> = environment(&p, c, &img(), &sb())
            .unwrap()
            .into_iter()
            .collect();
        assert_eq!(env["A"], "mine");
        assert_eq!(env["B"], "mine-x");
        assert_eq!(env["IP"], "10.1.0.5");
        assert_eq!(env["APP"], "web");
        assert_eq!(env["MEM"], "64");
        assert_eq!(env["PATH"], "/bin");
    }

    #[test]
    fn resources_become_cgroup_limits_like_kubelet() {
        let p = pod(
            "metadata: {name: p}\nspec:\n  containers:\n  - name: c\n    image: b\n    resources: {limits: {memory: 32Mi, cpu: 250m}, requests: {cpu: 100m}}\n    securityContext: {runAsUser: 1000, readOnlyRootFilesystem: true, capabilities: {add: [NET_ADMIN]}}\n",
        );
        let c = &p.spec.as_ref().unwrap().containers[0];
        let rc = runtime_config(&p, c, &img(), &sb(), "cid", Path::new("/tmp/t")).unwrap();
        assert_eq!(rc.memory_limit, Some(32 << 20));
        assert_eq!(rc.cpu_quota, Some(25_000));
        assert_eq!(rc.cpu_shares, Some(102));
        assert_eq!(rc.process.uid, 1000);
        assert!(rc.readonly_rootfs);
        assert_eq!(rc.net, Ns::Join("/proc/42/ns/net".into()));
        assert_eq!(rc.hostname, "p");
    }

    #[test]
    fn secret_refs_without_an_api_server_are_config_errors() {
        let p = pod(
            "metadata: {name: p}\nspec:\n  containers:\n  - name: c\n    image: b\n    env:\n    - name: S\n      valueFrom: {secretKeyRef: {name: s, key: k}}\n",
        );
        let c = &p.spec.as_ref().unwrap().containers[0];
        let e = environment(&p, c, &img(), &sb()).unwrap_err();
        assert!(e.to_string().contains("secret \"s\""));
    }
}
