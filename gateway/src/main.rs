//! The `stomp-gateway` binary: parse arguments, load the configuration, set
//! up logging, the runtime and signal handling, then hand over to
//! [`stomp_gateway::server::run`].
#![forbid(unsafe_code)]

use anyhow::Context;
use clap::Parser;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use stomp_gateway::settings::Settings;
use stomp_gateway::{config, server, telemetry};
use tokio::sync::watch;
use tracing::{error, info, warn};

/// Exit code for a bad configuration (sysexits.h `EX_USAGE`).
const EXIT_CONFIG: u8 = 64;
/// Exit code when a second signal forces an immediate exit (128 + SIGINT).
const EXIT_FORCED: i32 = 130;
/// How long the runtime waits for stray tasks after the server returned.
const RUNTIME_SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// STOMP-over-WebSocket gateway relaying browser sessions to RabbitMQ's
/// STOMP plugin.
#[derive(Debug, Parser)]
#[command(name = "stomp-gateway", version, about)]
struct Args {
    /// TOML configuration file. Environment variables GATEWAY__SECTION__KEY
    /// override it; see docs/configuration.md.
    #[arg(long, value_name = "FILE", env = "GATEWAY_CONFIG")]
    config: Option<PathBuf>,

    /// Load and validate the configuration, print the effective
    /// configuration (passcodes masked) as TOML, and exit.
    #[arg(long)]
    check_config: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();

    let settings = match config::load(args.config.as_deref()).and_then(Settings::new) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("stomp-gateway: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if args.check_config {
        print!("{}", settings.config.masked().to_toml());
        return ExitCode::SUCCESS;
    }

    telemetry::init(&settings.config.log);
    let open_file_limit = raise_fd_limit(settings.config.server.max_connections);
    info!("{}", startup_line(&settings.config, open_file_limit));
    match run(settings) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("stomp-gateway stopped: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, skipping causes whose text the
/// message already includes.
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

/// Each session holds two sockets (the browser's and its broker
/// connection): raise the soft open-file limit to the hard one so
/// `server.max_connections` is reachable, warn with what to change when it
/// is not, and return the limit in effect (None when it cannot be read).
fn raise_fd_limit(max_connections: usize) -> Option<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    let limit = if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        hard
    } else {
        soft
    };
    if let Some(warning) = fd_limit_warning(limit, max_connections) {
        warn!(open_file_limit = limit, "{warning}");
    }
    Some(limit)
}

/// Descriptors kept aside for listeners, the AMQP and system connections,
/// log files and the like.
const FD_RESERVE: u64 = 64;

/// The warning for an open-file limit that cannot hold `max_connections`
/// sessions, saying what to change; None when it can.
fn fd_limit_warning(limit: u64, max_connections: usize) -> Option<String> {
    let needed = (max_connections as u64)
        .saturating_mul(2)
        .saturating_add(FD_RESERVE);
    if limit >= needed {
        return None;
    }
    let reachable = limit.saturating_sub(FD_RESERVE) / 2;
    Some(format!(
        "open-file limit {limit} is too low for server.max_connections = {max_connections} \
         (each session holds 2 descriptors, {needed} needed): sessions past about {reachable} \
         will fail; raise the hard limit to {needed} or more (ulimit -Hn, systemd LimitNOFILE=, \
         the container's nofile ulimit) or lower server.max_connections to {reachable} \
         (GATEWAY__SERVER__MAX_CONNECTIONS)"
    ))
}

/// The one start-up line: version, listeners, broker target, AMQP, auth
/// mode and the limits that matter.
fn startup_line(config: &config::Config, open_file_limit: Option<u64>) -> String {
    let c = config.masked();
    let endpoints: Vec<String> = c
        .server
        .endpoints
        .iter()
        .map(|e| {
            if e.sockjs {
                format!("{} (SockJS)", e.path)
            } else {
                e.path.clone()
            }
        })
        .collect();
    let broker = match c.broker.mode {
        config::BrokerMode::Embedded => {
            "embedded (in-process, this node only; broker.mode = \"relay\" for RabbitMQ)".to_owned()
        }
        config::BrokerMode::Relay => format!(
            "relay to {:?} (vhost {:?}{})",
            c.broker.addresses,
            c.broker.virtual_host,
            if c.broker.tls.enabled { ", TLS" } else { "" }
        ),
    };
    let amqp = if c.control_plane_enabled() {
        c.amqp.urls().collect::<Vec<_>>().join(", ")
    } else {
        "off".to_owned()
    };
    let auth = match c.auth.mode {
        config::AuthMode::None => "none (anonymous sessions)".to_owned(),
        config::AuthMode::Jwt => format!("jwt ({})", c.auth.jwt_algorithm.as_str()),
    };
    let files = open_file_limit.map_or_else(|| "unknown".to_owned(), |n| n.to_string());
    format!(
        "stomp-gateway {version} starting: clients on {listen} {endpoints:?}, admin on {admin}; \
         broker: {broker}; AMQP: {amqp}; auth: {auth}; \
         limits: {max_conn} connections (open files {files}), frames {frame} bytes, \
         {subs} subscriptions per session; drain {drain} ms",
        version = env!("CARGO_PKG_VERSION"),
        listen = c.server.listen,
        admin = c.server.admin_listen,
        max_conn = c.server.max_connections,
        frame = c.session.max_frame_size,
        subs = c.session.max_subscriptions,
        drain = c.server.drain_period_ms,
    )
}

fn run(settings: Settings) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("stomp-gateway")
        .build()
        .context("cannot start the async runtime")?;
    let result = runtime.block_on(async move {
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        spawn_signal_handler(shutdown_tx)?;
        server::run(settings, shutdown_rx).await?;
        info!("stomp-gateway stopped");
        Ok(())
    });
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN_GRACE);
    result
}

/// First SIGTERM/SIGINT: flip the shutdown channel (drain). Second: exit now.
fn spawn_signal_handler(shutdown: watch::Sender<bool>) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    tokio::spawn(async move {
        let first = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        info!("received {first}: shutting down gracefully (send it again to exit immediately)");
        // No receiver left means the server already returned.
        let _ = shutdown.send(true);
        let second = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        warn!("received {second} during shutdown: exiting immediately");
        std::process::exit(EXIT_FORCED);
    });
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_open_file_warning_says_what_to_change() {
        assert_eq!(fd_limit_warning(20_064, 10_000), None);
        let w = fd_limit_warning(20_000, 10_000).unwrap();
        assert!(w.contains("open-file limit 20000"), "{w}");
        assert!(w.contains("20064 needed"), "{w}");
        assert!(w.contains("raise the hard limit to 20064"), "{w}");
        assert!(w.contains("lower server.max_connections to 9968"), "{w}");
    }

    #[test]
    fn the_startup_line_names_listeners_broker_auth_and_limits() {
        let mut c = config::Config::default();
        c.broker.mode = config::BrokerMode::Relay;
        c.amqp.url = "amqp://gw:hunter2@rabbit:5672/%2f".into();
        c.auth.mode = config::AuthMode::Jwt;
        let line = startup_line(&c, Some(20_000));
        for part in [
            env!("CARGO_PKG_VERSION"),
            "clients on 0.0.0.0:8080 [\"/ws\"]",
            "admin on 0.0.0.0:9090",
            "relay to [\"127.0.0.1:61613\"]",
            "AMQP: amqp://gw:******@rabbit:5672/%2f",
            "auth: jwt (HS256)",
            "10000 connections (open files 20000)",
            "drain 20000 ms",
        ] {
            assert!(line.contains(part), "{part:?} missing from {line}");
        }
        assert!(!line.contains("hunter2"), "{line}");
        let default = startup_line(&config::Config::default(), None);
        for part in ["auth: none", "broker: embedded", "AMQP: off"] {
            assert!(default.contains(part), "{part:?} missing from {default}");
        }
    }
}
