//! The paced search (`stomp-load paced-search`): the highest publish rate a
//! path sustains for the 1:1 relay case (one publisher and one subscriber
//! per topic, many topic pairs) with no backlog growth. Each step is a
//! fixed-rate throughput run; a step passes when the publishers kept the
//! offered rate, the subscribers received within a tolerance of it, the
//! in-flight count did not grow through the window and latency did not
//! climb or exceed a ceiling. The rate doubles from `--start` until a step
//! fails (or halves until one passes), then bisects between the best pass
//! and the lowest failure. A failed step is tried again (`--retries`): on a
//! shared machine other processes only ever slow a path down, so the best
//! of two attempts is the better estimate of what the path can carry.
//! Before every step the search waits until the measured processes
//! (`--measure-pid`: RabbitMQ, the gateway) are idle again, so a step does
//! not pay for the previous, overloaded step's leftovers (RabbitMQ keeps
//! working through a failed step's backlog for seconds after its sessions
//! closed). Unlike an open-loop run this measures a transit capacity, not
//! how the broker splits its CPU between taking messages in and out.

use crate::common::{positive, Common, Ctx, Outcome};
use crate::procstat;
use crate::progress;
use crate::throughput::{self, Params, RunArgs};
use anyhow::{bail, Result};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

/// `stomp-load paced-search`.
#[derive(Debug, Clone, clap::Args)]
pub struct SearchArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub run: RunArgs,
    /// Topic pairs: publisher i sends only to topic i, which only
    /// subscriber i reads.
    #[arg(long, default_value_t = 10)]
    pub pairs: usize,
    /// First offered rate, msg/s over all publishers.
    #[arg(long, default_value_t = 2000.0, value_name = "MSG_PER_S")]
    pub start: f64,
    /// Never offer more than this (msg/s).
    #[arg(long, default_value_t = 200_000.0, value_name = "MSG_PER_S")]
    pub max_rate: f64,
    /// Never offer less than this (msg/s); a failure here ends the search.
    #[arg(long, default_value_t = 100.0, value_name = "MSG_PER_S")]
    pub min_rate: f64,
    /// Stop bisecting when the lowest failure is within this fraction
    /// above the best pass.
    #[arg(long, default_value_t = 0.05)]
    pub precision: f64,
    /// At most this many steps.
    #[arg(long, default_value_t = 12)]
    pub max_steps: usize,
    /// Allowed shortfall: sent and delivered msg/s at least (1 − this) ×
    /// offered, backlog growth at most this × offered per second.
    #[arg(long, default_value_t = 0.03)]
    pub tolerance: f64,
    /// Latency must not climb: the mean latency of the window's last
    /// quarter may exceed the first quarter's by at most this many ms
    /// plus the first quarter's mean (i.e. at most double, with a floor).
    #[arg(long, default_value_t = 5.0, value_name = "MS")]
    pub latency_slack_ms: f64,
    /// Latency ceiling: the window's p99 must stay under this (a standing
    /// queue built in the warm-up is not growth, but it is not keeping up).
    #[arg(long, default_value_t = 250.0, value_name = "MS")]
    pub max_p99_ms: f64,
    /// Attempts more for a step that is not sustained before the rate
    /// counts as not sustained.
    #[arg(long, default_value_t = 1)]
    pub retries: usize,
    /// Before each step, wait until every `--measure-pid` process uses less
    /// than this share of one core (percent, over 1 s)...
    #[arg(long, default_value_t = 15.0, value_name = "PCT")]
    pub settle_cpu: f64,
    /// ...or at most this many seconds.
    #[arg(long, default_value_t = 60.0, value_name = "SECS")]
    pub settle_max: f64,
    /// Seconds between steps (RabbitMQ drops the previous step's queues).
    #[arg(long, default_value_t = 2.0, value_name = "SECS")]
    pub pause: f64,
}

/// One step's numbers and verdict.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StepVerdict {
    pub pass: bool,
    pub reasons: Vec<String>,
}

/// The figures a step is judged on (from the throughput run's JSON).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct StepFigures {
    pub offered: f64,
    pub sent_per_s: f64,
    pub delivered_per_s: f64,
    pub backlog_growth_per_s: Option<f64>,
    pub latency_first_ms: Option<f64>,
    pub latency_last_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub lost: u64,
    pub new_errors: u64,
}

/// The pass/fail rule, apart so it can be tested.
pub(crate) fn judge(
    f: &StepFigures,
    tolerance: f64,
    latency_slack_ms: f64,
    max_p99_ms: f64,
) -> StepVerdict {
    let mut reasons = Vec::new();
    let floor = (1.0 - tolerance) * f.offered;
    if f.sent_per_s < floor {
        reasons.push(format!(
            "publishers sent {:.0} of {:.0} msg/s offered",
            f.sent_per_s, f.offered
        ));
    }
    if f.delivered_per_s < floor {
        reasons.push(format!(
            "delivered {:.0} of {:.0} msg/s offered",
            f.delivered_per_s, f.offered
        ));
    }
    // A floor of 10 msg/s keeps jitter at low rates from failing a step.
    let allowed = (tolerance * f.offered).max(10.0);
    match f.backlog_growth_per_s {
        Some(g) if g > allowed => {
            reasons.push(format!(
                "backlog grew by {g:.0} msg/s (allowed {allowed:.0})"
            ));
        }
        Some(_) => {}
        None => reasons.push("no backlog trace".into()),
    }
    if let (Some(a), Some(b)) = (f.latency_first_ms, f.latency_last_ms) {
        if b > 2.0 * a + latency_slack_ms {
            reasons.push(format!(
                "latency climbed from {a:.2} to {b:.2} ms through the window"
            ));
        }
    }
    if let Some(p99) = f.p99_ms.filter(|p| *p > max_p99_ms) {
        reasons.push(format!(
            "p99 latency {p99:.1} ms over the {max_p99_ms:.0} ms ceiling"
        ));
    }
    if f.lost > 0 {
        reasons.push(format!("{} messages lost", f.lost));
    }
    if f.new_errors > 0 {
        reasons.push(format!("{} errors", f.new_errors));
    }
    StepVerdict {
        pass: reasons.is_empty(),
        reasons,
    }
}

/// The search's state: the best pass and the lowest failure so far.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Bracket {
    pub best_pass: Option<f64>,
    pub lowest_fail: Option<f64>,
}

impl Bracket {
    pub fn record(&mut self, rate: f64, pass: bool) {
        if pass {
            self.best_pass = Some(self.best_pass.map_or(rate, |b| b.max(rate)));
        } else {
            self.lowest_fail = Some(self.lowest_fail.map_or(rate, |l| l.min(rate)));
        }
    }

    /// The next rate to try, or None when the search is done.
    pub fn next(&self, min: f64, max: f64, precision: f64) -> Option<f64> {
        match (self.best_pass, self.lowest_fail) {
            (Some(p), None) => (p < max).then(|| (p * 2.0).min(max)),
            (None, Some(f)) => (f > min).then(|| (f / 2.0).max(min)),
            (Some(p), Some(f)) if f <= p => None,
            (Some(p), Some(f)) => (f > p * (1.0 + precision)).then(|| ((p + f) / 2.0).round()),
            (None, None) => None,
        }
    }
}

/// Waits until every watched process used less than `pct` % of a core over
/// the last second, or `max` seconds; returns the seconds waited.
async fn settle(ctx: &Ctx, pct: f64, max: f64) -> f64 {
    let start = std::time::Instant::now();
    let tck = procstat::clk_tck();
    let cpu = || -> Vec<Option<f64>> {
        ctx.watched
            .iter()
            .map(|w| procstat::read(w.pid, tck).ok().map(|r| r.cpu_s))
            .collect()
    };
    let mut before = cpu();
    while start.elapsed().as_secs_f64() < max {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = cpu();
        let busy = before.iter().zip(&now).any(|(a, b)| match (a, b) {
            (Some(a), Some(b)) => (b - a) * 100.0 > pct,
            _ => false,
        });
        if !busy {
            break;
        }
        before = now;
    }
    procstat::round3(start.elapsed().as_secs_f64())
}

impl SearchArgs {
    pub async fn run(&self, ctx: &Arc<Ctx>) -> Result<Outcome> {
        if self.pairs == 0 {
            bail!("--pairs must be at least 1");
        }
        positive("--start", self.start)?;
        positive("--min-rate", self.min_rate)?;
        positive("--precision", self.precision)?;
        if self.max_rate < self.min_rate || self.start < self.min_rate || self.start > self.max_rate
        {
            bail!("need --min-rate <= --start <= --max-rate");
        }
        if !(0.0..1.0).contains(&self.tolerance) {
            bail!("--tolerance must be in [0, 1)");
        }
        let base = throughput::prefix(&self.run);
        let mut bracket = Bracket::default();
        let mut steps = Vec::new();
        let mut best: Option<Value> = None;
        let mut rate = Some(self.start);
        let mut attempt = 0;
        while let Some(r) = rate {
            if steps.len() >= self.max_steps {
                break;
            }
            let n = steps.len() + 1;
            let settle_s = settle(ctx, self.settle_cpu, self.settle_max).await;
            let errors_before = ctx.error_count();
            let params = Params {
                publishers: self.pairs,
                subscribers: self.pairs,
                destinations: self.pairs,
                rate: Some(r),
                batch: 1,
                run: self.run.clone(),
                prefix: format!("{base}.s{n}"),
                pinned: true,
                trace: true,
            };
            progress::note("paced-search", &format!("step {n}: offering {r:.0} msg/s"));
            let out = throughput::run(ctx, params, |i| format!("{i}")).await?;
            let res = &out.results;
            let num = |p: &str| res.pointer(p).and_then(Value::as_f64);
            let drain_complete = res["drain_complete"].as_bool().unwrap_or(false);
            let figures = StepFigures {
                offered: r,
                sent_per_s: num("/sent_per_s").unwrap_or(0.0),
                delivered_per_s: num("/delivered_per_s").unwrap_or(0.0),
                backlog_growth_per_s: num("/trace/backlog_growth_per_s"),
                latency_first_ms: num("/trace/latency_first_quarter_ms"),
                latency_last_ms: num("/trace/latency_last_quarter_ms"),
                p99_ms: num("/latency_ms/p99"),
                // Undelivered after a cut-off drain is a backlog, which the
                // trace judges; only a completed drain short of the count
                // is loss.
                lost: if drain_complete {
                    res["loss"].as_u64().unwrap_or(0)
                } else {
                    0
                },
                new_errors: ctx.error_count().saturating_sub(errors_before),
            };
            let verdict = judge(
                &figures,
                self.tolerance,
                self.latency_slack_ms,
                self.max_p99_ms,
            );
            progress::note(
                "paced-search",
                &format!(
                    "step {n}: {r:.0} msg/s offered, {:.0} sent, {:.0} delivered, backlog growth {} msg/s: {}",
                    figures.sent_per_s,
                    figures.delivered_per_s,
                    figures
                        .backlog_growth_per_s
                        .map_or("?".into(), |g| format!("{g:.0}")),
                    if verdict.pass {
                        "sustained".to_owned()
                    } else {
                        format!("not sustained ({})", verdict.reasons.join("; "))
                    }
                ),
            );
            let mut step = json!({
                "step": n,
                "offered_per_s": r,
                "attempt": attempt + 1,
                "settle_s": settle_s,
                "pass": verdict.pass,
                "reasons": verdict.reasons,
                "sent_per_s": figures.sent_per_s,
                "delivered_per_s": figures.delivered_per_s,
                "backlog_growth_per_s": figures.backlog_growth_per_s,
                "latency_first_quarter_ms": figures.latency_first_ms,
                "latency_last_quarter_ms": figures.latency_last_ms,
                "latency_ms": res["latency_ms"].clone(),
                "drain_s": res["drain_s"].clone(),
                "drain_complete": drain_complete,
                "processes": res["processes"].clone(),
            });
            if verdict.pass && bracket.best_pass.is_none_or(|b| r > b) {
                best = Some(step.clone());
            }
            // The full trace only in the step list's last-but-not-least
            // place: it is long; keep the summary figures above.
            step["trace"] = res["trace"].clone();
            steps.push(step);
            if !verdict.pass && attempt < self.retries {
                attempt += 1;
                progress::note(
                    "paced-search",
                    &format!("step {n}: trying {r:.0} msg/s again"),
                );
            } else {
                attempt = 0;
                bracket.record(r, verdict.pass);
                rate = bracket.next(self.min_rate, self.max_rate, self.precision);
            }
            if rate.is_some() && self.pause > 0.0 {
                tokio::time::sleep(Duration::from_secs_f64(self.pause)).await;
            }
        }
        let sustained = bracket.best_pass;
        let mut failures = Vec::new();
        if sustained.is_none() {
            failures.push(format!(
                "no rate was sustained (lowest tried {:.0} msg/s)",
                bracket.lowest_fail.unwrap_or(self.start)
            ));
        }
        let params = json!({
            "pairs": self.pairs,
            "publishers": self.pairs,
            "subscribers": self.pairs,
            "destinations": self.pairs,
            "size": self.run.size,
            "mode": "paced_search",
            "start_rate": self.start,
            "min_rate": self.min_rate,
            "max_rate": self.max_rate,
            "precision": self.precision,
            "max_steps": self.max_steps,
            "tolerance": self.tolerance,
            "latency_slack_ms": self.latency_slack_ms,
            "max_p99_ms": self.max_p99_ms,
            "settle_cpu_pct": self.settle_cpu,
            "settle_max_s": self.settle_max,
            "retries": self.retries,
            "warmup_s": self.run.warmup,
            "duration_s": self.run.duration,
            "drain_idle_s": self.run.drain_idle,
            "drain_max_s": self.run.drain_max,
            "ack": "auto",
            "connection": ctx.connection_json(),
        });
        let results = json!({
            "session": ctx.session_json(),
            "sustained_per_s": sustained,
            "lowest_failed_per_s": bracket.lowest_fail,
            "bracket_complete": sustained.is_some() && bracket.lowest_fail.is_some(),
            "at_sustained": best.unwrap_or(Value::Null),
            "steps": steps,
            "errors": ctx.errors_json(),
        });
        Ok(Outcome {
            params,
            results,
            failures,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures(offered: f64, delivered: f64, growth: f64) -> StepFigures {
        StepFigures {
            offered,
            sent_per_s: offered,
            delivered_per_s: delivered,
            backlog_growth_per_s: Some(growth),
            latency_first_ms: Some(1.0),
            latency_last_ms: Some(1.2),
            p99_ms: Some(3.0),
            lost: 0,
            new_errors: 0,
        }
    }

    #[test]
    fn judge_passes_a_path_that_keeps_up_only() {
        assert!(judge(&figures(1000.0, 995.0, 3.0), 0.03, 5.0, 250.0).pass);
        let v = judge(&figures(1000.0, 900.0, 3.0), 0.03, 5.0, 250.0);
        assert!(!v.pass);
        assert!(v.reasons[0].contains("delivered 900"), "{:?}", v.reasons);
        assert!(!judge(&figures(10_000.0, 9_900.0, 500.0), 0.03, 5.0, 250.0).pass);
        let mut climbing = figures(1000.0, 1000.0, 0.0);
        climbing.latency_last_ms = Some(50.0);
        assert!(!judge(&climbing, 0.03, 5.0, 250.0).pass);
        let mut queued = figures(1000.0, 1000.0, 0.0);
        queued.p99_ms = Some(4000.0);
        assert!(!judge(&queued, 0.03, 5.0, 250.0).pass);
        let mut lossy = figures(1000.0, 1000.0, 0.0);
        lossy.lost = 1;
        assert!(!judge(&lossy, 0.03, 5.0, 250.0).pass);
    }

    #[test]
    fn bracket_ramps_then_bisects() {
        let mut b = Bracket::default();
        b.record(1000.0, true);
        assert_eq!(b.next(100.0, 100_000.0, 0.05), Some(2000.0));
        b.record(2000.0, true);
        b.record(4000.0, false);
        assert_eq!(b.next(100.0, 100_000.0, 0.05), Some(3000.0));
        b.record(3000.0, true);
        b.record(3500.0, false);
        assert_eq!(b.next(100.0, 100_000.0, 0.05), Some(3250.0));
        b.record(3250.0, true);
        b.record(3375.0, true);
        // 3500 is within 5 % of 3375: done.
        assert_eq!(b.next(100.0, 100_000.0, 0.05), None);
        assert_eq!(b.best_pass, Some(3375.0));

        let mut down = Bracket::default();
        down.record(1000.0, false);
        assert_eq!(down.next(100.0, 100_000.0, 0.05), Some(500.0));
        down.record(100.0, false);
        assert_eq!(down.next(100.0, 100_000.0, 0.05), None);

        let mut top = Bracket::default();
        top.record(100_000.0, true);
        assert_eq!(top.next(100.0, 100_000.0, 0.05), None);
    }
}
