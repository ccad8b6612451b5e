//! JSON (text frames) and postcard 1.x (binary frames) codecs for both directions.
//!
//! The server uses [`decode_request`] and [`encode_server`]; clients (tests, the load generator)
//! use [`encode_request`] and [`decode_server`].

use bytes::Bytes;

use super::client::{Request, RequestBin};
use super::server::{ServerFrame, ServerFrameBinRef, ServerFrameBinWrap};
use super::ErrorCode;

/// The encoding of a socket, chosen by the kind of its first frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// Text frames of UTF-8 JSON.
    Json,
    /// Binary frames of postcard 1.x.
    Postcard,
}

/// An encoded frame, ready for the socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Encoded {
    /// For a text frame.
    Text(String),
    /// For a binary frame.
    Binary(Bytes),
}

impl Encoded {
    /// Size in bytes of the payload.
    pub fn len(&self) -> usize {
        match self {
            Encoded::Text(s) => s.len(),
            Encoded::Binary(b) => b.len(),
        }
    }

    /// Whether the payload is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A frame that could not be decoded: the `error` to answer with, and the `rid`/`id` it echoes
/// when they could still be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    /// `bad_frame` for anything not a well-formed frame.
    pub code: ErrorCode,
    /// Human-readable reason.
    pub message: String,
    /// The request's `rid`, if readable.
    pub rid: Option<String>,
    /// The send's `id`, if readable.
    pub id: Option<String>,
}

/// Decodes a client frame from a text frame (JSON).
///
/// Errors: `bad_frame` for invalid JSON, a non-object, an unknown `type`, or a missing or wrongly
/// typed field. Deeply nested input is refused by serde_json's recursion limit, not the stack.
pub fn decode_request_json(text: &str) -> Result<Request, DecodeError> {
    /// `type` alone. serde's tagged enums also take a variant's index (`"type": 2`) for its name;
    /// PROTOCOL.md says a string, so a number is refused, before the fields of "variant 2" are
    /// asked for. Missing or `null`, it is left to the frame's own error.
    #[derive(serde::Deserialize)]
    struct TypeTag<'a> {
        #[serde(rename = "type", borrow, default)]
        _kind: Option<std::borrow::Cow<'a, str>>,
    }
    let type_error = || serde_json::from_str::<TypeTag>(text).is_err_and(|e| e.is_data()).then(|| "`type` must be a string naming the frame".to_owned());
    let parsed = match serde_json::from_str::<Request>(text) {
        Ok(r) => type_error().map_or(Ok(r), Err),
        Err(e) => Err(type_error().unwrap_or_else(|| e.to_string())),
    };
    parsed.map_err(|e| {
        // Error path only: salvage rid/id so the error can name the request.
        let v: Option<serde_json::Value> = serde_json::from_str(text).ok();
        let field = |k: &str| {
            v.as_ref()
                .and_then(|v| v.get(k))
                .and_then(|x| x.as_str())
                .filter(|s| super::ids::valid_client_id(s))
                .map(str::to_owned)
        };
        let message = if v.as_ref().is_some_and(|v| !v.is_object()) {
            "a frame must be a JSON object".to_owned()
        } else {
            format!("malformed frame: {e}")
        };
        DecodeError { code: ErrorCode::BadFrame, message, rid: field("rid"), id: field("id") }
    })
}

/// Decodes a client frame from a binary frame (postcard). Trailing bytes are an error.
pub fn decode_request_postcard(bytes: &[u8]) -> Result<Request, DecodeError> {
    match postcard::take_from_bytes::<RequestBin>(bytes) {
        Ok((r, rest)) if rest.is_empty() => Ok(Request { rid: r.rid, frame: r.frame }),
        Ok(_) => Err(bad("trailing bytes after the frame")),
        Err(e) => Err(bad(&format!("malformed binary frame: {e}"))),
    }
}

fn bad(msg: &str) -> DecodeError {
    DecodeError { code: ErrorCode::BadFrame, message: msg.to_owned(), rid: None, id: None }
}

/// Encodes a server frame in the socket's encoding.
pub fn encode_server(frame: &ServerFrame, enc: Encoding) -> Encoded {
    match enc {
        // Serializing these owned types to JSON cannot fail (no non-string map keys, no floats).
        Encoding::Json => Encoded::Text(serde_json::to_string(frame).unwrap_or_default()),
        Encoding::Postcard => Encoded::Binary(Bytes::from(
            postcard::to_allocvec(&ServerFrameBinRef(frame)).unwrap_or_default(),
        )),
    }
}

/// Encodes a client request (for clients: tests, the load generator).
pub fn encode_request(req: &Request, enc: Encoding) -> Encoded {
    match enc {
        Encoding::Json => Encoded::Text(serde_json::to_string(req).unwrap_or_default()),
        Encoding::Postcard => Encoded::Binary(Bytes::from(
            postcard::to_allocvec(&RequestBin { rid: req.rid.clone(), frame: req.frame.clone() })
                .unwrap_or_default(),
        )),
    }
}

/// Decodes a server frame (for clients).
pub fn decode_server_json(text: &str) -> Result<ServerFrame, DecodeError> {
    serde_json::from_str(text).map_err(|e| bad(&format!("malformed server frame: {e}")))
}

/// Decodes a binary server frame (for clients).
pub fn decode_server_postcard(bytes: &[u8]) -> Result<ServerFrame, DecodeError> {
    postcard::from_bytes::<ServerFrameBinWrap>(bytes)
        .map(|w| w.0)
        .map_err(|e| bad(&format!("malformed binary server frame: {e}")))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::protocol::client::{ClientFrame, TypingState};
    use crate::protocol::server::*;

    fn msg() -> MessageView {
        MessageView { conv: "dm:alice:bob".into(), seq: 7, id: "m-1".into(), from: "alice".into(), body: "שלום 😀 \"q\"\n".into(), ts: 1_700_000_000_123 }
    }

    /// One of every client frame (with and without optional fields).
    fn client_frames() -> Vec<Request> {
        let frames = vec![
            ClientFrame::Hello { token: "t0k".into(), cursor: None },
            ClientFrame::Hello { token: "t0k".into(), cursor: Some(42) },
            ClientFrame::Send { id: "m1".into(), to: "bob".into(), body: "héllo 你好".into() },
            ClientFrame::Received { up_to: 9 },
            ClientFrame::Read { conv: "dm:a:b".into(), seq: 3 },
            ClientFrame::Typing { conv: "g:abc".into(), state: TypingState::Composing },
            ClientFrame::Typing { conv: "g:abc".into(), state: TypingState::Paused },
            ClientFrame::Watch { users: vec!["a".into(), "b".into()] },
            ClientFrame::Unwatch { users: vec![] },
            ClientFrame::History { conv: "dm:a:b".into(), before: None, limit: None },
            ClientFrame::History { conv: "dm:a:b".into(), before: Some(10), limit: Some(200) },
            ClientFrame::Conversations,
            ClientFrame::GroupCreate { name: "Family 👪".into(), members: vec!["b".into()] },
            ClientFrame::GroupAdd { group: "g:x".into(), users: vec!["c".into()] },
            ClientFrame::GroupRemove { group: "g:x".into(), users: vec!["c".into()] },
            ClientFrame::GroupLeave { group: "g:x".into() },
            ClientFrame::GroupInfo { group: "g:x".into() },
        ];
        let mut out = Vec::new();
        for f in frames {
            out.push(Request { rid: None, frame: f.clone() });
            out.push(Request { rid: Some("r-1".into()), frame: f });
        }
        out
    }

    /// One of every server frame and event kind.
    fn server_frames() -> Vec<ServerFrame> {
        let ev = |payload| ServerFrame::Event { ev: 5, payload };
        vec![
            ServerFrame::Welcome { user: "alice".into(), device: "web".into(), head: 3, server_time: 1_700_000_000_000 },
            ServerFrame::Synced { head: 3 },
            ServerFrame::Ack { rid: None, id: "m1".into(), conv: "dm:a:b".into(), seq: 1, ts: 2 },
            ServerFrame::Ack { rid: Some("r".into()), id: "m1".into(), conv: "dm:a:b".into(), seq: 1, ts: 2 },
            ev(EventPayload::Message(msg())),
            ev(EventPayload::Receipt(ReceiptView { conv: "dm:a:b".into(), by: "b".into(), status: ReceiptStatus::Delivered, up_to: 4 })),
            ev(EventPayload::Receipt(ReceiptView { conv: "dm:a:b".into(), by: "b".into(), status: ReceiptStatus::Read, up_to: 4 })),
            ev(EventPayload::Group(GroupView { group: "g:x".into(), action: GroupAction::Created, users: vec!["a".into()], by: "a".into() })),
            ev(EventPayload::Group(GroupView { group: "g:x".into(), action: GroupAction::Added, users: vec![], by: "a".into() })),
            ev(EventPayload::Group(GroupView { group: "g:x".into(), action: GroupAction::Removed, users: vec![], by: "a".into() })),
            ev(EventPayload::Group(GroupView { group: "g:x".into(), action: GroupAction::Left, users: vec![], by: "a".into() })),
            ev(EventPayload::ReadMarker(ReadMarkerView { conv: "g:x".into(), seq: 9 })),
            ServerFrame::Typing { conv: "dm:a:b".into(), from: "a".into(), state: TypingState::Composing },
            ServerFrame::Presence { user: "a".into(), online: true, last_seen: None },
            ServerFrame::Presence { user: "a".into(), online: false, last_seen: Some(17) },
            ServerFrame::History { rid: Some("r".into()), conv: "dm:a:b".into(), messages: vec![msg(), msg()], more: true, deleted_upto: None },
            ServerFrame::History { rid: None, conv: "dm:a:b".into(), messages: vec![], more: false, deleted_upto: Some(12) },
            ServerFrame::Conversations {
                rid: None,
                items: vec![
                    ConversationItem { conv: "dm:a:b".into(), last_seq: 7, read_seq: 2, unread: 5, last: Some(msg()) },
                    ConversationItem { conv: "g:x".into(), last_seq: 0, read_seq: 0, unread: 0, last: None },
                ],
            },
            ServerFrame::Result { rid: Some("r".into()), group: Some("g:x".into()), name: None, members: None, admins: None },
            ServerFrame::Result {
                rid: Some("r".into()),
                group: Some("g:x".into()),
                name: Some("n".into()),
                members: Some(vec!["a".into(), "b".into()]),
                admins: Some(vec!["a".into()]),
            },
            ServerFrame::error(ErrorCode::NotMember, "no", Some("r".into()), None),
            ServerFrame::error(ErrorCode::TooLarge, "big", None, Some("m1".into())),
            ServerFrame::Goaway { reason: "restart".into(), retry_after_ms: 1500 },
        ]
    }

    fn decode_request(e: &Encoded) -> Result<Request, DecodeError> {
        match e {
            Encoded::Text(s) => decode_request_json(s),
            Encoded::Binary(b) => decode_request_postcard(b),
        }
    }

    fn decode_server(e: &Encoded) -> Result<ServerFrame, DecodeError> {
        match e {
            Encoded::Text(s) => decode_server_json(s),
            Encoded::Binary(b) => decode_server_postcard(b),
        }
    }

    #[test]
    fn every_client_frame_round_trips_in_both_encodings() {
        for enc in [Encoding::Json, Encoding::Postcard] {
            for r in client_frames() {
                let e = encode_request(&r, enc);
                assert!(!e.is_empty());
                assert_eq!(decode_request(&e).unwrap(), r, "{enc:?} {e:?}");
            }
        }
    }

    #[test]
    fn every_server_frame_round_trips_in_both_encodings() {
        for enc in [Encoding::Json, Encoding::Postcard] {
            for f in server_frames() {
                let e = encode_server(&f, enc);
                assert_eq!(decode_server(&e).unwrap(), f, "{enc:?} {e:?}");
            }
        }
    }

    #[test]
    fn json_shapes_follow_the_protocol() {
        let v: serde_json::Value = serde_json::from_str(match &encode_server(&server_frames()[4], Encoding::Json) {
            Encoded::Text(s) => s,
            Encoded::Binary(_) => unreachable!(),
        })
        .unwrap();
        assert_eq!(v["type"], "event");
        assert_eq!(v["kind"], "message");
        assert_eq!(v["ev"], 5);
        assert_eq!(v["message"]["body"], "שלום 😀 \"q\"\n");
        let Encoded::Text(s) = encode_server(&ServerFrame::error(ErrorCode::BadFrame, "x", None, None), Encoding::Json) else { unreachable!() };
        assert_eq!(s, r#"{"type":"error","code":"bad_frame","message":"x"}"#);
        let Encoded::Text(s) = encode_server(&ServerFrame::Presence { user: "a".into(), online: false, last_seen: None }, Encoding::Json) else {
            unreachable!()
        };
        assert_eq!(s, r#"{"type":"presence","user":"a","online":false,"last_seen":null}"#);
        // Non-ASCII is sent as itself, not \u escapes.
        assert!(!s.contains("\\u"));
    }

    #[test]
    fn json_requests_as_clients_write_them() {
        let r = decode_request_json(r#"{"type":"send","id":"x","to":"bob","body":"hi","extra":[1,2],"rid":"q"}"#).unwrap();
        assert_eq!(r.rid.as_deref(), Some("q"));
        assert_eq!(r.frame, ClientFrame::Send { id: "x".into(), to: "bob".into(), body: "hi".into() });
        let r = decode_request_json(r#"{"type":"conversations","rid":"z"}"#).unwrap();
        assert_eq!(r.frame, ClientFrame::Conversations);
        assert_eq!(r.rid.as_deref(), Some("z"));
    }

    #[test]
    fn a_rid_that_is_not_a_string_is_ignored() {
        let r = decode_request_json(r#"{"type":"history","rid":7,"conv":"dm:a:b"}"#).unwrap();
        assert_eq!(r.rid, None);
        assert!(matches!(r.frame, ClientFrame::History { .. }));
        let r = decode_request_json(r#"{"type":"conversations","rid":{"x":1}}"#).unwrap();
        assert_eq!(r.rid, None);
    }

    #[test]
    fn malformed_json_is_bad_frame_with_echoes() {
        for bad in ["not json", "{", "[1,2,3]", "42", r#"{"type":"no_such_type"}"#, r#"{"no_type":true}"#, &"[".repeat(100_000)] {
            let e = decode_request_json(bad).unwrap_err();
            assert_eq!(e.code, ErrorCode::BadFrame, "{bad:.40}");
        }
        let e = decode_request_json(r#"{"type":"send","to":null,"body":123,"id":"e1","rid":"r9"}"#).unwrap_err();
        assert_eq!((e.id.as_deref(), e.rid.as_deref()), (Some("e1"), Some("r9")));
    }

    #[test]
    fn a_type_that_is_a_number_is_not_taken_for_a_variant_index() {
        // serde's derive would read 2 as the third variant, `received`.
        let e = decode_request_json(r#"{"type":2,"up_to":5,"rid":"r1"}"#).unwrap_err();
        assert_eq!((e.code, e.rid.as_deref()), (ErrorCode::BadFrame, Some("r1")));
        assert!(e.message.contains("`type` must be a string"), "{}", e.message);
        let e = decode_request_json(r#"{"type":1,"id":"m1","to":"bob","body":"hi"}"#).unwrap_err();
        assert_eq!(e.id.as_deref(), Some("m1"), "the send's id is still echoed");
        // Without the fields of the variant it would be read as, the same reason.
        for text in [r#"{"type":1}"#, r#"{"type":1,"id":"q"}"#, r#"{"type":42}"#, r#"{"type":true}"#, r#"{"type":["send"]}"#] {
            let e = decode_request_json(text).unwrap_err();
            assert!(e.message.contains("`type` must be a string"), "{text}: {}", e.message);
        }
        assert!(decode_request_json(r#"{"up_to":1}"#).unwrap_err().message.contains("type"), "a missing type keeps serde's reason");
        // An escaped name is still a name.
        let r = decode_request_json(r#"{"type":"rec\u0065ived","up_to":5}"#).unwrap();
        assert_eq!(r.frame, ClientFrame::Received { up_to: 5 });
    }

    #[test]
    fn trailing_binary_bytes_are_refused() {
        let Encoded::Binary(b) = encode_request(&client_frames()[3], Encoding::Postcard) else { unreachable!() };
        let mut v = b.to_vec();
        v.push(0);
        assert!(decode_request_postcard(&v).is_err());
    }

    /// Pins the binary layout documented in docs/protocol.md.
    #[test]
    fn postcard_layout_is_the_documented_one() {
        let bin = |f: &ServerFrame| match encode_server(f, Encoding::Postcard) {
            Encoded::Binary(b) => b.to_vec(),
            Encoded::Text(_) => unreachable!(),
        };
        // Synced = variant 1; head 300 = varint AC 02.
        assert_eq!(bin(&ServerFrame::Synced { head: 300 }), [1, 0xAC, 0x02]);
        // Error = variant 9; code not_member = 5; message "x"; rid None; id Some("m").
        assert_eq!(bin(&ServerFrame::error(ErrorCode::NotMember, "x", None, Some("m".into()))), [9, 5, 1, b'x', 0, 1, 1, b'm']);
        // Event = 3, ev 2, payload ReadMarker = 3 {conv "g:a", seq 4}.
        let f = ServerFrame::Event { ev: 2, payload: EventPayload::ReadMarker(ReadMarkerView { conv: "g:a".into(), seq: 4 }) };
        assert_eq!(bin(&f), [3, 2, 3, 3, b'g', b':', b'a', 4]);
        // Request: rid Some("r"), Received = variant 2, up_to 5.
        let r = Request { rid: Some("r".into()), frame: ClientFrame::Received { up_to: 5 } };
        let Encoded::Binary(b) = encode_request(&r, Encoding::Postcard) else { unreachable!() };
        assert_eq!(b.to_vec(), [1, 1, b'r', 2, 5]);
        // Hello = variant 0: rid None, token "t", cursor None.
        let r = Request { rid: None, frame: ClientFrame::Hello { token: "t".into(), cursor: None } };
        let Encoded::Binary(b) = encode_request(&r, Encoding::Postcard) else { unreachable!() };
        assert_eq!(b.to_vec(), [0, 0, 1, b't', 0]);
    }

    proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_request_postcard(&bytes);
            if let Ok(s) = std::str::from_utf8(&bytes) {
                let _ = decode_request_json(s);
            }
        }

        /// Mutation fuzzing: valid frames of every kind, in both encodings, with bytes flipped,
        /// inserted and cut. The decoders must return a value or an error, never panic.
        #[test]
        fn mutated_frames_never_panic(
            pick in 0usize..64,
            binary in any::<bool>(),
            edits in proptest::collection::vec((any::<u16>(), any::<u8>(), 0u8..3), 1..8),
        ) {
            let frames = client_frames();
            let r = &frames[pick % frames.len()];
            let mut bytes = match encode_request(r, if binary { Encoding::Postcard } else { Encoding::Json }) {
                Encoded::Text(s) => s.into_bytes(),
                Encoded::Binary(b) => b.to_vec(),
            };
            for (pos, byte, op) in edits {
                let i = pos as usize % (bytes.len() + 1);
                match op {
                    0 if i < bytes.len() => bytes[i] ^= byte | 1,
                    1 => bytes.insert(i, byte),
                    _ => bytes.truncate(i),
                }
            }
            let _ = decode_request_postcard(&bytes);
            if let Ok(s) = std::str::from_utf8(&bytes) {
                let _ = decode_request_json(s);
            }
            let _ = decode_server_postcard(&bytes);
        }

        #[test]
        fn send_bodies_round_trip(body in "\\PC{0,200}", id in "[a-z0-9]{1,64}") {
            let r = Request { rid: None, frame: ClientFrame::Send { id, to: "bob".into(), body } };
            for enc in [Encoding::Json, Encoding::Postcard] {
                prop_assert_eq!(&decode_request(&encode_request(&r, enc)).unwrap(), &r);
            }
        }
    }
}
