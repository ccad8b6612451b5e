//! Token-bucket rate limits (the classic algorithm: a bucket of `burst` tokens refilled at
//! `rate` per second; each action takes one token or is refused), and [`FrameLimit`], a
//! socket's frame-size cap.

use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use parking_lot::Mutex;

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

    /// Gives back a token taken by [`allow`](Self::allow) for an attempt that turned out not to
    /// count (a login whose password was right): taken before the slow check, so that
    /// concurrent attempts cannot all pass an empty bucket while none has failed yet.
    pub fn refund(&self, key: &str) {
        if let Some(mut b) = self.buckets.get_mut(key) {
            let now = Instant::now();
            b.tokens = (self.refilled(&b, now) + 1.0).min(self.burst);
            b.at = now;
        }
    }

    /// The tokens in `b` at `now`, refilled since it was last touched (at most `burst`).
    fn refilled(&self, b: &Bucket, now: Instant) -> f64 {
        (b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * self.rate).min(self.burst)
    }

    /// How long until `key` has a token again: zero when it has one now. For a `Retry-After`
    /// (RFC 9110 §10.2.3).
    pub fn retry_after(&self, key: &str) -> Duration {
        let Some(b) = self.buckets.get(key) else { return Duration::ZERO };
        let s = (1.0 - self.refilled(&b, Instant::now())) / self.rate;
        if s.is_finite() && s > 0.0 { Duration::try_from_secs_f64(s).unwrap_or(Duration::MAX) } else { Duration::ZERO }
    }

    fn allow_at(&self, key: &str, now: Instant) -> bool {
        if self.buckets.len() > 100_000 {
            self.prune(now);
        }
        let mut b = self.buckets.entry(key.to_owned()).or_insert(Bucket { tokens: self.burst, at: now });
        b.tokens = self.refilled(&b, now);
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

/// Appointments for refused clients: a virtual queue behind a [`RateLimiter`] of `rate` per
/// second. Each refused client is given the next free slot (slots are `1 / rate` s apart, from
/// now or after the last slot given), so a reconnect storm of N clients is told to come back
/// spread over N / `rate` seconds, in the order they came, instead of at random times that
/// collide again (the retry schedule of a leaky-bucket scheduler; `Retry-After` is RFC 9110
/// §10.2.3). A slot is advice, not a reservation: the limiter cannot tell a client coming back
/// from a newcomer, so whoever arrives first takes the capacity, and a client that lost its
/// slot to a newcomer is refused again and told a later one.
pub struct Appointments {
    /// Slots per second (the limiter's refill rate).
    rate: f64,
    /// The last slot given, if it is still ahead.
    last: Mutex<Option<Instant>>,
}

impl Appointments {
    /// Slots `1 / rate` s apart.
    pub fn new(rate: f64) -> Self {
        Appointments { rate: rate.max(f64::MIN_POSITIVE), last: Mutex::new(None) }
    }

    /// Books the next free slot and returns how long until it, whole seconds rounded up (at
    /// least 1, as `Retry-After` counts); `None` when that is beyond `max_s` (the queue is
    /// longer than a client should be told to wait; nothing is booked).
    pub fn book(&self, max_s: u64) -> Option<u64> {
        self.book_at(max_s, Instant::now())
    }

    fn book_at(&self, max_s: u64, now: Instant) -> Option<u64> {
        let mut last = self.last.lock();
        let from = last.map_or(now, |t| t.max(now));
        // Checked: a rate so small that one slot overflows a Duration or an Instant books nothing.
        let gap = Duration::try_from_secs_f64(1.0 / self.rate).ok()?;
        let slot = from.checked_add(gap)?;
        let secs = (slot - now).as_secs_f64().ceil().max(1.0) as u64;
        if secs > max_s {
            return None;
        }
        *last = Some(slot);
        Some(secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn retry_after_is_when_the_next_token_is_back() {
        // 1 token a minute, a bucket of 2.
        let l = RateLimiter::new(1.0 / 60.0, 2.0);
        assert_eq!(l.retry_after("a"), Duration::ZERO, "an unknown key has a full bucket");
        assert!(l.allow("a") && l.allow("a") && !l.allow("a"));
        let wait = l.retry_after("a");
        assert!(wait > Duration::from_secs(58) && wait <= Duration::from_secs(60), "{wait:?}");
        assert_eq!(l.retry_after("b"), Duration::ZERO, "per key");
    }

    #[test]
    fn a_refund_gives_back_one_token_up_to_the_burst() {
        let l = RateLimiter::new(1.0 / 60.0, 2.0);
        assert!(l.allow("a") && l.allow("a") && !l.allow("a"));
        l.refund("a");
        assert!(l.allow("a") && !l.allow("a"), "one token back");
        l.refund("a");
        l.refund("a");
        l.refund("a");
        assert!(l.allow("a") && l.allow("a") && !l.allow("a"), "never above the burst");
        l.refund("b");
        assert!(l.allow("b") && l.allow("b") && !l.allow("b"), "a refund for an unknown key adds nothing");
    }

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

    #[test]
    fn appointments_spread_a_storm_over_its_length() {
        let a = Appointments::new(100.0);
        let t0 = Instant::now();
        let waits: Vec<Option<u64>> = (0..450).map(|_| a.book_at(4, t0)).collect();
        // 100 slots per second: the first 100 (slots 10 ms .. 1 s) come back after 1 s, the next
        // 100 after 2 s, ...; beyond 4 s nothing is booked.
        assert_eq!(waits[0], Some(1));
        assert_eq!(waits[99], Some(1));
        assert_eq!(waits[100], Some(2));
        assert_eq!(waits[399], Some(4));
        assert_eq!(waits[400], None);
        assert_eq!(waits[449], None, "a refusal books nothing");
        // Time passing frees the queue: 3 s later the last slot (4 s) is 1 s ahead.
        assert_eq!(a.book_at(4, t0 + Duration::from_secs(3)), Some(2));
        assert_eq!(a.book_at(4, t0 + Duration::from_secs(60)), Some(1));
    }

    #[test]
    fn a_rate_too_small_for_one_slot_books_nothing() {
        assert_eq!(Appointments::new(1e-20).book(3600), None);
        assert_eq!(Appointments::new(f64::MIN_POSITIVE).book(3600), None);
    }
}
