//! Declaring the topology: the application and user exchanges, then the
//! `[topology]` exchanges, queues and bindings; a conflict with what exists
//! on RabbitMQ is fatal at start.

use super::*;

/// Counts of what one topology declaration declared.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct TopologyCounts {
    pub(super) exchanges: usize,
    pub(super) queues: usize,
    pub(super) bindings: usize,
}

/// A declaration failed because of the entity (fatal at start) or because
/// the connection went away (retried).
#[derive(Debug)]
pub(super) enum DeclareFailure {
    Entity(ControlPlaneError),
    Connection(String),
}

impl Inner {
    pub(super) fn log_declared(&self, c: TopologyCounts) {
        for (kind, n) in [
            ("exchange", c.exchanges),
            ("queue", c.queues),
            ("binding", c.bindings),
        ] {
            for _ in 0..n {
                self.metrics.topology_declared(kind, true);
            }
        }
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

    /// Counts a refused declaration (`exchange '...'`, `queue '...'`,
    /// `binding ...` in the error's entity) in the metrics.
    pub(super) fn count_declare_failure(&self, e: &ControlPlaneError) {
        let (ControlPlaneError::Conflict { entity, .. }
        | ControlPlaneError::Declare { entity, .. }) = e;
        let kind = entity.split(' ').next().unwrap_or_default();
        if crate::metrics::TOPOLOGY_KINDS.contains(&kind) {
            self.metrics.topology_declared(kind, false);
        }
    }

    /// Declares the gateway's exchanges and `[topology]` on one channel of
    /// `conn`, stopping at the first failure.
    pub(super) async fn declare(
        &self,
        conn: &Connection,
    ) -> Result<TopologyCounts, DeclareFailure> {
        let limit = self.connect_timeout().saturating_mul(2);
        match tokio::time::timeout(limit, declare_topology(conn, &self.config)).await {
            Ok(r) => r,
            Err(_) => Err(DeclareFailure::Connection(format!(
                "declaring the topology took longer than {} ms",
                limit.as_millis()
            ))),
        }
    }
}

pub(super) fn field_table(args: &Arguments) -> Result<FieldTable, String> {
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

pub(super) fn exchange_kind(t: ExchangeType) -> ExchangeKind {
    match t {
        ExchangeType::Topic => ExchangeKind::Topic,
        ExchangeType::Direct => ExchangeKind::Direct,
        ExchangeType::Fanout => ExchangeKind::Fanout,
        ExchangeType::Headers => ExchangeKind::Headers,
    }
}

/// Maps a declaration error: `PRECONDITION_FAILED` is a conflict, other
/// broker refusals are declaration errors, the rest is a lost connection.
pub(super) fn declare_failure(entity: String, e: &lapin::Error) -> DeclareFailure {
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

pub(super) fn name(entity: &str, s: &str) -> Result<ShortString, DeclareFailure> {
    ShortString::try_new(s).map_err(|_| {
        DeclareFailure::Entity(ControlPlaneError::Declare {
            entity: entity.to_owned(),
            detail: "name is longer than 255 bytes".into(),
        })
    })
}

pub(super) fn arguments(entity: &str, args: &Arguments) -> Result<FieldTable, DeclareFailure> {
    field_table(args).map_err(|detail| {
        DeclareFailure::Entity(ControlPlaneError::Declare {
            entity: entity.to_owned(),
            detail,
        })
    })
}

/// Declares, in order: the app and user exchanges (unless the topology
/// declares them itself), the topology's exchanges, queues and bindings.
pub(super) async fn declare_topology(
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
