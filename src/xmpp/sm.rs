//! XEP-0198 stream management with resumption, over the device cursor.
//!
//! Every stanza (message, presence, iq) the server queues after `<enable/>` is counted (`out`,
//! mod 2^32); the stanzas of parley events remember their event: `pending` = (count, ev). A
//! client's `<a h='N'/>` confirms the stanzas up to N, and with them their events: the device
//! cursor moves (`Command::Received`) only then. So a cut connection loses nothing: what was not
//! confirmed is after the cursor, in the log.
//!
//! A stream that ends without `</stream>` is *parked* (its counters, for `xmpp`'s resume window,
//! [`RESUME_SECS`]); a `<resume previd h/>` on a new stream of the same user confirms up to `h`
//! and replays only the events after that, from the log. A parked stream never bounces or drops
//! anything: its messages are in the log, and a new login of the device (no resume) gets them from
//! the cursor. An `h` larger than what was sent is refused (`handled-count-too-high`).

use std::collections::VecDeque;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use actix::prelude::*;
use dashmap::DashMap;

/// How long a parked stream can be resumed, in seconds (advertised as `max`).
pub const RESUME_SECS: u64 = 300;

/// The counters of one managed stream.
#[derive(Debug, Clone, Default)]
pub struct Counters {
    /// The resumption id (`<enabled id/>`), None when resumption was not asked for.
    pub id: Option<String>,
    /// Stanzas sent, mod 2^32.
    pub out: u32,
    /// The last `h` the client confirmed.
    pub acked: u32,
    /// Stanzas received from the client, mod 2^32 (our `h`).
    pub inbound: u32,
    /// (count after the stanza, ev) of event stanzas not yet confirmed, in order.
    pub pending: VecDeque<(u32, u64)>,
    /// `out` when we last asked for an ack (`<r/>`).
    pub asked: u32,
}

/// Why an `h` was refused.
#[derive(Debug, PartialEq, Eq)]
pub struct TooHigh {
    pub h: u32,
    pub sent: u32,
}

impl Counters {
    /// A stanza was queued; `ev` > 0 when it carries (the end of) an event.
    pub fn sent(&mut self, stanza: bool, ev: u64) {
        if stanza {
            self.out = self.out.wrapping_add(1);
        }
        if ev > 0 {
            self.pending.push_back((self.out, ev));
        }
    }

    /// The client confirmed `h` stanzas: returns the highest event now confirmed (0: none new).
    pub fn ack(&mut self, h: u32) -> Result<u64, TooHigh> {
        let unacked = self.out.wrapping_sub(self.acked);
        let newly = h.wrapping_sub(self.acked);
        if newly > unacked {
            return Err(TooHigh { h, sent: self.out });
        }
        let base = self.acked;
        let mut ev = 0;
        while let Some(&(c, e)) = self.pending.front() {
            if c.wrapping_sub(base) <= newly {
                ev = e;
                self.pending.pop_front();
            } else {
                break;
            }
        }
        self.acked = h;
        Ok(ev)
    }
}

/// Most `<r/>`s waiting for their answer; past that the oldest is dropped (the answer to a later
/// one covers it).
pub const ACKS_WANTED: usize = 64;

/// When the server may answer the client's `<r/>` (XEP-0198 §4): its `<a h/>` says that `h`
/// stanzas were handled, and parley handles a message only once the commit pipeline answered it
/// (it is durable). Stanzas are handled in order, so `h` is every stanza received up to the first
/// message still in the pipeline; an `<r/>` is answered once every stanza before it is handled
/// (sends after it do not hold its answer back).
#[derive(Debug, Default)]
pub struct AckGate {
    /// Messages in the pipeline: serial → the inbound count of the message.
    pending: std::collections::BTreeMap<u64, u32>,
    next: u64,
    /// Inbound counts of the `<r/>`s not yet answered, oldest first.
    wanted: VecDeque<u32>,
}

impl AckGate {
    /// A message, the `inbound`-th stanza, went into the pipeline: returns its serial.
    pub fn submitted(&mut self, inbound: u32) -> u64 {
        let serial = self.next;
        self.next += 1;
        self.pending.insert(serial, inbound);
        serial
    }

    /// The pipeline answered message `serial`.
    pub fn answered(&mut self, serial: u64) {
        self.pending.remove(&serial);
    }

    /// Stanzas handled, `inbound` having been received.
    pub fn handled(&self, inbound: u32) -> u32 {
        self.pending.values().next().map_or(inbound, |c| c.wrapping_sub(1))
    }

    /// An `<r/>` came after `inbound` stanzas.
    pub fn requested(&mut self, inbound: u32) {
        if self.wanted.len() >= ACKS_WANTED {
            self.wanted.pop_front();
        }
        self.wanted.push_back(inbound);
    }

    /// The `h` to send now when some `<r/>` can be answered (all of those are), else None.
    pub fn answer(&mut self, inbound: u32) -> Option<u32> {
        let h = self.handled(inbound);
        // `h - wanted` is "not negative" in the counters' wrapping arithmetic.
        let before = self.wanted.len();
        while self.wanted.front().is_some_and(|w| h.wrapping_sub(*w) < 1 << 31) {
            self.wanted.pop_front();
        }
        (self.wanted.len() < before).then_some(h)
    }
}

/// A parked stream, waiting for `<resume/>`.
#[derive(Debug, Clone)]
pub struct Parked {
    pub user: String,
    pub device: String,
    pub counters: Counters,
    pub carbons: bool,
    /// The highest event confirmed (the cursor it submitted).
    pub confirmed: u64,
    pub until: Instant,
}

/// Parked streams by resumption id (in memory, per node: resumption does not survive a restart,
/// and nothing is lost then either, since the cursor is durable).
pub static PARKED: LazyLock<DashMap<String, Parked>> = LazyLock::new(DashMap::new);

/// Live managed streams by resumption id, so a resume that arrives before the server noticed the
/// old connection's end can take over (the old stream parks at once).
pub static LIVE: LazyLock<DashMap<String, Recipient<Park>>> = LazyLock::new(DashMap::new);

/// Ask a live stream to park now (its connection is being resumed elsewhere).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Park;

/// Parks `p` under `id`, dropping expired entries.
pub fn park(id: String, p: Parked) {
    let now = Instant::now();
    PARKED.retain(|_, v| v.until > now);
    PARKED.insert(id, p);
}

/// Takes the parked stream `id` of `user` if it is still resumable.
pub fn take(id: &str, user: &str) -> Option<Parked> {
    let (_, p) = PARKED.remove_if(id, |_, p| p.user == user)?;
    (p.until > Instant::now()).then_some(p)
}

/// The deadline of a stream parked now.
pub fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(RESUME_SECS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_confirm_events_in_order_and_too_high_is_refused() {
        let mut c = Counters::default();
        c.sent(true, 0); // presence
        c.sent(true, 1); // message ev 1
        c.sent(true, 0);
        c.sent(true, 0);
        c.sent(true, 2); // receipt, ends ev 2
        assert_eq!(c.ack(1), Ok(0));
        assert_eq!(c.ack(3), Ok(1));
        assert_eq!(c.ack(9), Err(TooHigh { h: 9, sent: 5 }));
        assert_eq!(c.ack(5), Ok(2));
        assert_eq!(c.ack(5), Ok(0));
    }

    #[test]
    fn an_r_waits_only_for_the_messages_before_it() {
        let mut g = AckGate::default();
        g.requested(0);
        assert_eq!(g.answer(0), Some(0), "nothing pending: at once");
        let m1 = g.submitted(1); // stanza 1: a message
        g.requested(1);
        assert_eq!(g.answer(1), None, "message 1 is not durable yet");
        let m2 = g.submitted(2);
        g.requested(2);
        // 3 is a presence (handled at once), then another <r/>.
        g.requested(3);
        assert_eq!(g.answer(3), None);
        g.answered(m1);
        assert_eq!(g.answer(3), Some(1), "the first <r/> is answered; m2 still holds the others");
        assert_eq!(g.answer(3), None);
        g.answered(m2);
        assert_eq!(g.answer(3), Some(3), "one <a/> answers both");
        assert_eq!(g.answer(3), None);
        // Out-of-order answers from the pipeline: h stops at the first message still pending.
        let (a, b) = (g.submitted(4), g.submitted(5));
        g.answered(b);
        assert_eq!(g.handled(5), 3);
        g.answered(a);
        assert_eq!(g.handled(5), 5);
        // The counters wrap; the queue of <r/>s is bounded.
        let w = g.submitted(u32::MAX);
        g.requested(u32::MAX);
        g.answered(w);
        assert_eq!(g.answer(1), Some(1));
        for i in 0..1000 {
            g.requested(i);
        }
        assert!(g.wanted.len() <= ACKS_WANTED);
    }

    #[test]
    fn counters_wrap_at_2_pow_32() {
        let mut c = Counters { out: u32::MAX - 1, acked: u32::MAX - 1, ..Default::default() };
        c.sent(true, 7);
        c.sent(true, 8);
        c.sent(true, 9);
        assert_eq!(c.out, 1);
        assert_eq!(c.ack(u32::MAX), Ok(7));
        assert_eq!(c.ack(0), Ok(8));
        assert_eq!(c.ack(2), Err(TooHigh { h: 2, sent: 1 }));
        assert_eq!(c.ack(1), Ok(9));
    }
}
