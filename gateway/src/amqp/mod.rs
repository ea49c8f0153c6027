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

mod connection;
mod publish;
mod supervisor;
#[cfg(test)]
pub(crate) mod tests;
mod topology;

use connection::*;
use publish::*;
use supervisor::*;
use topology::*;

use crate::config::{
    mask_url_password, ArgValue, Arguments, Config, ExchangeType, BUILTIN_EXCHANGES,
};
use crate::health::Health;
use crate::settings::Settings;
use bytes::Bytes;
use deadpool::managed::{Metrics, RecycleError, RecycleResult};
use futures_util::StreamExt;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeBindOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::tcp::OwnedTLSConfig;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{watch, Semaphore};
use tracing::{debug, error, info, warn};

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
    /// Publish with exactly these properties (a relayed SEND mapped the
    /// way RabbitMQ's STOMP plugin maps it, [`crate::fanout::mapping::send_properties`]):
    /// `headers`, `content_type`, `message_id` and `persistent` are then
    /// ignored, and no message id, app id or timestamp is added.
    pub properties: Option<BasicProperties>,
}

/// A message's place in one publisher's sequence
/// ([`ControlPlane::publish_in`]).
#[derive(Debug)]
pub struct Sequence {
    /// Picks the publish channel; the same key, the same channel.
    pub key: u64,
    /// Resolves (or is dropped) once the previous message was handed to
    /// the channel.
    pub after: Option<tokio::sync::oneshot::Receiver<()>>,
    /// Dropped once this message was handed to the channel (or failed
    /// before), releasing the next.
    pub sent: tokio::sync::oneshot::Sender<()>,
}

impl Sequence {
    /// The next place after `last` (the previous message's `sent`
    /// receiver, replaced by this one's).
    pub fn next(key: u64, last: &mut Option<tokio::sync::oneshot::Receiver<()>>) -> Sequence {
        let (sent, rx) = tokio::sync::oneshot::channel();
        Sequence {
            key,
            after: last.replace(rx),
            sent,
        }
    }
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
}

struct Inner {
    config: Arc<Config>,
    health: Arc<Health>,
    metrics: Arc<crate::metrics::Metrics>,
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
        settings: &Settings,
        health: Arc<Health>,
        metrics: Arc<crate::metrics::Metrics>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<ControlPlane, ControlPlaneError> {
        let inner = Self::build(settings, health, metrics)?;
        let started = Instant::now();
        let first = match inner.connect().await {
            Ok((conn, node)) => match inner.declare(&conn).await {
                Ok(counts) => {
                    inner.log_declared(counts);
                    let took = started.elapsed();
                    inner
                        .metrics
                        .broker_connected(crate::metrics::Link::Amqp, took, false);
                    Some((conn, node))
                }
                Err(DeclareFailure::Entity(e)) => {
                    // Start-up stops with this error; main logs it, once.
                    inner.count_declare_failure(&e);
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

    /// A control plane that is off (`broker.mode = "embedded"` without an
    /// explicit `amqp.url`): it never connects, every publish is
    /// [`PublishError::Unavailable`] saying why, it does not count for
    /// readiness, and [`ControlPlane::closed`] resolves at once.
    pub fn off(
        settings: &Settings,
        health: Arc<Health>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Result<ControlPlane, ControlPlaneError> {
        let inner = Self::build(settings, health, metrics)?;
        *inner.reason() =
            "no AMQP control plane: broker.mode is \"embedded\" and amqp.url is not set".to_owned();
        inner.stopped.send_replace(true);
        Ok(ControlPlane { inner })
    }

    /// The control plane's state, not connected yet.
    fn build(
        settings: &Settings,
        health: Arc<Health>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Result<Arc<Inner>, ControlPlaneError> {
        let config = settings.config.clone();
        let pod_id = settings.pod.clone();
        let amqp = &config.amqp;
        let connect_timeout = Duration::from_millis(amqp.connect_timeout_ms.max(1));
        let pool_size = amqp.pool_size.max(1);
        let urls: Arc<Vec<String>> = Arc::new(amqp.urls().map(str::to_owned).collect());
        let tls = settings.amqp_tls.clone();
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
            metrics,
        });
        Ok(inner)
    }

    /// Publishes with a publisher confirm, bounded by
    /// `amqp.max_inflight_publishes` ([`PublishError::Overloaded`] when full)
    /// and `amqp.publish_timeout_ms`. Resolves after the broker acked (`Ok`)
    /// or nacked/returned (`Err`). A mandatory message that is returned is
    /// [`PublishError::Unroutable`] even though its confirm is an ack.
    pub async fn publish(&self, msg: OutboundMessage) -> Result<(), PublishError> {
        self.inner.clone().publish(msg, None).await
    }

    /// [`ControlPlane::publish`] in a sequence: published on the channel
    /// `seq.key` picks, only after the previous message of the sequence was
    /// handed to that channel, so one client's SENDs reach RabbitMQ in the
    /// order it sent them while their confirms are awaited together.
    pub async fn publish_in(
        &self,
        msg: OutboundMessage,
        seq: Sequence,
    ) -> Result<(), PublishError> {
        self.inner.clone().publish(msg, Some(seq)).await
    }

    /// Whether the control connection is up and the topology declared.
    /// How the pod's shared fan-out upstream opens its AMQP connection:
    /// the same URLs (with failover), TLS and connect timeout as the control
    /// connection, named `stomp-gateway <pod> shared` in RabbitMQ.
    pub fn upstream_connect(&self) -> crate::fanout::upstream::Connect {
        let inner = self.inner.clone();
        Arc::new(move || {
            let inner = inner.clone();
            Box::pin(async move {
                let name = format!("stomp-gateway {} shared", inner.pod_id);
                let props =
                    || ConnectionProperties::default().with_connection_name(name.clone().into());
                connect_any(&inner.urls, &inner.tls, props, inner.connect_timeout())
                    .await
                    .map(|(conn, _)| conn)
            })
        })
    }

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
}
