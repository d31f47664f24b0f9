//! The nftables table's content as incremental state: each Service port's fragment (its map
//! and set elements, its pick or affinity chains), reference counts for what ports share, and
//! the delta a sync sends.

use super::*;

/// A chain a port uses: a shared pick chain (built once, when first used; the name says all)
/// or a chain of its own.
#[derive(Debug)]
enum ChainSrc {
    Pick(Kind, usize),
    Own(Chain),
}

/// What one Service port contributes: map and set elements, pick or affinity chains (pick
/// chains are shared with other ports), affinity client sets.
#[derive(Debug, Default)]
struct Frag {
    elems: Vec<(&'static str, Vec<u8>, Option<Data>)>,
    chains: Vec<(String, ChainSrc)>,
    affinity_sets: Vec<String>,
}

impl Frag {
    fn put(&mut self, set: &'static str, k: Vec<u8>, d: Option<Data>) {
        self.elems.push((set, k, d));
    }

    /// A frontend (`key`, of kind `k`) of Service port `p`, served by `eps` (not empty).
    fn target(&mut self, p: &ServicePort, k: Kind, key: Vec<u8>, eps: &[Endpoint], cidr: Ipv4Net) {
        let chain = match p.affinity_seconds {
            None => {
                let name = format!("{}-{}", k.prefix(), eps.len());
                self.chains
                    .push((name.clone(), ChainSrc::Pick(k, eps.len())));
                for (i, e) in eps.iter().enumerate() {
                    let mut bk = key.clone();
                    bk.extend_from_slice(&(i as u32).to_ne_bytes());
                    self.put(k.backends(), bk, Some(Data::Value(ep_data(e))));
                }
                name
            }
            Some(t) => self.affinity(p, k, &key, eps, t, cidr),
        };
        self.put(k.dispatch(), key, Some(verdict(VERDICT_GOTO, &chain)));
    }

    /// kube-proxy's affinity layout for one frontend: a client in an endpoint's set goes to
    /// that endpoint; others are spread at random and remembered.
    fn affinity(
        &mut self,
        p: &ServicePort,
        k: Kind,
        key: &[u8],
        eps: &[Endpoint],
        timeout: u32,
        cidr: Ipv4Net,
    ) -> String {
        let h = short_hash(&format!("{}{}{}", p.name, k.prefix(), hex::encode(key)));
        let chain = format!("affinity-{h}");
        let mut rules: Vec<Vec<Expr>> = k.masquerade(cidr).into_iter().collect();
        let mut ep_chains = vec![];
        let saddr = Expr::Payload {
            dreg: r(0),
            base: BASE_NETWORK,
            offset: 12,
            len: 4,
        };
        for e in eps {
            let name = format!(
                "affinity-{h}-{}",
                short_hash(&format!("{}:{}", e.ip, e.port))
            );
            rules.push(vec![saddr.clone(), lookup(&name, r(0), None), goto(&name)]);
            let mut ep_rules = vec![
                saddr.clone(),
                Expr::Dynset {
                    set: name.clone(),
                    sreg_key: r(0),
                    timeout_ms: u64::from(timeout) * 1000,
                },
            ];
            ep_rules.extend(dnat_to(e));
            self.chains.push((
                name.clone(),
                ChainSrc::Own(Chain {
                    hook: None,
                    rules: vec![ep_rules],
                }),
            ));
            self.affinity_sets.push(name.clone());
            ep_chains.push(name);
        }
        // No memory yet: spread like kube-proxy's statistic rules, one chance per endpoint.
        let n = ep_chains.len();
        for (i, name) in ep_chains.iter().enumerate() {
            let left = (n - i) as u32;
            if left > 1 {
                rules.push(vec![
                    Expr::Numgen {
                        dreg: r(0),
                        modulus: left,
                    },
                    Expr::Cmp {
                        sreg: r(0),
                        op: CMP_EQ,
                        data: 0u32.to_ne_bytes().to_vec(),
                    },
                    goto(name),
                ]);
            } else {
                rules.push(vec![goto(name)]);
            }
        }
        self.chains
            .push((chain.clone(), ChainSrc::Own(Chain { hook: None, rules })));
        chain
    }

    fn of(p: &ServicePort, cidr: Ipv4Net) -> Frag {
        let mut o = Frag::default();
        let proto = p.proto.number();
        if let Some(vip) = p.cluster_ip {
            let key = vip_key(vip, proto, p.port);
            if p.cluster_endpoints.is_empty() {
                o.put("no-endpoint-vips", key, None);
            } else {
                o.target(p, Kind::Cluster, key, &p.cluster_endpoints, cidr);
            }
        }
        let ext_keys: Vec<Vec<u8>> = p
            .external_ips
            .iter()
            .map(|ip| vip_key(*ip, proto, p.port))
            .collect();
        let np = p.node_port.map(|n| np_key(proto, n));
        if p.external_endpoints.is_empty() {
            for k in ext_keys {
                o.put("no-endpoint-vips", k, None);
            }
            if let Some(k) = np {
                o.put("no-endpoint-nps", k, None);
            }
        } else {
            let (kv, kn) = if p.external_local {
                (Kind::ExternalLocal, Kind::NodePortLocal)
            } else {
                (Kind::External, Kind::NodePort)
            };
            let pods_to_cluster = p.external_local && !p.cluster_endpoints.is_empty();
            for k in ext_keys {
                if pods_to_cluster {
                    o.target(p, Kind::PodVip, k.clone(), &p.cluster_endpoints, cidr);
                }
                o.target(p, kv, k, &p.external_endpoints, cidr);
            }
            if let Some(k) = np {
                if pods_to_cluster {
                    o.target(p, Kind::PodNodePort, k.clone(), &p.cluster_endpoints, cidr);
                }
                o.target(p, kn, k, &p.external_endpoints, cidr);
            }
        }
        for e in p.all_endpoints() {
            let mut k = e.ip.octets().to_vec();
            k.extend_from_slice(&e.ip.octets());
            o.put("hairpin", k, None);
        }
        o
    }
}

/// An element by reference: key and data.
type ElemRef<'a> = (&'a [u8], Option<&'a Data>);

/// The table's content kept up to date port by port: a change to one Service re-renders only
/// that Service's ports, and the delta is read off the reference counts (pick chains and
/// hairpin elements are shared), so a sync costs O(changed Services), not O(all Services).
pub struct State {
    cidr: Ipv4Net,
    ports: BTreeMap<String, (ServicePort, Frag)>,
    /// (set, key) → (data, ports using it).
    elems: HashMap<ElemKey, (Option<Data>, usize)>,
    /// Pick and affinity chains → (chain, ports using it).
    chains: HashMap<String, (Chain, usize)>,
    affinity_sets: HashMap<String, usize>,
    base: BTreeMap<String, Chain>,
}

/// What one update changed (input to the delta transaction).
#[derive(Default)]
struct Changes {
    /// Whether to record anything (not when a full load follows).
    record: bool,
    elems_gone: BTreeMap<&'static str, Vec<Vec<u8>>>,
    elems_new: BTreeMap<&'static str, Vec<Elem>>,
    chains_new: BTreeMap<String, Chain>,
    /// Chains kept whose rules change (an affinity Service's endpoints).
    chains_changed: BTreeMap<String, Chain>,
    chains_gone: BTreeSet<String>,
    sets_new: BTreeSet<String>,
    sets_gone: BTreeSet<String>,
}

impl State {
    pub fn new(cidr: Ipv4Net) -> Self {
        State {
            cidr,
            ports: BTreeMap::new(),
            elems: HashMap::new(),
            chains: HashMap::new(),
            affinity_sets: HashMap::new(),
            base: base_chains(cidr),
        }
    }

    fn remove(&mut self, f: &Frag, ch: &mut Changes) {
        for (set, k, _) in &f.elems {
            let key = (*set, k.clone());
            if let Some(e) = self.elems.get_mut(&key) {
                e.1 -= 1;
                if e.1 == 0 {
                    self.elems.remove(&key);
                    if ch.record {
                        ch.elems_gone.entry(set).or_default().push(k.clone());
                    }
                }
            }
        }
        for (name, _) in &f.chains {
            if let Some(c) = self.chains.get_mut(name) {
                c.1 -= 1;
                if c.1 == 0 {
                    self.chains.remove(name);
                    ch.chains_gone.insert(name.clone());
                }
            }
        }
        for name in &f.affinity_sets {
            if let Some(c) = self.affinity_sets.get_mut(name) {
                *c -= 1;
                if *c == 0 {
                    self.affinity_sets.remove(name);
                    ch.sets_gone.insert(name.clone());
                }
            }
        }
    }

    fn add(&mut self, f: &Frag, ch: &mut Changes) {
        for (set, k, d) in &f.elems {
            let e = self.elems.entry((*set, k.clone())).or_insert((None, 0));
            e.1 += 1;
            if e.1 == 1 || e.0 != *d {
                if e.1 > 1 && ch.record {
                    // Another port already used this key with other data: last one wins.
                    ch.elems_gone.entry(set).or_default().push(k.clone());
                }
                e.0 = d.clone();
                if ch.record {
                    ch.elems_new
                        .entry(set)
                        .or_default()
                        .push((k.clone(), d.clone()));
                }
            }
        }
        let cidr = self.cidr;
        for (name, src) in &f.chains {
            let e = self.chains.entry(name.clone()).or_insert_with(|| {
                let c = match src {
                    ChainSrc::Pick(k, n) => pick_chain(*k, *n, cidr),
                    ChainSrc::Own(c) => c.clone(),
                };
                (c, 0)
            });
            e.1 += 1;
            if e.1 == 1 {
                ch.chains_new.insert(name.clone(), e.0.clone());
            } else if let ChainSrc::Own(c) = src
                && e.0 != *c
            {
                e.0 = c.clone();
                ch.chains_changed.insert(name.clone(), c.clone());
            }
        }
        for name in &f.affinity_sets {
            let e = self.affinity_sets.entry(name.clone()).or_insert(0);
            *e += 1;
            if *e == 1 {
                ch.sets_new.insert(name.clone());
            }
        }
    }

    /// Brings the state to `m` and returns the delta transaction (empty when nothing changed).
    pub fn update(&mut self, m: &Model) -> Batch {
        self.merge(m, true)
    }

    /// Brings the state to `m` without working out a delta: for a full load
    /// ([`State::load`]) that follows.
    pub fn reset(&mut self, m: &Model) {
        self.merge(m, false);
    }

    fn merge(&mut self, m: &Model, delta: bool) -> Batch {
        let ch = Changes {
            record: delta,
            ..Default::default()
        };
        // Both maps are sorted by key: one merge pass finds what left and what changed,
        // without hashing or searching.
        let mut gone = vec![];
        let mut changed = vec![];
        {
            let mut old = self.ports.iter().peekable();
            for (k, p) in &m.ports {
                while old.peek().is_some_and(|(ok, _)| ok.as_str() < k.as_str()) {
                    if let Some((ok, _)) = old.next() {
                        gone.push(ok.clone());
                    }
                }
                match old.peek() {
                    Some((ok, (op, _))) if *ok == k => {
                        if op != p {
                            changed.push(k);
                        }
                        old.next();
                    }
                    _ => changed.push(k),
                }
            }
            gone.extend(old.map(|(k, _)| k.clone()));
        }
        self.apply(m, gone, changed, ch)
    }

    /// Like [`State::update`], when the caller knows which port keys may have changed (the
    /// Services a watch event touched): O(changed), whatever the number of Services.
    pub fn update_keys<'a>(
        &mut self,
        m: &Model,
        keys: impl IntoIterator<Item = &'a String>,
    ) -> Batch {
        let mut gone = vec![];
        let mut changed = vec![];
        for k in keys {
            match (m.ports.get_key_value(k), self.ports.get(k)) {
                (Some((mk, p)), Some((old, _))) if old != p => changed.push(mk),
                (Some(_), Some(_)) => {}
                (Some((mk, _)), None) => changed.push(mk),
                (None, Some(_)) => gone.push(k.clone()),
                (None, None) => {}
            }
        }
        let ch = Changes {
            record: true,
            ..Default::default()
        };
        self.apply(m, gone, changed, ch)
    }

    fn apply(
        &mut self,
        m: &Model,
        gone: Vec<String>,
        changed: Vec<&String>,
        mut ch: Changes,
    ) -> Batch {
        for k in gone {
            if let Some((_, f)) = self.ports.remove(&k) {
                self.remove(&f, &mut ch);
            }
        }
        for k in changed {
            let p = &m.ports[k];
            // New first, then the old removed: shared items stay, only real changes move.
            let f = Frag::of(p, self.cidr);
            self.add(&f, &mut ch);
            if let Some((_, old)) = self.ports.insert(k.clone(), (p.clone(), f)) {
                self.remove(&old, &mut ch);
            }
        }
        if !ch.record {
            return Batch::new();
        }
        // An element both gone and new (re-added with other data by the same update, or
        // removed by the old fragment after the new one counted it) is settled by the counts.
        for (set, keys) in ch.elems_gone.iter_mut() {
            keys.retain(|k| {
                !self.elems.contains_key(&(*set, k.clone())) || {
                    // Present now: delete only if it is also re-added (data changed).
                    ch.elems_new
                        .get(set)
                        .is_some_and(|n| n.iter().any(|(nk, _)| nk == k))
                }
            });
        }
        for (set, adds) in ch.elems_new.iter_mut() {
            // Keep the last data written for each key, and only keys still present.
            let mut last: BTreeMap<Vec<u8>, Option<Data>> = BTreeMap::new();
            for (k, d) in adds.drain(..) {
                last.insert(k, d);
            }
            adds.extend(last.into_iter().filter(|(k, d)| {
                self.elems
                    .get(&(*set, k.clone()))
                    .is_some_and(|(cur, _)| cur == d)
            }));
        }
        // A chain or set released by one port and taken by another within the update (gone,
        // then new) stayed in the kernel: neither delete nor re-create it.
        ch.chains_gone.retain(|c| {
            let kept = self.chains.contains_key(c);
            if kept {
                ch.chains_new.remove(c);
            }
            !kept
        });
        ch.sets_gone.retain(|c| {
            let kept = self.affinity_sets.contains_key(c);
            if kept {
                ch.sets_new.remove(c);
            }
            !kept
        });
        let mut b = Batch::new();
        for name in &ch.sets_new {
            add_affinity_set(&mut b, name);
        }
        for (name, c) in &ch.chains_new {
            b.add_chain(TABLE, name, c.hook);
        }
        for (name, c) in &ch.chains_new {
            for rule in &c.rules {
                b.add_rule(TABLE, name, rule);
            }
        }
        for (name, c) in &ch.chains_changed {
            if ch.chains_new.contains_key(name) {
                continue;
            }
            b.flush_chain(TABLE, name);
            for rule in &c.rules {
                b.add_rule(TABLE, name, rule);
            }
        }
        for (set, keys) in &ch.elems_gone {
            let mut keys = keys.clone();
            keys.sort();
            keys.dedup();
            if !keys.is_empty() {
                b.del_elems(TABLE, set, &keys);
            }
        }
        for (set, adds) in &ch.elems_new {
            if !adds.is_empty() {
                b.add_elems(TABLE, set, adds);
            }
        }
        for name in &ch.chains_gone {
            b.flush_chain(TABLE, name);
        }
        for name in &ch.chains_gone {
            b.del_chain(TABLE, name);
        }
        for name in &ch.sets_gone {
            b.del_set(TABLE, name);
        }
        b
    }

    /// Whether `name` is one of the table's chains as the state wants it.
    pub fn owns_chain(&self, name: &str) -> bool {
        self.base.contains_key(name) || self.chains.contains_key(name)
    }

    /// Whether `name` is one of the table's sets or maps as the state wants it.
    pub fn owns_set(&self, name: &str) -> bool {
        self.affinity_sets.contains_key(name) || set_defs().iter().any(|d| d.0 == name)
    }

    /// The transaction that loads the whole table as the state wants it (`repair`: chains
    /// and sets that exist are flushed and refilled), encoded straight from the state.
    pub fn load(&self, repair: bool) -> Batch {
        let mut b = Batch::new();
        b.add_table(TABLE);
        let defs = set_defs();
        for (name, flags, key, data) in &defs {
            b.add_set(TABLE, name, *flags, *key, *data);
        }
        for name in self.affinity_sets.keys() {
            add_affinity_set(&mut b, name);
        }
        let chains = || {
            self.base
                .iter()
                .chain(self.chains.iter().map(|(n, (c, _))| (n, c)))
        };
        for (name, c) in chains() {
            b.add_chain(TABLE, name, c.hook);
        }
        for (name, c) in chains() {
            if repair {
                b.flush_chain(TABLE, name);
            }
            for rule in &c.rules {
                b.add_rule(TABLE, name, rule);
            }
        }
        let mut by_set: HashMap<&str, Vec<ElemRef>> = HashMap::new();
        for ((set, k), (d, _)) in &self.elems {
            by_set
                .entry(set)
                .or_default()
                .push((k.as_slice(), d.as_ref()));
        }
        for (set, ..) in &defs {
            if repair {
                b.flush_set(TABLE, set);
            }
            if let Some(elems) = by_set.remove(set) {
                b.add_elems_ref(TABLE, set, elems);
            }
        }
        b
    }

    /// The whole table as the state wants it.
    pub fn rendered(&self) -> Rendered {
        let mut chains = self.base.clone();
        for (name, (c, _)) in &self.chains {
            chains.insert(name.clone(), c.clone());
        }
        let mut sets: BTreeMap<&'static str, Elems> = set_defs()
            .into_iter()
            .map(|d| (d.0, Elems::new()))
            .collect();
        for ((set, k), (d, _)) in &self.elems {
            if let Some(s) = sets.get_mut(set) {
                s.insert(k.clone(), d.clone());
            }
        }
        Rendered {
            chains,
            sets,
            affinity_sets: self.affinity_sets.keys().cloned().collect(),
        }
    }
}
