//! Token-bucket rate limits (the classic algorithm: a bucket of `burst` tokens refilled at
//! `rate` per second; each action takes one token or is refused), and [`FrameLimit`], a
//! socket's frame-size cap.

use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::time::Instant;

use dashmap::DashMap;

/// A socket's frame-size cap, shared between the frame guard on its raw bytes
/// (`http::guard::FrameGuard`) and its session (native or XMPP), which raises the cap after
/// authentication and closes with 1009 when the guard tripped.
#[derive(Debug, Default)]
pub struct FrameLimit {
    /// Largest payload one frame may declare, bytes (the session raises it after `hello`).
    pub cap: AtomicUsize,
    /// Set when a frame was refused: the session closes with 1009.
    pub tripped: AtomicBool,
}

/// One bucket.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Per-key token buckets (key: user id, IP address, ...). Idle full buckets are pruned.
pub struct RateLimiter {
    /// Refill rate, tokens per second.
    rate: f64,
    /// Bucket size, tokens.
    burst: f64,
    buckets: DashMap<String, Bucket>,
}

impl RateLimiter {
    /// A limiter refilling `rate` tokens per second into buckets of `burst`.
    pub fn new(rate: f64, burst: f64) -> Self {
        RateLimiter { rate, burst, buckets: DashMap::new() }
    }

    /// Takes a token for `key`; false when its bucket is empty.
    pub fn allow(&self, key: &str) -> bool {
        self.allow_at(key, Instant::now())
    }

    /// Whether `key` has a token, without taking it.
    pub fn has_token(&self, key: &str) -> bool {
        let now = Instant::now();
        match self.buckets.get(key) {
            None => true,
            Some(b) => b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * self.rate >= 1.0,
        }
    }

    fn allow_at(&self, key: &str, now: Instant) -> bool {
        if self.buckets.len() > 100_000 {
            self.prune(now);
        }
        let mut b = self.buckets.entry(key.to_owned()).or_insert(Bucket { tokens: self.burst, at: now });
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * self.rate).min(self.burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Drops buckets that have refilled completely (they hold no state worth keeping).
    fn prune(&self, now: Instant) {
        let full_after = self.burst / self.rate;
        self.buckets.retain(|_, b| now.saturating_duration_since(b.at).as_secs_f64() < full_after);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_rate() {
        let l = RateLimiter::new(50.0, 100.0);
        let t0 = Instant::now();
        assert_eq!((0..150).filter(|_| l.allow_at("a", t0)).count(), 100);
        assert!(!l.allow_at("a", t0));
        assert!(l.allow_at("b", t0), "buckets are per key");
        // 0.1 s later: 5 more tokens.
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!((0..10).filter(|_| l.allow_at("a", t1)).count(), 5);
    }
}
