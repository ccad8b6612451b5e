//! XEP-0313 Message Archive Management over parley's history, paged with XEP-0059 RSM.
//!
//! - **Archive ids** are `CONV/SEQ` (e.g. `dm:alice:bob/7`), the message's XEP-0359 stanza-id,
//!   assigned once at ingest.
//! - **Which archive.** A query with a `with` field (a user's bare JID, or a room) is that
//!   conversation; a query sent to a room JID is the room's archive (XEP-0313 §6.1.1 for MUC); a
//!   query without `with` is the user's archive: **every direct conversation of the user** (room
//!   messages are in the rooms' archives, XEP-0313 §4.1.1).
//! - **Global order.** Messages are ordered by `(ts, conv, seq)`: the server timestamp (ms, the
//!   commit thread's clock, never decreasing along the log), then the conversation's name, then
//!   its seq. It is stable (none of the three ever changes) and, within one conversation, it is
//!   the seq order.
//! - **Filters.** `start` and `end` (XEP-0082 DateTimes, inclusive, XEP-0313 §4.1.2) bound `ts`;
//!   RSM `after`/`before` (archive ids) and `max` (1-[`HISTORY_MAX_LIMIT`], default
//!   [`DEFAULT_MAX`]) page. `<before/>` (empty) is the last page. Every page is in
//!   chronological order, also a backwards one; `<fin complete='true'/>` says the page reached
//!   the end of the archive in its direction.
//! - Results go only to the querying resource: never as carbons, never as events (they do not
//!   move the device cursor).
//!
//! Each conversation is searched with O(log n) single-message reads for the bounds, then one
//! history read of at most `max` messages; the pages of all conversations are merged.

use minidom::Element;

use super::session::XmppSession;
use super::stanza::{archive_id, attr, build, delay, error_reply, ns, parse_archive_id, text_el};
use crate::protocol::ids::{valid_user_id, Conv};
use crate::protocol::{MessageView, HISTORY_MAX_LIMIT};
use crate::storage::state::State;

/// Default page size when the query names no `<max/>`.
pub const DEFAULT_MAX: u64 = 50;

/// A message's place in the global order: (ts, conv, seq).
type Key = (u64, String, u64);

fn key(m: &MessageView) -> Key {
    (m.ts, m.conv.clone(), m.seq)
}

/// Why a query cannot be answered (a stanza error: type, condition, text).
type Fail = (&'static str, &'static str, &'static str);

const NOT_MEMBER: Fail = ("auth", "forbidden", "not a member of this conversation");
const STORAGE: Fail = ("wait", "internal-server-error", "storage read failed");

/// One conversation of the archive, as the querying user sees it.
struct ConvArchive<'a> {
    state: &'a State,
    me: &'a str,
    conv: Conv,
    /// Visible seqs: `lo..=hi` (empty when `hi < lo`).
    lo: u64,
    hi: u64,
}

impl<'a> ConvArchive<'a> {
    /// The conversation's visible range; `NOT_MEMBER` when the user may not read it.
    fn open(state: &'a State, me: &'a str, conv: Conv) -> Result<Self, Fail> {
        let hi = match state.history(me, &conv, None, 1) {
            Ok(Ok(p)) => p.messages.last().map_or(0, |m| m.seq),
            Ok(Err(_)) => return Err(NOT_MEMBER),
            Err(_) => return Err(STORAGE),
        };
        let mut a = ConvArchive { state, me, conv, lo: 1, hi };
        if hi > 0 {
            // The first visible seq: messages below it are purged or were before the user joined.
            let first = a.first(1, hi, |_| true)?;
            a.lo = first.unwrap_or(hi + 1);
        }
        Ok(a)
    }

    /// Message `seq`, when visible.
    fn at(&self, seq: u64) -> Result<Option<MessageView>, Fail> {
        match self.state.history(self.me, &self.conv, Some(seq.saturating_add(1)), 1) {
            Ok(Ok(p)) => Ok(p.messages.into_iter().next().filter(|m| m.seq == seq)),
            Ok(Err(_)) => Err(NOT_MEMBER),
            Err(_) => Err(STORAGE),
        }
    }

    /// The first seq in `lo..=hi` whose message exists and satisfies `pred` (monotonic in seq:
    /// false, ..., false, true, ..., true), by bisection.
    fn first(&self, mut lo: u64, mut hi: u64, pred: impl Fn(&MessageView) -> bool) -> Result<Option<u64>, Fail> {
        let mut found = None;
        while lo <= hi {
            let mid = lo + (hi - lo) / 2;
            match self.at(mid)? {
                Some(m) if pred(&m) => {
                    found = Some(mid);
                    if mid == 0 {
                        break;
                    }
                    hi = mid - 1;
                }
                _ => lo = mid + 1,
            }
        }
        Ok(found)
    }

    /// The seqs of this conversation inside the query's bounds, as `(first, last)` (empty when
    /// `last < first`).
    fn range(&self, q: &Bounds) -> Result<(u64, u64), Fail> {
        let (lo, hi) = (self.lo, self.hi);
        if hi < lo {
            return Ok((1, 0));
        }
        let after = |m: &MessageView| q.start.is_none_or(|s| m.ts >= s) && q.after.as_ref().is_none_or(|k| key(m) > *k);
        let a = self.first(lo, hi, after)?.unwrap_or(hi + 1);
        let beyond = |m: &MessageView| q.end.is_some_and(|e| m.ts > e) || q.before.as_ref().is_some_and(|k| key(m) >= *k);
        let b = self.first(lo, hi, beyond)?.map_or(hi, |s| s.saturating_sub(1));
        Ok((a, b))
    }

    /// Messages `from..=to` (at most `HISTORY_MAX_LIMIT` of them), ascending.
    fn read(&self, from: u64, to: u64) -> Result<Vec<MessageView>, Fail> {
        if to < from {
            return Ok(Vec::new());
        }
        match self.state.history(self.me, &self.conv, Some(to.saturating_add(1)), to - from + 1) {
            Ok(Ok(p)) => Ok(p.messages.into_iter().filter(|m| m.seq >= from).collect()),
            Ok(Err(_)) => Err(NOT_MEMBER),
            Err(_) => Err(STORAGE),
        }
    }
}

/// The query's bounds in the global order.
#[derive(Default)]
struct Bounds {
    /// `start`, ms (inclusive).
    start: Option<u64>,
    /// `end`, ms (inclusive).
    end: Option<u64>,
    /// RSM `after`: only messages after this key.
    after: Option<Key>,
    /// RSM `before`: only messages before this key.
    before: Option<Key>,
}

/// A page: the messages in chronological order, and whether it reaches the archive's end in
/// its direction.
fn page(archives: &[ConvArchive], q: &Bounds, max: u64, backwards: bool) -> Result<(Vec<MessageView>, bool), Fail> {
    let mut all = Vec::new();
    let mut total = 0u64;
    for a in archives {
        let (first, last) = a.range(q)?;
        if last < first {
            continue;
        }
        total += last - first + 1;
        let (from, to) = if backwards { (first.max(last.saturating_sub(max - 1)), last) } else { (first, last.min(first.saturating_add(max - 1))) };
        all.extend(a.read(from, to)?);
    }
    all.sort_by_key(key);
    let complete = total <= max;
    if backwards {
        let cut = all.len().saturating_sub(max as usize);
        all.drain(..cut);
    } else {
        all.truncate(max as usize);
    }
    Ok((all, complete))
}

/// An XEP-0082 DateTime as ms since the epoch.
fn datetime_ms(s: &str) -> Option<u64> {
    let t = chrono::DateTime::parse_from_rfc3339(s.trim()).ok()?;
    u64::try_from(t.timestamp_millis()).ok()
}

/// Answers a MAM `<query/>` (an iq set): the results, then the iq result with `<fin/>`.
pub fn query(s: &mut XmppSession, iq: Element, q: Element) {
    match answer(s, &iq, &q) {
        Ok(out) => {
            for el in &out {
                if !s.send_el(el) {
                    // The queue is full: the client's reader is far behind; it may query again.
                    return;
                }
            }
        }
        Err((kind, cond, text)) => {
            let e = error_reply(&iq, None, kind, cond, Some(text));
            s.send_el(&e);
        }
    }
}

fn answer(s: &XmppSession, iq: &Element, q: &Element) -> Result<Vec<Element>, Fail> {
    let me = s.user().to_owned();
    let domain = s.shared().cfg.xmpp.domain.clone();
    let (mut with, mut bounds) = (None, Bounds::default());
    if let Some(x) = q.get_child("x", ns::DATA_FORMS) {
        for f in x.children().filter(|f| f.name() == "field") {
            let value = f.get_child("value", ns::DATA_FORMS).map(|v| v.text());
            match (attr!(f, "var"), value) {
                (Some("FORM_TYPE"), _) | (_, None) => {}
                (Some("with"), Some(v)) => with = Some(v),
                (Some("start"), Some(v)) => bounds.start = Some(datetime_ms(&v).ok_or(("modify", "bad-request", "start is not an XEP-0082 DateTime"))?),
                (Some("end"), Some(v)) => bounds.end = Some(datetime_ms(&v).ok_or(("modify", "bad-request", "end is not an XEP-0082 DateTime"))?),
                _ => return Err(("cancel", "feature-not-implemented", "the fields are with, start and end")),
            }
        }
    }
    // A query sent to a room is the room's archive (XEP-0313 §6.1.1 for MUC).
    if let Some(t) = attr!(iq, "to").filter(|t| t.ends_with(&format!("@{}", s.muc_service()))) {
        with = Some(t.to_owned());
    }
    let state_now = s.shared().state();
    let state = &*state_now;
    let convs: Vec<Conv> = match with {
        Some(w) => {
            let j = jid::Jid::new(w.trim()).map_err(|_| ("modify", "jid-malformed", "with is not a JID"))?;
            let conv = match (j.node().map(|n| n.as_str().to_owned()), j.domain().as_str()) {
                (Some(u), d) if d == domain && valid_user_id(&u) => Conv::dm(&me, &u),
                (Some(g), d) if d == s.muc_service() => Conv::Group(g),
                _ => return Err(("cancel", "item-not-found", "no such conversation")),
            };
            vec![conv]
        }
        None => state
            .conversations(&me)
            .map_err(|_| STORAGE)?
            .into_iter()
            .filter_map(|c| Conv::parse(&c.conv))
            .filter(|c| matches!(c, Conv::Dm { .. }))
            .collect(),
    };
    let archives = convs.into_iter().map(|c| ConvArchive::open(state, &me, c)).collect::<Result<Vec<_>, _>>()?;
    let set = q.get_child("set", ns::RSM);
    let max = set
        .and_then(|st| st.get_child("max", ns::RSM))
        .and_then(|m| m.text().trim().parse::<u64>().ok())
        .unwrap_or(DEFAULT_MAX)
        .clamp(1, HISTORY_MAX_LIMIT);
    // An RSM id: the key of that message, which must be in this archive.
    let key_of = |e: &Element| -> Result<Option<Key>, Fail> {
        let t = e.text();
        let t = t.trim();
        if t.is_empty() {
            return Ok(None);
        }
        let unknown = ("cancel", "item-not-found", "unknown archive id");
        let (c, seq) = parse_archive_id(t).ok_or(unknown)?;
        let a = archives.iter().find(|a| a.conv.to_string() == c).ok_or(unknown)?;
        let m = a.at(seq)?.ok_or(unknown)?;
        Ok(Some(key(&m)))
    };
    let before = set.and_then(|st| st.get_child("before", ns::RSM));
    let after = set.and_then(|st| st.get_child("after", ns::RSM));
    let backwards = before.is_some();
    if let Some(b) = before {
        bounds.before = key_of(b)?;
    }
    if let Some(a) = after {
        bounds.after = key_of(a)?;
    }
    let (messages, complete) = page(&archives, &bounds, max, backwards)?;
    let qid = attr!(q, "queryid").map(str::to_owned);
    let mut out = Vec::with_capacity(messages.len() + 1);
    for m in &messages {
        let group = m.conv.starts_with("g:");
        let from = if group { format!("{}/{}", s.room_jid(&m.conv), m.from) } else { s.bare_of(&m.from) };
        let to = if group || m.from != me { s.bare_of(&me) } else { s.room_jid(&m.conv) };
        let inner = s.chat_message(m, &from, &to, false);
        let fwd = Element::builder("forwarded", ns::FORWARD).append(delay(m.ts, &domain)).append(inner).build();
        let mut r = build!("result", ns::MAM, "id" => archive_id(&m.conv, m.seq));
        if let Some(q) = &qid {
            r = r.attr(rxml::xml_ncname!("queryid").into(), q.as_str());
        }
        let archive = if group { s.room_jid(&m.conv) } else { s.bare_of(&me) };
        out.push(build!("message", ns::CLIENT, "from" => archive, "to" => s.jid()).append(r.append(fwd).build()).build());
    }
    let mut rsm = Element::builder("set", ns::RSM);
    if let (Some(f), Some(l)) = (messages.first(), messages.last()) {
        rsm = rsm.append(text_el("first", ns::RSM, archive_id(&f.conv, f.seq))).append(text_el("last", ns::RSM, archive_id(&l.conv, l.seq)));
    }
    let mut fin = Element::builder("fin", ns::MAM).append(rsm.build());
    if complete {
        fin = fin.attr(rxml::xml_ncname!("complete").into(), "true");
    }
    out.push(build!("iq", ns::CLIENT, "type" => "result", "id" => attr!(iq, "id").unwrap_or("")).append(fin.build()).build());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datetimes() {
        assert_eq!(datetime_ms("1970-01-01T00:00:01.500Z"), Some(1500));
        assert_eq!(datetime_ms("1970-01-01T01:00:00+01:00"), Some(0));
        assert_eq!(datetime_ms("yesterday"), None);
    }
}
