//! Incremental STOMP 1.0/1.1/1.2 codec.
//!
//! The [`Decoder`] is fed raw bytes as they arrive ([`Decoder::extend`]) and
//! hands out complete [`Item`]s one at a time ([`Decoder::decode`]): frames and
//! heart-beats. It never looks further ahead than the item it returns, so a
//! caller can change the escaping rules with [`Decoder::set_version`] right
//! after the CONNECT frame and have them apply to every later frame, even if
//! those bytes were already received.
//!
//! [`encode`] writes the wire form of a [`Frame`] for a given version.
//!
//! Wire format, per frame:
//!
//! ```text
//! COMMAND EOL
//! name:value EOL      (zero or more)
//! EOL
//! body NUL
//! ```
//!
//! `EOL` is LF or CRLF (both accepted in every version; the encoder writes LF).
//! An EOL where a frame would start is a heart-beat. A NUL where a frame
//! would start is skipped, as RabbitMQ does (some clients end each frame with
//! `NUL EOL` or send a stray NUL). A NUL inside a header line is refused: a
//! peer that splits frames on NUL would cut the frame there.

use crate::frame::{Command, Frame, Version};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use std::fmt::Write as _;

/// The wire form of one heart-beat (a single LF).
pub const HEARTBEAT: &[u8] = b"\n";

/// Longest excerpt of offending input quoted in an error (in characters).
const ERROR_EXCERPT: usize = 64;

/// Buffer capacity an idle decoder may keep; more is released once drained.
const IDLE_CAPACITY: usize = 1024;

/// Decoder limits. Defaults: `max_frame_size` 65536 (64 KiB), `max_headers`
/// 64, `max_header_line` 8192.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest frame accepted, counted from the first byte of the command
    /// line through the terminating NUL (heart-beats before it not counted).
    pub max_frame_size: usize,
    /// Largest number of header lines in one frame.
    pub max_headers: usize,
    /// Longest command or header line, excluding its EOL.
    pub max_header_line: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_frame_size: 64 * 1024,
            max_headers: 64,
            max_header_line: 8192,
        }
    }
}

/// One thing read off the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// A complete frame.
    Frame(Frame),
    /// One heart-beat EOL (LF or CRLF) received between frames.
    Heartbeat,
}

/// Why a byte stream is not valid STOMP. After the first error the decoder is
/// poisoned and keeps returning it: the connection should be closed (after an
/// ERROR frame, whose `message` header may be this error's text).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("frame exceeds the maximum size of {limit} bytes")]
    FrameTooLarge { limit: usize },
    #[error("frame has more than {limit} headers")]
    TooManyHeaders { limit: usize },
    #[error("header line exceeds {limit} bytes")]
    HeaderLineTooLong { limit: usize },
    #[error("unknown command {0:?}")]
    UnknownCommand(String),
    #[error("undefined escape sequence {0:?} in header")]
    InvalidEscape(String),
    #[error("malformed header line {0:?}: expected name:value")]
    MalformedHeader(String),
    #[error("header is not valid UTF-8")]
    InvalidUtf8,
    #[error("NUL byte in header line {0:?}")]
    NulInHeader(String),
    #[error("invalid content-length {0:?}")]
    InvalidContentLength(String),
    #[error("frame body is not terminated by NUL after content-length bytes")]
    MissingNul,
}

/// A frame whose command line has been read.
#[derive(Debug)]
struct Partial {
    command: Command,
    /// Headers as on the wire (UTF-8 checked, not yet unescaped).
    headers: Vec<(String, String)>,
    /// The value of the first `content-length` header, once seen.
    content_length: Option<usize>,
}

#[derive(Debug)]
enum State {
    /// Between frames: EOLs here are heart-beats.
    Idle,
    /// Reading header lines.
    Headers(Partial),
    /// Blank line seen; reading the body and its NUL.
    Body(Partial),
}

/// Incremental STOMP decoder. See the module documentation.
#[derive(Debug)]
pub struct Decoder {
    limits: Limits,
    version: Version,
    /// Received bytes not consumed yet. The front is always the start of the
    /// next line (or of the body, in [`State::Body`]).
    buf: BytesMut,
    /// Bytes of the current frame already consumed (command and header lines).
    consumed: usize,
    /// How many bytes at the front of `buf` are known to hold no LF (while
    /// reading a line) or no NUL (while reading a body without
    /// content-length), so that they are not searched again.
    scanned: usize,
    state: State,
    error: Option<DecodeError>,
}

impl Default for Decoder {
    fn default() -> Decoder {
        Decoder::new(Limits::default())
    }
}

impl Decoder {
    /// A decoder with the given limits, unescaping headers by the 1.2 rules
    /// until [`Decoder::set_version`] says otherwise.
    pub fn new(limits: Limits) -> Decoder {
        Decoder {
            limits,
            version: Version::V1_2,
            buf: BytesMut::new(),
            consumed: 0,
            scanned: 0,
            state: State::Idle,
            error: None,
        }
    }

    /// Sets the escaping rules for every frame returned by later
    /// [`Decoder::decode`] calls (headers are unescaped when the frame is
    /// complete, so this also covers a frame that is partly received).
    pub fn set_version(&mut self, version: Version) {
        self.version = version;
    }

    /// The escaping rules in use.
    pub fn version(&self) -> Version {
        self.version
    }

    /// The limits in use.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Appends received bytes (one WebSocket message, one TCP read, ...).
    /// Ignored once the decoder has failed.
    pub fn extend(&mut self, data: &[u8]) {
        if self.error.is_none() {
            self.buf.extend_from_slice(data);
        }
    }

    /// The next complete item, or `Ok(None)` if more bytes are needed. Call it
    /// in a loop after each [`Decoder::extend`] until it returns `Ok(None)`.
    ///
    /// After an error the decoder is poisoned: it drops its buffer and returns
    /// the same error on every later call.
    pub fn decode(&mut self) -> Result<Option<Item>, DecodeError> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        match self.step() {
            Ok(None) => {
                // Idle connections should not keep the last burst's buffer.
                // An empty buffer holds nothing to keep (`scanned` is 0 and
                // `consumed` counts bytes already gone), so it can go.
                if self.buf.is_empty() && self.buf.capacity() > IDLE_CAPACITY {
                    self.buf = BytesMut::new();
                }
                Ok(None)
            }
            Ok(item) => Ok(item),
            Err(e) => {
                self.error = Some(e.clone());
                self.buf = BytesMut::new();
                self.state = State::Idle;
                self.consumed = 0;
                self.scanned = 0;
                Err(e)
            }
        }
    }

    /// Bytes received and not yet returned as items (including the already
    /// parsed lines of a partly received frame). Zero after an error.
    pub fn buffered(&self) -> usize {
        self.consumed + self.buf.len()
    }

    fn step(&mut self) -> Result<Option<Item>, DecodeError> {
        loop {
            match &mut self.state {
                State::Idle => {
                    match self.buf.first() {
                        None => return Ok(None),
                        Some(b'\n') => {
                            self.buf.advance(1);
                            return Ok(Some(Item::Heartbeat));
                        }
                        Some(0) => {
                            // A stray NUL between frames: skipped, not an
                            // item (RabbitMQ ignores it too).
                            self.buf.advance(1);
                            continue;
                        }
                        Some(b'\r') => match self.buf.get(1) {
                            None => return Ok(None),
                            Some(b'\n') => {
                                self.buf.advance(2);
                                return Ok(Some(Item::Heartbeat));
                            }
                            // Not an EOL: a (bad) command line.
                            Some(_) => {}
                        },
                        Some(_) => {}
                    }
                    let Some((len, total)) = self.next_line()? else {
                        return Ok(None);
                    };
                    let line = &self.buf[..len];
                    let command = Command::parse(line)
                        .ok_or_else(|| DecodeError::UnknownCommand(excerpt(line)))?;
                    self.consume_line(total);
                    self.state = State::Headers(Partial {
                        command,
                        headers: Vec::new(),
                        content_length: None,
                    });
                }
                State::Headers(_) => {
                    let Some((len, total)) = self.next_line()? else {
                        return Ok(None);
                    };
                    let State::Headers(partial) = &mut self.state else {
                        unreachable!("state checked above");
                    };
                    if len == 0 {
                        let content_length = partial.content_length;
                        self.consume_line(total);
                        if let Some(n) = content_length {
                            // Fail before the body arrives.
                            let size = self.consumed.saturating_add(n).saturating_add(1);
                            if size > self.limits.max_frame_size {
                                return Err(DecodeError::FrameTooLarge {
                                    limit: self.limits.max_frame_size,
                                });
                            }
                        }
                        let State::Headers(partial) =
                            std::mem::replace(&mut self.state, State::Idle)
                        else {
                            unreachable!("state checked above");
                        };
                        self.state = State::Body(partial);
                        continue;
                    }
                    if partial.headers.len() >= self.limits.max_headers {
                        return Err(DecodeError::TooManyHeaders {
                            limit: self.limits.max_headers,
                        });
                    }
                    let (name, value) = parse_header(&self.buf[..len])?;
                    if partial.content_length.is_none() && name == "content-length" {
                        partial.content_length = Some(parse_content_length(&value)?);
                    }
                    partial.headers.push((name, value));
                    self.consume_line(total);
                }
                State::Body(partial) => {
                    let content_length = partial.content_length;
                    let body = match content_length {
                        Some(n) => {
                            match self.buf.get(n) {
                                None => return Ok(None),
                                Some(0) => {}
                                Some(_) => return Err(DecodeError::MissingNul),
                            }
                            self.buf.split_to(n).freeze()
                        }
                        None => {
                            let start = self.scanned;
                            match self.buf[start..].iter().position(|&b| b == 0) {
                                Some(i) => {
                                    let n = start + i;
                                    self.check_frame_size(n + 1)?;
                                    self.buf.split_to(n).freeze()
                                }
                                None => {
                                    self.scanned = self.buf.len();
                                    // The NUL is still to come: one more byte.
                                    self.check_frame_size(self.buf.len() + 1)?;
                                    return Ok(None);
                                }
                            }
                        }
                    };
                    self.buf.advance(1); // the NUL
                    self.consumed = 0;
                    self.scanned = 0;
                    let State::Body(partial) = std::mem::replace(&mut self.state, State::Idle)
                    else {
                        unreachable!("state checked above");
                    };
                    return self.finish(partial, body).map(|f| Some(Item::Frame(f)));
                }
            }
        }
    }

    /// Finds the next complete line at the front of `buf`. Returns its length
    /// without EOL and its length with EOL, or `None` if the LF has not
    /// arrived yet. Enforces the line and frame size limits, also on a line
    /// still being received.
    fn next_line(&mut self) -> Result<Option<(usize, usize)>, DecodeError> {
        let start = self.scanned;
        match self.buf[start..].iter().position(|&b| b == b'\n') {
            Some(i) => {
                let lf = start + i;
                let len = if lf > 0 && self.buf[lf - 1] == b'\r' {
                    lf - 1
                } else {
                    lf
                };
                self.check_line_len(len)?;
                self.check_frame_size(lf + 1)?;
                Ok(Some((len, lf + 1)))
            }
            None => {
                self.scanned = self.buf.len();
                // A trailing CR may be the first half of a CRLF.
                let len = match self.buf.last() {
                    Some(b'\r') => self.buf.len() - 1,
                    _ => self.buf.len(),
                };
                self.check_line_len(len)?;
                self.check_frame_size(self.buf.len())?;
                Ok(None)
            }
        }
    }

    fn consume_line(&mut self, total: usize) {
        self.buf.advance(total);
        self.consumed += total;
        self.scanned = 0;
    }

    fn check_line_len(&self, len: usize) -> Result<(), DecodeError> {
        if len > self.limits.max_header_line {
            return Err(DecodeError::HeaderLineTooLong {
                limit: self.limits.max_header_line,
            });
        }
        Ok(())
    }

    /// Fails if the current frame is (or will be) longer than the limit, given
    /// that at least `more` bytes at the front of `buf` belong to it.
    fn check_frame_size(&self, more: usize) -> Result<(), DecodeError> {
        if self.consumed.saturating_add(more) > self.limits.max_frame_size {
            return Err(DecodeError::FrameTooLarge {
                limit: self.limits.max_frame_size,
            });
        }
        Ok(())
    }

    fn finish(&self, partial: Partial, body: Bytes) -> Result<Frame, DecodeError> {
        let Partial {
            command,
            mut headers,
            ..
        } = partial;
        if !command.is_escape_exempt() && self.version != Version::V1_0 {
            for (name, value) in &mut headers {
                unescape(name, self.version)?;
                unescape(value, self.version)?;
            }
        }
        Ok(Frame {
            command,
            headers,
            body,
        })
    }
}

/// Splits a header line at its first `:` (no trimming).
fn parse_header(line: &[u8]) -> Result<(String, String), DecodeError> {
    if line.contains(&0) {
        return Err(DecodeError::NulInHeader(excerpt(line)));
    }
    let colon = line
        .iter()
        .position(|&b| b == b':')
        .ok_or_else(|| DecodeError::MalformedHeader(excerpt(line)))?;
    let text = std::str::from_utf8(line).map_err(|_| DecodeError::InvalidUtf8)?;
    Ok((text[..colon].to_owned(), text[colon + 1..].to_owned()))
}

/// A content-length is one or more ASCII digits. A number too large for
/// `usize` saturates (and then fails the frame size limit).
fn parse_content_length(value: &str) -> Result<usize, DecodeError> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(DecodeError::InvalidContentLength(excerpt(value.as_bytes())));
    }
    Ok(value.bytes().fold(0usize, |n, b| {
        n.saturating_mul(10).saturating_add(usize::from(b - b'0'))
    }))
}

/// Undoes header escaping in place (1.1: `\n` `\c` `\\`; 1.2 adds `\r`).
fn unescape(s: &mut String, version: Version) -> Result<(), DecodeError> {
    if !s.contains('\\') {
        return Ok(());
    }
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('c') => out.push(':'),
            Some('\\') => out.push('\\'),
            Some('r') if version == Version::V1_2 => out.push('\r'),
            Some(other) => return Err(DecodeError::InvalidEscape(format!("\\{other}"))),
            None => return Err(DecodeError::InvalidEscape("\\".to_owned())),
        }
    }
    *s = out;
    Ok(())
}

/// A short, lossy text rendering of offending input for an error message.
fn excerpt(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut chars = text.chars();
    let mut out: String = chars.by_ref().take(ERROR_EXCERPT).collect();
    if chars.next().is_some() {
        out.push('…');
    }
    out
}

/// How header text is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Escaping {
    /// 1.0 and the exempt commands: nothing is escaped, so what cannot be
    /// represented is replaced (LF/CR by a space, `:` in names by `_`).
    None,
    /// 1.1: `\` `LF` `:`; CR is written as is, except at the very end of
    /// a value, where it would merge with the EOL (`CR CR LF` reads back as
    /// `CR LF`): there it is replaced by a space (found by fuzzing).
    V1_1,
    /// 1.2: `\` `LF` `CR` `:`.
    V1_2,
}

fn put_text(out: &mut BytesMut, text: &str, escaping: Escaping, is_name: bool) {
    let special = |b: u8| match b {
        b'\n' | b':' | b'\\' if escaping != Escaping::None => true,
        b'\r' => escaping != Escaping::V1_1,
        b'\n' => true,
        b':' => is_name,
        _ => false,
    };
    let bytes = text.as_bytes();
    let last = bytes.len().wrapping_sub(1);
    let mut run = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let trailing_cr = b == b'\r' && i == last && !is_name && escaping == Escaping::V1_1;
        if !special(b) && !trailing_cr {
            continue;
        }
        out.put_slice(&bytes[run..i]);
        run = i + 1;
        let replacement: &[u8] = match (escaping, b) {
            (Escaping::V1_1, b'\r') => b" ",
            (Escaping::None, b':') => b"_",
            (Escaping::None, _) => b" ",
            (_, b'\n') => b"\\n",
            (_, b'\r') => b"\\r",
            (_, b':') => b"\\c",
            _ => b"\\\\",
        };
        out.put_slice(replacement);
    }
    out.put_slice(&bytes[run..]);
}

/// Appends the wire form of `frame` for `version` to `out`.
///
/// Headers are escaped for `version` (never for CONNECT, STOMP and CONNECTED).
/// A correct `content-length` is written whenever the body is non-empty or
/// the frame already has one: the first `content-length` header gets the real
/// body length, later ones are dropped, and one is appended if missing.
pub fn encode(frame: &Frame, version: Version, out: &mut BytesMut) {
    let escaping = escaping_for(frame.command, version);
    out.reserve(encoded_len_estimate(frame));
    out.put_slice(frame.command.as_str().as_bytes());
    out.put_u8(b'\n');
    put_rest(&frame.headers, &frame.body, escaping, out);
}

fn escaping_for(command: Command, version: Version) -> Escaping {
    if command.is_escape_exempt() {
        Escaping::None
    } else {
        match version {
            Version::V1_0 => Escaping::None,
            Version::V1_1 => Escaping::V1_1,
            Version::V1_2 => Escaping::V1_2,
        }
    }
}

/// Writes one header line (`name:value` LF) of a `command` frame, escaped by
/// `version`'s rules. With [`encode_rest`] this builds a frame in pieces:
/// the command line, some header lines, then the shared rest.
pub fn encode_header(
    command: Command,
    name: &str,
    value: &str,
    version: Version,
    out: &mut BytesMut,
) {
    let escaping = escaping_for(command, version);
    put_text(out, name, escaping, true);
    out.put_u8(b':');
    put_text(out, value, escaping, false);
    out.put_u8(b'\n');
}

/// Writes what follows a frame's command line and any header lines already
/// written with [`encode_header`]: `headers`, `content-length` (as
/// [`encode`] does), the blank line, the body and the NUL.
pub fn encode_rest(
    command: Command,
    headers: &[(String, String)],
    body: &[u8],
    version: Version,
    out: &mut BytesMut,
) {
    put_rest(headers, body, escaping_for(command, version), out);
}

fn put_rest(headers: &[(String, String)], body: &[u8], escaping: Escaping, out: &mut BytesMut) {
    let mut wrote_length = false;
    for (name, value) in headers {
        if name == "content-length" {
            if !wrote_length {
                put_content_length(out, body.len());
                wrote_length = true;
            }
            continue;
        }
        put_text(out, name, escaping, true);
        out.put_u8(b':');
        put_text(out, value, escaping, false);
        out.put_u8(b'\n');
    }
    if !wrote_length && !body.is_empty() {
        put_content_length(out, body.len());
    }
    out.put_u8(b'\n');
    out.put_slice(body);
    out.put_u8(0);
}

/// The wire form of `frame` for `version` (see [`encode`]).
pub fn encode_to_bytes(frame: &Frame, version: Version) -> Bytes {
    let mut out = BytesMut::new();
    encode(frame, version, &mut out);
    out.freeze()
}

fn put_content_length(out: &mut BytesMut, len: usize) {
    let mut line = String::with_capacity(40);
    // Writing to a String cannot fail.
    let _ = writeln!(line, "content-length:{len}");
    out.put_slice(line.as_bytes());
}

fn encoded_len_estimate(frame: &Frame) -> usize {
    let headers: usize = frame
        .headers
        .iter()
        .map(|(n, v)| n.len() + v.len() + 2)
        .sum();
    frame.command.as_str().len() + headers + 40 + frame.body.len()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn decode_one(version: Version, wire: &[u8]) -> Result<Option<Item>, DecodeError> {
        let mut d = Decoder::new(Limits::default());
        d.set_version(version);
        d.extend(wire);
        d.decode()
    }

    fn frame_of(version: Version, wire: &[u8]) -> Frame {
        match decode_one(version, wire) {
            Ok(Some(Item::Frame(f))) => f,
            other => panic!("expected a frame from {wire:?}, got {other:?}"),
        }
    }

    fn err_of(version: Version, wire: &[u8]) -> DecodeError {
        match decode_one(version, wire) {
            Err(e) => e,
            other => panic!("expected an error from {wire:?}, got {other:?}"),
        }
    }

    fn small(max_frame_size: usize, max_headers: usize, max_header_line: usize) -> Decoder {
        Decoder::new(Limits {
            max_frame_size,
            max_headers,
            max_header_line,
        })
    }

    // ---- limits defaults -------------------------------------------------

    #[test]
    fn default_limits() {
        let l = Limits::default();
        assert_eq!(l.max_frame_size, 65536);
        assert_eq!(l.max_headers, 64);
        assert_eq!(l.max_header_line, 8192);
        let d = Decoder::default();
        assert_eq!(d.limits(), l);
        assert_eq!(d.version(), Version::V1_2);
    }

    // ---- each error variant ----------------------------------------------

    #[test]
    fn error_frame_too_large_without_content_length() {
        // Exactly at the limit is fine: "SEND\n\n" (6) + 3 body + NUL = 10.
        let mut d = small(10, 8, 100);
        d.extend(b"SEND\n\nabc\0");
        assert!(matches!(d.decode(), Ok(Some(Item::Frame(_)))));
        // One more body byte is not, and this fails before the NUL arrives.
        let mut d = small(10, 8, 100);
        d.extend(b"SEND\n\nabcd");
        assert_eq!(d.decode(), Err(DecodeError::FrameTooLarge { limit: 10 }));
    }

    #[test]
    fn error_frame_too_large_with_content_length_before_body() {
        let mut d = small(32, 8, 100);
        // 23 bytes up to the blank line + 9 + NUL = 33 > 32.
        d.extend(b"SEND\ncontent-length:9\n\n");
        assert_eq!(d.decode(), Err(DecodeError::FrameTooLarge { limit: 32 }));
        let mut d = small(33, 8, 100);
        d.extend(b"SEND\ncontent-length:9\n\n");
        assert_eq!(d.decode(), Ok(None));
    }

    #[test]
    fn error_frame_too_large_in_headers() {
        let mut d = small(12, 8, 100);
        d.extend(b"SEND\nabcdefgh");
        assert_eq!(d.decode(), Err(DecodeError::FrameTooLarge { limit: 12 }));
    }

    #[test]
    fn error_too_many_headers() {
        let mut d = small(1000, 2, 100);
        d.extend(b"SEND\na:1\nb:2\n\n\0");
        assert!(matches!(d.decode(), Ok(Some(Item::Frame(_)))));
        let mut d = small(1000, 2, 100);
        d.extend(b"SEND\na:1\nb:2\nc:3\n");
        assert_eq!(d.decode(), Err(DecodeError::TooManyHeaders { limit: 2 }));
    }

    #[test]
    fn error_header_line_too_long() {
        let mut d = small(1000, 8, 5);
        d.extend(b"SEND\nab:de\r\n\n\0");
        assert!(matches!(d.decode(), Ok(Some(Item::Frame(_)))));
        // Before the EOL arrives.
        let mut d = small(1000, 8, 5);
        d.extend(b"SEND\nab:def");
        assert_eq!(d.decode(), Err(DecodeError::HeaderLineTooLong { limit: 5 }));
        // A trailing CR may still be half a CRLF: not counted yet.
        let mut d = small(1000, 8, 5);
        d.extend(b"SEND\nab:de\r");
        assert_eq!(d.decode(), Ok(None));
        // The command line is limited too.
        let mut d = small(1000, 8, 5);
        d.extend(b"SUBSCRIBE\n");
        assert_eq!(d.decode(), Err(DecodeError::HeaderLineTooLong { limit: 5 }));
    }

    #[test]
    fn error_unknown_command() {
        assert_eq!(
            err_of(Version::V1_2, b"send\n\n\0"),
            DecodeError::UnknownCommand("send".into())
        );
        assert_eq!(
            err_of(Version::V1_0, b"SEND \n\n\0"),
            DecodeError::UnknownCommand("SEND ".into())
        );
        let long = [b'X'; 200];
        match err_of(Version::V1_2, &[&long[..], b"\n"].concat()) {
            DecodeError::UnknownCommand(s) => assert!(s.chars().count() <= ERROR_EXCERPT + 1),
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn error_malformed_header() {
        assert_eq!(
            err_of(Version::V1_2, b"SEND\nnocolon\n\n\0"),
            DecodeError::MalformedHeader("nocolon".into())
        );
    }

    #[test]
    fn error_invalid_utf8() {
        assert_eq!(
            err_of(Version::V1_2, b"SEND\na:\xff\n\n\0"),
            DecodeError::InvalidUtf8
        );
        assert_eq!(
            err_of(Version::V1_0, b"SEND\n\xc3:x\n\n\0"),
            DecodeError::InvalidUtf8
        );
    }

    #[test]
    fn error_nul_in_header() {
        assert_eq!(
            err_of(Version::V1_2, b"SEND\nx-evil:a\0b\n\n\0"),
            DecodeError::NulInHeader("x-evil:a\0b".into())
        );
        assert_eq!(
            err_of(Version::V1_0, b"SEND\nx\0:1\n\n\0"),
            DecodeError::NulInHeader("x\0:1".into())
        );
        // In the command line it is simply not a command.
        assert!(matches!(
            err_of(Version::V1_2, b"SE\0ND\n\n\0"),
            DecodeError::UnknownCommand(_)
        ));
    }

    #[test]
    fn nuls_and_eols_between_frames_are_skipped() {
        let mut d = Decoder::default();
        d.extend(b"\0\0SEND\n\nA\0\0\r\n\0\nSEND\n\nB\0\0");
        let mut items = Vec::new();
        while let Some(item) = d.decode().unwrap() {
            items.push(item);
        }
        let bodies: Vec<_> = items
            .iter()
            .filter_map(|i| match i {
                Item::Frame(f) => Some(f.body.clone()),
                Item::Heartbeat => None,
            })
            .collect();
        assert_eq!(bodies, vec![Bytes::from("A"), Bytes::from("B")]);
        assert_eq!(
            items.iter().filter(|i| **i == Item::Heartbeat).count(),
            2,
            "{items:?}"
        );
        assert_eq!(d.buffered(), 0);
        // Only NULs: nothing buffered, nothing returned.
        d.extend(&[0u8; 100_000]);
        assert_eq!(d.decode(), Ok(None));
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn error_invalid_content_length() {
        for bad in ["", "x", "-1", " 1", "1 ", "+1", "1.0"] {
            let wire = format!("SEND\ncontent-length:{bad}\n\n\0");
            assert_eq!(
                err_of(Version::V1_2, wire.as_bytes()),
                DecodeError::InvalidContentLength(bad.into()),
                "{bad:?}"
            );
        }
        // Only the first content-length counts.
        let f = frame_of(
            Version::V1_2,
            b"SEND\ncontent-length:1\ncontent-length:x\n\n\0\0",
        );
        assert_eq!(&f.body[..], b"\0");
    }

    #[test]
    fn error_missing_nul() {
        assert_eq!(
            err_of(Version::V1_2, b"SEND\ncontent-length:2\n\nabc\0"),
            DecodeError::MissingNul
        );
    }

    #[test]
    fn huge_content_length_is_too_large_not_invalid() {
        assert_eq!(
            err_of(
                Version::V1_2,
                b"SEND\ncontent-length:999999999999999999999999999\n\n"
            ),
            DecodeError::FrameTooLarge { limit: 65536 }
        );
    }

    #[test]
    fn poisoned_after_error() {
        let mut d = Decoder::default();
        d.extend(b"BOGUS\n\n\0SEND\n\n\0");
        let e = d.decode().unwrap_err();
        d.extend(b"SEND\n\n\0");
        assert_eq!(d.decode(), Err(e.clone()));
        assert_eq!(d.decode(), Err(e));
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn error_messages_are_short_and_lower_case() {
        let e = DecodeError::InvalidEscape("\\t".into());
        assert_eq!(
            e.to_string(),
            r#"undefined escape sequence "\\t" in header"#
        );
        assert_eq!(
            DecodeError::FrameTooLarge { limit: 5 }.to_string(),
            "frame exceeds the maximum size of 5 bytes"
        );
    }

    // ---- escape rules, per version ---------------------------------------

    const ESCAPED: &[u8] = b"SEND\nk\\c\\\\:a\\nb\\cc\\\\d\n\n\0";

    #[test]
    fn v1_0_never_unescapes() {
        let f = frame_of(Version::V1_0, ESCAPED);
        assert_eq!(
            f.headers,
            vec![("k\\c\\\\".into(), "a\\nb\\cc\\\\d".into())]
        );
        // Even sequences that are undefined in 1.1/1.2.
        let f = frame_of(Version::V1_0, b"SEND\na:\\t\\r\\\n\n\0");
        assert_eq!(f.header("a"), Some("\\t\\r\\"));
    }

    #[test]
    fn v1_1_unescapes_n_c_backslash() {
        let f = frame_of(Version::V1_1, ESCAPED);
        assert_eq!(f.headers, vec![("k:\\".into(), "a\nb:c\\d".into())]);
    }

    #[test]
    fn v1_1_rejects_r_and_others() {
        for (wire, seq) in [
            (&b"SEND\na:x\\ry\n\n\0"[..], "\\r"),
            (b"SEND\na:\\t\n\n\0", "\\t"),
            (b"SEND\na:x\\\n\n\0", "\\"),
            (b"SEND\na\\x:1\n\n\0", "\\x"),
            (b"SEND\na:x\\\r\n\n\0", "\\"), // CRLF: the CR is the EOL
            (b"SEND\na:x\\\r\r\n\n\0", "\\\r"),
        ] {
            assert_eq!(
                err_of(Version::V1_1, wire),
                DecodeError::InvalidEscape(seq.into()),
                "{wire:?}"
            );
        }
    }

    #[test]
    fn v1_2_unescapes_r_n_c_backslash() {
        let f = frame_of(Version::V1_2, ESCAPED);
        assert_eq!(f.headers, vec![("k:\\".into(), "a\nb:c\\d".into())]);
        let f = frame_of(Version::V1_2, b"SEND\na\\r:x\\ry\n\n\0");
        assert_eq!(f.headers, vec![("a\r".into(), "x\ry".into())]);
    }

    #[test]
    fn v1_2_rejects_others() {
        for (wire, seq) in [
            (&b"SEND\na:\\t\n\n\0"[..], "\\t"),
            (b"SEND\na:x\\\n\n\0", "\\"),
            (b"SEND\na:\\C\n\n\0", "\\C"),
            (b"SEND\na:\\\xc3\xa9\n\n\0", "\\é"),
        ] {
            assert_eq!(
                err_of(Version::V1_2, wire),
                DecodeError::InvalidEscape(seq.into()),
                "{wire:?}"
            );
        }
    }

    #[test]
    fn exempt_commands_never_unescape() {
        for v in Version::ALL {
            for cmd in ["CONNECT", "STOMP", "CONNECTED"] {
                let wire = format!("{cmd}\nlogin:a\\cb\\t\\\n\n\0");
                let f = frame_of(v, wire.as_bytes());
                assert_eq!(f.header("login"), Some("a\\cb\\t\\"), "{v} {cmd}");
            }
        }
    }

    #[test]
    fn set_version_applies_to_frames_already_buffered() {
        let mut d = Decoder::default();
        d.set_version(Version::V1_0);
        d.extend(b"CONNECT\naccept-version:1.1\n\n\0SEND\na:\\c\n\n\0SEND\na:\\c");
        assert!(matches!(d.decode(), Ok(Some(Item::Frame(_)))));
        d.set_version(Version::V1_1);
        assert_eq!(d.version(), Version::V1_1);
        match d.decode() {
            Ok(Some(Item::Frame(f))) => assert_eq!(f.header("a"), Some(":")),
            other => panic!("{other:?}"),
        }
        assert_eq!(d.decode(), Ok(None));
        d.set_version(Version::V1_0);
        d.extend(b"\n\n\0");
        match d.decode() {
            Ok(Some(Item::Frame(f))) => assert_eq!(f.header("a"), Some("\\c")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn encode_escapes_per_version() {
        let f = Frame::new(Command::Send).with_header("k:\\\r\n", "v:\\\r\n");
        assert_eq!(
            &encode_to_bytes(&f, Version::V1_2)[..],
            b"SEND\nk\\c\\\\\\r\\n:v\\c\\\\\\r\\n\n\n\0"
        );
        assert_eq!(
            &encode_to_bytes(&f, Version::V1_1)[..],
            b"SEND\nk\\c\\\\\r\\n:v\\c\\\\\r\\n\n\n\0"
        );
        assert_eq!(
            &encode_to_bytes(&f, Version::V1_0)[..],
            b"SEND\nk_\\  :v:\\  \n\n\0"
        );
        // Exempt commands are sanitized like 1.0 in every version.
        let c = Frame::new(Command::Connected).with_header("k:\\\r\n", "v:\\\r\n");
        for v in Version::ALL {
            assert_eq!(
                &encode_to_bytes(&c, v)[..],
                b"CONNECTED\nk_\\  :v:\\  \n\n\0"
            );
        }
    }

    #[test]
    fn v1_1_trailing_cr_in_a_value_does_not_merge_with_the_eol() {
        // Found by fuzzing: `a:x\r\r\n` decodes to "x\r", which 1.1 cannot
        // escape; written raw it would read back as "x".
        let f = frame_of(Version::V1_1, b"SEND\na:x\r\r\nb:y\rz\n\n\0");
        assert_eq!(f.header("a"), Some("x\r"));
        let wire = encode_to_bytes(&f, Version::V1_1);
        assert_eq!(&wire[..], b"SEND\na:x \nb:y\rz\n\n\0");
        assert_eq!(frame_of(Version::V1_1, &wire).header("a"), Some("x "));
    }

    #[test]
    fn encode_content_length_rules() {
        // Empty body, no content-length: none added.
        let f = Frame::new(Command::Send).with_header("a", "1");
        assert_eq!(&encode_to_bytes(&f, Version::V1_2)[..], b"SEND\na:1\n\n\0");
        // Non-empty body: appended.
        let f = f.with_body(&b"x\0y"[..]);
        assert_eq!(
            &encode_to_bytes(&f, Version::V1_2)[..],
            b"SEND\na:1\ncontent-length:3\n\nx\0y\0"
        );
        // Existing ones: first replaced in place, later dropped.
        let f = Frame::new(Command::Send)
            .with_header("content-length", "99")
            .with_header("a", "1")
            .with_header("content-length", "7");
        assert_eq!(
            &encode_to_bytes(&f, Version::V1_0)[..],
            b"SEND\ncontent-length:0\na:1\n\n\0"
        );
        let mut out = BytesMut::from(&b"prefix"[..]);
        encode(&f, Version::V1_1, &mut out);
        assert!(out.starts_with(b"prefixSEND\n"));
        assert_eq!(HEARTBEAT, b"\n");
    }

    #[test]
    fn buffered_counts_partial_frame() {
        let mut d = Decoder::default();
        d.extend(b"\nSEND\na:1\n\nbo");
        assert_eq!(d.buffered(), 13);
        assert_eq!(d.decode(), Ok(Some(Item::Heartbeat)));
        assert_eq!(d.buffered(), 12);
        assert_eq!(d.decode(), Ok(None));
        assert_eq!(d.buffered(), 12);
        d.extend(b"dy\0\r");
        assert!(matches!(d.decode(), Ok(Some(Item::Frame(_)))));
        assert_eq!(d.buffered(), 1);
        assert_eq!(d.decode(), Ok(None));
        d.extend(b"\n");
        assert_eq!(d.decode(), Ok(Some(Item::Heartbeat)));
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn body_is_zero_copy_slice_of_buffer() {
        let mut d = Decoder::default();
        d.extend(b"SEND\ncontent-length:4\n\nabcd\0SEND\n\nefgh\0");
        let Ok(Some(Item::Frame(a))) = d.decode() else {
            panic!()
        };
        let Ok(Some(Item::Frame(b))) = d.decode() else {
            panic!()
        };
        assert_eq!(&a.body[..], b"abcd");
        assert_eq!(&b.body[..], b"efgh");
        // Both bodies live in the same allocation, in wire order.
        let gap = b.body.as_ptr() as usize - a.body.as_ptr() as usize;
        assert_eq!(gap, 4 + 1 + "SEND\n\n".len());
    }

    #[test]
    fn drained_decoder_releases_its_buffer() {
        let mut d = Decoder::default();
        let big = encode_to_bytes(
            &Frame::new(Command::Send)
                .with_header("destination", "/q")
                .with_body(vec![b'x'; 8192]),
            Version::V1_2,
        );
        d.extend(&big[..100]);
        assert_eq!(d.decode(), Ok(None));
        d.extend(&big[100..]);
        assert!(matches!(d.decode(), Ok(Some(Item::Frame(_)))));
        assert_eq!(d.decode(), Ok(None));
        assert!(
            d.buf.capacity() <= IDLE_CAPACITY,
            "capacity {}",
            d.buf.capacity()
        );
        // A frame split mid-headers keeps decoding correctly afterwards.
        let f = Frame::new(Command::Send)
            .with_header("destination", "/q")
            .with_header("content-length", "2")
            .with_body("hi");
        let wire = encode_to_bytes(&f, Version::V1_2);
        d.extend(&wire[..5]);
        assert_eq!(d.decode(), Ok(None));
        d.extend(&wire[5..]);
        assert_eq!(d.decode(), Ok(Some(Item::Frame(f))));
    }
}
