//! Table of tricky STOMP wire inputs and what the decoder must make of them.
//! Every case is checked fed whole, split at every byte offset, and one byte
//! at a time; all must give the same result.
#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use relay_core::{Command, DecodeError, Decoder, Frame, Item, Limits, Version};
use std::time::{Duration, Instant};

struct Case {
    name: &'static str,
    version: Version,
    limits: Limits,
    wire: &'static [u8],
    items: Vec<Item>,
    error: Option<DecodeError>,
}

fn case(name: &'static str, version: Version, wire: &'static [u8]) -> Case {
    Case {
        name,
        version,
        limits: Limits::default(),
        wire,
        items: Vec::new(),
        error: None,
    }
}

impl Case {
    fn frame(mut self, f: Frame) -> Case {
        self.items.push(Item::Frame(f));
        self
    }
    fn beat(mut self) -> Case {
        self.items.push(Item::Heartbeat);
        self
    }
    fn beats(mut self, n: usize) -> Case {
        for _ in 0..n {
            self.items.push(Item::Heartbeat);
        }
        self
    }
    fn fails(mut self, e: DecodeError) -> Case {
        self.error = Some(e);
        self
    }
    fn limits(mut self, max_frame_size: usize, max_headers: usize, max_header_line: usize) -> Case {
        self.limits = Limits {
            max_frame_size,
            max_headers,
            max_header_line,
        };
        self
    }
}

fn f(command: Command, headers: &[(&str, &str)], body: &'static [u8]) -> Frame {
    Frame {
        command,
        headers: headers
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        body: Bytes::from_static(body),
    }
}

type Outcome = (Vec<Item>, Option<DecodeError>, usize);

/// Feeds the pieces in order, draining after each. Returns the items, the
/// error if any, and what is left buffered.
fn run(version: Version, limits: Limits, pieces: &[&[u8]]) -> Outcome {
    let mut d = Decoder::new(limits);
    d.set_version(version);
    let mut items = Vec::new();
    for piece in pieces {
        d.extend(piece);
        loop {
            match d.decode() {
                Ok(Some(item)) => items.push(item),
                Ok(None) => break,
                Err(e) => {
                    // Poisoned: the same error again.
                    assert_eq!(d.decode(), Err(e.clone()));
                    return (items, Some(e), d.buffered());
                }
            }
        }
    }
    (items, None, d.buffered())
}

use Command::*;
use Version::*;

fn cases() -> Vec<Case> {
    vec![
        case(
            "plain LF frame",
            V1_2,
            b"SEND\ndestination:/queue/a\n\nhello\0",
        )
        .frame(f(Send, &[("destination", "/queue/a")], b"hello")),
        case(
            "CRLF line endings",
            V1_2,
            b"SEND\r\ndestination:/queue/a\r\nreceipt:1\r\n\r\nhi\0",
        )
        .frame(f(
            Send,
            &[("destination", "/queue/a"), ("receipt", "1")],
            b"hi",
        )),
        case(
            "CRLF line endings in 1.0 too",
            V1_0,
            b"SEND\r\na:b\r\n\r\n\0",
        )
        .frame(f(Send, &[("a", "b")], b"")),
        case("mixed LF and CRLF", V1_1, b"MESSAGE\r\na:1\nb:2\r\n\n\0").frame(f(
            Message,
            &[("a", "1"), ("b", "2")],
            b"",
        )),
        case(
            "escapes in 1.2",
            V1_2,
            b"SEND\nk\\ce\\\\y:a\\nb\\rc\\cd\n\n\0",
        )
        .frame(f(Send, &[("k:e\\y", "a\nb\rc:d")], b"")),
        case("escapes in 1.1", V1_1, b"SEND\nk\\ce\\\\y:a\\nb\\cd\n\n\0").frame(f(
            Send,
            &[("k:e\\y", "a\nb:d")],
            b"",
        )),
        case("\\r is undefined in 1.1", V1_1, b"SEND\na:b\\rc\n\n\0")
            .fails(DecodeError::InvalidEscape("\\r".into())),
        case("\\t is undefined in 1.2", V1_2, b"SEND\na:\\t\n\n\0")
            .fails(DecodeError::InvalidEscape("\\t".into())),
        case("trailing backslash in 1.2", V1_2, b"SEND\na:b\\\n\n\0")
            .fails(DecodeError::InvalidEscape("\\".into())),
        case("1.0 does not unescape", V1_0, b"SEND\na:b\\nc\\t\\\n\n\0").frame(f(
            Send,
            &[("a", "b\\nc\\t\\")],
            b"",
        )),
        case(
            "CONNECT leaves \\c as is",
            V1_2,
            b"CONNECT\naccept-version:1.2\nlogin:us\\cer\npasscode:p\\w\n\n\0",
        )
        .frame(f(
            Connect,
            &[
                ("accept-version", "1.2"),
                ("login", "us\\cer"),
                ("passcode", "p\\w"),
            ],
            b"",
        )),
        case(
            "STOMP leaves escapes as is in 1.1",
            V1_1,
            b"STOMP\nhost:a\\nb\n\n\0",
        )
        .frame(f(Stomp, &[("host", "a\\nb")], b"")),
        case(
            "CONNECTED leaves escapes as is",
            V1_2,
            b"CONNECTED\nserver:x\\cy\\q\n\n\0",
        )
        .frame(f(Connected, &[("server", "x\\cy\\q")], b"")),
        case(
            "NUL inside body with content-length",
            V1_2,
            b"SEND\ncontent-length:5\n\na\0b\0c\0",
        )
        .frame(f(Send, &[("content-length", "5")], b"a\0b\0c")),
        case("content-length 0", V1_2, b"SEND\ncontent-length:0\n\n\0").frame(f(
            Send,
            &[("content-length", "0")],
            b"",
        )),
        case(
            "missing NUL after content-length",
            V1_2,
            b"SEND\ncontent-length:2\n\nabc\0",
        )
        .fails(DecodeError::MissingNul),
        case(
            "content-length shorter than body, frame after",
            V1_2,
            b"SEND\ncontent-length:1\n\na\0\nSEND\n\n\0",
        )
        .frame(f(Send, &[("content-length", "1")], b"a"))
        .beat()
        .frame(f(Send, &[], b"")),
        case(
            "invalid content-length",
            V1_2,
            b"SEND\ncontent-length:abc\n\n\0",
        )
        .fails(DecodeError::InvalidContentLength("abc".into())),
        case(
            "negative content-length",
            V1_2,
            b"SEND\ncontent-length:-1\n\n\0",
        )
        .fails(DecodeError::InvalidContentLength("-1".into())),
        case(
            "heart-beats before the first frame",
            V1_2,
            b"\n\r\n\nSEND\n\n\0",
        )
        .beats(3)
        .frame(f(Send, &[], b"")),
        case(
            "heart-beats between and after frames",
            V1_1,
            b"SEND\n\nx\0\n\r\n\r\n\nMESSAGE\n\ny\0\n",
        )
        .frame(f(Send, &[], b"x"))
        .beats(4)
        .frame(f(Message, &[], b"y"))
        .beat(),
        case("lone CR at the end waits", V1_2, b"\n\r").beat(),
        case(
            "repeated headers keep wire order",
            V1_2,
            b"MESSAGE\nfoo:1\nbar:x\nfoo:2\nfoo:3\n\n\0",
        )
        .frame(f(
            Message,
            &[("foo", "1"), ("bar", "x"), ("foo", "2"), ("foo", "3")],
            b"",
        )),
        case("empty header value", V1_2, b"SEND\nreceipt:\n\n\0").frame(f(
            Send,
            &[("receipt", "")],
            b"",
        )),
        case(
            "header value containing ':'",
            V1_2,
            b"SEND\nurl:http://x:80/a\n\n\0",
        )
        .frame(f(Send, &[("url", "http://x:80/a")], b"")),
        case(
            "header value containing ':' in 1.0",
            V1_0,
            b"SEND\nurl:a:b::\n\n\0",
        )
        .frame(f(Send, &[("url", "a:b::")], b"")),
        case(
            "no trimming of names or values",
            V1_2,
            b"SEND\n a : b \n\n\0",
        )
        .frame(f(Send, &[(" a ", " b ")], b"")),
        case("UTF-8 header", V1_2, b"SEND\nn\xc3\xa4me:v\xc3\xa4l\n\n\0").frame(f(
            Send,
            &[("n\u{e4}me", "v\u{e4}l")],
            b"",
        )),
        case("invalid UTF-8 header", V1_2, b"SEND\nname:\xc3\x28\n\n\0")
            .fails(DecodeError::InvalidUtf8),
        case("malformed header", V1_2, b"SEND\ndestination\n\n\0")
            .fails(DecodeError::MalformedHeader("destination".into())),
        case("lower-case command", V1_2, b"send\n\n\0")
            .fails(DecodeError::UnknownCommand("send".into())),
        case(
            "frame then unknown command",
            V1_2,
            b"SEND\n\n\0\nNOPE\n\n\0",
        )
        .frame(f(Send, &[], b""))
        .beat()
        .fails(DecodeError::UnknownCommand("NOPE".into())),
        case(
            "CR not followed by LF at frame start",
            V1_2,
            b"\rSEND\n\n\0",
        )
        .fails(DecodeError::UnknownCommand("\rSEND".into())),
        case(
            "body with CR LF bytes, no content-length",
            V1_2,
            b"SEND\n\n\r\n\r\n\0",
        )
        .frame(f(Send, &[], b"\r\n\r\n")),
        case(
            "content-length larger than limit",
            V1_2,
            b"SEND\ncontent-length:1000\n\n",
        )
        .limits(100, 8, 50)
        .fails(DecodeError::FrameTooLarge { limit: 100 }),
        case(
            "frame of exactly the limit",
            V1_2,
            b"SEND\ncontent-length:3\n\nabc\0",
        )
        .limits(27, 8, 50)
        .frame(f(Send, &[("content-length", "3")], b"abc")),
        case(
            "content-length one over the limit",
            V1_2,
            b"SEND\ncontent-length:4\n\n",
        )
        .limits(27, 8, 50)
        .fails(DecodeError::FrameTooLarge { limit: 27 }),
        case(
            "unterminated frame over the size limit",
            V1_2,
            b"SEND\n\n0123456789012345678901234567890123456789",
        )
        .limits(32, 8, 50)
        .fails(DecodeError::FrameTooLarge { limit: 32 }),
        case(
            "heart-beats do not count toward frame size",
            V1_2,
            b"\n\n\n\n\n\n\n\n\n\nSEND\n\nab\0",
        )
        .limits(9, 8, 50)
        .beats(10)
        .frame(f(Send, &[], b"ab")),
        case("too many headers", V1_2, b"SEND\na:1\nb:2\nc:3\nd:4\n\n\0")
            .limits(1000, 3, 50)
            .fails(DecodeError::TooManyHeaders { limit: 3 }),
        case("exactly max headers", V1_2, b"SEND\na:1\nb:2\nc:3\n\n\0")
            .limits(1000, 3, 50)
            .frame(f(Send, &[("a", "1"), ("b", "2"), ("c", "3")], b"")),
        case(
            "long header line fails before EOL",
            V1_2,
            b"SEND\ndestination:/queue/aaaaaaaaaaaaaaaaaaaaaaaaaa",
        )
        .limits(1000, 8, 20)
        .fails(DecodeError::HeaderLineTooLong { limit: 20 }),
        case(
            "header line of exactly the limit with CRLF",
            V1_2,
            b"SEND\r\naaaaaaaaa:bbbbbbbbbb\r\n\r\n\0",
        )
        .limits(1000, 8, 20)
        .frame(f(Send, &[("aaaaaaaaa", "bbbbbbbbbb")], b"")),
    ]
}

fn check(c: &Case) {
    let whole = run(c.version, c.limits, &[c.wire]);
    assert_eq!(
        (&whole.0, &whole.1),
        (&c.items, &c.error),
        "case {:?} fed whole",
        c.name
    );
    for at in 0..=c.wire.len() {
        let split = run(c.version, c.limits, &[&c.wire[..at], &c.wire[at..]]);
        assert_eq!(split, whole, "case {:?} split at {at}", c.name);
    }
    let bytes: Vec<&[u8]> = c.wire.chunks(1).collect();
    let bytewise = run(c.version, c.limits, &bytes);
    assert_eq!(bytewise, whole, "case {:?} one byte at a time", c.name);
}

#[test]
fn wire_cases_whole_split_and_bytewise() {
    for c in cases() {
        check(&c);
    }
}

#[test]
fn all_wire_cases_in_one_stream() {
    // The successful cases of one version, back to back with heart-beats.
    for version in Version::ALL {
        let mut wire = Vec::new();
        let mut want = Vec::new();
        for c in cases().into_iter().filter(|c| {
            c.error.is_none()
                && c.version == version
                && c.limits == Limits::default()
                && !c.wire.ends_with(b"\r")
        }) {
            wire.extend_from_slice(c.wire);
            wire.extend_from_slice(b"\r\n");
            want.extend(c.items);
            want.push(Item::Heartbeat);
        }
        let (items, error, _) = run(version, Limits::default(), &[&wire]);
        assert_eq!(error, None);
        assert_eq!(items, want, "{version}");
        let pieces: Vec<&[u8]> = wire.chunks(7).collect();
        assert_eq!(run(version, Limits::default(), &pieces).0, want);
    }
}

#[test]
fn content_length_over_limit_fails_before_body_arrives() {
    let mut d = Decoder::new(Limits {
        max_frame_size: 100,
        ..Limits::default()
    });
    d.extend(b"SEND\ndestination:/queue/a\ncontent-length:500\n");
    assert_eq!(d.decode(), Ok(None));
    d.extend(b"\n");
    assert_eq!(d.decode(), Err(DecodeError::FrameTooLarge { limit: 100 }));
}

#[test]
fn unterminated_body_over_limit_fails_without_nul() {
    let mut d = Decoder::new(Limits {
        max_frame_size: 64,
        ..Limits::default()
    });
    d.extend(b"SEND\n\n");
    for _ in 0..57 {
        d.extend(b"x");
        assert_eq!(d.decode(), Ok(None));
    }
    // 6 + 58 + NUL would be 65 > 64.
    d.extend(b"x");
    assert_eq!(d.decode(), Err(DecodeError::FrameTooLarge { limit: 64 }));
}

#[test]
fn long_header_line_fails_before_its_eol() {
    let mut d = Decoder::new(Limits {
        max_header_line: 16,
        ..Limits::default()
    });
    d.extend(b"SEND\n0123456789abcdef");
    assert_eq!(d.decode(), Ok(None));
    d.extend(b"\r");
    assert_eq!(d.decode(), Ok(None));
    d.extend(b"g");
    assert_eq!(
        d.decode(),
        Err(DecodeError::HeaderLineTooLong { limit: 16 })
    );
}

#[test]
fn too_many_headers_fails_before_blank_line() {
    let mut d = Decoder::new(Limits {
        max_headers: 2,
        ..Limits::default()
    });
    d.extend(b"SEND\na:1\nb:2\n");
    assert_eq!(d.decode(), Ok(None));
    d.extend(b"c:3\n");
    assert_eq!(d.decode(), Err(DecodeError::TooManyHeaders { limit: 2 }));
}

/// Large frames fed one byte at a time must take linear time: the decoder
/// must not rescan what it has already searched for LF or NUL. A quadratic
/// decoder needs ~5 * 10^11 byte comparisons here, far beyond the bound.
#[test]
fn large_frames_one_byte_at_a_time_are_linear() {
    const N: usize = 1 << 20;
    let limits = Limits {
        max_frame_size: 4 * N,
        max_headers: 64,
        max_header_line: 2 * N,
    };
    let long_value = "v".repeat(N);
    let mut wire = Vec::with_capacity(3 * N + 100);
    wire.extend_from_slice(b"SEND\nbig:");
    wire.extend_from_slice(long_value.as_bytes());
    wire.extend_from_slice(b"\n\n");
    wire.extend(std::iter::repeat_n(b'b', N)); // no content-length: NUL search
    wire.push(0);
    wire.extend_from_slice(format!("SEND\ncontent-length:{N}\n\n").as_bytes());
    wire.extend(std::iter::repeat_n(0u8, N));
    wire.push(0);

    // Linear decoding takes well under a second even in a debug build.
    let bound = Duration::from_secs(30);
    let start = Instant::now();
    let mut d = Decoder::new(limits);
    let mut frames = Vec::new();
    for (i, byte) in wire.chunks(1).enumerate() {
        d.extend(byte);
        while let Some(item) = d.decode().unwrap() {
            frames.push(item);
        }
        if i % 4096 == 0 {
            let elapsed = start.elapsed();
            assert!(
                elapsed < bound,
                "{elapsed:?} for the first {i} bytes: decoding is not linear"
            );
        }
    }
    assert_eq!(frames.len(), 2);
    let Item::Frame(a) = &frames[0] else { panic!() };
    assert_eq!(a.header("big").map(str::len), Some(N));
    assert_eq!(a.body.len(), N);
    let Item::Frame(b) = &frames[1] else { panic!() };
    assert_eq!(b.body.len(), N);
}
