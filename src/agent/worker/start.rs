//! Starting things: the sandbox (pause + pod network) and container instances, their log
//! pumps, probes and hooks.

use super::*;
use crate::kinds::dns;

impl PodWorker {
    /// Kills every container and the old sandbox; the next sync makes a new one.
    pub(super) async fn replace_sandbox(&mut self) {
        tracing::info!(
            event = "SandboxChanged",
            "Pod sandbox changed, it will be killed and re-created."
        );
        self.stop_running().await;
        if let Some(sb) = self.state.take_sandbox() {
            self.unregister(&sb.id);
            self.net_teardown(&sb.id, Some(sb.pid)).await;
            remove_container(self.ctx.rt.as_ref(), &sb.id).await;
        }
    }

    /// The shim group of the pod whose sandbox is `sandbox_id`: the sandbox (one shim per
    /// pod, as the CRI plugin) or the node (`--shim-group node`).
    fn shim_group(&self, sandbox_id: &str) -> String {
        if self.ctx.cfg.shim_per_node {
            format!("keelson-node-{}", self.ctx.cfg.node_name)
        } else {
            sandbox_id.to_string()
        }
    }

    pub(super) fn sandbox_info(&self) -> SandboxInfo {
        let sb = self.state.sandbox();
        let host_network = spec_of(&self.pod).host_network.unwrap_or(false);
        SandboxInfo {
            pause_pid: sb.map_or(0, |s| s.pid),
            pod_ip: if host_network {
                Some(self.ctx.cfg.node_ip.to_string())
            } else {
                sb.and_then(|s| s.ip).map(|i| i.to_string())
            },
            host_ip: self.ctx.cfg.node_ip.to_string(),
            node_name: self.ctx.cfg.node_name.clone(),
            pod_dir: self.pod_dir(),
            host_network,
            refs: self.refs.clone(),
        }
    }

    /// Fetches the ConfigMaps and Secrets the pod references (cluster mode; a standalone agent
    /// has none, and such pods fail with kubelet's "not found" errors).
    pub(super) async fn refresh_refs(&mut self) {
        let Some(client) = &self.ctx.client else {
            return;
        };
        let (cms, secrets) = build::referenced(&self.pod);
        let mut refs = build::Refs::default();
        let cm_api: kube::Api<k8s_openapi::api::core::v1::ConfigMap> =
            kube::Api::namespaced(client.clone(), &self.namespace);
        for n in cms {
            match cm_api.get_opt(&n).await {
                Ok(Some(c)) => {
                    refs.config_maps.insert(n, c);
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(configmap = %n, error = %e, "reading a ConfigMap")
                }
            }
        }
        let sec_api: kube::Api<k8s_openapi::api::core::v1::Secret> =
            kube::Api::namespaced(client.clone(), &self.namespace);
        for n in secrets {
            match sec_api.get_opt(&n).await {
                Ok(Some(sec)) => {
                    refs.secrets.insert(n, sec);
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(secret = %n, error = %e, "reading a Secret")
                }
            }
        }
        refs.claims = claims_of(client, &self.pod, &self.namespace).await;
        // Projected service account tokens: kept while fresh, requested again at 80% of their
        // lifetime (kubelet's TokenRequest, bound to the pod).
        let mut tokens = std::mem::take(&mut self.refs.tokens);
        for (aud, secs) in build::token_requests(&self.pod) {
            if tokens.get(&aud).is_some_and(|t| !t.stale()) {
                continue;
            }
            match self.request_token(client, &aud, secs).await {
                Ok(t) => {
                    tokens.insert(aud, t);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "requesting the service account token")
                }
            }
        }
        refs.tokens = tokens;
        refs.kubernetes = match self.refs.kubernetes.take() {
            Some(k) => Some(k),
            None => kubernetes_service(client).await,
        };
        self.refs = refs;
    }

    pub(super) fn pod_ref(&self) -> net::cni::PodRef {
        net::cni::PodRef {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            uid: self.uid.clone(),
        }
    }

    /// Removes the sandbox's network (`pid`: its pause, if it still runs).
    pub(super) async fn net_teardown(&self, sandbox_id: &str, pid: Option<u32>) {
        self.ctx
            .network
            .detach(&self.pod_ref(), Some(sandbox_id), pid)
            .await;
    }

    async fn request_token(
        &self,
        client: &kube::Client,
        audience: &str,
        secs: i64,
    ) -> Result<build::Token, TokenError> {
        let spec = self.pod.spec.as_ref();
        let sa = spec
            .and_then(|s| s.service_account_name.clone())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".into());
        let mut req = serde_json::json!({
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
            "spec": {"expirationSeconds": secs,
                     "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": self.name, "uid": self.uid}}});
        if !audience.is_empty() {
            req["spec"]["audiences"] = serde_json::json!([audience]);
        }
        let api: kube::Api<k8s_openapi::api::core::v1::ServiceAccount> =
            kube::Api::namespaced(client.clone(), &self.namespace);
        let out: serde_json::Value = api
            .create_subresource("token", &sa, &kube::api::PostParams::default(), &req)
            .await
            .map_err(|source| TokenError::Request {
                sa: sa.clone(),
                source,
            })?;
        let token = out
            .pointer("/status/token")
            .and_then(serde_json::Value::as_str)
            .ok_or(TokenError::NoToken)?
            .to_string();
        let ttl = out
            .pointer("/status/expirationTimestamp")
            .and_then(serde_json::Value::as_str)
            .and_then(|t| t.parse::<Timestamp>().ok())
            .map(|t| t.duration_since(Timestamp::now()).unsigned_abs())
            .unwrap_or(Duration::from_secs(secs.max(600) as u64));
        Ok(build::Token {
            token,
            fetched: std::time::Instant::now(),
            ttl,
        })
    }

    /// Makes the pod's sandbox: its address (built-in network), its files (/etc/hosts,
    /// hostname, resolv.conf), the pause container, and the network wired to it.
    pub(super) async fn create_sandbox(&mut self) -> Result<Sandbox, SandboxError> {
        let host_network = spec_of(&self.pod).host_network.unwrap_or(false);
        let pod = self.pod_ref();
        // The built-in network reserves the address now (the pod's files name it); with CNI
        // the plugins' IPAM hands it out once the sandbox exists.
        let reserved = match host_network {
            true => None,
            false => self.ctx.network.reserve(&pod)?,
        };
        let dir = self.pod_dir();
        self.write_sandbox_files(&dir, reserved.unwrap_or(self.ctx.cfg.node_ip))?;
        let id = random_hex(16);
        let mut spec = spec::build(&self.sandbox_config(&id, self.uts_hostname()?))?;
        spec::set_shim_group(&mut spec, &self.shim_group(&id));
        let start = self.start_time.unwrap_or_else(Timestamp::now);
        let labels = self.labels(
            "sandbox",
            "POD",
            0,
            [(labels::POD_STARTED, start.to_string())],
        );
        // Routed before it starts, so that even an immediate exit reaches this worker.
        self.register(&id);
        let made = sandbox::create(
            self.ctx.rt.as_ref(),
            self.ctx.network.as_ref(),
            sandbox::SandboxSpec {
                id: &id,
                pod: &pod,
                pause: &self.ctx.pause,
                spec: &spec,
                labels,
                host_network,
                reserved,
            },
        )
        .await;
        let (pid, ip) = match made {
            Ok(m) => m,
            Err(e) => {
                self.unregister(&id);
                return Err(e);
            }
        };
        // CNI: /etc/hosts names the address the plugins gave.
        if let Some(a) = ip.filter(|a| Some(*a) != reserved) {
            let _ = std::fs::write(dir.join("etc-hosts"), self.hosts_file(a.into()));
        }
        self.start_time = Some(start);
        Ok(Sandbox { id, pid, ip })
    }

    /// The pod's /etc/hosts (naming `ip`), hostname and resolv.conf, in its directory, as
    /// kubelet makes them (dnsPolicy, dnsConfig, hostname/subdomain, hostAliases); what
    /// kubelet would warn about becomes a Warning event.
    fn write_sandbox_files(&self, dir: &std::path::Path, ip: Ipv4Addr) -> Result<(), SandboxError> {
        let io = |path: PathBuf| move |source| SandboxError::Files { path, source };
        crate::runtime::private_dir(dir, 0o700).map_err(io(dir.to_path_buf()))?;
        let cfg = &self.ctx.cfg;
        let host = match &cfg.resolv_conf {
            Some(p) => Some(dns::ResolvConf::parse(
                &std::fs::read_to_string(p).map_err(io(p.clone()))?,
            )),
            None => None,
        };
        let cluster = dns::ClusterDns {
            servers: &cfg.cluster_dns,
            domain: &cfg.cluster_domain,
        };
        let resolv = dns::pod_resolv_conf(&self.pod, Some(cluster), host.as_ref());
        for (reason, message) in resolv.warnings {
            self.event(true, reason, message);
        }
        let hostname = self.uts_hostname()?;
        for (f, content) in [
            ("etc-hosts", self.hosts_file(ip.into())),
            ("hostname", format!("{hostname}\n")),
            ("resolv.conf", resolv.conf.render()),
        ] {
            std::fs::write(dir.join(f), content).map_err(io(dir.join(f)))?;
        }
        Ok(())
    }

    /// The name in the pod's UTS namespace (its FQDN with setHostnameAsFQDN).
    fn uts_hostname(&self) -> Result<String, SandboxError> {
        dns::uts_hostname(&self.pod, &self.ctx.cfg.cluster_domain).map_err(SandboxError::Pod)
    }

    /// The pod's /etc/hosts naming `ip` (hostNetwork: the node's file), with its hostAliases.
    fn hosts_file(&self, ip: std::net::IpAddr) -> String {
        let node = spec_of(&self.pod)
            .host_network
            .unwrap_or(false)
            .then(|| std::fs::read_to_string("/etc/hosts").unwrap_or_default());
        dns::hosts_file(&self.pod, ip, &self.ctx.cfg.cluster_domain, node.as_deref())
    }

    /// The pause container's runtime config: new namespaces, or the node's for hostNetwork,
    /// hostIPC and hostPID (the agent's, which are the node's).
    fn sandbox_config(&self, id: &str, hostname: String) -> RuntimeConfig {
        let pod_spec = spec_of(&self.pod);
        let node_ns = |ns: &str| Ns::Join(format!("/proc/{}/ns/{ns}", std::process::id()));
        let pick = |on: Option<bool>, ns: &str| match on.unwrap_or(false) {
            true => node_ns(ns),
            false => Ns::New,
        };
        let host_network = pod_spec.host_network.unwrap_or(false);
        RuntimeConfig {
            process: ProcessConfig {
                args: vec!["/pause".into()],
                cap_drop: vec!["ALL".into()],
                ..Default::default()
            },
            hostname,
            readonly_rootfs: true,
            mounts: vec![],
            net: pick(pod_spec.host_network, "net"),
            ipc: pick(pod_spec.host_ipc, "ipc"),
            uts: if host_network { Ns::Host } else { Ns::New },
            pid: pick(pod_spec.host_pid, "pid"),
            cgroups_path: format!("/keelson/{id}"),
            memory_limit: None,
            cpu_quota: None,
            cpu_period: None,
            cpu_shares: Some(2),
            oom_score_adj: None,
            seccomp: Default::default(),
        }
    }

    pub(super) fn labels<const N: usize>(
        &self,
        kind: &str,
        name: &str,
        restart: i32,
        extra: [(&str, String); N],
    ) -> HashMap<String, String> {
        let mut l: HashMap<String, String> = [
            (labels::POD_UID, self.uid.clone()),
            (labels::POD_NAME, self.name.clone()),
            (labels::POD_NAMESPACE, self.namespace.clone()),
            (labels::NAME, name.to_string()),
            (labels::KIND, kind.to_string()),
            (labels::RESTART, restart.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        for (k, v) in extra {
            l.insert(k.to_string(), v);
        }
        l
    }

    /// Marks a container as failing to start, with kubelet's waiting reason.
    pub(super) fn fail_start(
        &mut self,
        kind: Kind,
        i: usize,
        reason: &str,
        message: String,
        retry: Duration,
    ) {
        tracing::warn!(container = %self.container(kind, i).name, reason, "{message}");
        let rec = self.rec(kind, i);
        rec.waiting = Some((reason.to_string(), message));
        rec.retry_at = Some(Instant::now() + retry);
        self.set_wake(Instant::now() + retry);
    }

    /// Starts a new instance of a container: its image, config and spec, its log FIFOs, the
    /// container, then the task; a step that fails is the container's waiting reason, retried
    /// in 10 s.
    pub(super) async fn start(&mut self, kind: Kind, i: usize) {
        let c = self.container(kind, i).clone();
        let id = random_hex(16);
        let prepared = match self.image_for(kind, i, &c).await {
            Ok(img) => self.prepare(&c, img, &id).await,
            Err(f) => Err(f),
        };
        let (img, rc, spec) = match prepared {
            Ok(p) => p,
            Err(StartFailure {
                reason,
                message,
                retry: Some(retry),
            }) => {
                self.fail_start(kind, i, reason, message, retry);
                return;
            }
            Err(StartFailure { retry: None, .. }) => {
                // Waiting for a pull: its end wakes the worker.
                let rec = self.rec(kind, i);
                rec.waiting = None;
                rec.retry_at = Some(Instant::now() + Duration::from_secs(24 * 3600));
                return;
            }
        };
        let rec = self.rec(kind, i);
        let restart = rec
            .current
            .as_ref()
            .map(|c| c.restart_count + 1)
            .unwrap_or_else(|| rec.previous.as_ref().map_or(0, |p| p.restart_count + 1));
        let inst = Instance {
            id: id.clone(),
            restart_count: restart,
            started_at: None,
            state: InstState::Running,
            image_id: img.image_id.clone(),
        };
        if let Err(e) = self.attach(kind, i, &inst, rc.process.clone()) {
            self.fail_start(
                kind,
                i,
                "CreateContainerError",
                e.to_string(),
                Duration::from_secs(10),
            );
            return;
        }
        let labels = self.labels(kind.label(), &c.name, restart, []);
        let created = self
            .create_container(&c, &img, &spec, &rc, labels, &id)
            .await;
        self.register(&id);
        self.replace_instance(kind, i, inst).await;
        if let Err(e) = created {
            // runc refused the container (e.g. executable not found): kubelet's StartError.
            self.start_error(kind, i, &id, e.to_string());
            return;
        }
        match self.ctx.rt.start(&id).await {
            Ok(_) => self.started(kind, i, &c, &id, restart).await,
            Err(e) => self.start_error(kind, i, &id, e.to_string()),
        }
    }

    /// The instance's termination-log file, runtime config (volumes, env, security context)
    /// and OCI spec.
    async fn prepare(
        &mut self,
        c: &Container,
        img: ImageInfo,
        id: &str,
    ) -> Result<(ImageInfo, RuntimeConfig, oci_spec::runtime::Spec), StartFailure> {
        let tlog = self.termination_log(&c.name, id);
        if let Some(d) = tlog.parent() {
            let _ = std::fs::create_dir_all(d);
        }
        std::fs::write(&tlog, b"").map_err(|e| {
            StartFailure::new("CreateContainerError", format!("termination log: {e}"))
        })?;
        self.refresh_refs().await;
        let sb = self.sandbox_info();
        let rc = build::runtime_config(&self.pod, c, &img, &sb, id, &tlog)
            .map_err(|e| StartFailure::new("CreateContainerConfigError", e.0))?;
        let mut spec = spec::build(&rc)
            .map_err(|e| StartFailure::new("CreateContainerError", e.to_string()))?;
        if let Some(sb) = self.state.sandbox() {
            spec::set_shim_group(&mut spec, &self.shim_group(&sb.id));
        }
        Ok((img, rc, spec))
    }

    /// Creates container `id` in containerd with `labels` and its log FIFOs.
    async fn create_container(
        &self,
        c: &Container,
        img: &ImageInfo,
        spec: &oci_spec::runtime::Spec,
        rc: &RuntimeConfig,
        labels: HashMap<String, String>,
        id: &str,
    ) -> Result<(), crate::runtime::Error> {
        let fifo = |s: &str| {
            self.ctx
                .cfg
                .fifo_dir()
                .join(format!("{id}.{s}"))
                .to_string_lossy()
                .into_owned()
        };
        self.ctx
            .rt
            .create(CreateOpts {
                id,
                image: img,
                spec,
                labels,
                stdio: Stdio {
                    stdin: if c.stdin == Some(true) {
                        fifo("in")
                    } else {
                        String::new()
                    },
                    stdout: fifo("out"),
                    // A terminal has one output: stdout.
                    stderr: if rc.process.terminal {
                        String::new()
                    } else {
                        fifo("err")
                    },
                    terminal: rc.process.terminal,
                },
            })
            .await
            .map(|_| ())
    }

    /// `inst` becomes the container's current instance; the current one (if exited) becomes
    /// lastState and the older one is removed.
    async fn replace_instance(&mut self, kind: Kind, i: usize, inst: Instance) {
        let rec = self.rec(kind, i);
        let dropped = rec.previous.take();
        rec.previous = rec.current.take().filter(|c| !c.is_running());
        rec.current = Some(inst);
        rec.waiting = None;
        rec.retry_at = None;
        rec.started = false;
        rec.ready = false;
        rec.oom = false;
        if let Some(d) = dropped {
            self.unregister(&d.id);
            remove_container(self.ctx.rt.as_ref(), &d.id).await;
            let name = self.container(kind, i).name.clone();
            let _ = std::fs::remove_file(self.termination_log(&name, &d.id));
        }
    }

    /// The task of `id` runs: its start time recorded, the events, probes and postStart.
    async fn started(&mut self, kind: Kind, i: usize, c: &Container, id: &str, restart: i32) {
        let now = Timestamp::now();
        if let Some(cur) = self.rec(kind, i).current.as_mut() {
            cur.started_at = Some(now);
        }
        // Recorded for adoption; off the pod-start path.
        let rt = self.ctx.rt.clone();
        let started = [(labels::STARTED_AT.to_string(), now.to_string())].into();
        let cid = id.to_string();
        tokio::spawn(async move {
            if let Err(e) = rt.set_labels(&cid, started).await {
                tracing::warn!(container = %cid, error = %e, "recording start time");
            }
        });
        tracing::info!(container = %c.name, restart, event = "Started", "Started container {}", c.name);
        self.event(false, "Created", format!("Created container: {}", c.name));
        self.event(false, "Started", format!("Started container {}", c.name));
        let inst = self.rec(kind, i).current.clone();
        if let Some(inst) = inst {
            self.start_probes(kind, i, &inst, tokio::time::Instant::now());
        }
        if let Some(h) = c.lifecycle.as_ref().and_then(|l| l.post_start.clone()) {
            self.post_start(kind, i, id, &h).await;
        }
    }

    pub(super) fn start_error(&mut self, kind: Kind, i: usize, id: &str, message: String) {
        tracing::warn!(container = %self.container(kind, i).name, "start failed: {message}");
        self.event(true, "Failed", format!("Error: {message}"));
        let rec = self.rec(kind, i);
        if let Some(cur) = rec.current.as_mut().filter(|c| c.id == id) {
            cur.state = InstState::Exited {
                code: 128,
                reason: "StartError".into(),
                message: Some(message),
                finished_at: Timestamp::now(),
            };
        }
        rec.exited_mono = Some(Instant::now());
        if let Some(r) = self.tasks.remove(id) {
            let _ = r.exited.send(true);
            self.forget_io(id);
        }
    }

    pub(super) async fn post_start(
        &mut self,
        kind: Kind,
        i: usize,
        id: &str,
        h: &LifecycleHandler,
    ) {
        if let Err(e) = self.run_hook(kind, i, id, h, Duration::from_secs(30)).await {
            let name = self.container(kind, i).name.clone();
            tracing::warn!(container = %name, event = "FailedPostStartHook", "PostStartHook failed: {e}");
            self.stop_container(kind, i, self.grace(None), false).await;
        }
    }

    /// Opens the log FIFOs of an instance and starts its log pumps. For a new instance this runs
    /// before the task is created, since the shim's open of the write side waits for a reader.
    pub(super) fn attach(
        &mut self,
        kind: Kind,
        i: usize,
        inst: &Instance,
        process: ProcessConfig,
    ) -> Result<(), IoError> {
        let name = self.container(kind, i).name.clone();
        let path = self
            .log_dir()
            .join(&name)
            .join(format!("{}.log", inst.restart_count));
        let log = LogFile::open(&path, self.ctx.cfg.rotation)
            .map_err(|e| IoError::new("container log", &path, e))?;
        let log = Arc::new(Mutex::new(log));
        let fifo = self.ctx.cfg.fifo_dir();
        let (exited, stop) = tokio::sync::watch::channel(false);
        let mkfifo = |p: &std::path::Path| -> Result<(), IoError> {
            if !p.exists() {
                nix::unistd::mkfifo(p, nix::sys::stat::Mode::from_bits_truncate(0o600))
                    .map_err(|e| IoError::new("FIFO", p, e.into()))?;
            }
            Ok(())
        };
        let c = self.container(kind, i);
        // A container with `stdin` reads a FIFO the agent holds open (so it never sees EOF
        // before an attached client ends it); `stdinOnce` closes it after the first attach.
        let stdin = if c.stdin == Some(true) {
            let p = fifo.join(format!("{}.in", inst.id));
            mkfifo(&p)?;
            let tx = tokio::net::unix::pipe::OpenOptions::new()
                .read_write(true)
                .open_sender(&p)
                .map_err(|e| IoError::new("stdin FIFO", &p, e))?;
            Some(tx)
        } else {
            None
        };
        let io = Arc::new(super::super::streaming::AttachIo::new(
            inst.id.clone(),
            process.terminal,
            c.stdin_once == Some(true),
            stdin,
            stop.clone(),
        ));
        let mut pumps = vec![];
        for (suffix, stream, ch) in [("out", "stdout", 1u8), ("err", "stderr", 2u8)] {
            let p = fifo.join(format!("{}.{suffix}", inst.id));
            mkfifo(&p)?;
            let rx = logs::open_fifo(&p).map_err(|e| IoError::new("log FIFO", &p, e))?;
            pumps.push(tokio::spawn(logs::pump(
                rx,
                stream,
                log.clone(),
                stop.clone(),
                Some((ch, io.output.clone())),
            )));
        }
        if let Ok(mut a) = self.ctx.attach.lock() {
            a.retain(|_, w| w.strong_count() > 0);
            a.insert(inst.id.clone(), Arc::downgrade(&io));
        }
        self.tasks.insert(
            inst.id.clone(),
            Running {
                probes: None,
                pumps,
                exited,
                process,
                _io: io,
            },
        );
        Ok(())
    }

    /// Starts probes of an adopted running instance, counting from its recorded start.
    pub(super) fn resume_probes(&mut self, kind: Kind, i: usize, inst: &Instance) {
        let since = inst
            .started_at
            .map(|t| Timestamp::now().duration_since(t).unsigned_abs())
            .unwrap_or_default();
        let started = tokio::time::Instant::now()
            .checked_sub(since)
            .unwrap_or_else(tokio::time::Instant::now);
        self.start_probes(kind, i, inst, started);
    }

    pub(super) fn start_probes(
        &mut self,
        kind: Kind,
        i: usize,
        inst: &Instance,
        started: tokio::time::Instant,
    ) {
        let c = self.container(kind, i).clone();
        let no_probes =
            c.startup_probe.is_none() && c.liveness_probe.is_none() && c.readiness_probe.is_none();
        if kind == Kind::Init || no_probes {
            // Nothing to wait for: started and ready at once (no round trip through a task).
            let rec = self.rec(kind, i);
            rec.started = true;
            rec.ready = kind == Kind::App;
            return;
        }
        let sb = self.sandbox_info();
        let named_ports = c
            .ports
            .iter()
            .flatten()
            .filter_map(|p| p.name.clone().map(|n| (n, p.container_port)))
            .collect();
        let process = self
            .tasks
            .get(&inst.id)
            .map(|r| r.process.clone())
            .unwrap_or_default();
        let target = Arc::new(ProbeTarget {
            rt: self.ctx.rt.clone(),
            container_id: inst.id.clone(),
            pod_ip: sb.pod_ip.as_deref().and_then(|i| i.parse().ok()),
            process,
            scratch: self.ctx.cfg.data_dir.join("exec"),
            named_ports,
        });
        let (ptx, mut prx) = mpsc::unbounded_channel();
        let wtx = self.tx.clone();
        let cid = inst.id.clone();
        let fwd = async move {
            while let Some(ev) = prx.recv().await {
                if wtx
                    .send(Msg::Probe {
                        cid: cid.clone(),
                        ev,
                    })
                    .is_err()
                {
                    break;
                }
            }
        };
        let sup = probe::supervise(
            c.startup_probe.clone(),
            c.liveness_probe.clone(),
            c.readiness_probe.clone(),
            target,
            started,
            ptx,
        );
        let handle = tokio::spawn(async move {
            tokio::join!(sup, fwd);
        });
        if let Some(r) = self.tasks.get_mut(&inst.id) {
            if let Some(old) = r.probes.replace(handle) {
                old.abort();
            }
        } else {
            handle.abort();
        }
    }

    /// Runs a lifecycle hook within `budget`.
    pub(super) async fn run_hook(
        &self,
        kind: Kind,
        i: usize,
        cid: &str,
        h: &LifecycleHandler,
        budget: Duration,
    ) -> Result<(), probe::ProbeFailure> {
        if let Some(s) = &h.sleep {
            tokio::time::sleep(Duration::from_secs(s.seconds.max(0) as u64).min(budget)).await;
            return Ok(());
        }
        let c = self.container(kind, i);
        let as_probe = k8s_openapi::api::core::v1::Probe {
            exec: h.exec.clone(),
            http_get: h.http_get.clone(),
            tcp_socket: h.tcp_socket.clone(),
            ..Default::default()
        };
        let sb = self.sandbox_info();
        let target = ProbeTarget {
            rt: self.ctx.rt.clone(),
            container_id: cid.to_string(),
            pod_ip: sb.pod_ip.as_deref().and_then(|i| i.parse().ok()),
            process: self
                .tasks
                .get(cid)
                .map(|r| r.process.clone())
                .unwrap_or_default(),
            scratch: self.ctx.cfg.data_dir.join("exec"),
            named_ports: c
                .ports
                .iter()
                .flatten()
                .filter_map(|p| p.name.clone().map(|n| (n, p.container_port)))
                .collect(),
        };
        probe::probe_once(&as_probe, &target, budget)
            .await
            .map(|_| ())
    }
}

/// The `kubernetes` Service's ClusterIP and port, for the master service environment.
async fn kubernetes_service(client: &kube::Client) -> Option<(String, i32)> {
    let api: kube::Api<k8s_openapi::api::core::v1::Service> =
        kube::Api::namespaced(client.clone(), "default");
    let svc = api.get_opt("kubernetes").await.ok().flatten()?;
    let spec = svc.spec?;
    let ip = spec
        .cluster_ip
        .filter(|ip| !ip.is_empty() && ip != "None")?;
    let port = spec.ports?.first()?.port;
    Some((ip, port))
}

/// A service account token the pod's projected volumes could not get.
#[derive(Debug, thiserror::Error)]
pub(super) enum TokenError {
    #[error("serviceaccounts/{sa}/token: {source}")]
    Request { sa: String, source: kube::Error },
    #[error("the TokenRequest answer has no status.token")]
    NoToken,
}

/// A container's log file or stdio FIFOs could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("{what} {}: {source}", path.display())]
pub(crate) struct IoError {
    what: &'static str,
    path: PathBuf,
    source: std::io::Error,
}

impl IoError {
    fn new(what: &'static str, path: &std::path::Path, source: std::io::Error) -> Self {
        Self {
            what,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Why a container instance could not be made: kubelet's waiting reason and message, and
/// when to try again (None: when a message says so, as a pull in flight).
pub(super) struct StartFailure {
    pub(super) reason: &'static str,
    pub(super) message: String,
    pub(super) retry: Option<Duration>,
}

impl StartFailure {
    pub(super) fn new(reason: &'static str, message: String) -> Self {
        StartFailure {
            reason,
            message,
            retry: Some(Duration::from_secs(10)),
        }
    }
}

/// The pod's claims and the volumes they are bound to, from the API.
async fn claims_of(
    client: &kube::Client,
    pod: &k8s_openapi::api::core::v1::Pod,
    ns: &str,
) -> std::collections::HashMap<
    String,
    (
        k8s_openapi::api::core::v1::PersistentVolumeClaim,
        Option<k8s_openapi::api::core::v1::PersistentVolume>,
    ),
> {
    use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
    let mut out = std::collections::HashMap::new();
    let claims: kube::Api<PersistentVolumeClaim> = kube::Api::namespaced(client.clone(), ns);
    let volumes: kube::Api<PersistentVolume> = kube::Api::all(client.clone());
    let names = spec_of(pod)
        .volumes
        .iter()
        .flatten()
        .filter_map(|v| v.persistent_volume_claim.as_ref())
        .map(|c| c.claim_name.clone());
    for n in names {
        let c = match claims.get_opt(&n).await {
            Ok(Some(c)) => c,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(claim = %n, error = %e, "reading a PersistentVolumeClaim");
                continue;
            }
        };
        let bound = c
            .spec
            .as_ref()
            .and_then(|s| s.volume_name.clone())
            .filter(|v| !v.is_empty());
        let pv = match bound {
            Some(v) => volumes.get_opt(&v).await.unwrap_or_else(|e| {
                tracing::warn!(volume = %v, error = %e, "reading a PersistentVolume");
                None
            }),
            None => None,
        };
        out.insert(n, (c, pv));
    }
    out
}
