//! Builds OCI runtime specs (config.json) for sandbox and app containers.
//! Pure data: no containerd, no kernel calls. Every field runc reads is set explicitly,
//! because `oci_spec::runtime::Spec::default()` carries youki's defaults (hostname, read-only root).

use std::{path::PathBuf, str::FromStr};

use oci_spec::runtime::{
    Capability, LinuxCapabilitiesBuilder, LinuxCpuBuilder, LinuxMemoryBuilder,
    LinuxNamespaceBuilder, LinuxNamespaceType, LinuxResourcesBuilder, MountBuilder, RootBuilder,
    Spec, UserBuilder,
};

/// containerd's default capability set for unprivileged containers.
pub const DEFAULT_CAPS: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "FSETID",
    "FOWNER",
    "MKNOD",
    "NET_RAW",
    "SETGID",
    "SETUID",
    "SETFCAP",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "KILL",
    "AUDIT_WRITE",
];

/// Every capability Linux defines (what `privileged` and `add: [ALL]` grant).
pub const ALL_CAPS: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// A bind or special mount inside the container.
#[derive(Debug, Clone, PartialEq)]
pub struct MountSpec {
    pub destination: String,
    pub source: String,
    pub typ: String,
    pub options: Vec<String>,
}

impl MountSpec {
    pub fn bind(source: impl Into<String>, destination: impl Into<String>, readonly: bool) -> Self {
        let mut options = vec!["rbind".to_string(), "rprivate".to_string()];
        options.push(if readonly { "ro" } else { "rw" }.to_string());
        Self {
            destination: destination.into(),
            source: source.into(),
            typ: "bind".into(),
            options,
        }
    }
}

/// Which namespace a container joins: a fresh one, or an existing one by path.
#[derive(Debug, Clone, PartialEq)]
pub enum Ns {
    New,
    Join(String),
    /// Share the host's (no entry in the spec).
    Host,
}

/// Everything runc needs to know about one container process, already resolved.
#[derive(Debug, Clone, Default)]
pub struct ProcessConfig {
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
    pub privileged: bool,
    pub cap_add: Vec<String>,
    pub cap_drop: Vec<String>,
    pub no_new_privileges: bool,
    pub terminal: bool,
}

/// The OCI annotation by which containerd's runc v2 shim groups containers into one shim.
pub const SHIM_GROUP: &str = "io.containerd.runc.v2.group";

/// Puts the container into the shim group `group` (the pod's sandbox ID): a pod's containers
/// then share one shim process, as with the CRI plugin, instead of one shim each.
pub fn set_shim_group(spec: &mut Spec, group: &str) {
    let mut a = spec.annotations().clone().unwrap_or_default();
    a.insert(SHIM_GROUP.to_string(), group.to_string());
    spec.set_annotations(Some(a));
}

/// A container's runtime configuration.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    pub process: ProcessConfig,
    pub hostname: String,
    pub readonly_rootfs: bool,
    pub mounts: Vec<MountSpec>,
    pub net: Ns,
    pub ipc: Ns,
    pub uts: Ns,
    pub pid: Ns,
    pub cgroups_path: String,
    pub memory_limit: Option<i64>,
    pub cpu_quota: Option<i64>,
    pub cpu_period: Option<u64>,
    pub cpu_shares: Option<u64>,
    pub oom_score_adj: Option<i32>,
    /// The seccomp filter (none for privileged containers, whatever this says).
    pub seccomp: super::seccomp::Profile,
}

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("unknown capability {0:?}")]
    Capability(String),
    #[error("building the runtime spec: {0}")]
    Build(#[from] oci_spec::OciSpecError),
}

fn cap(name: &str) -> Result<Capability, SpecError> {
    let n = name.trim().to_ascii_uppercase();
    let n = n.strip_prefix("CAP_").unwrap_or(&n);
    Capability::from_str(n).map_err(|_| SpecError::Capability(name.to_string()))
}

/// This process's capability bounding set (`CapBnd` in /proc/self/status; every bit when it
/// cannot be read).
fn bounding_set() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapBnd:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(u64::MAX)
}

/// The effective capability set: defaults + add − drop ("ALL" honoured), or everything when
/// privileged. "Everything" is what this process may grant (its bounding set), as containerd's
/// CRI does: a capability the host withholds would make runc fail the container.
pub fn capabilities(p: &ProcessConfig) -> Result<Vec<Capability>, SpecError> {
    let all = || {
        let bnd = bounding_set();
        ALL_CAPS
            .iter()
            .enumerate()
            .filter(|(bit, _)| bnd & (1u64 << bit) != 0)
            .filter_map(|(_, c)| cap(c).ok())
            .collect::<Vec<_>>()
    };
    if p.privileged {
        return Ok(all());
    }
    let mut set: Vec<Capability> = if p.cap_drop.iter().any(|c| c.eq_ignore_ascii_case("ALL")) {
        vec![]
    } else {
        DEFAULT_CAPS
            .iter()
            .map(|c| cap(c))
            .collect::<Result<_, _>>()?
    };
    if p.cap_add.iter().any(|c| c.eq_ignore_ascii_case("ALL")) {
        set = all();
    } else {
        for c in &p.cap_add {
            let c = cap(c)?;
            if !set.contains(&c) {
                set.push(c);
            }
        }
    }
    for c in p.cap_drop.iter().filter(|c| !c.eq_ignore_ascii_case("ALL")) {
        let c = cap(c)?;
        set.retain(|x| *x != c);
    }
    Ok(set)
}

/// The process part of a spec (also used for exec processes).
pub fn process(p: &ProcessConfig) -> Result<oci_spec::runtime::Process, SpecError> {
    let caps: std::collections::HashSet<Capability> = capabilities(p)?.into_iter().collect();
    let mut proc = oci_spec::runtime::Process::default();
    proc.set_terminal(Some(p.terminal));
    proc.set_args(Some(p.args.clone()));
    proc.set_env(Some(p.env.clone()));
    proc.set_cwd(PathBuf::from(if p.cwd.is_empty() { "/" } else { &p.cwd }));
    let mut user = UserBuilder::default().uid(p.uid).gid(p.gid);
    if !p.additional_gids.is_empty() {
        user = user.additional_gids(p.additional_gids.clone());
    }
    proc.set_user(user.build()?);
    proc.set_capabilities(Some(
        LinuxCapabilitiesBuilder::default()
            .bounding(caps.clone())
            .effective(caps.clone())
            .permitted(caps)
            .inheritable(std::collections::HashSet::new())
            .ambient(std::collections::HashSet::new())
            .build()?,
    ));
    proc.set_no_new_privileges(Some(p.no_new_privileges));
    proc.set_rlimits(None);
    Ok(proc)
}

/// Builds the full runtime spec for a container.
pub fn build(c: &RuntimeConfig) -> Result<Spec, SpecError> {
    let mut spec = Spec::default();
    let mut proc = process(&c.process)?;
    proc.set_oom_score_adj(c.oom_score_adj);
    spec.set_process(Some(proc));
    // Only a container with its own UTS namespace may (and does) set a hostname: never write
    // the hostname of a namespace that is shared with the host.
    let own_uts = matches!(c.uts, Ns::New);
    spec.set_hostname((own_uts && !c.hostname.is_empty()).then(|| c.hostname.clone()));
    spec.set_root(Some(
        RootBuilder::default()
            .path("rootfs")
            .readonly(c.readonly_rootfs)
            .build()?,
    ));
    let mut mounts = oci_spec::runtime::get_default_mounts();
    // /sys read-only unless privileged, as containerd does.
    for m in mounts.iter_mut() {
        if m.destination() == &PathBuf::from("/sys") && c.process.privileged {
            m.set_options(Some(vec![
                "nosuid".into(),
                "noexec".into(),
                "nodev".into(),
                "rw".into(),
            ]));
        }
    }
    mounts.retain(|m| {
        !c.mounts
            .iter()
            .any(|x| std::path::Path::new(&x.destination) == m.destination())
    });
    for m in &c.mounts {
        mounts.push(
            MountBuilder::default()
                .destination(&m.destination)
                .source(&m.source)
                .typ(&m.typ)
                .options(m.options.clone())
                .build()?,
        );
    }
    spec.set_mounts(Some(mounts));

    let mut namespaces = vec![
        LinuxNamespaceBuilder::default()
            .typ(LinuxNamespaceType::Mount)
            .build()?,
    ];
    for (typ, ns) in [
        (LinuxNamespaceType::Network, &c.net),
        (LinuxNamespaceType::Ipc, &c.ipc),
        (LinuxNamespaceType::Uts, &c.uts),
        (LinuxNamespaceType::Pid, &c.pid),
    ] {
        match ns {
            Ns::Host => {}
            Ns::New => namespaces.push(LinuxNamespaceBuilder::default().typ(typ).build()?),
            Ns::Join(path) => namespaces.push(
                LinuxNamespaceBuilder::default()
                    .typ(typ)
                    .path(path)
                    .build()?,
            ),
        }
    }
    let mut resources = LinuxResourcesBuilder::default();
    if let Some(limit) = c.memory_limit {
        resources = resources.memory(
            LinuxMemoryBuilder::default()
                .limit(limit)
                .swap(limit)
                .build()?,
        );
    }
    let mut cpu = LinuxCpuBuilder::default();
    if let Some(q) = c.cpu_quota {
        cpu = cpu.quota(q).period(c.cpu_period.unwrap_or(100_000));
    }
    if let Some(s) = c.cpu_shares {
        cpu = cpu.shares(s);
    }
    resources = resources.cpu(cpu.build()?);
    let linux = spec.linux_mut().get_or_insert_with(Default::default);
    linux.set_namespaces(Some(namespaces));
    linux.set_resources(Some(resources.build()?));
    linux.set_cgroups_path(Some(PathBuf::from(&c.cgroups_path)));
    if c.process.privileged {
        linux.set_masked_paths(None);
        linux.set_readonly_paths(None);
    } else {
        // containerd masks the RAPL energy counters too (a side channel on the host's CPUs).
        let mut masked = linux.masked_paths().clone().unwrap_or_default();
        masked.push("/sys/devices/virtual/powercap".into());
        linux.set_masked_paths(Some(masked));
        let bounding: Vec<String> = spec
            .process()
            .as_ref()
            .and_then(|p| p.capabilities().as_ref())
            .and_then(|c| c.bounding().as_ref())
            .map(|b| b.iter().map(|c| format!("CAP_{c}")).collect())
            .unwrap_or_default();
        let seccomp = match &c.seccomp {
            super::seccomp::Profile::Unconfined => None,
            super::seccomp::Profile::RuntimeDefault => {
                Some(super::seccomp::runtime_default(&bounding))
            }
            super::seccomp::Profile::Custom(p) => Some((**p).clone()),
        };
        if let Some(linux) = spec.linux_mut().as_mut() {
            linux.set_seccomp(seccomp);
        }
    }
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pc() -> ProcessConfig {
        ProcessConfig {
            args: vec!["sh".into()],
            ..Default::default()
        }
    }

    #[test]
    fn a_private_uts_namespace_gets_the_hostname() {
        let c = RuntimeConfig {
            process: pc(),
            hostname: "web".into(),
            readonly_rootfs: false,
            mounts: vec![],
            net: Ns::New,
            ipc: Ns::New,
            uts: Ns::New,
            pid: Ns::New,
            cgroups_path: "/keelson/x".into(),
            memory_limit: None,
            cpu_quota: None,
            cpu_period: None,
            cpu_shares: None,
            oom_score_adj: None,
            seccomp: Default::default(),
        };
        let v = serde_json::to_value(build(&c).unwrap()).unwrap();
        assert_eq!(v["hostname"], "web");
        let host = RuntimeConfig { uts: Ns::Host, ..c };
        let v = serde_json::to_value(build(&host).unwrap()).unwrap();
        assert!(v.get("hostname").is_none());
    }

    #[test]
    fn capabilities_add_and_drop_from_the_default_set() {
        let mut p = pc();
        p.cap_add = vec!["NET_ADMIN".into()];
        p.cap_drop = vec!["CAP_CHOWN".into()];
        let caps = capabilities(&p).unwrap();
        assert!(caps.contains(&Capability::NetAdmin));
        assert!(!caps.contains(&Capability::Chown));
        assert!(caps.contains(&Capability::Kill));
    }

    #[test]
    fn drop_all_leaves_only_added_capabilities() {
        let mut p = pc();
        p.cap_drop = vec!["ALL".into()];
        p.cap_add = vec!["NET_BIND_SERVICE".into()];
        assert_eq!(capabilities(&p).unwrap(), vec![Capability::NetBindService]);
    }

    #[test]
    fn an_unknown_capability_is_named_in_the_error() {
        let mut p = pc();
        p.cap_add = vec!["FLY".into()];
        assert!(capabilities(&p).unwrap_err().to_string().contains("FLY"));
    }

    #[test]
    fn spec_joins_given_namespaces_and_sets_limits() {
        let c = RuntimeConfig {
            process: pc(),
            hostname: "web".into(),
            readonly_rootfs: true,
            mounts: vec![MountSpec::bind("/tmp/x", "/data", false)],
            net: Ns::Join("/proc/1/ns/net".into()),
            ipc: Ns::Join("/proc/1/ns/ipc".into()),
            uts: Ns::Join("/proc/1/ns/uts".into()),
            pid: Ns::New,
            cgroups_path: "/keelson/abc".into(),
            memory_limit: Some(64 << 20),
            cpu_quota: Some(50_000),
            cpu_period: None,
            cpu_shares: Some(512),
            oom_score_adj: None,
            seccomp: Default::default(),
        };
        let v = serde_json::to_value(build(&c).unwrap()).unwrap();
        assert_eq!(v["root"]["readonly"], true);
        assert_eq!(v["linux"]["resources"]["memory"]["limit"], 64 << 20);
        assert_eq!(v["linux"]["resources"]["cpu"]["quota"], 50_000);
        let ns = v["linux"]["namespaces"].as_array().unwrap();
        assert!(
            ns.iter()
                .any(|n| n["type"] == "network" && n["path"] == "/proc/1/ns/net")
        );
        assert!(
            ns.iter()
                .any(|n| n["type"] == "pid" && n.get("path").is_none())
        );
        assert!(
            v["mounts"]
                .as_array()
                .unwrap()
                .iter()
                .any(|m| m["destination"] == "/data")
        );
    }
}
