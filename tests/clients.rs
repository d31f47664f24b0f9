//! Clients beyond kubectl against one keelson lab: the official Python client's suite
//! (tests/python, pytest), the official JavaScript client's scenario (tests/js) and Helm 3.17
//! with the chart `helm create` makes. The clients come from scripts/clients.sh (run by the
//! test command's setup) under target/test-clients.
mod common;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use common::{BUSYBOX, Kubectl, cluster::Cluster};

fn clients() -> PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-clients");
    assert!(
        d.join("py/bin/pytest").exists() && d.join("bin/helm").exists(),
        "the client tests need the clients: run `bash scripts/clients.sh` (scripts/test.sh does)"
    );
    d
}

/// Runs `cmd` to completion; panics with its output unless it succeeded.
fn run(what: &str, cmd: &mut Command) -> String {
    let o = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "{what} failed:\n{text}");
    text
}

#[test]
fn python_javascript_and_helm_clients_work() {
    let tools = clients();
    let c = Cluster::up("clients", 1, &[]);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    run(
        "the Python client's suite",
        Command::new(tools.join("py/bin/pytest"))
            .args(["-q", "-p", "no:cacheprovider", "-x"])
            .arg(root.join("tests/python"))
            .env("KUBECONFIG", c.kubeconfig())
            .env("KT_IMAGE", BUSYBOX)
            .env("HOME", c.dir.path()),
    );
    run(
        "the JavaScript client's scenario",
        Command::new("node")
            .arg("--test")
            .arg(root.join("tests/js/clients.mjs"))
            .env("KUBECONFIG", c.kubeconfig())
            .env("KT_IMAGE", BUSYBOX)
            .env("KT_CLIENT_DIR", tools.join("js"))
            .env("HOME", c.dir.path()),
    );
    helm(&c, &tools.join("bin/helm"));
}

/// The chart `helm create` makes, installed, tested (`helm test`), upgraded, rolled back and
/// uninstalled. Its
/// default image (nginx) is not here: the test points it at the lab's busybox and gives the
/// container an httpd on the chart's port 80, so its probes pass.
fn helm(c: &Cluster, helm: &Path) {
    let dir = c.dir.path().join("helm");
    std::fs::create_dir_all(&dir).unwrap();
    let h = |args: &[&str]| {
        let mut cmd = Command::new(helm);
        cmd.args(args)
            .current_dir(&dir)
            .env("KUBECONFIG", c.kubeconfig())
            .env("HOME", &dir)
            .env("XDG_CACHE_HOME", dir.join("cache"))
            .env("XDG_CONFIG_HOME", dir.join("config"))
            .env("XDG_DATA_HOME", dir.join("data"));
        run(&format!("helm {args:?}"), &mut cmd)
    };
    h(&["create", "demo"]);
    let tpl = dir.join("demo/templates/deployment.yaml");
    let text = std::fs::read_to_string(&tpl).unwrap();
    let mut out = String::new();
    for line in text.lines() {
        out.push_str(line);
        out.push('\n');
        if line.trim_start().starts_with("image:") && line.contains(".Values.image.repository") {
            let indent = &line[..line.len() - line.trim_start().len()];
            out.push_str(&format!(
                "{indent}command: [\"sh\", \"-c\", \"mkdir -p /www && echo served-by-helm > /www/index.html && exec httpd -f -p 80 -h /www\"]\n"
            ));
        }
    }
    std::fs::write(&tpl, out).unwrap();
    // The chart's test pod (`helm test`) wgets the Service by its DNS name, with an image from
    // Docker Hub: the lab's busybox instead.
    let test_tpl = dir.join("demo/templates/tests/test-connection.yaml");
    let text = std::fs::read_to_string(&test_tpl).unwrap();
    assert!(text.contains("image: busybox"), "{text}");
    std::fs::write(
        &test_tpl,
        text.replace("image: busybox", &format!("image: {BUSYBOX}")),
    )
    .unwrap();
    let (repo, tag) = BUSYBOX.rsplit_once(':').unwrap();
    let image = [
        "--set".to_string(),
        format!("image.repository={repo}"),
        "--set".to_string(),
        format!("image.tag={tag}"),
    ];
    let with = |base: &[&str]| -> Vec<String> {
        base.iter()
            .map(|s| s.to_string())
            .chain(image.iter().cloned())
            .collect()
    };
    let h2 = |args: Vec<String>| h(&args.iter().map(String::as_str).collect::<Vec<_>>());
    h2(with(&[
        "install",
        "demo",
        "./demo",
        "--wait",
        "--timeout",
        "120s",
    ]));
    assert_eq!(
        c.jsonpath(&["get", "deploy", "demo"], "{.status.readyReplicas}"),
        "1"
    );
    // helm test: the test pod reaches the release's Service by name through the cluster DNS.
    let tested = h(&["test", "demo", "--timeout", "120s"]);
    assert!(
        tested.contains("demo-test-connection") && tested.contains("Succeeded"),
        "{tested}"
    );
    // A test hook's pod is not the release's: Helm leaves it behind (on Kubernetes too).
    c.ok(&["delete", "pod", "demo-test-connection", "--wait=false"]);
    h2(with(&[
        "upgrade",
        "demo",
        "./demo",
        "--wait",
        "--timeout",
        "120s",
        "--set",
        "replicaCount=2",
    ]));
    assert_eq!(
        c.jsonpath(&["get", "deploy", "demo"], "{.status.readyReplicas}"),
        "2"
    );
    let history = h(&["history", "demo"]);
    assert!(
        history.contains("superseded") && history.contains("Upgrade complete"),
        "{history}"
    );
    h(&["rollback", "demo", "1", "--wait", "--timeout", "120s"]);
    assert_eq!(
        c.jsonpath(&["get", "deploy", "demo"], "{.spec.replicas}"),
        "1"
    );
    let list = h(&["list"]);
    assert!(
        list.contains("demo") && list.contains("deployed") && list.contains("\t3  "),
        "{list}"
    );
    h(&["uninstall", "demo", "--wait"]);
    // Nothing left: no workload, Service, account or release record (the pods and the
    // ReplicaSet go after their owners, by garbage collection and graceful deletion).
    let releases = c.ok(&["get", "secrets", "-l", "owner=helm", "-o", "name"]);
    assert!(releases.trim().is_empty(), "{releases}");
    let mut left = String::new();
    c.until(90, "everything of the release to go", || {
        left = c.ok(&[
            "get",
            "all,serviceaccounts,secrets",
            "-l",
            "app.kubernetes.io/instance=demo",
            "-o",
            "name",
        ]);
        left.trim().is_empty()
    });
}
