//! `chat-backend`: the example backend for stomp-gateway, doing what the
//! seed write-up's Spring `@MessageMapping("chat.sendMessage")` controller
//! did, as a separate process that speaks AMQP.
//!
//! ```text
//! browser --SEND /app/chat.sendMessage--> stomp-gateway --AMQP publish, routing key chat.sendMessage--> stomp.app (topic)
//!   stomp.app --binding chat.*--> queue chat.backend --> chat-backend
//!   chat-backend --publish, routing key room.<roomId>--> adme.exchange (topic)
//!   adme.exchange --> every browser subscribed to /exchange/adme.exchange/room.<roomId>, on every gateway
//! ```
//!
//! On start (and after every reconnect) it declares, idempotently, the
//! application exchange (durable topic, as the gateway declares it), the
//! chat exchange (durable topic, as `deploy/examples/chat.toml` declares it),
//! a durable queue, and the queue's binding(s) to the application exchange.
//! `--passive-exchanges` only checks that both exchanges exist, for when the
//! gateway's `[[topology.exchanges]]` (or an operator) owns them with other
//! arguments.
//!
//! For each message (manual ack, at-least-once):
//!
//! - the JSON body needs `roomId` (or `room_id`): a string or an integer;
//! - when the gateway's `stomp-user` header is present (the client
//!   authenticated with a JWT), it becomes the `sender` field, whatever the
//!   client wrote there;
//! - the message is published to the chat exchange with routing key
//!   `room.<roomId>` and `content-type: application/json`, with a publisher
//!   confirm; only then is the delivery acked;
//! - a malformed message is logged on one line and rejected without requeue
//!   (dead-lettered if the queue has a dead-letter exchange).
//!
//! If the broker goes away it reconnects with exponential backoff and full
//! jitter (0.5 s up to 30 s); unacked messages are redelivered by RabbitMQ.
//! A configuration conflict (PRECONDITION_FAILED, ACCESS_REFUSED) stops it
//! with exit status 1. SIGTERM or Ctrl-C closes the connection and exits 0.
//!
//! Run it next to a gateway started with `deploy/examples/chat.toml`:
//!
//! ```sh
//! cargo run -p stomp-gateway -- --config deploy/examples/chat.toml
//! cargo run -p chat-backend -- --amqp-url amqp://guest:guest@127.0.0.1:5672/%2f
//! ```
#![forbid(unsafe_code)]

mod message;

use anyhow::{anyhow, Context};
use clap::Parser;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, BasicRejectOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{
    BasicProperties, Channel, Connection, ConnectionProperties, ErrorKind, Event, ExchangeKind,
};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tracing::{debug, error, info, warn};

/// The header the gateway sets to the authenticated user of the session.
const USER_HEADER: &str = "stomp-user";
/// How long a publish may wait for the broker's confirm.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);
/// Backoff between connection attempts: first cap and largest cap.
const BACKOFF_INITIAL: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A connection that lived this long resets the backoff.
const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(30);

/// Example chat backend for stomp-gateway: consumes what clients SEND to
/// /app/chat.* and publishes it to the chat room's routing key.
#[derive(Debug, Clone, Parser)]
#[command(name = "chat-backend", version, about)]
struct Args {
    /// AMQP URL of RabbitMQ (the virtual host percent-encoded: %2f is /).
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    amqp_url: String,

    /// The gateway's application exchange (its `[app] exchange`).
    #[arg(long, env = "CHAT_APP_EXCHANGE", default_value = "stomp.app")]
    app_exchange: String,

    /// The durable queue this backend consumes.
    #[arg(long, env = "CHAT_QUEUE", default_value = "chat.backend")]
    queue: String,

    /// Binding key(s) of the queue on the application exchange; repeat the
    /// flag (or separate with commas) for several.
    #[arg(
        long = "binding",
        env = "CHAT_BINDING",
        default_value = "chat.*",
        value_delimiter = ','
    )]
    bindings: Vec<String>,

    /// The topic exchange chat rooms live on; clients subscribe to
    /// /exchange/<this>/room.<roomId>.
    #[arg(long, env = "CHAT_EXCHANGE", default_value = "adme.exchange")]
    chat_exchange: String,

    /// Only check that the two exchanges exist (passive declare) instead of
    /// declaring them as durable topic exchanges.
    #[arg(long, env = "CHAT_PASSIVE_EXCHANGES")]
    passive_exchanges: bool,

    /// Unacknowledged messages RabbitMQ may push to this backend at once.
    #[arg(long, env = "CHAT_PREFETCH", default_value_t = 64)]
    prefetch: u16,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("chat-backend stopped: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Why one connection ended.
#[derive(Debug)]
enum Ended {
    /// A signal asked us to stop.
    Shutdown,
    /// The broker went away or refused something transient: reconnect.
    Retry(anyhow::Error),
    /// A configuration conflict: retrying cannot help.
    Fatal(anyhow::Error),
}

async fn run(args: Args) -> anyhow::Result<()> {
    let mut shutdown = shutdown_signal()?;
    let mut attempt: u32 = 0;
    loop {
        let started = Instant::now();
        let ended = tokio::select! {
            ended = serve(&args) => ended,
            () = &mut shutdown => Ended::Shutdown,
        };
        match ended {
            Ended::Shutdown => {
                info!("shutting down");
                return Ok(());
            }
            Ended::Fatal(e) => return Err(e),
            Ended::Retry(e) => {
                if started.elapsed() >= BACKOFF_RESET_AFTER {
                    attempt = 0;
                }
                let delay = backoff(attempt);
                attempt = attempt.saturating_add(1);
                warn!("{}; reconnecting in {} ms", one_line(&e), delay.as_millis());
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = &mut shutdown => {
                        info!("shutting down");
                        return Ok(());
                    }
                }
            }
        }
    }
}

/// Full jitter: a random delay up to `min(initial * 2^attempt, max)`.
fn backoff(attempt: u32) -> Duration {
    let cap = BACKOFF_INITIAL
        .saturating_mul(2u32.saturating_pow(attempt.min(16)))
        .min(BACKOFF_MAX);
    let millis = u64::try_from(cap.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(rand::random_range(0..=millis))
}

/// Resolves on the first SIGTERM or SIGINT.
fn shutdown_signal() -> anyhow::Result<std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    Ok(Box::pin(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }))
}

/// Classifies a lapin error: configuration conflicts are fatal, the rest
/// (connection refused, connection lost, channel errors) are retried.
fn classify(e: lapin::Error, what: &str) -> Ended {
    let fatal = match e.kind() {
        ErrorKind::ProtocolError(amqp) => matches!(
            amqp.kind(),
            AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)
                | AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED)
                | AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED)
        ),
        _ => false,
    };
    let e = anyhow::Error::new(e).context(what.to_owned());
    if fatal {
        Ended::Fatal(e)
    } else {
        Ended::Retry(e)
    }
}

/// One connection: declare, consume, publish, until the connection ends.
async fn serve(args: &Args) -> Ended {
    let props = ConnectionProperties::default()
        .with_connection_name(format!("chat-backend {}", std::process::id()).into());
    let conn = match Connection::connect(&args.amqp_url, props).await {
        Ok(c) => c,
        Err(e) => return classify(e, &format!("cannot connect to {}", masked(&args.amqp_url))),
    };
    info!("connected to {}", masked(&args.amqp_url));
    // A lost connection can leave a pending ack or consumer poll waiting for
    // ever; the connection's error event ends the session wherever it is.
    let mut events = conn.events_listener();
    let lost = async {
        while let Some(event) = events.next().await {
            if let Event::Error(e) = event {
                return anyhow::Error::new(e).context("connection lost");
            }
        }
        anyhow!("connection lost: its event stream ended")
    };
    let ended = tokio::select! {
        ended = serve_on(args, &conn) => ended,
        e = lost => Ended::Retry(e),
    };
    if matches!(ended, Ended::Shutdown | Ended::Fatal(_)) {
        let _ = conn.close(200, "chat-backend stopping".into()).await;
    }
    ended
}

async fn serve_on(args: &Args, conn: &Connection) -> Ended {
    let consume = match conn.create_channel().await {
        Ok(c) => c,
        Err(e) => return classify(e, "cannot open a channel"),
    };
    if let Err(ended) = declare(args, &consume).await {
        return ended;
    }
    let publish = match conn.create_channel().await {
        Ok(c) => c,
        Err(e) => return classify(e, "cannot open a channel"),
    };
    if let Err(e) = publish
        .confirm_select(ConfirmSelectOptions::default())
        .await
    {
        return classify(e, "cannot enable publisher confirms");
    }
    if let Err(e) = consume
        .basic_qos(args.prefetch, BasicQosOptions::default())
        .await
    {
        return classify(e, "cannot set the prefetch count");
    }
    let tag = format!("chat-backend-{}", std::process::id());
    let mut consumer = match consume
        .basic_consume(
            args.queue.as_str().into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
    {
        Ok(c) => c,
        Err(e) => return classify(e, &format!("cannot consume queue {:?}", args.queue)),
    };
    info!(
        "consuming {:?} (bound to {:?} with {}), publishing rooms to {:?}",
        args.queue,
        args.app_exchange,
        args.bindings.join(", "),
        args.chat_exchange
    );
    loop {
        let delivery = match consumer.next().await {
            Some(Ok(d)) => d,
            Some(Err(e)) => return classify(e, "consumer failed"),
            None => return Ended::Retry(anyhow!("the broker cancelled the consumer")),
        };
        if let Err(ended) = handle(args, &publish, delivery).await {
            return ended;
        }
    }
}

async fn declare(args: &Args, channel: &Channel) -> Result<(), Ended> {
    for name in [&args.app_exchange, &args.chat_exchange] {
        let options = ExchangeDeclareOptions {
            passive: args.passive_exchanges,
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        channel
            .exchange_declare(
                name.as_str().into(),
                ExchangeKind::Topic,
                options,
                FieldTable::default(),
            )
            .await
            .map_err(|e| {
                let what = if args.passive_exchanges {
                    format!("exchange {name:?} does not exist (passive declare)")
                } else {
                    format!("cannot declare exchange {name:?} (durable topic)")
                };
                classify(e, &what)
            })?;
    }
    channel
        .queue_declare(
            args.queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| {
            classify(
                e,
                &format!("cannot declare queue {:?} (durable)", args.queue),
            )
        })?;
    for key in &args.bindings {
        channel
            .queue_bind(
                args.queue.as_str().into(),
                args.app_exchange.as_str().into(),
                key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| {
                classify(
                    e,
                    &format!(
                        "cannot bind queue {:?} to {:?} with {key:?}",
                        args.queue, args.app_exchange
                    ),
                )
            })?;
    }
    Ok(())
}

/// The `stomp-user` header, if the gateway set one.
fn stomp_user(props: &BasicProperties) -> Option<String> {
    let headers = props.headers().as_ref()?;
    match headers.inner().get(USER_HEADER)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
    .filter(|u| !u.is_empty())
}

/// Handles one delivery; `Err` ends the connection.
async fn handle(
    args: &Args,
    publish: &Channel,
    delivery: lapin::message::Delivery,
) -> Result<(), Ended> {
    let user = stomp_user(&delivery.properties);
    let routing_key = delivery.routing_key.as_str().to_owned();
    let out = match message::chat_message(&routing_key, &delivery.data, user.as_deref()) {
        Ok(out) => out,
        Err(why) => {
            warn!(
                "rejecting malformed message (routing key {routing_key:?}, user {:?}, {} bytes): {why}",
                user.as_deref().unwrap_or("-"),
                delivery.data.len()
            );
            return delivery
                .reject(BasicRejectOptions { requeue: false })
                .await
                .map(|_| ())
                .map_err(|e| classify(e, "cannot reject a message"));
        }
    };
    if let Some(claimed) = &out.replaced_sender {
        info!(
            "sender {claimed:?} replaced by the authenticated user {:?}",
            user.as_deref().unwrap_or_default()
        );
    }
    let timestamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let mut props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_app_id("chat-backend".into())
        .with_timestamp(timestamp);
    if let Some(id) = delivery.properties.message_id() {
        props = props.with_correlation_id(id.clone());
    }
    let confirm = publish
        .basic_publish(
            args.chat_exchange.as_str().into(),
            out.routing_key.as_str().into(),
            BasicPublishOptions::default(),
            &out.body,
            props,
        )
        .await
        .map_err(|e| classify(e, &format!("cannot publish to {:?}", args.chat_exchange)))?;
    let confirmation = match tokio::time::timeout(CONFIRM_TIMEOUT, confirm).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return Err(classify(e, "publish not confirmed")),
        Err(_) => {
            return Err(Ended::Retry(anyhow!(
                "no publisher confirm within {CONFIRM_TIMEOUT:?}"
            )))
        }
    };
    if confirmation.is_nack() {
        // The broker could not take it: leave it in the queue for a retry
        // on a new connection.
        return Err(Ended::Retry(anyhow!(
            "the broker refused (nack) the message for {:?}",
            out.routing_key
        )));
    }
    debug!(
        "room {} <- {} bytes (routing key {routing_key:?})",
        out.room_id,
        out.body.len()
    );
    delivery
        .ack(BasicAckOptions::default())
        .await
        .map(|_| ())
        .map_err(|e| classify(e, "cannot ack a message"))
}

/// The URL with its password replaced by `******`.
fn masked(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:******@{host}{path}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

/// The error and its causes on one line.
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn masks_the_password() {
        assert_eq!(
            masked("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:******@127.0.0.1:5672/%2f"
        );
        assert_eq!(masked("amqp://127.0.0.1"), "amqp://127.0.0.1");
    }

    #[test]
    fn backoff_is_capped() {
        for attempt in [0, 1, 5, 40, u32::MAX] {
            assert!(backoff(attempt) <= BACKOFF_MAX);
        }
        assert!(backoff(0) <= BACKOFF_INITIAL);
    }

    #[test]
    fn reads_the_user_header() {
        let mut headers = FieldTable::default();
        headers.insert(USER_HEADER.into(), AMQPValue::LongString("alice".into()));
        let props = BasicProperties::default().with_headers(headers);
        assert_eq!(stomp_user(&props).as_deref(), Some("alice"));
        assert_eq!(stomp_user(&BasicProperties::default()), None);
    }

    #[test]
    fn flags_parse() {
        let a = Args::try_parse_from([
            "chat-backend",
            "--binding",
            "chat.*,chat.addUser",
            "--queue",
            "q",
        ])
        .unwrap();
        assert_eq!(a.bindings, vec!["chat.*", "chat.addUser"]);
        assert_eq!(a.queue, "q");
        assert_eq!(a.chat_exchange, "adme.exchange");
    }
}
