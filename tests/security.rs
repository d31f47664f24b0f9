//! The audit's attacks, performed on a lab, each shown to fail (one scenario each, in this
//! order): a subPath symlink out of its volume, a container redirecting its ConfigMap volume's
//! `..data` link at a node directory, world-readable secrets and keys, a RuntimeDefault pod
//! calling `unshare`, malformed SPDY header blocks on a kubelet's port-forward, a node's
//! certificate used against another node's kubelet, the API server pointed at a fake kubelet,
//! tokens of another audience and of a deleted pod; and past the first (a minute's)
//! certificates' expiry the node works on renewed ones. (RBAC escalation and the Node
//! authorizer: tests/apiserver_kubectl.rs.)
mod common;

use std::{
    os::unix::fs::PermissionsExt,
    sync::Arc,
    time::{Duration, Instant},
};

use common::{BUSYBOX, Kubectl, cluster::Cluster};

fn pods(node: &str, canary: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: ConfigMap
metadata: {{name: cfg}}
data: {{color: blue}}
---
apiVersion: v1
kind: Secret
metadata: {{name: private}}
stringData: {{key: s3cret}}
---
apiVersion: v1
kind: Pod
metadata: {{name: escape}}
spec:
  nodeName: {node}
  terminationGracePeriodSeconds: 1
  initContainers:
  - name: plant
    image: {BUSYBOX}
    command: ["sh", "-c", "ln -s {canary} /v/out && ln -s / /v/root && mkdir -p /v/in/deep && ln -s in/deep /v/ok && echo inside > /v/in/deep/f"]
    volumeMounts: [{{name: v, mountPath: /v}}]
  containers:
  - name: out
    image: {BUSYBOX}
    command: ["sh", "-c", "ls /x; cat /x/secret; sleep 3600"]
    volumeMounts: [{{name: v, mountPath: /x, subPath: out}}]
  - name: root
    image: {BUSYBOX}
    command: ["sleep", "3600"]
    volumeMounts: [{{name: v, mountPath: /x, subPath: root/etc}}]
  - name: ok
    image: {BUSYBOX}
    command: ["sleep", "3600"]
    volumeMounts: [{{name: v, mountPath: /x, subPath: ok}}]
  volumes: [{{name: v, emptyDir: {{}}}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: redirect}}
spec:
  nodeName: {node}
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: {BUSYBOX}
    command: ["sleep", "3600"]
    volumeMounts: [{{name: cfg, mountPath: /cfg}}, {{name: private, mountPath: /private}}]
  volumes:
  - {{name: cfg, configMap: {{name: cfg}}}}
  - {{name: private, secret: {{secretName: private, defaultMode: 0400}}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: confined}}
spec:
  nodeName: {node}
  terminationGracePeriodSeconds: 1
  securityContext:
    seccompProfile: {{type: RuntimeDefault}}
  containers:
  - name: main
    image: {BUSYBOX}
    command: ["sleep", "3600"]
  - name: open
    image: {BUSYBOX}
    command: ["sleep", "3600"]
    securityContext:
      seccompProfile: {{type: Unconfined}}
"#
    )
}

/// `kubectl exec POD -c C -- sh -c SCRIPT`: (success, stdout + stderr).
fn exec(c: &Cluster, pod: &str, container: &str, script: &str) -> (bool, String) {
    let o = c.kubectl(&["exec", pod, "-c", container, "--", "sh", "-c", script]);
    (
        o.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

/// A client TLS configuration from the lab's PKI: the CA, and `who` (a certificate and key in
/// the server's pki directory) as the client.
fn tls_client(
    c: &Cluster,
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Arc<rustls::ClientConfig> {
    let pem = |p: &std::path::Path| std::fs::read(p).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut &pem(&c.lab_dir().join("server/pki/ca.crt"))[..]) {
        roots.add(cert.unwrap()).unwrap();
    }
    let certs = rustls_pemfile::certs(&mut &pem(cert)[..])
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls_pemfile::private_key(&mut &pem(key)[..])
        .unwrap()
        .unwrap();
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .unwrap(),
    )
}

/// A SYN_STREAM frame whose header block is a zlib stream that ends, followed by more bytes:
/// the block that used to spin the agent's decoder forever.
fn malformed_syn_stream() -> Vec<u8> {
    use std::io::Write;
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    z.write_all(&[0, 0, 0, 0]).unwrap();
    let mut block = z.finish().unwrap();
    block.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef, 1, 2, 3]);
    let len = 10 + block.len();
    let mut f = vec![
        0x80,
        3,
        0,
        1,
        0,
        (len >> 16) as u8,
        (len >> 8) as u8,
        len as u8,
    ];
    f.extend_from_slice(&1u32.to_be_bytes());
    f.extend_from_slice(&0u32.to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(&block);
    f
}

/// Opens a port-forward WebSocket to the kubelet at `addr` for `pod` (with the API server's
/// kubelet-client certificate) and sends `frame`; the connection stays open.
async fn spdy_attack(
    cfg: Arc<rustls::ClientConfig>,
    addr: std::net::SocketAddr,
    pod: &str,
    frame: Vec<u8>,
) -> tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    use futures::SinkExt;
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
        .unwrap();
    let req = tokio_tungstenite::tungstenite::http::Request::builder()
        .uri(format!("wss://{addr}/portForward/default/{pod}"))
        .header("host", addr.to_string())
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .header("sec-websocket-protocol", "SPDY/3.1+portforward.k8s.io")
        .body(())
        .unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(req, tls).await.unwrap();
    ws.send(tokio_tungstenite::tungstenite::Message::Binary(
        frame.into(),
    ))
    .await
    .unwrap();
    ws
}

/// The lab the attacks run on: node1's pods (see [`pods`]) applied, node1's first client
/// certificate (a minute's) and a canary directory of node-only files.
struct Audit {
    c: Cluster,
    /// node1.
    node: String,
    /// The canary directory on the node, holding `secret`.
    canary: std::path::PathBuf,
    /// node1's client certificate on disk, as first issued.
    client_cert: std::path::PathBuf,
    first_cert: String,
    first_expiry: i64,
}

#[test]
fn the_audits_attacks_fail() {
    // Certificates of a minute: the agents renew theirs while the test runs.
    let c = Cluster::up("sec", 2, &["--cluster-signing-duration=60s"]);
    let node = c.nodes[0].clone();
    let client_cert = c
        .lab_dir()
        .join("nodes")
        .join(&node)
        .join("pki/node-client.crt");
    let first_cert = std::fs::read_to_string(&client_cert).unwrap();
    let first_expiry = keelson::agent::bootstrap::validity(&first_cert).unwrap().1;
    assert!(
        first_expiry - jiff::Timestamp::now().as_second() > 30,
        "a minute's certificate"
    );
    // A canary directory on the node (the host's filesystem: lab nodes share it).
    let canary = c.dir.path().join("canary");
    std::fs::create_dir_all(&canary).unwrap();
    std::fs::write(canary.join("secret"), "node-only").unwrap();
    c.apply(&pods(&node, &canary.to_string_lossy()));
    let audit = Audit {
        c,
        node,
        canary,
        client_cert,
        first_cert,
        first_expiry,
    };
    crate::scenarios!(&audit;
        a_subpath_symlink_leaving_its_volume_is_refused,
        configmap_and_secret_volumes_are_read_only_so_data_cannot_be_redirected,
        secret_files_keep_their_mode_and_the_node_and_server_directories_are_private,
        runtime_default_seccomp_refuses_unshare_and_unconfined_has_none,
        malformed_spdy_header_blocks_leave_the_node_ready_and_answering,
        a_nodes_certificate_is_refused_by_another_nodes_kubelet,
        the_api_server_refuses_a_fake_kubelet_before_sending_anything,
        tokens_of_another_audience_or_of_a_deleted_pod_are_no_identity,
        past_the_first_certificates_expiry_the_node_works_with_renewed_ones,
    );
}

/// subPath: symlinks leaving the volume are refused, the container does not start and the
/// node's files stay out of reach; a symlink inside the volume works.
fn a_subpath_symlink_leaving_its_volume_is_refused(a: &Audit) {
    let c = &a.c;
    let state = |name: &str| {
        c.jsonpath(
            &["get", "pod", "escape"],
            &format!(
                "{{.status.containerStatuses[?(@.name==\"{name}\")].state.waiting.reason}}|{{.status.containerStatuses[?(@.name==\"{name}\")].state.waiting.message}}|{{.status.containerStatuses[?(@.name==\"{name}\")].state.running.startedAt}}"
            ),
        )
    };
    c.until(60, "the escape pod's subPath refusals", || {
        let refused = |n: &str| {
            let s = state(n);
            s.starts_with("CreateContainerConfigError|")
                && s.contains("resolves outside of its volume")
        };
        refused("out") && refused("root") && !state("ok").ends_with('|')
    });
    let (ok, out) = exec(c, "escape", "ok", "cat /x/f");
    assert!(ok && out.trim() == "inside", "{out}");
    assert_eq!(
        std::fs::read_to_string(a.canary.join("secret")).unwrap(),
        "node-only"
    );
}

/// ConfigMap/Secret volumes are read-only: `..data` cannot be redirected, and the next update
/// (the agent rewrites the volume) leaves the node directory alone.
fn configmap_and_secret_volumes_are_read_only_so_data_cannot_be_redirected(a: &Audit) {
    let c = &a.c;
    ready(c, "redirect");
    let (ok, out) = exec(
        c,
        "redirect",
        "main",
        &format!("ln -sfn {} /cfg/..data", a.canary.display()),
    );
    assert!(!ok, "{out}");
    let (_, out) = exec(c, "redirect", "main", "readlink /cfg/..data");
    assert!(
        out.trim().starts_with(".."),
        "..data still names a generation: {out}"
    );
    for dir in ["cfg", "private"] {
        let (ok, out) = exec(c, "redirect", "main", &format!("touch /{dir}/x"));
        assert!(!ok && out.contains("Read-only file system"), "{out}");
    }
    c.ok(&[
        "patch",
        "configmap",
        "cfg",
        "--type=merge",
        "-p",
        r#"{"data":{"color":"green"}}"#,
    ]);
    c.until(90, "the ConfigMap update in the running pod", || {
        exec(c, "redirect", "main", "cat /cfg/color").1.trim() == "green"
    });
    assert!(
        a.canary.join("secret").exists(),
        "the canary directory survived"
    );
}

/// The Secret's files carry their mode from their creation; pod directories are private, and
/// so are the node's and the server's keys and store. (Builds on the `redirect` pod being
/// ready.)
fn secret_files_keep_their_mode_and_the_node_and_server_directories_are_private(a: &Audit) {
    let c = &a.c;
    let (_, out) = exec(c, "redirect", "main", "stat -L -c %a /private/key");
    assert_eq!(out.trim(), "400");
    let node_dir = c.lab_dir().join("nodes").join(&a.node);
    let mode = |p: std::path::PathBuf| {
        std::fs::metadata(&p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .permissions()
            .mode()
            & 0o7777
    };
    assert_eq!(mode(node_dir.join("pods")), 0o700);
    assert_eq!(mode(node_dir.join("pki")), 0o700);
    assert_eq!(mode(node_dir.join("pki/node-client.key")), 0o600);
    let server = c.lab_dir().join("server");
    assert_eq!(mode(server.clone()), 0o700);
    assert_eq!(mode(server.join("store")), 0o700);
    assert_eq!(mode(server.join("store/keelson.redb")), 0o600);
    assert_eq!(mode(server.join("pki")), 0o700);
    for f in [
        "ca.key",
        "server.key",
        "sa.key",
        "admin-token",
        "node-token",
    ] {
        assert_eq!(mode(server.join("pki").join(f)), 0o600, "{f}");
    }
}

/// seccomp: RuntimeDefault is applied (mode 2 in /proc/self/status) and unshare is refused;
/// the Unconfined container beside it has none.
fn runtime_default_seccomp_refuses_unshare_and_unconfined_has_none(a: &Audit) {
    let c = &a.c;
    ready(c, "confined");
    let (_, out) = exec(c, "confined", "main", "grep Seccomp: /proc/self/status");
    assert!(out.contains("Seccomp:\t2"), "{out}");
    let (ok, out) = exec(c, "confined", "main", "unshare -n true");
    assert!(!ok && out.contains("Operation not permitted"), "{out}");
    let (_, out) = exec(c, "confined", "open", "grep Seccomp: /proc/self/status");
    assert!(out.contains("Seccomp:\t0"), "{out}");
}

/// Malformed SPDY header blocks on two port-forward connections to node1's kubelet: the node
/// stays Ready and answers, kubectl answers within a second, the agent keeps renewing its
/// Lease. (Builds on the `redirect` pod being ready.)
fn malformed_spdy_header_blocks_leave_the_node_ready_and_answering(a: &Audit) {
    let c = &a.c;
    let bridge = format!("{}-bridge", c.name);
    let pki = c.lab_dir().join("server/pki");
    let kubelet_client = tls_client(
        c,
        &pki.join("kubelet-client.crt"),
        &pki.join("kubelet-client.key"),
    );
    let kubelet: std::net::SocketAddr = "10.250.0.11:10250".parse().unwrap();
    let held = common::in_netns(&bridge, || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let conns = rt.block_on(async {
            let mut v = vec![];
            for _ in 0..2 {
                v.push(
                    spdy_attack(
                        kubelet_client.clone(),
                        kubelet,
                        "redirect",
                        malformed_syn_stream(),
                    )
                    .await,
                );
            }
            v
        });
        (rt, conns)
    });
    std::thread::sleep(Duration::from_secs(1));
    // kubectl answers within a second (the best of three, against the machine's own load).
    let fastest = (0..3)
        .map(|_| {
            let t0 = Instant::now();
            c.ok(&["get", "nodes"]);
            t0.elapsed()
        })
        .min()
        .unwrap();
    assert!(fastest < Duration::from_secs(1), "kubectl took {fastest:?}");
    let t0 = Instant::now();
    let (ok, out) = exec(c, "redirect", "main", "echo alive");
    assert!(ok && out.trim() == "alive", "{out}");
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "exec took {:?}",
        t0.elapsed()
    );
    // The agent keeps renewing its Lease.
    let before = lease_renew_time(c, &a.node);
    c.until(30, "a Lease renewal after the attack", || {
        lease_renew_time(c, &a.node) != before
    });
    drop(held);
}

/// A node's certificate is not the API server's: node2's kubelet refuses node1's.
fn a_nodes_certificate_is_refused_by_another_nodes_kubelet(a: &Audit) {
    let c = &a.c;
    let bridge = format!("{}-bridge", c.name);
    let n1 = c.lab_dir().join("nodes").join(&a.node).join("pki");
    let as_node1 = tls_client(c, &n1.join("node-client.crt"), &n1.join("node-client.key"));
    let code = common::in_netns(&bridge, || {
        tokio::runtime::Runtime::new().unwrap().block_on(async {
            let addr: std::net::SocketAddr = "10.250.0.12:10250".parse().unwrap();
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
            let tls = tokio_rustls::TlsConnector::from(as_node1)
                .connect(name, tcp)
                .await
                .unwrap();
            let (mut send, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                    .await
                    .unwrap();
            tokio::spawn(conn);
            let req = hyper::Request::get("/pods")
                .header("host", addr.to_string())
                .body(String::new())
                .unwrap();
            send.send_request(req).await.unwrap().status().as_u16()
        })
    });
    assert_eq!(code, 401, "node1's certificate on node2's kubelet");
}

/// The API server pointed at a fake kubelet: a Node whose status names a listener of the
/// test's, serving node1's own certificate (the cluster CA's, for another node). The server
/// refuses it before sending anything.
fn the_api_server_refuses_a_fake_kubelet_before_sending_anything(a: &Audit) {
    let c = &a.c;
    c.apply(
        "apiVersion: v1\nkind: Node\nmetadata: {name: ghost}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: haunted}\nspec:\n  nodeName: ghost\n  containers: [{name: c, image: x}]\n",
    );
    c.ok(&[
        "patch", "node", "ghost", "--subresource=status", "--type=merge", "-p",
        r#"{"status":{"addresses":[{"type":"InternalIP","address":"10.250.0.11"}],"daemonEndpoints":{"kubeletEndpoint":{"Port":10299}}}}"#,
    ]);
    let n1 = c.lab_dir().join("nodes").join(&a.node).join("pki");
    let serving = (
        n1.join("kubelet-serving.crt"),
        n1.join("kubelet-serving.key"),
    );
    let fake_rt = tokio::runtime::Runtime::new().unwrap();
    let seen = Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
    let listener = common::in_netns(&a.node, || {
        std::net::TcpListener::bind("10.250.0.11:10299").unwrap()
    });
    {
        let seen = seen.clone();
        let pem = |p: &std::path::Path| std::fs::read(p).unwrap();
        let certs = rustls_pemfile::certs(&mut &pem(&serving.0)[..])
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = rustls_pemfile::private_key(&mut &pem(&serving.1)[..])
            .unwrap()
            .unwrap();
        let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        listener.set_nonblocking(true).unwrap();
        fake_rt.spawn(async move {
            use tokio::io::AsyncReadExt;
            let l = tokio::net::TcpListener::from_std(listener).unwrap();
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
            while let Ok((tcp, _)) = l.accept().await {
                if let Ok(mut tls) = acceptor.accept(tcp).await {
                    let mut buf = vec![0u8; 4096];
                    if let Ok(n) = tls.read(&mut buf).await {
                        seen.lock().unwrap().extend_from_slice(&buf[..n]);
                    }
                }
            }
        });
    }
    let o = c.kubectl(&["logs", "haunted"]);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!o.status.success(), "logs from a fake kubelet: {err}");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        seen.lock().unwrap().is_empty(),
        "the fake kubelet received a request"
    );
    drop(fake_rt);
}

/// Tokens: one for another audience, and one of a deleted pod, are no identity. (Deletes the
/// `confined` pod.)
fn tokens_of_another_audience_or_of_a_deleted_pod_are_no_identity(a: &Audit) {
    let c = &a.c;
    let sa_token = |aud: &str, bound: Option<(&str, &str)>| {
        let mut spec = serde_json::json!({"expirationSeconds": 3600, "audiences": [aud]});
        if let Some((name, uid)) = bound {
            spec["boundObjectRef"] =
                serde_json::json!({"kind": "Pod", "apiVersion": "v1", "name": name, "uid": uid});
        }
        let req = c.dir.path().join("tr.json");
        std::fs::write(&req, serde_json::json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}).to_string()).unwrap();
        let out = c.ok(&[
            "create",
            "--raw",
            "/api/v1/namespaces/default/serviceaccounts/default/token",
            "-f",
            req.to_str().unwrap(),
        ]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        format!("--token={}", v["status"]["token"].as_str().unwrap())
    };
    let code = |token: &str| {
        let o = c.kubectl(&[token, "get", "pods"]);
        String::from_utf8_lossy(&o.stderr).to_string()
    };
    let api = sa_token(rbac_audience(), None);
    assert!(
        code(&api).contains("Forbidden") || code(&api).contains("forbidden"),
        "{}",
        code(&api)
    );
    assert!(code(&sa_token("vault", None)).contains("Unauthorized"));
    let uid = c.jsonpath(&["get", "pod", "confined"], "{.metadata.uid}");
    let bound = sa_token(rbac_audience(), Some(("confined", &uid)));
    assert!(code(&bound).contains("orbidden"), "{}", code(&bound));
    c.ok(&["delete", "pod", "confined", "--wait=true", "--timeout=60s"]);
    assert!(code(&bound).contains("Unauthorized"), "{}", code(&bound));
}

/// Rotation: past the first certificates' expiry the node still works, with a renewed client
/// certificate on disk (and a renewed serving certificate: exec reaches it). (Builds on the
/// `redirect` pod; runs last, as the first certificates expire a minute after the lab came up.)
fn past_the_first_certificates_expiry_the_node_works_with_renewed_ones(a: &Audit) {
    let c = &a.c;
    c.until(90, "the node client certificate renewed", || {
        std::fs::read_to_string(&a.client_cert).unwrap() != a.first_cert
    });
    while jiff::Timestamp::now().as_second() <= a.first_expiry + 1 {
        std::thread::sleep(Duration::from_millis(500));
    }
    let before = lease_renew_time(c, &a.node);
    c.until(30, "a Lease renewal with the renewed certificate", || {
        lease_renew_time(c, &a.node) != before
    });
    let (ok, out) = exec(c, "redirect", "main", "echo rotated");
    assert!(ok && out.trim() == "rotated", "{out}");
    assert_eq!(
        c.jsonpath(
            &["get", "node", &a.node],
            r#"{.status.conditions[?(@.type=="Ready")].status}"#
        ),
        "True"
    );
}

/// The renewTime of `node`'s Lease.
fn lease_renew_time(c: &Cluster, node: &str) -> String {
    c.jsonpath(
        &["-n", "kube-node-lease", "get", "lease", node],
        "{.spec.renewTime}",
    )
}

/// Waits until pod `name` is Ready.
fn ready(c: &Cluster, name: &str) {
    c.until(90, &format!("pod {name} ready"), || {
        c.jsonpath(
            &["get", "pod", name],
            r#"{.status.conditions[?(@.type=="Ready")].status}"#,
        ) == "True"
    });
}

fn rbac_audience() -> &'static str {
    keelson::api::rbac::API_AUDIENCE
}
