//! The `stomp-gateway` binary: parse arguments, load the configuration, set
//! up logging, the runtime and signal handling, then hand over to
//! [`stomp_gateway::server::run`].
#![forbid(unsafe_code)]

use anyhow::Context;
use clap::Parser;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
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

    let config = match config::load(args.config.as_deref()).and_then(|c| {
        c.validate()?;
        Ok(c)
    }) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("stomp-gateway: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if args.check_config {
        print!("{}", config.masked().to_toml());
        return ExitCode::SUCCESS;
    }

    telemetry::init(&config.log);
    raise_fd_limit(config.server.max_connections);
    match run(config) {
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
/// `server.max_connections` is reachable, and say so when it is not.
fn raise_fd_limit(max_connections: usize) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    let limit = if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        hard
    } else {
        soft
    };
    let needed = (max_connections as u64)
        .saturating_mul(2)
        .saturating_add(64);
    if limit < needed {
        warn!(
            open_file_limit = limit,
            needed,
            "open-file limit too low for server.max_connections: sessions past about {} will fail",
            limit.saturating_sub(64) / 2
        );
    } else {
        info!(open_file_limit = limit, "open-file limit");
    }
}

fn run(config: config::Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("stomp-gateway")
        .build()
        .context("cannot start the async runtime")?;
    let result = runtime.block_on(async move {
        info!(
            "stomp-gateway {} starting (listen {}, admin {})",
            env!("CARGO_PKG_VERSION"),
            config.server.listen,
            config.server.admin_listen
        );
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        spawn_signal_handler(shutdown_tx)?;
        server::run(Arc::new(config), shutdown_rx).await?;
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
