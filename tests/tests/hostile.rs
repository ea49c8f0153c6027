//! Hostile input against the real gateway (issue 10): a table of attacks,
//! each with the answer it must get (a STOMP ERROR with RabbitMQ's words or
//! the limit's name, then the right WebSocket close code; or an HTTP
//! status), while a well-behaved client keeps working, the gateway's memory
//! stays bounded and its broker connections return to their baseline.
//!
//! WebSocket-level attacks need frames no WebSocket library writes
//! (unmasked, RSV bits, reserved opcodes), so this file speaks the wire
//! itself: [`Raw`] is a TCP connection from a chosen loopback address (so
//! the per-IP limits of the attacker do not touch the good client on
//! 127.0.0.1) that upgrades by hand and reads frames as they come.
#![allow(clippy::unwrap_used)]

use anyhow::{bail, Context, Result};
use e2e::amqp::Amqp;
use e2e::{body_text, unique, Command, Gateway, StompClient, Version, WAIT};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const HANDSHAKE_MS: u64 = 1_000;
const FRAME_TIMEOUT_MS: u64 = 1_000;
const MAX_FRAME: usize = 65_536;
const MAX_HEADERS: usize = 64;
const MAX_LINE: usize = 8_192;
const MAX_WS: usize = 262_144;

/// What a hostile connection got back.
#[derive(Debug, Default)]
struct Outcome {
    /// Text/binary messages received, as text.
    messages: Vec<String>,
    /// The close code, when a close frame came.
    close: Option<u16>,
    /// The HTTP status line, for connections that never upgraded.
    http: Option<String>,
}

impl Outcome {
    fn error_message(&self) -> Option<String> {
        self.messages.iter().find_map(|m| {
            let (head, _) = m.split_once("\n\n")?;
            let mut lines = head.lines();
            if lines.next()? != "ERROR" {
                return None;
            }
            // STOMP 1.2 escaping of the header value.
            lines
                .find_map(|l| l.strip_prefix("message:"))
                .map(|v| v.replace("\\c", ":").replace("\\\\", "\\"))
        })
    }
}

/// A raw WebSocket client connection.
struct Raw {
    s: TcpStream,
    buf: Vec<u8>,
}

async fn tcp_from(src: IpAddr, to: SocketAddr) -> Result<TcpStream> {
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(src, 0))?;
    Ok(sock.connect(to).await?)
}

fn frame(fin: bool, rsv: u8, opcode: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mut out = vec![(u8::from(fin) << 7) | (rsv << 4) | opcode];
    let m = if masked { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(m | n as u8),
        n if n < 65_536 => {
            out.push(m | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(m | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    if masked {
        let key = [0x37, 0xfa, 0x21, 0x3d];
        out.extend_from_slice(&key);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    } else {
        out.extend_from_slice(payload);
    }
    out
}

fn text(payload: &[u8]) -> Vec<u8> {
    frame(true, 0, 1, payload, true)
}

const UPGRADE: &str = "GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: v12.stomp\r\n\r\n";

impl Raw {
    /// A TCP connection from `src`, not upgraded.
    async fn tcp(src: IpAddr, to: SocketAddr) -> Result<Raw> {
        Ok(Raw {
            s: tcp_from(src, to).await?,
            buf: Vec::new(),
        })
    }

    /// Upgraded to a WebSocket (`v12.stomp`).
    async fn ws(src: IpAddr, to: SocketAddr) -> Result<Raw> {
        let mut r = Raw::tcp(src, to).await?;
        r.s.write_all(UPGRADE.as_bytes()).await?;
        let head = r.http_head(WAIT).await?;
        if !head.starts_with("HTTP/1.1 101") {
            bail!("upgrade refused: {head}");
        }
        Ok(r)
    }

    /// Upgraded, then CONNECTed with `heart-beat:0,0`.
    async fn stomp(src: IpAddr, to: SocketAddr) -> Result<Raw> {
        let mut r = Raw::ws(src, to).await?;
        r.send(&text(
            b"CONNECT\naccept-version:1.2\nhost:/\nheart-beat:0,0\n\n\0",
        ))
        .await?;
        let m = r.message(WAIT).await?;
        if !m.starts_with("CONNECTED\n") {
            bail!("expected CONNECTED, got {m:?}");
        }
        Ok(r)
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<()> {
        Ok(self.s.write_all(bytes).await?)
    }

    async fn fill(&mut self, deadline: Instant) -> Result<bool> {
        let mut chunk = vec![0u8; 16 * 1024];
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, self.s.read(&mut chunk)).await {
            Err(_) => bail!("timed out"),
            Ok(Ok(0)) | Ok(Err(_)) => Ok(false),
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(true)
            }
        }
    }

    async fn http_head(&mut self, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..i]).into_owned();
                self.buf.drain(..i + 4);
                return Ok(head);
            }
            if !self.fill(deadline).await? {
                bail!(
                    "closed before an HTTP response: {:?}",
                    String::from_utf8_lossy(&self.buf)
                );
            }
        }
    }

    /// The next server frame: (opcode, payload); `None` at EOF.
    async fn next_frame(&mut self, deadline: Instant) -> Result<Option<(u8, Vec<u8>)>> {
        loop {
            if self.buf.len() >= 2 {
                let op = self.buf[0] & 0x0f;
                let (len, at) = match self.buf[1] & 0x7f {
                    126 if self.buf.len() >= 4 => (
                        usize::from(u16::from_be_bytes([self.buf[2], self.buf[3]])),
                        4,
                    ),
                    127 if self.buf.len() >= 10 => {
                        let mut b = [0u8; 8];
                        b.copy_from_slice(&self.buf[2..10]);
                        (u64::from_be_bytes(b) as usize, 10)
                    }
                    n @ 0..=125 => (usize::from(n), 2),
                    _ => (usize::MAX, 0),
                };
                if len != usize::MAX && self.buf.len() >= at + len {
                    let payload = self.buf[at..at + len].to_vec();
                    self.buf.drain(..at + len);
                    return Ok(Some((op, payload)));
                }
            }
            if !self.fill(deadline).await? {
                return Ok(None);
            }
        }
    }

    /// The next data message, as text (pings and pongs skipped).
    async fn message(&mut self, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.next_frame(deadline).await? {
                Some((1 | 2, p)) => return Ok(String::from_utf8_lossy(&p).into_owned()),
                Some((8, p)) => bail!("closed: {p:?}"),
                Some(_) => continue,
                None => bail!("connection ended"),
            }
        }
    }

    /// Everything until the close frame or EOF.
    async fn outcome(&mut self, timeout: Duration) -> Outcome {
        let deadline = Instant::now() + timeout;
        let mut out = Outcome::default();
        while let Ok(Some((op, p))) = self.next_frame(deadline).await {
            match op {
                1 | 2 => out.messages.push(String::from_utf8_lossy(&p).into_owned()),
                8 => {
                    out.close = (p.len() >= 2).then(|| u16::from_be_bytes([p[0], p[1]]));
                    break;
                }
                _ => {}
            }
        }
        out
    }

    /// The HTTP status line the server answers with, then EOF.
    async fn http_status(&mut self, timeout: Duration) -> Outcome {
        let status = self
            .http_head(timeout)
            .await
            .map(|h| h.lines().next().unwrap_or_default().to_owned())
            .unwrap_or_else(|e| format!("no response: {e}"));
        Outcome {
            http: Some(status),
            ..Outcome::default()
        }
    }
}

/// What a case must get.
enum Want {
    /// ERROR whose `message` starts with this, then this close code.
    Error(&'static str, u16),
    /// The connection keeps working: a SEND with a receipt is receipted.
    Works,
    /// HTTP status code.
    Http(u16),
}

fn sized_send(dest: &str, total: usize) -> Vec<u8> {
    // SEND\ndestination:<d>\ncontent-length:<n>\n\n<body>\0 == total bytes
    let fixed = format!("SEND\ndestination:{dest}\ncontent-length:\n\n").len() + 1;
    let mut n = total - fixed;
    while n.to_string().len() + fixed + n > total {
        n -= 1;
    }
    let mut f = format!("SEND\ndestination:{dest}\ncontent-length:{n}\n\n").into_bytes();
    f.extend(std::iter::repeat_n(b'x', n));
    f.push(0);
    assert_eq!(f.len(), total);
    f
}

fn with_headers(n: usize, dest: &str) -> Vec<u8> {
    let mut f = format!("SEND\ndestination:{dest}\n");
    for i in 1..n {
        f.push_str(&format!("h{i}:v\n"));
    }
    f.push_str("\n\0");
    f.into_bytes()
}

fn with_line(len: usize, dest: &str) -> Vec<u8> {
    // The header line `x:vvvv` is `len` bytes long.
    let mut f = format!("SEND\ndestination:{dest}\nx:").into_bytes();
    f.extend(std::iter::repeat_n(b'v', len - 2));
    f.extend_from_slice(b"\n\n\0");
    f
}

/// Runs one case on a fresh connection from `src`; returns what came back.
async fn run_case(name: &str, src: IpAddr, to: SocketAddr, dest: &str) -> Result<Outcome> {
    let receipt = |f: &[u8]| -> Vec<u8> {
        // Put `receipt:r` after the command line.
        let i = f.iter().position(|&b| b == b'\n').unwrap();
        [&f[..=i], b"receipt:r\n", &f[i + 1..]].concat()
    };
    let w = Duration::from_secs(5);
    let mut r;
    macro_rules! stomp {
        () => {{
            r = Raw::stomp(src, to).await?;
        }};
    }
    let out = match name {
        "garbage" => {
            r = Raw::ws(src, to).await?;
            r.send(&text(b"hello, is this HTTP?\n\n\0")).await?;
            r.outcome(w).await
        }
        "frame before CONNECT" => {
            r = Raw::ws(src, to).await?;
            r.send(&text(format!("SEND\ndestination:{dest}\n\nx\0").as_bytes()))
                .await?;
            r.outcome(w).await
        }
        "second CONNECT" => {
            stomp!();
            r.send(&text(b"CONNECT\naccept-version:1.2\nhost:/\n\n\0"))
                .await?;
            r.outcome(w).await
        }
        "unsupported version" => {
            r = Raw::ws(src, to).await?;
            r.send(&text(b"CONNECT\naccept-version:9.9\nhost:/\n\n\0"))
                .await?;
            r.outcome(w).await
        }
        "bad heart-beat header" => {
            r = Raw::ws(src, to).await?;
            r.send(&text(b"CONNECT\naccept-version:1.2\nheart-beat:soon\n\n\0"))
                .await?;
            r.outcome(w).await
        }
        "header without colon" => {
            stomp!();
            r.send(&text(
                format!("SEND\ndestination:{dest}\nnocolon\n\n\0").as_bytes(),
            ))
            .await?;
            r.outcome(w).await
        }
        "undefined escape" => {
            stomp!();
            r.send(&text(
                format!("SEND\ndestination:{dest}\nk:a\\tb\n\n\0").as_bytes(),
            ))
            .await?;
            r.outcome(w).await
        }
        "NUL in a header value" => {
            stomp!();
            r.send(&text(
                format!("SEND\ndestination:{dest}\nx-evil:a\0b\n\nbody\0").as_bytes(),
            ))
            .await?;
            r.outcome(w).await
        }
        "content-length longer than the body" => {
            stomp!();
            r.send(&text(
                format!("SEND\ndestination:{dest}\ncontent-length:2\n\nabc\0").as_bytes(),
            ))
            .await?;
            r.outcome(w).await
        }
        "content-length not a number" => {
            stomp!();
            r.send(&text(
                format!("SEND\ndestination:{dest}\ncontent-length:-1\n\nabc\0").as_bytes(),
            ))
            .await?;
            r.outcome(w).await
        }
        "SEND without destination" => {
            stomp!();
            r.send(&text(b"SEND\n\nx\0")).await?;
            r.outcome(w).await
        }
        "empty destination name /queue" => {
            stomp!();
            r.send(&text(b"SEND\ndestination:/queue\n\nx\0")).await?;
            r.outcome(w).await
        }
        "unknown destination kind" => {
            stomp!();
            r.send(&text(b"SEND\ndestination:/foo/bar\n\nx\0")).await?;
            r.outcome(w).await
        }
        "duplicate subscription id" => {
            stomp!();
            let sub = format!("SUBSCRIBE\nid:1\ndestination:{dest}\n\n\0");
            r.send(&text(sub.as_bytes())).await?;
            r.send(&text(sub.as_bytes())).await?;
            r.outcome(w).await
        }
        "client sends MESSAGE" => {
            stomp!();
            r.send(&text(b"MESSAGE\ndestination:/topic/x\n\n\0"))
                .await?;
            r.outcome(w).await
        }
        "frame exactly max_frame_size" => {
            stomp!();
            r.send(&text(&receipt(&sized_send(dest, MAX_FRAME - 10))[..]))
                .await?;
            // receipt adds 10 bytes: exactly at the limit.
            r.outcome(Duration::from_millis(1500)).await
        }
        "frame one byte over max_frame_size" => {
            stomp!();
            r.send(&text(&receipt(&sized_send(dest, MAX_FRAME - 9))[..]))
                .await?;
            r.outcome(w).await
        }
        "exactly max_header_count headers" => {
            stomp!();
            // With `receipt`, MAX_HEADERS in all.
            r.send(&text(&receipt(&with_headers(MAX_HEADERS - 1, dest))))
                .await?;
            r.outcome(Duration::from_millis(1500)).await
        }
        "one header over max_header_count" => {
            stomp!();
            r.send(&text(&receipt(&with_headers(MAX_HEADERS, dest))))
                .await?;
            r.outcome(w).await
        }
        "10,000 headers" => {
            stomp!();
            r.send(&text(&with_headers(10_000, dest))).await?;
            r.outcome(w).await
        }
        "header line exactly max_header_line" => {
            stomp!();
            r.send(&text(&receipt(&with_line(MAX_LINE, dest)))).await?;
            r.outcome(Duration::from_millis(1500)).await
        }
        "header line one byte over" => {
            stomp!();
            r.send(&text(&receipt(&with_line(MAX_LINE + 1, dest))))
                .await?;
            r.outcome(w).await
        }
        "1 MiB header line in 8 messages" => {
            stomp!();
            let f = with_line(1 << 20, dest);
            for part in f.chunks(f.len() / 8 + 1) {
                if r.send(&text(part)).await.is_err() {
                    break;
                }
            }
            r.outcome(w).await
        }
        "1,000 subscriptions then one more" => {
            stomp!();
            let mut all = Vec::new();
            for i in 0..1_000 {
                all.extend(text(
                    format!("SUBSCRIBE\nid:{i}\ndestination:{dest}\n\n\0").as_bytes(),
                ));
            }
            all.extend(text(
                format!("SUBSCRIBE\nid:last\ndestination:{dest}\n\n\0").as_bytes(),
            ));
            r.send(&all).await?;
            r.outcome(WAIT).await
        }
        "10,001 BEGINs" => {
            stomp!();
            let mut all = Vec::new();
            for i in 0..10_001 {
                all.extend(text(format!("BEGIN\ntransaction:t{i}\n\n\0").as_bytes()));
            }
            let _ = r.send(&all).await;
            r.outcome(w).await
        }
        "64 KiB SENDs inside one transaction" => {
            stomp!();
            r.send(&text(b"BEGIN\ntransaction:big\n\n\0")).await?;
            let body = "x".repeat(60_000);
            for _ in 0..20 {
                let f = format!("SEND\ndestination:{dest}\ntransaction:big\n\n{body}\0");
                if r.send(&text(f.as_bytes())).await.is_err() {
                    break;
                }
            }
            r.outcome(w).await
        }
        "SEND flood over the rate" => {
            stomp!();
            let mut all = Vec::new();
            for _ in 0..300 {
                all.extend(text(format!("SEND\ndestination:{dest}\n\nx\0").as_bytes()));
            }
            let _ = r.send(&all).await;
            r.outcome(w).await
        }
        "half a frame, no heart-beats" => {
            stomp!();
            r.send(&text(b"SEND\ndestination:/topic/x\ncontent-le"))
                .await?;
            r.outcome(Duration::from_millis(FRAME_TIMEOUT_MS * 4)).await
        }
        "NULs and EOLs between frames" => {
            stomp!();
            let f = receipt(format!("SEND\ndestination:{dest}\n\nx\0").as_bytes());
            r.send(&text(&[&b"\0\0\n\r\n\0"[..], &f, b"\0\n"].concat()))
                .await?;
            r.outcome(Duration::from_millis(1500)).await
        }
        "ping flood" => {
            stomp!();
            let mut all = Vec::new();
            for _ in 0..10_000 {
                all.extend(frame(true, 0, 9, b"p", true));
            }
            all.extend(text(&receipt(
                format!("SEND\ndestination:{dest}\n\nx\0").as_bytes(),
            )));
            r.send(&all).await?;
            r.outcome(Duration::from_millis(3000)).await
        }
        "fragment flood (one frame in 2,000 pieces)" => {
            stomp!();
            let f =
                receipt(format!("SEND\ndestination:{dest}\n\n{}\0", "y".repeat(1900)).as_bytes());
            let mut all = Vec::new();
            for (i, c) in f.chunks(1).enumerate() {
                let last = i == f.len() - 1;
                all.extend(frame(last, 0, if i == 0 { 1 } else { 0 }, c, true));
            }
            r.send(&all).await?;
            r.outcome(Duration::from_millis(3000)).await
        }
        "WebSocket message over max_ws_message_size" => {
            stomp!();
            let _ = r.send(&text(&vec![b'\n'; MAX_WS + 1])).await;
            r.outcome(w).await
        }
        "fragmented message over max_ws_message_size" => {
            stomp!();
            let part = vec![b'\n'; 32 * 1024];
            let mut all = frame(false, 0, 1, &part, true);
            for _ in 0..9 {
                all.extend(frame(false, 0, 0, &part, true));
            }
            all.extend(frame(true, 0, 0, &part, true));
            let _ = r.send(&all).await;
            r.outcome(w).await
        }
        "invalid UTF-8 in a text message" => {
            stomp!();
            r.send(&text(b"SEND\ndestination:/topic/x\n\n\xff\xfe\0"))
                .await?;
            r.outcome(w).await
        }
        "unmasked frame" => {
            stomp!();
            r.send(&frame(true, 0, 1, b"\n", false)).await?;
            r.outcome(w).await
        }
        "RSV bits set" => {
            stomp!();
            r.send(&frame(true, 0b100, 1, b"\n", true)).await?;
            r.outcome(w).await
        }
        "reserved opcode" => {
            stomp!();
            r.send(&frame(true, 0, 3, b"\n", true)).await?;
            r.outcome(w).await
        }
        "oversized control frame" => {
            stomp!();
            r.send(&frame(true, 0, 9, &[b'p'; 200], true)).await?;
            r.outcome(w).await
        }
        "fragmented control frame" => {
            stomp!();
            r.send(&frame(false, 0, 9, b"p", true)).await?;
            r.outcome(w).await
        }
        "slowloris: half an upgrade request" => {
            r = Raw::tcp(src, to).await?;
            r.send(&UPGRADE.as_bytes()[..60]).await?;
            r.http_status(Duration::from_millis(HANDSHAKE_MS * 4)).await
        }
        "slowloris: trickled request" => {
            r = Raw::tcp(src, to).await?;
            let t = r.s.try_clone_trickle(UPGRADE.as_bytes()[..40].to_vec());
            let out = r.http_status(Duration::from_millis(HANDSHAKE_MS * 4)).await;
            t.abort();
            out
        }
        "connection that never speaks" => {
            r = Raw::tcp(src, to).await?;
            r.http_status(Duration::from_millis(HANDSHAKE_MS * 4)).await
        }
        "plain HTTP to the WebSocket path" => {
            r = Raw::tcp(src, to).await?;
            r.send(b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n").await?;
            r.http_status(w).await
        }
        other => bail!("no such case {other}"),
    };
    drop(r);
    Ok(out)
}

/// Sends `data` one byte every 300 ms on a second handle of the socket.
trait Trickle {
    fn try_clone_trickle(&self, data: Vec<u8>) -> tokio::task::JoinHandle<()>;
}

impl Trickle for TcpStream {
    fn try_clone_trickle(&self, data: Vec<u8>) -> tokio::task::JoinHandle<()> {
        let fd = socket2::SockRef::from(self).try_clone().expect("dup");
        tokio::task::spawn_blocking(move || {
            let s: std::net::TcpStream = fd.into();
            for b in data {
                if std::io::Write::write_all(&mut &s, &[b]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(300));
            }
        })
    }
}

fn table() -> Vec<(&'static str, Want)> {
    use Want::*;
    vec![
        ("garbage", Error("Bad command", 1002)),
        ("frame before CONNECT", Error("Illegal command", 1002)),
        ("second CONNECT", Error("Illegal command", 1002)),
        ("unsupported version", Error("Version mismatch", 1002)),
        ("bad heart-beat header", Error("Invalid header", 1002)),
        ("header without colon", Error("Invalid header", 1002)),
        ("undefined escape", Error("Invalid header", 1002)),
        ("NUL in a header value", Error("Invalid header", 1002)),
        (
            "content-length longer than the body",
            Error("Invalid frame", 1002),
        ),
        ("content-length not a number", Error("Invalid header", 1002)),
        (
            "SEND without destination",
            Error("Missing destination", 1002),
        ),
        (
            "empty destination name /queue",
            Error("Invalid destination", 1002),
        ),
        (
            "unknown destination kind",
            Error("Unknown destination", 1002),
        ),
        (
            "duplicate subscription id",
            Error("Duplicated subscription identifier", 1002),
        ),
        ("client sends MESSAGE", Error("Bad command", 1002)),
        ("frame exactly max_frame_size", Works),
        (
            "frame one byte over max_frame_size",
            Error("Limit exceeded: session.max_frame_size", 1008),
        ),
        ("exactly max_header_count headers", Works),
        (
            "one header over max_header_count",
            Error("Limit exceeded: session.max_header_count", 1008),
        ),
        (
            "10,000 headers",
            Error("Limit exceeded: session.max_header_count", 1008),
        ),
        ("header line exactly max_header_line", Works),
        (
            "header line one byte over",
            Error("Limit exceeded: session.max_header_line", 1008),
        ),
        (
            "1 MiB header line in 8 messages",
            Error("Limit exceeded: session.max_header_line", 1008),
        ),
        (
            "1,000 subscriptions then one more",
            Error("Limit exceeded: session.max_subscriptions", 1008),
        ),
        (
            "10,001 BEGINs",
            Error("Limit exceeded: session.max_transactions", 1008),
        ),
        (
            "64 KiB SENDs inside one transaction",
            Error("Limit exceeded: session.max_transaction_bytes", 1008),
        ),
        (
            "SEND flood over the rate",
            Error("Limit exceeded: session.max_sends_per_sec", 1008),
        ),
        (
            "half a frame, no heart-beats",
            Error("Limit exceeded: session.frame_timeout_ms", 1008),
        ),
        ("NULs and EOLs between frames", Works),
        ("ping flood", Works),
        ("fragment flood (one frame in 2,000 pieces)", Works),
        (
            "WebSocket message over max_ws_message_size",
            Error("Limit exceeded: server.max_ws_message_size", 1009),
        ),
        (
            "fragmented message over max_ws_message_size",
            Error("Limit exceeded: server.max_ws_message_size", 1009),
        ),
        (
            "invalid UTF-8 in a text message",
            Error("Invalid frame", 1007),
        ),
        ("unmasked frame", Error("Invalid frame", 1002)),
        ("RSV bits set", Error("Invalid frame", 1002)),
        ("reserved opcode", Error("Invalid frame", 1002)),
        ("oversized control frame", Error("Invalid frame", 1002)),
        ("fragmented control frame", Error("Invalid frame", 1002)),
        ("slowloris: half an upgrade request", Http(408)),
        ("slowloris: trickled request", Http(408)),
        ("connection that never speaks", Http(408)),
        ("plain HTTP to the WebSocket path", Http(426)),
    ]
}

fn vm_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// TCP connections the gateway process holds to RabbitMQ's STOMP port
/// (its broker legs and the system link): what RabbitMQ counts for it.
fn broker_connections(pid: u32) -> usize {
    let out = std::process::Command::new("ss")
        .args(["-tnpH", "state", "established", "( dport = :61613 )"])
        .output()
        .expect("ss");
    let needle = format!("pid={pid},");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&needle))
        .count()
}

async fn wait_broker_baseline(pid: u32, baseline: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let n = broker_connections(pid);
        if n <= baseline || Instant::now() > deadline {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn hostile_gateway(name: &str) -> Gateway {
    Gateway::builder(name)
        .set("server", "handshake_timeout_ms", &HANDSHAKE_MS.to_string())
        .set("server", "max_connections_per_ip", "500")
        .set("server", "max_new_connections_per_ip_per_sec", "0")
        .set("session", "frame_timeout_ms", &FRAME_TIMEOUT_MS.to_string())
        .set("session", "max_sends_per_sec", "200")
        .set("session", "send_burst", "200")
        .start()
        .await
}

/// The good client: still connected, still relaying.
async fn good_round_trip(good: &mut StompClient, dest: &str, n: usize) -> Result<()> {
    let body = format!("still here {n}");
    good.send_text_to(dest, &body).await?;
    let m = good
        .expect(Command::Message, WAIT)
        .await
        .with_context(|| format!("the good client after case {n}"))?;
    let got = body_text(&m);
    assert!(
        got == body,
        "good client got {:?}",
        &got[..got.len().min(80)]
    );
    Ok(())
}

#[tokio::test]
async fn hostile_input_table() -> Result<()> {
    let gw = hostile_gateway("hostile_table").await;
    let to: SocketAddr = gw.ws_url()["ws://".len()..]
        .trim_end_matches("/ws")
        .parse()?;
    let pid = gw.pid();
    let dest = format!("/topic/{}", unique("hostile"));
    let mut good = gw.client().await?;
    good.subscribe(&dest, "good", &[]).await?;
    good_round_trip(&mut good, &dest, 0).await?;
    let baseline = broker_connections(pid);
    let rss_before = vm_rss_kib(pid);
    let attacker: IpAddr = "127.0.0.2".parse()?;
    let evil_dest = format!("/topic/{}", unique("evil"));
    let mut failures = Vec::new();
    let mut report = Vec::new();
    for (i, (name, want)) in table().into_iter().enumerate() {
        let out = Box::pin(run_case(name, attacker, to, &evil_dest)).await?;
        let got = match (&out.http, out.error_message(), out.close) {
            (Some(status), _, _) => status.clone(),
            (None, Some(m), c) => format!("ERROR {m:?} close {c:?}"),
            (None, None, c) => format!(
                "no ERROR, close {c:?}, messages {:?}",
                out.messages
                    .iter()
                    .map(|m| m.lines().next().unwrap_or(""))
                    .collect::<Vec<_>>()
            ),
        };
        let ok = match want {
            Want::Error(prefix, code) => {
                out.error_message().is_some_and(|m| m.starts_with(prefix))
                    && out.close == Some(code)
            }
            Want::Works => {
                out.close.is_none()
                    && out.error_message().is_none()
                    && out.messages.iter().any(|m| m.starts_with("RECEIPT\n"))
            }
            Want::Http(code) => out
                .http
                .as_deref()
                .is_some_and(|s| s.starts_with(&format!("HTTP/1.1 {code}"))),
        };
        report.push(format!("{:>2} {name:<45} {got}", i + 1));
        if !ok {
            failures.push(format!("{name}: got {got}"));
        }
        good_round_trip(&mut good, &dest, i + 1).await?;
    }
    let rss_after = vm_rss_kib(pid);
    let broker_after = wait_broker_baseline(pid, baseline).await;
    eprintln!("{}", report.join("\n"));
    eprintln!(
        "gateway VmRSS {rss_before} KiB before, {rss_after} KiB after; broker connections {baseline} before, {broker_after} after"
    );
    assert!(
        failures.is_empty(),
        "cases answered wrongly:\n{}",
        failures.join("\n")
    );
    assert!(
        rss_after < rss_before + 128 * 1024,
        "memory bounded: {rss_before} KiB -> {rss_after} KiB"
    );
    assert_eq!(
        broker_after, baseline,
        "broker connections back to baseline"
    );
    good.disconnect().await?;
    Ok(())
}

/// 2,000 idle TCP connections from one address: at most
/// `max_connections_per_ip` are held, the rest get 429 at once; the held ones
/// get 408 after the handshake timeout; the good client is not affected.
#[tokio::test]
async fn two_thousand_idle_connections() -> Result<()> {
    let gw = hostile_gateway("hostile_idle").await;
    let to: SocketAddr = gw.ws_url()["ws://".len()..]
        .trim_end_matches("/ws")
        .parse()?;
    let pid = gw.pid();
    let dest = format!("/topic/{}", unique("idle"));
    let mut good = gw.client().await?;
    good.subscribe(&dest, "good", &[]).await?;
    let rss_before = vm_rss_kib(pid);
    let attacker: IpAddr = "127.0.0.3".parse()?;
    let mut conns = Vec::new();
    for _ in 0..2_000 {
        conns.push(Raw::tcp(attacker, to).await?);
    }
    good_round_trip(&mut good, &dest, 1).await?;
    // A new connection from the same address is refused now.
    let mut extra = Raw::tcp(attacker, to).await?;
    let refused = extra.http_status(WAIT).await;
    let mut counts = std::collections::BTreeMap::new();
    let started = Instant::now();
    let outcomes = futures_util::future::join_all(
        conns
            .iter_mut()
            .map(|c| c.http_status(Duration::from_millis(HANDSHAKE_MS * 5))),
    )
    .await;
    for o in outcomes {
        let status = o.http.unwrap_or_default();
        let code = status.split(' ').nth(1).unwrap_or("none").to_owned();
        *counts.entry(code).or_insert(0) += 1;
    }
    let rss_after = vm_rss_kib(pid);
    eprintln!(
        "2,000 idle connections: {counts:?} within {:?}; one more: {:?}; VmRSS {rss_before} -> {rss_after} KiB",
        started.elapsed(),
        refused.http
    );
    assert_eq!(counts.get("429"), Some(&1_500), "{counts:?}");
    assert_eq!(counts.get("408"), Some(&500), "{counts:?}");
    assert!(refused.http.is_some_and(|s| s.starts_with("HTTP/1.1 429")));
    good_round_trip(&mut good, &dest, 2).await?;
    assert!(
        rss_after < rss_before + 64 * 1024,
        "{rss_before} -> {rss_after}"
    );
    let metrics = gw.admin_get("/metrics").await?.body;
    assert!(
        metrics.contains(r#"limit_hits_total{limit="server.max_connections_per_ip""#)
            && metrics.contains(r#"limit_hits_total{limit="server.handshake_timeout_ms""#),
        "{metrics}"
    );
    good.disconnect().await?;
    Ok(())
}

/// A 100 KiB message published over AMQP reaches a subscriber (frames from
/// the broker have RabbitMQ's own limit); one over `broker.max_frame_size`
/// gets the honest ERROR, not "broker unavailable".
#[tokio::test]
async fn large_broker_messages() -> Result<()> {
    let amqp = Amqp::connect().await?;
    let key = unique("big");
    let big = vec![b'b'; 100 * 1024];

    let gw = Gateway::start("hostile_big_message").await;
    let mut c = gw.client().await?;
    c.subscribe(&format!("/topic/{key}"), "s", &[]).await?;
    amqp.publish("amq.topic", &key, &big, Default::default())
        .await?;
    let m = c.expect(Command::Message, WAIT).await?;
    assert_eq!(m.body.len(), big.len());
    c.disconnect().await?;

    let gw = Gateway::builder("hostile_big_message_limit")
        // The relay leg's frame limit: a shared subscription never meets it.
        .per_session()
        .set("broker", "max_frame_size", "65536")
        .start()
        .await;
    let mut c = gw.client().await?;
    c.subscribe(&format!("/topic/{key}"), "s", &[]).await?;
    amqp.publish("amq.topic", &key, &big, Default::default())
        .await?;
    let closed = c.expect_close(WAIT).await?;
    let err = closed
        .frames
        .iter()
        .find(|f| f.command == Command::Error)
        .context("an ERROR before the close")?;
    assert_eq!(
        err.header("message"),
        Some("Limit exceeded: broker.max_frame_size")
    );
    let body = body_text(err);
    assert!(
        body.contains("65536") && !body.contains("unavailable"),
        "{body}"
    );
    let _ = Version::V1_2;
    Ok(())
}
