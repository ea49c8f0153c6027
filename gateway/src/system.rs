//! The shared system connection: one STOMP connection per process to the
//! broker, used for readiness (and, later, server-originated publishes).
//!
//! [`run`] connects (walking `broker.addresses` in order), keeps the link
//! alive with heart-beats, notices when the broker goes silent or closes, and
//! reconnects with exponential backoff and full jitter. [`Health`] always
//! says whether the link is up and why it last went down. With
//! `[broker.tls] enabled`, the link is TLS like every client session's.

use crate::backoff::Backoff;
use crate::broker::{self, BrokerError, BrokerReadHalf, BrokerWriteHalf, FrameReader};
use crate::config::Config;
use crate::health::Health;
use crate::metrics::{self, Metrics};
use crate::tls::BrokerTls;
use bytes::BytesMut;
use relay_core::codec::HEARTBEAT;
use relay_core::heartbeat::{self, HeartBeat, Negotiated};
use relay_core::{encode, Command, Frame, Item, Limits, Version};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;
use tokio::time::{sleep, sleep_until, timeout, Instant};
use tracing::{debug, info, warn};

/// Extra silence tolerated on top of twice the broker's heart-beat interval
/// (network jitter, scheduling).
const SILENCE_MARGIN: Duration = Duration::from_millis(1_000);
/// Longest wait for the broker's RECEIPT to our DISCONNECT on shutdown.
const DISCONNECT_GRACE: Duration = Duration::from_secs(2);
/// Receipt id of the DISCONNECT sent on shutdown.
const DISCONNECT_RECEIPT: &str = "system-disconnect";

/// Runs the system link until `shutdown` becomes `true` (or its sender is
/// dropped): then sends DISCONNECT, closes, marks the link down and returns.
///
/// Never returns early and never panics on network input: every failure is
/// logged once, recorded in `health`, and followed by a reconnect.
///
/// `tls` is the TLS client built once from `[broker.tls]` (see
/// [`crate::settings::Settings`]); `None` for plain TCP.
pub async fn run(
    config: Arc<Config>,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    tls: Option<Arc<BrokerTls>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let b = &config.broker;
    health.set_broker_tls(tls.is_some());
    let mut backoff = Backoff::new(b.reconnect_initial_ms, b.reconnect_max_ms);
    // Every connection after the first attempt is a reconnect (metric).
    let mut attempted = false;
    loop {
        if *shutdown.borrow_and_update() {
            break;
        }
        let attempt = tokio::select! {
            () = stopped(&mut shutdown) => {
                break;
            }
            attempt = timed(connect(&config, tls.as_deref())) => attempt,
        };
        let reason = match attempt {
            (Ok(mut link), took) => {
                metrics.broker_connected(metrics::Link::System, took, attempted);
                attempted = true;
                backoff.reset();
                health.set_system_link_up(&link.address);
                info!(
                    "system link connected to {}{} (heart-beat send {}ms, receive {}ms)",
                    link.address,
                    if link.tls { " over TLS" } else { "" },
                    millis(link.heartbeat.send),
                    millis(link.heartbeat.receive),
                );
                match link.run(&mut shutdown).await {
                    End::Shutdown => break,
                    End::Lost(reason) => format!("system link to {} lost: {reason}", link.address),
                }
            }
            (Err(reason), _) => {
                attempted = true;
                format!("system link cannot connect: {reason}")
            }
        };
        health.set_system_link_down(&reason);
        let delay = backoff.next_delay();
        warn!("{reason}; reconnecting in {}ms", delay.as_millis());
        tokio::select! {
            () = stopped(&mut shutdown) => {
                break;
            }
            () = sleep(delay) => {}
        }
    }
    health.set_system_link_down("shutting down");
    info!("system link stopped");
}

/// `f`'s output and how long it took.
async fn timed<T>(f: impl std::future::Future<Output = T>) -> (T, Duration) {
    let started = Instant::now();
    let out = f.await;
    (out, started.elapsed())
}

/// Resolves once shutdown is requested (or its sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    // Drop the watch guard here: it must not live across an await.
    let _ = shutdown.wait_for(|stop| *stop).await.map(|_| ());
}

fn millis(d: Option<Duration>) -> u128 {
    d.map_or(0, |d| d.as_millis())
}

/// How a connected link ended.
#[derive(Debug)]
enum End {
    Shutdown,
    Lost(String),
}

/// A connected system link (CONNECTED received).
#[derive(Debug)]
struct Link {
    address: String,
    /// Whether the connection is TLS.
    tls: bool,
    reader: FrameReader<BrokerReadHalf>,
    writer: BrokerWriteHalf,
    version: Version,
    heartbeat: Negotiated,
    write_timeout: Duration,
}

/// Opens TCP (and TLS, with `tls`) to the first answering address and does
/// the STOMP handshake, all bounded by `broker.connect_timeout_ms` (per
/// step).
async fn connect(config: &Config, tls: Option<&BrokerTls>) -> Result<Link, String> {
    let b = &config.broker;
    let connect_timeout = Duration::from_millis(b.connect_timeout_ms);
    let (stream, address) = broker::connect(&b.addresses, connect_timeout, tls)
        .await
        .map_err(|e| e.to_string())?;
    let is_tls = stream.is_tls();
    let (read, mut writer) = stream.into_split();
    let mut reader = FrameReader::new(read, Limits::default());
    reader.set_version(Version::V1_2);

    let ours = HeartBeat::new(b.system_heartbeat_send_ms, b.system_heartbeat_receive_ms);
    let connect = Frame::new(Command::Connect)
        .with_header("accept-version", Version::V1_2.as_str())
        .with_header("host", b.virtual_host.as_str())
        .with_header("login", b.system_login.as_str())
        .with_header("passcode", b.system_passcode.as_str())
        .with_header("heart-beat", ours.header_value());

    let handshake = async {
        write_frame(&mut writer, &connect, Version::V1_2).await?;
        loop {
            match reader.next().await? {
                Item::Heartbeat => continue,
                Item::Frame(f) => return Ok::<Frame, BrokerError>(f),
            }
        }
    };
    let reply = match timeout(connect_timeout, handshake).await {
        Ok(Ok(frame)) => frame,
        Ok(Err(e)) => return Err(format!("{address}: {e}")),
        Err(_) => {
            return Err(format!(
                "{address}: no CONNECTED within {}ms",
                b.connect_timeout_ms
            ))
        }
    };
    match reply.command {
        Command::Connected => {}
        Command::Error => {
            return Err(format!(
                "{address}: broker refused CONNECT: {}",
                error_message(&reply)
            ))
        }
        other => return Err(format!("{address}: expected CONNECTED, got {other}")),
    }

    // A CONNECTED without `version` comes from a STOMP 1.0 server.
    let version = reply
        .header("version")
        .and_then(Version::parse)
        .unwrap_or(Version::V1_0);
    reader.set_version(version);
    let theirs = if version == Version::V1_0 {
        HeartBeat::default()
    } else {
        HeartBeat::parse(reply.header("heart-beat")).unwrap_or_else(|e| {
            warn!("system link: {address}: {e}; heart-beats disabled");
            HeartBeat::default()
        })
    };
    Ok(Link {
        address,
        tls: is_tls,
        reader,
        writer,
        version,
        heartbeat: heartbeat::negotiate(ours, theirs),
        write_timeout: connect_timeout,
    })
}

impl Link {
    /// Keeps the link alive until it fails or `shutdown` flips.
    async fn run(&mut self, shutdown: &mut watch::Receiver<bool>) -> End {
        let send_every = self.heartbeat.send;
        let silence_limit = self.heartbeat.receive.map(silence_limit);
        let mut next_beat = send_every.map(|d| Instant::now() + d);
        let mut last_read = Instant::now();
        loop {
            let dead_at = silence_limit.map(|limit| last_read + limit);
            tokio::select! {
                () = stopped(shutdown) => {
                    self.disconnect().await;
                    return End::Shutdown;
                }
                item = self.reader.next() => match item {
                    Ok(Item::Heartbeat) => last_read = Instant::now(),
                    Ok(Item::Frame(f)) => {
                        last_read = Instant::now();
                        if f.command == Command::Error {
                            // The broker closes the connection after ERROR.
                            return End::Lost(format!("broker sent ERROR: {}", error_message(&f)));
                        }
                        debug!("system link: ignoring {} frame from the broker", f.command);
                    }
                    Err(e) => return End::Lost(e.to_string()),
                },
                () = at(next_beat) => {
                    if let Err(e) = self.write(HEARTBEAT).await {
                        return End::Lost(format!("cannot send heart-beat: {e}"));
                    }
                    next_beat = send_every.map(|d| Instant::now() + d);
                }
                () = at(dead_at) => {
                    return End::Lost(format!(
                        "no data from the broker for {}ms (heart-beat every {}ms expected)",
                        last_read.elapsed().as_millis(),
                        millis(self.heartbeat.receive),
                    ));
                }
            }
        }
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), String> {
        let writer = &mut self.writer;
        let write = async move {
            writer.write_all(bytes).await?;
            // Sends what TLS still buffers; nothing to do for plain TCP.
            writer.flush().await
        };
        match timeout(self.write_timeout, write).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!(
                "write blocked for {}ms",
                self.write_timeout.as_millis()
            )),
        }
    }

    /// Sends DISCONNECT, waits briefly for its RECEIPT, closes.
    async fn disconnect(&mut self) {
        let frame = Frame::new(Command::Disconnect).with_header("receipt", DISCONNECT_RECEIPT);
        let mut buf = BytesMut::new();
        encode(&frame, self.version, &mut buf);
        if self.write(&buf).await.is_ok() {
            let grace = DISCONNECT_GRACE.min(self.write_timeout);
            let receipt = async {
                loop {
                    match self.reader.next().await {
                        Ok(Item::Frame(f))
                            if f.command == Command::Receipt
                                && f.header("receipt-id") == Some(DISCONNECT_RECEIPT) =>
                        {
                            return
                        }
                        Ok(_) => continue,
                        Err(_) => return,
                    }
                }
            };
            let _ = timeout(grace, receipt).await;
        }
        let _ = timeout(self.write_timeout, self.writer.shutdown()).await;
        info!("system link to {} disconnected", self.address);
    }
}

async fn write_frame(
    writer: &mut BrokerWriteHalf,
    frame: &Frame,
    version: Version,
) -> Result<(), BrokerError> {
    let mut buf = BytesMut::new();
    encode(frame, version, &mut buf);
    writer.write_all(&buf).await?;
    writer.flush().await?;
    Ok(())
}

/// Sleeps until `deadline`, or forever when there is none.
async fn at(deadline: Option<Instant>) {
    match deadline {
        Some(t) => sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// How long the broker may stay silent when it promised data every
/// `interval`: twice that (as RabbitMQ does) plus [`SILENCE_MARGIN`].
fn silence_limit(interval: Duration) -> Duration {
    heartbeat::receive_deadline(interval) + SILENCE_MARGIN
}

/// The `message` header of an ERROR frame, or its body when there is none.
fn error_message(f: &Frame) -> String {
    match f.header("message") {
        Some(m) => m.to_owned(),
        None => String::from_utf8_lossy(&f.body).trim().to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;
    use tokio::task::JoinHandle;

    #[test]
    fn silence_limit_is_twice_the_interval_plus_margin() {
        assert_eq!(
            silence_limit(Duration::from_secs(10)),
            Duration::from_secs(20) + SILENCE_MARGIN
        );
    }

    fn test_config(addresses: &[&str]) -> Arc<Config> {
        let mut c = Config::default();
        c.broker.addresses = addresses.iter().map(|s| s.to_string()).collect();
        c.broker.connect_timeout_ms = 2_000;
        c.broker.reconnect_initial_ms = 50;
        c.broker.reconnect_max_ms = 200;
        Arc::new(c)
    }

    fn start(config: Arc<Config>) -> (Arc<Health>, watch::Sender<bool>, JoinHandle<()>) {
        let health = Arc::new(Health::new());
        let (tx, rx) = watch::channel(false);
        let tls = BrokerTls::from_config(&config.broker.tls).expect("usable [broker.tls]");
        let metrics = Arc::new(Metrics::new("test").expect("metrics"));
        let task = tokio::spawn(run(config, health.clone(), metrics, tls, rx));
        (health, tx, task)
    }

    async fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + limit;
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(tx: watch::Sender<bool>, task: JoinHandle<()>) {
        tx.send(true).expect("send shutdown");
        timeout(Duration::from_secs(5), task)
            .await
            .expect("run returns after shutdown")
            .expect("run does not panic");
    }

    /// Needs RabbitMQ's STOMP plugin on 127.0.0.1:61613 (guest/guest).
    #[tokio::test]
    async fn connects_to_rabbitmq_and_becomes_ready() {
        let mut c = (*test_config(&["127.0.0.1:61613"])).clone();
        // Short heart-beats so a few are exchanged while we watch.
        c.broker.system_heartbeat_send_ms = 1_000;
        c.broker.system_heartbeat_receive_ms = 1_000;
        let (health, tx, task) = start(Arc::new(c));
        wait_until("ready", Duration::from_secs(10), || health.is_ready()).await;
        assert_eq!(
            health.system_link_address().as_deref(),
            Some("127.0.0.1:61613")
        );
        // Still up after several heart-beat periods both ways.
        sleep(Duration::from_millis(3_500)).await;
        assert!(health.is_ready(), "{}", health.details());
        stop(tx, task).await;
        assert!(!health.system_link_up());
    }

    /// Needs RabbitMQ's STOMP plugin on 127.0.0.1:61613, reached through an
    /// in-process TLS terminator.
    #[tokio::test]
    async fn connects_over_tls_and_reports_an_untrusted_certificate() {
        use crate::config::TlsConfig;
        use crate::tls::tests::{test_pki, tls_terminator, Dir};
        let dir = Dir::new("system-tls");
        let pki = test_pki(&["127.0.0.1", "localhost"]);
        let addr = tls_terminator(&pki, "127.0.0.1:61613").await;
        let mut c = (*test_config(&[&addr])).clone();
        c.broker.tls = TlsConfig {
            enabled: true,
            ca_file: dir.write("ca.pem", &pki.ca_pem),
            ..TlsConfig::default()
        };
        c.broker.system_heartbeat_send_ms = 500;
        c.broker.system_heartbeat_receive_ms = 500;
        let (health, tx, task) = start(Arc::new(c.clone()));
        wait_until("ready over TLS", Duration::from_secs(10), || {
            health.is_ready()
        })
        .await;
        let details = health.details();
        assert_eq!(details["system_link"]["address"], addr.as_str());
        assert_eq!(details["system_link"]["tls"], true);
        // Heart-beats flow both ways through TLS.
        sleep(Duration::from_millis(2_000)).await;
        assert!(health.is_ready(), "{}", health.details());
        stop(tx, task).await;

        // Trusting another CA: never ready, and the reason says why.
        let other = test_pki(&["127.0.0.1"]);
        c.broker.tls.ca_file = dir.write("other-ca.pem", &other.ca_pem);
        let (health, tx, task) = start(Arc::new(c));
        wait_until("a TLS failure", Duration::from_secs(10), || {
            health.last_error().is_some()
        })
        .await;
        assert!(!health.is_ready());
        let err = health.last_error().unwrap_or_default();
        assert!(err.contains("certificate was not trusted"), "{err}");
        stop(tx, task).await;
    }

    #[tokio::test]
    async fn fails_over_to_the_next_address() {
        // Nothing listens on port 1; RabbitMQ is second.
        let (health, tx, task) = start(test_config(&["127.0.0.1:1", "127.0.0.1:61613"]));
        wait_until("ready", Duration::from_secs(10), || health.is_ready()).await;
        assert_eq!(
            health.system_link_address().as_deref(),
            Some("127.0.0.1:61613")
        );
        stop(tx, task).await;
    }

    #[tokio::test]
    async fn unreachable_broker_is_not_ready_with_last_error() {
        let (health, tx, task) = start(test_config(&["127.0.0.1:1"]));
        wait_until("a connect failure", Duration::from_secs(10), || {
            health.last_error().is_some()
        })
        .await;
        assert!(!health.is_ready());
        let err = health.last_error().unwrap_or_default();
        assert!(err.contains("127.0.0.1:1"), "{err}");
        // Keeps retrying without blocking shutdown.
        sleep(Duration::from_millis(300)).await;
        stop(tx, task).await;
        assert!(!health.is_ready());
    }

    #[tokio::test]
    async fn wrong_credentials_are_reported() {
        let mut c = (*test_config(&["127.0.0.1:61613"])).clone();
        c.broker.system_passcode = "definitely-wrong".into();
        let (health, tx, task) = start(Arc::new(c));
        wait_until("a refused CONNECT", Duration::from_secs(10), || {
            health.last_error().is_some()
        })
        .await;
        assert!(!health.is_ready());
        let err = health.last_error().unwrap_or_default();
        assert!(err.contains("refused CONNECT"), "{err}");
        stop(tx, task).await;
    }

    /// Reads one frame (through its NUL) from a fake broker's client side.
    async fn read_frame(s: &mut tokio::net::TcpStream) -> String {
        let mut out = Vec::new();
        let mut byte = [0u8; 1];
        loop {
            let n = s.read(&mut byte).await.expect("read");
            assert!(n == 1, "eof before NUL");
            if byte[0] == 0 {
                break;
            }
            out.push(byte[0]);
        }
        String::from_utf8(out).expect("utf-8")
    }

    /// A fake broker that promises heart-beats and then goes silent: the link
    /// must send its own heart-beats on schedule, then declare the broker dead.
    #[tokio::test]
    async fn sends_heartbeats_and_detects_a_silent_broker() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let mut c = (*test_config(&[&addr])).clone();
        c.broker.system_heartbeat_send_ms = 100;
        c.broker.system_heartbeat_receive_ms = 100;
        c.broker.reconnect_initial_ms = 5_000;
        c.broker.reconnect_max_ms = 5_000;
        let (health, tx, task) = start(Arc::new(c));

        let (mut s, _) = timeout(Duration::from_secs(5), listener.accept())
            .await
            .expect("gateway connects")
            .expect("accept");
        let connect = read_frame(&mut s).await;
        assert!(connect.starts_with("CONNECT\n"), "{connect}");
        assert!(connect.contains("accept-version:1.2\n"), "{connect}");
        assert!(connect.contains("host:/\n"), "{connect}");
        assert!(connect.contains("login:guest\n"), "{connect}");
        assert!(connect.contains("heart-beat:100,100\n"), "{connect}");
        // We send every 100ms and want data every 300ms.
        s.write_all(b"CONNECTED\nversion:1.2\nheart-beat:100,300\n\n\0")
            .await
            .expect("write CONNECTED");
        wait_until("ready", Duration::from_secs(5), || health.is_ready()).await;

        // The gateway sends heart-beats every max(100, 300) = 300ms. Count
        // them for 800ms, well before the link gives up on us (1.2s).
        let started = Instant::now();
        let mut beats = 0;
        let mut buf = [0u8; 64];
        while started.elapsed() < Duration::from_millis(800) {
            match timeout(Duration::from_millis(50), s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(n)) => beats += buf[..n].iter().filter(|b| **b == b'\n').count(),
                Err(_) => {}
            }
        }
        assert!((2..=4).contains(&beats), "{beats} heart-beats in 800ms");

        // We never send anything: dead after 2 * 100ms + margin.
        wait_until("link lost", Duration::from_secs(5), || !health.is_ready()).await;
        let err = health.last_error().unwrap_or_default();
        assert!(err.contains("no data from the broker"), "{err}");
        stop(tx, task).await;
    }

    #[tokio::test]
    async fn garbage_from_the_broker_is_a_connect_failure_not_a_panic() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let (health, tx, task) = start(test_config(&[&addr]));
        let (mut s, _) = timeout(Duration::from_secs(5), listener.accept())
            .await
            .expect("gateway connects")
            .expect("accept");
        let _ = read_frame(&mut s).await;
        s.write_all(b"NOT-A-COMMAND\n\n\0").await.expect("write");
        wait_until("a failure", Duration::from_secs(5), || {
            health.last_error().is_some()
        })
        .await;
        assert!(!health.is_ready());
        stop(tx, task).await;
    }
}
