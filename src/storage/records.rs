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

/// `user_conv_state` value: one user's view of one conversation. Stored as version
/// [`USER_CONV_VERSION`] ([`encode_user_conv`]); records of version 1 held an eager unread
/// count instead of `own_after_read` and are converted when read ([`decode_user_conv`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserConvRecord {
    /// Read marker (seq).
    pub read_seq: u64,
    /// Highest seq delivered to any device of this user (for `delivered` receipts).
    pub delivered_seq: u64,
    /// This user's own messages among those it may see after its read marker. The unread
    /// count is derived from it ([`UserConvRecord::unread`]), so a message to a group of N
    /// writes only its sender's state, not N - 1 others'.
    pub own_after_read: u64,
    /// First seq this user may see (1 for dms; the join point for groups).
    pub visible_from: u64,
    /// Last seq this user may see, once it left or was removed from a group.
    pub visible_to: Option<u64>,
    /// Highest seq that reached *every* device of this user (for the `delivered` retention).
    pub all_devices_seq: u64,
    /// The conversation's `last_order` when this user left it (orders its conversation list).
    pub left_order: u64,
}

impl UserConvRecord {
    /// The seqs this user may see after its read marker: `(base, hi]`, with `hi` the last seq it
    /// may see of a conversation whose last seq is `last_seq`.
    fn unseen(&self, last_seq: u64) -> (u64, u64) {
        let hi = self.visible_to.map_or(last_seq, |t| t.min(last_seq));
        (self.read_seq.max(self.visible_from.saturating_sub(1)), hi)
    }

    /// Other users' messages after the read marker that this user may see, in a conversation
    /// whose last seq is `last_seq` (messages retention deleted count while their seq does).
    pub fn unread(&self, last_seq: u64) -> u64 {
        let (base, hi) = self.unseen(last_seq);
        hi.saturating_sub(base).saturating_sub(self.own_after_read)
    }
}

/// Version byte of a stored [`UserConvRecord`].
pub const USER_CONV_VERSION: u8 = 2;

/// The layout of version 1 (an eager count of others' unread messages).
#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct UserConvRecordV1 {
    read_seq: u64,
    delivered_seq: u64,
    unread: u64,
    visible_from: u64,
    visible_to: Option<u64>,
    all_devices_seq: u64,
    left_order: u64,
}

/// Encodes a [`UserConvRecord`]: [`USER_CONV_VERSION`], then postcard.
pub fn encode_user_conv(v: &UserConvRecord) -> Result<Vec<u8>, StorageError> {
    postcard::to_extend(v, with_version(USER_CONV_VERSION)).map_err(|e| StorageError::Encode(e.to_string()))
}

/// Decodes a stored [`UserConvRecord`] of either version. A version 1 record is converted with
/// the conversation's last seq (`last_seq`, read only then): its own messages after the read
/// marker are the seqs it may see there less the unread count it kept.
pub fn decode_user_conv(bytes: &[u8], last_seq: impl FnOnce() -> Result<u64, StorageError>) -> Result<UserConvRecord, StorageError> {
    match bytes.split_first() {
        Some((&USER_CONV_VERSION, rest)) => postcard::from_bytes(rest).map_err(|e| StorageError::Decode(e.to_string())),
        Some((&FORMAT_VERSION, _)) => {
            let v1: UserConvRecordV1 = decode(bytes)?;
            let mut uc = UserConvRecord {
                read_seq: v1.read_seq,
                delivered_seq: v1.delivered_seq,
                own_after_read: 0,
                visible_from: v1.visible_from,
                visible_to: v1.visible_to,
                all_devices_seq: v1.all_devices_seq,
                left_order: v1.left_order,
            };
            let (base, hi) = uc.unseen(last_seq()?);
            uc.own_after_read = hi.saturating_sub(base).saturating_sub(v1.unread);
            Ok(uc)
        }
        Some((v, _)) => Err(StorageError::Decode(format!("unknown user_conv_state version {v}"))),
        None => Err(StorageError::Decode("empty value".into())),
    }
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
    postcard::to_extend(v, with_version(FORMAT_VERSION)).map_err(|e| StorageError::Encode(e.to_string()))
}

/// A buffer holding the version byte, with room for a typical record (64 bytes), so that
/// encoding one does not grow the buffer 1 → 8 → 16 → 32 → 64 on the commit thread.
fn with_version(version: u8) -> Vec<u8> {
    let mut v = Vec::with_capacity(64);
    v.push(version);
    v
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A record of version 1 (an eager unread count) reads back with the same unread count, in
    /// a dm, in a group joined late and in one left; version 2 round-trips.
    #[test]
    fn a_version_1_conversation_state_keeps_its_unread_count() {
        use UserConvRecordV1 as V1;
        // (record, the conversation's last seq)
        let cases = [
            (V1 { read_seq: 2, delivered_seq: 5, unread: 2, visible_from: 1, visible_to: None, all_devices_seq: 4, left_order: 0 }, 6),
            (V1 { read_seq: 9, delivered_seq: 9, unread: 3, visible_from: 10, visible_to: None, all_devices_seq: 9, left_order: 0 }, 14),
            (V1 { read_seq: 3, delivered_seq: 7, unread: 1, visible_from: 1, visible_to: Some(7), all_devices_seq: 7, left_order: 42 }, 30),
        ];
        for (v1, last_seq) in cases {
            let bytes = encode(&v1).unwrap();
            assert_eq!(bytes[0], FORMAT_VERSION);
            let uc = decode_user_conv(&bytes, || Ok(last_seq)).unwrap();
            assert_eq!(uc.unread(last_seq), v1.unread, "{uc:?}");
            assert_eq!((uc.read_seq, uc.delivered_seq, uc.visible_from, uc.visible_to, uc.all_devices_seq, uc.left_order), (v1.read_seq, v1.delivered_seq, v1.visible_from, v1.visible_to, v1.all_devices_seq, v1.left_order));
            let again = encode_user_conv(&uc).unwrap();
            assert_eq!(again[0], USER_CONV_VERSION);
            assert_eq!(decode_user_conv(&again, || panic!("a version 2 record needs no last seq")).unwrap(), uc);
        }
        assert!(decode_user_conv(&[9, 0], || Ok(0)).is_err());
    }
}
