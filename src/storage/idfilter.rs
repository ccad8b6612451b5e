//! A filter of the client message ids sent lately, so that a session's early duplicate check
//! ([`State::dedup`](super::State::dedup), before a `send` reaches the log) does not read the
//! store for the ids that are certainly new, which is nearly every id.
//!
//! Two Bloom filters (B. H. Bloom, "Space/time trade-offs in hash coding with allowable
//! errors", CACM 1970), the current and the previous generation: apply adds every id it stores a
//! dedup record for to the current one; when that one holds [`GENERATION`] ids it becomes the
//! previous one and a fresh one starts. A lookup asks both.
//!
//! **Only an optimization.** A "no" means the id was not added in the last one to two
//! generations; an older id (or one sent before this process started) is answered "no" too, and
//! its resend then reaches the log, where apply's own duplicate check (the dedup record) answers
//! it with the original `seq`. A "maybe" (a false positive: about 0.2% at a full generation)
//! only costs the store read it would have cost anyway.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;

/// Bits per filter (2^24 bits: 2 MiB per filter).
const BITS: usize = 1 << 24;
/// Hash functions per id.
const HASHES: u64 = 4;
/// Ids per generation: at 1,000,000 ids in 2^24 bits with 4 hashes, ~0.24% false positives.
pub const GENERATION: usize = 1_000_000;

struct Bloom {
    words: Box<[AtomicU64]>,
    added: AtomicUsize,
}

impl Bloom {
    fn new() -> Arc<Bloom> {
        Arc::new(Bloom { words: (0..BITS / 64).map(|_| AtomicU64::new(0)).collect(), added: AtomicUsize::new(0) })
    }

    /// The bit positions of a 64-bit hash (double hashing, Kirsch and Mitzenmacher 2006).
    fn bits(h: u64) -> impl Iterator<Item = usize> {
        let (a, b) = (h, h.rotate_left(32) | 1);
        (0..HASHES).map(move |i| (a.wrapping_add(i.wrapping_mul(b)) as usize) % BITS)
    }

    fn add(&self, h: u64) {
        for bit in Self::bits(h) {
            self.words[bit / 64].fetch_or(1 << (bit % 64), Ordering::Relaxed);
        }
        self.added.fetch_add(1, Ordering::Relaxed);
    }

    fn may_contain(&self, h: u64) -> bool {
        Self::bits(h).all(|bit| self.words[bit / 64].load(Ordering::Relaxed) & (1 << (bit % 64)) != 0)
    }
}

/// See the module docs. Written by apply (one thread), read by every session.
pub struct IdFilter {
    /// (current, previous).
    gens: RwLock<(Arc<Bloom>, Option<Arc<Bloom>>)>,
}

impl Default for IdFilter {
    fn default() -> Self {
        IdFilter { gens: RwLock::new((Bloom::new(), None)) }
    }
}

/// The hash of `(user, id)`.
fn hash(user: &str, id: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = fxhash::FxHasher64::default();
    user.hash(&mut h);
    id.hash(&mut h);
    // FxHash mixes weakly in its low bits; finish with a multiply-xorshift (splitmix64).
    let mut z = h.finish().wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl IdFilter {
    /// Notes that `user` sent `id` (its dedup record is being stored).
    pub fn add(&self, user: &str, id: &str) {
        let h = hash(user, id);
        let full = {
            let g = self.gens.read();
            g.0.add(h);
            g.0.added.load(Ordering::Relaxed) >= GENERATION
        };
        if full {
            let mut g = self.gens.write();
            if g.0.added.load(Ordering::Relaxed) >= GENERATION {
                let cur = std::mem::replace(&mut g.0, Bloom::new());
                g.1 = Some(cur);
            }
        }
    }

    /// False when `user` did not send `id` lately (see the module docs); true when it may have.
    pub fn may_contain(&self, user: &str, id: &str) -> bool {
        let h = hash(user, id);
        let g = self.gens.read();
        g.0.may_contain(h) || g.1.as_ref().is_some_and(|p| p.may_contain(h))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn added_ids_are_found_and_new_ones_mostly_not() {
        let f = IdFilter::default();
        for i in 0..10_000 {
            f.add("alice", &format!("m{i}"));
        }
        assert!((0..10_000).all(|i| f.may_contain("alice", &format!("m{i}"))), "no false negatives");
        let fp = (0..10_000).filter(|i| f.may_contain("bob", &format!("m{i}"))).count();
        assert!(fp < 10, "{fp} false positives in 10,000 (expected ~0)");
    }

    #[test]
    fn the_previous_generation_is_still_asked_and_the_one_before_is_forgotten() {
        let f = IdFilter::default();
        f.add("u", "old");
        for i in 0..GENERATION {
            f.add("u", &format!("a{i}"));
        }
        // "old" is in the previous generation now.
        assert!(f.may_contain("u", "old"));
        for i in 0..GENERATION {
            f.add("u", &format!("b{i}"));
        }
        assert!(!f.may_contain("u", "old"), "two generations later the id is forgotten (apply's dedup record answers it)");
        assert!(f.may_contain("u", &format!("a{}", GENERATION - 1)));
    }
}
