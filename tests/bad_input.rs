//! Bad input never takes the agent or other pods down: broken manifests are reported with the
//! file and the field and change nothing; a missing image is a waiting reason, not a crash loop;
//! bad archives and flags are clear errors.
mod common;
use std::{process::Command, time::Duration};

use common::*;

fn keelson(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_keelson"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn broken_manifests_are_reported_and_change_nothing() {
    let mut lab = Lab::start("badman");
    lab.start_agent();
    lab.write_manifest("good.yaml", &pod_yaml("good", "exec sleep 3600", "", ""));
    let good = lab.wait_ready("good");
    let good_id = cstatus(&good, "main").container_id;

    lab.write_manifest(
        "notyaml.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: x\n  - [",
    );
    lab.write_manifest(
        "deploy.yaml",
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n",
    );
    lab.write_manifest(
        "noimage.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: noimage}\nspec:\n  containers:\n  - name: c\n",
    );
    lab.write_manifest("dup.yaml", &format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: dup}}\nspec:\n  containers:\n  - {{name: c, image: {BUSYBOX}}}\n  - {{name: c, image: {BUSYBOX}}}\n"));
    lab.write_manifest("badname.yaml", &format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: Bad_Name}}\nspec:\n  containers:\n  - {{name: c, image: {BUSYBOX}}}\n"));
    lab.write_manifest(
        "badprobe.yaml",
        &pod_yaml(
            "badprobe",
            "sleep 1",
            "    livenessProbe: {periodSeconds: 5}\n",
            "",
        ),
    );
    lab.write_manifest(
        "badtype.yaml",
        &pod_yaml(
            "badtype",
            "sleep 1",
            "    ports: [{containerPort: eighty}]\n",
            "",
        ),
    );
    // A good file broken in place keeps its running pod.
    lab.write_manifest(
        "good.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: good}\nspec:\n  containers: nope\n",
    );

    let expect = [
        ("notyaml.yaml", "invalid YAML"),
        (
            "deploy.yaml",
            "kind \"Deployment\" is not supported here (only Pod)",
        ),
        ("noimage.yaml", "spec.containers[0].image: Required value"),
        (
            "dup.yaml",
            "spec.containers[1].name: Duplicate value: \"c\"",
        ),
        ("badname.yaml", "metadata.name: Invalid value: \"Bad_Name\""),
        (
            "badprobe.yaml",
            "spec.containers[0].livenessProbe: Required value: must specify a handler type",
        ),
        ("badtype.yaml", "spec.containers[0].ports[0].containerPort"),
        ("good.yaml", "spec.containers"),
    ];
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let log = lab.agent_log();
        let missing: Vec<_> = expect
            .iter()
            .filter(|(file, msg)| {
                !log.lines()
                    .any(|l| l.contains("bad manifest") && l.contains(file) && l.contains(msg))
            })
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not reported: {missing:?}\n{log}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Nothing else changed: only the good pod runs, with the same container.
    std::thread::sleep(Duration::from_secs(3));
    let pods = lab.pods();
    assert_eq!(
        pods.len(),
        1,
        "{:?}",
        pods.iter()
            .map(|p| p.metadata.name.clone())
            .collect::<Vec<_>>()
    );
    let good2 = lab.wait_ready("good");
    assert_eq!(cstatus(&good2, "main").container_id, good_id);
    assert_eq!(lab.get("/healthz").unwrap().0, 200);
    // Each error is reported once, not on every rescan.
    let n = lab
        .agent_log()
        .lines()
        .filter(|l| l.contains("bad manifest") && l.contains("deploy.yaml"))
        .count();
    assert_eq!(n, 1);
}

#[test]
fn a_missing_image_is_a_waiting_reason_not_a_crash() {
    let mut lab = Lab::start("noimg");
    lab.start_agent();
    let yaml = |name: &str, policy: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec:\n  containers:\n  - name: c\n    image: keelson.local/nothere:1\n    imagePullPolicy: {policy}\n"
        )
    };
    lab.write_manifest("pull.yaml", &yaml("pull", "IfNotPresent"));
    lab.write_manifest("never.yaml", &yaml("never", "Never"));
    let p = lab.wait_pod("never", "ErrImageNeverPull", Duration::from_secs(20), |p| {
        waiting_reason(p, "c").as_deref() == Some("ErrImageNeverPull")
    });
    let msg = cstatus(&p, "c")
        .state
        .unwrap()
        .waiting
        .unwrap()
        .message
        .unwrap();
    assert_eq!(
        msg,
        "Container image \"keelson.local/nothere:1\" is not present with pull policy of Never"
    );
    let p = lab.wait_pod("pull", "ErrImagePull", Duration::from_secs(20), |p| {
        matches!(
            waiting_reason(p, "c").as_deref(),
            Some("ErrImagePull" | "ImagePullBackOff")
        )
    });
    assert_eq!(phase(&p), "Pending");
    assert_eq!(restarts(&p, "c"), 0);
    // Importing the image later lets the pod start without touching the manifest.
    let other = lab.dir.path().join("late");
    std::fs::create_dir_all(&other).unwrap();
    let ar = busybox_archive(&other);
    let packed = lab.dir.path().join("late.tar");
    let rootfs = other.join("busybox-rootfs");
    let out = keelson(&[
        "image",
        "pack",
        "--rootfs",
        rootfs.to_str().unwrap(),
        "--name",
        "keelson.local/nothere:1",
        "--cmd",
        "sleep",
        "--cmd",
        "3600",
        "-o",
        packed.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = ar;
    let out = keelson(&[
        "image",
        "import",
        "--containerd",
        lab.socket().to_str().unwrap(),
        packed.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("imported keelson.local/nothere:1"));
    lab.wait_pod(
        "pull",
        "Running after import",
        Duration::from_secs(30),
        |p| phase(p) == "Running",
    );
    assert!(lab.get("/healthz").is_ok());
}

#[test]
fn bad_archives_and_flags_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.tar");
    std::fs::write(&junk, b"definitely not a tarball").unwrap();
    // A containerd is not needed to reject the file: the archive is read first.
    let lab = Lab::start("badar");
    let out = keelson(&[
        "image",
        "import",
        "--containerd",
        lab.socket().to_str().unwrap(),
        junk.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("junk.tar"), "{err}");
    let out = keelson(&[
        "image",
        "pack",
        "--rootfs",
        "/nonexistent-rootfs",
        "--name",
        "x",
        "-o",
        "/tmp/x.tar",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("--rootfs /nonexistent-rootfs: not a directory")
    );
    let out = keelson(&[
        "agent",
        "--standalone",
        "--pod-cidr",
        "banana",
        "--manifests",
        "/tmp",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--pod-cidr \"banana\" is not an IPv4 CIDR")
    );
    let out = keelson(&["pods", "--data-dir", dir.path().to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is it running?"));
    // A registry configuration with a typo and one with a bad endpoint: the file and the
    // field are named, and the agent does not start.
    for (yaml, field) in [
        ("mirror:\n  docker.io: {}\n", "unknown field"),
        (
            "mirrors:\n  docker.io:\n    endpoint: [\"ftp://m\"]\n",
            "mirrors.\"docker.io\".endpoint[0]",
        ),
    ] {
        let bad = dir.path().join("registries.yaml");
        std::fs::write(&bad, yaml).unwrap();
        let out = keelson(&[
            "agent",
            "--standalone",
            "--manifests",
            "/tmp",
            "--registry-config",
            bad.to_str().unwrap(),
        ]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("registries.yaml") && err.contains(field),
            "{err}"
        );
    }
    let out = keelson(&[
        "agent",
        "--standalone",
        "--manifests",
        "/tmp",
        "--image-gc-high-threshold",
        "70",
        "--image-gc-low-threshold",
        "90",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("--image-gc-low-threshold (90) must not be above"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (flag, value, says) in [
        (
            "--cluster-domain",
            "bad..domain",
            "--cluster-domain \"bad..domain\" is not a DNS name",
        ),
        (
            "--cluster-dns",
            "10.96.0.10,banana",
            "--cluster-dns: \"banana\" is not an IP address",
        ),
    ] {
        let out = keelson(&["agent", "--standalone", "--manifests", "/tmp", flag, value]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{err}");
    }
}
