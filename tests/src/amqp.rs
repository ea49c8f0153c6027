//! AMQP 0-9-1 helpers on lapin: what a backend service sees of the
//! gateway's control plane (application messages, user destinations).
//!
//! Queues made here are server-named, exclusive and auto-delete: RabbitMQ
//! removes them when the connection closes (on drop), also when a test fails.

use anyhow::{anyhow, bail, Context, Result};
use lapin::message::BasicGetMessage;
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use std::time::Duration;
use tokio::time::Instant;

/// The local RabbitMQ's AMQP listener, default vhost.
pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// A URL on a port nothing listens on (for "AMQP is down").
pub fn unreachable_url() -> String {
    format!(
        "amqp://guest:guest@127.0.0.1:{}/%2f",
        crate::gateway::free_port()
    )
}

/// One AMQP connection with one confirm-mode channel.
#[derive(Debug)]
pub struct Amqp {
    conn: Connection,
    channel: Channel,
}

impl Amqp {
    /// Connects to [`AMQP_URL`] (the main node).
    pub async fn connect() -> Result<Amqp> {
        Amqp::connect_url(AMQP_URL).await
    }

    /// Connects to any node, for example a test-cluster node.
    pub async fn connect_url(url: &str) -> Result<Amqp> {
        let props = ConnectionProperties::default().with_connection_name("e2e".into());
        let conn = tokio::time::timeout(crate::WAIT, Connection::connect(url, props))
            .await
            .map_err(|_| anyhow!("AMQP connect to {url} timed out"))?
            .with_context(|| format!("AMQP connect to {url}"))?;
        let channel = conn.create_channel().await.context("AMQP channel")?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .context("confirm.select")?;
        Ok(Amqp { conn, channel })
    }

    /// Takes every message now in `queue` (auto-ack); returns the value of
    /// header `header` of each (or the body when it has none).
    pub async fn take_all(&self, queue: &str, header_name: &str) -> Result<Vec<String>> {
        let mut out = Vec::new();
        while let Some(m) = self
            .channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .with_context(|| format!("basic.get {queue}"))?
        {
            let id = header(&m.delivery.properties, header_name)
                .unwrap_or_else(|| String::from_utf8_lossy(&m.delivery.data).into_owned());
            out.push(id);
        }
        Ok(out)
    }

    /// Deletes queue `name` (a fresh channel: a failure closes it).
    pub async fn delete_queue(&self, name: &str) -> Result<()> {
        let ch = self.conn.create_channel().await?;
        ch.queue_delete(name.into(), QueueDeleteOptions::default())
            .await
            .with_context(|| format!("delete queue {name}"))?;
        Ok(())
    }

    /// The confirm-mode channel.
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// A server-named exclusive auto-delete queue bound to `exchange` with
    /// each of `keys`; returns its name.
    pub async fn bound_queue(&self, exchange: &str, keys: &[&str]) -> Result<String> {
        let q = self
            .channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .context("declaring a test queue")?;
        let name = q.name().as_str().to_owned();
        for key in keys {
            self.channel
                .queue_bind(
                    name.as_str().into(),
                    exchange.into(),
                    (*key).into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .with_context(|| format!("binding {name} to {exchange} with {key:?}"))?;
        }
        Ok(name)
    }

    /// One message from `queue` right now (auto-ack), if there is one.
    pub async fn get(&self, queue: &str) -> Result<Option<BasicGetMessage>> {
        self.channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .with_context(|| format!("basic.get {queue}"))
    }

    /// The next message from `queue` within `timeout` (polls basic.get).
    pub async fn next(&self, queue: &str, timeout: Duration) -> Result<BasicGetMessage> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(m) = self.get(queue).await? {
                return Ok(m);
            }
            if Instant::now() >= deadline {
                bail!("no message in {queue} within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Publishes with a publisher confirm; fails on a nack.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        props: BasicProperties,
    ) -> Result<()> {
        let confirm = self
            .channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body,
                props,
            )
            .await
            .with_context(|| format!("publish to {exchange} with {routing_key:?}"))?
            .await
            .context("publisher confirm")?;
        if confirm.is_nack() {
            bail!("the broker nacked the publish to {exchange} with {routing_key:?}");
        }
        Ok(())
    }

    /// Whether exchange `name` exists (a passive declare on a throwaway
    /// channel, since a failed one closes its channel).
    pub async fn exchange_exists(&self, name: &str) -> Result<bool> {
        let ch = self.conn.create_channel().await.context("AMQP channel")?;
        let r = ch
            .exchange_declare(
                name.into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    passive: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await;
        Ok(r.is_ok())
    }

    /// Passive declare of queue `name` on a throwaway channel.
    async fn passive_queue(&self, name: &str) -> Result<lapin::Queue> {
        let ch = self.conn.create_channel().await.context("AMQP channel")?;
        let opts = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        ch.queue_declare(name.into(), opts, FieldTable::default())
            .await
            .with_context(|| format!("passive declare of queue {name}"))
    }

    /// Whether queue `name` exists.
    pub async fn queue_exists(&self, name: &str) -> Result<bool> {
        Ok(self.passive_queue(name).await.is_ok())
    }

    /// Messages ready in queue `name`, from a passive declare (exact, unlike
    /// the management API's sampled statistics).
    pub async fn message_count(&self, name: &str) -> Result<u32> {
        Ok(self.passive_queue(name).await?.message_count())
    }

    /// Polls [`message_count`](Self::message_count) until it is `n`.
    pub async fn wait_message_count(&self, name: &str, n: u32, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let count = self.message_count(name).await?;
            if count == n {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("queue {name} holds {count} messages, expected {n} (waited {timeout:?})");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Closes the connection (exclusive queues go with it).
    pub async fn close(self) {
        let _ = self.conn.close(200, "e2e done".into()).await;
    }
}

/// A header of an AMQP message as text (`None` when absent or not a string).
pub fn header(props: &BasicProperties, name: &str) -> Option<String> {
    match props.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// All header names of an AMQP message.
pub fn header_names(props: &BasicProperties) -> Vec<String> {
    props
        .headers()
        .as_ref()
        .map(|h| h.inner().keys().map(|k| k.as_str().to_owned()).collect())
        .unwrap_or_default()
}

/// `BasicProperties` with a `content_type` and string headers.
pub fn props(content_type: Option<&str>, headers: &[(&str, &str)]) -> BasicProperties {
    let mut p = BasicProperties::default();
    if let Some(ct) = content_type {
        p = p.with_content_type(ct.into());
    }
    if !headers.is_empty() {
        let mut table = FieldTable::default();
        for (k, v) in headers {
            table.insert((*k).into(), AMQPValue::LongString((*v).into()));
        }
        p = p.with_headers(table);
    }
    p
}
