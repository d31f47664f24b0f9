//! Services and EndpointSlices as the watch delivers them, and the model kept up to date from
//! the events: an event marks its Service dirty, and a sync rebuilds only the dirty Services'
//! ports, so the cost of a change does not grow with the number of Services. A relist (the
//! watch restarting) rebuilds everything.

use std::collections::{BTreeSet, HashMap};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::runtime::watcher::Event;

use super::model::{self, Model, SERVICE_NAME, ServicePort};

/// namespace, name.
type Key = (String, String);

fn key_of(m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Key {
    (
        m.namespace.clone().unwrap_or_default(),
        m.name.clone().unwrap_or_default(),
    )
}

/// What the model never reads, dropped before a Service is kept (10,000 Services' uids,
/// timestamps, labels, annotations and managed fields are megabytes).
fn trim_service(mut s: Service) -> Service {
    let m = &mut s.metadata;
    *m = kube::api::ObjectMeta {
        name: m.name.take(),
        namespace: m.namespace.take(),
        ..Default::default()
    };
    if let Some(st) = s.status.as_mut() {
        st.conditions = None;
    }
    s
}

/// The same for an EndpointSlice: its name, namespace and Service label, its endpoints'
/// addresses, conditions and node, its ports.
fn trim_slice(mut s: EndpointSlice) -> EndpointSlice {
    let m = &mut s.metadata;
    let owner = m
        .labels
        .as_mut()
        .and_then(|l| l.remove(SERVICE_NAME))
        .map(|svc| [(SERVICE_NAME.to_string(), svc)].into_iter().collect());
    *m = kube::api::ObjectMeta {
        name: m.name.take(),
        namespace: m.namespace.take(),
        labels: owner,
        ..Default::default()
    };
    for e in &mut s.endpoints {
        e.target_ref = None;
        e.hints = None;
        e.deprecated_topology = None;
    }
    s
}

/// The Service an EndpointSlice belongs to (its label).
fn owner(s: &EndpointSlice) -> Option<Key> {
    let svc = s.metadata.labels.as_ref()?.get(SERVICE_NAME)?;
    Some((
        s.metadata.namespace.clone().unwrap_or_default(),
        svc.clone(),
    ))
}

/// What a sync changed in the model.
#[derive(Debug, Default)]
pub struct Changed {
    /// Everything was rebuilt (first sync or relist).
    pub all: bool,
    /// Port keys that may differ (added, changed or removed).
    pub keys: BTreeSet<String>,
    /// The previous versions of those ports (for conntrack clean-up).
    pub old: Vec<ServicePort>,
}

#[derive(Default)]
pub struct Index {
    node: String,
    /// ClusterIPs served on this node itself: left out of the model.
    local_vips: Vec<std::net::Ipv4Addr>,
    services: HashMap<Key, Service>,
    slices: HashMap<Key, EndpointSlice>,
    slices_of: HashMap<Key, BTreeSet<String>>,
    ports_of: HashMap<Key, Vec<String>>,
    pub model: Model,
    dirty: BTreeSet<Key>,
    all_dirty: bool,
    svc_relist: Option<HashMap<Key, Service>>,
    slice_relist: Option<HashMap<Key, EndpointSlice>>,
    /// Both watches have listed once.
    listed: (bool, bool),
}

impl Index {
    pub fn new(node: &str, local_vips: &[std::net::Ipv4Addr]) -> Self {
        Index {
            node: node.to_string(),
            local_vips: local_vips.to_vec(),
            all_dirty: true,
            ..Default::default()
        }
    }

    /// Both watches delivered their first list.
    pub fn ready(&self) -> bool {
        self.listed.0 && self.listed.1
    }

    pub fn pending(&self) -> bool {
        self.all_dirty || !self.dirty.is_empty()
    }

    pub fn service_event(&mut self, ev: Event<Service>) {
        match ev {
            Event::Apply(s) => {
                let k = key_of(&s.metadata);
                self.services.insert(k.clone(), trim_service(s));
                self.dirty.insert(k);
            }
            Event::Delete(s) => {
                let k = key_of(&s.metadata);
                self.services.remove(&k);
                self.dirty.insert(k);
            }
            Event::Init => self.svc_relist = Some(HashMap::new()),
            Event::InitApply(s) => {
                let k = key_of(&s.metadata);
                self.svc_relist
                    .get_or_insert_default()
                    .insert(k, trim_service(s));
            }
            Event::InitDone => {
                self.services = self.svc_relist.take().unwrap_or_default();
                self.all_dirty = true;
                self.listed.0 = true;
            }
        }
    }

    fn unlink_slice(&mut self, k: &Key) {
        if let Some(old) = self.slices.remove(k)
            && let Some(o) = owner(&old)
        {
            if let Some(set) = self.slices_of.get_mut(&o) {
                set.remove(&k.1);
                if set.is_empty() {
                    self.slices_of.remove(&o);
                }
            }
            self.dirty.insert(o);
        }
    }

    fn link_slice(&mut self, k: Key, s: EndpointSlice) {
        if let Some(o) = owner(&s) {
            self.slices_of
                .entry(o.clone())
                .or_default()
                .insert(k.1.clone());
            self.dirty.insert(o);
        }
        self.slices.insert(k, s);
    }

    pub fn slice_event(&mut self, ev: Event<EndpointSlice>) {
        match ev {
            Event::Apply(s) => {
                let k = key_of(&s.metadata);
                self.unlink_slice(&k);
                self.link_slice(k, trim_slice(s));
            }
            Event::Delete(s) => self.unlink_slice(&key_of(&s.metadata)),
            Event::Init => self.slice_relist = Some(HashMap::new()),
            Event::InitApply(s) => {
                let k = key_of(&s.metadata);
                self.slice_relist
                    .get_or_insert_default()
                    .insert(k, trim_slice(s));
            }
            Event::InitDone => {
                self.slices.clear();
                self.slices_of.clear();
                for (k, s) in self.slice_relist.take().unwrap_or_default() {
                    self.link_slice(k, s);
                }
                self.all_dirty = true;
                self.listed.1 = true;
            }
        }
    }

    fn ports(&self, k: &Key) -> Vec<(String, ServicePort)> {
        let Some(svc) = self.services.get(k) else {
            return vec![];
        };
        let slices: Vec<&EndpointSlice> = self
            .slices_of
            .get(k)
            .into_iter()
            .flatten()
            .filter_map(|name| self.slices.get(&(k.0.clone(), name.clone())))
            .collect();
        let mut ports = model::build_service(svc, &slices, &self.node);
        ports.retain(|(_, p)| !p.cluster_ip.is_some_and(|ip| self.local_vips.contains(&ip)));
        ports
    }

    /// Brings the model up to date with the events received since the last call.
    pub fn sync(&mut self) -> Changed {
        let mut ch = Changed::default();
        if self.all_dirty {
            self.all_dirty = false;
            self.dirty.clear();
            ch.all = true;
            ch.old = std::mem::take(&mut self.model.ports)
                .into_values()
                .collect();
            self.ports_of.clear();
            let keys: Vec<Key> = self.services.keys().cloned().collect();
            for k in keys {
                let ports = self.ports(&k);
                self.ports_of
                    .insert(k, ports.iter().map(|(pk, _)| pk.clone()).collect());
                self.model.ports.extend(ports);
            }
            return ch;
        }
        for k in std::mem::take(&mut self.dirty) {
            for pk in self.ports_of.remove(&k).unwrap_or_default() {
                if let Some(old) = self.model.ports.remove(&pk) {
                    ch.old.push(old);
                }
                ch.keys.insert(pk);
            }
            let ports = self.ports(&k);
            if !ports.is_empty() {
                self.ports_of
                    .insert(k, ports.iter().map(|(pk, _)| pk.clone()).collect());
            }
            for (pk, p) in ports {
                ch.keys.insert(pk.clone());
                self.model.ports.insert(pk, p);
            }
        }
        ch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str, ip: &str) -> Service {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": 80}]},
        }))
        .unwrap()
    }

    fn slice(name: &str, svc: &str, ips: &[&str]) -> EndpointSlice {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "default",
                         "labels": {SERVICE_NAME: svc}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": ips.iter().map(|ip| serde_json::json!({"addresses": [ip]})).collect::<Vec<_>>(),
        }))
        .unwrap()
    }

    #[test]
    fn events_rebuild_only_their_service_and_match_a_full_build() {
        let mut ix = Index::new("n1", &[]);
        ix.service_event(Event::Init);
        ix.service_event(Event::InitApply(svc("a", "10.96.0.1")));
        ix.service_event(Event::InitApply(svc("b", "10.96.0.2")));
        ix.service_event(Event::InitDone);
        assert!(!ix.ready());
        ix.slice_event(Event::Init);
        ix.slice_event(Event::InitApply(slice("a-1", "a", &["10.244.1.2"])));
        ix.slice_event(Event::InitDone);
        assert!(ix.ready());
        assert!(ix.sync().all);
        assert_eq!(ix.model.ports.len(), 2);
        assert_eq!(
            ix.model.ports["default/a:http/TCP"].cluster_endpoints.len(),
            1
        );
        // A new slice for b: only b's port changes.
        ix.slice_event(Event::Apply(slice(
            "b-1",
            "b",
            &["10.244.1.3", "10.244.2.3"],
        )));
        let ch = ix.sync();
        assert!(!ch.all);
        assert_eq!(ch.keys.iter().collect::<Vec<_>>(), ["default/b:http/TCP"]);
        // A slice moving from a to b (label change) dirties both.
        ix.slice_event(Event::Apply(slice("a-1", "b", &["10.244.1.2"])));
        let ch = ix.sync();
        assert_eq!(ch.keys.len(), 2);
        assert!(
            ix.model.ports["default/a:http/TCP"]
                .cluster_endpoints
                .is_empty()
        );
        assert_eq!(
            ix.model.ports["default/b:http/TCP"].cluster_endpoints.len(),
            3
        );
        // A deleted Service takes its ports away; the old version is reported.
        ix.service_event(Event::Delete(svc("a", "10.96.0.1")));
        let ch = ix.sync();
        assert_eq!(ch.old.len(), 1);
        assert!(!ix.model.ports.contains_key("default/a:http/TCP"));
        // Whatever happened, the model equals a build from scratch.
        let svcs: Vec<&Service> = ix.services.values().collect();
        let sls: Vec<&EndpointSlice> = ix.slices.values().collect();
        assert_eq!(ix.model, model::build(&svcs, &sls, "n1"));
        assert!(!ix.pending());
    }
}
