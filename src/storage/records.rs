//! Stored formats: log commands and sled values. Separate from the wire types on purpose
//! (STYLE habit 6): a change of the protocol must not silently change what is on disk.
//!
//! Every encoded value starts with a version byte ([`FORMAT_VERSION`]) followed by postcard 1.x.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::StorageError;

/// Version byte in front of every log payload and sled value.
pub const FORMAT_VERSION: u8 = 1;

/// SHA-256 of a session token; tokens themselves are never stored.
pub type TokenHash = [u8; 32];

/// One state-changing command. Everything apply needs is in it (no clock, no randomness).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Create `user` with an argon2 PHC string.
    Register { user: String, password_hash: String },
    /// Store a new token for `(user, device)`.
    Login { token_hash: TokenHash, user: String, device: String },
    /// Revoke a token.
    Logout { token_hash: TokenHash },
    /// A message from `from` (sent by `device`) to `conv` (`dm:a:b` or `g:<id>`).
    Send { from: String, device: String, id: String, conv: String, body: String },
    /// `device` of `user` confirmed events up to `up_to`.
    Received { user: String, device: String, up_to: u64 },
    /// `user` read `conv` up to `seq`.
    Read { user: String, conv: String, seq: u64 },
    /// Create group `group` (id chosen before the log) named `name`, at most `cap` members.
    GroupCreate { group: String, by: String, name: String, members: Vec<String>, cap: u32 },
    /// Add `users` to `group`, keeping at most `cap` members.
    GroupAdd { group: String, by: String, users: Vec<String>, cap: u32 },
    /// Remove `users` from `group`.
    GroupRemove { group: String, by: String, users: Vec<String> },
    /// `by` leaves `group`.
    GroupLeave { group: String, by: String },
    /// Administrator: delete `user` (tokens revoked, groups left, the id kept as a tombstone).
    DeleteUser { user: String },
    /// Administrator: set `user`'s password hash and revoke every token of the user.
    SetPassword { user: String, password_hash: String },
    /// Retention: delete up to `max` messages that `policy` allows, oldest first, visiting
    /// conversations in key order from `from` (inclusive).
    Purge { policy: PurgePolicy, max: u32, from: String },
    /// Store `user`'s SCRAM verifiers (RFC 5802 / RFC 7677), submitted right after `Register`
    /// and `SetPassword`, and after a PLAIN login of a user that has none yet (the XMPP gateway).
    /// Appended last: postcard encodes the variant index, so older logs stay readable.
    SetScram { user: String, scram: ScramRecord },
}

/// One SCRAM verifier (RFC 5802 §3): the salt, the PBKDF2 iteration count and
/// `SaltedPassword = Hi(password, salt, i)`, which is what the `sasl` crate's server needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScramVerifier {
    pub salt: Vec<u8>,
    pub iterations: u32,
    pub salted_password: Vec<u8>,
}

/// `user_scram` value: the user's verifiers for SCRAM-SHA-1 (RFC 5802) and SCRAM-SHA-256 (RFC 7677).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScramRecord {
    pub sha1: ScramVerifier,
    pub sha256: ScramVerifier,
}

/// What a [`Command::Purge`] may delete.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PurgePolicy {
    /// Messages accepted before `ts` (ms).
    Before { ts: u64 },
    /// Messages that reached every device of every member.
    Delivered,
}

/// One log entry's payload: a batch of commands accepted together at `ts` (ms since the epoch).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    /// Server time of the batch, chosen before the entry enters the log; never decreases.
    pub ts: u64,
    /// The commands, applied in this order.
    pub commands: Vec<Command>,
}

/// `users` value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    /// argon2id PHC string.
    pub password_hash: String,
    /// Registration time, ms.
    pub created: u64,
    /// Deleted by an administrator: cannot log in, and the id is never given out again.
    pub deleted: bool,
}

/// `tokens` value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub user: String,
    pub device: String,
    /// Login time, ms.
    pub created: u64,
}

/// `user_ev_event` value: small references, not copies of message bodies (fan-out on write).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventRecord {
    /// Message `seq` of `conv` from `from` (the body is read from `conv_seq_message`).
    Message { conv: String, seq: u64, from: String },
    /// Receipt: `by` reached `status` (0 delivered, 1 read) up to `up_to` in `conv`.
    Receipt { conv: String, by: String, status: u8, up_to: u64 },
    /// Group membership change; `action`: 0 created, 1 added, 2 removed, 3 left.
    Group { group: String, action: u8, users: Vec<String>, by: String },
    /// This user read `conv` up to `seq`.
    ReadMarker { conv: String, seq: u64 },
}

/// `conv_seq_message` value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageRecord {
    pub id: String,
    pub from: String,
    pub body: String,
    pub ts: u64,
}

/// `conv_meta` value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConvMeta {
    /// Latest seq (0: none yet).
    pub last_seq: u64,
    /// ts of the latest message.
    pub last_ts: u64,
    /// Highest seq deleted by retention (0: none); messages `purged_to+1 ..= last_seq` remain.
    pub purged_to: u64,
    /// Log order of the latest message (or of the group's creation): entry index × 2^24 +
    /// position in the entry. Orders the conversation list exactly as the server accepted.
    pub last_order: u64,
}

/// `sender_id_ack` value: the original ack of `(from, id)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AckRecord {
    pub conv: String,
    pub seq: u64,
    pub ts: u64,
}

/// `user_conv_state` value: one user's view of one conversation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserConvRecord {
    /// Read marker (seq).
    pub read_seq: u64,
    /// Highest seq delivered to any device of this user (for `delivered` receipts).
    pub delivered_seq: u64,
    /// Other users' messages with seq > read_seq.
    pub unread: u64,
    /// First seq this user may see (1 for dms; the join point for groups).
    pub visible_from: u64,
    /// Last seq this user may see, once it left or was removed from a group.
    pub visible_to: Option<u64>,
    /// Highest seq that reached *every* device of this user (for the `delivered` retention).
    pub all_devices_seq: u64,
    /// The conversation's `last_order` when this user left it (orders its conversation list).
    pub left_order: u64,
}

/// `groups` value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRecord {
    pub name: String,
    /// Current members in order of joining (longest-standing first).
    pub members: Vec<Member>,
    pub created: u64,
}

/// A group member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub user: String,
    pub admin: bool,
}

/// Encodes a stored value: version byte, then postcard.
pub fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, StorageError> {
    postcard::to_extend(v, vec![FORMAT_VERSION]).map_err(|e| StorageError::Encode(e.to_string()))
}

/// Decodes a stored value written by [`encode`].
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StorageError> {
    match bytes.split_first() {
        Some((&FORMAT_VERSION, rest)) => {
            postcard::from_bytes(rest).map_err(|e| StorageError::Decode(e.to_string()))
        }
        Some((v, _)) => Err(StorageError::Decode(format!("unknown format version {v}"))),
        None => Err(StorageError::Decode("empty value".into())),
    }
}
