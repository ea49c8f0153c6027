//! Publishing with publisher confirms: the in-flight limit, the publish
//! slots (a pooled connection and its confirm-mode channel each), the
//! existence check of unknown exchanges and the ack / nack / return outcome.

use super::*;

/// How long a positive exchange-existence check is trusted.
pub(super) const EXCHANGE_CHECK_TTL: Duration = Duration::from_secs(60);

/// Most cached exchange checks (the cache is cleared when it is full).
pub(super) const EXCHANGE_CHECK_CAPACITY: usize = 10_000;

/// After a publish timed out, its confirm is still awaited (holding its
/// in-flight permit) for this many publish timeouts; then its channel is
/// closed and replaced.
pub(super) const LINGER_FACTOR: u32 = 5;

/// A publish connection from the pool and its confirm-mode channel.
pub(super) struct PubChannel {
    /// Held so the slot keeps its own connection; returned to the pool when
    /// the slot is reset.
    pub(super) conn: deadpool::managed::Object<PublishManager>,
    pub(super) channel: Channel,
    /// Tells a replaced channel from the current one.
    pub(super) serial: u64,
}

impl Inner {
    /// Opens every publish slot's channel so the first publishes do not
    /// wait for it. Failures are left for the publishes to retry.
    pub(super) async fn warm_up(&self) {
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
    pub(super) async fn channel(&self, i: usize) -> Result<(u64, Channel), PublishError> {
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
    pub(super) async fn reset_slot(&self, i: usize, serial: u64) {
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
    pub(super) fn exchange_known(&self, exchange: &str) -> bool {
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
    pub(super) async fn check_exchange(
        &self,
        i: usize,
        exchange: &ShortString,
    ) -> Result<(), PublishError> {
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

    pub(super) async fn publish(
        self: Arc<Self>,
        msg: OutboundMessage,
        seq: Option<Sequence>,
    ) -> Result<(), PublishError> {
        let (slot, sent) = match seq {
            Some(Sequence { key, after, sent }) => {
                if let Some(after) = after {
                    // Ok or dropped: either way the previous one is out.
                    let _ = after.await;
                }
                let n = self.slots.len().max(1) as u64;
                (usize::try_from(key % n).unwrap_or(0), Some(sent))
            }
            None => (
                self.next_slot.fetch_add(1, Ordering::Relaxed) % self.slots.len().max(1),
                None,
            ),
        };
        if !self.up.load(Ordering::SeqCst) {
            return Err(PublishError::Unavailable(self.reason().clone()));
        }
        let exchange = short(&msg.exchange, "exchange name")?;
        let routing_key = short(&msg.routing_key, "routing key")?;
        let properties = match msg.properties.clone() {
            Some(p) => p,
            None => self.properties(&msg)?,
        };
        self.publish_with(msg, exchange, routing_key, properties, slot, sent)
            .await
    }

    /// The properties of a gateway-made message: message id, app id,
    /// timestamp, content type, delivery mode and the headers table.
    fn properties(&self, msg: &OutboundMessage) -> Result<BasicProperties, PublishError> {
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
        Ok(properties)
    }

    /// Publishes with `properties` and waits for the confirm.
    async fn publish_with(
        self: Arc<Self>,
        msg: OutboundMessage,
        exchange: ShortString,
        routing_key: ShortString,
        properties: BasicProperties,
        slot: usize,
        sent: Option<tokio::sync::oneshot::Sender<()>>,
    ) -> Result<(), PublishError> {
        let permit = self
            .inflight
            .clone()
            .try_acquire_owned()
            .map_err(|_| PublishError::Overloaded)?;
        let timeout = self.publish_timeout();
        let deadline = tokio::time::Instant::now() + timeout;

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
        // Handed to the channel: the next of the sequence may go.
        drop(sent);
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
}

pub(super) fn unavailable(e: lapin::Error) -> PublishError {
    PublishError::Unavailable(e.to_string())
}

/// A channel-level refusal (`NOT_FOUND - no exchange ...`) is
/// [`PublishError::Rejected`] with RabbitMQ's reply text; anything else means
/// the connection is gone.
pub(super) fn publish_error(e: &lapin::Error) -> PublishError {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) if matches!(amqp.kind(), AMQPErrorKind::Soft(_)) => {
            PublishError::Rejected(amqp.get_message().to_string())
        }
        _ => PublishError::Unavailable(e.to_string()),
    }
}

pub(super) fn short(s: &str, what: &str) -> Result<ShortString, PublishError> {
    ShortString::try_new(s).map_err(|_| {
        PublishError::Rejected(format!(
            "{what} is longer than 255 bytes ({} bytes)",
            s.len()
        ))
    })
}
