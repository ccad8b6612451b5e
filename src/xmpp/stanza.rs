//! Small helpers to read and build XMPP elements with `minidom` (no XML is written by hand,
//! except the unclosed TCP stream header, RFC 6120 §4.7, which no DOM can express).

use minidom::{Element, ElementBuilder};

/// Namespaces used by the gateway, with their sources.
pub mod ns {
    /// RFC 6120 §4.8.3.
    pub const CLIENT: &str = "jabber:client";
    /// RFC 6120 §4.8.1.
    pub const STREAMS: &str = "http://etherx.jabber.org/streams";
    /// RFC 6120 §4.9.3 (stream error conditions).
    pub const STREAM_ERRORS: &str = "urn:ietf:params:xml:ns:xmpp-streams";
    /// RFC 6120 §8.3.3 (stanza error conditions).
    pub const STANZAS: &str = "urn:ietf:params:xml:ns:xmpp-stanzas";
    /// RFC 6120 §5.4.
    pub const TLS: &str = "urn:ietf:params:xml:ns:xmpp-tls";
    /// RFC 6120 §6.4.
    pub const SASL: &str = "urn:ietf:params:xml:ns:xmpp-sasl";
    /// RFC 6120 §7.
    pub const BIND: &str = "urn:ietf:params:xml:ns:xmpp-bind";
    /// RFC 3921 §3 (legacy session establishment, answered for old clients).
    pub const SESSION: &str = "urn:ietf:params:xml:ns:xmpp-session";
    /// RFC 7395 §3.3.
    pub const FRAMING: &str = "urn:ietf:params:xml:ns:xmpp-framing";
    /// RFC 6121 §2.
    pub const ROSTER: &str = "jabber:iq:roster";
    /// XEP-0030.
    pub const DISCO_INFO: &str = "http://jabber.org/protocol/disco#info";
    /// XEP-0030.
    pub const DISCO_ITEMS: &str = "http://jabber.org/protocol/disco#items";
    /// XEP-0199.
    pub const PING: &str = "urn:xmpp:ping";
    /// XEP-0280.
    pub const CARBONS: &str = "urn:xmpp:carbons:2";
    /// XEP-0297.
    pub const FORWARD: &str = "urn:xmpp:forward:0";
    /// XEP-0203.
    pub const DELAY: &str = "urn:xmpp:delay";
    /// XEP-0359.
    pub const SID: &str = "urn:xmpp:sid:0";
    /// XEP-0184.
    pub const RECEIPTS: &str = "urn:xmpp:receipts";
    /// XEP-0333.
    pub const MARKERS: &str = "urn:xmpp:chat-markers:0";
    /// XEP-0085.
    pub const CHATSTATES: &str = "http://jabber.org/protocol/chatstates";
    /// XEP-0313.
    pub const MAM: &str = "urn:xmpp:mam:2";
    /// XEP-0059.
    pub const RSM: &str = "http://jabber.org/protocol/rsm";
    /// XEP-0004.
    pub const DATA_FORMS: &str = "jabber:x:data";
    /// XEP-0319.
    pub const IDLE: &str = "urn:xmpp:idle:1";
    /// XEP-0077.
    pub const REGISTER: &str = "jabber:iq:register";
    /// XEP-0077 §8 (stream feature).
    pub const REGISTER_FEATURE: &str = "http://jabber.org/features/iq-register";
    /// XEP-0198.
    pub const SM: &str = "urn:xmpp:sm:3";
    /// XEP-0045.
    pub const MUC: &str = "http://jabber.org/protocol/muc";
    /// XEP-0045.
    pub const MUC_USER: &str = "http://jabber.org/protocol/muc#user";
}

/// An element builder with attributes: `build!("message", ns::CLIENT, "to" => jid, ...)`.
macro_rules! build {
    ($name:expr, $ns:expr $(, $k:literal => $v:expr)* $(,)?) => {
        minidom::Element::builder($name, $ns)$(.attr(rxml::xml_ncname!($k).into(), $v))*
    };
}
pub(crate) use build;

/// An unqualified attribute of `el`.
macro_rules! attr {
    ($el:expr, $k:literal) => {
        $el.attr(rxml::xml_ncname!($k))
    };
}
pub(crate) use attr;

/// The serialized element (UTF-8). minidom only fails on names it would not have built.
pub fn to_string(el: &Element) -> String {
    let mut v = Vec::with_capacity(256);
    match el.write_to(&mut v) {
        Ok(()) => String::from_utf8(v).unwrap_or_default(),
        Err(e) => {
            tracing::error!(error = %e, "cannot serialize an element");
            String::new()
        }
    }
}

/// An element with text content.
pub fn text_el(name: &str, ns: &str, text: impl Into<String>) -> Element {
    Element::builder(name, ns).append(text.into()).build()
}

/// An empty element.
pub fn empty(name: &str, ns: &str) -> Element {
    Element::builder(name, ns).build()
}

/// `ts` (ms since the epoch) as an XEP-0082 DateTime in UTC with milliseconds.
pub fn stamp(ts: u64) -> String {
    chrono::DateTime::from_timestamp_millis(ts as i64)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// An XEP-0203 `<delay/>` for a stanza first accepted at `ts` (ms) by `from`.
pub fn delay(ts: u64, from: &str) -> Element {
    build!("delay", ns::DELAY, "stamp" => stamp(ts), "from" => from).build()
}

/// The archive id of message `seq` of `conv` (XEP-0359 `stanza-id`, XEP-0313 result id).
pub fn archive_id(conv: &str, seq: u64) -> String {
    format!("{conv}/{seq}")
}

/// The (conv, seq) of an archive id made by [`archive_id`].
pub fn parse_archive_id(id: &str) -> Option<(&str, u64)> {
    let (c, s) = id.rsplit_once('/')?;
    Some((c, s.parse().ok()?))
}

/// A stanza error reply (RFC 6120 §8.3) to `req` (a message, presence or iq), from `from`.
pub fn error_reply(req: &Element, from: Option<&str>, kind: &str, condition: &str, text: Option<&str>) -> Element {
    let mut err = build!("error", ns::CLIENT, "type" => kind).append(empty(condition, ns::STANZAS));
    if let Some(t) = text {
        err = err.append(text_el("text", ns::STANZAS, t));
    }
    let mut b: ElementBuilder = build!(req.name(), ns::CLIENT, "type" => "error");
    if let Some(id) = attr!(req, "id") {
        b = b.attr(rxml::xml_ncname!("id").into(), id);
    }
    if let Some(f) = from.or(attr!(req, "to")) {
        b = b.attr(rxml::xml_ncname!("from").into(), f);
    }
    b.append(err.build()).build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_stamps_and_serialization() {
        assert_eq!(parse_archive_id(&archive_id("dm:a:b", 42)), Some(("dm:a:b", 42)));
        assert_eq!(parse_archive_id("nope"), None);
        assert_eq!(stamp(0), "1970-01-01T00:00:00.000Z");
        let m = build!("message", ns::CLIENT, "to" => "a@b", "id" => "<&>").append(text_el("body", ns::CLIENT, "x < y & z")).build();
        let s = to_string(&m);
        assert!(s.contains("x &lt; y &amp; z"), "{s}");
        let back: Element = s.parse().unwrap();
        assert_eq!(attr!(back, "id"), Some("<&>"));
        let e = error_reply(&m, Some("srv"), "cancel", "item-not-found", Some("no"));
        assert_eq!(attr!(e, "type"), Some("error"));
    }
}
