//! Supervision of the control connection: watch it, mark the control plane
//! down when it is lost, reconnect with backoff, declare the topology again;
//! and the orderly shutdown (wait for confirms, close the connections).

use super::*;
use crate::backoff::Backoff;

/// How often the reconnect loop repeats "still cannot connect".
pub(super) const RECONNECT_LOG_INTERVAL: Duration = Duration::from_secs(30);

/// How often the control connection's state is polled (besides its events).
pub(super) const WATCH_INTERVAL: Duration = Duration::from_millis(500);

/// On shutdown, the longest wait for in-flight publishes to be confirmed
/// before the connections are closed.
pub(super) const SHUTDOWN_GRACE: Duration = Duration::from_secs(12);

impl Inner {
    /// Closes everything once sessions are gone and confirms are in (or the
    /// grace period is over).
    pub(super) async fn shut_down(&self, conn: Option<Connection>) {
        // Every in-flight permit back means every confirm has arrived.
        let all = u32::try_from(self.config.amqp.max_inflight_publishes.max(1)).unwrap_or(u32::MAX);
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, self.inflight.acquire_many(all)).await;
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
pub(super) async fn supervise(
    inner: Arc<Inner>,
    mut conn: Option<(Connection, String)>,
    mut shutdown: watch::Receiver<bool>,
) {
    let amqp = &inner.config.amqp;
    let mut backoff = Backoff::new(amqp.reconnect_initial_ms, amqp.reconnect_max_ms);
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
                    backoff.reset();
                    failing_since = Some(Instant::now());
                    logged_failure = false;
                    last_log = Instant::now();
                }
            }
        }
        let delay = backoff.next_delay();
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = stopped(&mut shutdown) => return inner.shut_down(None).await,
        }
        attempt = attempt.saturating_add(1);
        let started = Instant::now();
        let result = match inner.connect().await {
            Ok((c, node)) => match inner.declare(&c).await {
                Ok(counts) => {
                    inner.log_declared(counts);
                    let took = started.elapsed();
                    inner
                        .metrics
                        .broker_connected(crate::metrics::Link::Amqp, took, true);
                    Ok((c, node))
                }
                Err(DeclareFailure::Entity(e)) => {
                    inner.count_declare_failure(&e);
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
                backoff.reset();
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
pub(super) async fn watch_connection(
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
pub(super) async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await.map(|_| ());
}
