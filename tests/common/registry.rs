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
