//! Incoming XML for the gateway, parsed with `rxml` (restricted XML: no DTD, no entity
//! declarations, no processing instructions, namespace-well-formed; RFC 6120 §11.1 asks exactly
//! for this subset) and turned into `minidom` elements.
//!
//! - TCP (RFC 6120 §4): one long document, the `<stream:stream>` root, whose children are the
//!   stanzas; bytes arrive in arbitrary pieces, so [`StreamParser`] is a push parser that keeps
//!   its state between reads.
//! - WebSocket (RFC 7395 §3.3): every message is one whole element (`<open/>`, `<close/>` or a
//!   stanza); [`parse_frame`] parses one.
//!
//! A stanza larger than the cap is refused while it is still arriving (nothing past the cap is
//! buffered); nesting deeper than [`MAX_DEPTH`] is refused too.

use minidom::tree_builder::TreeBuilder;
use minidom::Element;
use rxml::error::EndOrError;
use rxml::{Options, Parse, RawEvent, RawParser, WithOptions};

/// The XML namespace of stream elements (RFC 6120 §4.8.1).
pub const NS_STREAMS: &str = "http://etherx.jabber.org/streams";
/// The namespace of stanzas on a client stream (RFC 6120 §4.8.3).
pub const NS_CLIENT: &str = "jabber:client";

/// Deepest element nesting accepted inside a stanza (the stream root is depth 1).
pub const MAX_DEPTH: usize = 48;

/// A stream error (RFC 6120 §4.9.3): the defined condition and a human-readable text. After it
/// the stream is closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamError {
    /// An element name of `urn:ietf:params:xml:ns:xmpp-streams`, e.g. `not-well-formed`.
    pub condition: &'static str,
    /// Why, for the peer (never contains secrets).
    pub text: String,
}

impl StreamError {
    /// A stream error with `condition` (RFC 6120 §4.9.3) and `text`.
    pub fn new(condition: &'static str, text: impl Into<String>) -> Self {
        StreamError { condition, text: text.into() }
    }
}

/// What the stream parser found.
#[derive(Debug)]
pub enum StreamEvent {
    /// The stream header (`<stream:stream ...>`, its attributes; no children).
    Open(Element),
    /// One complete top-level element (stanza, SASL, stream management, ...).
    Stanza(Element),
    /// `</stream:stream>`.
    Close,
}

/// The push parser of one TCP stream (RFC 6120). A new one is needed after each stream restart
/// (after SASL success, RFC 6120 §6.4.6; after STARTTLS, §5.4.3.3).
pub struct StreamParser {
    raw: RawParser,
    tree: TreeBuilder,
    /// Bytes of the stanza now being received (or of whitespace between stanzas).
    stanza_bytes: usize,
    /// Outside any markup at the top level (before the header, or between stanzas): only
    /// whitespace or a `<` may come. rxml buffers character data until the next `<`, so junk
    /// without one would otherwise only time out; it is refused as soon as it arrives.
    between: bool,
}

impl Default for StreamParser {
    fn default() -> Self {
        Self::new()
    }
}

impl StreamParser {
    /// A parser at the start of a stream.
    pub fn new() -> Self {
        // Names and attribute values up to 64 KiB (a body text longer than that is split into
        // several text events, which the tree builder joins).
        let opts = Options { max_token_length: 65_536, ..Options::default() };
        StreamParser { raw: <RawParser as WithOptions>::with_options(opts), tree: TreeBuilder::new(), stanza_bytes: 0, between: true }
    }

    /// Parses `data` (the next bytes of the stream), appending what it completes to `out`.
    /// `cap` is the largest stanza accepted, in bytes. An error is a stream error: the caller
    /// sends it and closes the stream.
    pub fn feed(&mut self, mut data: &[u8], cap: usize, out: &mut Vec<StreamEvent>) -> Result<(), StreamError> {
        loop {
            if self.between {
                match data.iter().find(|b| !b" \t\r\n".contains(b)) {
                    Some(b'<') => self.between = false,
                    Some(&b) => return Err(StreamError::new("not-well-formed", format!("text outside a stanza (byte 0x{b:02x})"))),
                    None => {}
                }
            }
            let before = data.len();
            let r = self.raw.parse(&mut data, false);
            self.stanza_bytes += before - data.len();
            if self.stanza_bytes > cap {
                return Err(StreamError::new("policy-violation", format!("stanza over {cap} bytes")));
            }
            let ev = match r {
                Err(EndOrError::NeedMoreData) => return Ok(()),
                Err(EndOrError::Error(e)) => return Err(StreamError::new("not-well-formed", e.to_string())),
                Ok(None) => {
                    out.push(StreamEvent::Close);
                    return Ok(());
                }
                Ok(Some(ev)) => ev,
            };
            self.event(ev, out)?;
        }
    }

    fn event(&mut self, ev: RawEvent, out: &mut Vec<StreamEvent>) -> Result<(), StreamError> {
        let depth = self.tree.depth();
        match &ev {
            // Whitespace between stanzas (keepalives, RFC 6120 §4.6.1): not kept.
            RawEvent::Text(_, t) if depth < 2 => {
                if !t.as_str().trim().is_empty() {
                    return Err(StreamError::new("not-well-formed", "text outside a stanza"));
                }
                self.stanza_bytes = 0;
                return Ok(());
            }
            RawEvent::ElementHeadOpen(..) if depth >= MAX_DEPTH => {
                return Err(StreamError::new("policy-violation", "elements nested too deep"));
            }
            _ => {}
        }
        let head_close = matches!(ev, RawEvent::ElementHeadClose(_));
        let foot = matches!(ev, RawEvent::ElementFoot(_));
        let decl = matches!(ev, RawEvent::XmlDeclaration(..));
        self.tree
            .process_event(ev)
            .map_err(|e| StreamError::new("not-well-formed", e.to_string()))?;
        let depth = self.tree.depth();
        // After these the lexer is outside markup at the top level (each ends with '>').
        if decl || ((head_close || foot) && depth <= 1) {
            self.between = true;
        }
        if head_close && depth == 1 {
            let Some(root) = self.tree.top() else { return Ok(()) };
            if root.name() != "stream" || root.ns() != NS_STREAMS {
                return Err(StreamError::new("invalid-namespace", "the stream must start with <stream:stream>"));
            }
            // RFC 6120 §4.8.3 and §4.9.3.10: a client stream's content namespace is
            // `jabber:client` (not `jabber:server`, nor none).
            if root.prefixes.get(&None).map(String::as_str) != Some(NS_CLIENT) {
                return Err(StreamError::new("invalid-namespace", "the content namespace of a client stream is jabber:client"));
            }
            out.push(StreamEvent::Open(root.clone()));
            self.stanza_bytes = 0;
        } else if foot && depth == 1 {
            if let Some(el) = self.tree.unshift_child() {
                out.push(StreamEvent::Stanza(el));
            }
            self.stanza_bytes = 0;
        } else if foot && depth == 0 {
            out.push(StreamEvent::Close);
        }
        Ok(())
    }
}

/// Parses one WebSocket message: RFC 7395 §3.3.3 makes every message one standalone XML
/// document holding exactly one element (`<open/>`, `<close/>` or a stanza), so a second element
/// or any text after the first makes the message no well-formed document of one element: the
/// stream error `not-well-formed` (RFC 6120 §4.9.3.13), then `<close/>`, never silence.
/// Unprefixed elements without a namespace declaration are read as `jabber:client`.
pub fn parse_frame(text: &str) -> Result<Element, StreamError> {
    let bad = |why: String| StreamError::new("not-well-formed", why);
    let mut tree = TreeBuilder::new().with_prefixes_stack(vec![NS_CLIENT.to_owned().into()]);
    let mut reader = rxml::RawReader::new(text.as_bytes());
    let mut root = None;
    loop {
        match reader.read() {
            Ok(Some(ev)) if root.is_none() => {
                tree.process_event(ev).map_err(|e| bad(e.to_string()))?;
                root = tree.root.take();
            }
            // rxml refuses what follows the root itself; this arm only keeps that promise local.
            Ok(Some(_)) => return Err(bad("one element per WebSocket message (RFC 7395 §3.3.3)".into())),
            Ok(None) => break,
            Err(e) if root.is_some() => return Err(bad(format!("one element per WebSocket message (RFC 7395 §3.3.3): {e}"))),
            Err(e) => return Err(bad(e.to_string())),
        }
    }
    root.ok_or_else(|| bad("an incomplete element".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(chunks: &[&[u8]], cap: usize) -> (Vec<StreamEvent>, Option<StreamError>) {
        let mut p = StreamParser::new();
        let mut out = Vec::new();
        for c in chunks {
            if let Err(e) = p.feed(c, cap, &mut out) {
                return (out, Some(e));
            }
        }
        (out, None)
    }

    const HEADER: &[u8] = b"<?xml version='1.0'?><stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' to='localhost' version='1.0'>";

    #[test]
    fn stanzas_split_across_reads_come_out_whole() {
        let doc = [HEADER, b"<message to='b@localhost' type='chat'><body>h\xc3\xa9", b"llo</body></mess", b"age> <iq id='1' type='get'/></stream:stream>"];
        let (out, err) = run(&doc, 1 << 16);
        assert!(err.is_none(), "{err:?}");
        assert!(matches!(out[0], StreamEvent::Open(_)));
        let StreamEvent::Stanza(m) = &out[1] else { panic!("{out:?}") };
        assert_eq!((m.name(), m.ns().as_str()), ("message", NS_CLIENT));
        assert_eq!(m.get_child("body", NS_CLIENT).map(|b| b.text()), Some("héllo".to_owned()));
        assert!(matches!(&out[2], StreamEvent::Stanza(i) if i.name() == "iq"));
        assert!(matches!(out[3], StreamEvent::Close));
    }

    #[test]
    fn byte_by_byte_is_the_same() {
        let mut doc = HEADER.to_vec();
        doc.extend_from_slice(b"<presence/>");
        let chunks: Vec<&[u8]> = doc.chunks(1).collect();
        let (out, err) = run(&chunks, 1 << 16);
        assert!(err.is_none());
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn dtd_entities_junk_and_huge_stanzas_are_stream_errors() {
        let (_, e) = run(&[b"<?xml version='1.0'?><!DOCTYPE x [<!ENTITY a 'b'>]><stream:stream/>"], 1 << 16);
        assert_eq!(e.map(|e| e.condition), Some("not-well-formed"));
        let (_, e) = run(&[HEADER, b"<message>&a;</message>"], 1 << 16);
        assert_eq!(e.map(|e| e.condition), Some("not-well-formed"));
        let (_, e) = run(&[HEADER, b"<message><</message>"], 1 << 16);
        assert_eq!(e.map(|e| e.condition), Some("not-well-formed"));
        let big = vec![b'a'; 5000];
        let (_, e) = run(&[HEADER, b"<message><body>", &big, &big], 4096);
        assert_eq!(e.map(|e| e.condition), Some("policy-violation"));
        let deep = "<a>".repeat(MAX_DEPTH + 2);
        let (_, e) = run(&[HEADER, deep.as_bytes()], 1 << 16);
        assert_eq!(e.map(|e| e.condition), Some("policy-violation"));
        let (_, e) = run(&[b"<html xmlns='x'>"], 1 << 16);
        assert_eq!(e.map(|e| e.condition), Some("invalid-namespace"));
    }

    #[test]
    fn text_outside_a_stanza_is_refused_at_once() {
        for junk in [&b"garbage"[..], b"\x00\x01\x02\xff", b"  hello world\n", b"\n x"] {
            let (_, e) = run(&[junk], 1 << 16);
            assert_eq!(e.map(|e| e.condition), Some("not-well-formed"), "{junk:?}");
            let (out, e) = run(&[HEADER, b"<presence/> ", junk], 1 << 16);
            assert_eq!(out.len(), 2);
            assert_eq!(e.map(|e| e.condition), Some("not-well-formed"), "{junk:?}");
        }
        // Whitespace keepalives and stanzas split anywhere still pass.
        let (out, e) = run(&[HEADER, b" \n ", b"<mess", b"age/>", b"  ", b"<presence/>"], 1 << 16);
        assert!(e.is_none(), "{e:?}");
        assert_eq!(out.len(), 3);
    }

    #[test]
    fn a_server_stream_namespace_is_refused() {
        let (_, e) = run(&[b"<?xml version='1.0'?><stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams' to='localhost' version='1.0'>"], 1 << 16);
        assert_eq!(e.map(|e| e.condition), Some("invalid-namespace"));
    }

    #[test]
    fn websocket_frames() {
        let open = parse_frame("<open xmlns='urn:ietf:params:xml:ns:xmpp-framing' to='localhost' version='1.0'/>").unwrap();
        assert_eq!(open.name(), "open");
        let m = parse_frame("<message to='b@localhost'><body>x</body></message>").unwrap();
        assert_eq!(m.ns(), NS_CLIENT);
        assert!(parse_frame("<!DOCTYPE a><a/>").is_err());
        assert!(parse_frame("<a>&ent;</a>").is_err());
        assert!(parse_frame("<a>").is_err());
        // Exactly one element per message: a second one or trailing text is an error.
        assert!(parse_frame("<presence/> \n").is_ok());
        for two in ["<presence/><presence/>", "<message><body>x</body></message><iq type='get' id='1'/>", "<presence/>junk", "<a/>&amp;"] {
            assert_eq!(parse_frame(two).map_err(|e| e.condition).err(), Some("not-well-formed"), "{two}");
        }
    }
}
