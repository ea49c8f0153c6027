//! A STOMP-over-WebSocket test client on the `relay-core` codec.
//!
//! Frames are decoded incrementally across WebSocket messages, so a frame
//! split over several messages, or several frames in one message, are read
//! the same way a browser library would read them. Heart-beats are counted,
//! not returned.

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use relay_core::codec::encode_to_bytes;
use relay_core::{Command, Decoder, Frame, Item, Limits, Version};
use std::collections::VecDeque;
use std::fmt::Write as _;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// All STOMP subprotocols, newest first.
pub const ALL_SUBPROTOCOLS: [&str; 3] = ["v12.stomp", "v11.stomp", "v10.stomp"];

/// A frame and the kind of WebSocket message that completed it.
#[derive(Debug, Clone)]
pub struct Received {
    pub frame: Frame,
    /// `true` when it arrived in a binary WebSocket message.
    pub binary: bool,
}

/// How the connection ended.
#[derive(Debug, Clone, Default)]
pub struct Closed {
    /// WebSocket close code, when a close frame was received.
    pub code: Option<u16>,
    /// Close reason, or the transport error that ended the stream.
    pub reason: String,
    /// Frames received (and not yet read) before the close.
    pub frames: Vec<Frame>,
}

/// One WebSocket connection speaking STOMP.
#[derive(Debug)]
pub struct StompClient {
    ws: Ws,
    subprotocol: Option<String>,
    version: Version,
    decoder: Decoder,
    queue: VecDeque<Received>,
    closed: Option<Closed>,
    heartbeats: usize,
    receipts: u64,
}

impl StompClient {
    /// Opens the WebSocket offering `subprotocols` (none when empty).
    pub async fn connect_ws(url: &str, subprotocols: &[&str]) -> Result<StompClient> {
        StompClient::connect_ws_with_headers(url, subprotocols, &[]).await
    }

    /// [`connect_ws`](Self::connect_ws) with extra handshake headers (for
    /// example `Origin`).
    pub async fn connect_ws_with_headers(
        url: &str,
        subprotocols: &[&str],
        headers: &[(&'static str, &str)],
    ) -> Result<StompClient> {
        let mut req = url.into_client_request().context("WebSocket request")?;
        for (name, value) in headers {
            req.headers_mut()
                .insert(*name, HeaderValue::from_str(value)?);
        }
        if !subprotocols.is_empty() {
            req.headers_mut().insert(
                "Sec-WebSocket-Protocol",
                HeaderValue::from_str(&subprotocols.join(", "))?,
            );
        }
        let (ws, resp) = tokio::time::timeout(crate::WAIT, tokio_tungstenite::connect_async(req))
            .await
            .map_err(|_| anyhow!("WebSocket handshake with {url} timed out"))?
            .with_context(|| format!("WebSocket handshake with {url}"))?;
        let subprotocol = resp
            .headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let version = subprotocol
            .as_deref()
            .and_then(Version::from_subprotocol)
            .unwrap_or(Version::V1_2);
        let limits = Limits {
            max_frame_size: 16 * 1024 * 1024,
            max_headers: 1024,
            max_header_line: 1024 * 1024,
        };
        let mut decoder = Decoder::new(limits);
        decoder.set_version(version);
        Ok(StompClient {
            ws,
            subprotocol,
            version,
            decoder,
            queue: VecDeque::new(),
            closed: None,
            heartbeats: 0,
            receipts: 0,
        })
    }

    /// WebSocket with all subprotocols, then a STOMP 1.2 CONNECT without
    /// heart-beats; fails unless CONNECTED comes back.
    pub async fn open(url: &str) -> Result<StompClient> {
        let mut c = StompClient::connect_ws(url, &ALL_SUBPROTOCOLS).await?;
        c.connect_stomp(Version::V1_2, None, None, (0, 0)).await?;
        Ok(c)
    }

    /// A CONNECT frame: `accept-version` = `version`, `host:/`, optional
    /// credentials, `heart-beat:cx,cy`.
    pub fn connect_frame(
        version: Version,
        login: Option<&str>,
        passcode: Option<&str>,
        heart_beat: (u64, u64),
    ) -> Frame {
        let mut f = Frame::new(Command::Connect)
            .with_header("accept-version", version.as_str())
            .with_header("host", "/");
        if let Some(l) = login {
            f = f.with_header("login", l);
        }
        if let Some(p) = passcode {
            f = f.with_header("passcode", p);
        }
        f.with_header("heart-beat", format!("{},{}", heart_beat.0, heart_beat.1))
    }

    /// Sends CONNECT and returns the CONNECTED frame (an ERROR is an error).
    /// Switches the codec to the negotiated version.
    pub async fn connect_stomp(
        &mut self,
        version: Version,
        login: Option<&str>,
        passcode: Option<&str>,
        heart_beat: (u64, u64),
    ) -> Result<Frame> {
        self.send_frame(&Self::connect_frame(version, login, passcode, heart_beat))
            .await?;
        self.read_connected().await
    }

    /// Reads the answer to a CONNECT already sent; fails unless CONNECTED.
    pub async fn read_connected(&mut self) -> Result<Frame> {
        let r = self
            .recv(crate::WAIT)
            .await
            .context("waiting for CONNECTED")?;
        if r.frame.command != Command::Connected {
            bail!("expected CONNECTED, got {}", show(&r.frame));
        }
        if let Some(v) = r.frame.header("version").and_then(Version::parse) {
            self.set_version(v);
        } else {
            self.set_version(Version::V1_0);
        }
        Ok(r.frame)
    }

    /// The negotiated WebSocket subprotocol.
    pub fn subprotocol(&self) -> Option<&str> {
        self.subprotocol.as_deref()
    }

    /// The STOMP version used to encode and decode.
    pub fn version(&self) -> Version {
        self.version
    }

    pub fn set_version(&mut self, version: Version) {
        self.version = version;
        self.decoder.set_version(version);
    }

    /// Heart-beats (bare EOLs) received so far.
    pub fn heartbeats(&self) -> usize {
        self.heartbeats
    }

    /// The wire form of `frame` for the current version.
    pub fn encode(&self, frame: &Frame) -> Bytes {
        encode_to_bytes(frame, self.version)
    }

    /// Sends `frame` in a text message (binary if it is not UTF-8).
    pub async fn send_frame(&mut self, frame: &Frame) -> Result<()> {
        let bytes = self.encode(frame);
        match String::from_utf8(bytes.to_vec()) {
            Ok(text) => self.send_text(text).await,
            Err(_) => self.send_binary(bytes).await,
        }
    }

    /// Sends `frame` in a binary message.
    pub async fn send_frame_binary(&mut self, frame: &Frame) -> Result<()> {
        let bytes = self.encode(frame);
        self.send_binary(bytes).await
    }

    /// Sends all `frames` concatenated in one text message.
    pub async fn send_frames_in_one_message(&mut self, frames: &[Frame]) -> Result<()> {
        let mut all = Vec::new();
        for f in frames {
            all.extend_from_slice(&self.encode(f));
        }
        let text = String::from_utf8(all).context("frames must be UTF-8 for a text message")?;
        self.send_text(text).await
    }

    /// A raw text WebSocket message.
    pub async fn send_text(&mut self, text: impl Into<String>) -> Result<()> {
        self.ws
            .send(Message::text(text.into()))
            .await
            .context("sending a text message")
    }

    /// A raw binary WebSocket message.
    pub async fn send_binary(&mut self, data: impl Into<Bytes>) -> Result<()> {
        self.ws
            .send(Message::binary(data.into()))
            .await
            .context("sending a binary message")
    }

    /// A heart-beat (one EOL) in a text message.
    pub async fn send_heartbeat(&mut self) -> Result<()> {
        self.send_text("\n").await
    }

    /// The next frame, or `None` when `timeout` passes first. An error when
    /// the connection is closed (or closes) before a frame arrives.
    pub async fn recv_opt(&mut self, timeout: Duration) -> Result<Option<Received>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(r) = self.queue.pop_front() {
                return Ok(Some(r));
            }
            if let Some(c) = &self.closed {
                bail!(
                    "connection closed (close code {:?}, reason {:?})",
                    c.code,
                    c.reason
                );
            }
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return Ok(None),
                Ok(msg) => self.handle(msg)?,
            }
        }
    }

    /// The next frame within `timeout`.
    pub async fn recv(&mut self, timeout: Duration) -> Result<Received> {
        self.recv_opt(timeout)
            .await?
            .ok_or_else(|| anyhow!("no frame within {timeout:?}"))
    }

    /// The next frame within `timeout`; it must be `command`.
    pub async fn expect(&mut self, command: Command, timeout: Duration) -> Result<Frame> {
        let r = self
            .recv(timeout)
            .await
            .with_context(|| format!("waiting for {command}"))?;
        if r.frame.command != command {
            bail!("expected {command}, got {}", show(&r.frame));
        }
        Ok(r.frame)
    }

    /// The first frame matching `pred` within `timeout`; other frames stay
    /// queued, in order, for later reads. An ERROR that does not match fails
    /// at once.
    pub async fn recv_where(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Frame) -> bool,
    ) -> Result<Received> {
        let deadline = Instant::now() + timeout;
        let mut stash: Vec<Received> = Vec::new();
        let result = loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match self.recv_opt(remaining).await {
                Ok(Some(r)) if pred(&r.frame) => break Ok(r),
                Ok(Some(r)) if r.frame.command == Command::Error => {
                    break Err(anyhow!(
                        "ERROR while waiting for {what}: {}",
                        show(&r.frame)
                    ))
                }
                Ok(Some(r)) => stash.push(r),
                Ok(None) => {
                    break Err(anyhow!(
                        "timed out after {timeout:?} waiting for {what}; {} other frame(s) seen{}",
                        stash.len(),
                        stash.iter().fold(String::new(), |mut s, r| {
                            let _ = write!(s, "\n  {}", show(&r.frame));
                            s
                        })
                    ))
                }
                Err(e) => break Err(e.context(format!("waiting for {what}"))),
            }
        };
        for r in stash.into_iter().rev() {
            self.queue.push_front(r);
        }
        result
    }

    /// Waits for the RECEIPT with `receipt-id: id`.
    pub async fn await_receipt(&mut self, id: &str) -> Result<Frame> {
        let r = self
            .recv_where(&format!("RECEIPT {id}"), crate::WAIT, |f| {
                f.command == Command::Receipt && f.header("receipt-id") == Some(id)
            })
            .await?;
        Ok(r.frame)
    }

    /// A receipt id unique within this client.
    pub fn next_receipt_id(&mut self, what: &str) -> String {
        self.receipts += 1;
        format!("{what}-{}", self.receipts)
    }

    /// Sends `frame` with a fresh `receipt` header and waits for its RECEIPT.
    pub async fn send_with_receipt(&mut self, frame: Frame) -> Result<Frame> {
        let id = self.next_receipt_id(&frame.command.as_str().to_ascii_lowercase());
        let frame = frame.with_header("receipt", id.clone());
        self.send_frame(&frame).await?;
        self.await_receipt(&id).await
    }

    /// SUBSCRIBE `destination` with `id` (and `extra` headers) and wait for
    /// the RECEIPT, so messages sent afterwards are routed to it.
    pub async fn subscribe(
        &mut self,
        destination: &str,
        id: &str,
        extra: &[(&str, &str)],
    ) -> Result<()> {
        let mut f = Frame::new(Command::Subscribe)
            .with_header("id", id)
            .with_header("destination", destination);
        for (k, v) in extra {
            f = f.with_header(*k, *v);
        }
        self.send_with_receipt(f)
            .await
            .with_context(|| format!("SUBSCRIBE {destination}"))?;
        Ok(())
    }

    /// SEND `body` (text) to `destination` without a receipt.
    pub async fn send_text_to(&mut self, destination: &str, body: &str) -> Result<()> {
        self.send_frame(&send(destination, body)).await
    }

    /// The next `n` frames, which must all be MESSAGEs.
    pub async fn recv_messages(&mut self, n: usize, timeout: Duration) -> Result<Vec<Frame>> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let r = self
                .recv(remaining)
                .await
                .with_context(|| format!("after {} of {n} MESSAGEs", out.len()))?;
            if r.frame.command != Command::Message {
                bail!(
                    "expected MESSAGE ({} of {n} so far), got {}",
                    out.len(),
                    show(&r.frame)
                );
            }
            out.push(r.frame);
        }
        Ok(out)
    }

    /// DISCONNECT with a receipt, wait for it, then close the WebSocket.
    pub async fn disconnect(mut self) -> Result<()> {
        let id = self.next_receipt_id("disconnect");
        self.send_frame(&Frame::new(Command::Disconnect).with_header("receipt", id.clone()))
            .await?;
        self.await_receipt(&id).await?;
        let _ = self.ws.close(None).await;
        Ok(())
    }

    /// Reads until the connection closes (within `timeout`); frames seen on
    /// the way are in [`Closed::frames`].
    pub async fn expect_close(&mut self, timeout: Duration) -> Result<Closed> {
        let deadline = Instant::now() + timeout;
        let mut frames: Vec<Frame> = self.queue.drain(..).map(|r| r.frame).collect();
        loop {
            if let Some(c) = &self.closed {
                let mut c = c.clone();
                frames.extend(self.queue.drain(..).map(|r| r.frame));
                c.frames = frames;
                return Ok(c);
            }
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => bail!(
                    "connection still open after {timeout:?}; frames seen: [{}]",
                    frames.iter().map(show).collect::<Vec<_>>().join(", ")
                ),
                Ok(msg) => {
                    self.handle(msg)?;
                    frames.extend(self.queue.drain(..).map(|r| r.frame));
                }
            }
        }
    }

    /// Closes the WebSocket with a close handshake.
    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }

    fn handle(
        &mut self,
        msg: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
    ) -> Result<()> {
        match msg {
            None => self.set_closed(None, "stream ended".into()),
            Some(Err(e)) => self.set_closed(None, format!("transport: {e}")),
            Some(Ok(Message::Text(t))) => self.feed(t.as_bytes(), false)?,
            Some(Ok(Message::Binary(b))) => self.feed(&b, true)?,
            Some(Ok(Message::Close(cf))) => match cf {
                Some(cf) => self.set_closed(Some(u16::from(cf.code)), cf.reason.to_string()),
                None => self.set_closed(None, "close frame without code".into()),
            },
            Some(Ok(_)) => {}
        }
        Ok(())
    }

    fn set_closed(&mut self, code: Option<u16>, reason: String) {
        if self.closed.is_none() {
            self.closed = Some(Closed {
                code,
                reason,
                frames: Vec::new(),
            });
        }
    }

    fn feed(&mut self, data: &[u8], binary: bool) -> Result<()> {
        self.decoder.extend(data);
        while let Some(item) = self
            .decoder
            .decode()
            .map_err(|e| anyhow!("undecodable data from the gateway: {e}"))?
        {
            match item {
                Item::Frame(frame) => self.queue.push_back(Received { frame, binary }),
                Item::Heartbeat => self.heartbeats += 1,
            }
        }
        Ok(())
    }
}

/// A SEND frame with a text body.
pub fn send(destination: &str, body: &str) -> Frame {
    Frame::new(Command::Send)
        .with_header("destination", destination)
        .with_header("content-type", "text/plain")
        .with_body(Bytes::from(body.to_owned()))
}

/// One line describing a frame (headers, start of the body) for messages.
pub fn show(frame: &Frame) -> String {
    let mut s = frame.command.as_str().to_owned();
    for (k, v) in &frame.headers {
        let _ = write!(s, " {k}:{v:?}");
    }
    if !frame.body.is_empty() {
        let body = String::from_utf8_lossy(&frame.body);
        let cut: String = body.chars().take(300).collect();
        let _ = write!(s, " body({} bytes):{cut:?}", frame.body.len());
    }
    s
}

/// The body as (lossy) UTF-8.
pub fn body_text(frame: &Frame) -> String {
    String::from_utf8_lossy(&frame.body).into_owned()
}

/// An ERROR frame's `message` header and body, lower-cased, for matching.
pub fn error_text(frame: &Frame) -> String {
    format!(
        "{} {}",
        frame.header("message").unwrap_or_default(),
        body_text(frame)
    )
    .to_lowercase()
}
