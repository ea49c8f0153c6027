//! `stomp-load report`: reads the run files written by bench/compare.sh
//! (stomp-load JSON output tagged `case`, `target` and `round`), takes the
//! median over rounds of every figure, and writes the markdown report with
//! the targets side by side (shared, per-session, embedded, direct: those
//! that ran) and their ratios to direct, the targets with met/missed, and an
//! SVG plot of the latency percentiles.

use anyhow::{anyhow, Context, Result};
use plotters::prelude::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// `stomp-load report`.
#[derive(Debug, Clone, clap::Args)]
pub struct ReportArgs {
    /// Directory holding the run JSON files (every *.json in it is read).
    #[arg(long, value_name = "DIR")]
    pub runs: PathBuf,
    /// Markdown file to write.
    #[arg(long, value_name = "FILE")]
    pub markdown: PathBuf,
    /// SVG latency plot to write.
    #[arg(long, value_name = "FILE")]
    pub svg: PathBuf,
    /// RabbitMQ version, for the machine section.
    #[arg(long)]
    pub rabbitmq_version: Option<String>,
    /// Gateway configuration file used for the runs, quoted in the report
    /// (repeatable: one per gateway target).
    #[arg(long, value_name = "FILE")]
    pub gateway_config: Vec<PathBuf>,
    /// The command that produced the runs (e.g. "bench/compare.sh --rounds 3").
    #[arg(long)]
    pub invocation: Option<String>,
    /// Extra note for the Notes section (repeatable).
    #[arg(long = "note")]
    pub notes: Vec<String>,
}

/// Runs grouped by (case, target).
#[derive(Debug, Default)]
struct Runs {
    by: BTreeMap<(String, String), Vec<Value>>,
    files: usize,
    failed_checks: Vec<String>,
}

/// The gateway with the shared fan-out path (relay mode).
const SHARED: &str = "shared";
/// The gateway with one STOMP connection to RabbitMQ per session (relay
/// mode); runs tagged `gateway` (older reports) count as this.
const PER_SESSION: &str = "per-session";
/// The gateway with its embedded broker (no RabbitMQ).
const EMBEDDED: &str = "embedded";
/// RabbitMQ's Web-STOMP endpoint.
const DIRECT: &str = "direct";
/// Column order of the report.
const TARGETS: [&str; 4] = [SHARED, PER_SESSION, EMBEDDED, DIRECT];

impl Runs {
    fn load(dir: &Path) -> Result<Runs> {
        let mut runs = Runs::default();
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .collect();
        paths.sort();
        for p in paths {
            let text =
                std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
            let v: Value = match serde_json::from_str(&text) {
                Ok(v) => v,
                Err(e) => {
                    eprintln!("stomp-load report: skipping {}: {e}", p.display());
                    continue;
                }
            };
            let tag = |k: &str| v["tags"][k].as_str().map(str::to_owned);
            let (Some(case), Some(mut target)) = (tag("case"), tag("target")) else {
                eprintln!(
                    "stomp-load report: skipping {}: no case/target tags",
                    p.display()
                );
                continue;
            };
            if target == "gateway" {
                target = PER_SESSION.to_owned();
            }
            if v["check"]["ok"] == Value::Bool(false) {
                let failures: Vec<&str> = v["check"]["failures"]
                    .as_array()
                    .map(|a| a.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                runs.failed_checks.push(format!(
                    "{case} / {target} / round {}: {}",
                    tag("round").unwrap_or_else(|| "?".into()),
                    failures.join("; ")
                ));
            }
            runs.files += 1;
            runs.by.entry((case, target)).or_default().push(v);
        }
        Ok(runs)
    }

    fn get(&self, case: &str, target: &str) -> &[Value] {
        self.by
            .get(&(case.to_owned(), target.to_owned()))
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// Median over rounds of `f`.
    fn median(&self, case: &str, target: &str, f: &dyn Fn(&Value) -> Option<f64>) -> Option<f64> {
        median(self.get(case, target).iter().filter_map(f).collect())
    }

    /// The targets that ran at all, in column order.
    fn targets(&self) -> Vec<&'static str> {
        TARGETS
            .into_iter()
            .filter(|t| self.by.keys().any(|(_, target)| target == t))
            .collect()
    }

    /// Whether `case` ran against any target.
    fn has(&self, case: &str) -> bool {
        self.by.keys().any(|(c, _)| c == case)
    }

    /// Every round's value of `f`, in file order.
    fn all(&self, case: &str, target: &str, f: &dyn Fn(&Value) -> Option<f64>) -> Vec<Option<f64>> {
        self.get(case, target).iter().map(f).collect()
    }
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// `results.<path>` as a number (path with `/`).
fn res(path: &'static str) -> impl Fn(&Value) -> Option<f64> {
    move |v| {
        v.pointer(&format!("/results/{path}"))
            .and_then(Value::as_f64)
    }
}

/// `derived.<field>` of the measured process called `name`.
fn proc(name: &'static str, field: &'static str) -> impl Fn(&Value) -> Option<f64> {
    move |v| {
        v["results"]["processes"]
            .as_array()?
            .iter()
            .find(|p| p["name"] == name)?
            .get("derived")?
            .get(field)?
            .as_f64()
    }
}

fn fmt(x: Option<f64>) -> String {
    match x {
        None => "—".into(),
        Some(x) if x.fract() == 0.0 && x.abs() < 1e15 => format!("{x:.0}"),
        Some(x) if x.abs() >= 1000.0 => format!("{:.0}", x),
        Some(x) if x.abs() >= 100.0 => format!("{:.1}", x),
        Some(x) if x.abs() >= 1.0 => format!("{:.2}", x),
        Some(x) => format!("{:.3}", x),
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b != 0.0 => format!("{:.2}", a / b),
        _ => "—".into(),
    }
}

/// Extracts one number from a run's JSON.
type Extract = Box<dyn Fn(&Value) -> Option<f64>>;

/// One row of the figures table.
struct Row {
    label: &'static str,
    case: &'static str,
    f: Extract,
    /// The direct column does not apply (the figure is about the gateway
    /// process).
    gateway_only: bool,
}

fn row(
    label: &'static str,
    case: &'static str,
    f: impl Fn(&Value) -> Option<f64> + 'static,
) -> Row {
    Row {
        label,
        case,
        f: Box::new(f),
        gateway_only: false,
    }
}

fn gw_row(
    label: &'static str,
    case: &'static str,
    f: impl Fn(&Value) -> Option<f64> + 'static,
) -> Row {
    Row {
        gateway_only: true,
        ..row(label, case, f)
    }
}

fn rows() -> Vec<Row> {
    vec![
        row(
            "Throughput: delivered msg/s",
            "throughput",
            res("delivered_per_s"),
        ),
        row("Throughput: sent msg/s", "throughput", res("sent_per_s")),
        row("Throughput: messages lost", "throughput", lost),
        gw_row(
            "Throughput: gateway CPU µs per message",
            "throughput",
            proc("gateway", "cpu_us_per_msg_delivered"),
        ),
        row(
            "Throughput: RabbitMQ CPU µs per message",
            "throughput",
            proc("rabbitmq", "cpu_us_per_msg_delivered"),
        ),
        row(
            "Latency @ fixed rate: delivered msg/s",
            "latency",
            res("delivered_per_s"),
        ),
        row(
            "Latency @ fixed rate: p50 ms",
            "latency",
            res("latency_ms/p50"),
        ),
        row(
            "Latency @ fixed rate: p90 ms",
            "latency",
            res("latency_ms/p90"),
        ),
        row(
            "Latency @ fixed rate: p99 ms",
            "latency",
            res("latency_ms/p99"),
        ),
        row(
            "Latency @ fixed rate: p99.9 ms",
            "latency",
            res("latency_ms/p99_9"),
        ),
        row(
            "Latency @ fixed rate: max ms",
            "latency",
            res("latency_ms/max"),
        ),
        row("Latency @ fixed rate: messages lost", "latency", lost),
        gw_row(
            "Latency @ fixed rate: gateway CPU µs per message",
            "latency",
            proc("gateway", "cpu_us_per_msg_delivered"),
        ),
        row(
            "Latency @ fixed rate: RabbitMQ CPU µs per message",
            "latency",
            proc("rabbitmq", "cpu_us_per_msg_delivered"),
        ),
        row("Fan-out: delivered msg/s", "fanout", res("delivered_per_s")),
        row("Fan-out: p50 ms", "fanout", res("latency_ms/p50")),
        row("Fan-out: p99 ms", "fanout", res("latency_ms/p99")),
        row("Fan-out: messages lost", "fanout", lost),
        row(
            "Paced 1:1 search: highest sustained msg/s",
            "paced",
            res("sustained_per_s"),
        ),
        row(
            "Paced 1:1 search: lowest rate not sustained, msg/s",
            "paced",
            res("lowest_failed_per_s"),
        ),
        row(
            "Paced 1:1 search: p50 ms at the sustained rate",
            "paced",
            res("at_sustained/latency_ms/p50"),
        ),
        row(
            "Paced 1:1 search: p99 ms at the sustained rate",
            "paced",
            res("at_sustained/latency_ms/p99"),
        ),
        gw_row(
            "Paced 1:1 search: gateway CPU µs per message at the sustained rate",
            "paced",
            step_proc("gateway", "cpu_us_per_msg_delivered"),
        ),
        row(
            "Paced 1:1 search: RabbitMQ CPU µs per message at the sustained rate",
            "paced",
            step_proc("rabbitmq", "cpu_us_per_msg_delivered"),
        ),
        row(
            "Fan-out 10k: delivered msg/s",
            "fanout-wide",
            res("delivered_per_s"),
        ),
        row(
            "Fan-out 10k: subscribers subscribed",
            "fanout-wide",
            res("subscribers/subscribed"),
        ),
        row("Fan-out 10k: p50 ms", "fanout-wide", res("latency_ms/p50")),
        row("Fan-out 10k: p99 ms", "fanout-wide", res("latency_ms/p99")),
        row(
            "Fan-out 10k: publish to last subscriber p50 ms",
            "fanout-wide",
            res("last_subscriber_latency_ms/p50"),
        ),
        row(
            "Fan-out 10k: publish to last subscriber p99 ms",
            "fanout-wide",
            res("last_subscriber_latency_ms/p99"),
        ),
        row("Fan-out 10k: messages lost", "fanout-wide", lost),
        row(
            "Fan-out 10k: deliveries still in transit when the drain stopped",
            "fanout-wide",
            in_transit,
        ),
        row(
            "Fan-out 10k: RabbitMQ connections (max during run)",
            "fanout-wide",
            res("rabbitmq/connections/max"),
        ),
        row(
            "Fan-out 10k: RabbitMQ queues (max during run)",
            "fanout-wide",
            res("rabbitmq/queues/max"),
        ),
        gw_row(
            "Fan-out 10k: gateway RSS MiB at window end",
            "fanout-wide",
            mib(proc("gateway", "rss_kib_window_end")),
        ),
        row(
            "Fan-out 10k: RabbitMQ RSS MiB at window end",
            "fanout-wide",
            mib(proc("rabbitmq", "rss_kib_window_end")),
        ),
        gw_row(
            "Fan-out 10k: gateway CPU % in window",
            "fanout-wide",
            proc("gateway", "cpu_pct_window"),
        ),
        row(
            "Fan-out 10k: RabbitMQ CPU % in window",
            "fanout-wide",
            proc("rabbitmq", "cpu_pct_window"),
        ),
        row(
            "Connect storm: sessions/s",
            "connect-storm",
            res("sessions_per_s"),
        ),
        row(
            "Connect storm: time to CONNECTED p50 ms",
            "connect-storm",
            res("time_to_connected_ms/p50"),
        ),
        row(
            "Connect storm: time to CONNECTED p99 ms",
            "connect-storm",
            res("time_to_connected_ms/p99"),
        ),
        row(
            "Connect storm: failed sessions",
            "connect-storm",
            res("failed"),
        ),
        row("Idle: sessions up at end of hold", "idle", res("up_at_end")),
        gw_row(
            "Idle: gateway RSS KiB per session",
            "idle",
            proc("gateway", "rss_kib_per_session"),
        ),
        row(
            "Idle: RabbitMQ RSS KiB per session",
            "idle",
            proc("rabbitmq", "rss_kib_per_session"),
        ),
        gw_row(
            "Idle: gateway CPU % while idle",
            "idle",
            proc("gateway", "cpu_pct_hold"),
        ),
        row(
            "Idle: RabbitMQ CPU % while idle",
            "idle",
            proc("rabbitmq", "cpu_pct_hold"),
        ),
        row(
            "Idle subscribed: sessions up at end of hold",
            "idle-subscribed",
            res("up_at_end"),
        ),
        gw_row(
            "Idle subscribed: gateway RSS KiB per session",
            "idle-subscribed",
            proc("gateway", "rss_kib_per_session"),
        ),
        row(
            "Idle subscribed: RabbitMQ RSS KiB per session",
            "idle-subscribed",
            proc("rabbitmq", "rss_kib_per_session"),
        ),
        row(
            "Idle subscribed: RabbitMQ connections (max)",
            "idle-subscribed",
            res("rabbitmq/connections/max"),
        ),
        row(
            "Idle subscribed: RabbitMQ queues (max)",
            "idle-subscribed",
            res("rabbitmq/queues/max"),
        ),
    ]
}

/// Messages lost: `results.loss` of a run whose drain completed (a drain
/// cut off by `--drain-max` leaves messages in transit, not lost).
fn lost(v: &Value) -> Option<f64> {
    match v["results"]["drain_complete"].as_bool() {
        Some(false) => Some(0.0),
        _ => v["results"]["loss"].as_f64(),
    }
}

/// Deliveries not made when a drain was cut off (0 when it completed).
fn in_transit(v: &Value) -> Option<f64> {
    match v["results"]["drain_complete"].as_bool() {
        Some(false) => v["results"]["loss"].as_f64(),
        Some(true) => Some(0.0),
        None => None,
    }
}

/// `derived.<field>` of process `name` in the paced search's step at the
/// sustained rate.
fn step_proc(name: &'static str, field: &'static str) -> impl Fn(&Value) -> Option<f64> {
    move |v| {
        v["results"]["at_sustained"]["processes"]
            .as_array()?
            .iter()
            .find(|p| p["name"] == name)?
            .get("derived")?
            .get(field)?
            .as_f64()
    }
}

/// KiB to MiB.
fn mib(f: impl Fn(&Value) -> Option<f64>) -> impl Fn(&Value) -> Option<f64> {
    move |v| f(v).map(|k| (k / 1024.0 * 10.0).round() / 10.0)
}

/// A target: a description, the measured values in words, and a verdict.
struct Target {
    name: String,
    measured: String,
    met: Option<bool>,
}

/// The first run of a case, whichever target ran it.
fn first<'a>(r: &'a Runs, case: &str) -> Option<&'a Value> {
    TARGETS.iter().find_map(|t| r.get(case, t).first())
}

/// Parameters of a case's first run, whichever target ran it.
fn params<'a>(r: &'a Runs, case: &str) -> &'a Value {
    first(r, case).map(|v| &v["params"]).unwrap_or(&Value::Null)
}

/// "open loop" or "fixed N msg/s" from a throughput case's parameters.
fn pacing(p: &Value) -> String {
    match p["rate"].as_f64() {
        Some(r) => format!("fixed {r:.0} msg/s"),
        None if p.is_null() => "?".into(),
        None => "open loop".into(),
    }
}

/// (case, RabbitMQ connections, queues, browser sessions) of a shared run.
type PodCost = (&'static str, Option<f64>, Option<f64>, Option<f64>);

/// The targets whose cases ran: the relay targets (per-session vs direct)
/// and the shared fan-out targets of issue 9 (shared vs direct).
fn targets(r: &Runs) -> Vec<Target> {
    let mut out = Vec::new();
    let m = |case: &str, target: &str, f: &dyn Fn(&Value) -> Option<f64>| r.median(case, target, f);
    let ran = |case: &str, target: &str| !r.get(case, target).is_empty();

    if r.has("throughput") {
        let (g, d) = (
            m("throughput", PER_SESSION, &res("delivered_per_s")),
            m("throughput", DIRECT, &res("delivered_per_s")),
        );
        out.push(Target {
            name: format!(
                "Relay throughput 1→1, 100 B, open loop (this run: {}): per-session delivered msg/s ≥ 0.9 × direct \
                 (a queueing figure that flips between runs; the paced search settles it)",
                pacing(params(r, "throughput"))
            ),
            measured: format!("{} vs {} msg/s (ratio {})", fmt(g), fmt(d), ratio(g, d)),
            met: g.zip(d).map(|(g, d)| g >= 0.9 * d),
        });
    }

    for t in [PER_SESSION, SHARED] {
        if !ran("paced", t) {
            continue;
        }
        let (g, d) = (
            m("paced", t, &res("sustained_per_s")),
            m("paced", DIRECT, &res("sustained_per_s")),
        );
        out.push(Target {
            name: format!(
                "Relay 1:1, paced search ({} topic pairs): {t} highest sustained msg/s ≥ 0.9 × direct",
                params(r, "paced")["pairs"]
            ),
            measured: format!("{} vs {} msg/s (ratio {})", fmt(g), fmt(d), ratio(g, d)),
            met: g.zip(d).map(|(g, d)| g >= 0.9 * d),
        });
    }

    if r.has("latency") {
        let (g, d) = (
            m("latency", PER_SESSION, &res("latency_ms/p99")),
            m("latency", DIRECT, &res("latency_ms/p99")),
        );
        out.push(Target {
            name: format!(
                "Latency at fixed 2,000 msg/s (this run: {}): per-session p99 ≤ direct p99 + 1 ms",
                pacing(params(r, "latency"))
            ),
            measured: format!("p99 {} ms vs {} ms", fmt(g), fmt(d)),
            met: g.zip(d).map(|(g, d)| g <= d + 1.0),
        });
    }

    // Issue 9: what a pod costs RabbitMQ on the shared path.
    let cost: Vec<PodCost> = ["fanout-wide", "idle-subscribed"]
        .into_iter()
        .filter(|c| ran(c, SHARED))
        .map(|c| {
            (
                c,
                m(c, SHARED, &res("rabbitmq/connections/max")),
                m(c, SHARED, &res("rabbitmq/queues/max")),
                m(c, SHARED, &|v: &Value| {
                    v.pointer("/results/subscribers/subscribed")
                        .or_else(|| v.pointer("/results/up_after_open"))
                        .and_then(Value::as_f64)
                }),
            )
        })
        .filter(|(_, conns, queues, _)| conns.is_some() || queues.is_some())
        .collect();
    if !cost.is_empty() {
        let measured = cost
            .iter()
            .map(|(c, conns, queues, n)| {
                format!(
                    "{c}: {} connections, {} queues with {} browser sessions",
                    fmt(*conns),
                    fmt(*queues),
                    fmt(*n)
                )
            })
            .collect::<Vec<_>>()
            .join("; ");
        let met = cost
            .iter()
            .map(|(_, c, q, _)| c.zip(*q).map(|(c, q)| c <= 4.0 && q <= 1.0))
            .collect::<Option<Vec<bool>>>()
            .map(|v| v.into_iter().all(|x| x));
        out.push(Target {
            name: "Shared: RabbitMQ connections ≤ 4 and queues ≤ 1 per pod, whatever the number of browsers \
                   (max during the run, one pod, nothing else on the node)"
                .into(),
            measured,
            met,
        });
    }

    if ran("fanout-wide", SHARED) {
        let (g, d) = (
            m("fanout-wide", SHARED, &res("delivered_per_s")),
            m("fanout-wide", DIRECT, &res("delivered_per_s")),
        );
        let p = params(r, "fanout-wide");
        out.push(Target {
            name: format!(
                "Fan-out to 10,000 subscribers on one topic (this run: {} at {}): shared delivered msg/s ≥ 10 × direct",
                p["subscribers"],
                pacing(p)
            ),
            measured: format!("{} vs {} msg/s (ratio {})", fmt(g), fmt(d), ratio(g, d)),
            met: g.zip(d).map(|(g, d)| g >= 10.0 * d),
        });
    }

    if ran("idle-subscribed", SHARED) {
        let g = m(
            "idle-subscribed",
            SHARED,
            &proc("gateway", "rss_kib_per_session"),
        );
        let up = m("idle-subscribed", SHARED, &res("up_at_end"));
        out.push(Target {
            name: format!(
                "Idle density, subscribed (this run: {} sessions): shared gateway RSS ≤ 8 KiB per idle subscribed session",
                params(r, "idle-subscribed")["sessions"]
            ),
            measured: format!("{} KiB per session ({} sessions up)", fmt(g), fmt(up)),
            met: g.map(|g| g <= 8.0),
        });
    }

    if r.has("connect-storm") {
        let p = params(r, "connect-storm");
        let d = m("connect-storm", DIRECT, &res("sessions_per_s"));
        if ran("connect-storm", SHARED) {
            let g = m("connect-storm", SHARED, &res("sessions_per_s"));
            out.push(Target {
                name: format!(
                    "Connect storm (this run: {} sessions at concurrency {}): shared sessions/s ≥ 2 × direct \
                     (a session needs no broker handshake)",
                    p["sessions"], p["concurrency"]
                ),
                measured: format!("{} vs {} sessions/s (ratio {})", fmt(g), fmt(d), ratio(g, d)),
                met: g.zip(d).map(|(g, d)| g >= 2.0 * d),
            });
        }
        if ran("connect-storm", PER_SESSION) {
            let g = m("connect-storm", PER_SESSION, &res("sessions_per_s"));
            out.push(Target {
                name: format!(
                    "Connect storm (this run: {} sessions at concurrency {}): per-session sessions/s ≥ 0.9 × direct",
                    p["sessions"], p["concurrency"]
                ),
                measured: format!("{} vs {} sessions/s (ratio {})", fmt(g), fmt(d), ratio(g, d)),
                met: g.zip(d).map(|(g, d)| g >= 0.9 * d),
            });
        }
    }

    if ran("idle", PER_SESSION) {
        let g = m("idle", PER_SESSION, &proc("gateway", "rss_kib_per_session"));
        let up = m("idle", PER_SESSION, &res("up_at_end"));
        let n = params(r, "idle")["sessions"].as_u64();
        out.push(Target {
            name: format!(
                "Idle density 5,000 sessions (this run: {}): per-session gateway RSS ≤ 16 KiB per relayed session",
                n.map(|n| n.to_string()).unwrap_or_else(|| "?".into())
            ),
            measured: format!("{} KiB per session ({} sessions up)", fmt(g), fmt(up)),
            met: g.map(|g| g <= 16.0 && up.is_some_and(|u| n.is_some_and(|n| u >= n as f64))),
        });
    }

    if ran("throughput", PER_SESSION) {
        let (g, q) = (
            m(
                "throughput",
                PER_SESSION,
                &proc("gateway", "cpu_us_per_msg_delivered"),
            ),
            m(
                "throughput",
                PER_SESSION,
                &proc("rabbitmq", "cpu_us_per_msg_delivered"),
            ),
        );
        out.push(Target {
            name:
                "Throughput run: gateway CPU per message ≤ 1/3 of RabbitMQ's (same per-session run)"
                    .into(),
            measured: format!(
                "{} µs vs {} µs per message (ratio {})",
                fmt(g),
                fmt(q),
                ratio(g, q)
            ),
            met: g.zip(q).map(|(g, q)| g <= q / 3.0),
        });
    }
    out
}

fn machine() -> Vec<(String, String)> {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_else(|| "unknown".into());
    let nproc = std::thread::available_parallelism()
        .map(|n| n.get().to_string())
        .unwrap_or_else(|_| "?".into());
    let mem = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map(|kib| format!("{:.1} GiB", kib / 1024.0 / 1024.0))
        .unwrap_or_else(|| "?".into());
    let kernel = read("/proc/sys/kernel/osrelease").trim().to_owned();
    vec![
        ("CPUs (nproc)".into(), nproc),
        ("CPU model".into(), model),
        ("Memory".into(), mem),
        ("Kernel".into(), kernel),
    ]
}

/// `YYYY-MM-DD HH:MM UTC` for a Unix time.
fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60
    )
}

fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=,@+%".contains(c))
    {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

fn argv(v: &Value) -> Option<String> {
    let a = v["argv"].as_array()?;
    Some(
        a.iter()
            .filter_map(Value::as_str)
            .map(shell_quote)
            .collect::<Vec<_>>()
            .join(" "),
    )
}

/// One line on what a case did, from its parameters.
fn describe(case: &str, p: &Value) -> String {
    let n = |k: &str| match &p[k] {
        Value::Null => "?".to_owned(),
        v => v.to_string(),
    };
    let s = |k: &str| {
        p[k].as_f64()
            .map(|x| format!("{x}"))
            .unwrap_or_else(|| "?".into())
    };
    let pace = match p["rate"].as_f64() {
        Some(r) => format!("fixed rate {r:.0} msg/s"),
        None => "open loop (as fast as the socket takes)".into(),
    };
    let hb = p["connection"]["heart_beat"].as_str().unwrap_or("?");
    match case {
        "throughput" | "latency" => format!(
            "{} publisher(s) → {} subscriber(s) over {} topic(s), {}-byte bodies, {pace}, ack auto; \
             {} s warm-up, {} s measurement window",
            n("publishers"),
            n("subscribers"),
            n("destinations"),
            n("size"),
            s("warmup_s"),
            s("duration_s")
        ),
        "fanout" | "fanout-wide" => format!(
            "one topic, {} subscribers, one publisher at {pace}, {}-byte bodies; {} s warm-up, {} s window",
            n("subscribers"),
            n("size"),
            s("warmup_s"),
            s("duration_s")
        ),
        "connect-storm" => format!(
            "{} sessions opened with {} handshakes in flight (TCP + WebSocket + CONNECT → CONNECTED), \
             then all closed with DISCONNECT; heart-beat {hb}",
            n("sessions"),
            n("concurrency")
        ),
        "idle" | "idle-subscribed" => format!(
            "{} sessions with heart-beat {hb} opened ({} at a time) and held idle for {} s{}",
            n("sessions"),
            n("concurrency"),
            s("hold_s"),
            match p["subscribe"].as_str() {
                Some(d) => format!(", each subscribed to `{d}`"),
                None => String::new(),
            }
        ),
        "paced" => format!(
            "paced search over {} 1:1 topic pairs (publisher i → topic i → subscriber i), {}-byte bodies: \
             fixed-rate steps of {} s (after {} s warm-up), doubling from {} msg/s until a step is not \
             sustained, then bisecting to within {} %; a step is sustained when publishers sent and \
             subscribers received at least {} % of the offered rate, the in-flight count grew by at \
             most {} % of the rate per second (least-squares slope over the window, sampled every \
             250 ms), the mean latency of the window's last quarter stayed under twice the first \
             quarter's + {} ms and the window's p99 under {} ms; a step not sustained was tried {} \
             more time(s) before its rate counted as not sustained; before every step the search \
             waited until RabbitMQ and the gateway were idle (under {} % of a core)",
            n("pairs"),
            n("size"),
            s("duration_s"),
            s("warmup_s"),
            s("start_rate"),
            p["precision"].as_f64().map_or("?".into(), |x| format!("{}", x * 100.0)),
            p["tolerance"].as_f64().map_or("?".into(), |x| format!("{}", 100.0 - x * 100.0)),
            p["tolerance"].as_f64().map_or("?".into(), |x| format!("{}", x * 100.0)),
            s("latency_slack_ms"),
            s("max_p99_ms"),
            n("retries"),
            s("settle_cpu_pct")
        ),
        _ => String::new(),
    }
}

const CASES: [&str; 8] = [
    "throughput",
    "latency",
    "paced",
    "fanout",
    "fanout-wide",
    "connect-storm",
    "idle",
    "idle-subscribed",
];

fn markdown(a: &ReportArgs, r: &Runs, svg_written: bool) -> Result<String> {
    let mut md = String::new();
    let most = r.by.values().map(Vec::len).max().unwrap_or(0);
    let fewest = r.by.values().map(Vec::len).min().unwrap_or(0);
    let rounds = if most == fewest {
        most.to_string()
    } else {
        format!("{fewest} to {most}")
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    writeln!(md, "# Benchmarks: stomp-gateway vs RabbitMQ Web-STOMP\n")?;
    writeln!(
        md,
        "Generated by `stomp-load report` on {} from {} runs ({} round(s) per case and target). \
         Every scenario ran with identical traffic against the gateway with the shared fan-out \
         path (`shared`), the gateway with one RabbitMQ connection per session (`per-session`; \
         `gateway` in older reports), the gateway's embedded broker (`embedded`) and RabbitMQ's \
         own Web-STOMP endpoint (`direct`), those that were run, in turn; each figure is the \
         median over rounds. Regenerate with `bench/compare.sh`.\n",
        utc(now),
        r.files,
        rounds
    )?;

    writeln!(md, "## Scenarios\n")?;
    for case in CASES {
        if let Some(v) = first(r, case) {
            writeln!(md, "- **{case}**: {}", describe(case, &v["params"]))?;
        }
    }
    writeln!(md)?;

    writeln!(md, "## Machine\n")?;
    writeln!(md, "| | |\n|---|---|")?;
    for (k, v) in machine() {
        writeln!(md, "| {k} | {v} |")?;
    }
    writeln!(
        md,
        "| RabbitMQ | {} |",
        a.rabbitmq_version.as_deref().unwrap_or("unknown")
    )?;
    writeln!(
        md,
        "\nThe load generator, the gateway and RabbitMQ all run on this machine and share its CPUs.\n"
    )?;

    writeln!(md, "## Targets\n")?;
    writeln!(
        md,
        "| Target | Measured (median) | Verdict |\n|---|---|---|"
    )?;
    for t in targets(r) {
        let verdict = match t.met {
            Some(true) => "**met**",
            Some(false) => "**missed**",
            None => "not measured",
        };
        writeln!(md, "| {} | {} | {verdict} |", t.name, t.measured)?;
    }

    writeln!(md, "\n## Results\n")?;
    let cols = r.targets();
    let gw_cols: Vec<&str> = cols.iter().copied().filter(|t| *t != DIRECT).collect();
    let has_direct = cols.contains(&DIRECT);
    let mut head = String::from("| Figure |");
    let mut rule = String::from("|---|");
    for c in &cols {
        write!(head, " {c} |")?;
        rule.push_str("---:|");
    }
    if has_direct {
        for c in &gw_cols {
            write!(head, " {c}/direct |")?;
            rule.push_str("---:|");
        }
    }
    writeln!(md, "{head}\n{rule}")?;
    for row in rows() {
        let vals: Vec<Option<f64>> = cols
            .iter()
            .map(|t| {
                if row.gateway_only && *t == DIRECT {
                    None
                } else {
                    r.median(row.case, t, &row.f)
                }
            })
            .collect();
        if vals.iter().all(Option::is_none) {
            continue;
        }
        let mut line = format!("| {} |", row.label);
        for (t, v) in cols.iter().zip(&vals) {
            if row.gateway_only && *t == DIRECT {
                line.push_str(" n/a |");
            } else {
                write!(line, " {} |", fmt(*v))?;
            }
        }
        if has_direct {
            let d = if row.gateway_only {
                None
            } else {
                r.median(row.case, DIRECT, &row.f)
            };
            for c in &gw_cols {
                if row.gateway_only {
                    line.push_str(" n/a |");
                } else {
                    write!(line, " {} |", ratio(r.median(row.case, c, &row.f), d))?;
                }
            }
        }
        writeln!(md, "{line}")?;
    }
    if svg_written {
        let link = match (a.svg.parent(), a.markdown.parent()) {
            (Some(s), Some(m)) if s == m => a
                .svg
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default(),
            _ => a.svg.display().to_string(),
        };
        writeln!(md, "\n![Latency percentiles by target]({link})\n")?;
    }

    writeln!(md, "\n## Every round\n")?;
    writeln!(md, "| Case | Figure | Target | Rounds |\n|---|---|---|---|")?;
    let per_round: [(&str, &str, Extract); 8] = [
        (
            "throughput",
            "delivered msg/s",
            Box::new(res("delivered_per_s")),
        ),
        ("latency", "p99 ms", Box::new(res("latency_ms/p99"))),
        (
            "fanout",
            "delivered msg/s",
            Box::new(res("delivered_per_s")),
        ),
        (
            "connect-storm",
            "sessions/s",
            Box::new(res("sessions_per_s")),
        ),
        (
            "idle",
            "gateway RSS KiB/session",
            Box::new(proc("gateway", "rss_kib_per_session")),
        ),
        ("paced", "sustained msg/s", Box::new(res("sustained_per_s"))),
        (
            "fanout-wide",
            "delivered msg/s",
            Box::new(res("delivered_per_s")),
        ),
        (
            "idle-subscribed",
            "gateway RSS KiB/session",
            Box::new(proc("gateway", "rss_kib_per_session")),
        ),
    ];
    for (case, label, f) in &per_round {
        for target in TARGETS {
            let vals = r.all(case, target, f);
            if vals.is_empty() || (case.starts_with("idle") && target == DIRECT) {
                continue;
            }
            let vals: Vec<String> = vals.into_iter().map(fmt).collect();
            writeln!(md, "| {case} | {label} | {target} | {} |", vals.join(", "))?;
        }
    }

    writeln!(md, "\n## Commands\n")?;
    if let Some(inv) = &a.invocation {
        writeln!(md, "Produced by:\n\n```sh\n{inv}\n```\n")?;
    }
    writeln!(
        md,
        "Exact `stomp-load` commands of the first round:\n\n```sh"
    )?;
    for case in CASES {
        for target in TARGETS {
            if let Some(cmd) = r.get(case, target).first().and_then(argv) {
                writeln!(md, "# {case} / {target}\n{cmd}")?;
            }
        }
    }
    writeln!(md, "```")?;
    for path in &a.gateway_config {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        writeln!(
            md,
            "\nGateway configuration ({}):\n\n```toml\n{}\n```",
            path.file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default(),
            text.trim_end()
        )?;
    }

    writeln!(md, "\n## Reproducing\n")?;
    writeln!(
        md,
        "```sh\n\
         bench/compare.sh                 # full run: release build, the bench's own RabbitMQ node\n\
         \x20                                # (scripts/rabbitmq-bench-node.sh), 3 rounds per case and\n\
         \x20                                # target, rewrites this file and the SVG\n\
         bench/compare.sh --quick         # 1 round, tiny sizes; report in a temp dir\n\
         bench/compare.sh --cases paced,fanout-wide,idle-subscribed,connect-storm --rounds 1\n\
         bench/smoke.sh ws://127.0.0.1:15674/ws   # 2 s, 1 → 1 at 200 msg/s; fails on loss\n\
         stomp-load throughput --help     # also: paced-search, fanout, connect-storm, idle, report\n\
         ```"
    )?;
    writeln!(md, "\nThe per-run JSON (one object per run: scenario, url, params, results, check) is kept under `target/bench/`.")?;

    writeln!(md, "\n## Notes\n")?;
    let mut notes: Vec<String> = vec![
        "Open-loop (unpaced) runs measure queueing: quote delivered msg/s from them and take latency from \
         the fixed-rate run."
            .into(),
        "Latency is end to end, publisher to subscriber, from a send timestamp in the message body \
         (nanoseconds since a process-wide `Instant`; publisher and subscriber are in the same process), \
         measured from the actual send time unless the JSON says otherwise, for messages sent inside \
         the measurement window (after warm-up)."
            .into(),
        "Loss is, per destination, messages sent × subscribers that had a RECEIPT for their SUBSCRIBE \
         before publishing started, minus messages received, after a drain (until no message for \
         `--drain-idle` seconds or `--drain-max`)."
            .into(),
        "CPU per message is the process's utime + stime (from /proc/PID/stat) during the measurement \
         window divided by the messages delivered in that window. RabbitMQ routes and delivers every \
         message in both the gateway and the direct run; the gateway's CPU per message is compared with \
         RabbitMQ's in the same gateway run."
            .into(),
        "Resident memory per session is (VmRSS after all sessions are open and settled − VmRSS before \
         opening) / sessions up. In a per-session run each client session also costs RabbitMQ one \
         STOMP connection, so RabbitMQ's per-session figure is shown for every target."
            .into(),
        "RabbitMQ connections and queues are counted on the node with `rabbitmqctl eval` (every \
         protocol: AMQP, STOMP, Web-STOMP) before, every 3 s during and after a run; the figure is \
         the maximum. Nothing else uses the bench node, so in a shared or per-session run every \
         connection and queue counted is the gateway's (one pod)."
            .into(),
    ];
    notes.extend(a.notes.iter().cloned());
    for n in notes {
        writeln!(md, "- {n}")?;
    }
    if !r.failed_checks.is_empty() {
        writeln!(
            md,
            "\nRuns whose checks failed (loss, failed sessions or errors):\n"
        )?;
        for f in &r.failed_checks {
            writeln!(md, "- {f}")?;
        }
    }
    Ok(md)
}

const PERCENTILES: [(&str, &str); 5] = [
    ("p50", "p50"),
    ("p90", "p90"),
    ("p99", "p99"),
    ("p99_9", "p99.9"),
    ("max", "max"),
];

/// Median latency percentiles of the `latency` case for one target.
fn latency_points(r: &Runs, target: &str) -> Vec<(i32, f64)> {
    PERCENTILES
        .iter()
        .enumerate()
        .filter_map(|(i, (key, _))| {
            let key = *key;
            let f = move |v: &Value| v["results"]["latency_ms"][key].as_f64();
            r.median("latency", target, &f).map(|m| (i as i32, m))
        })
        .collect()
}

/// A target's latency points and colour in the plot.
type Line = (&'static str, Vec<(i32, f64)>, RGBColor);

fn plot(path: &Path, r: &Runs) -> Result<bool> {
    let series: Vec<Line> = [
        (SHARED, GREEN),
        (PER_SESSION, RED),
        (EMBEDDED, MAGENTA),
        (DIRECT, BLUE),
    ]
    .into_iter()
    .map(|(t, c)| (t, latency_points(r, t), c))
    .filter(|(_, p, _)| !p.is_empty())
    .collect();
    if series.is_empty() {
        return Ok(false);
    }
    let rate = first(r, "latency")
        .and_then(|v| v["params"]["rate"].as_f64())
        .map(|x| format!("{x:.0} msg/s"))
        .unwrap_or_else(|| "fixed rate".into());
    let all: Vec<f64> = series
        .iter()
        .flat_map(|(_, p, _)| p.iter().map(|p| p.1))
        .collect();
    // Start the log axis at a power of ten: plotters labels from there.
    let min = all.iter().copied().fold(f64::INFINITY, f64::min).max(0.001);
    let lo = 10f64.powf((min / 1.2).log10().floor()) * 0.999;
    let hi = all.iter().copied().fold(0.0, f64::max).max(lo * 10.0) * 1.5;
    let err = |e: &dyn std::fmt::Display| anyhow!("drawing {}: {e}", path.display());

    let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("End-to-end latency at {rate} (median of rounds)"),
            ("sans-serif", 20),
        )
        .margin(20)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(
            (0..PERCENTILES.len() as i32 - 1).into_segmented(),
            (lo..hi).log_scale(),
        )
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (ms, log scale)")
        .x_label_formatter(&|x| {
            let i = match x {
                SegmentValue::Exact(i) | SegmentValue::CenterOf(i) => *i,
                SegmentValue::Last => return String::new(),
            };
            PERCENTILES
                .get(i as usize)
                .map(|p| p.1.to_owned())
                .unwrap_or_default()
        })
        .y_labels(20)
        .y_label_formatter(&|y| {
            if *y >= 10.0 {
                format!("{y:.0}")
            } else if *y >= 1.0 {
                format!("{y:.1}")
            } else {
                format!("{y:.2}")
            }
        })
        .draw()
        .map_err(|e| err(&e))?;
    for (target, points, color) in &series {
        let color = *color;
        let name = if *target == DIRECT {
            "direct (Web-STOMP)"
        } else {
            target
        };
        let pts: Vec<(SegmentValue<i32>, f64)> = points
            .iter()
            .map(|(i, y)| (SegmentValue::CenterOf(*i), *y))
            .collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(pts.into_iter().map(|p| Circle::new(p, 4, color.filled())))
            .map_err(|e| err(&e))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(true)
}

pub fn run(a: &ReportArgs) -> Result<()> {
    let runs = Runs::load(&a.runs)?;
    if runs.files == 0 {
        return Err(anyhow!("no tagged run files in {}", a.runs.display()));
    }
    for p in [&a.svg, &a.markdown] {
        if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
    }
    let svg = plot(&a.svg, &runs)?;
    let md = markdown(a, &runs, svg)?;
    std::fs::write(&a.markdown, md).with_context(|| format!("writing {}", a.markdown.display()))?;
    eprintln!(
        "stomp-load report: wrote {}{}",
        a.markdown.display(),
        if svg {
            format!(" and {}", a.svg.display())
        } else {
            " (no latency runs: no plot)".into()
        }
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_dates_quotes() {
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(utc(0), "1970-01-01 00:00 UTC");
        assert_eq!(utc(1_709_210_096), "2024-02-29 12:34 UTC");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("--url=ws://x:1/ws"), "--url=ws://x:1/ws");
        assert_eq!(fmt(Some(12345.6)), "12346");
        assert_eq!(fmt(None), "—");
        assert_eq!(ratio(Some(1.0), Some(2.0)), "0.50");
    }
}
