//! XEP-0313 Message Archive Management over parley's history: the archive of a conversation is
//! its messages by seq (the archive id is `conv/seq`, the message's XEP-0359 stanza-id), paged with
//! XEP-0059 RSM. A page is always in chronological order, also when paging backwards
//! (`<before/>`). Results are sent only to the querying resource: never as carbons, never as
//! events (they do not move the device cursor).

use minidom::Element;

use super::session::XmppSession;
use super::stanza::{archive_id, attr, build, delay, error_reply, ns, parse_archive_id, text_el};
use crate::protocol::ids::{valid_user_id, Conv};
use crate::protocol::{MessageView, HISTORY_MAX_LIMIT};

/// Default page size when the query names no `<max/>`.
pub const DEFAULT_MAX: u64 = 50;

/// How a query pages.
enum Paging {
    /// Messages after this seq (forwards; 0: from the start).
    After(u64),
    /// Messages before this seq (None: the newest page).
    Before(Option<u64>),
}

/// Answers a MAM `<query/>` (an iq set): the results, then the iq result with `<fin/>`.
pub fn query(s: &mut XmppSession, iq: Element, q: Element) {
    let fail = |s: &mut XmppSession, kind: &str, cond: &str, text: &str| {
        let e = error_reply(&iq, None, kind, cond, Some(text));
        s.send_el(&e);
    };
    let me = s.user().to_owned();
    let mut with = None;
    if let Some(x) = q.get_child("x", ns::DATA_FORMS) {
        for f in x.children().filter(|f| f.name() == "field") {
            if attr!(f, "var") == Some("with") {
                with = f.get_child("value", ns::DATA_FORMS).map(|v| v.text());
            }
        }
    }
    // A query sent to a room is the room's archive (XEP-0313 §6.1.1 for MUC).
    if let Some(t) = attr!(iq, "to").filter(|t| t.ends_with(&format!("@{}", s.muc_service()))) {
        with = Some(t.to_owned());
    }
    let Some(with) = with.and_then(|w| jid::Jid::new(w.trim()).ok()) else {
        return fail(s, "modify", "not-acceptable", "this archive is per conversation: give a `with` field");
    };
    let conv = match (with.node().map(|n| n.as_str().to_owned()), with.domain().as_str()) {
        (Some(u), d) if d == s.shared().cfg.xmpp.domain && valid_user_id(&u) => Conv::dm(&me, &u),
        (Some(g), d) if d == s.muc_service() => Conv::Group(g),
        _ => return fail(s, "cancel", "item-not-found", "no such conversation"),
    };
    let name = conv.to_string();
    let set = q.get_child("set", ns::RSM);
    let max = set
        .and_then(|st| st.get_child("max", ns::RSM))
        .and_then(|m| m.text().trim().parse::<u64>().ok())
        .unwrap_or(DEFAULT_MAX)
        .clamp(1, HISTORY_MAX_LIMIT);
    let seq_of = |e: &Element| -> Result<Option<u64>, ()> {
        let t = e.text();
        let t = t.trim();
        if t.is_empty() {
            return Ok(None);
        }
        match parse_archive_id(t) {
            Some((c, seq)) if c == name => Ok(Some(seq)),
            _ => Err(()),
        }
    };
    let paging = match (set.and_then(|st| st.get_child("before", ns::RSM)), set.and_then(|st| st.get_child("after", ns::RSM))) {
        (Some(b), _) => match seq_of(b) {
            Ok(seq) => Paging::Before(seq),
            Err(()) => return fail(s, "cancel", "item-not-found", "unknown archive id"),
        },
        (None, Some(a)) => match seq_of(a) {
            Ok(seq) => Paging::After(seq.unwrap_or(0)),
            Err(()) => return fail(s, "cancel", "item-not-found", "unknown archive id"),
        },
        (None, None) => Paging::After(0),
    };
    let state = &s.shared().state;
    let (messages, complete) = match paging {
        Paging::Before(b) => match state.history(&me, &conv, b, max) {
            Ok(Ok(p)) => (p.messages, !p.more),
            Ok(Err(_)) => return fail(s, "auth", "forbidden", "not a member of this conversation"),
            Err(_) => return fail(s, "wait", "internal-server-error", "storage read failed"),
        },
        Paging::After(a) => {
            let page = state.history(&me, &conv, Some(a.saturating_add(max).saturating_add(1)), max);
            let newest = state.history(&me, &conv, None, 1);
            match (page, newest) {
                (Ok(Ok(p)), Ok(Ok(n))) => {
                    let msgs: Vec<MessageView> = p.messages.into_iter().filter(|m| m.seq > a).collect();
                    let last = n.messages.last().map_or(0, |m| m.seq);
                    let complete = msgs.last().map_or(true, |m| m.seq >= last);
                    (msgs, complete)
                }
                (Ok(Err(_)), _) | (_, Ok(Err(_))) => return fail(s, "auth", "forbidden", "not a member of this conversation"),
                _ => return fail(s, "wait", "internal-server-error", "storage read failed"),
            }
        }
    };
    let qid = attr!(q, "queryid").map(str::to_owned);
    let mut out = Vec::with_capacity(messages.len() + 1);
    for m in &messages {
        let group = matches!(conv, Conv::Group(_));
        let from = if group { format!("{}/{}", s.room_jid(&name), m.from) } else { s.bare_of(&m.from) };
        let to = if group || m.from != me { s.bare_of(&me) } else { s.room_jid(&name) };
        let inner = s.chat_message(m, &from, &to, false);
        let fwd = Element::builder("forwarded", ns::FORWARD).append(delay(m.ts, &s.shared().cfg.xmpp.domain)).append(inner).build();
        let mut r = build!("result", ns::MAM, "id" => archive_id(&name, m.seq));
        if let Some(q) = &qid {
            r = r.attr(rxml::xml_ncname!("queryid").into(), q.as_str());
        }
        let archive = if group { s.room_jid(&name) } else { s.bare_of(&me) };
        let wrapper = build!("message", ns::CLIENT, "from" => archive, "to" => s.jid()).append(r.append(fwd).build()).build();
        out.push(wrapper);
    }
    let mut rsm = Element::builder("set", ns::RSM);
    if let (Some(f), Some(l)) = (messages.first(), messages.last()) {
        rsm = rsm.append(text_el("first", ns::RSM, archive_id(&name, f.seq))).append(text_el("last", ns::RSM, archive_id(&name, l.seq)));
    }
    let mut fin = Element::builder("fin", ns::MAM).append(rsm.build());
    if complete {
        fin = fin.attr(rxml::xml_ncname!("complete").into(), "true");
    }
    let done = build!("iq", ns::CLIENT, "type" => "result", "id" => attr!(iq, "id").unwrap_or("")).append(fin.build()).build();
    out.push(done);
    for el in &out {
        if !s.send_el(el) {
            // The queue is full: the client's reader is far behind; it may query again.
            return;
        }
    }
}
