//! SPDY/3.1 frames and compressed header blocks as a port-forward client sends them: any byte
//! string is parsed frame after frame by one codec (the header zlib stream spans frames),
//! and must end in frames or an error — never a panic, a hang or unbounded memory.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut codec = keelson::stream::spdy::Codec::new();
    // Split where the input says, as WebSocket messages arrive.
    let cut = data.first().map_or(0, |b| *b as usize) % (data.len().max(1));
    let mut buf = bytes::BytesMut::new();
    for part in [&data[..cut], &data[cut..]] {
        buf.extend_from_slice(part);
        loop {
            match codec.parse(&mut buf) {
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => break,
            }
        }
    }
});
