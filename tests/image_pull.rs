//! Images pulled from registries like kubelet pulls them: real `docker-registry` servers in the
//! lab's node namespace (one plain-HTTP, one HTTPS with a CA the test makes and basic auth),
//! images pushed with `skopeo` from archives `keelson image pack` makes, pulled by
//! `keelson image pull` and by the agent for pods.
mod common;

use std::{path::PathBuf, process::Command};

use common::{
    registry::{Fault, FaultyProxy, Registry, TokenServer},
    *,
};

const PLAIN: &str = "127.0.0.1:5000";
const SECURE: &str = "127.0.0.1:5443";
const CREDS: &str = "puller:s3cret";
/// The registry that wants bearer tokens, and its token service.
const TOKENED: &str = "127.0.0.1:5003";
const TOKENS: &str = "127.0.0.1:5100";

/// The node (joined to a server in its namespace) with its two registries and the node's
/// registries.yaml.
/// The joined agent and server (kubectl, `s.lab`, `s.server` through `Deref`) and the
/// registries.
struct Pulls {
    j: Joined,
    plain: Registry,
    secure: Registry,
    _tokened: Registry,
    _tokens: TokenServer,
    /// The busybox archive `keelson image pack` made.
    busybox: PathBuf,
    registries_yaml: PathBuf,
}

impl std::ops::Deref for Pulls {
    type Target = Joined;
    fn deref(&self) -> &Joined {
        &self.j
    }
}

impl Pulls {
    /// `keelson image ARGS…` inside the node namespace, against the lab's containerd.
    fn image(&self, args: &[&str]) -> std::process::Output {
        Command::new("ip")
            .args(["netns", "exec", &self.lab.netns, "timeout", "120"])
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
        self.pull_with(&self.registries_yaml, reference, extra)
    }

    /// A pull with another registry configuration.
    fn pull_with(
        &self,
        config: &std::path::Path,
        reference: &str,
        extra: &[&str],
    ) -> std::process::Output {
        let cfg = config.display().to_string();
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
    let mut lab = Lab::start("pull");
    let busybox = lab.data_dir().join("images/busybox.tar");
    let plain = Registry::plain(&lab.netns, &lab.dir.path().join("reg-plain"), PLAIN);
    let secure = Registry::https(
        &lab.netns,
        &lab.dir.path().join("reg-secure"),
        SECURE,
        CREDS,
    );
    let tokens = TokenServer::start(&lab.netns, &lab.dir.path().join("tokens"), TOKENS, CREDS);
    let tokened = Registry::with_tokens(
        &lab.netns,
        &lab.dir.path().join("reg-tokened"),
        TOKENED,
        &tokens,
        CREDS,
    );
    let registries_yaml = lab.dir.path().join("registries.yaml");
    std::fs::write(
        &registries_yaml,
        format!(
            "mirrors:\n  \"{PLAIN}\":\n    endpoint: [\"http://{PLAIN}\"]\n  \"mirror.lab\":\n    endpoint: [\"http://{PLAIN}\"]\n    rewrite:\n      \"^team/(.*)\": \"lab/$1\"\n  \"authed.lab\":\n    endpoint: [\"https://{SECURE}\"]\n  \"{TOKENED}\":\n    endpoint: [\"http://{TOKENED}\"]\n  \"flaky.lab\":\n    endpoint: [\"http://127.0.0.1:5001\"]\n  \"corrupt.lab\":\n    endpoint: [\"http://127.0.0.1:5002\"]\nconfigs:\n  \"{SECURE}\":\n    tls:\n      ca_file: {}\n  \"authed.lab\":\n    auth: {{username: {}, password: {}}}\n",
            secure.ca.as_ref().unwrap().display(),
            CREDS.split_once(':').unwrap().0,
            CREDS.split_once(':').unwrap().1
        ),
    )
    .unwrap();
    let src = format!("oci-archive:{}", busybox.display());
    plain.push(&src, "lab/busybox:1");
    secure.push(&src, "private/busybox:1");
    tokened.push(&src, "private/busybox:1");
    let server = Server::builder()
        .netns(&lab.netns)
        .dir(lab.dir.path().join("server"))
        .listen("127.0.0.1:6443")
        .start();
    lab.join(
        &server,
        &["--registry-config", registries_yaml.to_str().unwrap()],
    );
    let s = Pulls {
        j: Joined { lab, server },
        plain,
        secure,
        _tokened: tokened,
        _tokens: tokens,
        busybox,
        registries_yaml,
    };
    crate::scenarios!(&s;
        an_image_pulled_by_tag_and_by_digest_is_listed_and_removable,
        a_mirror_with_a_rewrite_serves_another_registrys_image,
        an_https_registry_with_basic_auth_wants_the_right_password,
        a_missing_tag_is_not_found_in_the_registrys_words,
        a_token_registry_gives_bearer_tokens_to_the_right_credentials_only,
        an_untrusted_certificate_and_a_closed_port_are_named_as_such,
        a_registry_that_resets_mid_layer_leaves_no_image_and_the_retry_resumes,
        a_corrupt_blob_is_refused_and_not_kept,
        a_pods_image_is_pulled_with_kubelets_events_and_its_digest_as_image_id,
        a_multi_platform_image_resolves_to_this_nodes_manifest_only,
        pull_secrets_of_the_pod_and_of_its_service_account_open_the_private_registry,
        a_wrong_secret_is_err_image_pull_naming_401_then_image_pull_back_off,
        node_level_registry_credentials_need_no_pull_secret,
        the_node_lists_its_images_in_its_status,
        ten_pods_of_one_new_image_make_one_pull,
        always_picks_up_a_re_pushed_tag,
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
}

/// The lab's busybox packed again with `VERSION=version` in its environment (a new config,
/// the same layer).
fn pack_variant(lab: &Lab, version: &str) -> PathBuf {
    let env = format!("VERSION={version}");
    pack(
        lab,
        &lab.dir.path().join("busybox-rootfs"),
        &format!("variant-{version}"),
        &["--name", "lab/variant:1", "--env", &env, "--cmd", "sh"],
    )
}

/// `keelson image pack --rootfs ROOTFS ARGS… -o LAB/FILE.tar`, checked; the archive.
fn pack(lab: &Lab, rootfs: &std::path::Path, file: &str, args: &[&str]) -> PathBuf {
    let out_file = lab.dir.path().join(format!("{file}.tar"));
    let out = Command::new(env!("CARGO_BIN_EXE_keelson"))
        .args(["image", "pack", "--rootfs"])
        .arg(rootfs)
        .args(args)
        .arg("-o")
        .arg(&out_file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    out_file
}

/// An image whose one layer is `size` random bytes (a layer no other image shares).
fn pack_random(lab: &Lab, name: &str, size: usize) -> PathBuf {
    let root = lab.dir.path().join(format!("rootfs-{name}"));
    std::fs::create_dir_all(&root).unwrap();
    let mut data = vec![0u8; size];
    getrandom::fill(&mut data).unwrap();
    std::fs::write(root.join("blob"), data).unwrap();
    pack(lab, &root, name, &["--name", name, "--cmd", "/blob"])
}

/// The reasons and messages of the events about pod `name`.
fn events(s: &Pulls, name: &str) -> String {
    s.jsonpath(
        &[
            "get",
            "events",
            "--field-selector",
            &format!("involvedObject.name={name}"),
        ],
        "{range .items[*]}{.reason}: {.message}{\"\\n\"}{end}",
    )
}

/// A pod of `image` that sleeps, with `extra` spec lines (already indented by two spaces).
fn sleeper(name: &str, image: &str, policy: &str, extra: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec:\n{extra}  containers:\n  - name: c\n    image: {image}\n    imagePullPolicy: {policy}\n    command: [sleep, \"3600\"]\n"
    )
}

fn running(s: &Pulls, name: &str) {
    s.until(60, &format!("{name} Running"), || {
        s.field("pod", name, "{.status.phase}") == "Running"
    });
}

fn a_token_registry_gives_bearer_tokens_to_the_right_credentials_only(s: &Pulls) {
    let name = format!("{TOKENED}/private/busybox:1");
    let anonymous = s.pull(&name, &[]);
    assert!(!anonymous.status.success());
    assert!(
        text(&anonymous).contains("unauthorized"),
        "{}",
        text(&anonymous)
    );
    let wrong = s.pull(&name, &["--creds", "puller:wrong"]);
    assert!(!wrong.status.success());
    assert!(text(&wrong).contains("unauthorized"), "{}", text(&wrong));
    let right = s.pull(&name, &["--creds", CREDS]);
    assert!(right.status.success(), "{}", text(&right));
    // This registry takes nothing but bearer tokens from its token service (basic credentials
    // sent to it are refused): the pull went through the token challenge.
}

fn an_untrusted_certificate_and_a_closed_port_are_named_as_such(s: &Pulls) {
    let bare = s.lab.dir.path().join("registries-bare.yaml");
    std::fs::write(
        &bare,
        "mirrors:\n  \"closed.lab\":\n    endpoint: [\"http://127.0.0.1:5999\"]\n",
    )
    .unwrap();
    let untrusted = s.pull_with(
        &bare,
        &format!("{SECURE}/private/busybox:1"),
        &["--creds", CREDS],
    );
    assert!(!untrusted.status.success());
    assert!(
        text(&untrusted).to_lowercase().contains("certificate"),
        "{}",
        text(&untrusted)
    );
    // The same registry with verification turned off for it (insecure_skip_verify).
    let skip = s.lab.dir.path().join("registries-skip.yaml");
    std::fs::write(
        &skip,
        format!("configs:\n  \"{SECURE}\":\n    tls: {{insecure_skip_verify: true}}\n"),
    )
    .unwrap();
    let skipped = s.pull_with(
        &skip,
        &format!("{SECURE}/private/busybox:1"),
        &["--creds", CREDS],
    );
    assert!(skipped.status.success(), "{}", text(&skipped));
    let closed = s.pull_with(&bare, "closed.lab/x:1", &[]);
    assert!(!closed.status.success());
    assert!(
        text(&closed).contains("127.0.0.1:5999: ") && text(&closed).contains("onnection refused"),
        "{}",
        text(&closed)
    );
}

fn a_registry_that_resets_mid_layer_leaves_no_image_and_the_retry_resumes(s: &Pulls) {
    let big = pack_random(&s.lab, "big", 3 << 20);
    s.plain
        .push(&format!("oci-archive:{}", big.display()), "lab/big:1");
    let proxy = FaultyProxy::start(
        &s.lab.netns,
        "127.0.0.1:5001",
        PLAIN,
        Fault::CutAfter(1 << 20),
    );
    let first = s.pull("flaky.lab/lab/big:1", &[]);
    assert!(!first.status.success(), "{}", text(&first));
    assert!(
        text(&first).contains("127.0.0.1:5001"),
        "the mirror's error is named: {}",
        text(&first)
    );
    assert!(!s.images().contains("flaky.lab/"), "no half image");
    let second = s.pull("flaky.lab/lab/big:1", &[]);
    assert!(second.status.success(), "{}", text(&second));
    assert!(s.images().contains("flaky.lab/lab/big:1 "));
    let reqs = proxy.requests();
    assert!(
        reqs.iter()
            .any(|r| r.contains("/blobs/") && r.contains("range=bytes=")),
        "the second pull resumed the layer: {reqs:#?}"
    );
}

fn a_corrupt_blob_is_refused_and_not_kept(s: &Pulls) {
    let img = pack_random(&s.lab, "spoilt", 1 << 20);
    s.plain
        .push(&format!("oci-archive:{}", img.display()), "lab/spoilt:1");
    let _proxy = FaultyProxy::start(
        &s.lab.netns,
        "127.0.0.1:5002",
        PLAIN,
        Fault::CorruptAt(100_000),
    );
    let first = s.pull("corrupt.lab/lab/spoilt:1", &[]);
    assert!(!first.status.success(), "{}", text(&first));
    assert!(
        text(&first).to_lowercase().contains("digest"),
        "{}",
        text(&first)
    );
    assert!(!s.images().contains("corrupt.lab/"), "no half image");
    // Nothing of the bad blob was kept: the next pull fetches it whole and succeeds.
    let second = s.pull("corrupt.lab/lab/spoilt:1", &[]);
    assert!(second.status.success(), "{}", text(&second));
}

fn a_pods_image_is_pulled_with_kubelets_events_and_its_digest_as_image_id(s: &Pulls) {
    let image = format!("{PLAIN}/lab/busybox:1");
    s.apply(&sleeper("first", &image, "IfNotPresent", ""));
    running(s, "first");
    let ev = events(s, "first");
    assert!(
        ev.contains(&format!("Pulling: Pulling image \"{image}\"")),
        "{ev}"
    );
    assert!(
        ev.contains(&format!(
            "Pulled: Successfully pulled image \"{image}\" in "
        )) && ev.contains("including waiting). Image size: "),
        "{ev}"
    );
    let id = s.field("pod", "first", "{.status.containerStatuses[0].imageID}");
    assert!(
        id.starts_with(&format!("{PLAIN}/lab/busybox@sha256:")),
        "{id}"
    );
    // Present now: the next pod of it does not pull.
    s.apply(&sleeper("second", &image, "IfNotPresent", ""));
    running(s, "second");
    let ev = events(s, "second");
    assert!(ev.contains("already present on machine"), "{ev}");
    assert!(!ev.contains("Pulling"), "{ev}");
    s.ok(&["delete", "pod", "first", "second", "--wait=false"]);
}

/// The manifest digest of each platform in a multi-platform archive `keelson image pack` made.
fn platform_digests(archive: &std::path::Path) -> Vec<(String, String)> {
    let mut files = std::collections::HashMap::new();
    let mut a = tar::Archive::new(std::fs::File::open(archive).unwrap());
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        let p = e.path().unwrap().display().to_string();
        let mut d = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut d).unwrap();
        files.insert(p, d);
    }
    let blob = |d: &str| -> serde_json::Value {
        serde_json::from_slice(&files[&format!("blobs/sha256/{}", d.trim_start_matches("sha256:"))])
            .unwrap()
    };
    let top: serde_json::Value = serde_json::from_slice(&files["index.json"]).unwrap();
    let nested = blob(top["manifests"][0]["digest"].as_str().unwrap());
    nested["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["platform"]["architecture"].as_str().unwrap().to_string(),
                m["digest"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn a_multi_platform_image_resolves_to_this_nodes_manifest_only(s: &Pulls) {
    let archive = pack(
        &s.lab,
        &s.lab.dir.path().join("busybox-rootfs"),
        "multi",
        &[
            "--name",
            "lab/multi:1",
            "--cmd",
            "sh",
            "--platform",
            "linux/arm64",
            "--platform",
            "linux/amd64",
        ],
    );
    s.plain
        .push(&format!("oci-archive:{}", archive.display()), "lab/multi:1");
    let digests = platform_digests(&archive);
    let digest_of = |arch: &str| digests.iter().find(|(a, _)| a == arch).unwrap().1.clone();
    s.apply(&sleeper(
        "multi",
        &format!("{PLAIN}/lab/multi:1"),
        "IfNotPresent",
        "",
    ));
    running(s, "multi");
    let (this, other) = if cfg!(target_arch = "aarch64") {
        ("arm64", "amd64")
    } else {
        ("amd64", "arm64")
    };
    let log = s.plain.log();
    assert!(
        log.contains(&format!("GET /v2/lab/multi/manifests/{}", digest_of(this))),
        "{log}"
    );
    assert!(
        !log.contains(&format!("GET /v2/lab/multi/manifests/{}", digest_of(other))),
        "{log}"
    );
    s.ok(&["delete", "pod", "multi", "--wait=false"]);
}

fn pull_secrets_of_the_pod_and_of_its_service_account_open_the_private_registry(s: &Pulls) {
    let image = format!("{SECURE}/private/busybox:1");
    let (user, pass) = CREDS.split_once(':').unwrap();
    s.ok(&[
        "create",
        "secret",
        "docker-registry",
        "regcred",
        &format!("--docker-server={SECURE}"),
        &format!("--docker-username={user}"),
        &format!("--docker-password={pass}"),
    ]);
    s.apply(&sleeper(
        "withsecret",
        &image,
        "Always",
        "  imagePullSecrets: [{name: regcred}]\n",
    ));
    running(s, "withsecret");
    s.apply("apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: puller}\nimagePullSecrets: [{name: regcred}]\n");
    s.apply(&sleeper(
        "viasa",
        &image,
        "Always",
        "  serviceAccountName: puller\n",
    ));
    assert_eq!(
        s.field("pod", "viasa", "{.spec.imagePullSecrets[0].name}"),
        "regcred",
        "the ServiceAccount admission copies the account's pull secrets"
    );
    running(s, "viasa");
    assert!(events(s, "viasa").contains("Successfully pulled image"));
    s.ok(&["delete", "pod", "withsecret", "viasa", "--wait=false"]);
}

fn a_wrong_secret_is_err_image_pull_naming_401_then_image_pull_back_off(s: &Pulls) {
    let image = format!("{SECURE}/private/busybox:1");
    s.ok(&[
        "create",
        "secret",
        "docker-registry",
        "wrongcred",
        &format!("--docker-server={SECURE}"),
        "--docker-username=puller",
        "--docker-password=not-it",
    ]);
    s.apply(&sleeper(
        "denied",
        &image,
        "Always",
        "  imagePullSecrets: [{name: wrongcred}]\n",
    ));
    s.until(60, "ImagePullBackOff", || {
        s.field(
            "pod",
            "denied",
            "{.status.containerStatuses[0].state.waiting.reason}",
        ) == "ImagePullBackOff"
    });
    let ev = events(s, "denied");
    assert!(
        ev.lines().any(
            |l| l.starts_with(&format!("Failed: Failed to pull image \"{image}\""))
                && (l.contains("401") || l.contains("unauthorized"))
        ),
        "{ev}"
    );
    assert!(ev.contains("Failed: Error: ErrImagePull"), "{ev}");
    assert!(
        ev.contains(&format!("BackOff: Back-off pulling image \"{image}\"")),
        "{ev}"
    );
    assert_eq!(s.field("pod", "denied", "{.status.phase}"), "Pending");
    s.ok(&["delete", "pod", "denied", "--wait=false"]);
}

fn node_level_registry_credentials_need_no_pull_secret(s: &Pulls) {
    // authed.lab is served by the HTTPS registry, with the node's credentials for it.
    s.apply(&sleeper(
        "nodecreds",
        "authed.lab/private/busybox:1",
        "Always",
        "",
    ));
    running(s, "nodecreds");
    s.ok(&["delete", "pod", "nodecreds", "--wait=false"]);
}

fn the_node_lists_its_images_in_its_status(s: &Pulls) {
    s.until(60, "the pulled images in the node's status", || {
        let names = s.field("node", "node1", "{.status.images[*].names}");
        names.contains(&format!("{PLAIN}/lab/busybox:1"))
            && names.contains(&format!("{PLAIN}/lab/busybox@sha256:"))
            && names.contains("authed.lab/private/busybox:1")
    });
    let sizes = s.field("node", "node1", "{.status.images[*].sizeBytes}");
    assert!(
        sizes
            .split_whitespace()
            .all(|n| n.parse::<u64>().is_ok_and(|n| n > 1000)),
        "{sizes}"
    );
}

fn ten_pods_of_one_new_image_make_one_pull(s: &Pulls) {
    // A new image (its own config; the layer is one the node has).
    let ten = pack_variant(&s.lab, "ten");
    s.plain
        .push(&format!("oci-archive:{}", ten.display()), "lab/ten:1");
    let before = (
        s.plain.gets("lab/ten", "manifests"),
        s.plain.gets("lab/ten", "blobs"),
    );
    s.apply(&format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: ten}}\nspec:\n  replicas: 10\n  selector: {{matchLabels: {{app: ten}}}}\n  template:\n    metadata: {{labels: {{app: ten}}}}\n    spec:\n      terminationGracePeriodSeconds: 0\n      containers:\n      - name: c\n        image: {PLAIN}/lab/ten:1\n        command: [sleep, \"3600\"]\n"
    ));
    s.ok(&["rollout", "status", "deployment/ten", "--timeout=120s"]);
    // One pull: one manifest request, and the one blob the node lacked (the config) once.
    let log = s.plain.log();
    assert_eq!(s.plain.gets("lab/ten", "manifests") - before.0, 1, "{log}");
    assert_eq!(s.plain.gets("lab/ten", "blobs") - before.1, 1, "{log}");
    s.ok(&["delete", "deployment", "ten", "--wait=false"]);
}

fn always_picks_up_a_re_pushed_tag(s: &Pulls) {
    let image = format!("{PLAIN}/lab/moving:1");
    s.plain.push(
        &format!("oci-archive:{}", s.busybox.display()),
        "lab/moving:1",
    );
    s.apply(&sleeper("old", &image, "Always", ""));
    running(s, "old");
    let old = s.field("pod", "old", "{.status.containerStatuses[0].imageID}");
    // Another image under the same tag: busybox with another environment.
    let other = pack_variant(&s.lab, "2");
    s.plain
        .push(&format!("oci-archive:{}", other.display()), "lab/moving:1");
    s.apply(&sleeper("new", &image, "Always", ""));
    running(s, "new");
    let new = s.field("pod", "new", "{.status.containerStatuses[0].imageID}");
    assert_ne!(old, new, "the re-pushed tag is a new image");
    assert_eq!(
        s.ok(&["exec", "new", "--", "sh", "-c", "echo $VERSION"])
            .trim(),
        "2"
    );
    let _ = &s.secure;
}

/// `keelson image pull` inside the lab's namespace with the node's registries.yaml.
fn cli_pull(lab: &Lab, registries_yaml: &std::path::Path, reference: &str) {
    let out = Command::new("ip")
        .args(["netns", "exec", &lab.netns, "timeout", "120"])
        .arg(env!("CARGO_BIN_EXE_keelson"))
        .args(["image", "pull", "--containerd"])
        .arg(lab.socket())
        .arg("--registry-config")
        .arg(registries_yaml)
        .arg(reference)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
}

/// The lab containerd's image names.
fn image_names(lab: &Lab) -> String {
    let out = Command::new("ctr")
        .arg("-a")
        .arg(lab.socket())
        .args(["-n", NS, "images", "ls", "-q"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Used percent of the filesystem at `path`.
fn used_percent(path: &std::path::Path) -> u64 {
    let s = nix::sys::statvfs::statvfs(path).unwrap();
    let total = s.blocks() as u64;
    (total - s.blocks_available() as u64) * 100 / total.max(1)
}

#[test]
fn image_gc_removes_unused_images_least_recently_used_first_on_a_full_image_filesystem() {
    let mut lab = Lab::start_with_image_fs("imggc", 48);
    let plain = Registry::plain(&lab.netns, &lab.dir.path().join("reg"), PLAIN);
    let yaml = lab.dir.path().join("registries.yaml");
    std::fs::write(
        &yaml,
        format!("mirrors:\n  \"{PLAIN}\":\n    endpoint: [\"http://{PLAIN}\"]\n"),
    )
    .unwrap();
    let keep = pack_variant(&lab, "keep");
    plain.push(&format!("oci-archive:{}", keep.display()), "lab/keep:1");
    lab.start_agent_with(&[
        "--standalone",
        "--registry-config",
        yaml.to_str().unwrap(),
        "--image-gc-period",
        "1s",
        "--minimum-image-ttl-duration",
        "0s",
    ]);
    lab.write_manifest(
        "keep.yaml",
        &format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: keep}}\nspec:\n  containers:\n  - name: c\n    image: {PLAIN}/lab/keep:1\n    command: [sleep, \"3600\"]\n"),
    );
    lab.wait_pod("keep", "Running", std::time::Duration::from_secs(60), |p| {
        phase(p) == "Running"
    });
    // Unused images of 5 MiB layers each (content plus snapshot: about 10 MiB of the 48)
    // until the image filesystem passes the high threshold (85 %).
    let root = lab.dir.path().join("containerd/root");
    let mut pulled = Vec::new();
    for n in 0..4 {
        let name = format!("gc{n}");
        let ar = pack_random(&lab, &name, 5 << 20);
        plain.push(
            &format!("oci-archive:{}", ar.display()),
            &format!("lab/{name}:1"),
        );
        cli_pull(&lab, &yaml, &format!("{PLAIN}/lab/{name}:1"));
        pulled.push(format!("{PLAIN}/lab/{name}:1"));
        // Each pull is seen by GC before the next (least recently used = first pulled).
        std::thread::sleep(std::time::Duration::from_millis(2500));
        if used_percent(&root) >= 85 {
            break;
        }
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while image_names(&lab).contains(&pulled[0]) {
        assert!(
            std::time::Instant::now() < deadline,
            "the oldest unused image stays at {} % used:\n{}\n{}",
            used_percent(&root),
            image_names(&lab),
            lab.agent_log()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert!(used_percent(&root) < 85, "{} %", used_percent(&root));
    let names = image_names(&lab);
    assert!(
        names.contains(&format!("{PLAIN}/lab/keep:1")),
        "the used image stays:\n{names}"
    );
    assert!(names.contains("keelson.local/pause"), "pinned:\n{names}");
    assert!(
        names.contains(BUSYBOX),
        "the node's own archives are pinned:\n{names}"
    );
    assert!(
        names.contains(pulled.last().unwrap()),
        "the newest stays:\n{names}"
    );
    assert_eq!(
        lab.pod("keep").map(|p| phase(&p)).as_deref(),
        Some("Running")
    );
}
