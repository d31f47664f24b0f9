//! Images arrive offline: docker-archive and OCI-layout tarballs import into containerd (again
//! without harm), and the agent brings its own pause image.
mod common;
use std::{io::Write, process::Command, time::Duration};

use common::*;
use sha2::Digest;

/// A docker-archive (`docker save` layout) with one layer holding a static busybox.
fn docker_archive(dir: &std::path::Path) -> std::path::PathBuf {
    let mut layer = tar::Builder::new(Vec::new());
    let bb = std::fs::read("/bin/busybox").unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o755);
    h.set_size(bb.len() as u64);
    layer.append_data(&mut h, "bin/busybox", &bb[..]).unwrap();
    for d in ["tmp", "www"] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o1777);
        h.set_size(0);
        layer.append_data(&mut h, d, std::io::empty()).unwrap();
    }
    let layer = layer.into_inner().unwrap();
    let diff_id = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&layer)));
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Entrypoint": ["/bin/busybox"], "Cmd": ["sh"], "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    });
    let config = serde_json::to_vec(&config).unwrap();
    let config_name = format!("{}.json", hex::encode(sha2::Sha256::digest(&config)));
    let manifest = serde_json::json!([{
        "Config": config_name, "RepoTags": ["dockerstyle/tool:7"], "Layers": ["abc/layer.tar"]
    }]);
    let path = dir.join("docker.tar");
    let mut ar = tar::Builder::new(std::fs::File::create(&path).unwrap());
    for (name, data) in [
        ("manifest.json", serde_json::to_vec(&manifest).unwrap()),
        (config_name.as_str(), config),
        ("abc/layer.tar", layer),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        ar.append_data(&mut h, name, &data[..]).unwrap();
    }
    ar.into_inner().unwrap().flush().unwrap();
    path
}

#[test]
fn docker_archives_import_and_run_and_the_pause_image_is_provided() {
    let mut lab = Lab::start("images");
    let ar = docker_archive(lab.dir.path());
    let import = || {
        Command::new(env!("CARGO_BIN_EXE_keelson"))
            .args(["image", "import", "--containerd"])
            .arg(lab.socket())
            .arg(&ar)
            .output()
            .unwrap()
    };
    let out = import();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "imported docker.io/dockerstyle/tool:7\n"
    );
    let again = import();
    assert!(
        again.status.success(),
        "a second import is harmless: {}",
        String::from_utf8_lossy(&again.stderr)
    );
    lab.start_agent();
    // The pod names the image the short way; Kubernetes' normalization finds it.
    lab.write_manifest(
        "tool.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: tool}\nspec:\n  restartPolicy: Never\n  containers:\n  - name: main\n    image: dockerstyle/tool:7\n    args: [sh, -c, \"echo from-docker-archive\"]\n",
    );
    let p = lab.wait_pod("tool", "Succeeded", Duration::from_secs(30), |p| {
        phase(p) == "Succeeded"
    });
    let (code, body) = lab.get("/containerLogs/default/tool-node1/main").unwrap();
    assert_eq!((code, body.as_str()), (200, "from-docker-archive\n"));
    assert!(
        cstatus(&p, "main")
            .image_id
            .starts_with("docker.io/dockerstyle/tool@sha256:")
    );
    let images = Command::new("ctr")
        .arg("-a")
        .arg(lab.socket())
        .args(["-n", NS, "images", "ls", "-q"])
        .output()
        .unwrap();
    let images = String::from_utf8_lossy(&images.stdout);
    assert!(
        images.lines().any(|l| l == "keelson.local/pause:1"),
        "{images}"
    );
}

/// Containers created while others are deleted: a deletion sets off containerd's garbage
/// collection, which must not take a snapshot prepared for a container not yet recorded
/// (keelson prepares and records under a lease, as containerd's client does). 3 rounds of 12
/// pause + app pairs at once, each deleted as soon as it started: every one starts, and no
/// lease is left behind (it would keep its snapshot from ever being collected).
#[test]
fn creation_survives_garbage_collection_set_off_by_deletions() {
    let lab = Lab::start("gc");
    let ar = busybox_archive(lab.dir.path());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = keelson::runtime::Containerd::connect(&lab.socket(), "gc-race")
            .await
            .unwrap();
        c.import_archive("busybox", &std::fs::read(&ar).unwrap())
            .await
            .unwrap();
        let pause = keelson::agent::ensure_pause(&c).await.unwrap();
        let app = c.image_info(BUSYBOX).await.unwrap();
        // floor_once fails the test if any create or start fails.
        for _ in 0..3 {
            let runs = (0..12).map(|_| common::floor::floor_once(&c, &pause, &app));
            futures::future::join_all(runs).await;
        }
        let leases = c.lease_ids().await.unwrap();
        assert!(leases.is_empty(), "leases left: {leases:?}");
    });
    // Every container started was deleted with its task: containerd holds none of them.
    for what in ["containers", "tasks"] {
        let o = Command::new("ctr")
            .arg("-a")
            .arg(lab.socket())
            .args(["-n", "gc-race", what, "ls", "-q"])
            .output()
            .unwrap();
        assert!(o.status.success(), "ctr {what} ls");
        let left = String::from_utf8_lossy(&o.stdout);
        assert!(left.trim().is_empty(), "{what} left: {left}");
    }
}
