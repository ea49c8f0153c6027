//! Property tests for the STOMP codec: encode/decode round-trips for every
//! version, streams of frames and heart-beats fed in arbitrary chunks, and
//! chunking-independence of the decoder on arbitrary input.
#![allow(clippy::unwrap_used)]

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use relay_core::codec::{encode_to_bytes, HEARTBEAT};
use relay_core::{encode, Command, DecodeError, Decoder, Frame, Item, Limits, Version};

const COMMANDS: [Command; 15] = [
    Command::Connect,
    Command::Stomp,
    Command::Connected,
    Command::Send,
    Command::Subscribe,
    Command::Unsubscribe,
    Command::Ack,
    Command::Nack,
    Command::Begin,
    Command::Commit,
    Command::Abort,
    Command::Disconnect,
    Command::Message,
    Command::Receipt,
    Command::Error,
];

fn version() -> impl Strategy<Value = Version> {
    prop::sample::select(Version::ALL.to_vec())
}

fn command() -> impl Strategy<Value = Command> {
    prop::sample::select(COMMANDS.to_vec())
}

/// Header text biased towards the characters escaping is about.
fn text() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            4 => prop::sample::select(vec![':', '\\', '\n', '\r', 'c', 'n', 'r', ' ', '\t']),
            3 => prop::char::range('a', 'z'),
            1 => any::<char>().prop_filter("no NUL", |c| *c != '\0'),
        ],
        0..12,
    )
    .prop_map(|cs| cs.into_iter().collect())
}

/// Makes a header representable in `version` for `command` (the encoder
/// cannot carry LF/CR or `:`-in-names without escaping, nor a trailing CR in
/// a 1.1 value, which reads as the CR of a CRLF).
fn representable(command: Command, version: Version, name: &str, value: &str) -> (String, String) {
    let raw = command.is_escape_exempt() || version == Version::V1_0;
    let mut name: String = if raw {
        name.chars()
            .filter(|c| !matches!(c, '\n' | '\r' | ':'))
            .collect()
    } else {
        name.to_owned()
    };
    let mut value: String = if raw {
        value
            .chars()
            .filter(|c| !matches!(c, '\n' | '\r'))
            .collect()
    } else {
        value.to_owned()
    };
    if !raw && version == Version::V1_1 {
        while value.ends_with('\r') {
            value.pop();
        }
    }
    if name == "content-length" {
        name.push('x');
    }
    (name, value)
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        2 => Just(Vec::new()),
        4 => prop::collection::vec(prop_oneof![Just(0u8), Just(b'\n'), Just(b'\r'), any::<u8>()], 1..64),
        1 => prop::collection::vec(any::<u8>(), 64..3000),
    ]
}

/// A frame representable in `version`, without content-length.
fn frame_for(version: Version) -> impl Strategy<Value = Frame> {
    (
        command(),
        prop::collection::vec((text(), text()), 0..8),
        body(),
    )
        .prop_map(move |(command, headers, body)| Frame {
            command,
            headers: headers
                .iter()
                .map(|(n, v)| representable(command, version, n, v))
                .collect(),
            body: Bytes::from(body),
        })
}

/// What decoding the encoded `frame` must give: the frame plus the
/// content-length the encoder appends for a non-empty body.
fn expected(frame: &Frame) -> Frame {
    let mut f = frame.clone();
    if !f.body.is_empty() {
        f.headers
            .push(("content-length".into(), f.body.len().to_string()));
    }
    f
}

fn big_limits() -> Limits {
    Limits {
        max_frame_size: 1 << 20,
        max_headers: 1000,
        max_header_line: 1 << 16,
    }
}

/// Feeds `wire` in the given chunk sizes (cycled), draining the decoder after
/// each chunk.
fn decode_chunked(
    wire: &[u8],
    version: Version,
    limits: Limits,
    chunks: &[usize],
) -> (Vec<Item>, Option<DecodeError>) {
    let mut d = Decoder::new(limits);
    d.set_version(version);
    let mut items = Vec::new();
    let mut rest = wire;
    let mut sizes = chunks.iter().copied().cycle();
    while !rest.is_empty() {
        let n = sizes.next().unwrap_or(rest.len()).clamp(1, rest.len());
        d.extend(&rest[..n]);
        rest = &rest[n..];
        loop {
            match d.decode() {
                Ok(Some(item)) => items.push(item),
                Ok(None) => break,
                Err(e) => return (items, Some(e)),
            }
        }
    }
    (items, None)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn round_trip_every_version(
        (version, frame) in version().prop_flat_map(|v| (Just(v), frame_for(v))),
    ) {
        let wire = encode_to_bytes(&frame, version);
        let mut d = Decoder::new(big_limits());
        d.set_version(version);
        d.extend(&wire);
        prop_assert_eq!(d.decode(), Ok(Some(Item::Frame(expected(&frame)))));
        prop_assert_eq!(d.decode(), Ok(None));
        prop_assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn encoder_fixes_existing_content_length(
        (version, frame) in version().prop_flat_map(|v| (Just(v), frame_for(v))),
        at in any::<prop::sample::Index>(),
        claimed in "[0-9]{0,4}|x",
        duplicate in any::<bool>(),
    ) {
        let mut frame = frame;
        let i = at.index(frame.headers.len() + 1);
        frame.headers.insert(i, ("content-length".into(), claimed.clone()));
        if duplicate {
            frame.headers.push(("content-length".into(), claimed));
        }
        let mut want = frame.clone();
        want.set_header("content-length", frame.body.len().to_string());
        let mut out = BytesMut::new();
        encode(&frame, version, &mut out);
        let mut d = Decoder::new(big_limits());
        d.set_version(version);
        d.extend(&out);
        prop_assert_eq!(d.decode(), Ok(Some(Item::Frame(want))));
    }

    #[test]
    fn stream_in_random_chunks_with_heartbeats(
        (version, frames) in version().prop_flat_map(|v| {
            (Just(v), prop::collection::vec((frame_for(v), 0usize..3, any::<bool>()), 0..8))
        }),
        trailing_beats in 0usize..3,
        chunks in prop::collection::vec(1usize..40, 1..20),
    ) {
        let mut wire = BytesMut::new();
        let mut want = Vec::new();
        for (frame, beats, crlf) in &frames {
            for _ in 0..*beats {
                wire.extend_from_slice(if *crlf { b"\r\n" } else { HEARTBEAT });
                want.push(Item::Heartbeat);
            }
            encode(frame, version, &mut wire);
            want.push(Item::Frame(expected(frame)));
        }
        for _ in 0..trailing_beats {
            wire.extend_from_slice(b"\r\n");
            want.push(Item::Heartbeat);
        }
        let (items, err) = decode_chunked(&wire, version, big_limits(), &chunks);
        prop_assert_eq!(err, None);
        prop_assert_eq!(items, want);
    }

    /// Whatever the input, the decoder does not panic, and how the bytes are
    /// split does not change what comes out (items, and whether it fails).
    #[test]
    fn chunking_does_not_change_results_on_arbitrary_input(
        version in version(),
        parts in prop::collection::vec(
            prop_oneof![
                Just(b"SEND\n".to_vec()),
                Just(b"CONNECT\n".to_vec()),
                Just(b"a:b\n".to_vec()),
                Just(b"x\\c:\\r\\n\\t\n".to_vec()),
                Just(b"content-length:3\n".to_vec()),
                Just(b"content-length:40\n".to_vec()),
                Just(b"\n".to_vec()),
                Just(b"\r\n".to_vec()),
                Just(b"\r".to_vec()),
                Just(b"\0".to_vec()),
                Just(b"abc".to_vec()),
                prop::collection::vec(any::<u8>(), 0..6),
                (10usize..40).prop_map(|n| vec![b'y'; n]),
            ],
            0..30,
        ),
        max_frame_size in 8usize..120,
        max_headers in 0usize..4,
        max_header_line in 2usize..30,
        chunks in prop::collection::vec(1usize..8, 1..10),
    ) {
        let wire = parts.concat();
        let limits = Limits { max_frame_size, max_headers, max_header_line };
        let whole = decode_chunked(&wire, version, limits, &[wire.len().max(1)]);
        let chunked = decode_chunked(&wire, version, limits, &chunks);
        let bytewise = decode_chunked(&wire, version, limits, &[1]);
        prop_assert_eq!(&whole.0, &chunked.0);
        prop_assert_eq!(&whole.0, &bytewise.0);
        prop_assert_eq!(whole.1.is_some(), chunked.1.is_some());
        prop_assert_eq!(whole.1.is_some(), bytewise.1.is_some());
    }
}
