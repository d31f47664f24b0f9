//! SPDY/3.1 framing, as far as port-forward needs it: control frames (SYN_STREAM, SYN_REPLY,
//! RST_STREAM, SETTINGS, PING, GOAWAY, HEADERS, WINDOW_UPDATE) and data frames, with header
//! blocks compressed by one zlib stream per direction primed with SPDY's dictionary and
//! sync-flushed after every block.

use bytes::{Buf, BufMut, BytesMut};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use super::spdy_dict::DICTIONARY;

pub const VERSION: u16 = 3;
pub const FLAG_FIN: u8 = 0x01;

const SYN_STREAM: u16 = 1;
const SYN_REPLY: u16 = 2;
const RST_STREAM: u16 = 3;
const SETTINGS: u16 = 4;
const PING: u16 = 6;
const GOAWAY: u16 = 7;
const HEADERS: u16 = 8;
const WINDOW_UPDATE: u16 = 9;

/// RST_STREAM status codes.
pub const RST_PROTOCOL_ERROR: u32 = 1;
pub const RST_CANCEL: u32 = 5;

/// Longest frame accepted (the length field allows 16 MiB; spdystream writes far less).
const MAX_FRAME: usize = 1 << 24;
/// Longest inflated header block accepted (kubelet's streams carry a handful of short headers).
const MAX_HEADER_BLOCK: usize = 1 << 16;

pub type Headers = Vec<(String, String)>;

#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    SynStream {
        id: u32,
        flags: u8,
        headers: Headers,
    },
    SynReply {
        id: u32,
        flags: u8,
        headers: Headers,
    },
    RstStream {
        id: u32,
        status: u32,
    },
    Settings,
    Ping(u32),
    GoAway {
        last: u32,
        status: u32,
    },
    Headers {
        id: u32,
        flags: u8,
        headers: Headers,
    },
    WindowUpdate {
        id: u32,
        delta: u32,
    },
    Data {
        id: u32,
        flags: u8,
        data: bytes::Bytes,
    },
    /// A control frame type this side ignores.
    Other(u16),
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("SPDY frame of {0} bytes is too long")]
    TooLong(usize),
    #[error("SPDY version {0} (expected 3)")]
    Version(u16),
    #[error("SPDY {what} frame: {why}")]
    Malformed { what: &'static str, why: String },
    #[error("SPDY header compression: {0}")]
    Zlib(String),
}

fn malformed(what: &'static str, why: impl Into<String>) -> Error {
    Error::Malformed {
        what,
        why: why.into(),
    }
}

/// One side of a SPDY connection: its header compressor and decompressor.
pub struct Codec {
    inflate: Decompress,
    /// zlib asks for the dictionary once, at the start of the stream; a second ask is an attack.
    dictionary_set: bool,
    deflate: Compress,
}

impl Default for Codec {
    fn default() -> Self {
        Self::new()
    }
}

impl Codec {
    pub fn new() -> Self {
        let mut deflate = Compress::new(Compression::default(), true);
        // Cannot fail on a fresh stream.
        let _ = deflate.set_dictionary(DICTIONARY);
        Self {
            inflate: Decompress::new(true),
            dictionary_set: false,
            deflate,
        }
    }

    /// Takes one whole frame off the front of `buf`, if one is there.
    pub fn parse(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, Error> {
        if buf.len() < 8 {
            return Ok(None);
        }
        let len = (u32::from_be_bytes([0, buf[5], buf[6], buf[7]])) as usize;
        if len > MAX_FRAME {
            return Err(Error::TooLong(len));
        }
        if buf.len() < 8 + len {
            return Ok(None);
        }
        let head = buf.split_to(8);
        let mut body = buf.split_to(len);
        let flags = head[4];
        if head[0] & 0x80 == 0 {
            let id = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) & 0x7fff_ffff;
            return Ok(Some(Frame::Data {
                id,
                flags,
                data: body.freeze(),
            }));
        }
        let version = u16::from_be_bytes([head[0], head[1]]) & 0x7fff;
        if version != VERSION {
            return Err(Error::Version(version));
        }
        let kind = u16::from_be_bytes([head[2], head[3]]);
        let need = |n: usize, what: &'static str, body: &BytesMut| {
            if body.len() < n {
                Err(malformed(
                    what,
                    format!("{} bytes, at least {n} expected", body.len()),
                ))
            } else {
                Ok(())
            }
        };
        Ok(Some(match kind {
            SYN_STREAM => {
                need(10, "SYN_STREAM", &body)?;
                let id = body.get_u32() & 0x7fff_ffff;
                body.advance(6);
                let headers = self.decode_headers(&body)?;
                Frame::SynStream { id, flags, headers }
            }
            SYN_REPLY | HEADERS => {
                need(4, "SYN_REPLY", &body)?;
                let id = body.get_u32() & 0x7fff_ffff;
                let headers = self.decode_headers(&body)?;
                if kind == SYN_REPLY {
                    Frame::SynReply { id, flags, headers }
                } else {
                    Frame::Headers { id, flags, headers }
                }
            }
            RST_STREAM => {
                need(8, "RST_STREAM", &body)?;
                Frame::RstStream {
                    id: body.get_u32() & 0x7fff_ffff,
                    status: body.get_u32(),
                }
            }
            SETTINGS => Frame::Settings,
            PING => {
                need(4, "PING", &body)?;
                Frame::Ping(body.get_u32())
            }
            GOAWAY => {
                need(4, "GOAWAY", &body)?;
                let last = body.get_u32() & 0x7fff_ffff;
                let status = if body.len() >= 4 { body.get_u32() } else { 0 };
                Frame::GoAway { last, status }
            }
            WINDOW_UPDATE => {
                need(8, "WINDOW_UPDATE", &body)?;
                Frame::WindowUpdate {
                    id: body.get_u32() & 0x7fff_ffff,
                    delta: body.get_u32() & 0x7fff_ffff,
                }
            }
            other => Frame::Other(other),
        }))
    }

    fn decode_headers(&mut self, block: &[u8]) -> Result<Headers, Error> {
        let plain = self.inflate(block)?;
        let mut b = &plain[..];
        let take_u32 = |b: &mut &[u8]| -> Result<usize, Error> {
            if b.len() < 4 {
                return Err(malformed("header block", "truncated"));
            }
            Ok(b.get_u32() as usize)
        };
        let take_str = |b: &mut &[u8]| -> Result<String, Error> {
            let n = take_u32(b)?;
            if b.len() < n {
                return Err(malformed("header block", "truncated"));
            }
            let s = String::from_utf8_lossy(&b[..n]).into_owned();
            b.advance(n);
            Ok(s)
        };
        let count = take_u32(&mut b)?;
        let mut out = Vec::with_capacity(count.min(64));
        for _ in 0..count {
            let name = take_str(&mut b)?;
            let value = take_str(&mut b)?;
            out.push((name, value));
        }
        Ok(out)
    }

    /// Inflates one header block. Every pass must consume input or produce output, the zlib
    /// stream must not end (SPDY's runs for the whole connection) and the plain text is capped:
    /// a malformed or hostile block is an error, never a loop or a decompression bomb.
    fn inflate(&mut self, input: &[u8]) -> Result<Vec<u8>, Error> {
        let mut out = Vec::with_capacity((input.len() * 4 + 64).min(MAX_HEADER_BLOCK));
        let start = self.inflate.total_in();
        loop {
            let used = (self.inflate.total_in() - start) as usize;
            if out.len() == out.capacity() {
                if out.len() >= MAX_HEADER_BLOCK {
                    return Err(malformed(
                        "header block",
                        format!("inflates to more than {MAX_HEADER_BLOCK} bytes"),
                    ));
                }
                out.reserve(out.capacity().max(256).min(MAX_HEADER_BLOCK - out.len()));
            }
            let (in_before, out_before) = (self.inflate.total_in(), out.len());
            let status =
                match self
                    .inflate
                    .decompress_vec(&input[used..], &mut out, FlushDecompress::Sync)
                {
                    Ok(status) => status,
                    Err(e) => match e.needs_dictionary() {
                        Some(_) if !self.dictionary_set => {
                            self.dictionary_set = true;
                            self.inflate
                                .set_dictionary(DICTIONARY)
                                .map_err(|e| Error::Zlib(e.to_string()))?;
                            continue;
                        }
                        Some(_) => return Err(Error::Zlib("unexpected dictionary request".into())),
                        None => return Err(Error::Zlib(e.to_string())),
                    },
                };
            let used = (self.inflate.total_in() - start) as usize;
            if status == Status::StreamEnd {
                return Err(malformed("header block", "the zlib stream ended"));
            }
            if used >= input.len() && out.len() < out.capacity() {
                return Ok(out);
            }
            if self.inflate.total_in() == in_before && out.len() == out_before {
                // Room to write, input left, and zlib took nothing: it never will.
                return Err(malformed("header block", "zlib made no progress"));
            }
        }
    }

    fn deflate(&mut self, input: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(input.len() + 64);
        let start = self.deflate.total_in();
        loop {
            let used = (self.deflate.total_in() - start) as usize;
            if out.len() == out.capacity() {
                out.reserve(256);
            }
            // Compressing into memory cannot fail short of a broken stream.
            let _ = self
                .deflate
                .compress_vec(&input[used..], &mut out, FlushCompress::Sync);
            let used = (self.deflate.total_in() - start) as usize;
            if used >= input.len() && out.len() < out.capacity() {
                return out;
            }
        }
    }

    fn header_block(&mut self, headers: &[(&str, &str)]) -> Vec<u8> {
        let mut plain = BytesMut::new();
        plain.put_u32(headers.len() as u32);
        for (k, v) in headers {
            plain.put_u32(k.len() as u32);
            plain.put_slice(k.to_ascii_lowercase().as_bytes());
            plain.put_u32(v.len() as u32);
            plain.put_slice(v.as_bytes());
        }
        self.deflate(&plain)
    }

    pub fn syn_stream(&mut self, id: u32, flags: u8, headers: &[(&str, &str)]) -> Vec<u8> {
        let block = self.header_block(headers);
        let mut f = control(SYN_STREAM, flags, 10 + block.len());
        f.put_u32(id & 0x7fff_ffff);
        f.put_u32(0);
        f.put_u16(0);
        f.put_slice(&block);
        f.to_vec()
    }

    pub fn syn_reply(&mut self, id: u32, flags: u8, headers: &[(&str, &str)]) -> Vec<u8> {
        let block = self.header_block(headers);
        let mut f = control(SYN_REPLY, flags, 4 + block.len());
        f.put_u32(id & 0x7fff_ffff);
        f.put_slice(&block);
        f.to_vec()
    }
}

fn control(kind: u16, flags: u8, len: usize) -> BytesMut {
    let mut f = BytesMut::with_capacity(8 + len);
    f.put_u16(0x8000 | VERSION);
    f.put_u16(kind);
    f.put_u32(((flags as u32) << 24) | (len as u32 & 0x00ff_ffff));
    f
}

pub fn data(id: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = BytesMut::with_capacity(8 + payload.len());
    f.put_u32(id & 0x7fff_ffff);
    f.put_u32(((flags as u32) << 24) | (payload.len() as u32 & 0x00ff_ffff));
    f.put_slice(payload);
    f.to_vec()
}

pub fn rst_stream(id: u32, status: u32) -> Vec<u8> {
    let mut f = control(RST_STREAM, 0, 8);
    f.put_u32(id & 0x7fff_ffff);
    f.put_u32(status);
    f.to_vec()
}

pub fn ping(id: u32) -> Vec<u8> {
    let mut f = control(PING, 0, 4);
    f.put_u32(id);
    f.to_vec()
}

pub fn goaway(last: u32) -> Vec<u8> {
    let mut f = control(GOAWAY, 0, 8);
    f.put_u32(last & 0x7fff_ffff);
    f.put_u32(0);
    f.to_vec()
}

/// The value of header `name` (names are lowercase on the wire).
pub fn header<'a>(h: &'a Headers, name: &str) -> Option<&'a str> {
    h.iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_through_two_codecs() {
        let (mut client, mut server) = (Codec::new(), Codec::new());
        let mut wire = BytesMut::new();
        wire.put_slice(&client.syn_stream(
            1,
            0,
            &[
                ("streamType", "error"),
                ("port", "8080"),
                ("requestID", "0"),
            ],
        ));
        wire.put_slice(&client.syn_stream(3, 0, &[("streamtype", "data"), ("port", "8080")]));
        wire.put_slice(&data(3, FLAG_FIN, b"hello"));
        wire.put_slice(&ping(7));
        wire.put_slice(&rst_stream(3, RST_CANCEL));
        // A partial frame waits for the rest.
        let tail = data(5, 0, b"0123456789");
        wire.put_slice(&tail[..6]);
        let mut got = vec![];
        while let Some(f) = server.parse(&mut wire).unwrap() {
            got.push(f);
        }
        assert_eq!(got.len(), 5);
        match &got[0] {
            Frame::SynStream { id, headers, .. } => {
                assert_eq!(*id, 1);
                assert_eq!(header(headers, "streamtype"), Some("error"));
                assert_eq!(header(headers, "requestid"), Some("0"));
            }
            f => panic!("{f:?}"),
        }
        match &got[1] {
            Frame::SynStream { id, headers, .. } => {
                assert_eq!((*id, header(headers, "port")), (3, Some("8080")));
            }
            f => panic!("{f:?}"),
        }
        assert_eq!(
            got[2],
            Frame::Data {
                id: 3,
                flags: FLAG_FIN,
                data: bytes::Bytes::from_static(b"hello")
            }
        );
        assert_eq!(got[3], Frame::Ping(7));
        assert_eq!(
            got[4],
            Frame::RstStream {
                id: 3,
                status: RST_CANCEL
            }
        );
        wire.put_slice(&tail[6..]);
        assert!(matches!(
            server.parse(&mut wire).unwrap(),
            Some(Frame::Data { id: 5, .. })
        ));
        // The other direction, many blocks on one compression stream.
        let mut back = BytesMut::new();
        for id in [1u32, 3, 5, 7] {
            back.put_slice(&server.syn_reply(id, 0, &[]));
        }
        for id in [1u32, 3, 5, 7] {
            match client.parse(&mut back).unwrap() {
                Some(Frame::SynReply {
                    id: got, headers, ..
                }) => {
                    assert_eq!(got, id);
                    assert!(headers.is_empty());
                }
                f => panic!("{f:?}"),
            }
        }
    }

    #[test]
    fn bad_frames_are_errors_not_panics() {
        let mut c = Codec::new();
        let mut b = BytesMut::from(&[0x80, 2, 0, 1, 0, 0, 0, 0][..]);
        assert!(matches!(c.parse(&mut b), Err(Error::Version(2))));
        let mut b = BytesMut::from(&[0x80, 3, 0, 1, 0, 0, 0, 2, 0, 0][..]);
        assert!(matches!(c.parse(&mut b), Err(Error::Malformed { .. })));
        let mut b = BytesMut::from(&[0x80, 3, 0, 2, 0, 0, 0, 6, 0, 0, 0, 1, 0xde, 0xad][..]);
        assert!(matches!(c.parse(&mut b), Err(Error::Zlib(_))));
    }

    /// A SYN_STREAM whose header block is `block` (already compressed).
    fn syn_with_block(block: &[u8]) -> BytesMut {
        let mut f = control(SYN_STREAM, 0, 10 + block.len());
        f.put_u32(1);
        f.put_u32(0);
        f.put_u16(0);
        f.put_slice(block);
        f
    }

    fn compressed(plain: &[u8], finish: bool) -> Vec<u8> {
        let mut z = Compress::new(Compression::default(), true);
        z.set_dictionary(DICTIONARY).unwrap();
        let mut out = Vec::with_capacity(plain.len() + 1024);
        let flush = if finish {
            FlushCompress::Finish
        } else {
            FlushCompress::Sync
        };
        z.compress_vec(plain, &mut out, flush).unwrap();
        out
    }

    #[test]
    fn a_header_block_that_ends_the_zlib_stream_with_bytes_left_is_an_error_not_a_spin() {
        // The audit's attack: a finished zlib stream followed by more input used to loop forever.
        let mut plain = BytesMut::new();
        plain.put_u32(0);
        let mut block = compressed(&plain, true);
        block.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef, 1, 2, 3]);
        let started = std::time::Instant::now();
        let mut c = Codec::new();
        assert!(matches!(
            c.parse(&mut syn_with_block(&block)),
            Err(Error::Malformed { .. })
        ));
        // The stream ending exactly at the block's end is refused too (SPDY's never ends).
        let block = compressed(&plain, true);
        assert!(Codec::new().parse(&mut syn_with_block(&block)).is_err());
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
    }

    #[test]
    fn a_decompression_bomb_is_refused() {
        // 16 MiB of one header value compresses to a few KiB.
        let mut plain = BytesMut::new();
        plain.put_u32(1);
        plain.put_u32(1);
        plain.put_slice(b"a");
        plain.put_u32(16 << 20);
        plain.put_bytes(b'x', 16 << 20);
        let block = compressed(&plain, false);
        assert!(block.len() < 100_000, "{}", block.len());
        let mut c = Codec::new();
        match c.parse(&mut syn_with_block(&block)) {
            Err(Error::Malformed { why, .. }) => assert!(why.contains("more than"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_second_dictionary_request_is_an_error() {
        let mut plain = BytesMut::new();
        plain.put_u32(0);
        let block = compressed(&plain, false);
        let mut c = Codec::new();
        assert!(c.parse(&mut syn_with_block(&block)).unwrap().is_some());
        // A fresh zlib header asking for the dictionary again in the middle of the stream.
        assert!(c.parse(&mut syn_with_block(&block)).is_err());
    }

    /// The fuzz target's property (fuzz/fuzz_targets/spdy_frames.rs) over mutations of real
    /// frames, in every test run: any bytes end in frames or an error, quickly.
    #[test]
    fn mutated_frames_end_in_frames_or_errors() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut writer = Codec::new();
        let mut valid = BytesMut::new();
        valid.put_slice(&writer.syn_stream(1, 0, &[("streamtype", "data"), ("port", "80")]));
        valid.put_slice(&data(1, 0, b"hello"));
        valid.put_slice(&writer.syn_stream(3, 0, &[("streamtype", "error")]));
        valid.put_slice(&ping(7));
        valid.put_slice(&goaway(3));
        let started = std::time::Instant::now();
        for _ in 0..3000 {
            let mut bytes = valid.to_vec();
            for _ in 0..(next() % 8 + 1) {
                let i = (next() as usize) % bytes.len();
                bytes[i] = next() as u8;
            }
            if next() % 4 == 0 {
                bytes.truncate((next() as usize) % bytes.len());
            }
            let mut c = Codec::new();
            let mut buf = BytesMut::from(&bytes[..]);
            for _ in 0..64 {
                match c.parse(&mut buf) {
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                }
            }
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(20));
    }
}
