//! Coverage-guided fuzzing of the STOMP decoder and encoder.
//!
//! Input: byte 0 picks the version, byte 1 the chunk size the rest is fed
//! in (so partial frames and split EOLs are exercised), the rest is the wire.
//! Checks: no panic; the decoder never holds more than a frame's worth of
//! bytes; after an error it stays poisoned; every decoded frame re-encodes to
//! something that decodes again to the same command and body, and encoding
//! is stable from then on.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_core::codec::{encode_to_bytes, Decoder, Item, Limits};
use relay_core::Version;

const LIMITS: Limits = Limits {
    max_frame_size: 4096,
    max_headers: 16,
    max_header_line: 512,
};

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let version = Version::ALL[usize::from(data[0]) % 3];
    let chunk = usize::from(data[1]).max(1);
    let wire = &data[2..];
    let mut d = Decoder::new(LIMITS);
    d.set_version(version);
    let mut failed = None;
    'feed: for piece in wire.chunks(chunk) {
        d.extend(piece);
        loop {
            match d.decode() {
                Ok(Some(Item::Frame(f))) => check_roundtrip(&f, version),
                Ok(Some(Item::Heartbeat)) => {}
                Ok(None) => break,
                Err(e) => {
                    failed = Some(e);
                    break 'feed;
                }
            }
            // A partial frame plus at most one chunk not yet looked at.
            assert!(d.buffered() <= LIMITS.max_frame_size + chunk + 1);
        }
    }
    if let Some(e) = failed {
        assert_eq!(d.buffered(), 0);
        d.extend(b"SEND\n\n\0");
        assert_eq!(d.decode(), Err(e));
    }
});

fn check_roundtrip(f: &relay_core::Frame, version: Version) {
    let big = Limits {
        max_frame_size: usize::MAX,
        max_headers: usize::MAX,
        max_header_line: usize::MAX,
    };
    let wire = encode_to_bytes(f, version);
    let mut d = Decoder::new(big);
    d.set_version(version);
    d.extend(&wire);
    let g = match d.decode() {
        Ok(Some(Item::Frame(g))) => g,
        other => panic!("re-encoded {f:?} as {wire:?}, which decodes to {other:?}"),
    };
    assert_eq!(d.decode(), Ok(None), "trailing bytes after {wire:?}");
    assert_eq!(g.command, f.command);
    assert_eq!(g.body, f.body);
    assert_eq!(encode_to_bytes(&g, version), wire, "encoding is not stable");
}
