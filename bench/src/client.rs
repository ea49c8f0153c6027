//! A minimal STOMP-over-WebSocket client on top of the relay-core codec.
//!
//! [`connect`] opens TCP (optionally from a chosen source address), does the
//! WebSocket handshake with the STOMP subprotocols, sends CONNECT and waits
//! for CONNECTED. The session is then split into a [`Writer`] and a
//! [`Reader`] so one task can write while another (or a `select!` arm) reads.

use crate::net;
use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use relay_core::codec::encode_to_bytes;
use relay_core::{Command, Decoder, Frame, Item, Limits, Version};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_tungstenite::{client_async_with_config, WebSocketStream};

type Ws = WebSocketStream<TcpStream>;

/// How to reach the server and what to put in CONNECT.
#[derive(Debug, Clone)]
pub struct ConnOpts {
    pub url: String,
    /// The resolved address of the URL's host and port.
    pub addr: SocketAddr,
    pub login: String,
    pub passcode: String,
    /// The STOMP `host` header (the RabbitMQ virtual host).
    pub host: String,
    /// The `accept-version` header, e.g. `1.2` or `1.0,1.1,1.2`.
    pub accept_version: String,
    /// Client heart-beat offer (cx, cy) in milliseconds.
    pub heart_beat: (u64, u64),
    /// `Sec-WebSocket-Protocol` offers; empty for none.
    pub subprotocols: Vec<String>,
    /// Send STOMP frames as binary WebSocket messages instead of text.
    pub binary: bool,
    /// Limit for TCP connect + WebSocket handshake + CONNECTED.
    pub connect_timeout: Duration,
    pub limits: Limits,
    /// tungstenite read buffer size (small for many idle sessions).
    pub ws_read_buffer: usize,
}

/// What the server agreed to.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    pub version: Version,
    pub subprotocol: Option<String>,
    pub server: Option<String>,
    /// The CONNECTED `heart-beat` header as received.
    pub server_heart_beat: Option<String>,
    /// Negotiated: how often this client must send something.
    pub send_every: Option<Duration>,
    /// Negotiated: how often the server promised to send something.
    pub expect_every: Option<Duration>,
}

/// A connected STOMP session.
#[derive(Debug)]
pub struct Session {
    pub writer: Writer,
    pub reader: Reader,
    pub info: SessionInfo,
}

/// The sending half.
#[derive(Debug)]
pub struct Writer {
    sink: SplitSink<Ws, Message>,
    version: Version,
    binary: bool,
}

/// The receiving half.
#[derive(Debug)]
pub struct Reader {
    stream: SplitStream<Ws>,
    decoder: Decoder,
}

impl Writer {
    /// The WebSocket message carrying `frame`.
    pub fn message(&self, frame: &Frame) -> Result<Message> {
        wrap(encode_to_bytes(frame, self.version), self.binary)
    }

    /// Encodes, writes and flushes one frame.
    pub async fn send(&mut self, frame: &Frame) -> Result<()> {
        let msg = self.message(frame)?;
        self.sink.send(msg).await?;
        Ok(())
    }

    /// Writes and flushes one prepared message.
    pub async fn send_message(&mut self, msg: Message) -> Result<()> {
        self.sink.send(msg).await?;
        Ok(())
    }

    /// Buffers one prepared message (written out when the buffer fills or on
    /// [`Writer::flush`]).
    pub async fn feed_message(&mut self, msg: Message) -> Result<()> {
        self.sink.feed(msg).await?;
        Ok(())
    }

    pub async fn flush(&mut self) -> Result<()> {
        self.sink.flush().await?;
        Ok(())
    }

    /// Sends one heart-beat (an EOL in its own WebSocket message).
    pub async fn heartbeat(&mut self) -> Result<()> {
        let msg = wrap(
            Bytes::from_static(relay_core::codec::HEARTBEAT),
            self.binary,
        )?;
        self.sink.send(msg).await?;
        Ok(())
    }

    /// Sends a WebSocket close frame and flushes.
    pub async fn close(&mut self) -> Result<()> {
        self.sink.close().await?;
        Ok(())
    }
}

fn wrap(bytes: Bytes, binary: bool) -> Result<Message> {
    if binary {
        Ok(Message::Binary(bytes))
    } else {
        let text =
            Utf8Bytes::try_from(bytes).map_err(|_| anyhow!("frame is not UTF-8; use --binary"))?;
        Ok(Message::Text(text))
    }
}

impl Reader {
    /// The next STOMP item, or `None` once the WebSocket is closed.
    /// Cancel-safe: bytes already received stay in the decoder.
    pub async fn next(&mut self) -> Result<Option<Item>> {
        loop {
            if let Some(item) = self.decoder.decode()? {
                return Ok(Some(item));
            }
            match self.stream.next().await {
                None | Some(Ok(Message::Close(_))) => return Ok(None),
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(Message::Text(t))) => self.decoder.extend(t.as_bytes()),
                Some(Ok(Message::Binary(b))) => self.decoder.extend(&b),
                Some(Ok(_)) => {}
            }
        }
    }

    /// Reads until a frame arrives; heart-beats are skipped. `None` when
    /// the connection closed first.
    pub async fn next_frame(&mut self) -> Result<Option<Frame>> {
        loop {
            match self.next().await? {
                Some(Item::Frame(f)) => return Ok(Some(f)),
                Some(Item::Heartbeat) => {}
                None => return Ok(None),
            }
        }
    }

    /// Waits for the RECEIPT with `receipt-id: id`. An ERROR frame or a
    /// close is an error; MESSAGE frames arriving meanwhile are passed to
    /// `on_other`.
    pub async fn wait_receipt(&mut self, id: &str, mut on_other: impl FnMut(Frame)) -> Result<()> {
        loop {
            match self.next_frame().await? {
                Some(f) if f.command == Command::Receipt && f.header("receipt-id") == Some(id) => {
                    return Ok(())
                }
                Some(f) if f.command == Command::Error => {
                    bail!("ERROR frame: {}", describe_error(&f))
                }
                Some(f) => on_other(f),
                None => bail!("connection closed while waiting for RECEIPT {id}"),
            }
        }
    }
}

/// `message` header and a short body excerpt of an ERROR frame.
pub fn describe_error(f: &Frame) -> String {
    let msg = f.header("message").unwrap_or("(no message header)");
    let body = String::from_utf8_lossy(&f.body);
    let body = body.trim();
    if body.is_empty() {
        msg.to_owned()
    } else {
        let excerpt: String = body.chars().take(160).collect();
        format!("{msg}: {excerpt}")
    }
}

/// Connects and completes the STOMP handshake within the connect timeout.
pub async fn connect(opts: &ConnOpts, source: Option<IpAddr>) -> Result<Session> {
    match tokio::time::timeout(opts.connect_timeout, connect_inner(opts, source)).await {
        Ok(r) => r,
        Err(_) => bail!(
            "no CONNECTED within the connect timeout ({:.1} s)",
            opts.connect_timeout.as_secs_f64()
        ),
    }
}

async fn connect_inner(opts: &ConnOpts, source: Option<IpAddr>) -> Result<Session> {
    let tcp = net::tcp_connect(opts.addr, source)
        .await
        .with_context(|| match source {
            Some(ip) => format!("TCP connect to {} from {ip}", opts.addr),
            None => format!("TCP connect to {}", opts.addr),
        })?;
    let mut request = opts.url.as_str().into_client_request()?;
    if !opts.subprotocols.is_empty() {
        request.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_str(&opts.subprotocols.join(", "))?,
        );
    }
    let config = WebSocketConfig::default().read_buffer_size(opts.ws_read_buffer);
    let (ws, response) = client_async_with_config(request, tcp, Some(config))
        .await
        .context("WebSocket handshake")?;
    let subprotocol = response
        .headers()
        .get("Sec-WebSocket-Protocol")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let (sink, stream) = ws.split();
    let mut writer = Writer {
        sink,
        version: Version::V1_2,
        binary: opts.binary,
    };
    let mut reader = Reader {
        stream,
        decoder: Decoder::new(opts.limits),
    };

    let connect = Frame::new(Command::Connect)
        .with_header("accept-version", opts.accept_version.clone())
        .with_header("host", opts.host.clone())
        .with_header("login", opts.login.clone())
        .with_header("passcode", opts.passcode.clone())
        .with_header(
            "heart-beat",
            format!("{},{}", opts.heart_beat.0, opts.heart_beat.1),
        );
    writer.send(&connect).await.context("sending CONNECT")?;
    let connected = match reader.next_frame().await.context("waiting for CONNECTED")? {
        Some(f) if f.command == Command::Connected => f,
        Some(f) if f.command == Command::Error => bail!("ERROR frame: {}", describe_error(&f)),
        Some(f) => bail!("expected CONNECTED, got {}", f.command),
        None => bail!("connection closed before CONNECTED"),
    };
    let version = match connected.header("version") {
        None => Version::V1_0,
        Some(v) => {
            Version::parse(v).ok_or_else(|| anyhow!("CONNECTED has unknown version {v:?}"))?
        }
    };
    writer.version = version;
    reader.decoder.set_version(version);
    let server_heart_beat = connected.header("heart-beat").map(str::to_owned);
    let (sx, sy) = match &server_heart_beat {
        Some(hb) if version != Version::V1_0 => parse_heart_beat(hb)?,
        _ => (0, 0),
    };
    let (cx, cy) = opts.heart_beat;
    let every = |a: u64, b: u64| (a > 0 && b > 0).then(|| Duration::from_millis(a.max(b)));
    let info = SessionInfo {
        version,
        subprotocol,
        server: connected.header("server").map(str::to_owned),
        server_heart_beat,
        send_every: every(cx, sy),
        expect_every: every(cy, sx),
    };
    Ok(Session {
        writer,
        reader,
        info,
    })
}

/// Parses a `heart-beat` header value `x,y` (milliseconds).
pub fn parse_heart_beat(s: &str) -> Result<(u64, u64)> {
    let (a, b) = s
        .split_once(',')
        .ok_or_else(|| anyhow!("heart-beat {s:?} is not x,y"))?;
    Ok((
        a.trim()
            .parse()
            .with_context(|| format!("heart-beat {s:?}"))?,
        b.trim()
            .parse()
            .with_context(|| format!("heart-beat {s:?}"))?,
    ))
}

/// How a session ended after [`disconnect`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// The server sent the RECEIPT for DISCONNECT.
    Receipt,
    /// The server closed the connection after DISCONNECT without a RECEIPT
    /// (RabbitMQ's STOMP plugin does this).
    ServerClose,
    /// Neither within the wait, or the DISCONNECT could not be sent.
    Failed,
}

impl Closed {
    pub fn is_clean(self) -> bool {
        self != Closed::Failed
    }
}

/// Sends DISCONNECT with a receipt and waits up to `wait` for the RECEIPT
/// or for the server to close the connection, then closes the WebSocket.
pub async fn disconnect(session: &mut Session, wait: Duration) -> Closed {
    let frame = Frame::new(Command::Disconnect).with_header("receipt", "bye");
    if session.writer.send(&frame).await.is_err() {
        return Closed::Failed;
    }
    let outcome = tokio::time::timeout(wait, async {
        loop {
            match session.reader.next_frame().await {
                Ok(Some(f))
                    if f.command == Command::Receipt && f.header("receipt-id") == Some("bye") =>
                {
                    return Closed::Receipt
                }
                Ok(Some(_)) => {}
                Ok(None) => return Closed::ServerClose,
                Err(_) => return Closed::Failed,
            }
        }
    })
    .await
    .unwrap_or(Closed::Failed);
    let _ = tokio::time::timeout(Duration::from_secs(1), session.writer.close()).await;
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heart_beat_header() -> Result<()> {
        assert_eq!(parse_heart_beat("10000, 0")?, (10000, 0));
        assert!(parse_heart_beat("10000").is_err());
        assert!(parse_heart_beat("a,b").is_err());
        Ok(())
    }
}
