//! Frames a client sends (PROTOCOL.md §3.2).
//!
//! JSON: `{"type": "<snake_case variant>", ...fields, "rid"?}`; unknown fields are ignored.
//! Binary (postcard 1.x): [`Request`] as a struct `(rid: Option<String>, frame: ClientFrame)`, the
//! frame as an externally tagged enum whose variant index is the position in this file (see
//! `docs/protocol.md`). The binary layout is produced by [`ClientFrameBin`], a mirror that the
//! compiler checks against [`ClientFrame`].

use serde::{Deserialize, Serialize};

/// `typing.state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TypingState {
    /// The user is writing.
    Composing,
    /// The user stopped writing.
    Paused,
}

/// One request: a frame plus the optional client-chosen request id `rid` (up to 64 chars) that
/// every reply echoes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    /// Echoed in every reply to this request. A `rid` that is not a string is ignored (JSON).
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "lenient_rid")]
    pub rid: Option<String>,
    /// The frame itself.
    #[serde(flatten)]
    pub frame: ClientFrame,
}

/// Reads `rid` as a string when it is one, and as absent otherwise (a number, an object...), so
/// a malformed `rid` never costs the client its request.
fn lenient_rid<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(match serde_json::Value::deserialize(d)? {
        serde_json::Value::String(s) => Some(s),
        _ => None,
    })
}

/// A client frame, tagged by `"type"` in JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    /// First frame: authenticate with a token, optionally resume after `cursor` (an ev).
    Hello {
        token: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cursor: Option<u64>,
    },
    /// Send `body` (1-65,536 bytes) to a user id or `g:<id>`; `id` (1-64 chars) makes resends idempotent.
    Send { id: String, to: String, body: String },
    /// Confirm events up to ev `up_to`: advances this device's cursor.
    Received { up_to: u64 },
    /// Mark `conv` read up to `seq`.
    Read { conv: String, seq: u64 },
    /// Typing indicator, relayed, never stored.
    Typing { conv: String, state: TypingState },
    /// Subscribe to presence of up to 1,000 users.
    Watch { users: Vec<String> },
    /// Unsubscribe from presence.
    Unwatch { users: Vec<String> },
    /// A page of `conv`'s messages with seq < `before` (newest page when absent), `limit` 1-200 (default 50).
    History {
        conv: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        before: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u64>,
    },
    /// The user's conversations, newest first.
    Conversations,
    /// Create a group named `name` (1-100 chars) with `members` (the creator is added).
    GroupCreate { name: String, members: Vec<String> },
    /// Add users to a group (admins only).
    GroupAdd { group: String, users: Vec<String> },
    /// Remove users from a group (admins only).
    GroupRemove { group: String, users: Vec<String> },
    /// Leave a group.
    GroupLeave { group: String },
    /// A group's name, members and admins.
    GroupInfo { group: String },
    /// Test-only fault injection (compiled only with the `fault-injection` feature): `what` =
    /// `"panic"` makes this session's handler panic; `"storage"` makes the next `count` commits fail
    /// as if the disk were full.
    #[cfg(feature = "fault-injection")]
    Fault {
        what: String,
        #[serde(default)]
        count: u32,
    },
}

/// The binary (postcard) layout of [`ClientFrame`]: externally tagged, every field present.
#[derive(Serialize, Deserialize)]
#[serde(remote = "ClientFrame")]
pub(crate) enum ClientFrameBin {
    Hello { token: String, cursor: Option<u64> },
    Send { id: String, to: String, body: String },
    Received { up_to: u64 },
    Read { conv: String, seq: u64 },
    Typing { conv: String, state: TypingState },
    Watch { users: Vec<String> },
    Unwatch { users: Vec<String> },
    History { conv: String, before: Option<u64>, limit: Option<u64> },
    Conversations,
    GroupCreate { name: String, members: Vec<String> },
    GroupAdd { group: String, users: Vec<String> },
    GroupRemove { group: String, users: Vec<String> },
    GroupLeave { group: String },
    GroupInfo { group: String },
    #[cfg(feature = "fault-injection")]
    Fault { what: String, count: u32 },
}

/// The binary layout of [`Request`].
#[derive(Serialize, Deserialize)]
pub(crate) struct RequestBin {
    pub rid: Option<String>,
    #[serde(with = "ClientFrameBin")]
    pub frame: ClientFrame,
}

impl ClientFrame {
    /// The frame's `type` in JSON, for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ClientFrame::Hello { .. } => "hello",
            ClientFrame::Send { .. } => "send",
            ClientFrame::Received { .. } => "received",
            ClientFrame::Read { .. } => "read",
            ClientFrame::Typing { .. } => "typing",
            ClientFrame::Watch { .. } => "watch",
            ClientFrame::Unwatch { .. } => "unwatch",
            ClientFrame::History { .. } => "history",
            ClientFrame::Conversations => "conversations",
            ClientFrame::GroupCreate { .. } => "group_create",
            ClientFrame::GroupAdd { .. } => "group_add",
            ClientFrame::GroupRemove { .. } => "group_remove",
            ClientFrame::GroupLeave { .. } => "group_leave",
            ClientFrame::GroupInfo { .. } => "group_info",
            #[cfg(feature = "fault-injection")]
            ClientFrame::Fault { .. } => "fault",
        }
    }
}
