//! The node's image puller, as kubelet's image manager: one pull per image (and credential) at
//! a time however many pods want it, pulls in parallel or one by one
//! (`--serialize-image-pulls`, `--max-parallel-image-pulls`), a transfer that stalls for
//! `--image-pull-progress-deadline` cancelled; credentials from the pod's pull secrets.
//! Pulls run as their own tasks: a pod that goes away does not cancel a pull others wait for.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::{FutureExt, future::Shared};
use k8s_openapi::api::core::v1::{Pod, Secret};

use crate::runtime::{
    Runtime,
    image::normalize_ref,
    pull::PullOptions,
    registries::{Credential, Keyring, Registries},
};

/// How the node pulls.
#[derive(Debug, Clone)]
pub struct PullConfig {
    pub registries: Arc<Registries>,
    /// One pull at a time (kubelet's `--serialize-image-pulls`).
    pub serialize: bool,
    /// At most this many pulls at once (kubelet's `--max-parallel-image-pulls`; None: no limit).
    pub max_parallel: Option<usize>,
    /// A transfer with no progress for this long is cancelled.
    pub progress_deadline: Duration,
}

impl Default for PullConfig {
    fn default() -> Self {
        Self {
            registries: Arc::default(),
            serialize: false,
            max_parallel: None,
            progress_deadline: Duration::from_secs(60),
        }
    }
}

/// A finished pull.
#[derive(Debug)]
pub struct PullDone {
    /// Bytes of the image as the registry stores it.
    pub size: u64,
    /// How long the pull itself took (without waiting for a slot).
    pub took: Duration,
}

pub type PullResult = Result<Arc<PullDone>, Arc<crate::runtime::Error>>;
type SharedPull = Shared<futures::future::BoxFuture<'static, PullResult>>;

/// The node's pulls in flight, by image and credentials.
pub struct Puller {
    rt: Arc<dyn Runtime>,
    cfg: PullConfig,
    slots: Option<Arc<tokio::sync::Semaphore>>,
    inflight: Mutex<HashMap<PullKey, SharedPull>>,
    /// The last finished pull of each key (kept a minute): a pod that found the image missing
    /// before that pull ended takes its result instead of pulling again.
    finished: Mutex<HashMap<PullKey, (tokio::time::Instant, PullResult)>>,
}

type PullKey = (String, Vec<Credential>);

/// How long a finished pull's result answers pods that looked before it ended.
const FINISHED_KEPT: Duration = Duration::from_secs(60);

impl Puller {
    pub fn new(rt: Arc<dyn Runtime>, cfg: PullConfig) -> Arc<Self> {
        let limit = if cfg.serialize {
            Some(1)
        } else {
            cfg.max_parallel.filter(|n| *n > 0)
        };
        Arc::new(Self {
            rt,
            slots: limit.map(|n| Arc::new(tokio::sync::Semaphore::new(n))),
            cfg,
            inflight: Mutex::new(HashMap::new()),
            finished: Mutex::new(HashMap::new()),
        })
    }

    /// The pull of `reference` with `credentials` for a pod that found it needed at `since`:
    /// the one in flight, the one that finished after `since`, or a new one.
    pub fn pull(
        self: &Arc<Self>,
        reference: &str,
        credentials: Vec<Credential>,
        since: tokio::time::Instant,
    ) -> SharedPull {
        let key = (normalize_ref(reference), credentials);
        let mut inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = inflight.get(&key) {
            return p.clone();
        }
        {
            let mut finished = self.finished.lock().unwrap_or_else(|e| e.into_inner());
            let now = tokio::time::Instant::now();
            finished.retain(|_, (at, _)| now.duration_since(*at) < FINISHED_KEPT);
            if let Some((at, res)) = finished.get(&key)
                && *at > since
            {
                let res = res.clone();
                return async move { res }.boxed().shared();
            }
        }
        let me = self.clone();
        let k = key.clone();
        let task = tokio::spawn(async move {
            let _slot = match &me.slots {
                Some(s) => s.clone().acquire_owned().await.ok(),
                None => None,
            };
            let t0 = tokio::time::Instant::now();
            let res = me
                .rt
                .pull(
                    &k.0,
                    PullOptions {
                        registries: &me.cfg.registries,
                        credentials: &k.1,
                        progress_deadline: me.cfg.progress_deadline,
                        parallel_layers: 3,
                    },
                )
                .await;
            let res: PullResult = match res {
                Ok(p) => Ok(Arc::new(PullDone {
                    size: p.size,
                    took: t0.elapsed(),
                })),
                Err(e) => Err(Arc::new(e)),
            };
            // Finished before it leaves the in-flight map: no one can miss both.
            me.finished
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(k.clone(), (tokio::time::Instant::now(), res.clone()));
            me.inflight
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&k);
            res
        });
        let shared = async move {
            task.await.unwrap_or_else(|e| {
                Err(Arc::new(crate::runtime::Error::Pull {
                    reference: String::new(),
                    reason: format!("the pull task ended: {e}"),
                }))
            })
        }
        .boxed()
        .shared();
        inflight.insert(key, shared.clone());
        shared
    }
}

/// The credentials the pod's pull secrets hold for `reference` (kubelet's keyring lookup);
/// secrets that are missing or malformed are skipped with a warning, as kubelet does.
pub fn credentials_for(
    pod: &Pod,
    secrets: &HashMap<String, Secret>,
    reference: &str,
) -> Vec<Credential> {
    let mut ring = Keyring::default();
    let names = pod
        .spec
        .as_ref()
        .and_then(|s| s.image_pull_secrets.as_ref())
        .into_iter()
        .flatten()
        .map(|r| r.name.clone());
    for name in names {
        let Some(s) = secrets.get(&name) else {
            tracing::warn!(secret = %name, "image pull secret not found");
            continue;
        };
        let data = s.data.as_ref();
        let (key, legacy) = match s.type_.as_deref() {
            Some("kubernetes.io/dockercfg") => (".dockercfg", true),
            _ => (".dockerconfigjson", false),
        };
        let Some(bytes) = data.and_then(|d| d.get(key)) else {
            tracing::warn!(secret = %name, "image pull secret has no {key}");
            continue;
        };
        if let Err(e) = ring.add_docker_config(&name, &bytes.0, legacy) {
            tracing::warn!(secret = %name, error = %e, "image pull secret");
        }
    }
    match crate::runtime::pull::parse_reference(reference) {
        Ok(r) => ring.lookup(&r.registry, &r.repository),
        Err(_) => vec![],
    }
}

/// A duration as Go prints it after `Truncate(time.Millisecond)` (`312ms`, `1.5s`, `2m3.4s`),
/// the way kubelet's pull events show it.
pub fn go_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return "0s".into();
    }
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let trim = |s: String| s.trim_end_matches('0').trim_end_matches('.').to_string();
    let (h, rest) = (ms / 3_600_000, ms % 3_600_000);
    let (m, rest) = (rest / 60_000, rest % 60_000);
    let secs = trim(format!("{}.{:03}", rest / 1000, rest % 1000));
    match (h, m) {
        (0, 0) => format!("{secs}s"),
        (0, m) => format!("{m}m{secs}s"),
        (h, m) => format!("{h}h{m}m{secs}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_pod_that_looked_before_a_pull_ended_takes_its_result() {
        let log = Arc::new(Mutex::new(vec![]));
        let rt = Arc::new(crate::runtime::fake::FakeRuntime::new("n", log));
        rt.absent("reg.lab/app:1");
        rt.pull_takes(Duration::from_secs(5));
        let puller = Puller::new(rt.clone(), PullConfig::default());
        let looked = tokio::time::Instant::now();
        let first = puller.pull("reg.lab/app:1", vec![], looked);
        let joined = puller.pull("reg.lab/app:1", vec![], looked);
        assert!(first.await.is_ok() && joined.await.is_ok());
        // Asked after the pull ended, but missing the image before it did: no second pull.
        assert!(puller.pull("reg.lab/app:1", vec![], looked).await.is_ok());
        let pulls = |rt: &crate::runtime::fake::FakeRuntime| {
            rt.calls().iter().filter(|c| c.starts_with("pull")).count()
        };
        assert_eq!(pulls(&rt), 1);
        // Looking after it ended (an `Always` start later on) pulls again.
        let later = tokio::time::Instant::now();
        assert!(puller.pull("reg.lab/app:1", vec![], later).await.is_ok());
        assert_eq!(pulls(&rt), 2);
    }

    #[test]
    fn durations_print_as_go_does() {
        assert_eq!(go_duration(Duration::from_micros(312_400)), "312ms");
        assert_eq!(go_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(go_duration(Duration::from_millis(2000)), "2s");
        assert_eq!(go_duration(Duration::from_millis(123_456)), "2m3.456s");
    }

    #[test]
    fn pull_secrets_give_the_matching_credentials() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p"},
            "spec": {"containers": [], "imagePullSecrets": [{"name": "reg"}, {"name": "gone"}]}
        }))
        .unwrap();
        let secret: Secret = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "reg"},
            "type": "kubernetes.io/dockerconfigjson",
            "data": {".dockerconfigjson": base64_of(r#"{"auths":{"reg.lab:5443":{"username":"u","password":"p"}}}"#)}
        }))
        .unwrap();
        let secrets = HashMap::from([("reg".to_string(), secret)]);
        assert_eq!(
            credentials_for(&pod, &secrets, "reg.lab:5443/app:1"),
            vec![Credential::Basic {
                username: "u".into(),
                password: "p".into()
            }]
        );
        assert!(credentials_for(&pod, &secrets, "other.lab/app:1").is_empty());
    }

    fn base64_of(s: &str) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(s)
    }
}
