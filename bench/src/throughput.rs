//! Throughput and fan-out: P publishers, S subscribers over D topic
//! destinations, fixed rate or open loop; delivered msg/s, loss and
//! end-to-end latency from a send timestamp carried in the body.
//!
//! Body layout (ASCII, so it travels in text WebSocket messages):
//! `TTTTTTTTTTTTTTTTTTTT PPPPPP SSSSSSSSSSSS` without the spaces: the send
//! time in nanoseconds since the process-wide base (20 digits), the
//! publisher index (6 digits), the publisher's sequence number (12 digits),
//! then `.` padding up to `--size`.

use crate::client::{self, Session};
use crate::common::{self, now_ns, ns_of, positive, secs, tick_opt, Common, Ctx, Outcome};
use crate::procstat::{round3, Monitor, Reading};
use crate::progress;
use crate::stats;
use anyhow::{bail, Result};
use bytes::{BufMut, BytesMut};
use hdrhistogram::Histogram;
use relay_core::{Command, Frame, Item};
use serde_json::{json, Value};
use std::io::Write as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::time::{Instant, MissedTickBehavior};

/// Bytes of the timestamp / publisher / sequence prefix of every body.
pub const BODY_HEADER: usize = 20 + 6 + 12;

/// Where latency is measured from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LatencyFrom {
    /// The time the publisher handed the frame to the socket.
    Actual,
    /// The tick the fixed-rate pacer scheduled the message for (includes
    /// the publisher's own lag; open loop falls back to actual).
    Scheduled,
}

/// Flags shared by `throughput` and `fanout`.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Message body size in bytes (at least 38: timestamp, publisher, sequence).
    #[arg(long, default_value_t = 100)]
    pub size: usize,
    /// Seconds of traffic before the measurement window.
    #[arg(long, default_value_t = 1.0, value_name = "SECS")]
    pub warmup: f64,
    /// Seconds in the measurement window.
    #[arg(long, default_value_t = 10.0, value_name = "SECS")]
    pub duration: f64,
    /// Destination prefix: destinations are /topic/PREFIX.N [default: unique per run].
    #[arg(long)]
    pub prefix: Option<String>,
    /// After publishers stop, wait until this many seconds pass without a message...
    #[arg(long, default_value_t = 2.0, value_name = "SECS")]
    pub drain_idle: f64,
    /// ...or at most this many seconds.
    #[arg(long, default_value_t = 10.0, value_name = "SECS")]
    pub drain_max: f64,
    /// Measure latency from the actual or the scheduled send time.
    #[arg(long, value_enum, default_value = "actual")]
    pub latency_from: LatencyFrom,
    /// Sessions opened at once while setting up.
    #[arg(long, default_value_t = 50)]
    pub concurrency: usize,
}

/// `stomp-load throughput`.
#[derive(Debug, Clone, clap::Args)]
pub struct ThroughputArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub run: RunArgs,
    /// Publisher sessions.
    #[arg(short = 'P', long, default_value_t = 1)]
    pub publishers: usize,
    /// Subscriber sessions; subscriber j subscribes to destination j mod D.
    #[arg(short = 'S', long, default_value_t = 1)]
    pub subscribers: usize,
    /// Destinations; publishers send round-robin over all of them.
    #[arg(short = 'D', long, default_value_t = 1)]
    pub destinations: usize,
    /// Total publish rate in msg/s over all publishers; 0 = open loop (as
    /// fast as the socket takes).
    #[arg(long, default_value_t = 0.0, value_name = "MSG_PER_S")]
    pub rate: f64,
    /// Open loop only: flush the socket every N messages (1 = every message).
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
}

/// `stomp-load fanout`: one room, many subscribers, one publisher.
#[derive(Debug, Clone, clap::Args)]
pub struct FanoutArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub run: RunArgs,
    /// Subscriber sessions, all on the one destination.
    #[arg(short = 'S', long, default_value_t = 100)]
    pub subscribers: usize,
    /// Publish rate in msg/s (each message is delivered to every subscriber).
    #[arg(long, default_value_t = 100.0, value_name = "MSG_PER_S")]
    pub rate: f64,
}

#[derive(Debug, Clone)]
pub(crate) struct Params {
    pub publishers: usize,
    pub subscribers: usize,
    pub destinations: usize,
    pub rate: Option<f64>,
    pub batch: usize,
    pub run: RunArgs,
    pub prefix: String,
    /// Publisher i sends only to destination i mod D (1:1 pairs) instead of
    /// round-robin over all destinations.
    pub pinned: bool,
    /// Sample sent / delivered / latency through the measurement window
    /// (results.trace), for the paced search's backlog test.
    pub trace: bool,
}

impl ThroughputArgs {
    pub async fn run(&self, ctx: &Arc<Ctx>) -> Result<Outcome> {
        let rate = (self.rate > 0.0).then_some(self.rate);
        if self.rate < 0.0 {
            bail!("--rate must not be negative");
        }
        let params = Params {
            publishers: self.publishers,
            subscribers: self.subscribers,
            destinations: self.destinations,
            rate,
            batch: self.batch,
            prefix: prefix(&self.run),
            run: self.run.clone(),
            pinned: false,
            trace: false,
        };
        run(ctx, params, |n| format!("{n}")).await
    }
}

impl FanoutArgs {
    pub async fn run(&self, ctx: &Arc<Ctx>) -> Result<Outcome> {
        positive("--rate", self.rate)?;
        let params = Params {
            publishers: 1,
            subscribers: self.subscribers,
            destinations: 1,
            rate: Some(self.rate),
            batch: 1,
            prefix: prefix(&self.run),
            run: self.run.clone(),
            pinned: false,
            trace: false,
        };
        run(ctx, params, |_| "room".to_owned()).await
    }
}

pub(crate) fn prefix(run: &RunArgs) -> String {
    match &run.prefix {
        Some(p) => p.clone(),
        None => {
            let ms = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or(0);
            format!("stomp-load-{ms}-{}", std::process::id())
        }
    }
}

/// State shared by every session of the run.
#[derive(Debug)]
struct Shared {
    ctx: Arc<Ctx>,
    dests: Vec<String>,
    sent_per_dest: Vec<AtomicU64>,
    sent: AtomicU64,
    received: AtomicU64,
    /// Measurement window, nanoseconds since the base (u64::MAX = unset).
    window_start: AtomicU64,
    window_end: AtomicU64,
    subscribed: AtomicUsize,
    publishers_up: AtomicUsize,
    /// One publisher (fan-out): per sequence number, the latest delivery
    /// latency over all subscribers (ns) of messages sent in the window, so
    /// the report has publish-to-last-subscriber latency. Empty otherwise.
    last_latency: Vec<AtomicU64>,
    /// Sum (ns) and count of the latencies of every delivery so far, for
    /// the window trace's mean latency per interval.
    latency_sum_ns: AtomicU64,
    latency_n: AtomicU64,
}

impl Shared {
    fn window(&self) -> (u64, u64) {
        (
            self.window_start.load(Relaxed),
            self.window_end.load(Relaxed),
        )
    }
}

#[derive(Debug)]
struct SubResult {
    dest: usize,
    subscribed: bool,
    received: u64,
    in_window: u64,
    reordered: u64,
    malformed: u64,
    hist: Histogram<u64>,
}

#[derive(Debug, Default)]
struct PubResult {
    connected: bool,
    sent: u64,
    sent_in_window: u64,
    in_doubt: u64,
    closed_cleanly: bool,
}

fn parse_body(body: &[u8]) -> Option<(u64, usize, u64)> {
    if body.len() < BODY_HEADER {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<u64> {
        std::str::from_utf8(&body[r]).ok()?.parse().ok()
    };
    Some((num(0..20)?, num(20..26)? as usize, num(26..38)?))
}

fn body(size: usize, ts: u64, publisher: usize, seq: u64) -> BytesMut {
    let mut b = BytesMut::with_capacity(size);
    let mut w = (&mut b).writer();
    // Writing to a BytesMut cannot fail.
    let _ = write!(w, "{ts:020}{publisher:06}{seq:012}");
    let pad = size.saturating_sub(b.len());
    b.put_bytes(b'.', pad);
    b
}

pub(crate) async fn run(
    ctx: &Arc<Ctx>,
    p: Params,
    dest_name: impl Fn(usize) -> String,
) -> Result<Outcome> {
    let r = &p.run;
    if p.publishers == 0 || p.subscribers == 0 || p.destinations == 0 {
        bail!("publishers, subscribers and destinations must be at least 1");
    }
    if r.size < BODY_HEADER {
        bail!("--size must be at least {BODY_HEADER} bytes");
    }
    if r.concurrency == 0 || p.batch == 0 {
        bail!("--concurrency and --batch must be at least 1");
    }
    positive("--duration", r.duration)?;
    if r.warmup < 0.0 || r.drain_idle < 0.0 || r.drain_max < 0.0 {
        bail!("--warmup and --drain-* must not be negative");
    }
    if p.publishers > 999_999 {
        bail!("at most 999999 publishers");
    }
    ctx.check_fd_budget(p.publishers + p.subscribers);
    let dests: Vec<String> = (0..p.destinations)
        .map(|n| format!("/topic/{}.{}", p.prefix, dest_name(n)))
        .collect();
    let shared = Arc::new(Shared {
        ctx: ctx.clone(),
        sent_per_dest: dests.iter().map(|_| AtomicU64::new(0)).collect(),
        dests,
        sent: AtomicU64::new(0),
        received: AtomicU64::new(0),
        window_start: AtomicU64::new(u64::MAX),
        window_end: AtomicU64::new(u64::MAX),
        subscribed: AtomicUsize::new(0),
        publishers_up: AtomicUsize::new(0),
        last_latency: match (p.publishers, p.rate) {
            (1, Some(rate)) => {
                // Every sequence number the publisher can reach, with room.
                let n = (rate * (r.warmup + r.duration + 1.0) * 1.5) as usize + 1_000;
                (0..n).map(|_| AtomicU64::new(0)).collect()
            }
            _ => Vec::new(),
        },
        latency_sum_ns: AtomicU64::new(0),
        latency_n: AtomicU64::new(0),
    });
    let mut monitor = Monitor::new(&ctx.watched);
    monitor.sample("before");

    let prog = {
        let s = shared.clone();
        let (np, ns) = (p.publishers, p.subscribers);
        let last = std::sync::Mutex::new((std::time::Instant::now(), 0u64, 0u64));
        progress::spawn("throughput", ctx.progress, move || {
            let (sent, recv) = (s.sent.load(Relaxed), s.received.load(Relaxed));
            let mut rate = String::new();
            if let Ok(mut l) = last.lock() {
                let dt = l.0.elapsed().as_secs_f64().max(1e-3);
                rate = format!(
                    " ({:.0} msg/s sent, {:.0} msg/s delivered)",
                    (sent - l.1) as f64 / dt,
                    (recv - l.2) as f64 / dt
                );
                *l = (std::time::Instant::now(), sent, recv);
            }
            format!(
                "subscribed {}/{ns}, publishers {}/{np}, sent {sent}, delivered {recv}{rate}, errors {}",
                s.subscribed.load(Relaxed),
                s.publishers_up.load(Relaxed),
                s.ctx.error_count()
            )
        })
    };

    // Subscribers first; each waits for the RECEIPT of its SUBSCRIBE.
    let sem = Arc::new(Semaphore::new(r.concurrency));
    let (stop_subs, stop_subs_rx) = watch::channel(false);
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel::<bool>();
    let mut subs = Vec::with_capacity(p.subscribers);
    for j in 0..p.subscribers {
        subs.push(tokio::spawn(subscriber(
            j,
            j % p.destinations,
            p.publishers,
            shared.clone(),
            sem.clone(),
            ready_tx.clone(),
            stop_subs_rx.clone(),
        )));
    }
    let setup_start = Instant::now();
    let mut subs_ok = 0;
    for _ in 0..p.subscribers {
        if ready_rx.recv().await == Some(true) {
            subs_ok += 1;
        }
    }
    let subscribe_s = secs(setup_start.elapsed());
    if subs_ok == 0 {
        let _ = stop_subs.send(true);
        bail!(
            "no subscriber could subscribe; first errors: {}",
            ctx.errors_json()["samples"]
        );
    }

    // Then publishers; they start together on the start signal.
    let (start_tx, start_rx) = watch::channel(None::<Instant>);
    let (stop_pubs, stop_pubs_rx) = watch::channel(false);
    let mut pubs = Vec::with_capacity(p.publishers);
    for i in 0..p.publishers {
        pubs.push(tokio::spawn(publisher(
            i,
            p.clone(),
            shared.clone(),
            sem.clone(),
            ready_tx.clone(),
            start_rx.clone(),
            stop_pubs_rx.clone(),
        )));
    }
    let mut pubs_ok = 0;
    for _ in 0..p.publishers {
        if ready_rx.recv().await == Some(true) {
            pubs_ok += 1;
        }
    }
    if pubs_ok == 0 {
        let _ = stop_subs.send(true);
        bail!(
            "no publisher could connect; first errors: {}",
            ctx.errors_json()["samples"]
        );
    }

    let t0 = Instant::now() + Duration::from_millis(20);
    let ws = t0 + Duration::from_secs_f64(r.warmup);
    let we = ws + Duration::from_secs_f64(r.duration);
    shared.window_start.store(ns_of(ws.into_std()), Relaxed);
    shared.window_end.store(ns_of(we.into_std()), Relaxed);
    let _ = start_tx.send(Some(t0));
    tokio::time::sleep_until(ws).await;
    monitor.sample("window_start");
    let trace = if p.trace {
        Some(tokio::spawn(trace_window(shared.clone(), we)))
    } else {
        None
    };
    tokio::time::sleep_until(we).await;
    monitor.sample("window_end");
    let trace = match trace {
        Some(h) => Some(h.await?),
        None => None,
    };
    let _ = stop_pubs.send(true);
    let mut pr = Vec::with_capacity(pubs.len());
    for h in pubs {
        pr.push(h.await?);
    }
    let publish_end = Instant::now();

    // Drain: until everything expected arrived, or no message for
    // drain_idle, or drain_max.
    // During the drain, expect every requested subscriber (subscriber j is
    // on destination j mod D); the final figures count only those that
    // did subscribe.
    let subscribers_of = {
        let mut v = vec![0u64; p.destinations];
        for j in 0..p.subscribers {
            v[j % p.destinations] += 1;
        }
        v
    };
    let expected_upper: u64 = shared
        .sent_per_dest
        .iter()
        .zip(&subscribers_of)
        .map(|(s, n)| s.load(Relaxed) * n)
        .sum();
    let idle = Duration::from_secs_f64(r.drain_idle);
    let max = Duration::from_secs_f64(r.drain_max);
    let mut last_seen = shared.received.load(Relaxed);
    let mut last_change = Instant::now();
    let drain_complete = loop {
        let now = shared.received.load(Relaxed);
        if now >= expected_upper {
            break true;
        }
        if now != last_seen {
            last_seen = now;
            last_change = Instant::now();
        }
        if last_change.elapsed() >= idle || publish_end.elapsed() >= max {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let drain_s = secs(publish_end.elapsed());
    monitor.sample("end");
    let _ = stop_subs.send(true);
    let mut sr = Vec::with_capacity(subs.len());
    for h in subs {
        sr.push(h.await?);
    }
    drop(prog);

    // Totals.
    let mut subs_on = vec![0u64; p.destinations];
    let mut hist = stats::new_histogram();
    let (mut delivered, mut in_window, mut reordered, mut malformed) = (0, 0, 0, 0);
    for s in &sr {
        if s.subscribed {
            subs_on[s.dest] += 1;
        }
        delivered += s.received;
        in_window += s.in_window;
        reordered += s.reordered;
        malformed += s.malformed;
        hist.add(&s.hist)?;
    }
    let expected: u64 = shared
        .sent_per_dest
        .iter()
        .zip(&subs_on)
        .map(|(s, n)| s.load(Relaxed) * n)
        .sum();
    let sent: u64 = pr.iter().map(|r| r.sent).sum();
    let sent_in_window: u64 = pr.iter().map(|r| r.sent_in_window).sum();
    let in_doubt: u64 = pr.iter().map(|r| r.in_doubt).sum();
    let closed_cleanly = pr.iter().filter(|r| r.closed_cleanly).count();
    let loss = expected.saturating_sub(delivered);
    let extra = delivered.saturating_sub(expected);
    let window = r.duration;
    let delivered_in_window = in_window;
    let processes = monitor.to_json(|at: &dyn Fn(&str) -> Option<(f64, Reading)>| {
        cpu_window(at, delivered_in_window, sent_in_window)
    });

    let mut failures = Vec::new();
    if delivered == 0 {
        failures.push("nothing was delivered".to_owned());
    }
    if loss > 0 {
        // A drain cut off by --drain-max leaves messages in transit (in
        // RabbitMQ's queue, on the wire): not delivered yet is not lost.
        if drain_complete {
            failures.push(format!("lost {loss} of {expected} messages"));
        } else {
            failures.push(format!(
                "{loss} of {expected} messages not delivered when the drain stopped after \
                 {drain_s:.1} s (--drain-max; still in transit, not counted as lost)"
            ));
        }
    }
    if subs_ok < p.subscribers || pubs_ok < p.publishers {
        failures.push(format!(
            "sessions failed: {} of {} subscribers, {} of {} publishers",
            p.subscribers - subs_ok,
            p.subscribers,
            p.publishers - pubs_ok,
            p.publishers
        ));
    }
    if ctx.error_count() > 0 {
        failures.push(format!("{} errors", ctx.error_count()));
    }

    let params = json!({
        "publishers": p.publishers,
        "subscribers": p.subscribers,
        "destinations": p.destinations,
        "destination_example": shared.dests.first(),
        "size": r.size,
        "mode": if p.rate.is_some() { "fixed_rate" } else { "open_loop" },
        "rate": p.rate,
        "batch": p.batch,
        "warmup_s": r.warmup,
        "duration_s": r.duration,
        "drain_idle_s": r.drain_idle,
        "drain_max_s": r.drain_max,
        "concurrency": r.concurrency,
        "ack": "auto",
        "connection": ctx.connection_json(),
    });
    let results = json!({
        "session": ctx.session_json(),
        "publishers": { "requested": p.publishers, "connected": pubs_ok, "closed_cleanly": closed_cleanly },
        "subscribers": { "requested": p.subscribers, "subscribed": subs_ok, "setup_s": subscribe_s },
        "window_s": window,
        "sent": sent,
        "sent_in_window": sent_in_window,
        "sent_per_s": round3(sent_in_window as f64 / window),
        "delivered": delivered,
        "delivered_in_window": delivered_in_window,
        "delivered_per_s": round3(delivered_in_window as f64 / window),
        "expected": expected,
        "loss": loss,
        "loss_ratio": if expected > 0 { loss as f64 / expected as f64 } else { 0.0 },
        "extra": extra,
        "in_doubt": in_doubt,
        "reordered": reordered,
        "malformed": malformed,
        "drain_s": drain_s,
        "drain_complete": drain_complete,
        "latency_from": match (p.run.latency_from, p.rate) {
            (LatencyFrom::Scheduled, Some(_)) => "scheduled_send_time",
            _ => "actual_send_time",
        },
        "latency_scope": "messages sent inside the measurement window, all subscribers",
        "latency_ms": stats::summary_ms(&hist),
        "last_subscriber_latency_scope": "one publisher: per message sent in the window, the latency of its last delivery",
        "last_subscriber_latency_ms": if shared.last_latency.is_empty() { Value::Null } else {
            let mut last = stats::new_histogram();
            for l in &shared.last_latency {
                let v = l.load(Relaxed);
                if v > 0 {
                    last.saturating_record(v);
                }
            }
            stats::summary_ms(&last)
        },
        "latency_distribution_ms": stats::distribution_ms(&hist),
        "errors": ctx.errors_json(),
        "processes": processes,
        "trace": trace.as_ref().map_or(Value::Null, Trace::to_json),
    });
    Ok(Outcome {
        params,
        results,
        failures,
    })
}

/// How often the window trace samples.
const TRACE_EVERY: Duration = Duration::from_millis(250);

/// One sample of the window trace.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct TracePoint {
    /// Seconds since the window started.
    pub t: f64,
    pub sent: u64,
    pub delivered: u64,
    /// Mean latency (ms) of the deliveries since the previous sample.
    pub latency_ms: Option<f64>,
}

/// Sent and delivered counts and latency through the measurement window.
#[derive(Debug, Clone, Default)]
pub(crate) struct Trace {
    pub points: Vec<TracePoint>,
}

impl Trace {
    /// Least-squares slope of the in-flight count (sent − delivered) over
    /// time, in messages per second: about 0 when the path keeps up, the
    /// rate at which the backlog grows when it does not.
    pub fn backlog_growth_per_s(&self) -> Option<f64> {
        let pts: Vec<(f64, f64)> = self
            .points
            .iter()
            .map(|p| (p.t, p.sent as f64 - p.delivered as f64))
            .collect();
        slope(&pts)
    }

    /// Mean latency (ms) over the first and the last quarter of the window.
    pub fn latency_quarters_ms(&self) -> (Option<f64>, Option<f64>) {
        let n = self.points.len();
        let q = (n / 4).max(1);
        let mean = |ps: &[TracePoint]| {
            let v: Vec<f64> = ps.iter().filter_map(|p| p.latency_ms).collect();
            (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
        };
        if n == 0 {
            return (None, None);
        }
        (
            mean(&self.points[..q.min(n)]),
            mean(&self.points[n - q.min(n)..]),
        )
    }

    fn to_json(&self) -> Value {
        let (first, last) = self.latency_quarters_ms();
        json!({
            "every_s": TRACE_EVERY.as_secs_f64(),
            "backlog_growth_per_s": self.backlog_growth_per_s().map(round3),
            "latency_first_quarter_ms": first.map(round3),
            "latency_last_quarter_ms": last.map(round3),
            "points": self.points.iter().map(|p| json!([
                round3(p.t), p.sent, p.delivered, p.latency_ms.map(round3)
            ])).collect::<Vec<_>>(),
            "points_fields": ["t_s", "sent", "delivered", "mean_latency_ms"],
        })
    }
}

/// Least-squares slope of y over x; None with fewer than 3 points.
pub(crate) fn slope(pts: &[(f64, f64)]) -> Option<f64> {
    if pts.len() < 3 {
        return None;
    }
    let n = pts.len() as f64;
    let mx = pts.iter().map(|p| p.0).sum::<f64>() / n;
    let my = pts.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = pts.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = pts.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    (sxx > 0.0).then(|| sxy / sxx)
}

/// Samples the run's counters every [`TRACE_EVERY`] until `end`.
async fn trace_window(shared: Arc<Shared>, end: Instant) -> Trace {
    let start = Instant::now();
    let mut tick = tokio::time::interval(TRACE_EVERY);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut trace = Trace::default();
    let (mut sum0, mut n0) = (
        shared.latency_sum_ns.load(Relaxed),
        shared.latency_n.load(Relaxed),
    );
    loop {
        tick.tick().await;
        let now = Instant::now();
        if now > end {
            break;
        }
        let (sum, n) = (
            shared.latency_sum_ns.load(Relaxed),
            shared.latency_n.load(Relaxed),
        );
        trace.points.push(TracePoint {
            t: (now - start).as_secs_f64(),
            sent: shared.sent.load(Relaxed),
            delivered: shared.received.load(Relaxed),
            latency_ms: (n > n0).then(|| (sum - sum0) as f64 / (n - n0) as f64 / 1e6),
        });
        (sum0, n0) = (sum, n);
    }
    trace
}

/// CPU used by a process in the measurement window, per message.
fn cpu_window(at: &dyn Fn(&str) -> Option<(f64, Reading)>, delivered: u64, sent: u64) -> Value {
    let (Some((t0, a)), Some((t1, b))) = (at("window_start"), at("window_end")) else {
        return Value::Null;
    };
    let cpu = (b.cpu_s - a.cpu_s).max(0.0);
    let dt = (t1 - t0).max(1e-9);
    let per = |n: u64| (n > 0).then(|| round3(cpu * 1e6 / n as f64));
    json!({
        "cpu_s_window": round3(cpu),
        "cpu_pct_window": round3(cpu * 100.0 / dt),
        "cpu_us_per_msg_delivered": per(delivered),
        "cpu_us_per_msg_sent": per(sent),
        "rss_kib_window_end": b.rss_kib,
    })
}

async fn subscriber(
    j: usize,
    dest: usize,
    publishers: usize,
    shared: Arc<Shared>,
    sem: Arc<Semaphore>,
    ready: mpsc::UnboundedSender<bool>,
    mut stop: watch::Receiver<bool>,
) -> SubResult {
    let mut res = SubResult {
        dest,
        subscribed: false,
        received: 0,
        in_window: 0,
        reordered: 0,
        malformed: 0,
        hist: stats::new_histogram(),
    };
    let mut last_seq = vec![0u64; publishers];
    let ctx = &shared.ctx;
    let permit = sem.acquire().await;
    let setup = async {
        let mut s = client::connect(&ctx.opts, ctx.sources.pick(j)).await?;
        ctx.note_session(&s.info);
        let sub = Frame::new(Command::Subscribe)
            .with_header("id", "0")
            .with_header("destination", shared.dests[dest].clone())
            .with_header("ack", "auto")
            .with_header("receipt", "sub");
        s.writer.send(&sub).await?;
        common::within(
            ctx.opts.connect_timeout,
            "SUBSCRIBE receipt",
            s.reader.wait_receipt("sub", |_| {}),
        )
        .await?;
        Ok::<Session, anyhow::Error>(s)
    };
    let mut session = match setup.await {
        Ok(s) => s,
        Err(e) => {
            ctx.error(format!("subscriber {j}: {e:#}"));
            let _ = ready.send(false);
            return res;
        }
    };
    drop(permit);
    res.subscribed = true;
    shared.subscribed.fetch_add(1, Relaxed);
    let _ = ready.send(true);

    let mut hb = common::heartbeat_interval(session.info.send_every);
    let mut clean = false;
    loop {
        tokio::select! {
            biased;
            _ = common::stopped(&mut stop) => {
                clean = true;
                break;
            }
            _ = tick_opt(&mut hb) => {
                if let Err(e) = session.writer.heartbeat().await {
                    ctx.error(format!("subscriber {j}: heart-beat: {e:#}"));
                    break;
                }
            }
            item = session.reader.next() => match item {
                Ok(Some(Item::Frame(f))) if f.command == Command::Message => {
                    let now = now_ns();
                    res.received += 1;
                    shared.received.fetch_add(1, Relaxed);
                    let (ws, we) = shared.window();
                    if now >= ws && now < we {
                        res.in_window += 1;
                    }
                    match parse_body(&f.body) {
                        Some((ts, publisher, seq)) => {
                            let latency = now.saturating_sub(ts).max(1);
                            shared.latency_sum_ns.fetch_add(latency, Relaxed);
                            shared.latency_n.fetch_add(1, Relaxed);
                            if ts >= ws && ts < we {
                                res.hist.saturating_record(latency);
                                if let Some(last) = usize::try_from(seq).ok().and_then(|s| shared.last_latency.get(s)) {
                                    last.fetch_max(latency, Relaxed);
                                }
                            }
                            match last_seq.get_mut(publisher) {
                                Some(last) if seq > *last => *last = seq,
                                Some(_) => res.reordered += 1,
                                None => res.malformed += 1,
                            }
                        }
                        None => res.malformed += 1,
                    }
                }
                Ok(Some(Item::Frame(f))) if f.command == Command::Error => {
                    ctx.error(format!("subscriber {j}: ERROR frame: {}", client::describe_error(&f)));
                    break;
                }
                Ok(Some(_)) => {}
                Ok(None) => {
                    ctx.error(format!("subscriber {j}: connection closed by the server"));
                    break;
                }
                Err(e) => {
                    ctx.error(format!("subscriber {j}: {e:#}"));
                    break;
                }
            }
        }
    }
    if clean {
        client::disconnect(&mut session, Duration::from_secs(2)).await;
    }
    res
}

async fn publisher(
    i: usize,
    p: Params,
    shared: Arc<Shared>,
    sem: Arc<Semaphore>,
    ready: mpsc::UnboundedSender<bool>,
    mut start: watch::Receiver<Option<Instant>>,
    mut stop: watch::Receiver<bool>,
) -> PubResult {
    let mut res = PubResult::default();
    let ctx = &shared.ctx;
    let permit = sem.acquire().await;
    let session = match client::connect(&ctx.opts, ctx.sources.pick(p.subscribers + i)).await {
        Ok(s) => s,
        Err(e) => {
            ctx.error(format!("publisher {i}: {e:#}"));
            let _ = ready.send(false);
            return res;
        }
    };
    drop(permit);
    ctx.note_session(&session.info);
    res.connected = true;
    shared.publishers_up.fetch_add(1, Relaxed);
    let _ = ready.send(true);
    let Session {
        mut writer,
        mut reader,
        info,
    } = session;

    // Reader: receipts (Some(id)) and the close (None) to us, ERROR frames
    // to the error log.
    let (event_tx, mut events) = mpsc::channel::<Option<String>>(4);
    let rshared = shared.clone();
    let reader_task = tokio::spawn(async move {
        loop {
            match reader.next().await {
                Ok(Some(Item::Frame(f))) => match f.command {
                    Command::Receipt => {
                        let id = f.header("receipt-id").unwrap_or("").to_owned();
                        let _ = event_tx.send(Some(id)).await;
                    }
                    Command::Error => {
                        rshared.ctx.error(format!(
                            "publisher {i}: ERROR frame: {}",
                            client::describe_error(&f)
                        ));
                        break;
                    }
                    _ => {}
                },
                Ok(Some(Item::Heartbeat)) => {}
                Ok(None) => {
                    let _ = event_tx.send(None).await;
                    break;
                }
                Err(e) => {
                    rshared.ctx.error(format!("publisher {i}: {e:#}"));
                    break;
                }
            }
        }
    });

    let t0 = match start.wait_for(|s| s.is_some()).await.map(|v| *v) {
        Ok(v) => v.unwrap_or_else(Instant::now),
        Err(_) => return res,
    };
    tokio::time::sleep_until(t0).await;
    let mut pacer = p.rate.map(|rate| {
        let period = Duration::from_secs_f64(p.publishers as f64 / rate);
        let mut t = tokio::time::interval_at(t0, period);
        t.set_missed_tick_behavior(MissedTickBehavior::Burst);
        t
    });
    let mut hb = match pacer {
        Some(_) => common::heartbeat_interval(info.send_every),
        None => None,
    };
    let scheduled = p.run.latency_from == LatencyFrom::Scheduled;
    let ndest = shared.dests.len();
    let mut seq = 0u64;
    let mut unflushed = 0usize;
    let mut failed = false;
    loop {
        let sched = match pacer.as_mut() {
            Some(t) => {
                tokio::select! {
                    biased;
                    _ = common::stopped(&mut stop) => break,
                    _ = tick_opt(&mut hb) => {
                        if let Err(e) = writer.heartbeat().await {
                            ctx.error(format!("publisher {i}: heart-beat: {e:#}"));
                            failed = true;
                            break;
                        }
                        continue;
                    }
                    s = t.tick() => Some(s),
                }
            }
            None => {
                if *stop.borrow() {
                    break;
                }
                None
            }
        };
        seq += 1;
        let d = if p.pinned {
            i % ndest
        } else {
            (i + seq as usize) % ndest
        };
        let ts = match sched {
            Some(s) if scheduled => ns_of(s.into_std()),
            _ => now_ns(),
        };
        let frame = Frame::new(Command::Send)
            .with_header("destination", shared.dests[d].clone())
            .with_body(body(p.run.size, ts, i, seq).freeze());
        let msg = match writer.message(&frame) {
            Ok(m) => m,
            Err(e) => {
                ctx.error(format!("publisher {i}: {e:#}"));
                failed = true;
                break;
            }
        };
        let feed = p.rate.is_none() && p.batch > 1 && unflushed + 1 < p.batch;
        let sent = tokio::select! {
            biased;
            _ = common::stopped(&mut stop) => {
                res.in_doubt += 1 + unflushed as u64;
                failed = true;
                break;
            }
            r = async {
                if feed {
                    writer.feed_message(msg).await
                } else {
                    writer.send_message(msg).await
                }
            } => r,
        };
        if let Err(e) = sent {
            ctx.error(format!("publisher {i}: send: {e:#}"));
            res.in_doubt += 1 + unflushed as u64;
            failed = true;
            break;
        }
        unflushed = if feed { unflushed + 1 } else { 0 };
        res.sent += 1;
        shared.sent.fetch_add(1, Relaxed);
        shared.sent_per_dest[d].fetch_add(1, Relaxed);
        let now = now_ns();
        let (ws, we) = shared.window();
        if now >= ws && now < we {
            res.sent_in_window += 1;
        }
    }
    if !failed {
        // Flush, then DISCONNECT with a receipt: once the RECEIPT arrives
        // (or the server closes the connection, which is what RabbitMQ does
        // instead) the server has handled every SEND before it.
        let wait = Duration::from_secs_f64(p.run.drain_max + 5.0);
        if unflushed > 0 && common::within(wait, "flush", writer.flush()).await.is_err() {
            res.in_doubt += unflushed as u64;
        }
        let bye = Frame::new(Command::Disconnect).with_header("receipt", "bye");
        if writer.send(&bye).await.is_ok() {
            let got = tokio::time::timeout(wait, async {
                while let Some(ev) = events.recv().await {
                    match ev.as_deref() {
                        Some("bye") | None => return true,
                        Some(_) => {}
                    }
                }
                false
            })
            .await;
            res.closed_cleanly = matches!(got, Ok(true));
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), writer.close()).await;
    }
    reader_task.abort();
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_round_trip() {
        let b = body(100, 123_456_789, 7, 42);
        assert_eq!(b.len(), 100);
        assert_eq!(parse_body(&b), Some((123_456_789, 7, 42)));
        let b = body(BODY_HEADER, u64::MAX, 999_999, 999_999_999_999);
        assert_eq!(b.len(), BODY_HEADER);
        assert_eq!(parse_body(&b), Some((u64::MAX, 999_999, 999_999_999_999)));
        assert_eq!(parse_body(b"short"), None);
    }

    fn point(t: f64, sent: u64, delivered: u64, latency_ms: f64) -> TracePoint {
        TracePoint {
            t,
            sent,
            delivered,
            latency_ms: Some(latency_ms),
        }
    }

    #[test]
    fn trace_backlog_and_latency() {
        // Keeping up: in flight stays at 10 whatever the rate.
        let steady = Trace {
            points: (0..40)
                .map(|i| point(i as f64 * 0.25, 1000 * i + 10, 1000 * i, 1.0))
                .collect(),
        };
        let g = steady.backlog_growth_per_s().unwrap_or(f64::NAN);
        assert!(g.abs() < 1e-6, "{g}");
        assert_eq!(steady.latency_quarters_ms(), (Some(1.0), Some(1.0)));
        // Falling behind by 100 msg/s (25 per quarter second), latency growing.
        let behind = Trace {
            points: (0..40)
                .map(|i| point(i as f64 * 0.25, 1000 * i, 975 * i, 1.0 + i as f64))
                .collect(),
        };
        let g = behind.backlog_growth_per_s().unwrap_or(f64::NAN);
        assert!((g - 100.0).abs() < 1e-6, "{g}");
        let (first, last) = behind.latency_quarters_ms();
        assert!(first < last);
        assert_eq!(slope(&[(0.0, 1.0), (1.0, 2.0)]), None);
    }
}
