//! Images pulled from registries like kubelet pulls them: real `docker-registry` servers in the
//! lab's node namespace (one plain-HTTP, one HTTPS with a CA the test makes and basic auth),
//! images pushed with `skopeo` from archives `keelson image pack` makes, pulled by
//! `keelson image pull` and by the agent for pods.
mod common;

use std::{path::PathBuf, process::Command};

use common::{registry::Registry, *};

const PLAIN: &str = "127.0.0.1:5000";
const SECURE: &str = "127.0.0.1:5443";
const CREDS: &str = "puller:s3cret";

/// The node with its two registries and the node's registries.yaml.
struct Pulls {
    lab: Lab,
    plain: Registry,
    secure: Registry,
    /// The busybox archive `keelson image pack` made.
    busybox: PathBuf,
    registries_yaml: PathBuf,
}

impl Pulls {
    /// `keelson image ARGS…` inside the node namespace, against the lab's containerd.
    fn image(&self, args: &[&str]) -> std::process::Output {
        Command::new("ip")
            .args(["netns", "exec", &self.lab.netns])
            .arg(env!("CARGO_BIN_EXE_keelson"))
            .arg("image")
            .arg(args[0])
            .arg("--containerd")
            .arg(self.lab.socket())
            .args(&args[1..])
            .output()
            .unwrap()
    }

    fn pull(&self, reference: &str, extra: &[&str]) -> std::process::Output {
        let cfg = self.registries_yaml.display().to_string();
        let mut args = vec!["pull", "--registry-config", cfg.as_str()];
        args.extend(extra);
        args.push(reference);
        self.image(&args)
    }

    fn images(&self) -> String {
        let out = self.image(&["ls"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }
}

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn images_are_pulled_from_registries_with_mirrors_auth_and_tls() {
    let lab = Lab::start("pull");
    let busybox = lab.data_dir().join("images/busybox.tar");
    let plain = Registry::plain(&lab.netns, &lab.dir.path().join("reg-plain"), PLAIN);
    let secure = Registry::https(
        &lab.netns,
        &lab.dir.path().join("reg-secure"),
        SECURE,
        CREDS,
    );
    let registries_yaml = lab.dir.path().join("registries.yaml");
    std::fs::write(
        &registries_yaml,
        format!(
            "mirrors:\n  \"{PLAIN}\":\n    endpoint: [\"http://{PLAIN}\"]\n  \"mirror.lab\":\n    endpoint: [\"http://{PLAIN}\"]\n    rewrite:\n      \"^team/(.*)\": \"lab/$1\"\nconfigs:\n  \"{SECURE}\":\n    tls:\n      ca_file: {}\n",
            secure.ca.as_ref().unwrap().display()
        ),
    )
    .unwrap();
    let src = format!("oci-archive:{}", busybox.display());
    plain.push(&src, "lab/busybox:1");
    secure.push(&src, "private/busybox:1");
    let s = Pulls {
        lab,
        plain,
        secure,
        busybox,
        registries_yaml,
    };
    crate::scenarios!(&s;
        an_image_pulled_by_tag_and_by_digest_is_listed_and_removable,
        a_mirror_with_a_rewrite_serves_another_registrys_image,
        an_https_registry_with_basic_auth_wants_the_right_password,
        a_missing_tag_is_not_found_in_the_registrys_words,
    );
}

fn an_image_pulled_by_tag_and_by_digest_is_listed_and_removable(s: &Pulls) {
    let name = format!("{PLAIN}/lab/busybox:1");
    let out = s.pull(&name, &[]);
    assert!(out.status.success(), "{}", text(&out));
    let ls = s.images();
    let line = ls
        .lines()
        .find(|l| l.starts_with(&format!("{name} ")))
        .unwrap_or_else(|| panic!("{name} not listed:\n{ls}"));
    assert!(line.contains("MB") || line.contains("kB"), "a size: {line}");
    // The pull recorded the digest reference too; pulling by digest resolves to the same.
    let digest = ls
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{PLAIN}/lab/busybox@")))
        .and_then(|rest| rest.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| panic!("no digest reference:\n{ls}"));
    let rm = s.image(&["rm", &format!("{PLAIN}/lab/busybox@{digest}")]);
    assert!(rm.status.success(), "{}", text(&rm));
    let by_digest = s.pull(&format!("{PLAIN}/lab/busybox@{digest}"), &[]);
    assert!(by_digest.status.success(), "{}", text(&by_digest));
    assert!(text(&by_digest).contains(&digest), "{}", text(&by_digest));
    let rm = s.image(&["rm", &name]);
    assert!(rm.status.success(), "{}", text(&rm));
    assert!(!s.images().contains(&format!("{name} ")));
}

fn a_mirror_with_a_rewrite_serves_another_registrys_image(s: &Pulls) {
    // mirror.lab does not exist: its mirror (the plain registry) serves team/* as lab/*.
    let out = s.pull("mirror.lab/team/busybox:1", &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(s.images().contains("mirror.lab/team/busybox:1 "));
}

fn an_https_registry_with_basic_auth_wants_the_right_password(s: &Pulls) {
    let name = format!("{SECURE}/private/busybox:1");
    let anonymous = s.pull(&name, &[]);
    assert!(!anonymous.status.success());
    assert!(
        text(&anonymous).contains("401") || text(&anonymous).contains("unauthorized"),
        "{}",
        text(&anonymous)
    );
    let wrong = s.pull(&name, &["--creds", "puller:wrong"]);
    assert!(!wrong.status.success());
    assert!(text(&wrong).contains("unauthorized"), "{}", text(&wrong));
    let right = s.pull(&name, &["--creds", CREDS]);
    assert!(right.status.success(), "{}", text(&right));
    assert!(s.images().contains(&format!("{name} ")));
}

fn a_missing_tag_is_not_found_in_the_registrys_words(s: &Pulls) {
    let out = s.pull(&format!("{PLAIN}/lab/busybox:nope"), &[]);
    assert!(!out.status.success());
    assert!(text(&out).contains("not found"), "{}", text(&out));
    let _ = (&s.plain, &s.secure, &s.busybox);
}
