//! Pod networking through standard CNI plugins (`--network cni`): the first network config list
//! in the config directory (`*.conflist`, or a single `*.conf`), its plugins executed in order
//! for ADD with each one's result passed to the next as `prevResult`, in reverse for DEL, and
//! CHECK with the cached result — the CNI specification's protocol (env `CNI_COMMAND`,
//! `CNI_CONTAINERID`, `CNI_NETNS`, `CNI_IFNAME`, `CNI_ARGS`, `CNI_PATH`; the config on stdin;
//! the result or an error object on stdout). The loopback interface gets the `loopback` plugin.
//!
//! A host-local IPAM without a subnet (or with `"subnet": "usePodCidr"`) gets the node's pod
//! CIDR, so one config file serves every node. ADD results are cached per container under the
//! agent's data directory, for DEL and CHECK after an agent restart.

use std::{
    io::Write,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use ipnet::Ipv4Net;
use serde_json::{Value, json};

#[derive(Debug, thiserror::Error)]
pub enum CniError {
    #[error("CNI config in {dir}: {why}")]
    Config { dir: PathBuf, why: String },
    #[error("CNI plugin {plugin:?} not found in {path}")]
    NoPlugin { plugin: String, path: String },
    #[error("CNI plugin {plugin} {command}: {msg}")]
    Plugin {
        plugin: String,
        command: &'static str,
        msg: String,
    },
    #[error("CNI plugin call: {0}")]
    Task(String),
    #[error("CNI result cache {path}: {source}")]
    Cache {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Where plugins and configs are, and where results are cached.
#[derive(Debug, Clone)]
pub struct Cni {
    pub conf_dir: PathBuf,
    pub bin_dirs: Vec<PathBuf>,
    pub cache_dir: PathBuf,
}

/// What a pod's ADD produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Attached {
    pub ip: Option<Ipv4Addr>,
    pub result: Value,
}

/// The pod a call is about (CNI_ARGS as kubelet passes them).
#[derive(Debug, Clone)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

/// The network namespace of process `pid`.
fn netns_of(pid: u32) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/ns/net"))
}

impl Cni {
    /// The network config list in use: the first `*.conflist` / `*.conf` / `*.json` by name.
    pub fn config(&self, pod_cidr: Ipv4Net) -> Result<Value, CniError> {
        let bad = |why: String| CniError::Config {
            dir: self.conf_dir.clone(),
            why,
        };
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.conf_dir)
            .map_err(|e| bad(e.to_string()))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.extension()
                    .is_some_and(|x| x == "conflist" || x == "conf" || x == "json")
            })
            .collect();
        files.sort();
        let file = files
            .first()
            .ok_or_else(|| bad("no *.conflist or *.conf file".into()))?;
        let text =
            std::fs::read_to_string(file).map_err(|e| bad(format!("{}: {e}", file.display())))?;
        let v: Value =
            serde_json::from_str(&text).map_err(|e| bad(format!("{}: {e}", file.display())))?;
        let mut list = if v.get("plugins").is_some() {
            v
        } else {
            // A single network config becomes a list of one.
            json!({"cniVersion": v["cniVersion"], "name": v["name"], "plugins": [v]})
        };
        let name_ok = list["name"].as_str().is_some_and(|n| !n.is_empty());
        let plugins_ok = list["plugins"]
            .as_array()
            .is_some_and(|p| !p.is_empty() && p.iter().all(|p| p["type"].is_string()));
        if !name_ok || !plugins_ok {
            return Err(bad(format!(
                "{}: a network config list needs a name and plugins that each have a type",
                file.display()
            )));
        }
        if let Some(plugins) = list["plugins"].as_array_mut() {
            for p in plugins {
                fill_pod_cidr(&mut p["ipam"], pod_cidr);
            }
        }
        Ok(list)
    }

    fn plugin(&self, name: &str) -> Result<PathBuf, CniError> {
        self.bin_dirs
            .iter()
            .map(|d| d.join(name))
            .find(|p| p.is_file())
            .ok_or_else(|| CniError::NoPlugin {
                plugin: name.into(),
                path: self.cni_path(),
            })
    }

    fn cni_path(&self) -> String {
        self.bin_dirs
            .iter()
            .map(|d| d.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(":")
    }

    /// Runs one plugin; its parsed stdout (the result) on success.
    fn exec(
        &self,
        command: &'static str,
        conf: &Value,
        container: &str,
        netns: &str,
        ifname: &str,
        pod: &PodRef,
    ) -> Result<Value, CniError> {
        let plugin = conf["type"].as_str().unwrap_or("");
        let bin = self.plugin(plugin)?;
        let fail = |msg: String| CniError::Plugin {
            plugin: plugin.into(),
            command,
            msg,
        };
        let mut child = Command::new(&bin)
            .env_clear()
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", container)
            .env("CNI_NETNS", netns)
            .env("CNI_IFNAME", ifname)
            .env(
                "CNI_ARGS",
                format!(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={container};K8S_POD_UID={}",
                    pod.namespace, pod.name, pod.uid
                ),
            )
            .env("CNI_PATH", self.cni_path())
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| fail(format!("running {}: {e}", bin.display())))?;
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(conf.to_string().as_bytes());
        }
        let out = child.wait_with_output().map_err(|e| fail(e.to_string()))?;
        let stdout: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        if !out.status.success() {
            // The spec's error object: {"code", "msg", "details"}.
            let msg = match stdout["msg"].as_str() {
                Some(m) => match stdout["details"].as_str().filter(|d| !d.is_empty()) {
                    Some(d) => format!("{m}: {d}"),
                    None => m.to_string(),
                },
                None => String::from_utf8_lossy(&out.stderr).trim().to_string(),
            };
            return Err(fail(msg));
        }
        Ok(stdout)
    }

    /// The config one plugin of `list` gets: its own, with the list's name and version and
    /// the previous result.
    fn plugin_conf(list: &Value, plugin: &Value, prev: Option<&Value>) -> Value {
        let mut c = plugin.clone();
        c["name"] = list["name"].clone();
        c["cniVersion"] = list["cniVersion"].clone();
        if let Some(p) = prev.filter(|p| !p.is_null()) {
            c["prevResult"] = p.clone();
        }
        c
    }

    fn cache_file(&self, container: &str) -> PathBuf {
        self.cache_dir.join(format!("{container}.json"))
    }

    fn loopback(&self, list: &Value) -> Value {
        json!({"cniVersion": list["cniVersion"], "name": "cni-loopback", "type": "loopback"})
    }

    /// ADD: loopback, then every plugin of the list in order. On failure what was added is
    /// deleted again.
    pub fn add(
        &self,
        list: &Value,
        container: &str,
        netns: &Path,
        pod: &PodRef,
    ) -> Result<Attached, CniError> {
        let ns = netns.to_string_lossy();
        self.exec("ADD", &self.loopback(list), container, &ns, "lo", pod)?;
        let mut prev: Option<Value> = None;
        let plugins = list["plugins"].as_array().cloned().unwrap_or_default();
        for p in &plugins {
            let conf = Self::plugin_conf(list, p, prev.as_ref());
            match self.exec("ADD", &conf, container, &ns, "eth0", pod) {
                Ok(r) => prev = Some(r),
                Err(e) => {
                    let _ = self.del_with(list, container, &ns, pod, prev.as_ref());
                    return Err(e);
                }
            }
        }
        let result = prev.unwrap_or(Value::Null);
        std::fs::create_dir_all(&self.cache_dir).map_err(|source| CniError::Cache {
            path: self.cache_dir.clone(),
            source,
        })?;
        let file = self.cache_file(container);
        std::fs::write(
            &file,
            serde_json::to_vec(&json!({"config": list, "result": result})).unwrap_or_default(),
        )
        .map_err(|source| CniError::Cache { path: file, source })?;
        Ok(Attached {
            ip: first_ipv4(&result),
            result,
        })
    }

    /// ADD for sandbox `container` whose pause process is `pid`, from async code (the
    /// plugins are processes): the pod's address.
    pub async fn attach(
        &self,
        pod_cidr: Ipv4Net,
        container: &str,
        pid: u32,
        pod: PodRef,
    ) -> Result<Option<Ipv4Addr>, CniError> {
        let (cni, container) = (self.clone(), container.to_string());
        tokio::task::spawn_blocking(move || {
            let list = cni.config(pod_cidr)?;
            cni.add(&list, &container, &netns_of(pid), &pod)
                .map(|a| a.ip)
        })
        .await
        .map_err(|e| CniError::Task(e.to_string()))?
    }

    /// DEL for sandbox `container` from async code; `pid` is its pause process if it still
    /// runs. The current config serves when no ADD result was cached.
    pub async fn detach(
        &self,
        pod_cidr: Ipv4Net,
        container: &str,
        pid: Option<u32>,
        pod: PodRef,
    ) -> Result<(), CniError> {
        let (cni, container) = (self.clone(), container.to_string());
        tokio::task::spawn_blocking(move || {
            let current = cni.config(pod_cidr).unwrap_or(Value::Null);
            cni.del(&current, &container, pid.map(netns_of).as_deref(), &pod)
        })
        .await
        .map_err(|e| CniError::Task(e.to_string()))?
    }

    /// CHECK of sandbox `container` whose pause process is `pid`.
    pub fn check_pid(&self, container: &str, pid: u32, pod: &PodRef) -> Result<(), CniError> {
        self.check(container, &netns_of(pid), pod)
    }

    /// The cached ADD (config list, result) of a container, if any.
    pub fn cached(&self, container: &str) -> Option<(Value, Value)> {
        let v: Value =
            serde_json::from_slice(&std::fs::read(self.cache_file(container)).ok()?).ok()?;
        Some((v["config"].clone(), v["result"].clone()))
    }

    fn del_with(
        &self,
        list: &Value,
        container: &str,
        netns: &str,
        pod: &PodRef,
        prev: Option<&Value>,
    ) -> Result<(), CniError> {
        let mut first_err = None;
        let plugins = list["plugins"].as_array().cloned().unwrap_or_default();
        for p in plugins.iter().rev() {
            let conf = Self::plugin_conf(list, p, prev);
            if let Err(e) = self.exec("DEL", &conf, container, netns, "eth0", pod) {
                first_err.get_or_insert(e);
            }
        }
        let _ = self.exec("DEL", &self.loopback(list), container, netns, "lo", pod);
        first_err.map_or(Ok(()), Err)
    }

    /// DEL, in reverse plugin order, with the config and result of the cached ADD (or the
    /// current config when none was cached). `netns` may be gone already (plugins then only
    /// release what they hold, such as the address). Idempotent.
    pub fn del(
        &self,
        current: &Value,
        container: &str,
        netns: Option<&Path>,
        pod: &PodRef,
    ) -> Result<(), CniError> {
        let (list, prev) = match self.cached(container) {
            Some((l, r)) => (l, Some(r)),
            None => (current.clone(), None),
        };
        let ns = netns
            .filter(|p| p.exists())
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        self.del_with(&list, container, &ns, pod, prev.as_ref())?;
        let _ = std::fs::remove_file(self.cache_file(container));
        Ok(())
    }

    /// CHECK every plugin against the cached ADD result (CNI 0.4+): the network is still as
    /// ADD left it.
    pub fn check(&self, container: &str, netns: &Path, pod: &PodRef) -> Result<(), CniError> {
        let Some((list, result)) = self.cached(container) else {
            return Err(CniError::Plugin {
                plugin: "-".into(),
                command: "CHECK",
                msg: format!("no cached ADD result for {container}"),
            });
        };
        let ns = netns.to_string_lossy();
        for p in list["plugins"].as_array().into_iter().flatten() {
            let conf = Self::plugin_conf(&list, p, Some(&result));
            self.exec("CHECK", &conf, container, &ns, "eth0", pod)?;
        }
        Ok(())
    }
}

/// host-local without a subnet, or with `usePodCidr`, gets the node's pod CIDR.
fn fill_pod_cidr(ipam: &mut Value, pod_cidr: Ipv4Net) {
    if ipam["type"] != "host-local" {
        return;
    }
    let uses_pod_cidr = |v: &Value| v.is_null() || v == "usePodCidr";
    let has_ranges = ipam["ranges"].as_array().is_some_and(|r| !r.is_empty());
    if has_ranges {
        for set in ipam["ranges"].as_array_mut().into_iter().flatten() {
            for r in set.as_array_mut().into_iter().flatten() {
                if uses_pod_cidr(&r["subnet"]) {
                    r["subnet"] = json!(pod_cidr.to_string());
                }
            }
        }
    } else if uses_pod_cidr(&ipam["subnet"]) {
        ipam["ranges"] = json!([[{"subnet": pod_cidr.to_string()}]]);
        if let Some(o) = ipam.as_object_mut() {
            o.remove("subnet");
        }
    }
}

/// The first IPv4 address of a CNI result (0.4 / 1.0 `ips[].address`, 0.3 alike).
pub fn first_ipv4(result: &Value) -> Option<Ipv4Addr> {
    result["ips"].as_array()?.iter().find_map(|ip| {
        ip["address"]
            .as_str()?
            .split('/')
            .next()?
            .parse::<Ipv4Addr>()
            .ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_local_gets_the_pod_cidr_and_single_configs_become_lists() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("10-net.conf"),
            r#"{"cniVersion": "1.0.0", "name": "n", "type": "bridge", "ipam": {"type": "host-local"}}"#,
        )
        .unwrap();
        let c = Cni {
            conf_dir: dir.path().into(),
            bin_dirs: vec![],
            cache_dir: dir.path().join("cache"),
        };
        let l = c.config("10.88.3.0/24".parse().unwrap()).unwrap();
        assert_eq!(l["plugins"][0]["type"], "bridge");
        assert_eq!(
            l["plugins"][0]["ipam"]["ranges"][0][0]["subnet"],
            "10.88.3.0/24"
        );
        let mut explicit = json!({"type": "host-local", "ranges": [[{"subnet": "10.1.0.0/16"}], [{"subnet": "usePodCidr"}]]});
        fill_pod_cidr(&mut explicit, "10.2.0.0/24".parse().unwrap());
        assert_eq!(explicit["ranges"][0][0]["subnet"], "10.1.0.0/16");
        assert_eq!(explicit["ranges"][1][0]["subnet"], "10.2.0.0/24");
        // Broken configs are named errors.
        std::fs::write(
            dir.path().join("00-bad.conflist"),
            r#"{"name": "x", "plugins": [{}]}"#,
        )
        .unwrap();
        let e = c
            .config("10.88.3.0/24".parse().unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("00-bad.conflist") && e.contains("type"), "{e}");
    }

    #[test]
    fn results_give_their_first_ipv4() {
        let r = json!({"cniVersion": "1.0.0", "ips": [{"address": "fd00::5/64"}, {"address": "10.88.0.7/24", "gateway": "10.88.0.1"}]});
        assert_eq!(first_ipv4(&r), Some(Ipv4Addr::new(10, 88, 0, 7)));
        assert_eq!(first_ipv4(&json!({})), None);
    }
}
