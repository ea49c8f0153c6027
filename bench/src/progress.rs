//! A progress line on stderr every few seconds.

use std::time::{Duration, Instant};
use tokio::task::JoinHandle;

/// Stops the progress printer when dropped.
#[derive(Debug)]
pub struct Progress(Option<JoinHandle<()>>);

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            h.abort();
        }
    }
}

/// Prints `f()` every `every` (nothing if `every` is zero).
pub fn spawn(
    label: &'static str,
    every: Duration,
    f: impl Fn() -> String + Send + 'static,
) -> Progress {
    if every.is_zero() {
        return Progress(None);
    }
    let start = Instant::now();
    Progress(Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        loop {
            tick.tick().await;
            eprintln!(
                "[stomp-load {label} +{:.0}s] {}",
                start.elapsed().as_secs_f64(),
                f()
            );
        }
    })))
}

/// One-off status line on stderr.
pub fn note(label: &str, msg: &str) {
    eprintln!("[stomp-load {label}] {msg}");
}
