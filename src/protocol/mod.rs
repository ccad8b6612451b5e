//! The client protocol (PROTOCOL.md): wire types, ids, error and close codes, and the JSON and
//! postcard codecs.
//!
//! **Invariant:** this module does no I/O and never touches sled or actix. Bad input becomes a
//! [`codec::DecodeError`] value, never a panic.

pub mod client;
pub mod codec;
pub mod ids;
pub mod server;

use serde::{Deserialize, Serialize};

pub use client::{ClientFrame, Request, TypingState};
pub use codec::{DecodeError, Encoded, Encoding};
pub use ids::Conv;
pub use server::{
    ConversationItem, EventPayload, GroupAction, GroupView, MessageView, ReadMarkerView, ReceiptStatus,
    ReceiptView, ServerFrame,
};

/// Largest message body, in bytes of UTF-8 (PROTOCOL.md §5).
pub const MAX_BODY_BYTES: usize = 65_536;
/// Default and largest `history.limit`.
pub const HISTORY_DEFAULT_LIMIT: u64 = 50;
/// Largest `history.limit`.
pub const HISTORY_MAX_LIMIT: u64 = 200;
/// Most users in one `watch`.
pub const MAX_WATCH_USERS: usize = 1_000;
/// Longest group name, in chars.
pub const MAX_GROUP_NAME_CHARS: usize = 100;

/// The stable error codes of `error` frames and HTTP error bodies (PROTOCOL.md §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    BadFrame,
    Unauthorized,
    TooLarge,
    UnknownUser,
    NotMember,
    NotAdmin,
    RateLimited,
    Overloaded,
    Unavailable,
    Internal,
    NotFound,
    UserExists,
    RegistrationClosed,
}

impl ErrorCode {
    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::BadFrame => "bad_frame",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::UnknownUser => "unknown_user",
            ErrorCode::NotMember => "not_member",
            ErrorCode::NotAdmin => "not_admin",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
            ErrorCode::NotFound => "not_found",
            ErrorCode::UserExists => "user_exists",
            ErrorCode::RegistrationClosed => "registration_closed",
        }
    }
}

/// WebSocket close codes (PROTOCOL.md §5; 1000-1011 from RFC 6455 §7.4.1).
pub mod close {
    /// Normal closure.
    pub const NORMAL: u16 = 1000;
    /// Going away (shutdown, ping timeout).
    pub const GOING_AWAY: u16 = 1001;
    /// WebSocket framing error.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// Invalid UTF-8 in a text frame.
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// Frame too big.
    pub const TOO_BIG: u16 = 1009;
    /// Internal error (supervision intensity exceeded).
    pub const INTERNAL: u16 = 1011;
    /// Bad or revoked token.
    pub const UNAUTHORIZED: u16 = 4001;
    /// No `hello` in time.
    pub const HELLO_TIMEOUT: u16 = 4002;
    /// parley protocol violation.
    pub const VIOLATION: u16 = 4003;
    /// Slow consumer: the outbound queue overflowed.
    pub const SLOW_CONSUMER: u16 = 4008;
}
