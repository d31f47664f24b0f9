//! Service address and node-port allocation. Each allocated ClusterIP or node port is a key in
//! the store (`/registry/ipallocations/<ip>`, `/registry/nodeportallocations/<port>`, the way
//! Kubernetes 1.31+ keeps IPAddress objects) created with an Absent precondition, so two API
//! servers can never hand out the same one. Released when the Service goes.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde_json::{Value, json};

use crate::store::{Error, Precondition, Store};

const IPS: &str = "/registry/ipallocations/";
const PORTS: &str = "/registry/nodeportallocations/";

/// Service networking settings.
#[derive(Debug, Clone)]
pub struct ServiceNet {
    pub cidr: Ipv4Net,
    pub node_ports: (u16, u16),
}

impl Default for ServiceNet {
    fn default() -> Self {
        Self {
            cidr: "10.96.0.0/12".parse().expect("valid CIDR"),
            node_ports: (30000, 32767),
        }
    }
}

impl ServiceNet {
    /// The `kubernetes` Service's address: the range's first host address.
    pub fn first(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.cidr.network()) + 1)
    }
}

/// Why an allocation failed: a field error for a 422.
#[derive(Debug)]
pub struct AllocError {
    pub field: String,
    pub message: String,
}

fn ferr(field: impl Into<String>, message: impl Into<String>) -> AllocError {
    AllocError {
        field: field.into(),
        message: message.into(),
    }
}

async fn claim(store: &dyn Store, key: &str, owner: &str) -> Result<bool, AllocError> {
    match store
        .put(key, owner.as_bytes().to_vec(), Precondition::Absent)
        .await
    {
        Ok(_) => Ok(true),
        // Already ours (a retried write of the same object) counts as claimed.
        Err(Error::AlreadyExists(_)) => Ok(store
            .get(key)
            .await
            .ok()
            .flatten()
            .is_some_and(|kv| kv.value == owner.as_bytes())),
        Err(e) => Err(ferr("", format!("allocation: {e}"))),
    }
}

/// Releases everything a Service object holds.
pub async fn release(store: &dyn Store, svc: &Value) {
    for ip in svc
        .pointer("/spec/clusterIPs")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(ip) = ip.as_str().filter(|i| *i != "None") {
            let _ = store
                .delete(&format!("{IPS}{ip}"), Precondition::None)
                .await;
        }
    }
    let node_ports = svc
        .pointer("/spec/ports")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|p| p.get("nodePort").and_then(Value::as_u64));
    let health = svc
        .pointer("/spec/healthCheckNodePort")
        .and_then(Value::as_u64);
    for n in node_ports.chain(health) {
        free_port(store, n).await;
    }
}

/// Returns node port `n` to the pool.
async fn free_port(store: &dyn Store, n: u64) {
    let _ = store
        .delete(&format!("{PORTS}{n}"), Precondition::None)
        .await;
}

/// Defaults a Service and allocates its ClusterIP and node ports (kube-apiserver's service
/// REST strategy). `old` is the stored Service on update: its allocations are kept.
pub async fn allocate(
    store: &dyn Store,
    net: &ServiceNet,
    svc: &mut Value,
    old: Option<&Value>,
    owner: &str,
) -> Result<(), AllocError> {
    let Some(spec) = svc.get_mut("spec").and_then(Value::as_object_mut) else {
        return Err(ferr("spec", "Required value"));
    };
    let typ = service_defaults(spec)?;
    if typ == "ExternalName" {
        return Ok(());
    }
    cluster_ip(store, net, spec, old, owner).await?;
    if typ == "NodePort" || typ == "LoadBalancer" {
        node_ports(store, net, spec, old, owner).await?;
    }
    health_check_node_port(store, net, spec, old, owner, &typ).await
}

/// kube-apiserver's Service defaults (type, session affinity, traffic policies, port
/// protocol and targetPort); the type, which must be a known one.
fn service_defaults(spec: &mut serde_json::Map<String, Value>) -> Result<String, AllocError> {
    let typ = spec
        .entry("type")
        .or_insert_with(|| json!("ClusterIP"))
        .as_str()
        .unwrap_or("ClusterIP")
        .to_string();
    if !["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"].contains(&typ.as_str()) {
        return Err(ferr(
            "spec.type",
            format!(
                "Unsupported value: \"{typ}\": supported values: \"ClusterIP\", \"ExternalName\", \"LoadBalancer\", \"NodePort\""
            ),
        ));
    }
    spec.entry("sessionAffinity")
        .or_insert_with(|| json!("None"));
    spec.entry("internalTrafficPolicy")
        .or_insert_with(|| json!("Cluster"));
    if typ == "NodePort" || typ == "LoadBalancer" {
        spec.entry("externalTrafficPolicy")
            .or_insert_with(|| json!("Cluster"));
    }
    if let Some(ports) = spec.get_mut("ports").and_then(Value::as_array_mut) {
        for p in ports.iter_mut().filter_map(Value::as_object_mut) {
            p.entry("protocol").or_insert_with(|| json!("TCP"));
            if !p.contains_key("targetPort")
                && let Some(port) = p.get("port").cloned()
            {
                p.insert("targetPort".into(), port);
            }
        }
    }
    Ok(typ)
}

/// The ClusterIP: kept on update (immutable), allocated or reserved on create.
async fn cluster_ip(
    store: &dyn Store,
    net: &ServiceNet,
    spec: &mut serde_json::Map<String, Value>,
    old: Option<&Value>,
    owner: &str,
) -> Result<(), AllocError> {
    let old_ip = old
        .and_then(|o| o.pointer("/spec/clusterIP"))
        .and_then(Value::as_str)
        .map(str::to_string);
    let asked = spec
        .get("clusterIP")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let ip = match (&old_ip, asked.as_str()) {
        (Some(o), a) if a.is_empty() || a == o => o.clone(),
        (Some(o), a) => {
            return Err(ferr(
                "spec.clusterIPs[0]",
                format!("Invalid value: [\"{a}\"]: may not change once set (was {o})"),
            ));
        }
        (None, "None") => "None".to_string(),
        (None, "") => {
            let first = u32::from(net.cidr.network()) + 2;
            let last = u32::from(net.cidr.broadcast()) - 1;
            let mut got = None;
            // A hashed start spreads allocations and keeps the scan short.
            let span = last - first + 1;
            let start = owner
                .bytes()
                .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(b as u32))
                % span;
            for i in 0..span {
                let ip = Ipv4Addr::from(first + (start + i) % span);
                if claim(store, &format!("{IPS}{ip}"), owner).await? {
                    got = Some(ip.to_string());
                    break;
                }
            }
            got.ok_or_else(|| ferr("spec.clusterIPs", "Internal error: range is full"))?
        }
        (None, a) => {
            let parsed: Ipv4Addr = a.parse().map_err(|_| {
                ferr(
                    "spec.clusterIPs[0]",
                    format!("Invalid value: \"{a}\": must be a valid IP address"),
                )
            })?;
            if !net.cidr.contains(&parsed) {
                return Err(ferr(
                    "spec.clusterIPs[0]",
                    format!(
                        "Invalid value: \"{a}\": the provided IP ({a}) is not in the valid range. The range of valid IPs is {}",
                        net.cidr
                    ),
                ));
            }
            if !claim(store, &format!("{IPS}{a}"), owner).await? {
                return Err(ferr(
                    "spec.clusterIPs[0]",
                    format!("Invalid value: \"{a}\": provided IP is already allocated"),
                ));
            }
            a.to_string()
        }
    };
    spec.insert("clusterIP".into(), json!(ip));
    spec.insert("clusterIPs".into(), json!([ip]));
    if ip != "None" {
        spec.entry("ipFamilies").or_insert_with(|| json!(["IPv4"]));
        spec.entry("ipFamilyPolicy")
            .or_insert_with(|| json!("SingleStack"));
    }
    Ok(())
}

/// Node ports of a NodePort or LoadBalancer Service: those the old version held are kept, the
/// rest claimed (as asked, or free ones).
async fn node_ports(
    store: &dyn Store,
    net: &ServiceNet,
    spec: &mut serde_json::Map<String, Value>,
    old: Option<&Value>,
    owner: &str,
) -> Result<(), AllocError> {
    let old_ports: Vec<u64> = old
        .and_then(|o| o.pointer("/spec/ports"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|p| p.get("nodePort").and_then(Value::as_u64))
        .collect();
    let ports = spec.get_mut("ports").and_then(Value::as_array_mut);
    for (i, p) in ports
        .into_iter()
        .flatten()
        .filter_map(Value::as_object_mut)
        .enumerate()
    {
        let want = p.get("nodePort").and_then(Value::as_u64).unwrap_or(0);
        if want != 0 && old_ports.contains(&want) {
            continue;
        }
        let port = node_port(
            store,
            net,
            owner,
            want,
            i as u64,
            &format!("spec.ports[{i}].nodePort"),
        )
        .await?;
        p.insert("nodePort".into(), json!(port));
    }
    Ok(())
}

/// The health check node port of a LoadBalancer with externalTrafficPolicy: Local (load
/// balancers probe it to find the nodes with local endpoints); dropped otherwise.
async fn health_check_node_port(
    store: &dyn Store,
    net: &ServiceNet,
    spec: &mut serde_json::Map<String, Value>,
    old: Option<&Value>,
    owner: &str,
    typ: &str,
) -> Result<(), AllocError> {
    let wants_hc = typ == "LoadBalancer"
        && spec.get("externalTrafficPolicy").and_then(Value::as_str) == Some("Local");
    let old_hc = old
        .and_then(|o| o.pointer("/spec/healthCheckNodePort"))
        .and_then(Value::as_u64);
    let asked_hc = spec
        .get("healthCheckNodePort")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    if wants_hc {
        let port = if asked_hc != 0 && Some(asked_hc) == old_hc {
            asked_hc
        } else if asked_hc == 0 && old_hc.is_some() {
            old_hc.unwrap_or_default()
        } else {
            node_port(
                store,
                net,
                owner,
                asked_hc,
                1000,
                "spec.healthCheckNodePort",
            )
            .await?
        };
        spec.insert("healthCheckNodePort".into(), json!(port));
    } else {
        if asked_hc != 0 && Some(asked_hc) != old_hc {
            return Err(ferr(
                "spec.healthCheckNodePort",
                format!(
                    "Invalid value: {asked_hc}: may only be set when `type` is 'LoadBalancer' and `externalTrafficPolicy` is 'Local'"
                ),
            ));
        }
        spec.remove("healthCheckNodePort");
        if let Some(n) = old_hc {
            free_port(store, n).await;
        }
    }
    Ok(())
}

/// Claims node port `want` for `owner`, or (want = 0) the first free one from a starting
/// point derived from the owner and `salt`; `field` names the field in errors.
async fn node_port(
    store: &dyn Store,
    net: &ServiceNet,
    owner: &str,
    want: u64,
    salt: u64,
    field: &str,
) -> Result<u64, AllocError> {
    let (lo, hi) = net.node_ports;
    if want == 0 {
        let span = (hi - lo + 1) as u64;
        let start = owner
            .bytes()
            .fold(salt, |h, b| h.wrapping_mul(31).wrapping_add(b as u64))
            % span;
        for k in 0..span {
            let n = lo as u64 + (start + k) % span;
            if claim(store, &format!("{PORTS}{n}"), owner).await? {
                return Ok(n);
            }
        }
        return Err(ferr(field, "Internal error: range is full"));
    }
    if want < lo as u64 || want > hi as u64 {
        return Err(ferr(
            field,
            format!(
                "Invalid value: {want}: provided port is not in the valid range. The range of valid ports is {lo}-{hi}"
            ),
        ));
    }
    if !claim(store, &format!("{PORTS}{want}"), owner).await? {
        return Err(ferr(
            field,
            format!("Invalid value: {want}: provided port is already allocated"),
        ));
    }
    Ok(want)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::embedded::Embedded;

    #[tokio::test]
    async fn cluster_ips_and_node_ports_are_unique_and_released() {
        let d = tempfile::tempdir().unwrap();
        let s = Embedded::open(&d.path().join("db")).unwrap();
        let net = ServiceNet {
            cidr: "10.96.0.0/29".parse().unwrap(),
            node_ports: (30000, 30001),
        };
        let mut a = json!({"spec": {"type": "NodePort", "ports": [{"port": 80}]}});
        let mut b = json!({"spec": {"type": "NodePort", "ports": [{"port": 80}]}});
        allocate(&s, &net, &mut a, None, "a").await.unwrap();
        allocate(&s, &net, &mut b, None, "b").await.unwrap();
        assert_ne!(a["spec"]["clusterIP"], b["spec"]["clusterIP"]);
        assert_ne!(
            a["spec"]["ports"][0]["nodePort"],
            b["spec"]["ports"][0]["nodePort"]
        );
        assert_eq!(a["spec"]["ports"][0]["targetPort"], 80);
        assert_eq!(a["spec"]["ports"][0]["protocol"], "TCP");
        let mut c = json!({"spec": {"type": "NodePort", "ports": [{"port": 80}]}});
        let e = allocate(&s, &net, &mut c, None, "c").await.unwrap_err();
        assert_eq!(
            e.field, "spec.ports[0].nodePort",
            "the two-port range is used up"
        );
        release(&s, &a).await;
        let taken = a["spec"]["clusterIP"].as_str().unwrap().to_string();
        let mut d2 = json!({"spec": {"clusterIP": taken, "ports": [{"port": 1}]}});
        allocate(&s, &net, &mut d2, None, "d").await.unwrap();
        assert_eq!(
            d2["spec"]["clusterIP"],
            json!(taken),
            "a released address can be asked for"
        );
        let mut dup = json!({"spec": {"clusterIP": taken, "ports": [{"port": 1}]}});
        let e = allocate(&s, &net, &mut dup, None, "e").await.unwrap_err();
        assert!(e.message.contains("provided IP is already allocated"));
        let mut out = json!({"spec": {"clusterIP": "192.168.0.1"}});
        assert!(
            allocate(&s, &net, &mut out, None, "f")
                .await
                .unwrap_err()
                .message
                .contains("not in the valid range")
        );
        // On update the address stays and may not change.
        let mut upd = json!({"spec": {"ports": [{"port": 2}]}});
        allocate(&s, &net, &mut upd, Some(&d2), "d").await.unwrap();
        assert_eq!(upd["spec"]["clusterIP"], json!(taken));
        let mut change = json!({"spec": {"clusterIP": "10.96.0.6"}});
        assert!(
            allocate(&s, &net, &mut change, Some(&d2), "d")
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn health_check_node_port_follows_the_traffic_policy() {
        let d = tempfile::tempdir().unwrap();
        let s = Embedded::open(&d.path().join("db")).unwrap();
        let net = ServiceNet {
            cidr: "10.96.0.0/29".parse().unwrap(),
            node_ports: (30000, 30002),
        };
        let lb = || {
            json!({"spec": {"type": "LoadBalancer", "externalTrafficPolicy": "Local",
                            "ports": [{"port": 80}]}})
        };
        let mut a = lb();
        allocate(&s, &net, &mut a, None, "a").await.unwrap();
        let hc = a["spec"]["healthCheckNodePort"]
            .as_u64()
            .expect("allocated");
        assert_ne!(json!(hc), a["spec"]["ports"][0]["nodePort"]);
        // Kept on update.
        let mut upd = lb();
        allocate(&s, &net, &mut upd, Some(&a), "a").await.unwrap();
        assert_eq!(upd["spec"]["healthCheckNodePort"], json!(hc));
        // Dropped and released when the policy becomes Cluster.
        let mut cluster = json!({"spec": {"type": "LoadBalancer", "externalTrafficPolicy": "Cluster",
                                          "healthCheckNodePort": hc, "ports": [{"port": 80}]}});
        allocate(&s, &net, &mut cluster, Some(&a), "a")
            .await
            .unwrap();
        assert!(cluster["spec"].get("healthCheckNodePort").is_none());
        let mut b = json!({"spec": {"type": "NodePort", "ports": [{"port": 80, "nodePort": hc}]}});
        allocate(&s, &net, &mut b, None, "b")
            .await
            .expect("the released port is free again");
        // Asked for where it does not apply: a clear error naming the field.
        let mut bad = json!({"spec": {"type": "NodePort", "healthCheckNodePort": 30001,
                                      "ports": [{"port": 80}]}});
        let e = allocate(&s, &net, &mut bad, None, "c").await.unwrap_err();
        assert_eq!(e.field, "spec.healthCheckNodePort");
    }
}
