//! Latency histograms and their JSON summaries.

use hdrhistogram::Histogram;
use serde_json::{json, Value};

/// A histogram of nanoseconds from 1 ns to one hour, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    match Histogram::new_with_bounds(1, 3_600_000_000_000, 3) {
        Ok(h) => h,
        // The bounds are constants that hdrhistogram accepts.
        Err(e) => panic!("histogram bounds: {e}"),
    }
}

fn ms(ns: u64) -> f64 {
    (ns as f64 / 1_000.0).round() / 1_000.0
}

/// Percentiles of a nanosecond histogram, in milliseconds (µs precision).
/// Fields are null when the histogram is empty.
pub fn summary_ms(h: &Histogram<u64>) -> Value {
    if h.is_empty() {
        return json!({
            "count": 0, "min": null, "mean": null, "p50": null, "p90": null,
            "p99": null, "p99_9": null, "max": null, "stdev": null,
        });
    }
    json!({
        "count": h.len(),
        "min": ms(h.min()),
        "mean": ms(h.mean() as u64),
        "p50": ms(h.value_at_quantile(0.50)),
        "p90": ms(h.value_at_quantile(0.90)),
        "p99": ms(h.value_at_quantile(0.99)),
        "p99_9": ms(h.value_at_quantile(0.999)),
        "max": ms(h.max()),
        "stdev": ms(h.stdev() as u64),
    })
}

/// The HdrHistogram percentile distribution (2 ticks per half-distance), as
/// `[[percentile, ms, count_at_or_below], ...]`.
pub fn distribution_ms(h: &Histogram<u64>) -> Value {
    if h.is_empty() {
        return json!([]);
    }
    let rows: Vec<Value> = h
        .iter_quantiles(2)
        .map(|v| {
            json!([
                (v.percentile() * 1000.0).round() / 1000.0,
                ms(v.value_iterated_to()),
                v.count_since_last_iteration()
            ])
        })
        .collect();
    Value::Array(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_and_distribution() {
        let mut h = new_histogram();
        assert_eq!(summary_ms(&h)["count"], 0);
        for i in 1..=1000u64 {
            h.saturating_record(i * 1_000);
        }
        let s = summary_ms(&h);
        assert_eq!(s["count"], 1000);
        let p50 = s["p50"].as_f64().unwrap_or(0.0);
        assert!((p50 - 0.5).abs() < 0.01, "{s}");
        let d = distribution_ms(&h);
        assert!(d.as_array().map(|a| a.len() > 5).unwrap_or(false));
    }
}
