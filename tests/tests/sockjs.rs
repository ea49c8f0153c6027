//! SockJS endpoints against the real binary: every protocol detail clients
//! and proxies trip on (the SockJS protocol's test suite, sockjs-protocol,
//! is the reference), on the protocol's test services (`sockjs.test_services`)
//! and on a STOMP endpoint declared with `sockjs = true`.
#![allow(clippy::unwrap_used)]

use anyhow::{bail, ensure, Context, Result};
use e2e::{unique, Gateway, GatewayBuilder, WAIT};
use futures_util::{SinkExt, StreamExt};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message;

const NO_CACHE: &str = "no-store, no-cache, no-transform, must-revalidate, max-age=0";

/// A gateway with the SockJS test services and a STOMP SockJS endpoint.
fn builder(name: &str) -> GatewayBuilder {
    Gateway::builder(name)
        .set(
            "server",
            "endpoints",
            r#"[ { path = "/ws" }, { path = "/stomp", sockjs = true } ]"#,
        )
        .set("sockjs", "test_services", "true")
}

async fn start(name: &str) -> Gateway {
    builder(name).start().await
}

fn addr(gw: &Gateway) -> String {
    // ws://127.0.0.1:<port>/ws
    gw.ws_url()
        .trim_start_matches("ws://")
        .trim_end_matches("/ws")
        .to_owned()
}

fn sid() -> String {
    unique("s").replace('.', "-")
}

/// A response head.
#[derive(Debug)]
struct Head {
    status: u16,
    version: String,
    headers: Vec<(String, String)>,
}

impl Head {
    fn get(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn chunked(&self) -> bool {
        self.get("transfer-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    }
}

/// One HTTP exchange on its own connection, read chunk by chunk.
struct Exchange {
    head: Head,
    r: BufReader<TcpStream>,
    left: Option<usize>,
}

impl Exchange {
    async fn open(
        addr: &str,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        http10: bool,
    ) -> Result<Exchange> {
        let mut s = TcpStream::connect(addr).await?;
        let v = if http10 { "1.0" } else { "1.1" };
        let mut req = format!("{method} {path} HTTP/{v}\r\nHost: {addr}\r\n");
        for (k, val) in headers {
            req.push_str(&format!("{k}: {val}\r\n"));
        }
        if method == "POST" || !body.is_empty() {
            req.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes()).await?;
        s.write_all(body).await?;
        let mut r = BufReader::new(s);
        let mut line = String::new();
        timeout(WAIT, r.read_line(&mut line)).await??;
        let mut parts = line.split_whitespace();
        let version = parts.next().unwrap_or_default().to_owned();
        let status: u16 = parts
            .next()
            .context("status line")?
            .parse()
            .with_context(|| format!("status line {line:?}"))?;
        let mut headers = Vec::new();
        loop {
            line.clear();
            timeout(WAIT, r.read_line(&mut line)).await??;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            let (k, v) = l.split_once(':').context("header line")?;
            headers.push((k.trim().to_owned(), v.trim().to_owned()));
        }
        let head = Head {
            status,
            version,
            headers,
        };
        let left = head.get("content-length").and_then(|v| v.parse().ok());
        Ok(Exchange { head, r, left })
    }

    /// The next HTTP chunk (chunked responses), the rest of a sized body,
    /// or what arrives next of a close-delimited one; `None` at the end.
    async fn chunk(&mut self) -> Result<Option<String>> {
        timeout(WAIT, self.chunk_inner())
            .await
            .context("waiting for a chunk")?
    }

    async fn chunk_inner(&mut self) -> Result<Option<String>> {
        if self.head.status == 304 || self.head.status == 204 || self.head.status == 101 {
            return Ok(None);
        }
        if self.head.chunked() {
            let mut line = String::new();
            self.r.read_line(&mut line).await?;
            let n = usize::from_str_radix(line.trim(), 16)
                .with_context(|| format!("chunk size {line:?}"))?;
            let mut buf = vec![0; n + 2];
            self.r.read_exact(&mut buf).await?;
            buf.truncate(n);
            return Ok((n > 0).then(|| String::from_utf8_lossy(&buf).into_owned()));
        }
        if let Some(n) = self.left {
            if n == 0 {
                return Ok(None);
            }
            let mut buf = vec![0; n];
            self.r.read_exact(&mut buf).await?;
            self.left = Some(0);
            return Ok(Some(String::from_utf8_lossy(&buf).into_owned()));
        }
        let mut buf = vec![0; 64 * 1024];
        let n = self.r.read(&mut buf).await?;
        Ok((n > 0).then(|| String::from_utf8_lossy(&buf[..n]).into_owned()))
    }

    /// The whole body.
    async fn body(&mut self) -> Result<String> {
        let mut out = String::new();
        while let Some(c) = self.chunk().await? {
            out.push_str(&c);
        }
        Ok(out)
    }
}

/// A complete request/response.
async fn req(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<(Head, String)> {
    let mut e = Exchange::open(addr, method, path, headers, body.as_bytes(), false).await?;
    let b = e.body().await?;
    Ok((e.head, b))
}

async fn get(addr: &str, path: &str) -> Result<(Head, String)> {
    req(addr, "GET", path, &[], "").await
}

async fn post(addr: &str, path: &str, body: &str) -> Result<(Head, String)> {
    req(addr, "POST", path, &[], body).await
}

fn assert_not_cached(h: &Head) {
    assert_eq!(h.get("cache-control"), Some(NO_CACHE), "{h:?}");
    assert_eq!(h.get("expires"), None);
    assert_eq!(h.get("last-modified"), None);
}

fn assert_cors(h: &Head, origin: Option<&str>) {
    match origin {
        Some(o) => {
            assert_eq!(h.get("access-control-allow-origin"), Some(o), "{h:?}");
            assert_eq!(
                h.get("access-control-allow-credentials"),
                Some("true"),
                "{h:?}"
            );
        }
        None => {
            assert_eq!(h.get("access-control-allow-origin"), Some("*"), "{h:?}");
            assert_eq!(h.get("access-control-allow-credentials"), None);
        }
    }
}

#[tokio::test]
async fn greeting_and_not_found() -> Result<()> {
    let gw = start("sockjs_greeting").await;
    let a = addr(&gw);
    for path in ["/echo", "/echo/", "/stomp", "/stomp/"] {
        let (h, b) = get(&a, path).await?;
        assert_eq!(h.status, 200, "{path}");
        assert_eq!(h.get("content-type"), Some("text/plain;charset=UTF-8"));
        assert_eq!(b, "Welcome to SockJS!\n");
        assert_eq!(h.get("set-cookie"), None);
    }
    for suffix in ["/a", "/a.html", "//", "///", "/a/a", "/a/a/", "/a/"] {
        let (h, _) = get(&a, &format!("/echo{suffix}")).await?;
        assert_eq!(h.status, 404, "{suffix}");
    }
    for suffix in ["//", "/a./a", "/a/a.", "/./.", "/", "///"] {
        for m in ["GET", "POST"] {
            let (h, _) = req(&a, m, &format!("/echo{suffix}/xhr"), &[], "").await?;
            assert_eq!(h.status, 404, "{m} {suffix}/xhr");
        }
    }
    Ok(())
}

#[tokio::test]
async fn info_options_and_cors() -> Result<()> {
    let gw = start("sockjs_info").await;
    let a = addr(&gw);
    let (h, b) = req(&a, "GET", "/echo/info", &[("Origin", "test")], "").await?;
    assert_eq!(h.status, 200);
    assert_eq!(
        h.get("content-type"),
        Some("application/json;charset=UTF-8")
    );
    assert_not_cached(&h);
    assert_cors(&h, Some("test"));
    assert_eq!(h.get("set-cookie"), None);
    let info: serde_json::Value = serde_json::from_str(&b)?;
    assert_eq!(info["websocket"], true);
    assert_eq!(info["cookie_needed"], false);
    assert_eq!(info["origins"], serde_json::json!(["*:*"]));
    let e1 = info["entropy"].as_u64().context("entropy is a number")?;
    let (_, b2) = get(&a, "/echo/info").await?;
    let info2: serde_json::Value = serde_json::from_str(&b2)?;
    assert_ne!(info2["entropy"].as_u64(), Some(e1), "entropy changes");

    // The STOMP endpoint answers /info too (the issue: `/portfolio/info` was a 404).
    let (h, b) = get(&a, "/stomp/info").await?;
    assert_eq!(h.status, 200, "{b}");
    assert_cors(&h, None);

    let (_, b) = get(&a, "/disabled_websocket_echo/info").await?;
    let v: serde_json::Value = serde_json::from_str(&b)?;
    assert_eq!(v["websocket"], false);
    let (h, b) = get(&a, "/cookie_needed_echo/info").await?;
    let v: serde_json::Value = serde_json::from_str(&b)?;
    assert_eq!(v["cookie_needed"], true);
    assert_eq!(h.get("set-cookie"), None);

    // OPTIONS: 204, cacheable for a year, CORS; the origin `null` echoed.
    for (path, methods) in [
        ("/echo/info", "OPTIONS, GET"),
        ("/echo/abc/abc/xhr", "OPTIONS, POST"),
        ("/echo/abc/abc/xhr_send", "OPTIONS, POST"),
        ("/echo/abc/abc/xhr_streaming", "OPTIONS, POST"),
    ] {
        for origin in ["test", "null"] {
            let (h, b) = req(
                &a,
                "OPTIONS",
                path,
                &[
                    ("Origin", origin),
                    ("Access-Control-Request-Method", methods),
                ],
                "",
            )
            .await?;
            assert_eq!(h.status, 204, "{path}");
            assert!(b.is_empty());
            assert_eq!(h.get("cache-control"), Some("public, max-age=31536000"));
            assert!(
                h.get("expires").is_some_and(|e| e.ends_with(" GMT")),
                "{h:?}"
            );
            assert_eq!(h.get("access-control-max-age"), Some("31536000"));
            assert_eq!(h.get("access-control-allow-methods"), Some(methods));
            assert_cors(&h, Some(origin));
        }
    }
    // Requested headers are echoed, only when there are some.
    let (h, _) = req(
        &a,
        "OPTIONS",
        "/echo/000/x/xhr",
        &[
            ("Origin", "test"),
            ("Access-Control-Request-Method", "POST"),
            ("Access-Control-Request-Headers", "a, b, c"),
        ],
        "",
    )
    .await?;
    assert_eq!(h.get("access-control-allow-headers"), Some("a, b, c"));
    let (h, _) = req(
        &a,
        "OPTIONS",
        "/echo/000/x/xhr",
        &[
            ("Origin", "test"),
            ("Access-Control-Request-Method", "POST"),
        ],
        "",
    )
    .await?;
    assert_eq!(h.get("access-control-allow-headers"), None);
    Ok(())
}

#[tokio::test]
async fn iframe_page_with_etag_and_304() -> Result<()> {
    let gw = start("sockjs_iframe").await;
    let a = addr(&gw);
    let mut etag = None;
    for suffix in [
        "/iframe.html",
        "/iframe-a.html",
        "/iframe-.html",
        "/iframe-0.1.2.html",
        "/iframe-0.1.2abc-dirty.2144.html",
        "/iframe-a.html?t=1234",
    ] {
        let (h, b) = get(&a, &format!("/echo{suffix}")).await?;
        assert_eq!(h.status, 200, "{suffix}");
        assert_eq!(h.get("content-type"), Some("text/html;charset=UTF-8"));
        assert_eq!(h.get("cache-control"), Some("public, max-age=31536000"));
        assert!(h.get("expires").is_some());
        assert!(h.get("last-modified").is_none());
        assert!(b.starts_with("<!DOCTYPE html>"), "{b}");
        assert!(b.contains("SockJS.bootstrap_iframe();"));
        assert!(b.contains("<script src=\"/"), "a local sockjs_url: {b}");
        let e = h.get("etag").context("ETag")?.to_owned();
        assert!(etag.is_none() || etag.as_deref() == Some(e.as_str()));
        etag = Some(e);
    }
    for suffix in [
        "/iframe.htm",
        "/iframe",
        "/IFRAME.HTML",
        "/IFRAME",
        "/iframe.HTML",
        "/iframe.xml",
        "/iframe-/.html",
    ] {
        assert_eq!(
            get(&a, &format!("/echo{suffix}")).await?.0.status,
            404,
            "{suffix}"
        );
    }
    let etag = etag.unwrap();
    let (h, b) = req(
        &a,
        "GET",
        "/echo/iframe.html",
        &[("If-None-Match", &etag)],
        "",
    )
    .await?;
    assert_eq!(h.status, 304);
    assert_eq!(h.get("content-type"), None);
    assert!(b.is_empty());
    Ok(())
}

#[tokio::test]
async fn xhr_polling_session_send_and_errors() -> Result<()> {
    let gw = start("sockjs_xhr_polling").await;
    let a = addr(&gw);
    let url = format!("/echo/000/{}", sid());
    let (h, b) = req(&a, "POST", &format!("{url}/xhr"), &[("Origin", "test")], "").await?;
    assert_eq!((h.status, b.as_str()), (200, "o\n"));
    assert_eq!(
        h.get("content-type"),
        Some("application/javascript;charset=UTF-8")
    );
    assert_cors(&h, Some("test"));
    assert_not_cached(&h);

    let (h, b) = req(
        &a,
        "POST",
        &format!("{url}/xhr_send"),
        &[("Origin", "test")],
        "[\"x\"]",
    )
    .await?;
    assert_eq!(h.status, 204);
    assert!(b.is_empty());
    assert_eq!(h.get("content-type"), Some("text/plain;charset=UTF-8"));
    assert_cors(&h, Some("test"));
    assert_not_cached(&h);
    // The server id is ignored.
    let other = url.replace("/000/", "/999/");
    assert_eq!(post(&a, &format!("{other}/xhr"), "").await?.1, "a[\"x\"]\n");

    // Errors: broken JSON and no payload are 500s; an unknown session is 404.
    let (h, b) = post(&a, &format!("{url}/xhr_send"), "[\"x").await?;
    assert_eq!(h.status, 500);
    assert!(b.contains("Broken JSON encoding."), "{b}");
    let (h, b) = post(&a, &format!("{url}/xhr_send"), "").await?;
    assert_eq!(h.status, 500);
    assert!(b.contains("Payload expected."), "{b}");
    let (h, _) = post(&a, &format!("/echo/000/{}/xhr_send", sid()), "[\"x\"]").await?;
    assert_eq!(h.status, 404);

    // Any content type; empty frames are fine.
    for ct in ["text/plain", "T", "application/json", "application/xml", ""] {
        let (h, _) = req(
            &a,
            "POST",
            &format!("{url}/xhr_send"),
            &[("Content-Type", ct)],
            "[\"a\"]",
        )
        .await?;
        assert_eq!(h.status, 204, "{ct}");
    }
    assert_eq!(
        post(&a, &format!("{url}/xhr_send"), "[]").await?.0.status,
        204
    );
    assert_eq!(
        post(&a, &format!("{url}/xhr"), "").await?.1,
        "a[\"a\",\"a\",\"a\",\"a\",\"a\"]\n"
    );
    Ok(())
}

#[tokio::test]
async fn second_receiver_gets_2010_and_an_aborted_poll_gets_1002() -> Result<()> {
    let gw = start("sockjs_2010_1002").await;
    let a = addr(&gw);
    let url = format!("/echo/000/{}", sid());
    assert_eq!(post(&a, &format!("{url}/xhr"), "").await?.1, "o\n");
    // A poll waits (nothing queued); a second one is refused.
    let first = Exchange::open(&a, "POST", &format!("{url}/xhr"), &[], b"", false).await?;
    assert_eq!(first.head.status, 200);
    let (h, b) = post(&a, &format!("{url}/xhr"), "").await?;
    assert_eq!(h.status, 200);
    assert_eq!(b, "c[2010,\"Another connection still open\"]\n");
    // Cutting the waiting poll closes the session with 1002.
    drop(first);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (_, b) = post(&a, &format!("{url}/xhr"), "").await?;
        if b == "c[1002,\"Connection interrupted\"]\n" {
            break;
        }
        ensure!(
            b == "c[2010,\"Another connection still open\"]\n",
            "unexpected {b:?}"
        );
        ensure!(tokio::time::Instant::now() < deadline, "no 1002");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Streaming: the same rules.
    let url = format!("/echo/000/{}", sid());
    let mut r1 =
        Exchange::open(&a, "POST", &format!("{url}/xhr_streaming"), &[], b"", false).await?;
    r1.chunk().await?;
    assert_eq!(r1.chunk().await?.as_deref(), Some("o\n"));
    let mut r2 =
        Exchange::open(&a, "POST", &format!("{url}/xhr_streaming"), &[], b"", false).await?;
    r2.chunk().await?;
    assert_eq!(
        r2.chunk().await?.as_deref(),
        Some("c[2010,\"Another connection still open\"]\n")
    );
    assert_eq!(r2.chunk().await?, None, "the refused stream ends");
    Ok(())
}

#[tokio::test]
async fn close_service_serves_the_close_frame_until_timeout() -> Result<()> {
    let gw = start("sockjs_close").await;
    let a = addr(&gw);
    let url = format!("/close/000/{}", sid());
    assert_eq!(post(&a, &format!("{url}/xhr"), "").await?.1, "o\n");
    for _ in 0..2 {
        let (h, b) = post(&a, &format!("{url}/xhr"), "").await?;
        assert_eq!(h.status, 200);
        assert_eq!(b, "c[3000,\"Go away!\"]\n");
    }
    // Streaming: o, then the close frame, then the stream ends; a new
    // stream gets the close frame at once.
    let url = format!("/close/000/{}", sid());
    let mut r1 =
        Exchange::open(&a, "POST", &format!("{url}/xhr_streaming"), &[], b"", false).await?;
    r1.chunk().await?;
    assert_eq!(r1.chunk().await?.as_deref(), Some("o\n"));
    assert_eq!(r1.chunk().await?.as_deref(), Some("c[3000,\"Go away!\"]\n"));
    assert_eq!(r1.chunk().await?, None);
    let mut r2 =
        Exchange::open(&a, "POST", &format!("{url}/xhr_streaming"), &[], b"", false).await?;
    r2.chunk().await?;
    assert_eq!(r2.chunk().await?.as_deref(), Some("c[3000,\"Go away!\"]\n"));
    assert_eq!(r2.chunk().await?, None);
    // jsonp too.
    let url = format!("/close/000/{}", sid());
    assert_eq!(
        get(&a, &format!("{url}/jsonp?c=x")).await?.1,
        "/**/x(\"o\");\r\n"
    );
    assert_eq!(
        get(&a, &format!("{url}/jsonp?c=x")).await?.1,
        "/**/x(\"c[3000,\\\"Go away!\\\"]\");\r\n"
    );
    Ok(())
}

async fn ws(
    url: &str,
) -> Result<tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>> {
    let (ws, _) = tokio_tungstenite::connect_async(url).await?;
    Ok(ws)
}

async fn ws_recv<S>(ws: &mut S) -> Result<Option<Message>>
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    match timeout(WAIT, ws.next()).await? {
        Some(Ok(m)) => Ok(Some(m)),
        Some(Err(_)) | None => Ok(None),
    }
}

#[tokio::test]
async fn websocket_transports() -> Result<()> {
    let gw = start("sockjs_websocket").await;
    let a = addr(&gw);
    // Framed: o, echo, empty messages ignored.
    let url = format!("ws://{a}/echo/000/{}/websocket", sid());
    let mut w = ws(&url).await?;
    assert_eq!(ws_recv(&mut w).await?, Some(Message::text("o")));
    w.send(Message::text("")).await?;
    w.send(Message::text("[]")).await?;
    w.send(Message::text("[\"a\"]")).await?;
    assert_eq!(ws_recv(&mut w).await?, Some(Message::text("a[\"a\"]")));
    // The same session id may be reused on another WebSocket at once.
    let mut w2 = ws(&url).await?;
    assert_eq!(ws_recv(&mut w2).await?, Some(Message::text("o")));
    w2.send(Message::text("\"b\"")).await?;
    assert_eq!(ws_recv(&mut w2).await?, Some(Message::text("a[\"b\"]")));
    // Broken JSON drops the connection.
    w.send(Message::text("[\"a")).await?;
    let mut closed = false;
    while let Some(m) = ws_recv(&mut w).await? {
        if m.is_close() {
            closed = true;
            break;
        }
    }
    let _ = closed;
    assert!(ws_recv(&mut w).await?.is_none() || closed);

    // The close service: o, c[3000,"Go away!"], then the socket closes.
    let mut w = ws(&format!("ws://{a}/close/000/{}/websocket", sid())).await?;
    assert_eq!(ws_recv(&mut w).await?, Some(Message::text("o")));
    assert_eq!(
        ws_recv(&mut w).await?,
        Some(Message::text("c[3000,\"Go away!\"]"))
    );
    let end = ws_recv(&mut w).await?;
    assert!(
        end.is_none() || end.as_ref().is_some_and(Message::is_close),
        "{end:?}"
    );

    // Raw /websocket: no framing; the close service closes with its reason.
    let mut w = ws(&format!("ws://{a}/echo/websocket")).await?;
    w.send(Message::text("Hello world!\u{ffff}")).await?;
    assert_eq!(
        ws_recv(&mut w).await?,
        Some(Message::text("Hello world!\u{ffff}"))
    );
    let mut w = ws(&format!("ws://{a}/close/websocket")).await?;
    match ws_recv(&mut w).await? {
        Some(Message::Close(Some(f))) => {
            assert_eq!(u16::from(f.code), 3000);
            assert_eq!(f.reason.as_str(), "Go away!");
        }
        other => bail!("expected a close frame, got {other:?}"),
    }

    // HTTP errors on the websocket URL.
    for h in [
        vec![("Upgrade", "WebSocket"), ("Connection", "Upgrade")],
        vec![],
    ] {
        let (head, b) = req(&a, "POST", "/echo/0/0/websocket", &h, "").await?;
        assert_eq!(head.status, 405);
        assert!(head.get("allow").is_some_and(|v| v.contains("GET")));
        assert_eq!(head.get("content-type"), None);
        assert!(b.is_empty());
    }
    let (head, b) = get(&a, "/echo/0/0/websocket").await?;
    assert_eq!(head.status, 400);
    assert_eq!(b, "Can \"Upgrade\" only to \"WebSocket\".");
    let (head, _) = req(
        &a,
        "GET",
        "/echo/0/0/websocket",
        &[("Upgrade", "WebSocket"), ("Connection", "close")],
        "",
    )
    .await?;
    assert_eq!(head.status, 400);
    // Disabled websocket: 404.
    let (head, _) = get(&a, "/disabled_websocket_echo/0/0/websocket").await?;
    assert_eq!(head.status, 404);
    Ok(())
}

#[tokio::test]
async fn xhr_streaming_prelude_chunks_and_response_limit() -> Result<()> {
    let gw = start("sockjs_xhr_streaming").await;
    let a = addr(&gw);
    let url = format!("/echo/000/{}", sid());
    let mut r = Exchange::open(
        &a,
        "POST",
        &format!("{url}/xhr_streaming"),
        &[("Origin", "test")],
        b"",
        false,
    )
    .await?;
    assert_eq!(r.head.status, 200);
    assert!(r.head.chunked());
    assert_eq!(r.head.get("content-length"), None);
    assert_eq!(
        r.head.get("content-type"),
        Some("application/javascript;charset=UTF-8")
    );
    assert_cors(&r.head, Some("test"));
    assert_not_cached(&r.head);
    // The prelude is its own chunk, then one frame per chunk.
    assert_eq!(r.chunk().await?, Some(format!("{}\n", "h".repeat(2048))));
    assert_eq!(r.chunk().await?.as_deref(), Some("o\n"));
    assert_eq!(
        post(&a, &format!("{url}/xhr_send"), "[\"x\"]")
            .await?
            .0
            .status,
        204
    );
    assert_eq!(r.chunk().await?.as_deref(), Some("a[\"x\"]\n"));
    drop(r);

    // The echo service's limit is 4096 bytes of frames (the prelude does
    // not count): 31 frames of 134 bytes pass it, then the response ends.
    let url = format!("/echo/000/{}", sid());
    let mut r =
        Exchange::open(&a, "POST", &format!("{url}/xhr_streaming"), &[], b"", false).await?;
    r.chunk().await?;
    assert_eq!(r.chunk().await?.as_deref(), Some("o\n"));
    let msg = format!("\"{}\"", "x".repeat(128));
    for _ in 0..31 {
        assert_eq!(
            post(&a, &format!("{url}/xhr_send"), &format!("[{msg}]"))
                .await?
                .0
                .status,
            204
        );
        assert_eq!(r.chunk().await?, Some(format!("a[{msg}]\n")));
    }
    assert_eq!(r.chunk().await?, None, "the stream ends at the limit");
    // The session lives on: the next stream continues it.
    let mut r =
        Exchange::open(&a, "POST", &format!("{url}/xhr_streaming"), &[], b"", false).await?;
    r.chunk().await?;
    assert_eq!(
        post(&a, &format!("{url}/xhr_send"), "[\"y\"]")
            .await?
            .0
            .status,
        204
    );
    assert_eq!(r.chunk().await?.as_deref(), Some("a[\"y\"]\n"));
    drop(r);
    let metrics = gw.admin_get("/metrics").await?.body;
    assert!(
        metrics.contains("sockjs_events_total{event=\"stream_bytes_limit\""),
        "limit counted: {metrics}"
    );
    Ok(())
}

#[tokio::test]
async fn eventsource_and_htmlfile() -> Result<()> {
    let gw = start("sockjs_eventsource_htmlfile").await;
    let a = addr(&gw);
    let url = format!("/echo/000/{}", sid());
    let mut r = Exchange::open(&a, "GET", &format!("{url}/eventsource"), &[], b"", false).await?;
    assert_eq!(r.head.status, 200);
    assert_eq!(r.head.get("content-type"), Some("text/event-stream"));
    assert_not_cached(&r.head);
    assert_eq!(r.chunk().await?.as_deref(), Some("\r\n"));
    assert_eq!(r.chunk().await?.as_deref(), Some("data: o\r\n\r\n"));
    post(&a, &format!("{url}/xhr_send"), "[\"x\"]").await?;
    assert_eq!(r.chunk().await?.as_deref(), Some("data: a[\"x\"]\r\n\r\n"));
    post(&a, &format!("{url}/xhr_send"), r#"["  \u0000\n\r "]"#).await?;
    assert_eq!(
        r.chunk().await?.as_deref(),
        Some("data: a[\"  \\u0000\\n\\r \"]\r\n\r\n")
    );
    drop(r);
    // Limit: one 4 KiB message ends the stream.
    let url = format!("/echo/000/{}", sid());
    let mut r = Exchange::open(&a, "GET", &format!("{url}/eventsource"), &[], b"", false).await?;
    r.chunk().await?;
    r.chunk().await?;
    let msg = format!("\"{}\"", "x".repeat(4096));
    post(&a, &format!("{url}/xhr_send"), &format!("[{msg}]")).await?;
    assert_eq!(r.chunk().await?, Some(format!("data: a[{msg}]\r\n\r\n")));
    assert_eq!(r.chunk().await?, None);

    // htmlfile: the head (over 1 KiB) is its own chunk, then script frames.
    let url = format!("/echo/000/{}", sid());
    let mut r = Exchange::open(
        &a,
        "GET",
        &format!("{url}/htmlfile?c=%63allback"),
        &[],
        b"",
        false,
    )
    .await?;
    assert_eq!(r.head.status, 200);
    assert_eq!(r.head.get("content-type"), Some("text/html;charset=UTF-8"));
    assert_not_cached(&r.head);
    let head = r.chunk().await?.context("head")?;
    assert!(head.len() > 1024);
    assert!(head.contains("var c = parent.callback;"), "{head}");
    assert_eq!(
        r.chunk().await?.as_deref(),
        Some("<script>\np(\"o\");\n</script>\r\n")
    );
    post(&a, &format!("{url}/xhr_send"), "[\"x\"]").await?;
    assert_eq!(
        r.chunk().await?.as_deref(),
        Some("<script>\np(\"a[\\\"x\\\"]\");\n</script>\r\n")
    );
    drop(r);
    for t in ["htmlfile", "jsonp"] {
        let (h, b) = get(&a, &format!("/echo/a/a/{t}")).await?;
        assert_eq!(h.status, 500);
        assert!(b.contains("\"callback\" parameter required"), "{b}");
        for cb in ["%20", "*", "abc(", "abc%28"] {
            let (h, b) = get(&a, &format!("/echo/a/a/{t}?c={cb}")).await?;
            assert_eq!(h.status, 500, "{t} {cb}");
            assert!(b.contains("invalid \"callback\" parameter"), "{b}");
        }
    }
    Ok(())
}

#[tokio::test]
async fn jsonp_polling_and_send() -> Result<()> {
    let gw = start("sockjs_jsonp").await;
    let a = addr(&gw);
    let url = format!("/echo/000/{}", sid());
    let (h, b) = get(&a, &format!("{url}/jsonp?c=%63allback")).await?;
    assert_eq!(h.status, 200);
    assert_eq!(
        h.get("content-type"),
        Some("application/javascript;charset=UTF-8")
    );
    assert_not_cached(&h);
    assert_eq!(b, "/**/callback(\"o\");\r\n");
    let form = [("Content-Type", "application/x-www-form-urlencoded")];
    let (h, b) = req(
        &a,
        "POST",
        &format!("{url}/jsonp_send"),
        &form,
        "d=%5B%22x%22%5D",
    )
    .await?;
    assert_eq!((h.status, b.as_str()), (200, "ok"));
    assert_eq!(h.get("content-type"), Some("text/plain;charset=UTF-8"));
    assert_not_cached(&h);
    let (h, b) = req(
        &a,
        "POST",
        &format!("{url}/jsonp_send"),
        &[("Content-Type", "text/plain")],
        "[\"%61bc\"]",
    )
    .await?;
    assert_eq!((h.status, b.as_str()), (200, "ok"));
    assert_eq!(
        get(&a, &format!("{url}/jsonp?c=%63allback")).await?.1,
        "/**/callback(\"a[\\\"x\\\",\\\"%61bc\\\"]\");\r\n"
    );
    let (h, b) = req(&a, "POST", &format!("{url}/jsonp_send"), &form, "d=%5B%22x").await?;
    assert_eq!(h.status, 500);
    assert!(b.contains("Broken JSON encoding."));
    for data in ["", "d=", "p=p"] {
        let (h, b) = req(&a, "POST", &format!("{url}/jsonp_send"), &form, data).await?;
        assert_eq!(h.status, 500, "{data}");
        assert!(b.contains("Payload expected."), "{b}");
    }
    Ok(())
}

#[tokio::test]
async fn json_escaping_of_what_browsers_mangle() -> Result<()> {
    let gw = start("sockjs_json_escaping").await;
    let a = addr(&gw);
    let url = format!("/echo/000/{}", sid());
    post(&a, &format!("{url}/xhr"), "").await?;
    // Sent raw (as UTF-8), must come back escaped.
    let chars: String = (0x200cu32..=0x200f)
        .chain(0x2028..=0x202f)
        .chain(0x2060..=0x206f)
        .chain(0xfff0..=0xffff)
        .chain([0x01, 0x1f])
        .filter_map(char::from_u32)
        .collect();
    let expected: String = chars
        .chars()
        .map(|c| format!("\\u{:04x}", c as u32))
        .collect();
    let body = serde_json::to_string(&vec![chars.clone()])?;
    assert_eq!(
        post(&a, &format!("{url}/xhr_send"), &body).await?.0.status,
        204
    );
    let (_, b) = post(&a, &format!("{url}/xhr"), "").await?;
    assert_eq!(b, format!("a[\"{expected}\"]\n"));
    // Escaped by the client (as sockjs-client does), decoded by the server;
    // non-ASCII text goes back verbatim.
    let sent = r#"["\u00ad\u0600\ufeff héllo 日本 \ud83c\udf89"]"#;
    assert_eq!(
        post(&a, &format!("{url}/xhr_send"), sent).await?.0.status,
        204
    );
    let (_, b) = post(&a, &format!("{url}/xhr"), "").await?;
    let back: Vec<String> = serde_json::from_str(b.trim_end().trim_start_matches('a'))?;
    assert_eq!(back, vec!["\u{ad}\u{600}\u{feff} héllo 日本 🎉".to_owned()]);
    Ok(())
}

#[tokio::test]
async fn jsessionid_cookie_when_needed() -> Result<()> {
    let gw = start("sockjs_cookie").await;
    let a = addr(&gw);
    let url = format!("/cookie_needed_echo/000/{}", sid());
    let (h, b) = post(&a, &format!("{url}/xhr"), "").await?;
    assert_eq!(b, "o\n");
    assert_eq!(h.get("set-cookie"), Some("JSESSIONID=dummy; path=/"));
    let url = format!("/cookie_needed_echo/000/{}", sid());
    let (h, _) = req(
        &a,
        "POST",
        &format!("{url}/xhr"),
        &[("Cookie", "JSESSIONID=abcdef")],
        "",
    )
    .await?;
    assert_eq!(h.get("set-cookie"), Some("JSESSIONID=abcdef; path=/"));
    for (m, t) in [
        ("POST", "xhr_streaming"),
        ("GET", "eventsource"),
        ("GET", "htmlfile?c=cb"),
    ] {
        let r = Exchange::open(
            &a,
            m,
            &format!("/cookie_needed_echo/000/{}/{t}", sid()),
            &[],
            b"",
            false,
        )
        .await?;
        assert_eq!(
            r.head.get("set-cookie"),
            Some("JSESSIONID=dummy; path=/"),
            "{t}"
        );
    }
    let url = format!("/cookie_needed_echo/000/{}", sid());
    let (h, _) = get(&a, &format!("{url}/jsonp?c=cb")).await?;
    assert_eq!(h.get("set-cookie"), Some("JSESSIONID=dummy; path=/"));
    let (h, b) = req(
        &a,
        "POST",
        &format!("{url}/jsonp_send"),
        &[("Content-Type", "application/x-www-form-urlencoded")],
        "d=%5B%22x%22%5D",
    )
    .await?;
    assert_eq!(b, "ok");
    assert_eq!(h.get("set-cookie"), Some("JSESSIONID=dummy; path=/"));
    // Off by default: the echo service sets none.
    let (h, _) = post(&a, &format!("/echo/000/{}/xhr", sid()), "").await?;
    assert_eq!(h.get("set-cookie"), None);
    Ok(())
}

#[tokio::test]
async fn http10_streaming_ends_by_closing_the_connection() -> Result<()> {
    let gw = start("sockjs_http10").await;
    let a = addr(&gw);
    let url = format!("/close/000/{}/xhr_streaming", sid());
    let mut r =
        Exchange::open(&a, "POST", &url, &[("Connection", "Keep-Alive")], b"", true).await?;
    assert_eq!(r.head.status, 200);
    assert!(!r.head.chunked(), "no chunking in HTTP/1.0: {:?}", r.head);
    assert_eq!(r.head.get("content-length"), None);
    let body = r.body().await?;
    assert_eq!(
        body,
        format!("{}\no\nc[3000,\"Go away!\"]\n", "h".repeat(2048))
    );
    // HTTP/1.1 on the same URL is chunked.
    let url = format!("/close/000/{}/xhr_streaming", sid());
    let r = Exchange::open(&a, "POST", &url, &[], b"", false).await?;
    assert!(r.head.chunked());
    assert!(r.head.version == "HTTP/1.1");
    Ok(())
}

#[tokio::test]
async fn idle_sessions_time_out_after_the_disconnect_delay() -> Result<()> {
    let gw = builder("sockjs_disconnect_delay")
        .set("sockjs", "disconnect_delay_ms", "300")
        .start()
        .await;
    let a = addr(&gw);
    let url = format!("/echo/000/{}", sid());
    assert_eq!(post(&a, &format!("{url}/xhr"), "").await?.1, "o\n");
    assert_eq!(
        post(&a, &format!("{url}/xhr_send"), "[\"a\"]")
            .await?
            .0
            .status,
        204
    );
    // No receiving request: the session is gone after the delay.
    let deadline = tokio::time::Instant::now() + WAIT;
    while post(&a, &format!("{url}/xhr_send"), "[\"a\"]")
        .await?
        .0
        .status
        == 204
    {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "session never timed out"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        post(&a, &format!("{url}/xhr_send"), "[\"a\"]")
            .await?
            .0
            .status,
        404
    );
    // The same id now opens a fresh session.
    assert_eq!(post(&a, &format!("{url}/xhr"), "").await?.1, "o\n");
    let metrics = gw.admin_get("/metrics").await?.body;
    assert!(
        metrics.contains("sockjs_events_total{event=\"disconnect_delay\""),
        "{metrics}"
    );
    Ok(())
}

#[tokio::test]
async fn open_frame_goes_out_before_any_broker_work() -> Result<()> {
    // The broker is unreachable: CONNECT will fail, but `o` comes first on
    // every transport of the STOMP endpoint.
    let dead = format!("127.0.0.1:{}", e2e::gateway::free_port());
    let gw = builder("sockjs_open_first")
        // CONNECT needs the broker only when it opens the session's own
        // STOMP connection.
        .per_session()
        .broker_addresses(&[dead])
        .start_unready()
        .await;
    let a = addr(&gw);
    let url = format!("/stomp/000/{}", sid());
    assert_eq!(post(&a, &format!("{url}/xhr"), "").await?.1, "o\n");
    let mut r = Exchange::open(
        &a,
        "POST",
        &format!("/stomp/000/{}/xhr_streaming", sid()),
        &[],
        b"",
        false,
    )
    .await?;
    r.chunk().await?;
    assert_eq!(r.chunk().await?.as_deref(), Some("o\n"));
    let mut w = ws(&format!("ws://{a}/stomp/000/{}/websocket", sid())).await?;
    assert_eq!(ws_recv(&mut w).await?, Some(Message::text("o")));
    // CONNECT then fails with an ERROR frame and a close frame.
    let connect = "CONNECT\naccept-version:1.2\nhost:/\n\n\0";
    w.send(Message::text(serde_json::to_string(&vec![connect])?))
        .await?;
    let mut saw_error = false;
    while let Some(m) = ws_recv(&mut w).await? {
        if let Message::Text(t) = &m {
            if t.as_str().starts_with("a[\"ERROR") {
                saw_error = true;
            }
            if t.as_str().starts_with("c[") {
                break;
            }
        }
    }
    assert!(saw_error, "CONNECT got an ERROR");
    Ok(())
}

#[tokio::test]
async fn origin_check_and_connection_limit_apply_to_sockjs() -> Result<()> {
    let gw = builder("sockjs_origin_limit")
        .set("server", "allowed_origins", r#"["http://good.example"]"#)
        .set("server", "max_connections", "1")
        .start()
        .await;
    let a = addr(&gw);
    let evil = [("Origin", "http://evil.example")];
    let good = [("Origin", "http://good.example")];
    let (h, _) = req(&a, "GET", "/stomp/info", &evil, "").await?;
    assert_eq!(h.status, 403);
    let (h, _) = req(&a, "POST", &format!("/stomp/000/{}/xhr", sid()), &evil, "").await?;
    assert_eq!(h.status, 403);
    let (h, _) = req(&a, "GET", "/stomp/info", &good, "").await?;
    assert_eq!(h.status, 200);
    // One session fits, the second is refused (503), the same as WebSockets.
    let url = format!("/stomp/000/{}", sid());
    let (h, b) = req(&a, "POST", &format!("{url}/xhr"), &good, "").await?;
    assert_eq!((h.status, b.as_str()), (200, "o\n"));
    let (h, _) = req(&a, "POST", &format!("/stomp/000/{}/xhr", sid()), &good, "").await?;
    assert_eq!(h.status, 503);
    let refused = tokio_tungstenite::connect_async(gw.ws_url()).await;
    assert!(refused.is_err(), "the WebSocket endpoint shares the limit");
    let metrics = gw.admin_get("/metrics").await?.body;
    assert!(metrics.contains("connections_rejected_total{"), "{metrics}");
    Ok(())
}

#[tokio::test]
async fn heartbeat_frames_on_quiet_sessions() -> Result<()> {
    let gw = builder("sockjs_heartbeat")
        .set("sockjs", "heartbeat_time_ms", "200")
        .start()
        .await;
    let a = addr(&gw);
    // Streaming: `h` frames, each its own chunk, while nothing else is sent.
    let url = format!("/echo/000/{}", sid());
    let mut r =
        Exchange::open(&a, "POST", &format!("{url}/xhr_streaming"), &[], b"", false).await?;
    r.chunk().await?;
    assert_eq!(r.chunk().await?.as_deref(), Some("o\n"));
    assert_eq!(r.chunk().await?.as_deref(), Some("h\n"));
    assert_eq!(r.chunk().await?.as_deref(), Some("h\n"));
    drop(r);
    // Polling: a poll with nothing to say ends with `h`.
    let url = format!("/echo/000/{}", sid());
    assert_eq!(post(&a, &format!("{url}/xhr"), "").await?.1, "o\n");
    assert_eq!(post(&a, &format!("{url}/xhr"), "").await?.1, "h\n");
    // WebSocket.
    let mut w = ws(&format!("ws://{a}/echo/000/{}/websocket", sid())).await?;
    assert_eq!(ws_recv(&mut w).await?, Some(Message::text("o")));
    assert_eq!(ws_recv(&mut w).await?, Some(Message::text("h")));
    Ok(())
}

#[tokio::test]
async fn demo_page_and_its_scripts_and_the_setting_that_turns_it_off() -> Result<()> {
    let gw = start("sockjs_demo_page").await;
    let a = addr(&gw);
    let (h, b) = get(&a, "/").await?;
    assert_eq!(h.status, 200);
    assert_eq!(h.get("content-type"), Some("text/html;charset=UTF-8"));
    assert!(b.contains("stomp-gateway demo chat"));
    assert!(
        b.contains(r#""sockjs":"/stomp""#) && b.contains(r#""websocket":"/ws""#),
        "the page knows the endpoints"
    );
    for script in ["/assets/sockjs.min.js", "/assets/stomp.umd.min.js"] {
        assert!(b.contains(&format!("src=\"{script}\"")), "{script}");
        let (h, js) = get(&a, script).await?;
        assert_eq!(h.status, 200, "{script}");
        assert_eq!(
            h.get("content-type"),
            Some("application/javascript;charset=UTF-8")
        );
        assert!(js.len() > 10_000);
    }
    // The iframe page loads the served sockjs-client.
    let (_, iframe) = get(&a, "/stomp/iframe.html").await?;
    assert!(iframe.contains("src=\"/assets/sockjs.min.js\""), "{iframe}");
    drop(gw);

    let gw = Gateway::builder("sockjs_demo_off")
        .set("demo", "enabled", "false")
        .start()
        .await;
    let a = addr(&gw);
    let (h, b) = get(&a, "/").await?;
    assert_eq!(h.status, 200);
    assert!(!b.contains("demo chat"), "{b}");
    assert!(b.starts_with("stomp-gateway"), "{b}");
    assert_eq!(get(&a, "/assets/sockjs.min.js").await?.0.status, 404);
    Ok(())
}

/// Sends `frames` (STOMP frames) through `xhr_send`.
async fn xhr_send_frames(addr: &str, url: &str, frames: &[&str]) -> Result<()> {
    let (h, b) = post(
        addr,
        &format!("{url}/xhr_send"),
        &serde_json::to_string(frames)?,
    )
    .await?;
    ensure!(h.status == 204, "xhr_send: {} {b}", h.status);
    Ok(())
}

/// Reads stream chunks until one contains `what`.
async fn until_chunk(r: &mut Exchange, what: &str) -> Result<String> {
    loop {
        match r.chunk().await? {
            Some(c) if c.contains(what) => return Ok(c),
            Some(_) => {}
            None => bail!("stream ended before {what:?}"),
        }
    }
}

#[tokio::test]
async fn stomp_over_xhr_streaming_and_the_drain_on_sigterm() -> Result<()> {
    let gw = builder("sockjs_stomp_drain")
        .set("server", "drain_period_ms", "0")
        .start()
        .await;
    let a = addr(&gw);
    let url = format!("/stomp/000/{}", sid());
    let mut r =
        Exchange::open(&a, "POST", &format!("{url}/xhr_streaming"), &[], b"", false).await?;
    r.chunk().await?;
    assert_eq!(r.chunk().await?.as_deref(), Some("o\n"));
    xhr_send_frames(
        &a,
        &url,
        &["CONNECT\naccept-version:1.2\nhost:/\nheart-beat:0,0\n\n\0"],
    )
    .await?;
    until_chunk(&mut r, "a[\"CONNECTED\\n").await?;
    // A round trip through RabbitMQ: SUBSCRIBE with a receipt, SEND, MESSAGE.
    let dest = format!("/topic/{}", unique("sockjs"));
    xhr_send_frames(
        &a,
        &url,
        &[&format!(
            "SUBSCRIBE\nid:0\ndestination:{dest}\nreceipt:r1\n\n\0"
        )],
    )
    .await?;
    until_chunk(&mut r, "receipt-id:r1").await?;
    xhr_send_frames(&a, &url, &[&format!("SEND\ndestination:{dest}\n\nhé 🎉\0")]).await?;
    let m = until_chunk(&mut r, "MESSAGE").await?;
    assert!(m.contains("hé 🎉"), "{m}");
    // SIGTERM: the session gets an ERROR, then the SockJS close frame 1001.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(gw.pid())?),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    until_chunk(&mut r, "a[\"ERROR\\n").await?;
    let c = until_chunk(&mut r, "c[").await?;
    assert!(c.starts_with("c[1001,"), "{c}");
    Ok(())
}
