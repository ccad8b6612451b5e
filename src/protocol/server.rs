//! Frames the server sends (PROTOCOL.md §3.3).
//!
//! JSON: `{"type": "<snake_case variant>", ...fields}`; optional echo fields (`rid`, `id`) are
//! omitted when absent. Binary (postcard 1.x): externally tagged by variant index, every field
//! present, through [`ServerFrameBin`] (see `docs/protocol.md`).

use serde::de::Error as _;
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::client::TypingState;
use super::ErrorCode;

/// A message as clients see it (`event.message`, `history.messages`, `conversations.items[].last`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageView {
    /// `dm:a:b` or `g:<id>`.
    pub conv: String,
    /// Position in the conversation, from 1, gapless.
    pub seq: u64,
    /// The sender's client message id.
    pub id: String,
    /// The sender's user id.
    pub from: String,
    /// The text, 1-65,536 bytes of UTF-8.
    pub body: String,
    /// Server time of acceptance, ms since the Unix epoch.
    pub ts: u64,
}

/// `receipt.status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReceiptStatus {
    /// Reached a device of `by`.
    Delivered,
    /// Read by `by`.
    Read,
}

/// `event.receipt`: every message of the event's user in `conv` with seq <= `up_to` reached
/// `status` for user `by`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiptView {
    pub conv: String,
    pub by: String,
    pub status: ReceiptStatus,
    pub up_to: u64,
}

/// `group.action`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupAction {
    Created,
    Added,
    Removed,
    Left,
}

/// `event.group`: a membership change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupView {
    /// `g:<id>`.
    pub group: String,
    pub action: GroupAction,
    pub users: Vec<String>,
    pub by: String,
}

/// `event.read_marker`: this user read `conv` up to `seq`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadMarkerView {
    pub conv: String,
    pub seq: u64,
}

/// The payload of an `event` frame. JSON: `"kind": "<k>", "<k>": {...}` beside `ev`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventPayload {
    Message(MessageView),
    Receipt(ReceiptView),
    Group(GroupView),
    ReadMarker(ReadMarkerView),
}

#[derive(Serialize, Deserialize)]
#[serde(remote = "EventPayload")]
enum EventPayloadBin {
    Message(MessageView),
    Receipt(ReceiptView),
    Group(GroupView),
    ReadMarker(ReadMarkerView),
}

impl EventPayload {
    /// The JSON `kind`.
    pub fn kind(&self) -> &'static str {
        match self {
            EventPayload::Message(_) => "message",
            EventPayload::Receipt(_) => "receipt",
            EventPayload::Group(_) => "group",
            EventPayload::ReadMarker(_) => "read_marker",
        }
    }
}

impl Serialize for EventPayload {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if !s.is_human_readable() {
            return EventPayloadBin::serialize(self, s);
        }
        let mut m = s.serialize_map(Some(2))?;
        m.serialize_entry("kind", self.kind())?;
        match self {
            EventPayload::Message(v) => m.serialize_entry("message", v)?,
            EventPayload::Receipt(v) => m.serialize_entry("receipt", v)?,
            EventPayload::Group(v) => m.serialize_entry("group", v)?,
            EventPayload::ReadMarker(v) => m.serialize_entry("read_marker", v)?,
        }
        m.end()
    }
}

impl<'de> Deserialize<'de> for EventPayload {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if !d.is_human_readable() {
            return EventPayloadBin::deserialize(d);
        }
        #[derive(Deserialize)]
        struct Json {
            kind: String,
            message: Option<MessageView>,
            receipt: Option<ReceiptView>,
            group: Option<GroupView>,
            read_marker: Option<ReadMarkerView>,
        }
        let j = Json::deserialize(d)?;
        let missing = || D::Error::custom(format!("event of kind {} without its object", j.kind));
        Ok(match j.kind.as_str() {
            "message" => EventPayload::Message(j.message.clone().ok_or_else(missing)?),
            "receipt" => EventPayload::Receipt(j.receipt.clone().ok_or_else(missing)?),
            "group" => EventPayload::Group(j.group.clone().ok_or_else(missing)?),
            "read_marker" => EventPayload::ReadMarker(j.read_marker.clone().ok_or_else(missing)?),
            other => return Err(D::Error::custom(format!("unknown event kind {other}"))),
        })
    }
}

/// One entry of a `conversations` reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConversationItem {
    pub conv: String,
    /// The conversation's latest seq (that this user may see).
    pub last_seq: u64,
    /// This user's read marker.
    pub read_seq: u64,
    /// Other users' messages with seq > `read_seq`.
    pub unread: u64,
    /// The latest message, or null.
    pub last: Option<MessageView>,
}

/// A server frame, tagged by `"type"` in JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    /// Reply to `hello`: `head` is the user's latest ev; `server_time` in ms since the epoch.
    Welcome { user: String, device: String, head: u64, server_time: u64 },
    /// The backlog up to `head` has been sent.
    Synced { head: u64 },
    /// The message `id` is durable as `seq` of `conv`, accepted at `ts` (ms).
    Ack {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rid: Option<String>,
        id: String,
        conv: String,
        seq: u64,
        ts: u64,
    },
    /// An event of the user's stream at position `ev`.
    Event {
        ev: u64,
        #[serde(flatten)]
        payload: EventPayload,
    },
    /// `from` is typing (or stopped) in `conv`.
    Typing { conv: String, from: String, state: TypingState },
    /// `user`'s presence; `last_seen` in ms, null if never seen.
    Presence { user: String, online: bool, last_seen: Option<u64> },
    /// A page of `conv` in ascending seq; `more`: older messages exist. `deleted_upto` (an
    /// extension, absent unless it applies): the page reached messages that retention deleted,
    /// every seq up to this one.
    History {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rid: Option<String>,
        conv: String,
        messages: Vec<MessageView>,
        more: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        deleted_upto: Option<u64>,
    },
    /// The user's conversations, newest first.
    Conversations {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rid: Option<String>,
        items: Vec<ConversationItem>,
    },
    /// Success of a group request; fields depend on the request.
    Result {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rid: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        group: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        members: Option<Vec<String>>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        admins: Option<Vec<String>>,
    },
    /// A request failed; `rid` or `id` name the request it answers.
    Error {
        code: ErrorCode,
        message: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rid: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
    },
    /// The server is about to close with 1001; reconnect after `retry_after_ms`.
    Goaway { reason: String, retry_after_ms: u64 },
}

/// The binary (postcard) layout of [`ServerFrame`].
#[derive(Serialize, Deserialize)]
#[serde(remote = "ServerFrame")]
pub(crate) enum ServerFrameBin {
    Welcome { user: String, device: String, head: u64, server_time: u64 },
    Synced { head: u64 },
    Ack { rid: Option<String>, id: String, conv: String, seq: u64, ts: u64 },
    Event { ev: u64, payload: EventPayload },
    Typing { conv: String, from: String, state: TypingState },
    Presence { user: String, online: bool, last_seen: Option<u64> },
    History { rid: Option<String>, conv: String, messages: Vec<MessageView>, more: bool, deleted_upto: Option<u64> },
    Conversations { rid: Option<String>, items: Vec<ConversationItem> },
    Result {
        rid: Option<String>,
        group: Option<String>,
        name: Option<String>,
        members: Option<Vec<String>>,
        admins: Option<Vec<String>>,
    },
    Error { code: ErrorCode, message: String, rid: Option<String>, id: Option<String> },
    Goaway { reason: String, retry_after_ms: u64 },
}

/// Wrapper that gives [`ServerFrame`] its binary layout under serde.
#[derive(Serialize, Deserialize)]
pub(crate) struct ServerFrameBinWrap(#[serde(with = "ServerFrameBin")] pub ServerFrame);

/// Borrowing wrapper for encoding without a copy.
pub(crate) struct ServerFrameBinRef<'a>(pub &'a ServerFrame);

impl Serialize for ServerFrameBinRef<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        ServerFrameBin::serialize(self.0, s)
    }
}

impl ServerFrame {
    /// An `error` frame answering a request (`rid`) or a send (`id`).
    pub fn error(code: ErrorCode, message: impl Into<String>, rid: Option<String>, id: Option<String>) -> Self {
        ServerFrame::Error { code, message: message.into(), rid, id }
    }
}
