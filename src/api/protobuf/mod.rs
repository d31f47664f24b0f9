//! Kubernetes protobuf (`application/vnd.kubernetes.protobuf`) in both directions.
//!
//! client-go's typed clients (kubectl's `create` generators, `create token`, `auth can-i`,
//! Helm's deletes, controllers) send bodies as the magic `k8s\0` followed by a `runtime.Unknown`
//! envelope whose `raw` field holds the object, and ask for answers the same way. This module
//! turns such a body into the JSON object the rest of the server works on, and a JSON answer
//! into protobuf, driven by the schema of every Kubernetes API message in `schema.rs` (generated
//! from the `k8s-pb` and `k8s-openapi` crates by `scripts/gen-protobuf-schema.py`).
//!
//! Decoding keeps what Go would see: zero integers and booleans are kept (a Go pointer's zero,
//! `replicas: 0`, means something) except on the non-pointer fields the generator lists, empty
//! strings are dropped (except the few `*string` whose empty value means something), and the
//! zero time is dropped. A field number the schema does not know is an error naming the message
//! and field, unless it carries an empty payload: nothing the client sent is dropped.

mod schema;

use base64::Engine;
use serde_json::{Map, Value};

/// The protobuf media type.
pub const MEDIA: &str = "application/vnd.kubernetes.protobuf";
/// The media type of a protobuf watch stream (length-prefixed `WatchEvent`s).
pub const WATCH_MEDIA: &str = "application/vnd.kubernetes.protobuf;stream=watch";

/// What one field holds on the wire.
#[derive(Clone, Copy, Debug)]
enum Ty {
    Str,
    I32,
    I64,
    Bool,
    F64,
    /// `bytes`: base64 in JSON.
    Bytes,
    /// A message: an index into `schema::MESSAGES`.
    Msg(u16),
}

/// How many of it there are, and where it goes in JSON.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Card {
    One,
    Rep,
    /// `map<string, Ty>`.
    Map,
    /// A Go embedded struct: its fields are the parent's in JSON.
    Inline,
}

/// Messages with a JSON form of their own.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Special {
    No,
    /// `metav1.Time`: RFC 3339 seconds.
    Time,
    /// `metav1.MicroTime`: RFC 3339 with microseconds.
    MicroTime,
    /// `metav1.Duration`: Go's duration string.
    Duration,
    /// `runtime.RawExtension`, `FieldsV1`, `apiextensions JSON`: raw JSON bytes.
    RawJson,
    IntOrString,
    Quantity,
    /// A Go slice type (`ExtraValue`): a JSON array of its `items`.
    List,
    SchemaOrArray,
    SchemaOrBool,
    SchemaOrStringArray,
}

/// One field: number, JSON name, type, cardinality, and whether a zero value is kept.
struct F(u32, &'static str, Ty, Card, bool);

struct M {
    name: &'static str,
    special: Special,
    fields: &'static [F],
}

/// The message the JSONSchemaPropsOr* forms hold.
const SCHEMA_PROPS: Ty = Ty::Msg(schema::JSON_SCHEMA_PROPS);

fn msg(i: u16) -> &'static M {
    &schema::MESSAGES[usize::from(i)]
}

/// Lower-case letters and digits only, as the schema's root table keys kinds.
fn norm(kind: &str) -> String {
    kind.chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

/// The message of `kind` in `apiVersion`; meta.k8s.io/v1's (DeleteOptions, Status, …) are
/// sent under every group's version.
fn root(api_version: &str, kind: &str) -> Option<&'static M> {
    let k = norm(kind);
    let find = |gv: &str| {
        schema::ROOTS
            .binary_search_by(|(g, n, _)| (*g, *n).cmp(&(gv, k.as_str())))
            .ok()
            .map(|i| msg(schema::ROOTS[i].2))
    };
    find(api_version).or_else(|| find("meta.k8s.io/v1"))
}

/// A wire-level decoding error, or an unsupported field.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Error(String);

fn err(msg: impl Into<String>) -> Error {
    Error(msg.into())
}

/// One field as read from the wire.
enum Wire<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed64(u64),
    Fixed32,
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    fn varint(&mut self) -> Result<u64, Error> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *self
                .buf
                .get(self.pos)
                .ok_or_else(|| err("truncated varint"))?;
            self.pos += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(err("varint longer than 10 bytes"))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], Error> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.buf.len())
            .ok_or_else(|| err("field runs past the end of its message"))?;
        let b = &self.buf[self.pos..end];
        self.pos = end;
        Ok(b)
    }

    fn next(&mut self) -> Result<Option<(u32, Wire<'a>)>, Error> {
        if self.pos >= self.buf.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let tag = u32::try_from(key >> 3).map_err(|_| err("field number out of range"))?;
        let wire = match key & 7 {
            0 => Wire::Varint(self.varint()?),
            2 => {
                let len = usize::try_from(self.varint()?).map_err(|_| err("length overflow"))?;
                Wire::Bytes(self.take(len)?)
            }
            1 => {
                let b = self.take(8)?;
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                Wire::Fixed64(u64::from_le_bytes(a))
            }
            5 => {
                self.take(4)?;
                Wire::Fixed32
            }
            w => return Err(err(format!("unsupported wire type {w}"))),
        };
        Ok(Some((tag, wire)))
    }
}

// ---------------------------------------------------------------------------------------------
// Decoding: protobuf → JSON

/// Decodes a `k8s\0`-prefixed body into the object as JSON, `apiVersion` and `kind` included.
pub fn decode_body(body: &[u8]) -> Result<Value, Error> {
    let payload = body
        .strip_prefix(b"k8s\0")
        .ok_or_else(|| err("missing the k8s protobuf magic"))?;
    let (mut api_version, mut kind, mut raw) = (String::new(), String::new(), None);
    let mut rd = Reader::new(payload);
    while let Some((tag, w)) = rd.next()? {
        match (tag, w) {
            (1, Wire::Bytes(tm)) => {
                let mut t = Reader::new(tm);
                while let Some((tag, w)) = t.next()? {
                    match (tag, w) {
                        (1, Wire::Bytes(b)) => {
                            api_version = utf8(b, "Unknown.typeMeta.apiVersion")?
                        }
                        (2, Wire::Bytes(b)) => kind = utf8(b, "Unknown.typeMeta.kind")?,
                        _ => {}
                    }
                }
            }
            (2, Wire::Bytes(b)) => raw = Some(b),
            (3, Wire::Bytes(b)) if !b.is_empty() => {
                return Err(err(format!(
                    "content encoding {:?} is not supported",
                    String::from_utf8_lossy(b)
                )));
            }
            _ => {}
        }
    }
    let m = root(&api_version, &kind).ok_or_else(|| {
        err(format!(
            "protobuf bodies of kind {kind:?} in {api_version:?} are not supported by this server; send the object as JSON"
        ))
    })?;
    let raw = raw.ok_or_else(|| err("the protobuf envelope has no object (Unknown.raw)"))?;
    let mut obj = Map::new();
    fields(raw, m, &mut obj)?;
    obj.insert("apiVersion".into(), Value::String(api_version));
    obj.insert("kind".into(), Value::String(kind));
    Ok(Value::Object(obj))
}

fn utf8(b: &[u8], what: &str) -> Result<String, Error> {
    String::from_utf8(b.to_vec()).map_err(|_| err(format!("{what}: invalid UTF-8")))
}

/// The short message name for errors: `apps.v1.Deployment` → `Deployment`.
fn short(m: &M) -> &'static str {
    m.name.rsplit('.').next().unwrap_or(m.name)
}

/// Decodes the fields of message `m` into `out` (which an embedded struct shares with its parent).
fn fields(buf: &[u8], m: &M, out: &mut Map<String, Value>) -> Result<(), Error> {
    let mut rd = Reader::new(buf);
    while let Some((tag, w)) = rd.next()? {
        let Some(field) = m.fields.iter().find(|f| f.0 == tag) else {
            match w {
                Wire::Bytes([]) | Wire::Varint(0) => continue,
                _ => {
                    return Err(err(format!(
                        "field {tag} of {} is not known to this server",
                        short(m)
                    )));
                }
            }
        };
        let F(_, name, ty, card, keep) = *field;
        let path = || format!("{}.{name}", short(m));
        match card {
            Card::Inline => match (ty, w) {
                (Ty::Msg(i), Wire::Bytes(b)) => fields(b, msg(i), out)?,
                _ => return Err(err(format!("{}: unexpected wire type", path()))),
            },
            Card::Map => {
                let (k, v) = map_entry(w, ty, &path())?;
                if let Value::Object(map) =
                    out.entry(name).or_insert_with(|| Value::Object(Map::new()))
                {
                    map.insert(k, v);
                }
            }
            Card::Rep => {
                let Value::Array(list) =
                    out.entry(name).or_insert_with(|| Value::Array(Vec::new()))
                else {
                    continue;
                };
                match (ty, w) {
                    // Packed repeated scalars.
                    (Ty::I32 | Ty::I64 | Ty::Bool, Wire::Bytes(b)) => {
                        let mut r = Reader::new(b);
                        while r.pos < b.len() {
                            list.push(scalar(ty, r.varint()?));
                        }
                    }
                    (_, w) => {
                        if let Some(v) = value(ty, w, &path())? {
                            list.push(v);
                        }
                    }
                }
            }
            Card::One => {
                let Some(v) = value(ty, w, &path())? else {
                    continue;
                };
                let zero = match &v {
                    Value::String(s) => s.is_empty(),
                    Value::Number(n) => n.as_f64() == Some(0.0),
                    Value::Bool(b) => !b,
                    _ => false,
                };
                if keep || !zero {
                    out.insert(name.to_string(), v);
                }
            }
        }
    }
    Ok(())
}

fn scalar(ty: Ty, v: u64) -> Value {
    match ty {
        Ty::I32 => Value::from(i64::from(v as i32)),
        Ty::Bool => Value::Bool(v != 0),
        _ => Value::from(v as i64),
    }
}

/// One value; `None` for a value Go's JSON leaves out (the zero time, an empty raw extension).
fn value(ty: Ty, w: Wire, path: &str) -> Result<Option<Value>, Error> {
    Ok(Some(match (ty, w) {
        (Ty::Str, Wire::Bytes(b)) => Value::String(utf8(b, path)?),
        (Ty::I32 | Ty::I64 | Ty::Bool, Wire::Varint(v)) => scalar(ty, v),
        (Ty::F64, Wire::Fixed64(v)) => serde_json::Number::from_f64(f64::from_bits(v))
            .map(Value::Number)
            .ok_or_else(|| err(format!("{path}: not a finite number")))?,
        (Ty::Bytes, Wire::Bytes(b)) => {
            Value::String(base64::engine::general_purpose::STANDARD.encode(b))
        }
        (Ty::Msg(i), Wire::Bytes(b)) => return message(b, msg(i), path),
        _ => return Err(err(format!("{path}: unexpected wire type"))),
    }))
}

fn message(b: &[u8], m: &M, path: &str) -> Result<Option<Value>, Error> {
    let sub = |tag: u32| -> Result<Vec<Wire>, Error> {
        let mut out = Vec::new();
        let mut rd = Reader::new(b);
        while let Some((t, w)) = rd.next()? {
            if t == tag {
                out.push(w);
            }
        }
        Ok(out)
    };
    let last = |tag: u32| -> Result<Option<Wire>, Error> { Ok(sub(tag)?.pop()) };
    let int = |tag: u32| -> Result<i64, Error> {
        Ok(match last(tag)? {
            Some(Wire::Varint(v)) => v as i64,
            None => 0,
            _ => return Err(err(format!("{path}: malformed {}", short(m)))),
        })
    };
    let text = |tag: u32| -> Result<String, Error> {
        Ok(match last(tag)? {
            Some(Wire::Bytes(v)) => utf8(v, path)?,
            None => String::new(),
            _ => return Err(err(format!("{path}: malformed {}", short(m)))),
        })
    };
    // The values of field `tag`, as a JSON array.
    let array = |tag: u32, ty: Ty| -> Result<Value, Error> {
        let mut items = Vec::new();
        for w in sub(tag)? {
            items.extend(value(ty, w, path)?);
        }
        Ok(Value::Array(items))
    };
    // JSONSchemaPropsOr{Array,StringArray}: a list of `ty` in field 2, else a schema in field 1.
    let schema_or_list = |ty: Ty| -> Result<Option<Value>, Error> {
        if !sub(2)?.is_empty() {
            return array(2, ty).map(Some);
        }
        match last(1)? {
            Some(w) => value(SCHEMA_PROPS, w, path),
            None => Ok(None),
        }
    };
    Ok(Some(match m.special {
        Special::No => {
            let mut out = Map::new();
            fields(b, m, &mut out)?;
            Value::Object(out)
        }
        Special::Time | Special::MicroTime => {
            let (secs, nanos) = (int(1)?, int(2)?);
            if b.is_empty() || (secs == GO_ZERO_TIME && nanos == 0) {
                return Ok(None);
            }
            let ts = jiff::Timestamp::new(secs, 0).map_err(|e| err(format!("{path}: {e}")))?;
            let base = ts.strftime("%Y-%m-%dT%H:%M:%S").to_string();
            Value::String(if m.special == Special::Time {
                format!("{base}Z")
            } else {
                format!("{base}.{:06}Z", (nanos.clamp(0, 999_999_999)) / 1000)
            })
        }
        Special::Duration => Value::String(go_duration(int(1)?)),
        Special::RawJson => match last(1)? {
            Some(Wire::Bytes(raw)) if !raw.is_empty() => {
                if raw.starts_with(b"k8s\0") {
                    decode_body(raw)?
                } else {
                    serde_json::from_slice(raw)
                        .map_err(|e| err(format!("{path}: embedded JSON: {e}")))?
                }
            }
            _ => return Ok(None),
        },
        Special::IntOrString => {
            if int(1)? == 1 {
                Value::String(text(3)?)
            } else {
                Value::from(i64::from(int(2)? as i32))
            }
        }
        Special::Quantity => Value::String(text(1)?),
        Special::List => array(1, m.fields[0].2)?,
        Special::SchemaOrArray => return schema_or_list(SCHEMA_PROPS),
        Special::SchemaOrStringArray => return schema_or_list(Ty::Str),
        Special::SchemaOrBool => match last(2)? {
            Some(w) => return value(SCHEMA_PROPS, w, path),
            None => Value::Bool(int(1)? != 0),
        },
    }))
}

fn map_entry(w: Wire, ty: Ty, path: &str) -> Result<(String, Value), Error> {
    let Wire::Bytes(b) = w else {
        return Err(err(format!("{path}: malformed map entry")));
    };
    let (mut key, mut val) = (String::new(), None);
    let mut rd = Reader::new(b);
    while let Some((tag, w)) = rd.next()? {
        match tag {
            1 => match w {
                Wire::Bytes(k) => key = utf8(k, path)?,
                _ => return Err(err(format!("{path}: malformed map key"))),
            },
            2 => val = value(ty, w, path)?,
            _ => return Err(err(format!("{path}: malformed map entry"))),
        }
    }
    // An absent value is the type's zero.
    let val = match (val, ty) {
        (Some(v), _) => v,
        (None, Ty::Msg(i)) => match msg(i).special {
            Special::Quantity => Value::String("0".into()),
            _ => Value::Object(Map::new()),
        },
        (None, _) => Value::String(String::new()),
    };
    Ok((key, val))
}

/// Go's zero `time.Time` as Unix seconds: it marks an unset timestamp.
const GO_ZERO_TIME: i64 = -62_135_596_800;

/// Go's `time.Duration.String()`: `1h2m3.5s`, `1.5ms`, `0s`.
fn go_duration(ns: i64) -> String {
    if ns == 0 {
        return "0s".into();
    }
    let sign = if ns < 0 { "-" } else { "" };
    let u = ns.unsigned_abs();
    let frac = |v: u64, unit: u64| -> String {
        let (whole, rest) = (v / unit, v % unit);
        if rest == 0 {
            return whole.to_string();
        }
        let digits = unit.ilog10() as usize;
        let f = format!("{rest:0digits$}");
        format!("{whole}.{}", f.trim_end_matches('0'))
    };
    if u < 1_000 {
        return format!("{sign}{u}ns");
    }
    if u < 1_000_000 {
        return format!("{sign}{}µs", frac(u, 1_000));
    }
    if u < 1_000_000_000 {
        return format!("{sign}{}ms", frac(u, 1_000_000));
    }
    let (h, rest) = (u / 3_600_000_000_000, u % 3_600_000_000_000);
    let (m, s) = (rest / 60_000_000_000, rest % 60_000_000_000);
    let mut out = sign.to_string();
    if h > 0 {
        out += &format!("{h}h");
    }
    if h > 0 || m > 0 {
        out += &format!("{m}m");
    }
    out + &format!("{}s", frac(s, 1_000_000_000))
}

/// Parses Go's duration syntax (`1h30m`, `1.5s`, `300ms`) into nanoseconds.
fn parse_go_duration(s: &str) -> Option<i64> {
    let (neg, mut rest) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    if rest == "0" {
        return Some(0);
    }
    let mut total: f64 = 0.0;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let n = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let num: f64 = rest[..n].parse().ok()?;
        rest = &rest[n..];
        let u = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..u] {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        rest = &rest[u..];
        total += num * scale;
    }
    let v = total.round() as i64;
    Some(if neg { -v } else { v })
}

// ---------------------------------------------------------------------------------------------
// Encoding: JSON → protobuf

fn put_varint(mut v: u64, out: &mut Vec<u8>) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

fn put_bytes(tag: u32, b: &[u8], out: &mut Vec<u8>) {
    put_varint(u64::from(tag) << 3 | 2, out);
    put_varint(b.len() as u64, out);
    out.extend_from_slice(b);
}

fn put_int(tag: u32, v: i64, out: &mut Vec<u8>) {
    put_varint(u64::from(tag) << 3, out);
    put_varint(v as u64, out);
}

/// Encodes an object (with `apiVersion` and `kind`) as a `k8s\0`-prefixed `runtime.Unknown`.
pub fn encode_object(v: &Value) -> Result<Vec<u8>, Error> {
    let api_version = v["apiVersion"].as_str().unwrap_or_default();
    let kind = v["kind"]
        .as_str()
        .ok_or_else(|| err("the object has no kind"))?;
    let m = root(api_version, kind).ok_or_else(|| {
        err(format!(
            "{kind:?} in {api_version:?} has no protobuf form on this server"
        ))
    })?;
    let mut raw = Vec::new();
    encode_fields(v, m, &mut raw, kind)?;
    Ok(envelope(api_version, kind, &raw))
}

/// The `k8s\0` magic and a `runtime.Unknown` holding `raw`, as client-go's serializer writes it.
fn envelope(api_version: &str, kind: &str, raw: &[u8]) -> Vec<u8> {
    let mut tm = Vec::new();
    put_bytes(1, api_version.as_bytes(), &mut tm);
    put_bytes(2, kind.as_bytes(), &mut tm);
    let mut out = b"k8s\0".to_vec();
    put_bytes(1, &tm, &mut out);
    put_bytes(2, raw, &mut out);
    put_bytes(3, b"", &mut out);
    put_bytes(4, b"", &mut out);
    out
}

/// Encodes one watch event (`{"type", "object"}`) as client-go's protobuf watch stream frames
/// it: a 4-byte big-endian length, then a `metav1.WatchEvent` whose object is the encoded
/// object in a `runtime.RawExtension`.
pub fn encode_watch_event(ev: &Value) -> Result<Vec<u8>, Error> {
    let typ = ev["type"]
        .as_str()
        .ok_or_else(|| err("watch event without a type"))?;
    let obj = encode_object(&ev["object"])?;
    let mut raw = Vec::new();
    put_bytes(1, &obj, &mut raw);
    let mut e = Vec::new();
    put_bytes(1, typ.as_bytes(), &mut e);
    put_bytes(2, &raw, &mut e);
    let len = u32::try_from(e.len()).map_err(|_| err("watch event over 4 GiB"))?;
    let mut out = len.to_be_bytes().to_vec();
    out.extend(e);
    Ok(out)
}

fn mismatch(path: &str, want: &str) -> Error {
    err(format!("{path}: expected {want}"))
}

fn encode_fields(v: &Value, m: &M, out: &mut Vec<u8>, path: &str) -> Result<(), Error> {
    let Value::Object(obj) = v else {
        return Err(mismatch(path, "an object"));
    };
    for &F(tag, name, ty, card, _) in m.fields {
        let p = || format!("{path}.{name}");
        if card == Card::Inline {
            let Ty::Msg(i) = ty else { continue };
            let mut inner = Vec::new();
            encode_fields(v, msg(i), &mut inner, path)?;
            if !inner.is_empty() {
                put_bytes(tag, &inner, out);
            }
            continue;
        }
        let Some(val) = obj.get(name) else { continue };
        if val.is_null() {
            continue;
        }
        match card {
            Card::Rep => {
                let Value::Array(items) = val else {
                    return Err(mismatch(&p(), "an array"));
                };
                for it in items {
                    encode_value(tag, ty, it, out, &p())?;
                }
            }
            Card::Map => {
                let Value::Object(map) = val else {
                    return Err(mismatch(&p(), "an object"));
                };
                for (k, it) in map {
                    let mut entry = Vec::new();
                    put_bytes(1, k.as_bytes(), &mut entry);
                    encode_value(2, ty, it, &mut entry, &p())?;
                    put_bytes(tag, &entry, out);
                }
            }
            _ => encode_value(tag, ty, val, out, &p())?,
        }
    }
    Ok(())
}

fn encode_value(tag: u32, ty: Ty, v: &Value, out: &mut Vec<u8>, path: &str) -> Result<(), Error> {
    match ty {
        Ty::Str => put_bytes(
            tag,
            v.as_str()
                .ok_or_else(|| mismatch(path, "a string"))?
                .as_bytes(),
            out,
        ),
        Ty::I32 | Ty::I64 => put_int(
            tag,
            v.as_i64().ok_or_else(|| mismatch(path, "an integer"))?,
            out,
        ),
        Ty::Bool => put_int(
            tag,
            i64::from(v.as_bool().ok_or_else(|| mismatch(path, "a boolean"))?),
            out,
        ),
        Ty::F64 => {
            let f = v.as_f64().ok_or_else(|| mismatch(path, "a number"))?;
            put_varint(u64::from(tag) << 3 | 1, out);
            out.extend_from_slice(&f.to_bits().to_le_bytes());
        }
        Ty::Bytes => {
            let s = v.as_str().ok_or_else(|| mismatch(path, "base64"))?;
            let b = base64::engine::general_purpose::STANDARD
                .decode(s)
                .map_err(|_| mismatch(path, "base64"))?;
            put_bytes(tag, &b, out);
        }
        Ty::Msg(i) => {
            let mut inner = Vec::new();
            encode_message(v, msg(i), &mut inner, path)?;
            put_bytes(tag, &inner, out);
        }
    }
    Ok(())
}

fn encode_message(v: &Value, m: &M, out: &mut Vec<u8>, path: &str) -> Result<(), Error> {
    match m.special {
        Special::No => encode_fields(v, m, out, path)?,
        Special::Time | Special::MicroTime => {
            let s = v.as_str().ok_or_else(|| mismatch(path, "a time"))?;
            let ts: jiff::Timestamp = s.parse().map_err(|_| mismatch(path, "an RFC 3339 time"))?;
            put_int(1, ts.as_second(), out);
            if m.special == Special::MicroTime {
                put_int(2, i64::from(ts.subsec_nanosecond()), out);
            }
        }
        Special::Duration => {
            let s = v.as_str().ok_or_else(|| mismatch(path, "a duration"))?;
            put_int(
                1,
                parse_go_duration(s).ok_or_else(|| mismatch(path, "a duration like 1h30m"))?,
                out,
            );
        }
        Special::RawJson => put_bytes(1, v.to_string().as_bytes(), out),
        // Like gogo, all three fields, whichever is in use.
        Special::IntOrString => {
            let (ty, int, s) = match v {
                Value::String(s) => (1, 0, s.as_str()),
                _ => (
                    0,
                    v.as_i64()
                        .ok_or_else(|| mismatch(path, "an int or string"))?,
                    "",
                ),
            };
            put_int(1, ty, out);
            put_int(2, int, out);
            put_bytes(3, s.as_bytes(), out);
        }
        Special::Quantity => {
            let s = match v {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                _ => return Err(mismatch(path, "a quantity")),
            };
            put_bytes(1, s.as_bytes(), out);
        }
        Special::List => {
            let F(tag, _, ty, _, _) = m.fields[0];
            for it in v.as_array().ok_or_else(|| mismatch(path, "an array"))? {
                encode_value(tag, ty, it, out, path)?;
            }
        }
        Special::SchemaOrArray | Special::SchemaOrStringArray => match v {
            Value::Array(items) => {
                let item = if m.special == Special::SchemaOrArray {
                    SCHEMA_PROPS
                } else {
                    Ty::Str
                };
                for it in items {
                    encode_value(2, item, it, out, path)?;
                }
            }
            _ => encode_value(1, SCHEMA_PROPS, v, out, path)?,
        },
        Special::SchemaOrBool => match v {
            Value::Bool(b) => put_int(1, i64::from(*b), out),
            _ => {
                put_int(1, 1, out);
                encode_value(2, SCHEMA_PROPS, v, out, path)?;
            }
        },
    }
    Ok(())
}

#[cfg(test)]
mod tests;
