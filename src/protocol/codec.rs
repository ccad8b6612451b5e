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
    serde_json::from_str::<Request>(text).map_err(|e| {
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
