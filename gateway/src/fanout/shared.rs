//! The shared path's local side: this pod's shared subscriptions in one hub
//! ([`relay_core::hub::Hub`]), the outlets of the sessions that hold them,
//! and the sink the pod upstream ([`super::upstream::PodUpstream`]) delivers
//! into.
//!
//! ```text
//!  RabbitMQ ──one queue, one consumer per pod──▶ PodUpstream ──deliver──▶ SharedFanout
//!     KeyIndex: (exchange, routing key) → subscribed destinations
//!     Hub:      destination → (session, subscription id) …
//!     each subscriber: short prefix + the shared encoding ──▶ its Outlet (bounded)
//! ```
//!
//! A session's driver ([`crate::client`]) calls [`SharedFanout::attach`]
//! with its outlet at its first shared SUBSCRIBE, [`SharedFanout::subscribe`]
//! / [`SharedFanout::unsubscribe`] per subscription, and
//! [`SharedFanout::detach`] when it ends. Every subscription holds one
//! reference on its upstream binding, taken by `subscribe` (which resolves
//! once RabbitMQ confirmed the binding, so the SUBSCRIBE's receipt means
//! messages flow) and dropped by `unsubscribe` / `detach`; the upstream
//! unbinds after the last reference, with a short delay.
//!
//! A delivery is encoded once per STOMP version and pushed to every
//! subscriber's outlet under one lock, never waiting for a session; an
//! outlet over its limits turns its session into a slow consumer (see
//! [`crate::outlet`]). Per destination, messages reach each subscriber in
//! the order the upstream consumer received them.
//!
//! Upstream loss: deliveries stop until the upstream reconnected and bound
//! every live key again; messages published meanwhile are lost for this
//! pod's subscribers. [`UpstreamLoss::Keep`] keeps the sessions and counts the
//! gap (`shared_upstream_gaps_total`, one log line);
//! [`UpstreamLoss::Close`] closes every session holding a shared subscription
//! at the loss with an ERROR, so clients reconnect and resubscribe.

use super::mapping::{self, KeyIndex};
use super::upstream::{PodUpstream, Sink, UpstreamError, UpstreamStatus};
use crate::config::UpstreamLoss;
use crate::health::Health;
use crate::metrics::Metrics;
use crate::outlet::{Outlet, OutletLimits, Pushed};
use bytes::BytesMut;
use relay_core::hub::{Distribution, Hub, SessionKey, SharedMessage};
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tracing::{info, warn};

/// One shared subscription's upstream reference.
#[derive(Debug)]
struct Sub {
    /// Tells this subscription from a later one with the same id.
    token: u64,
    binding: (String, String),
    /// Whether its `bind` succeeded (so `unbind` is owed).
    bound: bool,
}

#[derive(Debug, Default)]
struct State {
    hub: Hub,
    index: KeyIndex,
    outlets: HashMap<SessionKey, Outlet>,
    subs: HashMap<(SessionKey, Arc<str>), Sub>,
    /// Hub keys whose MESSAGE frames carry another destination than the
    /// delivery's: user destinations (`/user/queue/x` as subscribed).
    destination_of_key: HashMap<Arc<str>, Arc<str>>,
}

struct Inner {
    state: Mutex<State>,
    limits: OutletLimits,
    gap: UpstreamLoss,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    next_message: AtomicU64,
    /// Unique per process: message ids are `<prefix>-<n>`.
    id_prefix: String,
}

impl State {
    /// The sessions holding at least one shared subscription.
    fn subscribed_sessions(&self) -> BTreeSet<SessionKey> {
        self.subs.keys().map(|(session, _)| *session).collect()
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing under this lock can leave the tables half-updated in a way
        // that matters more than stopping the pod's deliveries.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedFanout")
            .field("limits", &self.limits)
            .field("gap", &self.gap)
            .finish_non_exhaustive()
    }
}

/// The pod's shared fan-out. See the module documentation.
#[derive(Debug, Clone)]
pub struct SharedFanout {
    inner: Arc<Inner>,
    upstream: PodUpstream,
    next_session: Arc<AtomicU64>,
    next_token: Arc<AtomicU64>,
}

/// The sink half handed to the upstream before it exists.
#[derive(Debug)]
pub struct FanoutSink(Arc<Inner>);

impl SharedFanout {
    /// The sink to start the upstream with, then [`SharedFanout::new`] with
    /// both.
    pub fn sink(
        limits: OutletLimits,
        gap: UpstreamLoss,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
        pod: &str,
    ) -> Arc<FanoutSink> {
        health.set_shared_enabled();
        Arc::new(FanoutSink(Arc::new(Inner {
            state: Mutex::new(State::default()),
            limits,
            gap,
            metrics,
            health,
            next_message: AtomicU64::new(1),
            id_prefix: format!("{pod}-{:08x}", rand::random::<u32>()),
        })))
    }

    pub fn new(sink: &FanoutSink, upstream: PodUpstream) -> SharedFanout {
        SharedFanout {
            inner: sink.0.clone(),
            upstream,
            next_session: Arc::new(AtomicU64::new(1)),
            next_token: Arc::new(AtomicU64::new(1)),
        }
    }

    /// Registers a session's outlet; its key names it from now on.
    pub fn attach(&self, outlet: Outlet) -> SessionKey {
        let key = self.next_session.fetch_add(1, Ordering::Relaxed);
        self.inner.lock().outlets.insert(key, outlet);
        key
    }

    /// Adds subscription `id` of `session` on hub key `key` (the resolved
    /// destination); `destination` is what the client subscribed to. Resolves
    /// once the upstream binding is in place.
    pub async fn subscribe(
        &self,
        session: SessionKey,
        id: &str,
        key: &str,
        destination: &str,
    ) -> Result<(), String> {
        let Some(binding) = mapping::binding_of(key) else {
            return Err(format!(
                "{destination:?} has no shared binding (not /topic/ or /exchange/)"
            ));
        };
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        let id: Arc<str> = Arc::from(id);
        {
            let mut st = self.inner.lock();
            let first = st
                .hub
                .subscribe(session, &id, key, Distribution::Broadcast)
                .map_err(|e| e.to_string())?;
            let key: Arc<str> = st
                .hub
                .key_of(session, &id)
                .cloned()
                .unwrap_or_else(|| Arc::from(key));
            if first {
                st.index.insert(&key);
                if *destination != *key {
                    st.destination_of_key
                        .insert(key.clone(), Arc::from(destination));
                }
            }
            st.subs.insert(
                (session, id.clone()),
                Sub {
                    token,
                    binding: binding.clone(),
                    bound: false,
                },
            );
        }
        let result = self.upstream.bind(&binding.0, &binding.1).await;
        let mut st = self.inner.lock();
        let current = st
            .subs
            .get_mut(&(session, id.clone()))
            .filter(|s| s.token == token);
        match (result, current) {
            (Ok(()), Some(sub)) => {
                sub.bound = true;
                Ok(())
            }
            // Unsubscribed (or the session ended) while binding: give the
            // reference back.
            (Ok(()), None) => {
                drop(st);
                self.upstream.unbind(&binding.0, &binding.1);
                Ok(())
            }
            (Err(e), _) => {
                drop(st);
                self.unsubscribe(session, &id);
                Err(describe(&e, destination))
            }
        }
    }

    /// Removes subscription `id` of `session` (nothing if unknown).
    pub fn unsubscribe(&self, session: SessionKey, id: &str) {
        let owed = {
            let mut st = self.inner.lock();
            let State {
                hub,
                index,
                subs,
                destination_of_key,
                ..
            } = &mut *st;
            if let Some(gone) = hub.unsubscribe(session, id) {
                if gone.last {
                    index.remove(&gone.key);
                    destination_of_key.remove(&gone.key);
                }
            }
            subs.remove(&(session, Arc::from(id)))
                .filter(|s| s.bound)
                .map(|s| s.binding)
        };
        if let Some((exchange, pattern)) = owed {
            self.upstream.unbind(&exchange, &pattern);
        }
    }

    /// Forgets a session: its outlet and every subscription it held.
    pub fn detach(&self, session: SessionKey) {
        let owed: Vec<(String, String)> = {
            let mut st = self.inner.lock();
            let State {
                hub,
                index,
                outlets,
                subs,
                destination_of_key,
            } = &mut *st;
            outlets.remove(&session);
            for key in hub.remove_session(session) {
                index.remove(&key);
                destination_of_key.remove(&key);
            }
            let mine: Vec<_> = subs.keys().filter(|k| k.0 == session).cloned().collect();
            mine.into_iter()
                .filter_map(|k| subs.remove(&k))
                .filter(|s| s.bound)
                .map(|s| s.binding)
                .collect()
        };
        for (exchange, pattern) in owed {
            self.upstream.unbind(&exchange, &pattern);
        }
    }

    /// The upstream's state (without touching the hub).
    pub fn upstream(&self) -> UpstreamStatus {
        self.upstream.status()
    }
}

/// A failed bind in words for the client's ERROR.
fn describe(e: &UpstreamError, destination: &str) -> String {
    match e {
        UpstreamError::Refused { reason, .. } => {
            format!("RabbitMQ refused the subscription to {destination:?}: {reason}")
        }
        e => format!("cannot subscribe to {destination:?} now: {e}"),
    }
}

impl FanoutSink {
    /// Hands `message` to every subscriber of the destinations `select`
    /// names; false when it names none.
    fn fan_out(
        &self,
        message: &Arc<SharedMessage>,
        select: impl FnOnce(&KeyIndex, &mut Vec<Arc<str>>),
    ) -> bool {
        let inner = &self.0;
        let mut slow = 0u64;
        let mut delivered = 0u64;
        let mut st = inner.lock();
        let State {
            hub,
            index,
            outlets,
            destination_of_key,
            ..
        } = &mut *st;
        let mut keys: Vec<Arc<str>> = Vec::new();
        select(index, &mut keys);
        if keys.is_empty() {
            return false;
        }
        let mut out = BytesMut::new();
        for key in keys {
            // A user destination carries what the client subscribed to.
            let message = match destination_of_key.get(&key) {
                Some(d) => Arc::new(with_destination(message, d)),
                None => message.clone(),
            };
            hub.deliver(&key, |sub| {
                let Some(outlet) = outlets.get(&sub.session) else {
                    return;
                };
                let n = inner.next_message.fetch_add(1, Ordering::Relaxed);
                let id = format!("{}-{n}", inner.id_prefix);
                message.write(outlet.version, &sub.subscription, &id, None, &mut out);
                match outlet.push_shared(out.split().freeze(), inner.limits) {
                    Pushed::Queued => delivered += 1,
                    Pushed::SlowConsumer => slow += 1,
                    Pushed::Dropped => {}
                }
            });
        }
        drop(st);
        inner.metrics.shared_deliveries.inc_by(delivered);
        inner.metrics.slow_consumers.inc_by(slow);
        true
    }
}

impl Sink for FanoutSink {
    fn deliver(&self, exchange: &str, routing_key: &str, message: Arc<SharedMessage>) {
        self.deliver_matched(exchange, routing_key, message);
    }

    fn deliver_matched(
        &self,
        exchange: &str,
        routing_key: &str,
        message: Arc<SharedMessage>,
    ) -> bool {
        self.0.metrics.shared_messages.inc();
        self.fan_out(&message, |index, keys| {
            index.matching(exchange, routing_key, |k| keys.push(k.clone()))
        })
    }

    fn deliver_unkeyed(&self, exchange: &str, _routing_key: &str, message: Arc<SharedMessage>) {
        self.fan_out(&message, |index, keys| {
            index.on_exchange(exchange, |k| keys.push(k.clone()))
        });
    }

    fn upstream_lost(&self, reason: &str) {
        let inner = &self.0;
        inner.metrics.shared_up.set(0);
        inner.health.set_shared_up(None);
        if inner.gap == UpstreamLoss::Close {
            let st = inner.lock();
            let mut closed = 0u64;
            for session in st.subscribed_sessions() {
                if let Some(o) = st.outlets.get(&session) {
                    o.mark_lost();
                    closed += 1;
                }
            }
            drop(st);
            inner.metrics.shared_gap_closes.inc_by(closed);
            warn!(
                sessions = closed,
                "shared upstream lost ({reason}): closing {closed} sessions with shared subscriptions (fanout.on_upstream_loss = \"close\")"
            );
        }
    }

    fn upstream_restored(&self, gap: Duration) {
        let inner = &self.0;
        inner.metrics.shared_gaps.inc();
        let sessions = inner.lock().subscribed_sessions().len();
        info!(
            gap_ms = gap.as_millis() as u64,
            sessions,
            "shared upstream restored after {} ms: messages published meanwhile were lost for {sessions} sessions with shared subscriptions (fanout.on_upstream_loss = \"{}\")",
            gap.as_millis(),
            inner.gap.as_str()
        );
    }

    fn upstream_connected(&self, queue: &str) {
        self.0.metrics.shared_up.set(1);
        self.0.health.set_shared_up(Some(queue));
    }

    fn bindings_changed(&self, bindings: usize) {
        self.0
            .metrics
            .shared_bindings
            .set(i64::try_from(bindings).unwrap_or(i64::MAX));
    }
}

/// `message` with another `destination` header.
fn with_destination(message: &SharedMessage, destination: &str) -> SharedMessage {
    let headers = message
        .headers()
        .iter()
        .map(|(k, v)| {
            if k == "destination" {
                (k.clone(), destination.to_owned())
            } else {
                (k.clone(), v.clone())
            }
        })
        .collect();
    SharedMessage::new(headers, message.body().clone())
}
