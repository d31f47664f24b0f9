//! A real OCI registry (Debian's `docker-registry`, the CNCF distribution server) inside a lab
//! namespace: plain HTTP, or HTTPS with a CA the test makes and htpasswd basic auth. Images are
//! pushed with Debian's `skopeo`; the registry's access log counts the requests a pull made.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use super::{KillOnDrop, run};

pub struct Registry {
    pub dir: PathBuf,
    pub netns: String,
    /// `host:port` as pulled from.
    pub addr: String,
    /// The CA that signed the registry's certificate (HTTPS only).
    pub ca: Option<PathBuf>,
    /// `user:password` the registry accepts (HTTPS only).
    pub creds: Option<String>,
    config: PathBuf,
    child: Option<KillOnDrop>,
}

/// `docker-registry`'s configuration: storage under `dir`, listening on `addr`.
fn config_text(
    dir: &Path,
    addr: &str,
    tls: Option<(&Path, &Path)>,
    htpasswd: Option<&Path>,
) -> String {
    let mut y = format!(
        "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
        dir.join("storage").display()
    );
    if let Some((cert, key)) = tls {
        y += &format!(
            "  tls:\n    certificate: {}\n    key: {}\n",
            cert.display(),
            key.display()
        );
    }
    if let Some(h) = htpasswd {
        y += &format!(
            "auth:\n  htpasswd:\n    realm: keelson-lab\n    path: {}\n",
            h.display()
        );
    }
    y
}

impl Registry {
    /// A plain-HTTP registry on `addr` (an address of `netns`).
    pub fn plain(netns: &str, dir: &Path, addr: &str) -> Registry {
        std::fs::create_dir_all(dir).unwrap();
        let config = dir.join("config.yml");
        std::fs::write(&config, config_text(dir, addr, None, None)).unwrap();
        let mut r = Registry {
            dir: dir.into(),
            netns: netns.into(),
            addr: addr.into(),
            ca: None,
            creds: None,
            config,
            child: None,
        };
        r.start();
        r
    }

    /// An HTTPS registry on `addr` with a certificate for its IP signed by a new CA, and
    /// basic auth for `user:password`.
    pub fn https(netns: &str, dir: &Path, addr: &str, creds: &str) -> Registry {
        std::fs::create_dir_all(dir).unwrap();
        let ip = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
        let (ca, cert, key) = (
            dir.join("ca.pem"),
            dir.join("cert.pem"),
            dir.join("key.pem"),
        );
        let ca_key = dir.join("ca.key");
        run(Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=keelson lab registry CA",
                "-keyout",
            ])
            .arg(&ca_key)
            .arg("-out")
            .arg(&ca)
            .stderr(Stdio::null()));
        let csr = dir.join("cert.csr");
        run(Command::new("openssl")
            .args([
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                "/CN=registry",
                "-keyout",
            ])
            .arg(&key)
            .arg("-out")
            .arg(&csr)
            .stderr(Stdio::null()));
        let ext = dir.join("ext.cnf");
        std::fs::write(&ext, format!("subjectAltName=IP:{ip}\n")).unwrap();
        run(Command::new("openssl")
            .args(["x509", "-req", "-days", "2", "-CAcreateserial", "-in"])
            .arg(&csr)
            .arg("-CA")
            .arg(&ca)
            .arg("-CAkey")
            .arg(&ca_key)
            .arg("-extfile")
            .arg(&ext)
            .arg("-out")
            .arg(&cert)
            .stderr(Stdio::null()));
        let htpasswd = dir.join("htpasswd");
        let (user, pass) = creds.split_once(':').unwrap();
        run(Command::new("htpasswd")
            .args(["-Bbc"])
            .arg(&htpasswd)
            .args([user, pass])
            .stderr(Stdio::null()));
        let config = dir.join("config.yml");
        std::fs::write(
            &config,
            config_text(dir, addr, Some((&cert, &key)), Some(&htpasswd)),
        )
        .unwrap();
        let mut r = Registry {
            dir: dir.into(),
            netns: netns.into(),
            addr: addr.into(),
            ca: Some(ca),
            creds: Some(creds.into()),
            config,
            child: None,
        };
        r.start();
        r
    }

    /// A plain-HTTP registry on `addr` whose clients need a bearer token from `tokens`.
    pub fn with_tokens(
        netns: &str,
        dir: &Path,
        addr: &str,
        tokens: &TokenServer,
        creds: &str,
    ) -> Registry {
        std::fs::create_dir_all(dir).unwrap();
        let config = dir.join("config.yml");
        let mut y = config_text(dir, addr, None, None);
        y += &format!(
            "auth:\n  token:\n    realm: {}\n    service: {TOKEN_SERVICE}\n    issuer: {TOKEN_ISSUER}\n    rootcertbundle: {}\n",
            tokens.realm,
            tokens.cert_pem.display()
        );
        std::fs::write(&config, y).unwrap();
        let mut r = Registry {
            dir: dir.into(),
            netns: netns.into(),
            addr: addr.into(),
            ca: None,
            creds: Some(creds.into()),
            config,
            child: None,
        };
        r.start();
        r
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("registry.log")
    }

    /// Starts (or restarts) the server and waits until it answers.
    pub fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.netns, "docker-registry", "serve"])
            .arg(&self.config)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("docker-registry is installed");
        self.child = Some(KillOnDrop(child));
        let deadline = Instant::now() + Duration::from_secs(20);
        let port = self
            .addr
            .rsplit_once(':')
            .map_or("", |(_, p)| p)
            .to_string();
        loop {
            let ss = run(Command::new("ip").args(["netns", "exec", &self.netns, "ss", "-ltnH"]));
            if ss.contains(&format!(":{port} ")) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "registry did not start:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the server (SIGKILL).
    pub fn kill(&mut self) {
        self.child = None;
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Pushes an image archive (`oci-archive:` or `docker-archive:` made by the test) as
    /// `repo:tag` (`--all`: every manifest of an index).
    pub fn push(&self, source: &str, repo_tag: &str) {
        let mut cmd = Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            &self.netns,
            "skopeo",
            "copy",
            "--all",
            "--quiet",
            "--dest-tls-verify=false",
        ]);
        if let Some(c) = &self.creds {
            cmd.args(["--dest-creds", c]);
        }
        cmd.arg(source)
            .arg(format!("docker://{}/{repo_tag}", self.addr));
        run(&mut cmd);
    }

    /// Deletes a tag's manifest (by digest, as the distribution API wants).
    pub fn delete_tag(&self, repo_tag: &str) {
        let mut cmd = Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            &self.netns,
            "skopeo",
            "delete",
            "--tls-verify=false",
        ]);
        if let Some(c) = &self.creds {
            cmd.args(["--creds", c]);
        }
        cmd.arg(format!("docker://{}/{repo_tag}", self.addr));
        run(&mut cmd);
    }

    /// GET requests for `what` (`blobs`, `manifests`) of `repo` answered so far.
    pub fn gets(&self, repo: &str, what: &str) -> usize {
        let needle = format!("\"GET /v2/{repo}/{what}/");
        self.log().lines().filter(|l| l.contains(&needle)).count()
    }
}

/// What a [`FaultyProxy`] does to the first blob response larger than its threshold.
#[derive(Debug, Clone, Copy)]
pub enum Fault {
    /// The connection is cut after this many bytes of the response.
    CutAfter(usize),
    /// One byte of the body, this far into it, is flipped.
    CorruptAt(usize),
}

/// An HTTP proxy in front of a registry (in the lab namespace) that spoils one blob response:
/// a registry that resets mid-layer, or one that sends a corrupt blob. It records each request
/// line with its `Range` header.
pub struct FaultyProxy {
    pub addr: String,
    requests: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl FaultyProxy {
    pub fn start(netns: &str, listen: &str, upstream: &str, fault: Fault) -> FaultyProxy {
        use std::sync::{Arc, Mutex, atomic::AtomicBool};
        let requests = Arc::new(Mutex::new(Vec::new()));
        let armed = Arc::new(AtomicBool::new(true));
        let (up, reqs) = (upstream.to_string(), requests.clone());
        let stop = serve_in_netns(netns, listen, move |c| {
            proxy_one(c, &up, &reqs, &armed, fault)
        });
        FaultyProxy {
            addr: listen.into(),
            requests,
            stop,
        }
    }

    /// The requests so far (`GET /v2/… HTTP/1.1 range=bytes=N-`).
    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for FaultyProxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Serves `listen` in namespace `netns` from a thread of its own (the threads it starts for
/// each connection live there too), `handle` called with each connection, until the returned
/// flag is set.
pub fn serve_in_netns(
    netns: &str,
    listen: &str,
    handle: impl Fn(std::net::TcpStream) + Send + Sync + 'static,
) -> std::sync::Arc<std::sync::atomic::AtomicBool> {
    use std::sync::{Arc, atomic::AtomicBool};
    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (ns, at, stop2) = (netns.to_string(), listen.to_string(), stop.clone());
    let handle = Arc::new(handle);
    std::thread::spawn(move || {
        use std::os::fd::AsFd;
        let f = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
        nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let l = std::net::TcpListener::bind(&at).unwrap();
        l.set_nonblocking(true).unwrap();
        ready_tx.send(()).unwrap();
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            match l.accept() {
                Ok((c, _)) => {
                    let handle = handle.clone();
                    std::thread::spawn(move || handle(c));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    });
    ready_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    stop
}

/// An HTTP request's head (request line and headers), read from a blocking connection.
fn read_head(c: &mut std::net::TcpStream) -> Option<String> {
    use std::io::Read;
    let _ = c.set_nonblocking(false);
    let _ = c.set_read_timeout(Some(Duration::from_secs(10)));
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match c.read(&mut b) {
            Ok(1) => head.push(b[0]),
            _ => return None,
        }
    }
    Some(String::from_utf8_lossy(&head).to_string())
}

/// One request through the proxy: `Connection: close` added so that each connection carries
/// one exchange, the response relayed (and spoiled once when armed).
fn proxy_one(
    mut c: std::net::TcpStream,
    upstream: &str,
    reqs: &std::sync::Mutex<Vec<String>>,
    armed: &std::sync::atomic::AtomicBool,
    fault: Fault,
) {
    use std::io::{Read, Write};
    let Some(text) = read_head(&mut c) else {
        return;
    };
    let line = text.lines().next().unwrap_or("").to_string();
    let range = text.lines().find_map(|l| {
        l.to_ascii_lowercase()
            .strip_prefix("range:")
            .map(|r| r.trim().to_string())
    });
    reqs.lock().unwrap().push(match &range {
        Some(r) => format!("{line} range={r}"),
        None => line.clone(),
    });
    let mut fwd = String::new();
    for l in text.split("\r\n").filter(|l| !l.is_empty()) {
        if !l.to_ascii_lowercase().starts_with("connection:") {
            fwd.push_str(l);
            fwd.push_str("\r\n");
        }
    }
    fwd.push_str("Connection: close\r\n\r\n");
    let Ok(mut u) = std::net::TcpStream::connect(upstream) else {
        return;
    };
    if u.write_all(fwd.as_bytes()).is_err() {
        return;
    }
    let blob = line.contains("/blobs/") && line.starts_with("GET");
    let mut resp = Vec::new();
    let _ = u.read_to_end(&mut resp);
    let header_end = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(0, |p| p + 4);
    let spoil = blob && resp.len() > header_end + 64 * 1024;
    if spoil && armed.swap(false, std::sync::atomic::Ordering::SeqCst) {
        match fault {
            Fault::CutAfter(n) => {
                let _ = c.write_all(&resp[..(header_end + n).min(resp.len())]);
                let _ = c.shutdown(std::net::Shutdown::Both);
                return;
            }
            Fault::CorruptAt(n) => {
                let at = (header_end + n).min(resp.len() - 1);
                resp[at] ^= 0xff;
            }
        }
    }
    let _ = c.write_all(&resp);
}

/// A registry token service (the `auth.token` scheme of the distribution registry): it answers
/// `GET /token?service=…&scope=repository:NAME:ACTIONS` with a JWT signed by its own key
/// (ES256, its certificate in the `x5c` header) granting the scope's actions to `user:password`
/// (basic auth), and nothing to anyone else.
pub struct TokenServer {
    pub realm: String,
    /// The certificate the registry trusts (its `rootcertbundle`).
    pub cert_pem: PathBuf,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

pub const TOKEN_ISSUER: &str = "keelson-lab-tokens";
pub const TOKEN_SERVICE: &str = "lab-registry";

impl TokenServer {
    pub fn start(netns: &str, dir: &Path, listen: &str, creds: &str) -> TokenServer {
        std::fs::create_dir_all(dir).unwrap();
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["lab-token-service".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let cert_pem = dir.join("token-cert.pem");
        std::fs::write(&cert_pem, cert.pem()).unwrap();
        let x5c = base64_std(cert.der());
        let creds = creds.to_string();
        let stop = serve_in_netns(netns, listen, move |c| answer_token(c, &key, &x5c, &creds));
        TokenServer {
            realm: format!("http://{listen}/token"),
            cert_pem,
            stop,
        }
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

fn base64_std(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(b)
}

fn base64_url(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// `%XX` and `+` decoded.
fn url_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        match (b[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
                continue;
            }
            (b'+', _) => out.push(b' '),
            (c, _) => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).to_string()
}

/// An ECDSA signature in DER (SEQUENCE of two INTEGERs) as JWS wants it: r ‖ s, 32 bytes each.
fn der_to_raw(der: &[u8]) -> Vec<u8> {
    let mut i = 2; // SEQUENCE tag and (short) length
    let mut out = Vec::new();
    for _ in 0..2 {
        assert_eq!(der[i], 0x02, "INTEGER");
        let len = der[i + 1] as usize;
        let mut v = &der[i + 2..i + 2 + len];
        while v.len() > 32 && v[0] == 0 {
            v = &v[1..];
        }
        out.extend(std::iter::repeat_n(0u8, 32 - v.len()));
        out.extend_from_slice(v);
        i += 2 + len;
    }
    out
}

fn answer_token(mut c: std::net::TcpStream, key: &rcgen::KeyPair, x5c: &str, creds: &str) {
    use rcgen::SigningKey as _;
    use std::io::Write;
    let Some(text) = read_head(&mut c) else {
        return;
    };
    let target = text
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("");
    let query = target.split_once('?').map_or("", |(_, q)| q);
    let auth = text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.eq_ignore_ascii_case("authorization")).then(|| v.trim().to_string())
    });
    let user = auth
        .as_deref()
        .and_then(|a| a.strip_prefix("Basic "))
        .and_then(|b| {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD.decode(b).ok()
        })
        .map(|d| String::from_utf8_lossy(&d).to_string());
    let respond = |c: &mut std::net::TcpStream, status: &str, body: &str| {
        let _ = write!(
            c,
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    };
    if user.as_deref().is_some_and(|u| u != creds) {
        return respond(
            &mut c,
            "401 Unauthorized",
            r#"{"errors":[{"code":"UNAUTHORIZED","message":"wrong credentials"}]}"#,
        );
    }
    // The scope's actions for the right user; nothing for anonymous callers.
    let mut access = Vec::new();
    for (k, v) in query.split('&').filter_map(|kv| kv.split_once('=')) {
        if k != "scope" || user.is_none() {
            continue;
        }
        let scope = url_decode(v);
        let mut parts = scope.splitn(3, ':');
        let (ty, name, actions) = (
            parts.next().unwrap_or(""),
            parts.next().unwrap_or(""),
            parts.next().unwrap_or(""),
        );
        access.push(serde_json::json!({"type": ty, "name": name, "actions": actions.split(',').collect::<Vec<_>>()}));
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let header = serde_json::json!({"typ": "JWT", "alg": "ES256", "x5c": [x5c]});
    let claims = serde_json::json!({
        "iss": TOKEN_ISSUER, "sub": user.as_deref().unwrap_or("").split(':').next().unwrap_or(""),
        "aud": TOKEN_SERVICE, "exp": now + 300, "nbf": now - 10, "iat": now,
        "jti": format!("{now}-{}", std::process::id()), "access": access,
    });
    let signing_input = format!(
        "{}.{}",
        base64_url(header.to_string().as_bytes()),
        base64_url(claims.to_string().as_bytes())
    );
    let sig = der_to_raw(&key.sign(signing_input.as_bytes()).unwrap());
    let jwt = format!("{signing_input}.{}", base64_url(&sig));
    let body =
        serde_json::json!({"token": jwt, "access_token": jwt, "expires_in": 300}).to_string();
    respond(&mut c, "200 OK", &body);
}
