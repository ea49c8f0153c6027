//! Connect storm: open N sessions with at most C handshakes in flight,
//! measure sessions/s and time-to-CONNECTED, then close them all with
//! DISCONNECT (receipt) and a WebSocket close.

use crate::client;
use crate::common::{positive, secs, Common, Ctx, Outcome};
use crate::procstat::{round3, Monitor, Reading};
use crate::progress;
use crate::stats;
use anyhow::{bail, Result};
use relay_core::{Command, Item};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::time::Instant;

/// `stomp-load connect-storm`.
#[derive(Debug, Clone, clap::Args)]
pub struct StormArgs {
    #[command(flatten)]
    pub common: Common,
    /// Sessions to open.
    #[arg(short = 'n', long, default_value_t = 100)]
    pub sessions: usize,
    /// Handshakes in flight at once.
    #[arg(short = 'c', long, default_value_t = 10)]
    pub concurrency: usize,
    /// Seconds to hold all sessions open before closing them.
    #[arg(long, default_value_t = 0.0, value_name = "SECS")]
    pub hold: f64,
    /// Seconds to wait for each DISCONNECT receipt.
    #[arg(long, default_value_t = 5.0, value_name = "SECS")]
    pub disconnect_timeout: f64,
}

#[derive(Debug)]
struct Opened {
    ok: bool,
    ttc_ns: u64,
    done: Instant,
}

impl StormArgs {
    pub async fn run(&self, ctx: &Arc<Ctx>) -> Result<Outcome> {
        if self.sessions == 0 || self.concurrency == 0 {
            bail!("--sessions and --concurrency must be at least 1");
        }
        positive("--disconnect-timeout", self.disconnect_timeout)?;
        if self.hold < 0.0 {
            bail!("--hold must not be negative");
        }
        ctx.check_fd_budget(self.sessions);
        let n = self.sessions;
        let mut monitor = Monitor::new(&ctx.watched);
        monitor.sample("before");

        let up = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(AtomicUsize::new(0));
        let prog = {
            let (up, failed, closed) = (up.clone(), failed.clone(), closed.clone());
            progress::spawn("connect-storm", ctx.progress, move || {
                format!(
                    "connected {}/{n}, failed {}, closed {}",
                    up.load(Relaxed),
                    failed.load(Relaxed),
                    closed.load(Relaxed)
                )
            })
        };

        let sem = Arc::new(Semaphore::new(self.concurrency));
        let (close_tx, close_rx) = watch::channel(false);
        let (opened_tx, mut opened_rx) = mpsc::unbounded_channel::<Opened>();
        let disconnect_wait = Duration::from_secs_f64(self.disconnect_timeout);
        let start = Instant::now();
        let mut tasks = Vec::with_capacity(n);
        for i in 0..n {
            let (ctx, sem, opened_tx, mut close_rx) = (
                ctx.clone(),
                sem.clone(),
                opened_tx.clone(),
                close_rx.clone(),
            );
            let (up, failed, closed) = (up.clone(), failed.clone(), closed.clone());
            tasks.push(tokio::spawn(async move {
                let permit = sem.acquire().await;
                let t = Instant::now();
                let session = client::connect(&ctx.opts, ctx.sources.pick(i)).await;
                let done = Instant::now();
                drop(permit);
                let mut session = match session {
                    Ok(s) => s,
                    Err(e) => {
                        failed.fetch_add(1, Relaxed);
                        ctx.error(format!("session {i}: {e:#}"));
                        let _ = opened_tx.send(Opened {
                            ok: false,
                            ttc_ns: 0,
                            done,
                        });
                        return None;
                    }
                };
                ctx.note_session(&session.info);
                up.fetch_add(1, Relaxed);
                let _ = opened_tx.send(Opened {
                    ok: true,
                    ttc_ns: (done - t).as_nanos() as u64,
                    done,
                });
                drop(opened_tx);
                // Hold: notice an ERROR or close while waiting.
                let mut alive = true;
                loop {
                    tokio::select! {
                        biased;
                        _ = crate::common::stopped(&mut close_rx) => break,
                        item = session.reader.next() => match item {
                            Ok(Some(Item::Frame(f))) if f.command == Command::Error => {
                                ctx.error(format!("session {i}: ERROR frame: {}", client::describe_error(&f)));
                                alive = false;
                                break;
                            }
                            Ok(Some(_)) => {}
                            Ok(None) | Err(_) => {
                                ctx.error(format!("session {i}: closed by the server while open"));
                                alive = false;
                                break;
                            }
                        }
                    }
                }
                if !alive {
                    up.fetch_sub(1, Relaxed);
                    return Some(client::Closed::Failed);
                }
                let permit = sem.acquire().await;
                let how = client::disconnect(&mut session, disconnect_wait).await;
                drop(permit);
                closed.fetch_add(1, Relaxed);
                Some(how)
            }));
        }
        drop(opened_tx);
        let mut hist = stats::new_histogram();
        let (mut ok, mut last_done) = (0usize, start);
        for _ in 0..n {
            let Some(o) = opened_rx.recv().await else {
                break;
            };
            if o.ok {
                ok += 1;
                hist.saturating_record(o.ttc_ns.max(1));
            }
            last_done = last_done.max(o.done);
        }
        let open_s = (last_done - start).as_secs_f64();
        monitor.sample("after_open");
        if self.hold > 0.0 {
            tokio::time::sleep(Duration::from_secs_f64(self.hold)).await;
        }
        let still_up = up.load(Relaxed);
        monitor.sample("before_close");
        let close_start = Instant::now();
        let _ = close_tx.send(true);
        let (mut receipts, mut server_closes, mut clean) = (0usize, 0usize, 0usize);
        for t in tasks {
            match t.await? {
                Some(client::Closed::Receipt) => receipts += 1,
                Some(client::Closed::ServerClose) => server_closes += 1,
                _ => {}
            }
        }
        clean += receipts + server_closes;
        let close_s = close_start.elapsed();
        monitor.sample("end");
        drop(prog);

        let processes = monitor.to_json(|at: &dyn Fn(&str) -> Option<(f64, Reading)>| {
            let (Some((t0, a)), Some((t1, b))) = (at("before"), at("after_open")) else {
                return Value::Null;
            };
            let cpu = (b.cpu_s - a.cpu_s).max(0.0);
            json!({
                "cpu_s_open": round3(cpu),
                "cpu_pct_open": round3(cpu * 100.0 / (t1 - t0).max(1e-9)),
                "cpu_ms_per_session": (ok > 0).then(|| round3(cpu * 1e3 / ok as f64)),
                "rss_delta_kib_open": b.rss_kib as i64 - a.rss_kib as i64,
            })
        });
        let mut failures = Vec::new();
        if ok < n {
            failures.push(format!("{} of {n} sessions failed to connect", n - ok));
        }
        if clean < ok {
            failures.push(format!(
                "{} of {ok} sessions did not close cleanly",
                ok - clean
            ));
        }
        let params = json!({
            "sessions": n,
            "concurrency": self.concurrency,
            "hold_s": self.hold,
            "disconnect_timeout_s": self.disconnect_timeout,
            "connection": ctx.connection_json(),
        });
        let results = json!({
            "session": ctx.session_json(),
            "connected": ok,
            "failed": n - ok,
            "open_s": round3(open_s),
            "sessions_per_s": round3(ok as f64 / open_s.max(1e-9)),
            "time_to_connected_ms": stats::summary_ms(&hist),
            "time_to_connected_distribution_ms": stats::distribution_ms(&hist),
            "still_up_before_close": still_up,
            "closed_cleanly": clean,
            "closed_with_receipt": receipts,
            "closed_by_server_without_receipt": server_closes,
            "close_s": secs(close_s),
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
