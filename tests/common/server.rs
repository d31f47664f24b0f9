//! `keelson server` as a child process: started on loopback (or inside a lab's node namespace),
//! ready once its kubeconfig is written, killed on drop. The one way tests and benches start a
//! server.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use super::kubectl::{Kubectl, tail};

pub struct Server {
    dir: PathBuf,
    /// The temporary directory `dir` lives in, when the server made it.
    _tmp: Option<tempfile::TempDir>,
    child: Option<Child>,
    spec: ServerBuilder,
}

/// How to start a server: `Server::builder().arg(..).netns(..).start()`.
#[derive(Clone, Default)]
pub struct ServerBuilder {
    dir: Option<PathBuf>,
    netns: Option<String>,
    listen: Option<String>,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

impl ServerBuilder {
    /// Keep the data (and kubeconfig, log) in `dir` instead of a new temporary directory.
    pub fn dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.dir = Some(dir.into());
        self
    }
    /// Run inside `/run/netns/NETNS` (kubectl then runs there too).
    pub fn netns(mut self, netns: &str) -> Self {
        self.netns = Some(netns.into());
        self
    }
    /// The listen address (default `127.0.0.1:0`: a free port, named in the kubeconfig).
    pub fn listen(mut self, addr: &str) -> Self {
        self.listen = Some(addr.into());
        self
    }
    pub fn args(mut self, args: &[&str]) -> Self {
        self.args.extend(args.iter().map(|a| a.to_string()));
        self
    }
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }
    pub fn start(self) -> Server {
        let (dir, tmp) = match &self.dir {
            Some(d) => (d.clone(), None),
            None => {
                let t = tempfile::Builder::new()
                    .prefix("keelson-server-")
                    .tempdir()
                    .unwrap();
                (t.path().to_path_buf(), Some(t))
            }
        };
        let mut s = Server {
            dir,
            _tmp: tmp,
            child: None,
            spec: self,
        };
        s.launch();
        s
    }
}

impl Server {
    pub fn builder() -> ServerBuilder {
        ServerBuilder::default()
    }

    /// A server on loopback in a new temporary directory, with `args` added.
    pub fn start(args: &[&str]) -> Server {
        Self::builder().args(args).start()
    }

    fn launch(&mut self) {
        std::fs::create_dir_all(&self.dir).unwrap();
        let kubeconfig = self.kubeconfig();
        let _ = std::fs::remove_file(&kubeconfig);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let bin = env!("CARGO_BIN_EXE_keelson");
        let mut cmd = match &self.spec.netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{ns}")).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        cmd.arg("server")
            .arg("--listen")
            .arg(self.spec.listen.as_deref().unwrap_or("127.0.0.1:0"))
            .arg("--data-dir")
            .arg(&self.dir)
            .args(&self.spec.args)
            .env(
                "RUST_LOG",
                std::env::var("KEELSON_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(self.spec.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log);
        self.child = Some(cmd.spawn().expect("start keelson server"));
        let t0 = Instant::now();
        while !kubeconfig.exists() {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("keelson server exited ({status}):\n{}", self.log_tail());
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "server did not start:\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL, as a crash would (the data directory stays).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills the server and starts it again on the same data directory with the same flags.
    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server running").id()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    pub fn log_tail(&self) -> String {
        tail(
            &std::fs::read_to_string(self.log_path()).unwrap_or_default(),
            30,
        )
    }

    /// The server's URL, from its kubeconfig.
    pub fn url(&self) -> String {
        let kc = std::fs::read_to_string(self.kubeconfig()).unwrap();
        kc.lines()
            .find_map(|l| l.trim().strip_prefix("server: "))
            .expect("kubeconfig names the server")
            .to_string()
    }

    /// The join token agents present (`--token-file`).
    pub fn node_token_file(&self) -> PathBuf {
        self.dir.join("node-token")
    }

    pub fn node_token(&self) -> String {
        std::fs::read_to_string(self.node_token_file())
            .unwrap()
            .trim()
            .to_string()
    }

    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("pki/ca.crt")
    }

    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(self.dir.join("pki/admin-token"))
            .unwrap()
            .trim()
            .to_string()
    }

    /// Writes `content` to a file in the server's directory; its path.
    pub fn write(&self, name: &str, content: &str) -> String {
        let p = self.dir.join(name);
        std::fs::write(&p, content).unwrap();
        p.to_string_lossy().to_string()
    }

    /// A token for service account `default/NAME` for `audiences` (the API server's when
    /// empty), by a TokenRequest through the API.
    pub fn sa_token(&self, name: &str, audiences: &[&str]) -> String {
        let req = serde_json::json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
            "spec": {"expirationSeconds": 3600, "audiences": audiences}});
        let req = self.write(&format!("tokenrequest-{name}.json"), &req.to_string());
        let out = self.ok(&[
            "create",
            "--raw",
            &format!("/api/v1/namespaces/default/serviceaccounts/{name}/token"),
            "-f",
            &req,
        ]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("a TokenRequest answer");
        v["status"]["token"].as_str().expect("a token").to_string()
    }

    /// A kube-rs client with the admin kubeconfig.
    pub async fn client(&self) -> kube::Client {
        keelson::control::client_from(&self.kubeconfig())
            .await
            .unwrap()
    }
}

impl Kubectl for Server {
    fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig.yaml")
    }
    fn home(&self) -> PathBuf {
        self.dir.clone()
    }
    fn netns(&self) -> Option<String> {
        self.spec.netns.clone()
    }
    fn diagnostics(&self) -> String {
        format!("server log tail:\n{}", self.log_tail())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}
