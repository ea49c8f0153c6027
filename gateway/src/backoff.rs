//! The reconnect backoff of every reconnect loop (the system link, the AMQP
//! control connection): exponential caps from `backon`, then full jitter.
//!
//! Attempt `n` waits a random time in `0..=min(initial × 2ⁿ, max)`; a
//! successful connect starts the sequence again ([`Backoff::reset`]). This is
//! what `docs/configuration.md` documents for `reconnect_initial_ms` and
//! `reconnect_max_ms`.

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use rand::Rng;
use std::time::Duration;

/// Full-jitter exponential backoff.
#[derive(Debug)]
pub struct Backoff {
    builder: ExponentialBuilder,
    max: Duration,
    caps: ExponentialBackoff,
}

impl Backoff {
    /// Caps start at `initial_ms` and double up to `max_ms` (both at least 1).
    pub fn new(initial_ms: u64, max_ms: u64) -> Backoff {
        let initial = Duration::from_millis(initial_ms.max(1));
        let max = Duration::from_millis(max_ms.max(1)).max(initial);
        let builder = ExponentialBuilder::new()
            .with_factor(2.0)
            .with_min_delay(initial)
            .with_max_delay(max)
            .without_max_times();
        Backoff {
            caps: builder.build(),
            builder,
            max,
        }
    }

    /// Starts again from the first cap (after a successful connect).
    pub fn reset(&mut self) {
        self.caps = self.builder.build();
    }

    /// The cap of this attempt; moves to the next one.
    fn next_cap(&mut self) -> Duration {
        self.caps.next().unwrap_or(self.max).min(self.max)
    }

    /// The delay before the next attempt: random up to this attempt's cap.
    pub fn next_delay(&mut self) -> Duration {
        let cap = u64::try_from(self.next_cap().as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(rand::rng().random_range(0..=cap))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_double_to_the_max_and_reset() {
        let mut b = Backoff::new(500, 30_000);
        let caps: Vec<u128> = (0..40).map(|_| b.next_cap().as_millis()).collect();
        assert_eq!(
            caps[..10],
            [500, 1_000, 2_000, 4_000, 8_000, 16_000, 30_000, 30_000, 30_000, 30_000]
        );
        assert!(caps[10..].iter().all(|&c| c == 30_000), "{caps:?}");
        b.reset();
        assert_eq!(b.next_cap(), Duration::from_millis(500));
    }

    #[test]
    fn delays_stay_within_the_caps() {
        let mut b = Backoff::new(500, 30_000);
        assert!(b.next_delay() <= Duration::from_millis(500));
        for _ in 0..40 {
            assert!(b.next_delay() <= Duration::from_millis(30_000));
        }
        // Degenerate settings never panic and never wait 0 caps forever.
        let mut z = Backoff::new(0, 0);
        assert!(z.next_delay() <= Duration::from_millis(1));
    }
}
