//! File operations the agent does as root inside directories that a pod can write (volumes):
//! every step resolves beneath a directory descriptor and never follows a symlink out of it,
//! so a container cannot point the agent at the node's files (the CVE-2017-1002101 /
//! CVE-2021-25741 subPath class and the CVE-2017-1002102 AtomicWriter class).
//! Never touches the API server or containerd.

use std::{
    ffi::OsStr,
    io,
    os::fd::{AsFd, AsRawFd, OwnedFd},
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use nix::{
    errno::Errno,
    fcntl::{OFlag, OpenHow, ResolveFlag, openat, openat2},
    sys::stat::{FileStat, Mode, SFlag, fstat, fstatat, mkdirat},
    unistd::{UnlinkatFlags, unlinkat},
};

fn io_err(what: impl std::fmt::Display, e: Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32).wrap(what)
}

trait Wrap {
    fn wrap(self, what: impl std::fmt::Display) -> io::Error;
}

impl Wrap for io::Error {
    fn wrap(self, what: impl std::fmt::Display) -> io::Error {
        io::Error::new(self.kind(), format!("{what}: {self}"))
    }
}

/// Opens a directory the agent or the pod's spec chose (a volume's base: the agent's own
/// directory, or a hostPath, which may itself be a symlink as in Kubernetes). What lies below
/// it is resolved with `open_beneath` and the `*at` calls.
pub fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    nix::fcntl::open(
        path,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io_err(path.display(), e))
}

/// Resolution that stays below the starting directory: absolute symlinks, `..` past the start
/// and /proc magic links fail (EXDEV / ELOOP).
fn beneath(flags: OFlag, no_symlinks: bool) -> OpenHow {
    let mut r = ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS;
    if no_symlinks {
        r |= ResolveFlag::RESOLVE_NO_SYMLINKS;
    }
    OpenHow::new().flags(flags | OFlag::O_CLOEXEC).resolve(r)
}

/// Checks a relative path as the API does for subPath and item paths: not absolute, no `..`.
pub fn check_relative(what: &str, rel: &str) -> io::Result<()> {
    if rel.starts_with('/') || rel.split('/').any(|p| p == "..") {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{what} {rel:?} must be a relative path without '..'"),
        ));
    }
    Ok(())
}

/// Opens `rel` below `base` as kubelet's subPath does: symlinks are followed only while they
/// stay inside `base`; missing directories are made with `mkdirat` one component at a time
/// (each new one opened without following symlinks, so a racing `ln -s` loses).
pub fn open_beneath(base: &OwnedFd, rel: &str) -> io::Result<OwnedFd> {
    check_relative("subPath", rel)?;
    match openat2(base.as_fd(), rel, beneath(OFlag::O_PATH, false)) {
        Ok(fd) => return Ok(fd),
        Err(Errno::ENOENT) => {}
        Err(Errno::EXDEV | Errno::ELOOP) => {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("subPath {rel:?} resolves outside of its volume"),
            ));
        }
        Err(e) => return Err(io_err(format!("subPath {rel:?}"), e)),
    }
    let mut cur = nix::unistd::dup(base).map_err(|e| io_err("dup", e))?;
    for comp in rel.split('/').filter(|c| !c.is_empty() && *c != ".") {
        let dir = OFlag::O_PATH | OFlag::O_DIRECTORY;
        cur = match openat2(cur.as_fd(), comp, beneath(dir, false)) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => {
                match mkdirat(cur.as_fd(), comp, Mode::from_bits_truncate(0o755)) {
                    Ok(()) | Err(Errno::EEXIST) => {}
                    Err(e) => return Err(io_err(format!("subPath {rel:?}: mkdir {comp}"), e)),
                }
                openat2(cur.as_fd(), comp, beneath(dir, true)).map_err(|e| {
                    io_err(
                        format!("subPath {rel:?}: {comp} changed while being made"),
                        e,
                    )
                })?
            }
            Err(Errno::EXDEV | Errno::ELOOP) => {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!("subPath {rel:?} resolves outside of its volume"),
                ));
            }
            Err(e) => return Err(io_err(format!("subPath {rel:?}: {comp}"), e)),
        };
    }
    Ok(cur)
}

/// Bind-mounts what `fd` refers to onto `target` (made as a file or directory to match),
/// through `/proc/self/fd/N`: the mount is the opened inode, whatever the path says by now.
/// A mount left on `target` by an earlier run is replaced.
pub fn bind_fd(fd: &OwnedFd, target: &Path) -> io::Result<()> {
    let st = fstat(fd).map_err(|e| io_err("fstat", e))?;
    let is_dir = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR;
    let _ = nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH);
    match std::fs::symlink_metadata(target) {
        Ok(m) if m.is_dir() => std::fs::remove_dir(target)?,
        Ok(_) => std::fs::remove_file(target)?,
        Err(_) => {}
    }
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent)?;
    }
    if is_dir {
        std::fs::create_dir(target)?;
    } else {
        std::fs::File::create(target)?;
    }
    let src = format!("/proc/self/fd/{}", fd.as_raw_fd());
    nix::mount::mount(
        Some(src.as_str()),
        target,
        None::<&str>,
        nix::mount::MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| io_err(format!("bind {} on {}", src, target.display()), e))
}

/// Every mount point at or below `dir` in this mount namespace, deepest first.
pub fn mounts_below(dir: &Path) -> Vec<PathBuf> {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return vec![];
    };
    let mut found: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mountinfo(p)))
        .filter(|p| p.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    found.dedup();
    found
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> std::ffi::OsString {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    OsStr::from_bytes(&out).to_os_string()
}

/// Removes a directory tree the agent owns (a pod's directory) after unmounting everything
/// mounted below it (subPath binds, memory emptyDirs), so the removal can never walk into a
/// bind mount of a volume or of a host path. A mount that stays is an error and nothing is
/// removed.
pub fn remove_tree(dir: &Path) -> io::Result<()> {
    for _ in 0..4 {
        let mounts = mounts_below(dir);
        if mounts.is_empty() {
            break;
        }
        for m in mounts {
            let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
        }
    }
    if let Some(m) = mounts_below(dir).first() {
        return Err(io::Error::other(format!(
            "{} is still mounted; not removing {}",
            m.display(),
            dir.display()
        )));
    }
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

/// `fstatat` without following a final symlink.
pub fn lstat_at(dir: &OwnedFd, name: &str) -> Option<FileStat> {
    fstatat(dir.as_fd(), name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW).ok()
}

/// Opens the directory `name` inside `dir`, refusing a symlink.
pub fn open_subdir(dir: &OwnedFd, name: &str) -> io::Result<OwnedFd> {
    openat(
        dir.as_fd(),
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io_err(name, e))
}

/// Makes (if missing) and opens each directory of `rel` below `dir`, never following a symlink.
pub fn make_dirs_at(dir: &OwnedFd, rel: &str, mode: u32) -> io::Result<OwnedFd> {
    let mut cur = nix::unistd::dup(dir).map_err(|e| io_err("dup", e))?;
    for comp in rel.split('/').filter(|c| !c.is_empty() && *c != ".") {
        match mkdirat(cur.as_fd(), comp, Mode::from_bits_truncate(mode)) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(io_err(format!("mkdir {comp}"), e)),
        }
        cur = open_subdir(&cur, comp)?;
    }
    Ok(cur)
}

/// Creates the file `name` in `dir` (it must not exist; a symlink there is not followed) with
/// its final mode from the start, and writes `bytes`.
pub fn create_file_at(dir: &OwnedFd, name: &str, bytes: &[u8], mode: u32) -> io::Result<()> {
    use std::io::Write;
    let fd = openat(
        dir.as_fd(),
        name,
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(mode & 0o7777),
    )
    .map_err(|e| io_err(name, e))?;
    // The umask may have taken bits away; never adds more than `mode`.
    nix::sys::stat::fchmod(fd.as_fd(), Mode::from_bits_truncate(mode & 0o7777))
        .map_err(|e| io_err(name, e))?;
    let mut f = std::fs::File::from(fd);
    f.write_all(bytes).map_err(|e| e.wrap(name))
}

/// Removes `name` in `dir` and, if it is a directory, everything below it, through directory
/// descriptors only: a symlink anywhere is removed itself, never followed.
pub fn remove_at(dir: &OwnedFd, name: &str) -> io::Result<()> {
    let Some(st) = lstat_at(dir, name) else {
        return Ok(());
    };
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFDIR {
        return unlinkat(dir.as_fd(), name, UnlinkatFlags::NoRemoveDir)
            .map_err(|e| io_err(name, e));
    }
    let sub = open_subdir(dir, name)?;
    for n in names_in(&sub)? {
        remove_at(&sub, &n)?;
    }
    unlinkat(dir.as_fd(), name, UnlinkatFlags::RemoveDir).map_err(|e| io_err(name, e))
}

/// The entry names of a directory (without `.` and `..`).
pub fn names_in(dir: &OwnedFd) -> io::Result<Vec<String>> {
    let fd = openat(
        dir.as_fd(),
        ".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io_err("open .", e))?;
    let d = nix::dir::Dir::from_fd(fd).map_err(|e| io_err("readdir", e))?;
    let mut out = vec![];
    for e in d.into_iter().flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if n != "." && n != ".." {
            out.push(n);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subpath_symlinks_that_leave_the_volume_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let vol = t.path().join("vol");
        let outside = t.path().join("outside");
        std::fs::create_dir_all(vol.join("inner/deeper")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::os::unix::fs::symlink("/", vol.join("root")).unwrap();
        std::os::unix::fs::symlink("../outside", vol.join("up")).unwrap();
        std::os::unix::fs::symlink("inner/deeper", vol.join("ok")).unwrap();
        let base = open_dir(&vol).unwrap();
        for bad in ["root", "root/etc", "up", "up/x/y", "inner/../../outside"] {
            let e = open_beneath(&base, bad).unwrap_err();
            assert!(
                e.to_string().contains("outside of its volume") || e.to_string().contains(".."),
                "{bad}: {e}"
            );
        }
        assert!(!outside.join("x").exists(), "nothing made outside");
        // A symlink that stays inside resolves; missing directories are made inside.
        let fd = open_beneath(&base, "ok").unwrap();
        let got = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap();
        assert_eq!(got, vol.join("inner/deeper"));
        open_beneath(&base, "new/a/b").unwrap();
        assert!(vol.join("new/a/b").is_dir());
    }

    #[test]
    fn remove_at_never_follows_a_symlink() {
        let t = tempfile::tempdir().unwrap();
        let canary = t.path().join("canary");
        std::fs::create_dir_all(&canary).unwrap();
        std::fs::write(canary.join("keep"), "x").unwrap();
        let d = t.path().join("d");
        std::fs::create_dir_all(d.join("gen/sub")).unwrap();
        std::os::unix::fs::symlink(&canary, d.join("gen/sub/link")).unwrap();
        std::os::unix::fs::symlink(&canary, d.join("top")).unwrap();
        let fd = open_subdir(&open_dir(t.path()).unwrap(), "d").unwrap();
        remove_at(&fd, "gen").unwrap();
        remove_at(&fd, "top").unwrap();
        assert!(canary.join("keep").exists());
        assert!(!d.join("gen").exists() && !d.join("top").exists());
    }

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_mountinfo(r"/a\040b\134c"), "/a b\\c");
        assert_eq!(unescape_mountinfo(r"/x\04"), r"/x\04");
    }
}
