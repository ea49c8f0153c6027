//! Idle density: open N sessions with heart-beats, hold them, count how many
//! stay up, and measure the resident memory per session and the CPU used
//! while idle of the processes given with `--measure-pid`.

use crate::client;
use crate::common::{self, positive, secs, tick_opt, Common, Ctx, Outcome};
use crate::procstat::{round3, Monitor, Reading};
use crate::progress;
use anyhow::{bail, Result};
use relay_core::{Command, Item};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::time::Instant;

/// `stomp-load idle`. Heart-beat defaults to 10000,10000.
#[derive(Debug, Clone, clap::Args)]
pub struct IdleArgs {
    #[command(flatten)]
    pub common: Common,
    /// Sessions to open.
    #[arg(short = 'n', long, default_value_t = 100)]
    pub sessions: usize,
    /// Handshakes in flight at once.
    #[arg(short = 'c', long, default_value_t = 50)]
    pub concurrency: usize,
    /// Seconds to hold the sessions open once all are up.
    #[arg(
        long,
        visible_alias = "duration",
        default_value_t = 30.0,
        value_name = "SECS"
    )]
    pub hold: f64,
    /// Seconds to wait after the last session opened before the
    /// "after_open" sample (lets allocations settle).
    #[arg(long, default_value_t = 2.0, value_name = "SECS")]
    pub settle: f64,
    /// A session counts as down when the server sent nothing for this many
    /// negotiated server heart-beat periods.
    #[arg(long, default_value_t = 3.0)]
    pub missed_heartbeats: f64,
    /// Each session also holds one subscription (ack:auto) to this
    /// destination; `{i}` is replaced by the session number. Measures idle
    /// *subscribed* sessions (on the shared path or the embedded broker,
    /// many sessions on one topic cost the broker nothing more).
    #[arg(long, value_name = "DESTINATION")]
    pub subscribe: Option<String>,
}

#[derive(Debug, Default)]
struct Counters {
    up: AtomicUsize,
    failed: AtomicUsize,
    dropped: AtomicUsize,
    hb_sent: AtomicU64,
    hb_received: AtomicU64,
}

impl IdleArgs {
    pub async fn run(&self, ctx: &Arc<Ctx>) -> Result<Outcome> {
        if self.sessions == 0 || self.concurrency == 0 {
            bail!("--sessions and --concurrency must be at least 1");
        }
        positive("--hold", self.hold)?;
        positive("--missed-heartbeats", self.missed_heartbeats)?;
        if self.settle < 0.0 {
            bail!("--settle must not be negative");
        }
        ctx.check_fd_budget(self.sessions);
        let n = self.sessions;
        let mut monitor = Monitor::new(&ctx.watched);
        monitor.sample("before");

        let c = Arc::new(Counters::default());
        let phase = Arc::new(std::sync::Mutex::new("opening"));
        let prog = {
            let (c, phase) = (c.clone(), phase.clone());
            progress::spawn("idle", ctx.progress, move || {
                format!(
                    "{}: up {}/{n}, failed {}, dropped {}, heart-beats sent {} received {}",
                    phase.lock().map(|p| *p).unwrap_or("?"),
                    c.up.load(Relaxed),
                    c.failed.load(Relaxed),
                    c.dropped.load(Relaxed),
                    c.hb_sent.load(Relaxed),
                    c.hb_received.load(Relaxed)
                )
            })
        };

        let sem = Arc::new(Semaphore::new(self.concurrency));
        let (stop_tx, stop_rx) = watch::channel(false);
        let (opened_tx, mut opened_rx) = mpsc::unbounded_channel::<bool>();
        let missed = self.missed_heartbeats;
        let start = Instant::now();
        let mut tasks = Vec::with_capacity(n);
        for i in 0..n {
            let (ctx, sem, opened_tx, mut stop) =
                (ctx.clone(), sem.clone(), opened_tx.clone(), stop_rx.clone());
            let c = c.clone();
            let subscribe = self.subscribe.clone();
            tasks.push(tokio::spawn(async move {
                let permit = sem.acquire().await;
                let session = client::connect(&ctx.opts, ctx.sources.pick(i)).await;
                drop(permit);
                let mut session = match session {
                    Ok(s) => s,
                    Err(e) => {
                        c.failed.fetch_add(1, Relaxed);
                        ctx.error(format!("session {i}: {e:#}"));
                        let _ = opened_tx.send(false);
                        return false;
                    }
                };
                if let Some(dest) = &subscribe {
                    let dest = dest.replace("{i}", &i.to_string());
                    if let Err(e) = subscribe_one(&mut session, &dest).await {
                        c.failed.fetch_add(1, Relaxed);
                        ctx.error(format!("session {i}: SUBSCRIBE {dest}: {e:#}"));
                        let _ = opened_tx.send(false);
                        return false;
                    }
                }
                ctx.note_session(&session.info);
                c.up.fetch_add(1, Relaxed);
                let _ = opened_tx.send(true);
                drop(opened_tx);
                let mut hb = common::heartbeat_interval(session.info.send_every);
                let limit = session.info.expect_every.map(|d| d.mul_f64(missed));
                let mut watchdog = common::heartbeat_interval(session.info.expect_every);
                let mut last_rx = Instant::now();
                let mut alive = true;
                loop {
                    tokio::select! {
                        biased;
                        _ = common::stopped(&mut stop) => break,
                        _ = tick_opt(&mut hb) => {
                            if let Err(e) = session.writer.heartbeat().await {
                                ctx.error(format!("session {i}: heart-beat: {e:#}"));
                                alive = false;
                                break;
                            }
                            c.hb_sent.fetch_add(1, Relaxed);
                        }
                        _ = tick_opt(&mut watchdog) => {
                            if let Some(l) = limit {
                                if last_rx.elapsed() > l {
                                    ctx.error(format!("session {i}: no heart-beat from the server for {:.1} s", l.as_secs_f64()));
                                    alive = false;
                                    break;
                                }
                            }
                        }
                        item = session.reader.next() => {
                            last_rx = Instant::now();
                            match item {
                                Ok(Some(Item::Heartbeat)) => {
                                    c.hb_received.fetch_add(1, Relaxed);
                                }
                                Ok(Some(Item::Frame(f))) if f.command == Command::Error => {
                                    ctx.error(format!("session {i}: ERROR frame: {}", client::describe_error(&f)));
                                    alive = false;
                                    break;
                                }
                                Ok(Some(_)) => {}
                                Ok(None) => {
                                    ctx.error(format!("session {i}: closed by the server"));
                                    alive = false;
                                    break;
                                }
                                Err(e) => {
                                    ctx.error(format!("session {i}: {e:#}"));
                                    alive = false;
                                    break;
                                }
                            }
                        }
                    }
                }
                if !alive {
                    c.up.fetch_sub(1, Relaxed);
                    c.dropped.fetch_add(1, Relaxed);
                    return false;
                }
                client::disconnect(&mut session, Duration::from_secs(5)).await.is_clean()
            }));
        }
        drop(opened_tx);
        let mut opened = 0usize;
        while let Some(ok) = opened_rx.recv().await {
            if ok {
                opened += 1;
            }
        }
        let open_s = secs(start.elapsed());
        if let Ok(mut p) = phase.lock() {
            *p = "settling";
        }
        tokio::time::sleep(Duration::from_secs_f64(self.settle)).await;
        let up_after_open = c.up.load(Relaxed);
        monitor.sample("after_open");
        if let Ok(mut p) = phase.lock() {
            *p = "holding";
        }
        tokio::time::sleep(Duration::from_secs_f64(self.hold)).await;
        let up_at_end = c.up.load(Relaxed);
        monitor.sample("end_of_hold");
        if let Ok(mut p) = phase.lock() {
            *p = "closing";
        }
        let close_start = Instant::now();
        let _ = stop_tx.send(true);
        let mut clean = 0usize;
        for t in tasks {
            if t.await? {
                clean += 1;
            }
        }
        let close_s = secs(close_start.elapsed());
        monitor.sample("after_close");
        drop(prog);

        let hold = self.hold;
        let processes = monitor.to_json(|at: &dyn Fn(&str) -> Option<(f64, Reading)>| {
            let (Some((_, before)), Some((t1, open)), Some((t2, end))) =
                (at("before"), at("after_open"), at("end_of_hold"))
            else {
                return Value::Null;
            };
            let delta = open.rss_kib as i64 - before.rss_kib as i64;
            let cpu_hold = (end.cpu_s - open.cpu_s).max(0.0);
            json!({
                "rss_kib_before": before.rss_kib,
                "rss_kib_after_open": open.rss_kib,
                "rss_kib_end_of_hold": end.rss_kib,
                "rss_delta_kib": delta,
                "rss_kib_per_session": (up_after_open > 0).then(|| round3(delta as f64 / up_after_open as f64)),
                "cpu_s_open": round3((open.cpu_s - before.cpu_s).max(0.0)),
                "cpu_s_hold": round3(cpu_hold),
                "cpu_pct_hold": round3(cpu_hold * 100.0 / (t2 - t1).max(1e-9)),
                "hold_s": hold,
            })
        });
        let mut failures = Vec::new();
        if up_at_end < n {
            failures.push(format!(
                "only {up_at_end} of {n} sessions up at the end of the hold"
            ));
        }
        let params = json!({
            "sessions": n,
            "concurrency": self.concurrency,
            "hold_s": self.hold,
            "settle_s": self.settle,
            "missed_heartbeats": self.missed_heartbeats,
            "subscribe": self.subscribe,
            "connection": ctx.connection_json(),
        });
        let results = json!({
            "session": ctx.session_json(),
            "connected": opened,
            "failed": n - opened,
            "open_s": open_s,
            "up_after_open": up_after_open,
            "up_at_end": up_at_end,
            "dropped": c.dropped.load(Relaxed),
            "heartbeats_sent": c.hb_sent.load(Relaxed),
            "heartbeats_received": c.hb_received.load(Relaxed),
            "closed_cleanly": clean,
            "close_s": close_s,
            "rss_per_session_basis": "(rss after_open - rss before) / up_after_open",
            "errors": ctx.errors_json(),
            "processes": processes,
        });
        Ok(Outcome {
            params,
            results,
            failures,
        })
    }
}

/// SUBSCRIBE (ack:auto) with a receipt, and wait for it.
async fn subscribe_one(session: &mut client::Session, destination: &str) -> Result<()> {
    let f = relay_core::Frame::new(Command::Subscribe)
        .with_header("id", "idle-0")
        .with_header("destination", destination)
        .with_header("ack", "auto")
        .with_header("receipt", "idle-sub");
    session.writer.send(&f).await?;
    tokio::time::timeout(
        Duration::from_secs(30),
        session.reader.wait_receipt("idle-sub", |_| {}),
    )
    .await
    .map_err(|_| anyhow::anyhow!("no RECEIPT within 30 s"))?
}
