//! The AMQP 0-9-1 control plane: declares the topology (the application and
//! user exchanges plus `[topology]`) and publishes messages with publisher
//! confirms, for application destinations, user destinations and the HTTP
//! publish API.
//!
//! ```text
//!  ControlPlane::start ──connect──▶ control connection ──declare topology──▶ up
//!        │                              │ lost: health down, backoff, reconnect, declare again
//!        ▼
//!  publish ──▶ in-flight permit ──▶ slot i (pooled connection + confirm channel) ──▶ ack / nack / return
//! ```
//!
//! - One **control connection** (`stomp-gateway <pod> control`) declares the
//!   topology and is the liveness signal: while it is down, [`ControlPlane::is_up`]
//!   is false, health reports not ready and publishes fail fast with
//!   [`PublishError::Unavailable`].
//! - `amqp.pool_size` **publish connections** (`stomp-gateway <pod> publish`,
//!   a `deadpool` pool), each carrying one long-lived confirm-mode
//!   channel that many publishes share concurrently. A channel the broker
//!   closed is replaced on its next use.
//! - **Failover**: every connection (control and publish) tries `amqp.url`,
//!   then each of `amqp.failover_urls`, in order, and takes the first that
//!   answers; at start and on every reconnect. `amqps://` URLs use rustls
//!   (ring) with `[amqp.tls]`: its CA bundle on top of the public roots
//!   built into the binary, and its client certificate when set.
//! - Publishing to an exchange the gateway does not know (not built in, not
//!   declared by it) first checks that it exists with a passive declare on a
//!   throw-away channel, so a publish to a missing exchange fails on its own
//!   and does not close the shared channel under other publishes. Positive
//!   answers are cached for a minute.

use crate::broker::TlsError;
use crate::config::{
    mask_url_password, AmqpTlsConfig, ArgValue, Arguments, Config, ExchangeType, BUILTIN_EXCHANGES,
};
use crate::health::Health;
use bytes::Bytes;
use deadpool::managed::{Metrics, RecycleError, RecycleResult};
use futures_util::StreamExt;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeBindOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use relay_core::destination::{app_routing_key, split_user_send, user_routing_key};
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{watch, Semaphore};
use tracing::{debug, error, info, warn};

/// How often the reconnect loop repeats "still cannot connect".
const RECONNECT_LOG_INTERVAL: Duration = Duration::from_secs(30);
/// How often the control connection's state is polled (besides its events).
const WATCH_INTERVAL: Duration = Duration::from_millis(500);
/// How long a positive exchange-existence check is trusted.
const EXCHANGE_CHECK_TTL: Duration = Duration::from_secs(60);
/// Most cached exchange checks (the cache is cleared when it is full).
const EXCHANGE_CHECK_CAPACITY: usize = 10_000;
/// After a publish timed out, its confirm is still awaited (holding its
/// in-flight permit) for this many publish timeouts; then its channel is
/// closed and replaced.
const LINGER_FACTOR: u32 = 5;
/// On shutdown, the longest wait for sessions to close and in-flight
/// publishes to be confirmed before the connections are closed.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(12);

/// The AMQP control plane. Cheap to clone (an `Arc` inside).
#[derive(Clone)]
pub struct ControlPlane {
    inner: Arc<Inner>,
}

impl fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ControlPlane")
            .field("pod_id", &self.inner.pod_id)
            .field("up", &self.is_up())
            .field("pool_size", &self.inner.slots.len())
            .finish_non_exhaustive()
    }
}

/// One message to publish.
#[derive(Debug, Clone)]
pub struct OutboundMessage {
    pub exchange: String,
    pub routing_key: String,
    /// Become the AMQP `headers` table (long-string values).
    pub headers: Vec<(String, String)>,
    pub content_type: Option<String>,
    /// Generated (see [`ControlPlane::new_message_id`]) when `None`.
    pub message_id: Option<String>,
    pub body: Bytes,
    /// Ask the broker to return the message when no queue is bound to its
    /// routing key ([`PublishError::Unroutable`]).
    pub mandatory: bool,
    /// `delivery_mode` 2.
    pub persistent: bool,
}

/// Why a publish failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// No AMQP connection right now.
    #[error("the AMQP connection to RabbitMQ is unavailable: {0}")]
    Unavailable(String),
    /// A mandatory message was returned: nothing is bound to the routing key.
    #[error(
        "unroutable: no queue is bound to routing key {routing_key:?} on exchange {exchange:?}"
    )]
    Unroutable {
        exchange: String,
        routing_key: String,
    },
    /// The broker nacked the message.
    #[error("RabbitMQ did not accept the message (nack)")]
    Nacked,
    /// No confirm within `amqp.publish_timeout_ms`.
    #[error("RabbitMQ did not confirm the message in time")]
    Timeout,
    /// `amqp.max_inflight_publishes` publishes are already awaiting confirms.
    #[error("too many messages awaiting confirmation from RabbitMQ (amqp.max_inflight_publishes)")]
    Overloaded,
    /// The broker refused the publish (for example `NOT_FOUND - no exchange
    /// ...`), or the message cannot be expressed in AMQP (a name over 255
    /// bytes).
    #[error("RabbitMQ rejected the message: {0}")]
    Rejected(String),
}

/// Why the control plane could not start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlPlaneError {
    /// An entity exists on the broker with different properties
    /// (`PRECONDITION_FAILED`); `detail` is RabbitMQ's reply text, naming the
    /// property.
    #[error("{entity} conflicts with its existing definition on RabbitMQ: {detail}")]
    Conflict { entity: String, detail: String },
    /// Any other declaration failure.
    #[error("cannot declare {entity}: {detail}")]
    Declare { entity: String, detail: String },
    /// `[amqp.tls]` cannot be used (a file became unreadable after the
    /// configuration was validated).
    #[error("AMQP TLS: {0}")]
    Tls(#[from] TlsError),
}

/// The lapin TLS settings for `amqps://` URLs from `[amqp.tls]`: the CA
/// bundle (trusted on top of the public roots built into the binary) and
/// the client certificate and key, each read and checked. Plain `amqp://`
/// URLs ignore it.
pub fn tls_config(tls: &AmqpTlsConfig) -> Result<OwnedTLSConfig, TlsError> {
    let cert_chain = if tls.ca_file.is_empty() {
        None
    } else {
        crate::broker::load_ca_certificates("amqp.tls.ca_file", &tls.ca_file)?;
        Some(read_text("amqp.tls.ca_file", &tls.ca_file)?)
    };
    let identity =
        match crate::broker::load_client_identity("amqp.tls", &tls.cert_file, &tls.key_file)? {
            None => None,
            Some(_) => Some(OwnedIdentity::PKCS8 {
                pem: read_text("amqp.tls.cert_file", &tls.cert_file)?.into_bytes(),
                key: read_text("amqp.tls.key_file", &tls.key_file)?.into_bytes(),
            }),
        };
    Ok(OwnedTLSConfig {
        identity,
        cert_chain,
    })
}

fn read_text(key: &str, path: &str) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|e| TlsError::Read {
        key: key.to_owned(),
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

/// Connects to the first of `urls` that answers within `timeout` (each);
/// returns the connection and the index of its URL, or every URL's failure
/// (passwords masked).
async fn connect_any(
    urls: &[String],
    tls: &OwnedTLSConfig,
    props: impl Fn() -> ConnectionProperties,
    timeout: Duration,
) -> Result<(Connection, usize), String> {
    let mut failures = Vec::with_capacity(urls.len());
    for (i, url) in urls.iter().enumerate() {
        let runtime = lapin::runtime::default_runtime().map_err(|e| e.to_string())?;
        let attempt = Connection::connect_with_config(url, props(), tls.clone(), runtime);
        match tokio::time::timeout(timeout, attempt).await {
            Ok(Ok(conn)) => return Ok((conn, i)),
            Ok(Err(e)) => failures.push(format!("{}: {e}", mask_url_password(url))),
            Err(_) => failures.push(format!(
                "{}: no connection within {} ms (amqp.connect_timeout_ms)",
                mask_url_password(url),
                timeout.as_millis()
            )),
        }
    }
    Err(failures.join("; "))
}

/// Creates the publish connections of the pool, with the same URL
/// failover and TLS as the control connection.
struct PublishManager {
    urls: Arc<Vec<String>>,
    tls: OwnedTLSConfig,
    name: String,
    connect_timeout: Duration,
}

impl deadpool::managed::Manager for PublishManager {
    type Type = Connection;
    type Error = String;

    async fn create(&self) -> Result<Connection, String> {
        let props =
            || ConnectionProperties::default().with_connection_name(self.name.clone().into());
        let (conn, i) = connect_any(&self.urls, &self.tls, props, self.connect_timeout).await?;
        debug!(
            "AMQP publish connection opened to {}",
            self.urls
                .get(i)
                .map(|u| mask_url_password(u))
                .unwrap_or_default()
        );
        Ok(conn)
    }

    async fn recycle(&self, conn: &mut Connection, _: &Metrics) -> RecycleResult<String> {
        if conn.status().connected() {
            Ok(())
        } else {
            Err(RecycleError::message(format!(
                "the AMQP publish connection is {}",
                conn.status().state_name()
            )))
        }
    }
}

type PublishPool = deadpool::managed::Pool<PublishManager>;

/// Counts of what one topology declaration declared.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct TopologyCounts {
    exchanges: usize,
    queues: usize,
    bindings: usize,
}

/// A declaration failed because of the entity (fatal at start) or because
/// the connection went away (retried).
#[derive(Debug)]
enum DeclareFailure {
    Entity(ControlPlaneError),
    Connection(String),
}

/// A publish connection from the pool and its confirm-mode channel.
struct PubChannel {
    /// Held so the slot keeps its own connection; returned to the pool when
    /// the slot is reset.
    conn: deadpool::managed::Object<PublishManager>,
    channel: Channel,
    /// Tells a replaced channel from the current one.
    serial: u64,
}

struct Inner {
    config: Arc<Config>,
    health: Arc<Health>,
    pod_id: String,
    /// `<pod>-<random>`: message ids are `<prefix>-<counter>`.
    id_prefix: String,
    next_message: AtomicU64,
    up: AtomicBool,
    down_reason: Mutex<String>,
    inflight: Arc<Semaphore>,
    pool: PublishPool,
    /// `amqp.url`, then `amqp.failover_urls`.
    urls: Arc<Vec<String>>,
    /// For `amqps://` URLs.
    tls: OwnedTLSConfig,
    slots: Vec<tokio::sync::Mutex<Option<PubChannel>>>,
    next_slot: AtomicUsize,
    next_serial: AtomicU64,
    /// Exchanges that exist without a check.
    known_exchanges: Vec<String>,
    /// Exchanges found by a passive declare, and when.
    checked_exchanges: Mutex<HashMap<String, Instant>>,
    /// Becomes true when the supervisor has closed everything.
    stopped: watch::Sender<bool>,
}

impl ControlPlane {
    /// Connects and declares: `config.topology`, the app exchange
    /// (`app.exchange`, `app.exchange_type`, durable) and the user exchange
    /// (`user.exchange`, direct, durable).
    ///
    /// A conflict or declaration error → `Err` (start-up stops). If RabbitMQ
    /// is unreachable, returns `Ok` and keeps reconnecting in the background
    /// (health not ready): the process never exits because the broker is
    /// down. After every reconnect the topology is declared again
    /// (idempotent; many pods may declare at once).
    pub async fn start(
        config: Arc<Config>,
        health: Arc<Health>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<ControlPlane, ControlPlaneError> {
        let pod_id = config.pod_id();
        Self::start_as(config, health, shutdown, pod_id).await
    }

    /// [`ControlPlane::start`] with an explicit pod id instead of the one
    /// from the environment (tests running several gateways in one process).
    pub async fn start_as(
        config: Arc<Config>,
        health: Arc<Health>,
        shutdown: watch::Receiver<bool>,
        pod_id: String,
    ) -> Result<ControlPlane, ControlPlaneError> {
        let amqp = &config.amqp;
        let connect_timeout = Duration::from_millis(amqp.connect_timeout_ms.max(1));
        let pool_size = amqp.pool_size.max(1);
        let urls: Arc<Vec<String>> = Arc::new(amqp.urls().map(str::to_owned).collect());
        let tls = tls_config(&amqp.tls)?;
        health.set_pod_id(&pod_id);
        // Creating one connection may try every URL.
        let create_timeout =
            connect_timeout.saturating_mul(u32::try_from(urls.len()).unwrap_or(u32::MAX));
        let manager = PublishManager {
            urls: urls.clone(),
            tls: tls.clone(),
            name: format!("stomp-gateway {pod_id} publish"),
            connect_timeout,
        };
        let pool = PublishPool::builder(manager)
            .max_size(pool_size)
            .wait_timeout(Some(create_timeout))
            .create_timeout(Some(create_timeout))
            .recycle_timeout(Some(connect_timeout))
            .runtime(deadpool::Runtime::Tokio1)
            .build()
            .map_err(|e| ControlPlaneError::Declare {
                entity: "the AMQP connection pool".into(),
                detail: e.to_string(),
            })?;

        let mut known_exchanges: Vec<String> = BUILTIN_EXCHANGES
            .iter()
            .map(|s| (*s).to_owned())
            .chain([
                String::new(),
                config.app.exchange.clone(),
                config.user.exchange.clone(),
            ])
            .chain(config.topology.exchanges.iter().map(|x| x.name.clone()))
            .collect();
        known_exchanges.sort();
        known_exchanges.dedup();

        let (stopped, _) = watch::channel(false);
        let inner = Arc::new(Inner {
            id_prefix: format!("{pod_id}-{:08x}", rand::random::<u32>()),
            pod_id,
            next_message: AtomicU64::new(1),
            up: AtomicBool::new(false),
            down_reason: Mutex::new("not connected yet".into()),
            inflight: Arc::new(Semaphore::new(amqp.max_inflight_publishes.max(1))),
            pool,
            urls,
            tls,
            slots: (0..pool_size)
                .map(|_| tokio::sync::Mutex::new(None))
                .collect(),
            next_slot: AtomicUsize::new(0),
            next_serial: AtomicU64::new(1),
            known_exchanges,
            checked_exchanges: Mutex::new(HashMap::new()),
            stopped,
            config,
            health,
        });

        let first = match inner.connect().await {
            Ok((conn, node)) => match inner.declare(&conn).await {
                Ok(counts) => {
                    inner.log_declared(counts);
                    Some((conn, node))
                }
                Err(DeclareFailure::Entity(e)) => {
                    error!("AMQP topology declaration failed: {e}");
                    let _ = conn.close(200, "topology declaration failed".into()).await;
                    inner.pool.close();
                    return Err(e);
                }
                Err(DeclareFailure::Connection(e)) => {
                    inner.set_down(&e);
                    warn!("AMQP connection lost while declaring the topology: {e}; reconnecting in the background");
                    None
                }
            },
            Err(e) => {
                inner.set_down(&e);
                warn!(
                    "cannot connect to RabbitMQ over AMQP at {}: {e}; retrying in the background (not ready until connected)",
                    inner.masked_urls()
                );
                None
            }
        };
        if let Some((conn, node)) = &first {
            inner.warm_up().await;
            if conn.status().connected() {
                inner.set_up(node);
            }
        }
        tokio::spawn(supervise(inner.clone(), first, shutdown));
        Ok(ControlPlane { inner })
    }

    /// Publishes with a publisher confirm, bounded by
    /// `amqp.max_inflight_publishes` ([`PublishError::Overloaded`] when full)
    /// and `amqp.publish_timeout_ms`. Resolves after the broker acked (`Ok`)
    /// or nacked/returned (`Err`). A mandatory message that is returned is
    /// [`PublishError::Unroutable`] even though its confirm is an ack.
    pub async fn publish(&self, msg: OutboundMessage) -> Result<(), PublishError> {
        self.inner.clone().publish(msg).await
    }

    /// Whether the control connection is up and the topology declared.
    pub fn is_up(&self) -> bool {
        self.inner.up.load(Ordering::SeqCst)
    }

    /// This process's name ([`Config::pod_id`]: `server.pod_id`, else
    /// `POD_NAME`, else the host name, else `stomp-gateway`). Sent as the
    /// AMQP `app_id` of every publish.
    pub fn pod_id(&self) -> &str {
        &self.inner.pod_id
    }

    /// A new unique message id, `<pod>-<random>-<counter>`.
    pub fn new_message_id(&self) -> String {
        self.inner.new_message_id()
    }

    /// The configuration the control plane was started with.
    pub fn config(&self) -> &Arc<Config> {
        &self.inner.config
    }

    /// Resolves once the control plane has shut down (after `shutdown` turned
    /// true: sessions gone or the grace period over, connections closed).
    pub async fn closed(&self) {
        let mut rx = self.inner.stopped.subscribe();
        let _ = rx.wait_for(|stopped| *stopped).await;
    }
}

impl Inner {
    /// Every URL, passwords masked, in the order they are tried.
    fn masked_urls(&self) -> String {
        self.urls
            .iter()
            .map(|u| mask_url_password(u))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.config.amqp.connect_timeout_ms.max(1))
    }

    fn publish_timeout(&self) -> Duration {
        Duration::from_millis(self.config.amqp.publish_timeout_ms.max(1))
    }

    fn reason(&self) -> MutexGuard<'_, String> {
        self.down_reason
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Up, with the control connection on `node` (password masked).
    fn set_up(&self, node: &str) {
        self.up.store(true, Ordering::SeqCst);
        self.health.set_amqp_up_at(node);
    }

    fn set_down(&self, error: &str) {
        self.up.store(false, Ordering::SeqCst);
        *self.reason() = error.to_owned();
        self.health.set_amqp_down(error);
    }

    fn new_message_id(&self) -> String {
        let n = self.next_message.fetch_add(1, Ordering::Relaxed);
        format!("{}-{n}", self.id_prefix)
    }

    /// Opens the control connection to the first URL that answers; returns
    /// it and that node (its URL, password masked).
    async fn connect(&self) -> Result<(Connection, String), String> {
        let name = format!("stomp-gateway {} control", self.pod_id);
        let props = || ConnectionProperties::default().with_connection_name(name.clone().into());
        let (conn, i) = connect_any(&self.urls, &self.tls, props, self.connect_timeout()).await?;
        let node = self
            .urls
            .get(i)
            .map(|u| mask_url_password(u))
            .unwrap_or_default();
        let which = if i == 0 {
            "amqp.url".to_owned()
        } else {
            format!("amqp.failover_urls[{}]", i - 1)
        };
        info!(
            node = %node,
            "AMQP control plane connected to {node} ({which}) as \"{name}\""
        );
        Ok((conn, node))
    }

    fn log_declared(&self, c: TopologyCounts) {
        info!(
            exchanges = c.exchanges,
            queues = c.queues,
            bindings = c.bindings,
            "AMQP topology declared: {} exchanges, {} queues, {} bindings",
            c.exchanges,
            c.queues,
            c.bindings
        );
    }

    /// Declares the gateway's exchanges and `[topology]` on one channel of
    /// `conn`, stopping at the first failure.
    async fn declare(&self, conn: &Connection) -> Result<TopologyCounts, DeclareFailure> {
        let limit = self.connect_timeout().saturating_mul(2);
        match tokio::time::timeout(limit, declare_topology(conn, &self.config)).await {
            Ok(r) => r,
            Err(_) => Err(DeclareFailure::Connection(format!(
                "declaring the topology took longer than {} ms",
                limit.as_millis()
            ))),
        }
    }

    /// Opens every publish slot's channel so the first publishes do not
    /// wait for it. Failures are left for the publishes to retry.
    async fn warm_up(&self) {
        let opened =
            futures_util::future::join_all((0..self.slots.len()).map(|i| self.channel(i))).await;
        for (i, result) in opened.into_iter().enumerate() {
            if let Err(e) = result {
                debug!("AMQP publish channel {i} not opened yet: {e}");
            }
        }
    }

    /// The confirm-mode channel of slot `i`, opened (with a pooled
    /// connection) if it has none or its old one was closed.
    async fn channel(&self, i: usize) -> Result<(u64, Channel), PublishError> {
        let Some(slot) = self.slots.get(i) else {
            return Err(PublishError::Unavailable("no publish channel".into()));
        };
        let mut slot = slot.lock().await;
        if let Some(pc) = slot.as_ref() {
            if pc.channel.status().connected() && pc.conn.status().connected() {
                return Ok((pc.serial, pc.channel.clone()));
            }
        }
        // Give the old connection back first: the pool has one per slot.
        *slot = None;
        let conn = self.pool.get().await.map_err(|e| {
            PublishError::Unavailable(format!("cannot open an AMQP publish connection: {e}"))
        })?;
        let channel = conn.create_channel().await.map_err(unavailable)?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(unavailable)?;
        let serial = self.next_serial.fetch_add(1, Ordering::Relaxed);
        *slot = Some(PubChannel {
            conn,
            channel: channel.clone(),
            serial,
        });
        Ok((serial, channel))
    }

    /// Drops slot `i`'s channel if it is still the one with `serial`, closing
    /// it (the connection goes back to the pool).
    async fn reset_slot(&self, i: usize, serial: u64) {
        let Some(slot) = self.slots.get(i) else {
            return;
        };
        let old = {
            let mut slot = slot.lock().await;
            if slot.as_ref().is_some_and(|pc| pc.serial == serial) {
                slot.take()
            } else {
                None
            }
        };
        if let Some(pc) = old {
            if pc.channel.status().connected() {
                let _ = pc.channel.close(200, "replaced".into()).await;
            }
        }
    }

    /// Whether `exchange` can be published to without a check: built in,
    /// declared by the gateway, or recently found by a check.
    fn exchange_known(&self, exchange: &str) -> bool {
        if self
            .known_exchanges
            .binary_search_by(|k| k.as_str().cmp(exchange))
            .is_ok()
        {
            return true;
        }
        let cache = self
            .checked_exchanges
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        cache
            .get(exchange)
            .is_some_and(|at| at.elapsed() < EXCHANGE_CHECK_TTL)
    }

    /// Checks that `exchange` exists with a passive declare on a throw-away
    /// channel of slot `i`'s connection (a missing exchange closes that
    /// channel, not the shared one).
    async fn check_exchange(&self, i: usize, exchange: &ShortString) -> Result<(), PublishError> {
        let channel = {
            let Some(slot) = self.slots.get(i) else {
                return Err(PublishError::Unavailable("no publish channel".into()));
            };
            let slot = slot.lock().await;
            let Some(pc) = slot.as_ref() else {
                return Err(PublishError::Unavailable(
                    "the publish connection was closed".into(),
                ));
            };
            pc.conn.create_channel().await.map_err(unavailable)?
        };
        let result = channel
            .exchange_declare(
                exchange.clone(),
                ExchangeKind::Direct, // ignored by a passive declare
                ExchangeDeclareOptions {
                    passive: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await;
        match result {
            Ok(()) => {
                let _ = channel.close(200, "OK".into()).await;
                let mut cache = self
                    .checked_exchanges
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                if cache.len() >= EXCHANGE_CHECK_CAPACITY {
                    cache.clear();
                }
                cache.insert(exchange.as_str().to_owned(), Instant::now());
                Ok(())
            }
            Err(e) => Err(publish_error(&e)),
        }
    }

    async fn publish(self: Arc<Self>, msg: OutboundMessage) -> Result<(), PublishError> {
        if !self.up.load(Ordering::SeqCst) {
            return Err(PublishError::Unavailable(self.reason().clone()));
        }
        let exchange = short(&msg.exchange, "exchange name")?;
        let routing_key = short(&msg.routing_key, "routing key")?;
        let message_id = match &msg.message_id {
            Some(id) => id.clone(),
            None => self.new_message_id(),
        };
        let mut properties = BasicProperties::default()
            .with_message_id(short(&message_id, "message id")?)
            .with_app_id(short(&self.pod_id, "app id")?)
            .with_timestamp(
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
            );
        if let Some(ct) = &msg.content_type {
            properties = properties.with_content_type(short(ct, "content type")?);
        }
        if msg.persistent {
            properties = properties.with_delivery_mode(2);
        }
        if !msg.headers.is_empty() {
            let mut table = FieldTable::default();
            for (name, value) in &msg.headers {
                table.insert(
                    short(name, "header name")?,
                    AMQPValue::LongString(LongString::from(value.as_bytes())),
                );
            }
            properties = properties.with_headers(table);
        }

        let permit = self
            .inflight
            .clone()
            .try_acquire_owned()
            .map_err(|_| PublishError::Overloaded)?;
        let timeout = self.publish_timeout();
        let deadline = tokio::time::Instant::now() + timeout;
        let slot = self.next_slot.fetch_add(1, Ordering::Relaxed) % self.slots.len().max(1);

        let (serial, channel) = tokio::time::timeout_at(deadline, self.channel(slot))
            .await
            .map_err(|_| PublishError::Timeout)??;
        if !self.exchange_known(exchange.as_str()) {
            tokio::time::timeout_at(deadline, self.check_exchange(slot, &exchange))
                .await
                .map_err(|_| PublishError::Timeout)??;
        }
        let publish = channel.basic_publish(
            exchange,
            routing_key,
            BasicPublishOptions {
                mandatory: msg.mandatory,
                immediate: false,
            },
            &msg.body,
            properties,
        );
        let mut confirm = match tokio::time::timeout_at(deadline, publish).await {
            Err(_) => return Err(PublishError::Timeout),
            Ok(Err(e)) => {
                self.reset_slot(slot, serial).await;
                return Err(publish_error(&e));
            }
            Ok(Ok(confirm)) => confirm,
        };
        let confirmation = match tokio::time::timeout_at(deadline, &mut confirm).await {
            Ok(c) => c,
            Err(_) => {
                // Keep awaiting the confirm, holding the in-flight permit: the
                // broker still has the message. If it never answers, replace
                // the channel (which fails what is pending on it).
                let inner = self.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    let linger = timeout.saturating_mul(LINGER_FACTOR);
                    if tokio::time::timeout(linger, confirm).await.is_err() {
                        warn!("AMQP publish confirm still missing after {linger:?}: replacing publish channel {slot}");
                        inner.reset_slot(slot, serial).await;
                    }
                });
                return Err(PublishError::Timeout);
            }
        };
        drop(permit);
        match confirmation {
            Ok(Confirmation::Ack(None)) => Ok(()),
            Ok(Confirmation::Ack(Some(returned))) | Ok(Confirmation::Nack(Some(returned))) => {
                if returned.reply_code == 312 {
                    Err(PublishError::Unroutable {
                        exchange: msg.exchange,
                        routing_key: msg.routing_key,
                    })
                } else {
                    Err(PublishError::Rejected(format!(
                        "message returned: {} {}",
                        returned.reply_code, returned.reply_text
                    )))
                }
            }
            Ok(Confirmation::Nack(None)) => Err(PublishError::Nacked),
            Ok(Confirmation::NotRequested) => {
                self.reset_slot(slot, serial).await;
                Err(PublishError::Unavailable(
                    "the publish channel is not in confirm mode".into(),
                ))
            }
            Err(e) => {
                self.reset_slot(slot, serial).await;
                Err(publish_error(&e))
            }
        }
    }

    /// Closes everything once sessions are gone and confirms are in (or the
    /// grace period is over).
    async fn shut_down(&self, conn: Option<Connection>) {
        let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
        let all = self.config.amqp.max_inflight_publishes.max(1);
        while tokio::time::Instant::now() < deadline
            && (self.health.active_sessions() > 0 || self.inflight.available_permits() < all)
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.up.store(false, Ordering::SeqCst);
        *self.reason() = "the gateway is shutting down".into();
        for slot in &self.slots {
            let old = slot.lock().await.take();
            if let Some(pc) = old {
                let _ = pc
                    .conn
                    .close(200, "stomp-gateway shutting down".into())
                    .await;
            }
        }
        self.pool.close();
        if let Some(conn) = conn {
            if conn.status().connected() {
                let _ = conn.close(200, "stomp-gateway shutting down".into()).await;
            }
        }
        info!("AMQP control plane closed");
        self.stopped.send_replace(true);
    }
}

/// Keeps the control connection: watches it, and when it is lost marks the
/// control plane down, reconnects with backoff and declares the topology
/// again. Returns on shutdown.
async fn supervise(
    inner: Arc<Inner>,
    mut conn: Option<(Connection, String)>,
    mut shutdown: watch::Receiver<bool>,
) {
    let amqp = &inner.config.amqp;
    let mut attempt: u32 = 0;
    // Without a connection, `start` has just logged the first failure.
    let mut failing_since = conn.is_none().then(Instant::now);
    let mut logged_failure = conn.is_none();
    let mut last_log = Instant::now();
    loop {
        if let Some((c, node)) = conn.take() {
            match watch_connection(&c, &mut shutdown).await {
                None => return inner.shut_down(Some(c)).await,
                Some(reason) => {
                    warn!("AMQP connection to {node} lost: {reason}; reconnecting");
                    inner.set_down(&format!("connection lost: {reason}"));
                    drop(c);
                    attempt = 0;
                    failing_since = Some(Instant::now());
                    logged_failure = false;
                    last_log = Instant::now();
                }
            }
        }
        let delay = backoff(amqp.reconnect_initial_ms, amqp.reconnect_max_ms, attempt);
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = stopped(&mut shutdown) => return inner.shut_down(None).await,
        }
        attempt = attempt.saturating_add(1);
        let result = match inner.connect().await {
            Ok((c, node)) => match inner.declare(&c).await {
                Ok(counts) => {
                    inner.log_declared(counts);
                    Ok((c, node))
                }
                Err(DeclareFailure::Entity(e)) => {
                    let _ = c.close(200, "topology declaration failed".into()).await;
                    error!("AMQP topology declaration failed after reconnecting: {e}; retrying");
                    Err(e.to_string())
                }
                Err(DeclareFailure::Connection(e)) => Err(e),
            },
            Err(e) => Err(e),
        };
        match result {
            Ok((c, node)) => {
                inner.warm_up().await;
                inner.set_up(&node);
                if let Some(since) = failing_since.take() {
                    info!(
                        "AMQP control plane up again after {attempt} attempts ({:.1} s)",
                        since.elapsed().as_secs_f64()
                    );
                }
                attempt = 0;
                conn = Some((c, node));
            }
            Err(e) => {
                inner.set_down(&e);
                let since = *failing_since.get_or_insert_with(Instant::now);
                // The first failure, then one line per interval.
                if !logged_failure || last_log.elapsed() >= RECONNECT_LOG_INTERVAL {
                    logged_failure = true;
                    warn!(
                        "still cannot connect to RabbitMQ over AMQP at {} ({attempt} attempts in {:.0} s): {e}",
                        inner.masked_urls(),
                        since.elapsed().as_secs_f64()
                    );
                    last_log = Instant::now();
                }
            }
        }
    }
}

/// Waits until the connection is lost (`Some(reason)`) or shutdown is
/// requested (`None`).
async fn watch_connection(
    conn: &Connection,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<String> {
    let mut events = conn.events_listener();
    let mut tick = tokio::time::interval(WATCH_INTERVAL);
    let mut last_error: Option<String> = None;
    loop {
        if !conn.status().connected() {
            return Some(
                last_error
                    .unwrap_or_else(|| format!("connection {:?}", conn.status().state_name())),
            );
        }
        tokio::select! {
            () = stopped(shutdown) => return None,
            event = events.next() => match event {
                // Channel errors arrive here too: the state decides.
                Some(lapin::Event::Error(e)) => last_error = Some(e.to_string()),
                Some(_) => {}
                None => return Some(last_error.unwrap_or_else(|| "connection closed".into())),
            },
            _ = tick.tick() => {}
        }
    }
}

/// Resolves once shutdown is requested (or its sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await.map(|_| ());
}

/// Attempt `n` waits a random time up to `min(initial × 2ⁿ, max)`.
fn backoff(initial_ms: u64, max_ms: u64, attempt: u32) -> Duration {
    let cap = initial_ms
        .max(1)
        .saturating_mul(1u64 << attempt.min(20))
        .min(max_ms.max(1));
    Duration::from_millis(rand::random_range(0..=cap))
}

trait StateName {
    fn state_name(&self) -> String;
}

impl StateName for lapin::ConnectionStatus {
    fn state_name(&self) -> String {
        let s = if self.closed() {
            "closed"
        } else if self.closing() {
            "closing"
        } else if self.errored() {
            "failed"
        } else if self.connecting() || self.reconnecting() {
            "connecting"
        } else {
            "not connected"
        };
        s.to_owned()
    }
}

fn unavailable(e: lapin::Error) -> PublishError {
    PublishError::Unavailable(e.to_string())
}

/// A channel-level refusal (`NOT_FOUND - no exchange ...`) is
/// [`PublishError::Rejected`] with RabbitMQ's reply text; anything else means
/// the connection is gone.
fn publish_error(e: &lapin::Error) -> PublishError {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) if matches!(amqp.kind(), AMQPErrorKind::Soft(_)) => {
            PublishError::Rejected(amqp.get_message().to_string())
        }
        _ => PublishError::Unavailable(e.to_string()),
    }
}

fn short(s: &str, what: &str) -> Result<ShortString, PublishError> {
    ShortString::try_new(s).map_err(|_| {
        PublishError::Rejected(format!(
            "{what} is longer than 255 bytes ({} bytes)",
            s.len()
        ))
    })
}

fn field_table(args: &Arguments) -> Result<FieldTable, String> {
    let mut table = FieldTable::default();
    for (name, value) in args {
        let key = ShortString::try_new(name.as_str())
            .map_err(|_| format!("argument name {name:?} is longer than 255 bytes"))?;
        let value = match value {
            ArgValue::Bool(b) => AMQPValue::Boolean(*b),
            ArgValue::Int(i) => AMQPValue::LongLongInt(*i),
            ArgValue::Float(f) => AMQPValue::Double(*f),
            ArgValue::String(s) => AMQPValue::LongString(LongString::from(s.as_bytes())),
        };
        table.insert(key, value);
    }
    Ok(table)
}

fn exchange_kind(t: ExchangeType) -> ExchangeKind {
    match t {
        ExchangeType::Topic => ExchangeKind::Topic,
        ExchangeType::Direct => ExchangeKind::Direct,
        ExchangeType::Fanout => ExchangeKind::Fanout,
        ExchangeType::Headers => ExchangeKind::Headers,
    }
}

/// Maps a declaration error: `PRECONDITION_FAILED` is a conflict, other
/// broker refusals are declaration errors, the rest is a lost connection.
fn declare_failure(entity: String, e: &lapin::Error) -> DeclareFailure {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => {
            let detail = amqp.get_message().to_string();
            if matches!(
                amqp.kind(),
                AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)
            ) {
                DeclareFailure::Entity(ControlPlaneError::Conflict { entity, detail })
            } else {
                DeclareFailure::Entity(ControlPlaneError::Declare { entity, detail })
            }
        }
        _ => DeclareFailure::Connection(format!("while declaring {entity}: {e}")),
    }
}

fn name(entity: &str, s: &str) -> Result<ShortString, DeclareFailure> {
    ShortString::try_new(s).map_err(|_| {
        DeclareFailure::Entity(ControlPlaneError::Declare {
            entity: entity.to_owned(),
            detail: "name is longer than 255 bytes".into(),
        })
    })
}

fn arguments(entity: &str, args: &Arguments) -> Result<FieldTable, DeclareFailure> {
    field_table(args).map_err(|detail| {
        DeclareFailure::Entity(ControlPlaneError::Declare {
            entity: entity.to_owned(),
            detail,
        })
    })
}

/// Declares, in order: the app and user exchanges (unless the topology
/// declares them itself), the topology's exchanges, queues and bindings.
async fn declare_topology(
    conn: &Connection,
    config: &Config,
) -> Result<TopologyCounts, DeclareFailure> {
    let channel = conn
        .create_channel()
        .await
        .map_err(|e| DeclareFailure::Connection(format!("cannot open a channel: {e}")))?;
    let mut counts = TopologyCounts::default();
    let topology = &config.topology;
    let in_topology = |n: &str| topology.exchanges.iter().any(|x| x.name == n);

    let gateway_exchanges = [
        (&config.app.exchange, config.app.exchange_type),
        (&config.user.exchange, ExchangeType::Direct),
    ];
    for (exchange, kind) in gateway_exchanges {
        if in_topology(exchange) || BUILTIN_EXCHANGES.contains(&exchange.as_str()) {
            continue;
        }
        let entity = format!("exchange '{exchange}'");
        channel
            .exchange_declare(
                name(&entity, exchange)?,
                exchange_kind(kind),
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| declare_failure(entity, &e))?;
        counts.exchanges += 1;
    }
    for x in &topology.exchanges {
        let entity = format!("exchange '{}'", x.name);
        channel
            .exchange_declare(
                name(&entity, &x.name)?,
                exchange_kind(x.kind),
                ExchangeDeclareOptions {
                    passive: false,
                    durable: x.durable,
                    auto_delete: x.auto_delete,
                    internal: x.internal,
                    nowait: false,
                },
                arguments(&entity, &x.arguments)?,
            )
            .await
            .map_err(|e| declare_failure(entity, &e))?;
        counts.exchanges += 1;
    }
    for q in &topology.queues {
        let entity = format!("queue '{}'", q.name);
        channel
            .queue_declare(
                name(&entity, &q.name)?,
                QueueDeclareOptions {
                    passive: false,
                    durable: q.durable,
                    exclusive: q.exclusive,
                    auto_delete: q.auto_delete,
                    nowait: false,
                },
                arguments(&entity, &q.arguments)?,
            )
            .await
            .map_err(|e| declare_failure(entity, &e))?;
        counts.queues += 1;
    }
    for b in &topology.bindings {
        let result = if b.queue.is_empty() {
            let entity = format!(
                "binding of exchange '{}' to exchange '{}' with routing key '{}'",
                b.exchange, b.destination_exchange, b.routing_key
            );
            let r = channel
                .exchange_bind(
                    name(&entity, &b.destination_exchange)?,
                    name(&entity, &b.exchange)?,
                    name(&entity, &b.routing_key)?,
                    ExchangeBindOptions::default(),
                    arguments(&entity, &b.arguments)?,
                )
                .await;
            r.map_err(|e| declare_failure(entity, &e))
        } else {
            let entity = format!(
                "binding of exchange '{}' to queue '{}' with routing key '{}'",
                b.exchange, b.queue, b.routing_key
            );
            let r = channel
                .queue_bind(
                    name(&entity, &b.queue)?,
                    name(&entity, &b.exchange)?,
                    name(&entity, &b.routing_key)?,
                    QueueBindOptions::default(),
                    arguments(&entity, &b.arguments)?,
                )
                .await;
            r.map_err(|e| declare_failure(entity, &e))
        };
        result?;
        counts.bindings += 1;
    }
    let _ = channel.close(200, "OK".into()).await;
    Ok(counts)
}

/// How a destination is served by the publish API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DestinationKind {
    /// `/topic/...`
    Topic,
    /// `/exchange/...`
    Exchange,
    /// `/queue/...` or `/amq/queue/...`
    Queue,
    /// An application prefix.
    App,
    /// The user prefix.
    User,
}

impl DestinationKind {
    /// Whether a publish to it should be mandatory: a missing queue is an
    /// error for queues and application destinations; pub/sub and user
    /// destinations without subscribers are normal.
    pub fn mandatory(self) -> bool {
        matches!(self, DestinationKind::Queue | DestinationKind::App)
    }
}

/// A destination resolved to an exchange and routing key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub exchange: String,
    pub routing_key: String,
    pub kind: DestinationKind,
}

/// Maps a STOMP destination to (exchange, routing_key) the way RabbitMQ's
/// STOMP plugin does, for the publish API:
/// `/topic/x` → `("amq.topic", "x")`; `/exchange/e/rk` → `("e", "rk")`;
/// `/exchange/e` → `("e", "")`; `/queue/q` and `/amq/queue/q` → `("", "q")`;
/// application prefixes → (`app.exchange`, `app_routing_key`);
/// `/user/<name>/<rest>` → (`user.exchange`, `user_routing_key(name, rest)`);
/// anything else (including `/temp-queue/`) → `None`.
pub fn resolve_destination(config: &Config, destination: &str) -> Option<(String, String)> {
    resolve(config, destination).map(|r| (r.exchange, r.routing_key))
}

/// [`resolve_destination`] with the kind of destination.
pub fn resolve(config: &Config, destination: &str) -> Option<Resolved> {
    let resolved = |exchange: &str, routing_key: &str, kind| {
        Some(Resolved {
            exchange: exchange.to_owned(),
            routing_key: routing_key.to_owned(),
            kind,
        })
    };
    for prefix in &config.app.prefixes {
        if destination.starts_with(prefix.as_str()) {
            let key = app_routing_key(prefix, destination)?;
            return resolved(&config.app.exchange, &key, DestinationKind::App);
        }
    }
    if !config.user.prefix.is_empty() && destination.starts_with(config.user.prefix.as_str()) {
        let (user, rest) = split_user_send(&config.user.prefix, destination)?;
        let key = user_routing_key(&user, &rest);
        return resolved(&config.user.exchange, &key, DestinationKind::User);
    }
    let non_empty = |s: &str| (!s.is_empty()).then_some(());
    if let Some(name) = destination.strip_prefix("/topic/") {
        non_empty(name)?;
        return resolved("amq.topic", name, DestinationKind::Topic);
    }
    if let Some(rest) = destination.strip_prefix("/exchange/") {
        let (exchange, key) = rest.split_once('/').unwrap_or((rest, ""));
        non_empty(exchange)?;
        return resolved(exchange, key, DestinationKind::Exchange);
    }
    if let Some(queue) = destination
        .strip_prefix("/queue/")
        .or_else(|| destination.strip_prefix("/amq/queue/"))
    {
        non_empty(queue)?;
        return resolved("", queue, DestinationKind::Queue);
    }
    None
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod tests {
    use super::*;
    use crate::config::{BindingDecl, ExchangeDecl, QueueDecl};
    use lapin::options::{BasicGetOptions, ExchangeDeleteOptions, QueueDeleteOptions};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    pub(crate) const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

    /// A name no other test (or engineer) uses.
    pub(crate) fn unique(what: &str) -> String {
        format!("sg-test-{what}-{:016x}", rand::random::<u64>())
    }

    /// A config pointing at the local RabbitMQ with unique app/user exchanges.
    pub(crate) fn test_config() -> Config {
        let mut c = Config::default();
        c.amqp.url = AMQP_URL.into();
        c.amqp.pool_size = 2;
        c.amqp.publish_timeout_ms = 5_000;
        c.app.exchange = unique("app");
        c.user.exchange = unique("user");
        c
    }

    pub(crate) async fn admin_connection() -> Connection {
        Connection::connect(AMQP_URL, ConnectionProperties::default())
            .await
            .expect("test connection to RabbitMQ")
    }

    /// Deletes exchanges and queues (ignoring missing ones), each on its own
    /// channel since a failure closes the channel.
    pub(crate) async fn cleanup(exchanges: &[String], queues: &[String]) {
        let conn = admin_connection().await;
        for q in queues {
            let ch = conn.create_channel().await.unwrap();
            let _ = ch
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        for x in exchanges {
            let ch = conn.create_channel().await.unwrap();
            let _ = ch
                .exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
                .await;
        }
        let _ = conn.close(200, "OK".into()).await;
    }

    /// Runs `test` (at most 90 s), then deletes `exchanges` and `queues`
    /// whether it passed or not, then reports its outcome.
    pub(crate) async fn with_cleanup<F>(exchanges: Vec<String>, queues: Vec<String>, test: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let outcome = tokio::time::timeout(Duration::from_secs(90), tokio::spawn(test)).await;
        cleanup(&exchanges, &queues).await;
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(e)) => std::panic::resume_unwind(e.into_panic()),
            Err(_) => panic!("test timed out"),
        }
    }

    async fn exchange_exists(conn: &Connection, name: &str) -> bool {
        let ch = conn.create_channel().await.unwrap();
        ch.exchange_declare(
            name.into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .is_ok()
    }

    async fn queue_exists(conn: &Connection, name: &str) -> bool {
        let ch = conn.create_channel().await.unwrap();
        ch.queue_declare(
            name.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .is_ok()
    }

    /// GET on the management API with guest:guest; (status, body).
    pub(crate) async fn management_get(path: &str) -> (u16, String) {
        management("GET", path).await
    }

    /// A body-less request to the management API with guest:guest.
    pub(crate) async fn management(method: &str, path: &str) -> (u16, String) {
        let mut s = tokio::net::TcpStream::connect("127.0.0.1:15672")
            .await
            .expect("management API");
        // guest:guest
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:15672\r\nAuthorization: Basic Z3Vlc3Q6Z3Vlc3Q=\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
            .await
            .unwrap()
            .unwrap();
        let text = String::from_utf8_lossy(&raw).into_owned();
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        (status, body)
    }

    /// Fetches one message from `queue`, waiting up to 5 s.
    pub(crate) async fn get_one(conn: &Connection, queue: &str) -> lapin::message::Delivery {
        let ch = conn.create_channel().await.unwrap();
        for _ in 0..100 {
            if let Some(m) = ch
                .basic_get(queue.into(), BasicGetOptions { no_ack: true })
                .await
                .unwrap()
            {
                return m.delivery;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no message on {queue}");
    }

    fn args(pairs: &[(&str, ArgValue)]) -> Arguments {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect()
    }

    #[test]
    fn resolve_destination_table() {
        let mut c = Config::default();
        c.app.exchange = "app.x".into();
        c.user.exchange = "user.x".into();
        let r = |d: &str| resolve_destination(&c, d);
        let some = |e: &str, k: &str| Some((e.to_owned(), k.to_owned()));
        assert_eq!(r("/topic/room.42"), some("amq.topic", "room.42"));
        assert_eq!(
            r("/exchange/adme.exchange/room.42"),
            some("adme.exchange", "room.42")
        );
        assert_eq!(r("/exchange/e/a/b"), some("e", "a/b"));
        assert_eq!(r("/exchange/e"), some("e", ""));
        assert_eq!(r("/exchange/e/"), some("e", ""));
        assert_eq!(r("/queue/q1"), some("", "q1"));
        assert_eq!(r("/amq/queue/q2"), some("", "q2"));
        assert_eq!(
            r("/app/chat.sendMessage"),
            some("app.x", "chat.sendMessage")
        );
        assert_eq!(r("/app/chat/send"), some("app.x", "chat.send"));
        assert_eq!(
            r("/user/alice/queue/notifications"),
            some("user.x", "alice.queue.notifications")
        );
        assert_eq!(r("/user/a.b/queue/x"), some("user.x", "a%2Eb.queue.x"));
        for none in [
            "/temp-queue/x",
            "/reply-queue/x",
            "/topic/",
            "/exchange/",
            "/exchange//rk",
            "/queue/",
            "/amq/queue/",
            "/app/",
            "/user/alice",
            "/user//queue/x",
            "/nowhere/x",
            "topic/x",
            "",
        ] {
            assert_eq!(r(none), None, "{none:?}");
        }
        assert_eq!(
            resolve(&c, "/topic/x").unwrap().kind,
            DestinationKind::Topic
        );
        assert!(!DestinationKind::Topic.mandatory());
        assert!(!DestinationKind::Exchange.mandatory());
        assert!(!DestinationKind::User.mandatory());
        assert!(DestinationKind::Queue.mandatory());
        assert!(DestinationKind::App.mandatory());

        // Configured prefixes win.
        c.app.prefixes = vec!["/backend/".into()];
        c.user.prefix = "/u/".into();
        let r = |d: &str| resolve_destination(&c, d);
        assert_eq!(r("/backend/a/b"), some("app.x", "a.b"));
        assert_eq!(r("/app/x"), None);
        assert_eq!(r("/u/bob/queue/x"), some("user.x", "bob.queue.x"));
    }

    #[test]
    fn backoff_stays_within_caps() {
        for attempt in 0..40 {
            let d = backoff(500, 30_000, attempt);
            assert!(d <= Duration::from_millis(30_000));
            if attempt == 0 {
                assert!(d <= Duration::from_millis(500));
            }
        }
    }

    #[test]
    fn pod_id_comes_from_the_config() {
        let mut c = Config::default();
        let id = c.pod_id();
        assert!(!id.is_empty() && id.len() <= 100);
        c.server.pod_id = "gw-1".into();
        assert_eq!(c.pod_id(), "gw-1");
    }

    #[tokio::test]
    async fn topology_is_declared_idempotently_and_conflicts_are_fatal() {
        let mut c = test_config();
        let exchange = unique("ex");
        let exchange2 = unique("ex2");
        let headers = unique("hdr");
        let queue = unique("q");
        let hqueue = unique("hq");
        c.topology.exchanges = vec![
            ExchangeDecl {
                name: exchange.clone(),
                ..Default::default()
            },
            ExchangeDecl {
                name: exchange2.clone(),
                kind: ExchangeType::Fanout,
                ..Default::default()
            },
            ExchangeDecl {
                name: headers.clone(),
                kind: ExchangeType::Headers,
                ..Default::default()
            },
        ];
        c.topology.queues = vec![
            QueueDecl {
                name: queue.clone(),
                arguments: args(&[
                    ("x-queue-type", ArgValue::String("quorum".into())),
                    ("x-message-ttl", ArgValue::Int(60_000)),
                ]),
                ..Default::default()
            },
            QueueDecl {
                name: hqueue.clone(),
                auto_delete: true,
                durable: false,
                ..Default::default()
            },
        ];
        c.topology.bindings = vec![
            BindingDecl {
                exchange: exchange.clone(),
                queue: queue.clone(),
                routing_key: "room.*".into(),
                ..Default::default()
            },
            BindingDecl {
                exchange: exchange.clone(),
                destination_exchange: exchange2.clone(),
                routing_key: "audit.#".into(),
                ..Default::default()
            },
            BindingDecl {
                exchange: headers.clone(),
                queue: hqueue.clone(),
                arguments: args(&[
                    ("x-match", ArgValue::String("any".into())),
                    ("kind", ArgValue::String("alert".into())),
                ]),
                ..Default::default()
            },
        ];
        c.validate().expect("test topology is valid");
        let all_exchanges = vec![
            exchange.clone(),
            exchange2.clone(),
            headers.clone(),
            c.app.exchange.clone(),
            c.user.exchange.clone(),
        ];
        let all_queues = vec![queue.clone(), hqueue.clone()];
        let (xs, qs) = (all_exchanges.clone(), all_queues.clone());

        with_cleanup(all_exchanges, all_queues, async move {
            let health = Arc::new(Health::new());
            let (_tx, rx) = watch::channel(false);
            let config = Arc::new(c.clone());
            let cp = ControlPlane::start(config.clone(), health.clone(), rx.clone())
                .await
                .expect("first start declares");
            assert!(cp.is_up());
            assert!(health.amqp_up());

            let conn = admin_connection().await;
            for x in &xs {
                assert!(exchange_exists(&conn, x).await, "exchange {x}");
            }
            for q in &qs {
                assert!(queue_exists(&conn, q).await, "queue {q}");
            }
            let (status, body) =
                management_get(&format!("/api/bindings/%2f/e/{exchange}/q/{queue}")).await;
            assert_eq!(status, 200, "{body}");
            assert!(body.contains("room.*"), "{body}");
            let (status, body) =
                management_get(&format!("/api/bindings/%2f/e/{exchange}/e/{exchange2}")).await;
            assert_eq!(status, 200, "{body}");
            assert!(body.contains("audit.#"), "{body}");
            let (status, body) =
                management_get(&format!("/api/bindings/%2f/e/{headers}/q/{hqueue}")).await;
            assert_eq!(status, 200, "{body}");
            assert!(body.contains("\"x-match\":\"any\""), "{body}");
            let (status, body) = management_get(&format!("/api/queues/%2f/{queue}")).await;
            assert_eq!(status, 200, "{body}");
            assert!(body.contains("\"x-queue-type\":\"quorum\""), "{body}");
            assert!(body.contains("\"x-message-ttl\":60000"), "{body}");

            // Same config again: a no-op.
            let cp2 = ControlPlane::start(config.clone(), Arc::new(Health::new()), rx.clone())
                .await
                .expect("second start is a no-op");
            assert!(cp2.is_up());

            // A queue's durable flag flipped: a conflict naming the queue.
            for (i, name) in [(0, &queue), (1, &hqueue)] {
                let mut flipped = c.clone();
                flipped.topology.queues[i].durable = !flipped.topology.queues[i].durable;
                let e = ControlPlane::start(Arc::new(flipped), Arc::new(Health::new()), rx.clone())
                    .await
                    .expect_err("conflict");
                let text = e.to_string();
                assert!(matches!(e, ControlPlaneError::Conflict { .. }), "{e:?}");
                assert!(text.contains(&format!("queue '{name}'")), "{text}");
                assert!(text.contains("durable"), "{text}");
            }
            // A different argument is a conflict too.
            let mut ttl = c.clone();
            ttl.topology.queues[0]
                .arguments
                .insert("x-message-ttl".into(), ArgValue::Int(1_000));
            let e = ControlPlane::start(Arc::new(ttl), Arc::new(Health::new()), rx.clone())
                .await
                .expect_err("conflict");
            assert!(e.to_string().contains("x-message-ttl"), "{e}");

            // A binding to a missing exchange: a declaration error.
            let mut missing = c.clone();
            missing.topology.bindings[0].exchange = unique("missing");
            let e = ControlPlane::start(Arc::new(missing), Arc::new(Health::new()), rx.clone())
                .await
                .expect_err("missing exchange");
            assert!(matches!(e, ControlPlaneError::Declare { .. }), "{e:?}");
            assert!(e.to_string().contains("NOT_FOUND"), "{e}");
            let _ = conn.close(200, "OK".into()).await;
        })
        .await;
    }

    #[tokio::test]
    async fn publish_confirms_returns_and_rejections() {
        let mut c = test_config();
        let exchange = unique("pubex");
        let queue = unique("pubq");
        c.topology.exchanges = vec![ExchangeDecl {
            name: exchange.clone(),
            durable: false,
            auto_delete: false,
            ..Default::default()
        }];
        c.topology.queues = vec![QueueDecl {
            name: queue.clone(),
            durable: false,
            ..Default::default()
        }];
        c.topology.bindings = vec![BindingDecl {
            exchange: exchange.clone(),
            queue: queue.clone(),
            routing_key: "room.*".into(),
            ..Default::default()
        }];
        let all_exchanges = vec![
            exchange.clone(),
            c.app.exchange.clone(),
            c.user.exchange.clone(),
        ];
        let all_queues = vec![queue.clone()];
        with_cleanup(all_exchanges, all_queues, async move {
            let (_tx, rx) = watch::channel(false);
            let cp = ControlPlane::start(Arc::new(c), Arc::new(Health::new()), rx)
                .await
                .expect("start");
            let msg = |rk: &str, mandatory: bool| OutboundMessage {
                exchange: exchange.clone(),
                routing_key: rk.into(),
                headers: vec![
                    ("x-custom".into(), "v1".into()),
                    ("k2".into(), "v 2".into()),
                ],
                content_type: Some("application/json".into()),
                message_id: None,
                body: Bytes::from_static(br#"{"text":"hi"}"#),
                mandatory,
                persistent: true,
            };
            // Ack, then read it back.
            cp.publish(msg("room.1", true)).await.expect("acked");
            let conn = admin_connection().await;
            let d = get_one(&conn, &queue).await;
            assert_eq!(d.data, br#"{"text":"hi"}"#);
            let p = &d.properties;
            assert_eq!(
                p.content_type().as_ref().map(|s| s.as_str()),
                Some("application/json")
            );
            assert_eq!(p.app_id().as_ref().map(|s| s.as_str()), Some(cp.pod_id()));
            let id = p
                .message_id()
                .as_ref()
                .map(|s| s.as_str().to_owned())
                .unwrap();
            assert!(id.starts_with(cp.pod_id()), "{id}");
            assert_eq!(*p.delivery_mode(), Some(2));
            assert!(p.timestamp().unwrap() > 1_600_000_000);
            let headers = p.headers().as_ref().unwrap();
            assert_eq!(
                headers.inner().get("x-custom"),
                Some(&AMQPValue::LongString("v1".into()))
            );
            assert_eq!(
                headers.inner().get("k2"),
                Some(&AMQPValue::LongString("v 2".into()))
            );

            // An explicit message id is kept.
            let mut m = msg("room.2", true);
            m.message_id = Some("fixed-id-1".into());
            m.persistent = false;
            cp.publish(m).await.expect("acked");
            let d = get_one(&conn, &queue).await;
            assert_eq!(
                d.properties.message_id().as_ref().map(|s| s.as_str()),
                Some("fixed-id-1")
            );
            assert_eq!(*d.properties.delivery_mode(), None);

            // Mandatory and unbound: unroutable. Not mandatory: fine.
            let e = cp
                .publish(msg("nobody.home", true))
                .await
                .expect_err("returned");
            assert_eq!(
                e,
                PublishError::Unroutable {
                    exchange: exchange.clone(),
                    routing_key: "nobody.home".into()
                }
            );
            assert!(e.to_string().contains("no queue is bound"), "{e}");
            cp.publish(msg("nobody.home", false))
                .await
                .expect("dropped quietly");

            // A missing exchange: rejected, and publishing goes on.
            let mut m = msg("x", false);
            m.exchange = unique("no-such-exchange");
            for _ in 0..3 {
                let e = cp.publish(m.clone()).await.expect_err("no exchange");
                assert!(matches!(e, PublishError::Rejected(_)), "{e:?}");
                assert!(e.to_string().contains("NOT_FOUND"), "{e}");
            }
            for i in 0..4 {
                cp.publish(msg(&format!("room.after{i}"), true))
                    .await
                    .expect("channel still works");
            }
            // Over-long names are rejected, not a panic.
            let mut m = msg("x", false);
            m.routing_key = "k".repeat(300);
            assert!(matches!(
                cp.publish(m).await,
                Err(PublishError::Rejected(_))
            ));
            let mut m = msg("room.1", false);
            m.headers = vec![("h".repeat(256), "v".into())];
            assert!(matches!(
                cp.publish(m).await,
                Err(PublishError::Rejected(_))
            ));
            let _ = conn.close(200, "OK".into()).await;
        })
        .await;
    }

    #[tokio::test]
    async fn channel_closed_by_the_broker_is_replaced() {
        let mut c = test_config();
        c.amqp.pool_size = 1;
        let exchange = unique("gone");
        let queue = unique("goneq");
        c.topology.exchanges = vec![ExchangeDecl {
            name: exchange.clone(),
            durable: false,
            ..Default::default()
        }];
        c.topology.queues = vec![QueueDecl {
            name: queue.clone(),
            durable: false,
            ..Default::default()
        }];
        let xs = vec![
            exchange.clone(),
            c.app.exchange.clone(),
            c.user.exchange.clone(),
        ];
        with_cleanup(xs, vec![queue.clone()], async move {
            let (_tx, rx) = watch::channel(false);
            let cp = ControlPlane::start(Arc::new(c), Arc::new(Health::new()), rx)
                .await
                .expect("start");
            let msg = |exchange: &str, rk: &str| OutboundMessage {
                exchange: exchange.into(),
                routing_key: rk.into(),
                headers: vec![],
                content_type: None,
                message_id: None,
                body: Bytes::from_static(b"x"),
                mandatory: false,
                persistent: false,
            };
            cp.publish(msg(&exchange, "a"))
                .await
                .expect("exchange exists");
            // Deleted behind the gateway's back: no check happens for a
            // declared exchange, so the broker closes the shared channel.
            cleanup(std::slice::from_ref(&exchange), &[]).await;
            let e = cp.publish(msg(&exchange, "a")).await.expect_err("gone");
            assert!(matches!(e, PublishError::Rejected(_)), "{e:?}");
            assert!(e.to_string().contains("NOT_FOUND"), "{e}");
            // The channel is replaced on the next publish.
            let mut m = msg("", &queue);
            m.mandatory = true;
            cp.publish(m).await.expect("new channel");
        })
        .await;
    }

    /// The management API's name of the connection whose client-provided
    /// name is `connection_name` (waits for it to show up).
    async fn connection_named(connection_name: &str) -> String {
        for _ in 0..100 {
            let (_, body) =
                management_get("/api/connections?columns=name,client_properties.connection_name")
                    .await;
            let list: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            if let Some(found) = list.as_array().into_iter().flatten().find(|c| {
                c["client_properties"]["connection_name"].as_str() == Some(connection_name)
            }) {
                return found["name"].as_str().unwrap().to_owned();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("no connection named {connection_name:?}");
    }

    fn url_encode(s: &str) -> String {
        s.bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect()
    }

    #[tokio::test]
    async fn reconnects_and_declares_again_after_the_connection_is_lost() {
        let mut c = test_config();
        c.amqp.reconnect_initial_ms = 50;
        c.amqp.reconnect_max_ms = 200;
        let queue = unique("reconq");
        c.topology.queues = vec![QueueDecl {
            name: queue.clone(),
            durable: false,
            ..Default::default()
        }];
        let app_exchange = c.app.exchange.clone();
        let xs = vec![c.app.exchange.clone(), c.user.exchange.clone()];
        with_cleanup(xs, vec![queue.clone()], async move {
            let pod = unique("pod");
            let health = Arc::new(Health::new());
            let (tx, rx) = watch::channel(false);
            let cp = ControlPlane::start_as(Arc::new(c), health.clone(), rx, pod.clone())
                .await
                .expect("start");
            assert!(cp.is_up());
            let name = connection_named(&format!("stomp-gateway {pod} control")).await;
            // Someone deletes the app exchange; then the connection drops.
            cleanup(std::slice::from_ref(&app_exchange), &[]).await;
            let (status, body) =
                management("DELETE", &format!("/api/connections/{}", url_encode(&name))).await;
            assert!(status == 204 || status == 200, "{status} {body}");
            let mut saw_down = false;
            for _ in 0..200 {
                if !cp.is_up() {
                    saw_down = true;
                }
                if saw_down && cp.is_up() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert!(saw_down, "the loss was noticed");
            assert!(cp.is_up(), "reconnected");
            assert!(health.amqp_up());
            assert!(
                health
                    .amqp_last_error()
                    .unwrap()
                    .contains("connection lost"),
                "{:?}",
                health.amqp_last_error()
            );
            let conn = admin_connection().await;
            assert!(
                exchange_exists(&conn, &app_exchange).await,
                "declared again"
            );
            let _ = conn.close(200, "OK".into()).await;
            // Publishing works on fresh channels.
            cp.publish(OutboundMessage {
                exchange: String::new(),
                routing_key: queue.clone(),
                headers: vec![],
                content_type: None,
                message_id: None,
                body: Bytes::from_static(b"again"),
                mandatory: true,
                persistent: false,
            })
            .await
            .expect("publish after reconnect");
            tx.send(true).unwrap();
            tokio::time::timeout(Duration::from_secs(15), cp.closed())
                .await
                .expect("closed");
            assert!(!cp.is_up());
        })
        .await;
    }

    #[tokio::test]
    async fn overloaded_when_inflight_limit_is_reached() {
        let mut c = test_config();
        c.amqp.max_inflight_publishes = 1;
        let queue = unique("ovq");
        c.topology.queues = vec![QueueDecl {
            name: queue.clone(),
            durable: false,
            ..Default::default()
        }];
        let xs = vec![c.app.exchange.clone(), c.user.exchange.clone()];
        let q2 = queue.clone();
        with_cleanup(xs, vec![queue], async move {
            let (_tx, rx) = watch::channel(false);
            let cp = ControlPlane::start(Arc::new(c), Arc::new(Health::new()), rx)
                .await
                .expect("start");
            let msg = OutboundMessage {
                exchange: String::new(),
                routing_key: q2,
                headers: vec![],
                content_type: None,
                message_id: None,
                body: Bytes::from_static(b"x"),
                mandatory: true,
                persistent: false,
            };
            let (a, b) = tokio::join!(cp.publish(msg.clone()), cp.publish(msg.clone()));
            let results = [a, b];
            assert!(results.iter().any(|r| r.is_ok()), "{results:?}");
            assert!(
                results.contains(&Err(PublishError::Overloaded)),
                "{results:?}"
            );
            cp.publish(msg)
                .await
                .expect("permit released after the confirm");
        })
        .await;
    }

    #[test]
    fn tls_config_reads_and_checks_the_files() {
        use crate::broker::tests::{test_pki, Dir};
        let dir = Dir::new("amqp-tls");
        let pki = test_pki(&["127.0.0.1"]);
        let ca = dir.write("ca.pem", &pki.ca_pem);
        let cert = dir.write("cert.pem", &pki.cert_pem);
        let key = dir.write("key.pem", &pki.key_pem);
        assert_eq!(
            tls_config(&AmqpTlsConfig::default()).unwrap(),
            OwnedTLSConfig::default()
        );
        let t = tls_config(&AmqpTlsConfig {
            ca_file: ca.clone(),
            cert_file: cert.clone(),
            key_file: key.clone(),
        })
        .unwrap();
        assert_eq!(t.cert_chain.as_deref(), Some(pki.ca_pem.as_str()));
        assert_eq!(
            t.identity,
            Some(OwnedIdentity::PKCS8 {
                pem: pki.cert_pem.clone().into_bytes(),
                key: pki.key_pem.clone().into_bytes(),
            })
        );
        let e = tls_config(&AmqpTlsConfig {
            ca_file: key.clone(),
            ..AmqpTlsConfig::default()
        })
        .unwrap_err();
        assert_eq!(e.key(), "amqp.tls.ca_file", "{e}");
        let e = tls_config(&AmqpTlsConfig {
            key_file: key,
            ..AmqpTlsConfig::default()
        })
        .unwrap_err();
        assert_eq!(e.key(), "amqp.tls.cert_file", "{e}");
    }

    #[tokio::test]
    async fn fails_over_to_the_next_url_and_names_the_node() {
        let mut c = test_config();
        c.amqp.url = "amqp://guest:guest@127.0.0.1:1/%2f".into();
        c.amqp.failover_urls = vec![AMQP_URL.into()];
        c.amqp.pool_size = 1;
        let xs = vec![c.app.exchange.clone(), c.user.exchange.clone()];
        with_cleanup(xs, vec![], async move {
            let health = Arc::new(Health::new());
            let (tx, rx) = watch::channel(false);
            let cp = ControlPlane::start(Arc::new(c), health.clone(), rx)
                .await
                .expect("start");
            assert!(cp.is_up());
            assert_eq!(
                health.amqp_node().as_deref(),
                Some("amqp://guest:******@127.0.0.1:5672/%2f")
            );
            assert_eq!(
                health.details()["amqp"]["node"],
                "amqp://guest:******@127.0.0.1:5672/%2f"
            );
            assert_eq!(health.pod_id().as_deref(), Some(cp.pod_id()));
            // The publish pool fails over too.
            cp.publish(OutboundMessage {
                exchange: "amq.topic".into(),
                routing_key: "sg-test.failover".into(),
                headers: vec![],
                content_type: None,
                message_id: None,
                body: Bytes::from_static(b"x"),
                mandatory: false,
                persistent: false,
            })
            .await
            .expect("published through the failover node");
            tx.send(true).unwrap();
            tokio::time::timeout(Duration::from_secs(15), cp.closed())
                .await
                .expect("closed");
        })
        .await;
    }

    /// Needs RabbitMQ's AMQP port 5672, reached through an in-process TLS
    /// terminator.
    #[tokio::test]
    async fn connects_over_tls_with_the_configured_ca() {
        use crate::broker::tests::{test_pki, tls_terminator, Dir};
        let dir = Dir::new("amqps");
        let pki = test_pki(&["127.0.0.1"]);
        let addr = tls_terminator(&pki, "127.0.0.1:5672").await;
        let mut c = test_config();
        c.amqp.url = format!("amqps://guest:guest@{addr}/%2f");
        c.amqp.pool_size = 1;
        c.amqp.tls.ca_file = dir.write("ca.pem", &pki.ca_pem);
        let untrusted = {
            let mut u = c.clone();
            let other = test_pki(&["127.0.0.1"]);
            u.amqp.tls.ca_file = dir.write("other.pem", &other.ca_pem);
            u.amqp.reconnect_initial_ms = 50;
            u.amqp.reconnect_max_ms = 100;
            u
        };
        let xs = vec![c.app.exchange.clone(), c.user.exchange.clone()];
        with_cleanup(xs, vec![], async move {
            let health = Arc::new(Health::new());
            let (tx, rx) = watch::channel(false);
            let cp = ControlPlane::start(Arc::new(c), health.clone(), rx)
                .await
                .expect("start");
            assert!(cp.is_up(), "{}", health.details());
            assert_eq!(
                health.amqp_node(),
                Some(format!("amqps://guest:******@{addr}/%2f"))
            );
            cp.publish(OutboundMessage {
                exchange: "amq.topic".into(),
                routing_key: "sg-test.tls".into(),
                headers: vec![],
                content_type: None,
                message_id: None,
                body: Bytes::from_static(b"x"),
                mandatory: false,
                persistent: false,
            })
            .await
            .expect("published over TLS");
            tx.send(true).unwrap();
            tokio::time::timeout(Duration::from_secs(15), cp.closed())
                .await
                .expect("closed");

            // Another CA: not up, and the reason is the certificate.
            let health = Arc::new(Health::new());
            let (tx, rx) = watch::channel(false);
            let cp = ControlPlane::start(Arc::new(untrusted), health.clone(), rx)
                .await
                .expect("an untrusted certificate is not fatal");
            assert!(!cp.is_up());
            let e = health.amqp_last_error().unwrap_or_default();
            assert!(e.to_lowercase().contains("certificate"), "{e}");
            assert!(!e.contains("guest:guest"), "{e}");
            tx.send(true).unwrap();
            tokio::time::timeout(Duration::from_secs(15), cp.closed())
                .await
                .expect("closed");
        })
        .await;
    }

    #[tokio::test]
    async fn unreachable_broker_starts_down_and_publishes_fail_fast() {
        let mut c = test_config();
        // Nothing listens here (port 1 is tcpmux, not served).
        c.amqp.url = "amqp://guest:guest@127.0.0.1:1/%2f".into();
        c.amqp.reconnect_initial_ms = 50;
        c.amqp.reconnect_max_ms = 100;
        let health = Arc::new(Health::new());
        health.set_system_link_up("127.0.0.1:61613");
        let (tx, rx) = watch::channel(false);
        let started = Instant::now();
        let cp = ControlPlane::start(Arc::new(c), health.clone(), rx)
            .await
            .expect("unreachable is not fatal");
        assert!(started.elapsed() < Duration::from_secs(3));
        assert!(!cp.is_up());
        assert!(!health.is_ready());
        assert!(health.amqp_last_error().is_some());
        let e = cp
            .publish(OutboundMessage {
                exchange: "amq.topic".into(),
                routing_key: "x".into(),
                headers: vec![],
                content_type: None,
                message_id: None,
                body: Bytes::new(),
                mandatory: false,
                persistent: false,
            })
            .await
            .expect_err("down");
        assert!(matches!(e, PublishError::Unavailable(_)), "{e:?}");
        // Still retrying; shutdown stops it.
        tokio::time::sleep(Duration::from_millis(300)).await;
        tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), cp.closed())
            .await
            .expect("closed after shutdown");
    }
}
