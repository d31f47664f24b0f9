//! Endpoints and EndpointSlices from Services and their pods.
//!
//! For every Service with a selector: the pods in its namespace that match it and have an IP.
//! Each Service port's `targetPort` is resolved per pod (a name through the pod's container
//! ports; a pod without that port is left out of that port's endpoints). Endpoints lists ready
//! pods under `addresses` and not-ready ones under `notReadyAddresses` (all under `addresses`
//! with `publishNotReadyAddresses`); terminating pods are left out of Endpoints. EndpointSlices
//! (one per distinct port mapping, up to 100 endpoints each, named `<service>-<n>`) carry every
//! pod with its `ready`/`serving`/`terminating` conditions, as kube-proxy needs them. Services
//! without a selector are left alone; what belonged to a deleted Service is removed. Objects are
//! written only when they differ from what is stored.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use k8s_openapi::api::{
    core::v1::{Endpoints, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client,
    api::{DeleteParams, PostParams},
};
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::control::{
    Cache, Caches, controller_ref,
    runner::{self, Controller, PassError},
};
use crate::kinds::pod::pod_ready;

const MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";
const CONTROLLER: &str = "endpointslice-controller.k8s.io";
const SERVICE_NAME: &str = "kubernetes.io/service-name";
const MAX_PER_SLICE: usize = 100;

pub async fn run(client: Client, caches: Caches, leading: watch::Receiver<bool>) {
    let endpoints: Cache<Endpoints> = Cache::start(
        Api::all(client.clone()),
        kube::runtime::watcher::Config::default(),
    );
    let _ = endpoints.store.wait_until_ready().await;
    let c = EndpointsController {
        client,
        caches: caches.clone(),
        endpoints,
    };
    runner::run(c, &caches, leading).await;
}

struct EndpointsController {
    client: Client,
    caches: Caches,
    /// The Endpoints objects (only this controller follows them).
    endpoints: Cache<Endpoints>,
}

impl Controller for EndpointsController {
    fn name(&self) -> &'static str {
        "endpoint-controller"
    }

    fn signals(&self, caches: &Caches) -> Vec<watch::Receiver<u64>> {
        vec![
            caches.services.changed.clone(),
            caches.pods.changed.clone(),
            caches.slices.changed.clone(),
            self.endpoints.changed.clone(),
        ]
    }

    fn period(&self) -> Duration {
        Duration::from_secs(10)
    }

    async fn pass(&mut self) -> Result<(), PassError> {
        let s = Snapshot {
            services: self.caches.services.all(),
            pods: self.caches.pods.all(),
            slices: self.caches.slices.all(),
            endpoints: self.endpoints.all(),
        };
        Ok(apply(&self.client, plan(&s)).await?)
    }
}

/// A resolved port: (name, port, protocol).
type PortMapping = (String, i32, String);

/// One endpoint of a Service: a pod, its conditions, and its resolved ports.
struct Ep<'a> {
    pod: &'a Pod,
    ip: String,
    ready: bool,
    terminating: bool,
    ports: Vec<(String, i32, String)>,
}

fn resolve_port(p: &Pod, target: &Value, port: i32) -> Option<i32> {
    match target {
        Value::Number(n) => n.as_i64().map(|n| n as i32),
        Value::String(name) => p
            .spec
            .as_ref()?
            .containers
            .iter()
            .flat_map(|c| c.ports.iter().flatten())
            .find(|cp| cp.name.as_deref() == Some(name))
            .map(|cp| cp.container_port),
        _ => Some(port),
    }
}

fn endpoints_for<'a>(svc: &Service, pods: &'a [&'a Arc<Pod>]) -> Vec<Ep<'a>> {
    let spec = svc.spec.clone().unwrap_or_default();
    let sel = spec.selector.clone().unwrap_or_default();
    let mut out = vec![];
    for p in pods {
        let labels = p.metadata.labels.clone().unwrap_or_default();
        if sel.iter().any(|(k, v)| labels.get(k) != Some(v)) {
            continue;
        }
        let status = p.status.as_ref();
        let Some(ip) = status
            .and_then(|s| s.pod_ip.clone())
            .filter(|i| !i.is_empty())
        else {
            continue;
        };
        if matches!(
            status.and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        ) {
            continue;
        }
        let mut ports = vec![];
        for sp in spec.ports.iter().flatten() {
            let target = sp
                .target_port
                .as_ref()
                .map(|t| serde_json::to_value(t).unwrap_or(Value::Null))
                .unwrap_or(Value::Null);
            if let Some(port) = resolve_port(p, &target, sp.port) {
                ports.push((
                    sp.name.clone().unwrap_or_default(),
                    port,
                    sp.protocol.clone().unwrap_or_else(|| "TCP".into()),
                ));
            }
        }
        out.push(Ep {
            pod: p.as_ref(),
            ip,
            ready: pod_ready(p),
            terminating: p.metadata.deletion_timestamp.is_some(),
            ports,
        });
    }
    out.sort_by(|a, b| a.ip.cmp(&b.ip));
    out
}

/// The endpoint's hostname, as kube's controllers set it: the pod's `hostname` when its
/// `subdomain` names this Service (what gives a headless Service's pods their DNS names).
fn hostname(svc: &Service, p: &Pod) -> Option<String> {
    let spec = p.spec.as_ref()?;
    let h = spec.hostname.as_deref().filter(|h| !h.is_empty())?;
    let same = spec.subdomain.is_some()
        && spec.subdomain == svc.metadata.name
        && p.metadata.namespace == svc.metadata.namespace;
    same.then(|| h.to_string())
}

fn target_ref(p: &Pod) -> Value {
    json!({"kind": "Pod", "name": p.metadata.name, "namespace": p.metadata.namespace, "uid": p.metadata.uid})
}

fn ports_json(ports: &[(String, i32, String)]) -> Vec<Value> {
    ports
        .iter()
        .map(|(n, p, proto)| {
            let mut v = json!({"port": p, "protocol": proto});
            if !n.is_empty() {
                v["name"] = json!(n);
            }
            v
        })
        .collect()
}

/// The Endpoints subsets: one per distinct port mapping.
fn subsets(svc: &Service, eps: &[Ep]) -> Vec<Value> {
    let publish = svc
        .spec
        .as_ref()
        .and_then(|s| s.publish_not_ready_addresses)
        .unwrap_or(false);
    let mut groups: BTreeMap<Vec<PortMapping>, (Vec<Value>, Vec<Value>)> = BTreeMap::new();
    for e in eps.iter().filter(|e| !e.terminating && !e.ports.is_empty()) {
        let mut addr = json!({"ip": e.ip, "nodeName": e.pod.spec.as_ref().and_then(|s| s.node_name.clone()), "targetRef": target_ref(e.pod)});
        if let Some(h) = hostname(svc, e.pod) {
            addr["hostname"] = json!(h);
        }
        let g = groups.entry(e.ports.clone()).or_default();
        if e.ready || publish {
            g.0.push(addr);
        } else {
            g.1.push(addr);
        }
    }
    groups
        .into_iter()
        .map(|(ports, (ready, not_ready))| {
            let mut s = json!({"ports": ports_json(&ports)});
            if !ready.is_empty() {
                s["addresses"] = json!(ready);
            }
            if !not_ready.is_empty() {
                s["notReadyAddresses"] = json!(not_ready);
            }
            s
        })
        .collect()
}

/// The slices a Service should have, by name.
fn slices(svc: &Service, eps: &[Ep]) -> BTreeMap<String, Value> {
    let name = svc.metadata.name.clone().unwrap_or_default();
    let publish = svc
        .spec
        .as_ref()
        .and_then(|s| s.publish_not_ready_addresses)
        .unwrap_or(false);
    let mut groups: BTreeMap<Vec<(String, i32, String)>, Vec<Value>> = BTreeMap::new();
    for e in eps {
        let ready = (e.ready || publish) && !e.terminating;
        let mut ep = json!({
            "addresses": [e.ip],
            "conditions": {"ready": ready, "serving": e.ready || publish, "terminating": e.terminating},
            "nodeName": e.pod.spec.as_ref().and_then(|s| s.node_name.clone()),
            "targetRef": target_ref(e.pod),
        });
        if let Some(h) = hostname(svc, e.pod) {
            ep["hostname"] = json!(h);
        }
        groups.entry(e.ports.clone()).or_default().push(ep);
    }
    if groups.is_empty() {
        // An empty slice says "no endpoints" (kube-proxy then rejects connections).
        let ports: Vec<(String, i32, String)> = vec![];
        groups.insert(ports, vec![]);
    }
    let mut out = BTreeMap::new();
    let mut n = 0;
    for (ports, endpoints) in groups {
        let chunks: Vec<&[Value]> = if endpoints.is_empty() {
            vec![&[]]
        } else {
            endpoints.chunks(MAX_PER_SLICE).collect()
        };
        for chunk in chunks {
            let slice_name = format!("{name}-{n}");
            n += 1;
            out.insert(
                slice_name.clone(),
                json!({
                    "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                    "metadata": {"name": slice_name, "namespace": svc.metadata.namespace,
                                 "labels": {SERVICE_NAME: name, MANAGED_BY: CONTROLLER},
                                 "ownerReferences": controller_ref(svc).map(|r| vec![r])},
                    "addressType": "IPv4",
                    "endpoints": chunk,
                    "ports": ports_json(&ports),
                }),
            );
        }
    }
    out
}

/// Whether the stored object already has `want`'s content in the given fields.
fn same(stored: &Value, want: &Value, fields: &[&str]) -> bool {
    let norm = |v: &Value| match v {
        Value::Null => json!([]),
        other => other.clone(),
    };
    fields.iter().all(|f| norm(&stored[f]) == norm(&want[f]))
        && stored["metadata"]["labels"] == want["metadata"]["labels"]
}

/// A write the controller wants. `rv`: the stored object's resourceVersion (replace), or
/// None (create).
#[derive(Debug, PartialEq)]
enum Write {
    PutEndpoints {
        ns: String,
        name: String,
        rv: Option<String>,
        want: Value,
    },
    PutSlice {
        ns: String,
        name: String,
        rv: Option<String>,
        want: Value,
    },
    DeleteSlice(String, String),
    DeleteEndpoints(String, String),
}

/// What the controller reads.
struct Snapshot {
    services: Vec<Arc<Service>>,
    pods: Vec<Arc<Pod>>,
    slices: Vec<Arc<EndpointSlice>>,
    endpoints: Vec<Arc<Endpoints>>,
}

fn key_of(m: &kube::api::ObjectMeta) -> (String, String) {
    (
        m.namespace.clone().unwrap_or_default(),
        m.name.clone().unwrap_or_default(),
    )
}

/// The stored object's resourceVersion, if its content differs from `want` in `fields`
/// (None: it is up to date); Some(None) when nothing is stored.
fn differs<K: kube::Resource + serde::Serialize>(
    stored: Option<&Arc<K>>,
    want: &Value,
    fields: &[&str],
) -> Option<Option<String>> {
    match stored {
        None => Some(None),
        Some(s) => {
            let json = serde_json::to_value(s.as_ref()).unwrap_or_default();
            (!same(&json, want, fields)).then(|| s.meta().resource_version.clone())
        }
    }
}

fn plan(s: &Snapshot) -> Vec<Write> {
    let mut by_ns: HashMap<&str, Vec<&Arc<Pod>>> = HashMap::new();
    for p in &s.pods {
        by_ns
            .entry(p.metadata.namespace.as_deref().unwrap_or(""))
            .or_default()
            .push(p);
    }
    let stored_eps: HashMap<(String, String), &Arc<Endpoints>> = s
        .endpoints
        .iter()
        .map(|e| (key_of(&e.metadata), e))
        .collect();
    let stored_slices: HashMap<(String, String), &Arc<EndpointSlice>> =
        s.slices.iter().map(|e| (key_of(&e.metadata), e)).collect();
    let mut out = vec![];
    let mut managed: HashSet<(String, String)> = HashSet::new();
    let mut wanted_slices: HashSet<(String, String)> = HashSet::new();
    for svc in &s.services {
        let spec = svc.spec.as_ref();
        if spec
            .and_then(|s| s.selector.as_ref())
            .is_none_or(|s| s.is_empty())
            || spec.and_then(|s| s.type_.as_deref()) == Some("ExternalName")
        {
            continue;
        }
        let (ns, name) = key_of(&svc.metadata);
        managed.insert((ns.clone(), name.clone()));
        let in_ns = by_ns.get(ns.as_str()).map(Vec::as_slice).unwrap_or(&[]);
        let eps = endpoints_for(svc, in_ns);
        let want = json!({"apiVersion": "v1", "kind": "Endpoints",
            "metadata": {"name": name, "namespace": ns, "labels": svc.metadata.labels},
            "subsets": subsets(svc, &eps)});
        let stored = stored_eps.get(&(ns.clone(), name.clone())).copied();
        if let Some(rv) = differs(stored, &want, &["subsets"]) {
            out.push(Write::PutEndpoints {
                ns: ns.clone(),
                name: name.clone(),
                rv,
                want,
            });
        }
        for (slice_name, want) in slices(svc, &eps) {
            let key = (ns.clone(), slice_name.clone());
            if let Some(rv) = differs(
                stored_slices.get(&key).copied(),
                &want,
                &["endpoints", "ports"],
            ) {
                out.push(Write::PutSlice {
                    ns: ns.clone(),
                    name: slice_name,
                    rv,
                    want,
                });
            }
            wanted_slices.insert(key);
        }
    }
    // Slices this controller made that no Service wants any more.
    for sl in &s.slices {
        let ours = sl
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(MANAGED_BY))
            .is_some_and(|m| m == CONTROLLER);
        let key = key_of(&sl.metadata);
        if ours && !wanted_slices.contains(&key) {
            out.push(Write::DeleteSlice(key.0, key.1));
        }
    }
    // Endpoints of Services that are gone (not the ones of selector-less Services, nor the
    // API server's own).
    let live: HashSet<(String, String)> = s.services.iter().map(|s| key_of(&s.metadata)).collect();
    for e in &s.endpoints {
        let key = key_of(&e.metadata);
        if !live.contains(&key) && !managed.contains(&key) && key.1 != "kubernetes" {
            out.push(Write::DeleteEndpoints(key.0, key.1));
        }
    }
    out
}

async fn put<K>(api: &Api<K>, name: &str, rv: Option<String>, want: Value) -> kube::Result<()>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let mut obj = want;
    match rv {
        Some(rv) => {
            obj["metadata"]["resourceVersion"] = json!(rv);
            let k: K = serde_json::from_value(obj).map_err(kube::Error::SerdeError)?;
            api.replace(name, &PostParams::default(), &k).await?;
        }
        None => {
            let k: K = serde_json::from_value(obj).map_err(kube::Error::SerdeError)?;
            match api.create(&PostParams::default(), &k).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 409 => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

async fn apply(client: &Client, writes: Vec<Write>) -> kube::Result<()> {
    for w in writes {
        match w {
            Write::PutEndpoints { ns, name, rv, want } => {
                let api: Api<Endpoints> = Api::namespaced(client.clone(), &ns);
                put(&api, &name, rv, want).await?;
            }
            Write::PutSlice { ns, name, rv, want } => {
                let api: Api<EndpointSlice> = Api::namespaced(client.clone(), &ns);
                put(&api, &name, rv, want).await?;
            }
            // Best effort: a delete that fails is planned again on the next pass.
            Write::DeleteSlice(ns, name) => {
                let api: Api<EndpointSlice> = Api::namespaced(client.clone(), &ns);
                let _ = api.delete(&name, &DeleteParams::default()).await;
            }
            Write::DeleteEndpoints(ns, name) => {
                let api: Api<Endpoints> = Api::namespaced(client.clone(), &ns);
                let _ = api.delete(&name, &DeleteParams::default()).await;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str, selector: Option<&str>) -> Arc<Service> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": "default", "uid": format!("u-{name}")},
                "spec": {
                    "selector": selector.map(|s| json!({"app": s})),
                    "ports": [{"name": "http", "port": 80, "targetPort": "web", "protocol": "TCP"}],
                },
            }))
            .unwrap(),
        )
    }

    fn pod(name: &str, ip: &str, ready: bool) -> Arc<Pod> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": "default", "uid": format!("u-{name}"),
                             "labels": {"app": "web"}},
                "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "i",
                         "ports": [{"name": "web", "containerPort": 8080}]}]},
                "status": {"phase": "Running", "podIP": ip,
                           "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]},
            }))
            .unwrap(),
        )
    }

    fn snap(services: Vec<Arc<Service>>, pods: Vec<Arc<Pod>>) -> Snapshot {
        Snapshot {
            services,
            pods,
            slices: vec![],
            endpoints: vec![],
        }
    }

    /// The writes as stored objects (what the API server would then hold).
    fn stored(writes: &[Write]) -> (Vec<Arc<Endpoints>>, Vec<Arc<EndpointSlice>>) {
        let (mut eps, mut slices) = (vec![], vec![]);
        for w in writes {
            match w {
                Write::PutEndpoints { want, .. } => {
                    eps.push(Arc::new(serde_json::from_value(want.clone()).unwrap()))
                }
                Write::PutSlice { want, .. } => {
                    slices.push(Arc::new(serde_json::from_value(want.clone()).unwrap()))
                }
                _ => {}
            }
        }
        (eps, slices)
    }

    #[test]
    fn ready_and_not_ready_pods_land_in_endpoints_and_one_slice_with_named_ports_resolved() {
        let s = snap(
            vec![svc("web", Some("web"))],
            vec![pod("a", "10.0.0.2", true), pod("b", "10.0.0.3", false)],
        );
        let w = plan(&s);
        let Write::PutEndpoints { want, rv: None, .. } = &w[0] else {
            panic!("{w:?}")
        };
        let sub = &want["subsets"][0];
        assert_eq!(sub["addresses"][0]["ip"], "10.0.0.2");
        assert_eq!(sub["notReadyAddresses"][0]["ip"], "10.0.0.3");
        assert_eq!(sub["ports"][0]["port"], 8080);
        let Write::PutSlice { name, want, .. } = &w[1] else {
            panic!("{w:?}")
        };
        assert_eq!(name, "web-0");
        assert_eq!(want["endpoints"].as_array().unwrap().len(), 2);
        assert_eq!(want["endpoints"][1]["conditions"]["ready"], false);
        assert_eq!(w.len(), 2);
    }

    #[test]
    fn a_pod_whose_subdomain_names_the_service_gets_its_hostname_in_both() {
        let mut with_host = (*pod("a", "10.0.0.2", true)).clone();
        let spec = with_host.spec.as_mut().unwrap();
        spec.hostname = Some("web-0".into());
        spec.subdomain = Some("web".into());
        let mut other = (*pod("b", "10.0.0.3", true)).clone();
        let spec = other.spec.as_mut().unwrap();
        spec.hostname = Some("b-0".into());
        spec.subdomain = Some("elsewhere".into());
        let s = snap(
            vec![svc("web", Some("web"))],
            vec![Arc::new(with_host), Arc::new(other)],
        );
        let w = plan(&s);
        let Write::PutEndpoints { want, .. } = &w[0] else {
            panic!("{w:?}")
        };
        assert_eq!(want["subsets"][0]["addresses"][0]["hostname"], "web-0");
        assert!(want["subsets"][0]["addresses"][1].get("hostname").is_none());
        let Write::PutSlice { want, .. } = &w[1] else {
            panic!("{w:?}")
        };
        assert_eq!(want["endpoints"][0]["hostname"], "web-0");
        assert!(want["endpoints"][1].get("hostname").is_none());
    }

    #[test]
    fn nothing_is_written_once_the_stored_objects_match() {
        let mut s = snap(
            vec![svc("web", Some("web"))],
            vec![pod("a", "10.0.0.2", true)],
        );
        let (eps, slices) = stored(&plan(&s));
        s.endpoints = eps;
        s.slices = slices;
        assert_eq!(plan(&s), vec![]);
    }

    #[test]
    fn more_than_a_hundred_endpoints_spread_over_slices() {
        let pods = (0..150)
            .map(|i| {
                pod(
                    &format!("p{i}"),
                    &format!("10.0.{}.{}", i / 200, i % 200 + 2),
                    true,
                )
            })
            .collect();
        let w = plan(&snap(vec![svc("web", Some("web"))], pods));
        let slices: Vec<usize> = w
            .iter()
            .filter_map(|w| match w {
                Write::PutSlice { want, .. } => Some(want["endpoints"].as_array().unwrap().len()),
                _ => None,
            })
            .collect();
        assert_eq!(slices, vec![100, 50]);
    }

    #[test]
    fn a_service_without_selector_is_left_alone() {
        assert_eq!(
            plan(&snap(
                vec![svc("ext", None)],
                vec![pod("a", "10.0.0.2", true)]
            )),
            vec![]
        );
    }

    #[test]
    fn what_a_deleted_service_had_is_removed_but_not_the_api_servers_endpoints() {
        let mut s = snap(vec![svc("web", Some("web"))], vec![]);
        let (mut eps, slices) = stored(&plan(&s));
        eps.push(Arc::new(
            serde_json::from_value(
                json!({"metadata": {"name": "kubernetes", "namespace": "default"}}),
            )
            .unwrap(),
        ));
        s.endpoints = eps;
        s.slices = slices;
        s.services.clear();
        assert_eq!(
            plan(&s),
            vec![
                Write::DeleteSlice("default".into(), "web-0".into()),
                Write::DeleteEndpoints("default".into(), "web".into()),
            ]
        );
    }
}
