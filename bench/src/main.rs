//! `stomp-load`: a load generator for STOMP over WebSocket. The same run can
//! target stomp-gateway and RabbitMQ's own Web-STOMP endpoint, so both get
//! identical traffic. Each scenario prints one JSON object on stdout;
//! progress goes to stderr. `report` turns a directory of such JSON files
//! (written by bench/compare.sh) into docs/benchmarks.md and an SVG plot.
#![forbid(unsafe_code)]

mod client;
mod common;
mod idle;
mod net;
mod procstat;
mod progress;
mod rabbit;
mod report;
mod search;
mod stats;
mod storm;
mod throughput;

use anyhow::Result;
use clap::{Parser, Subcommand};
use common::{Common, Ctx, Outcome};
use serde_json::json;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// Load generator for STOMP over WebSocket (stomp-gateway, RabbitMQ Web-STOMP).
#[derive(Debug, Parser)]
#[command(name = "stomp-load", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// P publishers, S subscribers over D topics; fixed rate or open loop.
    Throughput(throughput::ThroughputArgs),
    /// One room, many subscribers, one publisher at a fixed rate.
    Fanout(throughput::FanoutArgs),
    /// Paced search: the highest rate 1:1 topic pairs sustain with no backlog growth.
    PacedSearch(search::SearchArgs),
    /// Open N sessions with concurrency C, then DISCONNECT them all.
    ConnectStorm(storm::StormArgs),
    /// Hold N idle sessions with heart-beats; memory per session, idle CPU.
    Idle(idle::IdleArgs),
    /// Turn compare.sh results into markdown and an SVG latency plot.
    Report(report::ReportArgs),
    /// Print a free TCP port on 127.0.0.1 (for scripts).
    #[command(hide = true)]
    FreePort,
}

fn main() -> ExitCode {
    common::init_clock();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("stomp-load: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match &cli.cmd {
        Cmd::Report(args) => {
            report::run(args)?;
            return Ok(ExitCode::SUCCESS);
        }
        Cmd::FreePort => {
            let l = std::net::TcpListener::bind("127.0.0.1:0")?;
            println!("{}", l.local_addr()?.port());
            return Ok(ExitCode::SUCCESS);
        }
        _ => {}
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(scenario(cli.cmd))
}

async fn scenario(cmd: Cmd) -> Result<ExitCode> {
    let started = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    // Idle and storm sessions mostly sit still: small read buffers.
    const SMALL: usize = 4096;
    const LARGE: usize = 128 * 1024;
    let (name, common, hb, buf): (&str, &Common, (u64, u64), usize) = match &cmd {
        Cmd::Throughput(a) => ("throughput", &a.common, (0, 0), LARGE),
        Cmd::Fanout(a) => ("fanout", &a.common, (0, 0), LARGE),
        Cmd::PacedSearch(a) => ("paced-search", &a.common, (0, 0), LARGE),
        Cmd::ConnectStorm(a) => ("connect-storm", &a.common, (0, 0), SMALL),
        Cmd::Idle(a) => ("idle", &a.common, (10_000, 10_000), SMALL),
        Cmd::Report(_) | Cmd::FreePort => unreachable!("handled before the runtime starts"),
    };
    let ctx = Arc::new(Ctx::new(common, hb, buf).await?);
    progress::note(name, &format!("target {}", ctx.opts.url));
    let sampler = if common.rabbitmq_counts {
        Some(
            rabbit::Sampler::start(
                std::time::Duration::from_secs(3),
                common.rabbitmq_node.clone(),
            )
            .await,
        )
    } else {
        None
    };
    let mut outcome: Outcome = match &cmd {
        Cmd::Throughput(a) => a.run(&ctx).await?,
        Cmd::Fanout(a) => a.run(&ctx).await?,
        Cmd::PacedSearch(a) => a.run(&ctx).await?,
        Cmd::ConnectStorm(a) => a.run(&ctx).await?,
        Cmd::Idle(a) => a.run(&ctx).await?,
        Cmd::Report(_) | Cmd::FreePort => unreachable!("handled before the runtime starts"),
    };
    if let Some(s) = sampler {
        outcome.results["rabbitmq"] = s.finish().await;
    }
    let ok = outcome.failures.is_empty();
    let out = json!({
        "tool": "stomp-load",
        "tool_version": env!("CARGO_PKG_VERSION"),
        "scenario": name,
        "url": ctx.opts.url,
        "started_at_unix_ms": started,
        "argv": std::env::args().collect::<Vec<_>>(),
        "tags": ctx.tags,
        "params": outcome.params,
        "results": outcome.results,
        "check": { "ok": ok, "failures": outcome.failures },
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    if !ok {
        progress::note(
            name,
            &format!("checks failed: {}", outcome.failures.join("; ")),
        );
        if ctx.strict {
            return Ok(ExitCode::from(2));
        }
    }
    Ok(ExitCode::SUCCESS)
}
