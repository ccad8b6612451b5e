//! Counters and HDR latency histograms shared by the tasks of a run, and their rendering.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use hdrhistogram::Histogram;
use parking_lot::Mutex;
use serde_json::{json, Value};

/// Highest latency a histogram records, in µs (2 minutes); larger values are clamped to it.
const MAX_US: u64 = 120_000_000;

/// A new histogram of latencies in µs, 3 significant figures.
pub fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_US, 3).expect("static histogram bounds are valid")
}

/// One latency measured three ways at once: over the whole run, since the last progress line,
/// and since the last ramp step began.
pub struct Lat {
    pub total: Histogram<u64>,
    pub tick: Histogram<u64>,
    pub step: Histogram<u64>,
}

impl Lat {
    fn new() -> Self {
        Lat { total: hist(), tick: hist(), step: hist() }
    }

    /// Records one latency in µs.
    pub fn record(&mut self, us: u64) {
        let v = us.clamp(1, MAX_US);
        // Cannot fail: v is within the bounds.
        let _ = self.total.record(v);
        let _ = self.tick.record(v);
        let _ = self.step.record(v);
    }
}

/// What every task of a run adds to. Counters are atomics; histograms sit behind a mutex that
/// is held for one `record` only.
pub struct Stats {
    /// Time zero of the run: every timestamp in a message id is µs since this instant.
    pub start: Instant,
    /// Sends written to a socket (first attempts only).
    pub sent: AtomicU64,
    /// Sends answered by a first `ack`.
    pub acked: AtomicU64,
    /// First deliveries of a peer's message to its recipient.
    pub delivered: AtomicU64,
    /// Resends after a retryable error (`rate_limited`, `overloaded`, `unavailable`).
    pub retries: AtomicU64,
    /// Open-loop ticks skipped because the user already had too many sends in flight.
    pub skipped: AtomicU64,
    /// Sends waiting for their ack.
    pub inflight: AtomicU64,
    /// Send → ack, µs.
    pub ack: Mutex<Lat>,
    /// Send → the recipient's `event`, µs.
    pub delivery: Mutex<Lat>,
    /// `error` frames and other failures, by code (e.g. `rate_limited`, `close:4008`).
    pub errors: Mutex<BTreeMap<String, u64>>,
}

impl Stats {
    pub fn new() -> Self {
        Stats {
            start: Instant::now(),
            sent: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            inflight: AtomicU64::new(0),
            ack: Mutex::new(Lat::new()),
            delivery: Mutex::new(Lat::new()),
            errors: Mutex::new(BTreeMap::new()),
        }
    }

    /// µs since the start of the run.
    pub fn now_us(&self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }

    /// Counts one failure of kind `code`.
    pub fn error(&self, code: &str) {
        *self.errors.lock().entry(code.to_owned()).or_insert(0) += 1;
    }

    /// Total of all error counts.
    pub fn error_total(&self) -> u64 {
        self.errors.lock().values().sum()
    }

    pub fn errors_json(&self) -> Value {
        json!(self.errors.lock().clone())
    }

    /// `"rate_limited 12, close:4008 1"` or `"none"`.
    pub fn errors_line(&self) -> String {
        let e = self.errors.lock();
        if e.is_empty() {
            return "none".into();
        }
        e.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")
    }

    pub fn load(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

impl Default for Stats {
    fn default() -> Self {
        Self::new()
    }
}

/// Milliseconds with a precision that suits the value.
pub fn ms(us: u64) -> String {
    let m = us as f64 / 1000.0;
    if m < 10.0 {
        format!("{m:.2}")
    } else if m < 100.0 {
        format!("{m:.1}")
    } else {
        format!("{m:.0}")
    }
}

/// `p50 1.20  p90 2.00  p99 3.10  p99.9 4.00  max 5.00 ms (n=1000)`.
pub fn line(h: &Histogram<u64>) -> String {
    if h.is_empty() {
        return "no samples".into();
    }
    format!(
        "p50 {}  p90 {}  p99 {}  p99.9 {}  max {} ms  (n={})",
        ms(h.value_at_quantile(0.5)),
        ms(h.value_at_quantile(0.9)),
        ms(h.value_at_quantile(0.99)),
        ms(h.value_at_quantile(0.999)),
        ms(h.max()),
        h.len()
    )
}

/// The same as JSON, in ms.
pub fn summary(h: &Histogram<u64>) -> Value {
    let q = |x: f64| if h.is_empty() { 0.0 } else { h.value_at_quantile(x) as f64 / 1000.0 };
    json!({
        "count": h.len(),
        "p50_ms": q(0.5),
        "p90_ms": q(0.9),
        "p99_ms": q(0.99),
        "p999_ms": q(0.999),
        "max_ms": if h.is_empty() { 0.0 } else { h.max() as f64 / 1000.0 },
        "mean_ms": if h.is_empty() { 0.0 } else { h.mean() / 1000.0 },
    })
}

/// `12,345`.
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_groups_digits() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1234567), "1,234,567");
    }

    #[test]
    fn lat_clamps_out_of_range_values() {
        let mut l = Lat::new();
        l.record(0);
        l.record(u64::MAX);
        assert_eq!(l.total.len(), 2);
        assert!(l.total.max() >= MAX_US);
    }
}
