//! Every sled tree, declared in one table (STYLE habit 10): name, key layout, value layout.
//!
//! | tree | key | value |
//! | --- | --- | --- |
//! | `meta` | `b"applied"` | u64 BE: index of the last applied log entry |
//! | `users` | user | [`UserRecord`](super::records::UserRecord) |
//! | `tokens` | sha256(token) (32 bytes) | [`TokenRecord`](super::records::TokenRecord) |
//! | `user_head` | user | u64 BE: the user's latest ev |
//! | `user_ev_event` | user `\0` ev (u64 BE) | [`EventRecord`](super::records::EventRecord) |
//! | `conv_meta` | conv | [`ConvMeta`](super::records::ConvMeta) |
//! | `conv_seq_message` | conv `\0` seq (u64 BE) | [`MessageRecord`](super::records::MessageRecord) |
//! | `sender_id_ack` | user `\0` client message id | [`AckRecord`](super::records::AckRecord) |
//! | `device_cursor` | user `\0` device | u64 BE: the device's confirmed ev |
//! | `user_conv_state` | user `\0` conv | [`UserConvRecord`](super::records::UserConvRecord) |
//! | `groups` | group id | [`GroupRecord`](super::records::GroupRecord) |
//! | `user_min_cursor` | user | u64 BE: the lowest cursor over the user's devices (every device has reached it) |
//! | `user_scram` | user | [`ScramRecord`](super::records::ScramRecord): SCRAM verifiers (XMPP gateway) |
//!
//! Outside the log (not in this table's transaction): `presence_last_seen` (user → u64 BE ms).

/// Index of each tree in [`TREES`] and in `Trees::all`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(usize)]
pub enum TreeId {
    Meta = 0,
    Users,
    Tokens,
    UserHead,
    UserEvEvent,
    ConvMeta,
    ConvSeqMessage,
    SenderIdAck,
    DeviceCursor,
    UserConvState,
    Groups,
    UserMinCursor,
    UserScram,
}

/// The trees' names, in [`TreeId`] order.
pub const TREES: [&str; 13] = [
    "meta",
    "users",
    "tokens",
    "user_head",
    "user_ev_event",
    "conv_meta",
    "conv_seq_message",
    "sender_id_ack",
    "device_cursor",
    "user_conv_state",
    "groups",
    "user_min_cursor",
    "user_scram",
];

/// `meta` key of the applied index.
pub const APPLIED_KEY: &[u8] = b"applied";

/// The open trees.
#[derive(Clone)]
pub struct Trees {
    /// In [`TreeId`] order.
    pub all: Vec<sled::Tree>,
}

impl Trees {
    /// Opens (creating) every tree of [`TREES`].
    pub fn open(db: &sled::Db) -> sled::Result<Trees> {
        let all = TREES.iter().map(|n| db.open_tree(n)).collect::<sled::Result<Vec<_>>>()?;
        Ok(Trees { all })
    }

    /// One tree.
    pub fn get(&self, id: TreeId) -> &sled::Tree {
        &self.all[id as usize]
    }
}
