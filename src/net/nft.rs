//! A small nf_tables netlink layer (the foundation of the nftables backend): batches of
//! table, chain, set/map and element messages encoded by hand and sent in one transaction over
//! a NETLINK_NETFILTER socket, every message acknowledged. No libnftnl, no nft CLI: loading
//! 10,000 Services through the CLI was measured at seconds of parsing alone.
//! Acts in the network namespace of the calling thread.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const NETLINK_NETFILTER: i32 = 12;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_CREATE: u16 = 0x400;
const NLA_F_NESTED: u16 = 0x8000;
/// The most payload one attribute can carry (its length is 16 bits), with room to spare.
const MAX_NEST: usize = 60_000;
const NLM_F_APPEND: u16 = 0x800;
/// nf_tables address family of `table ip`.
pub const NFPROTO_IPV4: u8 = 2;

const NEWTABLE: u16 = 0;
const DELTABLE: u16 = 2;
const NEWCHAIN: u16 = 3;
const DELCHAIN: u16 = 5;
const NEWRULE: u16 = 6;
const DELRULE: u16 = 8;
const NEWSET: u16 = 9;
const DELSET: u16 = 11;
const NEWSETELEM: u16 = 12;
const DELSETELEM: u16 = 14;

/// Set flags. (A concatenated key in a hash set needs no flag; NFT_SET_CONCAT is for interval
/// sets and requires a field description, which this layer does not send.)
pub const SET_MAP: u32 = 0x8;
/// Elements expire (per-element timeouts).
pub const SET_TIMEOUT: u32 = 0x10;
/// Elements are added from the packet path (`update @set`).
pub const SET_EVAL: u32 = 0x20;
/// The data type of a verdict map.
pub const DATA_VERDICT: u32 = 0xffff_ff00;
/// nft's data type ids (for `nft list` to print keys), and how they concatenate.
pub const TYPE_IPADDR: u32 = 7;
pub const TYPE_INET_PROTOCOL: u32 = 12;
pub const TYPE_INET_SERVICE: u32 = 13;
pub const TYPE_MARK: u32 = 19;
pub fn concat_type(parts: &[u32]) -> u32 {
    parts.iter().fold(0, |acc, t| (acc << 6) | t)
}

/// Verdict codes.
pub const VERDICT_JUMP: i32 = -3;
pub const VERDICT_GOTO: i32 = -4;
pub const VERDICT_RETURN: i32 = -5;

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("netlink socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("nf_tables rejected {what}: {source}")]
    Rejected {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("nf_tables: {0}")]
    Protocol(String),
}

/// Registers: the verdict, the 16-byte ones, and the first 32-bit one (concatenations use
/// consecutive 32-bit registers, one per 4 bytes of each component).
pub const REG_VERDICT: u32 = 0;
pub const REG_1: u32 = 1;
pub const REG_2: u32 = 2;
pub const REG32_00: u32 = 8;

/// Payload bases.
pub const BASE_NETWORK: u32 = 1;
pub const BASE_TRANSPORT: u32 = 2;
/// Meta keys.
pub const META_MARK: u32 = 3;
pub const META_L4PROTO: u32 = 16;
/// Comparison operators.
pub const CMP_EQ: u32 = 0;
pub const CMP_NEQ: u32 = 1;
/// Conntrack keys, and the `ct state new` bit.
pub const CT_STATE: u32 = 0;
pub const CT_STATE_NEW: u32 = 8;
/// `ct status` (NFT_CT_STATUS; 1 is the direction) and its destination-NAT bit
/// (IPS_DST_NAT).
pub const CT_STATUS: u32 = 2;
pub const CT_STATUS_DNAT: u32 = 0x20;
/// `fib daddr type`: the address type result, and the kernel's RTN_LOCAL.
pub const FIB_ADDRTYPE_DADDR: (u32, u32) = (3, 2);
pub const RTN_LOCAL: u32 = 2;
/// Masquerade with fully random source ports (NF_NAT_RANGE_PROTO_RANDOM_FULLY).
pub const NAT_RANDOM_FULLY: u32 = 0x10;
/// Netfilter hooks (IPv4).
pub const HOOK_PREROUTING: u32 = 0;
pub const HOOK_INPUT: u32 = 1;
pub const HOOK_FORWARD: u32 = 2;
pub const HOOK_OUTPUT: u32 = 3;
pub const HOOK_POSTROUTING: u32 = 4;

/// Offsets of the source and destination addresses in the IPv4 header.
pub const IP_SADDR: u32 = 12;
pub const IP_DADDR: u32 = 16;

/// `ip saddr` or `ip daddr` (by `offset`) (not) in `cidr`, through register `reg`.
pub fn addr_in(offset: u32, cidr: ipnet::Ipv4Net, inside: bool, reg: u32) -> Vec<Expr> {
    vec![
        Expr::Payload {
            dreg: reg,
            base: BASE_NETWORK,
            offset,
            len: 4,
        },
        Expr::Bitwise {
            sreg: reg,
            dreg: reg,
            mask: cidr.netmask().octets().to_vec(),
            xor: vec![0; 4],
        },
        Expr::Cmp {
            sreg: reg,
            op: if inside { CMP_EQ } else { CMP_NEQ },
            data: cidr.network().octets().to_vec(),
        },
    ]
}

/// A rule's expressions (the subset keelson's layout needs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expr {
    /// Load `len` bytes at `offset` of header `base` into `dreg`.
    Payload {
        dreg: u32,
        base: u32,
        offset: u32,
        len: u32,
    },
    /// Load a meta key into `dreg`.
    Meta { dreg: u32, key: u32 },
    /// Look `sreg`'s key up in `set`; with `dreg` (a map) load the value or take the verdict.
    Lookup {
        set: String,
        sreg: u32,
        dreg: Option<u32>,
    },
    /// Load a constant or take a verdict.
    Immediate { dreg: u32, data: Data },
    /// A random number in 0..modulus into `dreg`.
    Numgen { dreg: u32, modulus: u32 },
    /// Destination NAT to the address in `addr` and the port in `port`.
    Dnat { addr: u32, port: Option<u32> },
    /// Compare `sreg` with `data`; the rule stops here unless it holds.
    Cmp { sreg: u32, op: u32, data: Vec<u8> },
    /// `dreg = (sreg & mask) ^ xor` over `mask.len()` bytes.
    Bitwise {
        sreg: u32,
        dreg: u32,
        mask: Vec<u8>,
        xor: Vec<u8>,
    },
    /// Load a conntrack key into `dreg`.
    Ct { dreg: u32, key: u32 },
    /// A FIB lookup: (result, flags) such as [`FIB_ADDRTYPE_DADDR`], into `dreg`.
    Fib { dreg: u32, result: u32, flags: u32 },
    /// Set a meta key from `sreg`.
    MetaSet { key: u32, sreg: u32 },
    /// Source NAT to the outgoing interface's address.
    Masq { flags: u32 },
    /// Reject with ICMP port unreachable.
    Reject,
    /// Add or refresh `sreg_key` in the dynamic set `set`, with a timeout.
    Dynset {
        set: String,
        sreg_key: u32,
        timeout_ms: u64,
    },
}

/// Big-endian u32 attributes, in order.
fn be32s(b: &mut Vec<u8>, attrs: &[(u16, u32)]) {
    for (ty, v) in attrs {
        attr_be32(b, *ty, *v);
    }
}

fn expr(b: &mut Vec<u8>, e: &Expr) {
    nested(b, 1, |b| {
        attr_str(b, 1, e.name());
        nested(b, 2, |b| e.encode(b));
    });
}

impl Expr {
    /// The kernel's name of the expression.
    fn name(&self) -> &'static str {
        match self {
            Expr::Payload { .. } => "payload",
            Expr::Meta { .. } | Expr::MetaSet { .. } => "meta",
            Expr::Lookup { .. } => "lookup",
            Expr::Immediate { .. } => "immediate",
            Expr::Numgen { .. } => "numgen",
            Expr::Dnat { .. } => "nat",
            Expr::Cmp { .. } => "cmp",
            Expr::Bitwise { .. } => "bitwise",
            Expr::Ct { .. } => "ct",
            Expr::Fib { .. } => "fib",
            Expr::Masq { .. } => "masq",
            Expr::Reject => "reject",
            Expr::Dynset { .. } => "dynset",
        }
    }

    /// The expression's data attributes.
    fn encode(&self, b: &mut Vec<u8>) {
        match self {
            Expr::Payload {
                dreg,
                base,
                offset,
                len,
            } => be32s(b, &[(1, *dreg), (2, *base), (3, *offset), (4, *len)]),
            Expr::Meta { dreg, key } => be32s(b, &[(1, *dreg), (2, *key)]),
            Expr::Lookup { set, sreg, dreg } => {
                attr_str(b, 1, set);
                attr_be32(b, 2, *sreg);
                if let Some(d) = dreg {
                    attr_be32(b, 3, *d);
                }
            }
            Expr::Immediate { dreg, data: d } => {
                attr_be32(b, 1, *dreg);
                data(b, 2, d);
            }
            // 1: NFT_NG_RANDOM.
            Expr::Numgen { dreg, modulus } => be32s(b, &[(1, *dreg), (2, *modulus), (3, 1)]),
            Expr::Dnat { addr, port } => {
                // 1: NFT_NAT_DNAT.
                be32s(b, &[(1, 1), (2, u32::from(NFPROTO_IPV4)), (3, *addr)]);
                if let Some(p) = port {
                    attr_be32(b, 5, *p);
                }
            }
            Expr::Cmp { sreg, op, data: d } => {
                be32s(b, &[(1, *sreg), (2, *op)]);
                data(b, 3, &Data::Value(d.clone()));
            }
            Expr::Bitwise {
                sreg,
                dreg,
                mask,
                xor,
            } => {
                be32s(b, &[(1, *sreg), (2, *dreg), (3, mask.len() as u32)]);
                data(b, 4, &Data::Value(mask.clone()));
                data(b, 5, &Data::Value(xor.clone()));
            }
            Expr::Ct { dreg, key } => be32s(b, &[(2, *key), (1, *dreg)]),
            Expr::Fib {
                dreg,
                result,
                flags,
            } => be32s(b, &[(1, *dreg), (2, *result), (3, *flags)]),
            Expr::MetaSet { key, sreg } => be32s(b, &[(2, *key), (3, *sreg)]),
            Expr::Masq { flags } => attr_be32(b, 1, *flags),
            Expr::Reject => {
                attr_be32(b, 1, 0); // NFT_REJECT_ICMP_UNREACH
                attr(b, 2, &[3]); // port unreachable
            }
            Expr::Dynset {
                set,
                sreg_key,
                timeout_ms,
            } => {
                attr_str(b, 1, set);
                attr_be32(b, 3, 1); // NFT_DYNSET_OP_UPDATE
                attr_be32(b, 4, *sreg_key);
                attr(b, 6, &timeout_ms.to_be_bytes());
            }
        }
    }
}

/// The expressions that load `ip daddr . meta l4proto . th dport` into REG32_00..02.
pub fn load_vip_key() -> Vec<Expr> {
    vec![
        Expr::Payload {
            dreg: REG32_00,
            base: BASE_NETWORK,
            offset: 16,
            len: 4,
        },
        Expr::Meta {
            dreg: REG32_00 + 1,
            key: META_L4PROTO,
        },
        Expr::Payload {
            dreg: REG32_00 + 2,
            base: BASE_TRANSPORT,
            offset: 2,
            len: 2,
        },
    ]
}

/// The data an element maps to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Data {
    Value(Vec<u8>),
    Verdict { code: i32, chain: Option<String> },
}

pub(crate) fn attr(buf: &mut Vec<u8>, ty: u16, payload: &[u8]) {
    buf.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(payload);
    while !buf.len().is_multiple_of(4) {
        buf.push(0);
    }
}

pub(crate) fn attr_str(buf: &mut Vec<u8>, ty: u16, s: &str) {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    attr(buf, ty, &v);
}

pub(crate) fn attr_be32(buf: &mut Vec<u8>, ty: u16, v: u32) {
    attr(buf, ty, &v.to_be_bytes());
}

pub(crate) fn nested(buf: &mut Vec<u8>, ty: u16, f: impl FnOnce(&mut Vec<u8>)) {
    let start = buf.len();
    buf.extend_from_slice(&[0, 0]);
    buf.extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
    f(buf);
    let len = (buf.len() - start) as u16;
    buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
}

fn data(buf: &mut Vec<u8>, ty: u16, d: &Data) {
    nested(buf, ty, |b| match d {
        Data::Value(v) => attr(b, 1, v),
        Data::Verdict { code, chain } => nested(b, 2, |b| {
            attr(b, 1, &code.to_be_bytes());
            if let Some(c) = chain {
                attr_str(b, 2, c);
            }
        }),
    });
}

/// One nf_tables transaction under construction.
pub struct Batch {
    buf: Vec<u8>,
    seq: u32,
    /// What each acknowledged message was, by sequence number (for errors).
    what: Vec<(u32, String)>,
    next_set_id: u32,
}

impl Default for Batch {
    fn default() -> Self {
        Self::new()
    }
}

impl Batch {
    pub fn new() -> Self {
        let mut b = Batch {
            buf: Vec::with_capacity(1 << 16),
            seq: 1,
            what: vec![],
            next_set_id: 1,
        };
        b.header(
            NFNL_MSG_BATCH_BEGIN,
            NLM_F_REQUEST,
            0,
            NFNL_SUBSYS_NFTABLES,
            |_| {},
        );
        b
    }

    fn header(
        &mut self,
        ty: u16,
        flags: u16,
        family: u8,
        res_id: u16,
        f: impl FnOnce(&mut Vec<u8>),
    ) {
        let start = self.buf.len();
        self.buf.extend_from_slice(&[0; 4]); // length, patched below
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(&flags.to_ne_bytes());
        self.buf.extend_from_slice(&self.seq.to_ne_bytes());
        self.buf.extend_from_slice(&0u32.to_ne_bytes());
        self.buf.push(family);
        self.buf.push(0); // NFNETLINK_V0
        self.buf.extend_from_slice(&res_id.to_be_bytes());
        f(&mut self.buf);
        let len = (self.buf.len() - start) as u32;
        self.buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
        self.seq += 1;
    }

    fn msg(&mut self, kind: u16, what: String, f: impl FnOnce(&mut Vec<u8>)) {
        self.what.push((self.seq, what));
        self.header(
            (NFNL_SUBSYS_NFTABLES << 8) | kind,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE,
            NFPROTO_IPV4,
            0,
            f,
        );
    }

    /// Messages in the transaction so far.
    pub fn len(&self) -> usize {
        self.what.len()
    }

    pub fn is_empty(&self) -> bool {
        self.what.is_empty()
    }

    /// `add table ip NAME` (no error if it exists).
    pub fn add_table(&mut self, name: &str) {
        self.msg(NEWTABLE, format!("table {name}"), |b| attr_str(b, 1, name));
    }

    /// `delete table ip NAME`, with everything in it.
    pub fn del_table(&mut self, name: &str) {
        self.msg(DELTABLE, format!("delete table {name}"), |b| {
            attr_str(b, 1, name)
        });
    }

    /// A chain; `hook` = (hook number, priority, type) for a base chain.
    pub fn add_chain(&mut self, table: &str, name: &str, hook: Option<(u32, i32, &str)>) {
        self.msg(NEWCHAIN, format!("chain {table} {name}"), |b| {
            attr_str(b, 1, table);
            attr_str(b, 3, name);
            if let Some((num, prio, ty)) = hook {
                nested(b, 4, |b| {
                    attr_be32(b, 1, num);
                    attr_be32(b, 2, prio as u32);
                });
                attr_str(b, 7, ty);
            }
        });
    }

    /// `delete chain` (it must be empty and unreferenced by the end of the transaction).
    pub fn del_chain(&mut self, table: &str, name: &str) {
        self.msg(DELCHAIN, format!("delete chain {table} {name}"), |b| {
            attr_str(b, 1, table);
            attr_str(b, 3, name);
        });
    }

    /// `flush chain`: removes every rule of the chain.
    pub fn flush_chain(&mut self, table: &str, name: &str) {
        self.msg(DELRULE, format!("flush chain {table} {name}"), |b| {
            attr_str(b, 1, table);
            attr_str(b, 2, name);
        });
    }

    /// `delete set` (unreferenced by the end of the transaction).
    pub fn del_set(&mut self, table: &str, name: &str) {
        self.msg(DELSET, format!("delete set {table} {name}"), |b| {
            attr_str(b, 1, table);
            attr_str(b, 2, name);
        });
    }

    /// `flush set`: removes every element.
    pub fn flush_set(&mut self, table: &str, name: &str) {
        self.msg(DELSETELEM, format!("flush set {table} {name}"), |b| {
            attr_str(b, 1, table);
            attr_str(b, 2, name);
        });
    }

    /// Appends a rule to a chain.
    pub fn add_rule(&mut self, table: &str, chain: &str, exprs: &[Expr]) {
        self.what
            .push((self.seq, format!("rule in {table} {chain}")));
        self.header(
            (NFNL_SUBSYS_NFTABLES << 8) | NEWRULE,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_APPEND,
            NFPROTO_IPV4,
            0,
            |b| {
                attr_str(b, 1, table);
                attr_str(b, 2, chain);
                nested(b, 4, |b| {
                    for e in exprs {
                        expr(b, e);
                    }
                });
            },
        );
    }

    /// A set (or map, with `data` = (type, len); len is ignored for verdict maps).
    pub fn add_set(
        &mut self,
        table: &str,
        name: &str,
        flags: u32,
        key: (u32, u32),
        data: Option<(u32, u32)>,
    ) {
        let id = self.next_set_id;
        self.next_set_id += 1;
        self.msg(NEWSET, format!("set {table} {name}"), |b| {
            attr_str(b, 1, table);
            attr_str(b, 2, name);
            attr_be32(b, 3, flags | if data.is_some() { SET_MAP } else { 0 });
            attr_be32(b, 4, key.0);
            attr_be32(b, 5, key.1);
            if let Some((ty, len)) = data {
                attr_be32(b, 6, ty);
                if ty != DATA_VERDICT {
                    attr_be32(b, 7, len);
                }
            }
            attr_be32(b, 10, id);
        });
    }

    fn elems<'a>(
        &mut self,
        kind: u16,
        table: &str,
        set: &str,
        elems: impl IntoIterator<Item = (&'a [u8], Option<&'a Data>)>,
    ) {
        let verb = if kind == NEWSETELEM { "add" } else { "delete" };
        // Each element encoded once into one buffer; then as many per message as fit the
        // element list's attribute, whose length is 16 bits.
        let mut enc = Vec::new();
        let mut ends = Vec::new();
        for (k, d) in elems {
            nested(&mut enc, 1, |b| {
                nested(b, 1, |b| attr(b, 1, k));
                if let Some(d) = d {
                    data(b, 2, d);
                }
            });
            ends.push(enc.len());
        }
        let (mut start, mut i) = (0, 0);
        while i < ends.len() {
            let mut n = i + 1;
            while n < ends.len() && ends[n] - start <= MAX_NEST {
                n += 1;
            }
            let chunk = &enc[start..ends[n - 1]];
            let count = n - i;
            self.msg(
                kind,
                format!("{verb} {count} elements of {table} {set}"),
                |b| {
                    attr_str(b, 1, table);
                    attr_str(b, 2, set);
                    nested(b, 3, |b| b.extend_from_slice(chunk));
                },
            );
            start = ends[n - 1];
            i = n;
        }
    }

    pub fn add_elems(&mut self, table: &str, set: &str, elems: &[(Vec<u8>, Option<Data>)]) {
        self.elems(
            NEWSETELEM,
            table,
            set,
            elems.iter().map(|(k, d)| (k.as_slice(), d.as_ref())),
        );
    }

    /// Like [`Batch::add_elems`], from borrowed keys and data.
    pub fn add_elems_ref<'a>(
        &mut self,
        table: &str,
        set: &str,
        elems: impl IntoIterator<Item = (&'a [u8], Option<&'a Data>)>,
    ) {
        self.elems(NEWSETELEM, table, set, elems);
    }

    pub fn del_elems(&mut self, table: &str, set: &str, keys: &[Vec<u8>]) {
        self.elems(
            DELSETELEM,
            table,
            set,
            keys.iter().map(|k| (k.as_slice(), None)),
        );
    }

    /// Sends the transaction and waits for every acknowledgement; the first error is returned
    /// with the message it belongs to (the kernel then applied nothing).
    pub fn commit(mut self) -> Result<(), NftError> {
        if self.what.is_empty() {
            return Ok(());
        }
        self.header(
            NFNL_MSG_BATCH_END,
            NLM_F_REQUEST,
            0,
            NFNL_SUBSYS_NFTABLES,
            |_| {},
        );
        send_and_ack(&self.buf, self.what)
    }
}

/// Sends `buf` (one or more netlink messages) on a NETLINK_NETFILTER socket and waits for the
/// acknowledgement of every sequence number in `what`; the first error is returned with the
/// description of the message it belongs to.
pub(crate) fn send_and_ack(buf: &[u8], what: Vec<(u32, String)>) -> Result<(), NftError> {
    let sock = socket(buf.len())?;
    send(&sock, buf)?;
    let mut pending: std::collections::HashMap<u32, String> = what.into_iter().collect();
    let mut rbuf = vec![0u8; 1 << 16];
    while !pending.is_empty() {
        let n = recv(&sock, &mut rbuf)?;
        for (ty, _, seq, body) in messages(&rbuf[..n])? {
            if ty == NLMSG_ERROR && body.len() >= 4 {
                let err = i32::from_ne_bytes(body[..4].try_into().unwrap_or_default());
                let what = pending
                    .remove(&seq)
                    .unwrap_or_else(|| format!("message {seq}"));
                if err != 0 {
                    return Err(NftError::Rejected {
                        what,
                        source: std::io::Error::from_raw_os_error(-err),
                    });
                }
            }
        }
    }
    Ok(())
}

/// The names of the chains and of the named sets and maps in `table ip TABLE`, read with two
/// netlink dumps (nothing when there is no such table).
pub fn list(table: &str) -> Result<(Vec<String>, Vec<String>), NftError> {
    const GETCHAIN: u16 = 4;
    const GETSET: u16 = 10;
    // NFTA_{CHAIN,SET}_TABLE is 1 for both; the name is NFTA_CHAIN_NAME 3, NFTA_SET_NAME 2.
    // Chains bound to a rule (NFT_CHAIN_BINDING in NFTA_CHAIN_FLAGS, 10) go with that rule.
    let chains = dump(table, GETCHAIN, 3, Some((10, 0x4)))?;
    // Anonymous sets (NFT_SET_ANONYMOUS in NFTA_SET_FLAGS, 3) belong to their rules.
    let sets = dump(table, GETSET, 2, Some((3, 0x1)))?;
    Ok((chains, sets))
}

/// One `NLM_F_DUMP` request for the objects of `table`; the value of attribute `name` of each,
/// skipping those whose u32 attribute `skip.0` has the bits `skip.1`.
fn dump(
    table: &str,
    kind: u16,
    name: u16,
    skip: Option<(u16, u32)>,
) -> Result<Vec<String>, NftError> {
    // A dump that a concurrent change interrupted (NLM_F_DUMP_INTR) is taken again.
    for _ in 0..5 {
        if let Some(names) = dump_once(table, kind, name, skip)? {
            return Ok(names);
        }
    }
    Err(NftError::Protocol(format!(
        "listing table {table}: the dump kept being interrupted by changes"
    )))
}

/// One pass of [`dump`]; `None` when the kernel flagged it inconsistent.
fn dump_once(
    table: &str,
    kind: u16,
    name: u16,
    skip: Option<(u16, u32)>,
) -> Result<Option<Vec<String>>, NftError> {
    const NLM_F_DUMP: u16 = 0x300;
    const NLM_F_DUMP_INTR: u16 = 0x10;
    const NLMSG_DONE: u16 = 3;
    let sock = socket(0)?;
    let mut b = Batch::new();
    b.buf.clear();
    b.header(
        (NFNL_SUBSYS_NFTABLES << 8) | kind,
        NLM_F_REQUEST | NLM_F_DUMP,
        NFPROTO_IPV4,
        0,
        |b| attr_str(b, 1, table),
    );
    send(&sock, &b.buf)?;
    let mut names = vec![];
    let mut intr = false;
    let mut rbuf = vec![0u8; 1 << 17];
    loop {
        let n = recv(&sock, &mut rbuf)?;
        for (ty, flags, _, body) in messages(&rbuf[..n])? {
            intr |= flags & NLM_F_DUMP_INTR != 0;
            if ty == NLMSG_DONE || ty == NLMSG_ERROR {
                // DONE carries the dump's outcome as an error message does (0: success).
                let err = body
                    .get(..4)
                    .map_or(0, |b| i32::from_ne_bytes(b.try_into().unwrap_or_default()));
                return match err {
                    // An acknowledgement, not the end.
                    0 if ty == NLMSG_ERROR => continue,
                    0 => Ok((!intr).then_some(names)),
                    e if e == -libc::ENOENT => Ok(Some(vec![])),
                    e => Err(NftError::Rejected {
                        what: format!("listing table {table}"),
                        source: std::io::Error::from_raw_os_error(-e),
                    }),
                };
            }
            // After the 4-byte nfgenmsg: the object's attributes.
            let (mut t, mut nm, mut skipped) = (None, None, false);
            for (aty, val) in attrs(body.get(4..).unwrap_or_default()) {
                let text = || {
                    std::str::from_utf8(val)
                        .ok()
                        .map(|s| s.trim_end_matches('\0').to_string())
                };
                if aty == 1 {
                    t = text();
                } else if aty == name {
                    nm = text();
                } else if let Some((sa, bits)) = skip
                    && aty == sa
                    && val.len() >= 4
                {
                    let v = u32::from_be_bytes(val[..4].try_into().unwrap_or_default());
                    skipped = v & bits != 0;
                }
            }
            if let (Some(t), Some(nm)) = (t, nm)
                && t == table
                && !skipped
            {
                names.push(nm);
            }
        }
    }
}

/// One received netlink message: type, flags, sequence number and payload after the header.
type Message<'a> = (u16, u16, u32, &'a [u8]);

/// The netlink messages in `buf`.
fn messages(buf: &[u8]) -> Result<Vec<Message<'_>>, NftError> {
    let mut out = vec![];
    let mut off = 0usize;
    while off + 16 <= buf.len() {
        let len = u32::from_ne_bytes(buf[off..off + 4].try_into().unwrap_or_default()) as usize;
        let ty = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
        let flags = u16::from_ne_bytes([buf[off + 6], buf[off + 7]]);
        let seq = u32::from_ne_bytes(buf[off + 8..off + 12].try_into().unwrap_or_default());
        if len < 16 || off + len > buf.len() {
            return Err(NftError::Protocol(format!(
                "bad netlink message length {len}"
            )));
        }
        out.push((ty, flags, seq, &buf[off + 16..off + len]));
        off += (len + 3) & !3;
    }
    Ok(out)
}

/// The (type, value) attributes in `buf` (nesting and byte-order flags masked off).
fn attrs(buf: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = vec![];
    let mut off = 0usize;
    while off + 4 <= buf.len() {
        let len = u16::from_ne_bytes([buf[off], buf[off + 1]]) as usize;
        let ty = u16::from_ne_bytes([buf[off + 2], buf[off + 3]]) & 0x3fff;
        if len < 4 || off + len > buf.len() {
            break;
        }
        out.push((ty, &buf[off + 4..off + len]));
        off += (len + 3) & !3;
    }
    out
}

/// A NETLINK_NETFILTER socket whose buffers hold at least `size` bytes (1 MiB at least).
fn socket(size: usize) -> Result<OwnedFd, NftError> {
    // SAFETY: plain socket(2); the result is checked and owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            NETLINK_NETFILTER,
        )
    };
    if fd < 0 {
        return Err(NftError::Socket(std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let big: libc::c_int = i32::try_from(size).unwrap_or(i32::MAX).max(1 << 20);
    for opt in [libc::SO_SNDBUFFORCE, libc::SO_RCVBUFFORCE] {
        // SAFETY: setsockopt with a pointer to a live c_int of the right size.
        unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&big as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as u32,
            )
        };
    }
    // Error acknowledgements carry only the header of the failed message, not all of it
    // (an element message can be hundreds of KiB).
    let one: libc::c_int = 1;
    // SAFETY: setsockopt with a pointer to a live c_int of the right size.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_NETLINK,
            libc::NETLINK_CAP_ACK,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        )
    };
    Ok(sock)
}

/// Sends `buf` to the kernel.
fn send(sock: &OwnedFd, buf: &[u8]) -> Result<(), NftError> {
    // SAFETY: an all-zero sockaddr_nl addresses the kernel.
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as u16;
    // SAFETY: the buffer and address outlive the call; lengths are theirs.
    let sent = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            0,
            (&addr as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if sent < 0 {
        return Err(NftError::Socket(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Receives one datagram into `buf`; its length.
fn recv(sock: &OwnedFd, buf: &mut [u8]) -> Result<usize, NftError> {
    // SAFETY: buf is writable for its length.
    let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(NftError::Socket(std::io::Error::last_os_error()));
    }
    Ok(n as usize)
}

/// The key of a Service port: address . protocol . port, each padded to 4 bytes (the
/// register layout of a concatenation).
pub fn vip_key(ip: std::net::Ipv4Addr, proto: u8, port: u16) -> Vec<u8> {
    let mut k = ip.octets().to_vec();
    k.extend_from_slice(&[proto, 0, 0, 0]);
    k.extend_from_slice(&port.to_be_bytes());
    k.extend_from_slice(&[0, 0]);
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_framed_and_padded() {
        let mut b = Batch::new();
        b.add_table("kt");
        let buf = &b.buf;
        // BEGIN: 16-byte header + 4-byte nfgenmsg, res_id = NFTABLES (big endian).
        assert_eq!(u32::from_ne_bytes(buf[0..4].try_into().unwrap()), 20);
        assert_eq!(u16::from_ne_bytes([buf[4], buf[5]]), NFNL_MSG_BATCH_BEGIN);
        assert_eq!(&buf[18..20], &10u16.to_be_bytes());
        // NEWTABLE: header + nfgenmsg + NAME "kt\0" padded to 8.
        let m = &buf[20..];
        assert_eq!(u32::from_ne_bytes(m[0..4].try_into().unwrap()), 16 + 4 + 8);
        assert_eq!(u16::from_ne_bytes([m[4], m[5]]), 0x0a00);
        assert_eq!(m[16], NFPROTO_IPV4);
        assert_eq!(&m[20..28], &[7, 0, 1, 0, b'k', b't', 0, 0]);
        assert_eq!(
            concat_type(&[TYPE_IPADDR, TYPE_INET_PROTOCOL, TYPE_INET_SERVICE]),
            (7 << 12) | (12 << 6) | 13
        );
        assert_eq!(
            vip_key("10.96.0.10".parse().unwrap(), 6, 80),
            [10, 96, 0, 10, 6, 0, 0, 0, 0, 80, 0, 0]
        );
    }
}
