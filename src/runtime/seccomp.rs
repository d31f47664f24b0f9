//! Seccomp filters for containers, as a pod's `securityContext.seccompProfile` asks:
//! `RuntimeDefault` gets containerd's default profile (an allow-list; everything else fails
//! with EPERM, and privileged syscalls are allowed only with the capability that governs them),
//! `Localhost` a profile file from the node's seccomp directory (OCI JSON), `Unconfined` none.
//! Pure data: no containerd, no kernel calls.

use std::path::{Path, PathBuf};

use oci_spec::runtime::LinuxSeccomp;
use serde_json::{Value, json};

/// What a container's seccomp should be.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum Profile {
    /// No filter (Kubernetes' default when a pod says nothing, and every privileged container).
    #[default]
    Unconfined,
    /// containerd's default profile.
    RuntimeDefault,
    /// A profile read from a file (`Localhost`).
    Custom(Box<LinuxSeccomp>),
}

/// The syscalls containerd's default profile allows to every container (x86-64 and its
/// 32-bit ABIs; names the kernel lacks are skipped by runc).
const ALLOWED: &[&str] = &[
    "accept",
    "accept4",
    "access",
    "adjtimex",
    "alarm",
    "bind",
    "brk",
    "cachestat",
    "capget",
    "capset",
    "chdir",
    "chmod",
    "chown",
    "chown32",
    "clock_adjtime",
    "clock_adjtime64",
    "clock_getres",
    "clock_getres_time64",
    "clock_gettime",
    "clock_gettime64",
    "clock_nanosleep",
    "clock_nanosleep_time64",
    "close",
    "close_range",
    "connect",
    "copy_file_range",
    "creat",
    "dup",
    "dup2",
    "dup3",
    "epoll_create",
    "epoll_create1",
    "epoll_ctl",
    "epoll_ctl_old",
    "epoll_pwait",
    "epoll_pwait2",
    "epoll_wait",
    "epoll_wait_old",
    "eventfd",
    "eventfd2",
    "execve",
    "execveat",
    "exit",
    "exit_group",
    "faccessat",
    "faccessat2",
    "fadvise64",
    "fadvise64_64",
    "fallocate",
    "fanotify_mark",
    "fchdir",
    "fchmod",
    "fchmodat",
    "fchmodat2",
    "fchown",
    "fchown32",
    "fchownat",
    "fcntl",
    "fcntl64",
    "fdatasync",
    "fgetxattr",
    "flistxattr",
    "flock",
    "fork",
    "fremovexattr",
    "fsetxattr",
    "fstat",
    "fstat64",
    "fstatat64",
    "fstatfs",
    "fstatfs64",
    "fsync",
    "ftruncate",
    "ftruncate64",
    "futex",
    "futex_requeue",
    "futex_time64",
    "futex_wait",
    "futex_waitv",
    "futex_wake",
    "futimesat",
    "getcpu",
    "getcwd",
    "getdents",
    "getdents64",
    "getegid",
    "getegid32",
    "geteuid",
    "geteuid32",
    "getgid",
    "getgid32",
    "getgroups",
    "getgroups32",
    "getitimer",
    "getpeername",
    "getpgid",
    "getpgrp",
    "getpid",
    "getppid",
    "getpriority",
    "getrandom",
    "getresgid",
    "getresgid32",
    "getresuid",
    "getresuid32",
    "getrlimit",
    "get_robust_list",
    "getrusage",
    "getsid",
    "getsockname",
    "getsockopt",
    "get_thread_area",
    "gettid",
    "gettimeofday",
    "getuid",
    "getuid32",
    "getxattr",
    "inotify_add_watch",
    "inotify_init",
    "inotify_init1",
    "inotify_rm_watch",
    "io_cancel",
    "ioctl",
    "io_destroy",
    "io_getevents",
    "io_pgetevents",
    "io_pgetevents_time64",
    "ioprio_get",
    "ioprio_set",
    "io_setup",
    "io_submit",
    "ipc",
    "kill",
    "landlock_add_rule",
    "landlock_create_ruleset",
    "landlock_restrict_self",
    "lchown",
    "lchown32",
    "lgetxattr",
    "link",
    "linkat",
    "listen",
    "listxattr",
    "llistxattr",
    "_llseek",
    "lremovexattr",
    "lseek",
    "lsetxattr",
    "lstat",
    "lstat64",
    "madvise",
    "map_shadow_stack",
    "membarrier",
    "memfd_create",
    "memfd_secret",
    "mincore",
    "mkdir",
    "mkdirat",
    "mknod",
    "mknodat",
    "mlock",
    "mlock2",
    "mlockall",
    "mmap",
    "mmap2",
    "mprotect",
    "mq_getsetattr",
    "mq_notify",
    "mq_open",
    "mq_timedreceive",
    "mq_timedreceive_time64",
    "mq_timedsend",
    "mq_timedsend_time64",
    "mq_unlink",
    "mremap",
    "msgctl",
    "msgget",
    "msgrcv",
    "msgsnd",
    "msync",
    "munlock",
    "munlockall",
    "munmap",
    "name_to_handle_at",
    "nanosleep",
    "newfstatat",
    "_newselect",
    "open",
    "openat",
    "openat2",
    "pause",
    "pidfd_open",
    "pidfd_send_signal",
    "pipe",
    "pipe2",
    "pkey_alloc",
    "pkey_free",
    "pkey_mprotect",
    "poll",
    "ppoll",
    "ppoll_time64",
    "prctl",
    "pread64",
    "preadv",
    "preadv2",
    "prlimit64",
    "process_mrelease",
    "pselect6",
    "pselect6_time64",
    "pwrite64",
    "pwritev",
    "pwritev2",
    "read",
    "readahead",
    "readlink",
    "readlinkat",
    "readv",
    "recv",
    "recvfrom",
    "recvmmsg",
    "recvmmsg_time64",
    "recvmsg",
    "remap_file_pages",
    "removexattr",
    "rename",
    "renameat",
    "renameat2",
    "restart_syscall",
    "rmdir",
    "rseq",
    "rt_sigaction",
    "rt_sigpending",
    "rt_sigprocmask",
    "rt_sigqueueinfo",
    "rt_sigreturn",
    "rt_sigsuspend",
    "rt_sigtimedwait",
    "rt_sigtimedwait_time64",
    "rt_tgsigqueueinfo",
    "sched_getaffinity",
    "sched_getattr",
    "sched_getparam",
    "sched_get_priority_max",
    "sched_get_priority_min",
    "sched_getscheduler",
    "sched_rr_get_interval",
    "sched_rr_get_interval_time64",
    "sched_setaffinity",
    "sched_setattr",
    "sched_setparam",
    "sched_setscheduler",
    "sched_yield",
    "seccomp",
    "select",
    "semctl",
    "semget",
    "semop",
    "semtimedop",
    "semtimedop_time64",
    "send",
    "sendfile",
    "sendfile64",
    "sendmmsg",
    "sendmsg",
    "sendto",
    "setfsgid",
    "setfsgid32",
    "setfsuid",
    "setfsuid32",
    "setgid",
    "setgid32",
    "setgroups",
    "setgroups32",
    "setitimer",
    "setpgid",
    "setpriority",
    "setregid",
    "setregid32",
    "setresgid",
    "setresgid32",
    "setresuid",
    "setresuid32",
    "setreuid",
    "setreuid32",
    "setrlimit",
    "set_robust_list",
    "setsid",
    "setsockopt",
    "set_thread_area",
    "set_tid_address",
    "setuid",
    "setuid32",
    "setxattr",
    "shmat",
    "shmctl",
    "shmdt",
    "shmget",
    "shutdown",
    "sigaltstack",
    "signalfd",
    "signalfd4",
    "sigprocmask",
    "sigreturn",
    "socket",
    "socketcall",
    "socketpair",
    "splice",
    "stat",
    "stat64",
    "statfs",
    "statfs64",
    "statx",
    "symlink",
    "symlinkat",
    "sync",
    "sync_file_range",
    "syncfs",
    "sysinfo",
    "tee",
    "tgkill",
    "time",
    "timer_create",
    "timer_delete",
    "timer_getoverrun",
    "timer_gettime",
    "timer_gettime64",
    "timer_settime",
    "timer_settime64",
    "timerfd_create",
    "timerfd_gettime",
    "timerfd_gettime64",
    "timerfd_settime",
    "timerfd_settime64",
    "times",
    "tkill",
    "truncate",
    "truncate64",
    "ugetrlimit",
    "umask",
    "uname",
    "unlink",
    "unlinkat",
    "utime",
    "utimensat",
    "utimensat_time64",
    "utimes",
    "vfork",
    "vmsplice",
    "wait4",
    "waitid",
    "waitpid",
    "write",
    "writev",
    // x86-64 only.
    "arch_prctl",
    "modify_ldt",
];

/// Syscalls allowed only when the container's bounding set has the capability.
const BY_CAPABILITY: &[(&str, &[&str])] = &[
    ("CAP_DAC_READ_SEARCH", &["open_by_handle_at"]),
    (
        "CAP_SYS_ADMIN",
        &[
            "bpf",
            "clone",
            "clone3",
            "fanotify_init",
            "fsconfig",
            "fsmount",
            "fsopen",
            "fspick",
            "lookup_dcookie",
            "mount",
            "mount_setattr",
            "move_mount",
            "open_tree",
            "perf_event_open",
            "quotactl",
            "quotactl_fd",
            "setdomainname",
            "sethostname",
            "setns",
            "syslog",
            "umount",
            "umount2",
            "unshare",
        ],
    ),
    ("CAP_SYS_BOOT", &["reboot"]),
    ("CAP_SYS_CHROOT", &["chroot"]),
    (
        "CAP_SYS_MODULE",
        &["delete_module", "init_module", "finit_module"],
    ),
    ("CAP_SYS_PACCT", &["acct"]),
    (
        "CAP_SYS_PTRACE",
        &[
            "kcmp",
            "pidfd_getfd",
            "process_madvise",
            "process_vm_readv",
            "process_vm_writev",
            "ptrace",
        ],
    ),
    ("CAP_SYS_RAWIO", &["iopl", "ioperm"]),
    (
        "CAP_SYS_TIME",
        &["settimeofday", "stime", "clock_settime", "clock_settime64"],
    ),
    ("CAP_SYS_TTY_CONFIG", &["vhangup"]),
    (
        "CAP_SYS_NICE",
        &[
            "get_mempolicy",
            "mbind",
            "set_mempolicy",
            "set_mempolicy_home_node",
        ],
    ),
    ("CAP_SYSLOG", &["syslog"]),
    ("CAP_BPF", &["bpf"]),
    ("CAP_PERFMON", &["perf_event_open"]),
];

/// The namespace flags of clone(2): creating namespaces needs CAP_SYS_ADMIN.
const CLONE_NAMESPACES: u64 = 0x0002_0000 // CLONE_NEWNS
    | 0x0200_0000 // CLONE_NEWCGROUP
    | 0x0400_0000 // CLONE_NEWUTS
    | 0x0800_0000 // CLONE_NEWIPC
    | 0x1000_0000 // CLONE_NEWUSER
    | 0x2000_0000 // CLONE_NEWPID
    | 0x4000_0000; // CLONE_NEWNET
const EPERM: u32 = 1;
const ENOSYS: u32 = 38;

/// containerd's default profile for a container whose bounding set is `bounding`
/// (`CAP_*` names).
pub fn runtime_default(bounding: &[String]) -> LinuxSeccomp {
    let has = |c: &str| bounding.iter().any(|b| b == c);
    let allow = |names: Vec<&str>| json!({"names": names, "action": "SCMP_ACT_ALLOW"});
    let mut rules = vec![allow(ALLOWED.to_vec())];
    // personality(2): only the harmless personas (Linux, its 32-bit view, and the query).
    for persona in [0x0u64, 0x0008, 0x2_0000, 0x2_0008, 0xffff_ffff] {
        rules.push(json!({"names": ["personality"], "action": "SCMP_ACT_ALLOW",
                          "args": [{"index": 0, "value": persona, "op": "SCMP_CMP_EQ"}]}));
    }
    for (cap, names) in BY_CAPABILITY {
        if has(cap) {
            rules.push(allow(names.to_vec()));
        }
    }
    if !has("CAP_SYS_ADMIN") {
        // clone without namespace flags; clone3 answers ENOSYS so libc falls back to clone,
        // whose flags this filter can see.
        rules.push(json!({"names": ["clone"], "action": "SCMP_ACT_ALLOW",
                          "args": [{"index": 0, "value": CLONE_NAMESPACES, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}]}));
        rules.push(json!({"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": ENOSYS}));
    }
    let v = json!({
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": EPERM,
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": rules,
    });
    // The shape above is fixed; it always decodes.
    serde_json::from_value(v).unwrap_or_else(|e| unreachable!("seccomp profile: {e}"))
}

/// Why a profile cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("seccomp profile {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("seccomp profile {path}: not an OCI seccomp profile: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("localhostProfile {0:?} must be a relative path below the node's seccomp directory")]
    Outside(String),
}

/// The file a `Localhost` profile names: `rel` below `dir` (kubelet's seccomp directory),
/// never outside it.
pub fn localhost_path(dir: &Path, rel: &str) -> Result<PathBuf, ProfileError> {
    if rel.is_empty() || rel.starts_with('/') || rel.split('/').any(|p| p == "..") {
        return Err(ProfileError::Outside(rel.to_string()));
    }
    Ok(dir.join(rel))
}

/// A profile file in OCI JSON (`defaultAction`, `syscalls`, ...).
pub fn localhost(path: &Path) -> Result<LinuxSeccomp, ProfileError> {
    let text = std::fs::read(path).map_err(|source| ProfileError::Read {
        path: path.into(),
        source,
    })?;
    let v: Value = serde_json::from_slice(&text).map_err(|e| ProfileError::Parse {
        path: path.into(),
        message: e.to_string(),
    })?;
    serde_json::from_value(v).map_err(|e| ProfileError::Parse {
        path: path.into(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(p: &LinuxSeccomp, name: &str) -> bool {
        p.syscalls().iter().flatten().any(|s| {
            s.names().iter().any(|n| n == name)
                && s.action() == oci_spec::runtime::LinuxSeccompAction::ScmpActAllow
                && s.args().as_ref().is_none_or(|a| a.is_empty())
        })
    }

    #[test]
    fn the_default_profile_denies_namespaces_and_keys_unless_capable() {
        let p = runtime_default(&["CAP_CHOWN".into()]);
        assert_eq!(
            p.default_action(),
            oci_spec::runtime::LinuxSeccompAction::ScmpActErrno
        );
        assert_eq!(p.default_errno_ret(), Some(EPERM));
        for ok in ["read", "execve", "clock_gettime", "rseq", "close_range"] {
            assert!(allowed(&p, ok), "{ok}");
        }
        for denied in [
            "unshare", "keyctl", "add_key", "mount", "setns", "bpf", "ptrace", "reboot",
        ] {
            assert!(!allowed(&p, denied), "{denied}");
        }
        let admin = runtime_default(&["CAP_SYS_ADMIN".into()]);
        assert!(allowed(&admin, "unshare") && allowed(&admin, "mount"));
        assert!(!allowed(&admin, "keyctl"), "keyctl stays denied");
        // Spec JSON as runc reads it.
        let text = serde_json::to_string(&p).unwrap();
        assert!(
            text.contains("\"defaultAction\":\"SCMP_ACT_ERRNO\""),
            "{text}"
        );
        assert!(text.contains("SCMP_CMP_MASKED_EQ"), "{text}");
    }

    #[test]
    fn localhost_profiles_stay_in_their_directory() {
        let d = tempfile::tempdir().unwrap();
        assert!(localhost_path(d.path(), "../etc/x.json").is_err());
        assert!(localhost_path(d.path(), "/etc/x.json").is_err());
        let f = localhost_path(d.path(), "profiles/audit.json").unwrap();
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(&f, r#"{"defaultAction": "SCMP_ACT_LOG"}"#).unwrap();
        assert!(localhost(&f).is_ok());
        std::fs::write(&f, "nope").unwrap();
        assert!(
            localhost(&f)
                .unwrap_err()
                .to_string()
                .contains("audit.json")
        );
    }
}
