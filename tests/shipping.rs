//! What ships besides the binary: the systemd units pass `systemd-analyze verify` and the
//! daemons speak systemd's readiness protocol; the Vagrantfile parses and its provisioning
//! scripts (and ours) pass shellcheck; the deploy/ manifests are accepted by a server-side dry
//! run against keelson's own API server.
use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn run(cmd: &mut Command) -> (bool, String) {
    let o = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    (
        o.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

#[test]
fn systemd_units_verify() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_keelson");
    let mut units = vec![];
    for name in ["keelson-server.service", "keelson-agent.service"] {
        let text = std::fs::read_to_string(repo().join("systemd").join(name)).unwrap();
        assert!(text.contains("Type=notify"), "{name}: Type=notify");
        assert!(text.contains("Restart=always"), "{name}: Restart=always");
        assert!(text.contains("EnvironmentFile="), "{name}: EnvironmentFile");
        // Verified against the binary just built (the installed path may not exist here).
        let p = tmp.path().join(name);
        std::fs::write(&p, text.replace("/usr/local/bin/keelson", bin)).unwrap();
        units.push(p);
    }
    let agent = std::fs::read_to_string(&units[1]).unwrap();
    assert!(agent.contains("KillMode=process") && agent.contains("Delegate=yes"));
    let (ok, out) = run(Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(&units));
    assert!(ok, "systemd-analyze verify: {out}");
    assert!(
        !out.contains("keelson-"),
        "systemd-analyze has remarks about our units: {out}"
    );
}

/// Starts `keelson server` on loopback with `$NOTIFY_SOCKET` set; waits for READY=1.
fn server_with_notify(dir: &Path) -> (std::process::Child, Duration) {
    let sock = dir.join("notify");
    let listener = std::os::unix::net::UnixDatagram::bind(&sock).unwrap();
    listener
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let t0 = Instant::now();
    let child = Command::new(env!("CARGO_BIN_EXE_keelson"))
        .args(["server", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.join("server"))
        .env("NOTIFY_SOCKET", &sock)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("server.log")).unwrap())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 256];
    let n = listener
        .recv(&mut buf)
        .expect("the server sends READY=1 to $NOTIFY_SOCKET");
    assert_eq!(&buf[..n], b"READY=1");
    let took = t0.elapsed();
    assert!(
        dir.join("server/kubeconfig.yaml").exists(),
        "ready means serving, with the kubeconfig written"
    );
    (child, took)
}

#[test]
fn the_server_reports_readiness_and_accepts_the_deploy_manifests() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut child, took) = server_with_notify(tmp.path());
    eprintln!("server ready (sd_notify) after {took:?}");
    let kubectl = |args: &[&str]| {
        run(Command::new("kubectl")
            .args(args)
            .env("KUBECONFIG", tmp.path().join("server/kubeconfig.yaml"))
            .env("HOME", tmp.path()))
    };
    let deploy = repo().join("deploy");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&deploy)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 2,
        "deploy/ has the proxy and agent manifests"
    );
    for f in &files {
        let (ok, out) = kubectl(&["apply", "--dry-run=server", "-f", f.to_str().unwrap()]);
        assert!(ok, "{}: {out}", f.display());
        assert!(out.contains("(server dry run)"), "{out}");
    }
    // A dry run stores nothing.
    let (_, out) = kubectl(&["get", "daemonsets", "-A"]);
    assert!(!out.contains("keelson"), "{out}");
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn vagrant_lab_parses_and_scripts_pass_shellcheck() {
    let (ok, out) = run(Command::new("ruby")
        .args(["-c"])
        .arg(repo().join("vagrant/Vagrantfile")));
    assert!(ok && out.contains("Syntax OK"), "ruby -c: {out}");
    let mut scripts: Vec<PathBuf> = vec![];
    for dir in ["vagrant", "scripts"] {
        for e in std::fs::read_dir(repo().join(dir)).unwrap().flatten() {
            if e.path().extension().is_some_and(|x| x == "sh") {
                scripts.push(e.path());
            }
        }
    }
    scripts.push(repo().join(".ci/run"));
    assert!(scripts.len() >= 6, "{scripts:?}");
    let (ok, out) = run(Command::new("shellcheck").args(&scripts));
    assert!(ok, "shellcheck: {out}");
}
