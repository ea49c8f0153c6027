//! The pod's one upstream subscription: one AMQP connection, one channel,
//! one exclusive, auto-delete queue (named `stomp-gateway-shared-<pod>-<random>`,
//! a prefix the router keeps every client away from) with one no-ack consumer,
//! bound and unbound per (exchange, routing pattern) as destinations
//! appear and disappear on this pod.
//!
//! Bindings are reference counted ([`PodUpstream::bind`] /
//! [`PodUpstream::unbind`]): the first reference binds (and answers once
//! RabbitMQ confirmed the binding, so a SUBSCRIBE receipt means messages
//! flow), the last one schedules the unbind after `unbind_delay`, so a
//! subscriber that leaves and comes back within it costs RabbitMQ nothing.
//!
//! When the connection drops, [`Sink::upstream_lost`] is called, the task
//! reconnects with backoff, declares a new queue, binds every live key
//! again, then calls [`Sink::upstream_restored`] with how long deliveries
//! stopped: messages published in that gap are lost for this pod's
//! subscribers. What to do about it (keep the sessions and count the gap,
//! or close them with an ERROR so clients resubscribe) is the sink's choice:
//! `fanout.on_upstream_loss` (see [`super::shared`]).

use super::mapping;
use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicQosOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Connection};
use relay_core::hub::SharedMessage;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::{info, warn};

/// Opens the upstream's AMQP connection (failover and TLS are the caller's).
pub type Connect =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<Connection, String>> + Send>> + Send + Sync>;

/// Where deliveries and upstream events go (the pod's shared hub).
pub trait Sink: Send + Sync + 'static {
    /// A message arrived for (exchange, routing key).
    fn deliver(&self, exchange: &str, routing_key: &str, message: Arc<SharedMessage>);
    /// [`Sink::deliver`], saying whether any local destination matched the
    /// routing key (the upstream then knows the key routed it).
    fn deliver_matched(
        &self,
        exchange: &str,
        routing_key: &str,
        message: Arc<SharedMessage>,
    ) -> bool {
        self.deliver(exchange, routing_key, message);
        true
    }
    /// A message that no binding's routing pattern on `exchange` matches:
    /// the exchange routes by something else (fanout ignores the key,
    /// headers looks at headers), so every destination on it gets it.
    fn deliver_unkeyed(&self, _exchange: &str, _routing_key: &str, _message: Arc<SharedMessage>) {}
    /// The upstream connection was lost: deliveries stop until restored.
    fn upstream_lost(&self, reason: &str);
    /// The upstream is back and every live key bound again; deliveries
    /// stopped for `gap`.
    fn upstream_restored(&self, gap: Duration);
    /// The upstream connected (the first time, or again after a loss) with
    /// its `queue`.
    fn upstream_connected(&self, _queue: &str) {}
    /// The number of bindings in place (or to be re-made) changed.
    fn bindings_changed(&self, _bindings: usize) {}
}

/// Settings of the pod upstream.
#[derive(Debug, Clone)]
pub struct UpstreamSettings {
    /// Connection name shown in RabbitMQ's management UI.
    pub name: String,
    /// The queue's name before a random suffix; starts with
    /// [`relay_core::router::SHARED_QUEUE_PREFIX`].
    pub queue_prefix: String,
    /// How long a binding stays after its last reference went.
    pub unbind_delay: Duration,
    /// Reconnect backoff: first delay cap, doubled per failed attempt.
    pub reconnect_initial: Duration,
    /// Reconnect backoff: largest delay cap.
    pub reconnect_max: Duration,
}

/// Why a bind failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    #[error("the shared upstream is not connected to RabbitMQ: {0}")]
    Unavailable(String),
    #[error("RabbitMQ refused the binding of exchange {exchange:?} with {pattern:?}: {reason}")]
    Refused {
        exchange: String,
        pattern: String,
        reason: String,
    },
    #[error("the shared upstream has stopped")]
    Stopped,
}

type Binding = (String, String);

enum Cmd {
    Bind(Binding, oneshot::Sender<Result<(), UpstreamError>>),
    Unbind(Binding),
}

/// What the upstream looks like now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpstreamStatus {
    pub up: bool,
    /// The queue while up.
    pub queue: Option<String>,
    /// Bindings in place (or, while down, to be re-made).
    pub bindings: usize,
    pub last_error: Option<String>,
}

/// Handle to the pod upstream task. Cheap to clone.
#[derive(Debug, Clone)]
pub struct PodUpstream {
    tx: mpsc::UnboundedSender<Cmd>,
    status: Arc<Mutex<UpstreamStatus>>,
}

impl PodUpstream {
    /// Starts the task; it connects in the background and stops when
    /// `shutdown` turns true.
    pub fn start(
        settings: UpstreamSettings,
        connect: Connect,
        sink: Arc<dyn Sink>,
        shutdown: watch::Receiver<bool>,
    ) -> PodUpstream {
        let (tx, rx) = mpsc::unbounded_channel();
        let status = Arc::new(Mutex::new(UpstreamStatus::default()));
        let task = Task {
            settings,
            connect,
            sink,
            status: status.clone(),
            refs: HashMap::new(),
            unbind_at: HashMap::new(),
        };
        tokio::spawn(task.run(rx, shutdown));
        PodUpstream { tx, status }
    }

    /// Takes a reference on the binding of `exchange` with `pattern`;
    /// resolves once it is in place.
    pub async fn bind(&self, exchange: &str, pattern: &str) -> Result<(), UpstreamError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Bind((exchange.to_owned(), pattern.to_owned()), reply))
            .map_err(|_| UpstreamError::Stopped)?;
        rx.await.unwrap_or(Err(UpstreamError::Stopped))
    }

    /// Drops a reference taken by a successful [`PodUpstream::bind`].
    pub fn unbind(&self, exchange: &str, pattern: &str) {
        let _ = self
            .tx
            .send(Cmd::Unbind((exchange.to_owned(), pattern.to_owned())));
    }

    pub fn status(&self) -> UpstreamStatus {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// An open upstream: the consumer's channel and queue, and a channel for
/// binds (a refused bind closes its channel; the consumer's stays open).
struct Link {
    conn: Connection,
    channel: Channel,
    control: Channel,
    queue: ShortString,
}

impl Link {
    /// The bind channel, re-opened if a refused bind closed it.
    async fn control(&mut self) -> Result<&Channel, String> {
        if !self.control.status().connected() {
            self.control = self
                .conn
                .create_channel()
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(&self.control)
    }
}

struct Task {
    settings: UpstreamSettings,
    connect: Connect,
    sink: Arc<dyn Sink>,
    status: Arc<Mutex<UpstreamStatus>>,
    /// References per binding; a binding with 0 waits in `unbind_at`.
    refs: HashMap<Binding, usize>,
    unbind_at: HashMap<Binding, Instant>,
}

impl Task {
    fn set_status(&self, f: impl FnOnce(&mut UpstreamStatus)) {
        let mut s = self.status.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut s);
        let before = s.bindings;
        s.bindings = self.refs.len();
        drop(s);
        if before != self.refs.len() {
            self.sink.bindings_changed(self.refs.len());
        }
    }

    async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<Cmd>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut attempt: u32 = 0;
        let mut lost_at: Option<Instant> = None;
        loop {
            if *shutdown.borrow() {
                return;
            }
            // Connect, answering binds with "unavailable" meanwhile.
            let opened = tokio::select! {
                r = self.open() => r,
                _ = shutdown.changed() => return,
            };
            let (mut link, mut consumer) = match opened {
                Ok(x) => x,
                Err(e) => {
                    self.set_status(|s| {
                        s.up = false;
                        s.queue = None;
                        s.last_error = Some(e.clone());
                    });
                    if attempt == 0 {
                        warn!(upstream = %self.settings.name, "shared upstream: cannot connect: {e}; retrying");
                    }
                    let delay = backoff(&self.settings, attempt);
                    attempt = attempt.saturating_add(1);
                    let until = Instant::now() + delay;
                    loop {
                        tokio::select! {
                            _ = tokio::time::sleep_until(until) => break,
                            _ = shutdown.changed() => return,
                            cmd = rx.recv() => match cmd {
                                None => return,
                                Some(cmd) => self.while_down(cmd, &e),
                            },
                        }
                    }
                    continue;
                }
            };
            attempt = 0;
            self.set_status(|s| {
                s.up = true;
                s.queue = Some(link.queue.to_string());
            });
            info!(upstream = %self.settings.name, queue = %link.queue, bindings = self.refs.len(), "shared upstream connected");
            self.sink.upstream_connected(link.queue.as_str());
            if let Some(at) = lost_at.take() {
                self.sink.upstream_restored(at.elapsed());
            }
            // Serve until the connection or the consumer ends.
            let reason = loop {
                let next_unbind = self.unbind_at.values().min().copied();
                tokio::select! {
                    _ = shutdown.changed() => {
                        let _ = link.conn.close(200, "shutting down".into()).await;
                        return;
                    }
                    cmd = rx.recv() => match cmd {
                        None => {
                            let _ = link.conn.close(200, "stopped".into()).await;
                            return;
                        }
                        Some(cmd) => {
                            if let Err(e) = self.handle(&mut link, cmd).await {
                                break e;
                            }
                        }
                    },
                    _ = sleep_until(next_unbind), if next_unbind.is_some() => {
                        if let Err(e) = self.unbind_due(&mut link).await {
                            break e;
                        }
                    }
                    d = consumer.next() => match d {
                        Some(Ok(d)) => {
                            let headers = mapping::message_headers(
                                d.exchange.as_str(),
                                d.routing_key.as_str(),
                                d.redelivered,
                                &d.properties,
                            );
                            let m = Arc::new(SharedMessage::new(headers, d.data.into()));
                            let (x, rk) = (d.exchange.as_str(), d.routing_key.as_str());
                            if !self.sink.deliver_matched(x, rk, m.clone())
                                && !self.routed_by_key(x, rk)
                            {
                                self.sink.deliver_unkeyed(x, rk, m);
                            }
                        }
                        Some(Err(e)) => break e.to_string(),
                        None => break "the consumer was cancelled".to_owned(),
                    },
                }
            };
            warn!(upstream = %self.settings.name, "shared upstream lost: {reason}; re-binding {} keys after reconnect", self.refs.len());
            lost_at = Some(Instant::now());
            self.set_status(|s| {
                s.up = false;
                s.queue = None;
                s.last_error = Some(reason.clone());
            });
            self.sink.upstream_lost(&reason);
            // The queue went with the connection: nothing to unbind.
            self.unbind_at.retain(|b, _| {
                let live = self.refs.get(b).is_some_and(|n| *n > 0);
                live
            });
            self.refs.retain(|_, n| *n > 0);
            let _ = link.conn.close(200, "reconnecting".into()).await;
        }
    }

    /// Connects, declares the queue, binds every live key and starts the consumer.
    async fn open(&mut self) -> Result<(Link, lapin::Consumer), String> {
        let conn = (self.connect)().await?;
        let channel = conn.create_channel().await.map_err(|e| e.to_string())?;
        let control = conn.create_channel().await.map_err(|e| e.to_string())?;
        let name = format!(
            "{}{:016x}",
            self.settings.queue_prefix,
            rand::random::<u64>()
        );
        let name = ShortString::try_new(name).map_err(|_| "queue name too long".to_owned())?;
        let queue = channel
            .queue_declare(
                name,
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    durable: false,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| e.to_string())?;
        let mut link = Link {
            conn,
            channel,
            control,
            queue: queue.name().clone(),
        };
        // Bindings whose delayed unbind was pending are simply not re-made.
        self.unbind_at.clear();
        self.refs.retain(|_, n| *n > 0);
        let live: Vec<Binding> = self.refs.keys().cloned().collect();
        for b in &live {
            if let Err(e) = queue_bind(&mut link, b).await {
                // A binding RabbitMQ refuses now (exchange deleted) is
                // dropped with a log line; its subscribers stay subscribed.
                warn!(upstream = %self.settings.name, "re-binding {} {:?} failed: {e}", b.0, b.1);
                if !link.conn.status().connected() {
                    return Err(e);
                }
            }
        }
        link.channel
            .basic_qos(0, BasicQosOptions::default())
            .await
            .map_err(|e| e.to_string())?;
        let consumer = link
            .channel
            .basic_consume(
                link.queue.clone(),
                ShortString::from("stomp-gateway-shared"),
                BasicConsumeOptions {
                    no_ack: true,
                    exclusive: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| e.to_string())?;
        Ok((link, consumer))
    }

    /// Whether a binding of the queue (a live one, or one waiting for its
    /// delayed unbind) on `exchange` matches `routing_key` by pattern. Only
    /// asked for a message no local destination matched: if one does, it
    /// is a leftover of a destination just left; if none does, the
    /// exchange does not route by key.
    fn routed_by_key(&self, exchange: &str, routing_key: &str) -> bool {
        self.refs
            .keys()
            .chain(self.unbind_at.keys())
            .any(|(x, p)| x == exchange && mapping::topic_matches(p, routing_key))
    }

    fn while_down(&mut self, cmd: Cmd, error: &str) {
        match cmd {
            Cmd::Bind(_, reply) => {
                let _ = reply.send(Err(UpstreamError::Unavailable(error.to_owned())));
            }
            Cmd::Unbind(b) => self.release(b),
        }
        self.set_status(|_| {});
    }

    fn release(&mut self, b: Binding) {
        if let Some(n) = self.refs.get_mut(&b) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.unbind_at
                    .insert(b, Instant::now() + self.settings.unbind_delay);
            }
        }
    }

    /// Handles a command while up; `Err` when the connection is gone.
    async fn handle(&mut self, link: &mut Link, cmd: Cmd) -> Result<(), String> {
        match cmd {
            Cmd::Bind(b, reply) => {
                let n = self.refs.get(&b).copied().unwrap_or(0);
                if n > 0 || self.unbind_at.remove(&b).is_some() {
                    // Bound already (or still, within the unbind delay).
                    self.refs.insert(b, n + 1);
                    let _ = reply.send(Ok(()));
                    return Ok(());
                }
                match queue_bind(link, &b).await {
                    Ok(()) => {
                        self.refs.insert(b, 1);
                        self.set_status(|_| {});
                        let _ = reply.send(Ok(()));
                        Ok(())
                    }
                    Err(reason) => {
                        let _ = reply.send(Err(UpstreamError::Refused {
                            exchange: b.0,
                            pattern: b.1,
                            reason: reason.clone(),
                        }));
                        if link.conn.status().connected() {
                            Ok(())
                        } else {
                            Err(reason)
                        }
                    }
                }
            }
            Cmd::Unbind(b) => {
                self.release(b);
                Ok(())
            }
        }
    }

    /// Unbinds what has had no reference for `unbind_delay`.
    async fn unbind_due(&mut self, link: &mut Link) -> Result<(), String> {
        let now = Instant::now();
        let due: Vec<Binding> = self
            .unbind_at
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(b, _)| b.clone())
            .collect();
        for b in due {
            self.unbind_at.remove(&b);
            self.refs.remove(&b);
            let queue = link.queue.clone();
            link.control()
                .await?
                .queue_unbind(
                    queue,
                    ShortString::from(b.0.as_str()),
                    ShortString::from(b.1.as_str()),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| e.to_string())?;
        }
        self.set_status(|_| {});
        Ok(())
    }
}

async fn queue_bind(link: &mut Link, b: &Binding) -> Result<(), String> {
    let exchange = ShortString::try_new(b.0.as_str()).map_err(|_| "exchange name too long")?;
    let pattern = ShortString::try_new(b.1.as_str()).map_err(|_| "routing pattern too long")?;
    let queue = link.queue.clone();
    link.control()
        .await?
        .queue_bind(
            queue,
            exchange,
            pattern,
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| e.to_string())
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Full-jitter exponential backoff.
fn backoff(s: &UpstreamSettings, attempt: u32) -> Duration {
    let cap = s
        .reconnect_initial
        .saturating_mul(1u32 << attempt.min(16))
        .min(s.reconnect_max);
    cap.mul_f64(rand::random::<f64>())
        .max(Duration::from_millis(10))
}
