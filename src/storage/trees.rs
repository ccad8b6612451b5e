//! Every table of the state, declared in one place (STYLE habit 10): name, key layout, value
//! layout. All tables live in one sled tree, `state` ([`STATE_TREE`](super::store::STATE_TREE)):
//! a stored key is the table's byte (its [`TreeId`] as `u8`) followed by the key below, so one
//! atomic `apply_batch` can write every table (see [`store`](super::store)).
//!
//! | table | key | value |
//! | --- | --- | --- |
//! | `meta` | `b"applied"` | u64 BE: index of the last applied log entry |
//! | `meta` | `b"rb"` + origin + id, `b"ri"` + index | cluster only: the batch ids applied in the last `RAFT_BATCH_WINDOW` entries, so a batch proposed twice (again to a new leader) is applied once (the Raft paper §8's client serial numbers) |
//! | `meta` | `b"raft"` | cluster only (`cluster/`): the Raft log id applied last and the membership, as the cluster's state machine encodes them; written in the same layer as the entry it describes ([`State::apply_recording`](super::state::State::apply_recording)) |
//! | `users` | user | [`UserRecord`](super::records::UserRecord) |
//! | `tokens` | sha256(token) (32 bytes) | [`TokenRecord`](super::records::TokenRecord) |
//! | `user_head` | user | not written any more: a user's latest ev is the key of its last event (events are only appended), found with [`Store::last_in_prefix`](super::store::Store::last_in_prefix); a data directory from before keeps stale values that nothing reads |
//! | `user_ev_event` | user `\0` ev (u64 BE) | [`EventRecord`](super::records::EventRecord) |
//! | `conv_meta` | conv | [`ConvMeta`](super::records::ConvMeta) |
//! | `conv_seq_message` | conv `\0` seq (u64 BE) | [`MessageRecord`](super::records::MessageRecord) |
//! | `sender_id_ack` | user `\0` client message id | [`AckRecord`](super::records::AckRecord) |
//! | `device_cursor` | user `\0` device | u64 BE: the device's confirmed ev |
//! | `user_conv_state` | user `\0` conv | [`UserConvRecord`](super::records::UserConvRecord), version 2 (its own messages after the read marker; the unread count is derived); version 1 (an eager unread count) is converted when read |
//! | `groups` | group id | [`GroupRecord`](super::records::GroupRecord) |
//! | `user_min_cursor` | user | not written any more: the lowest cursor over a user's devices is computed from its `device_cursor` keys (apply caches them); stale values in older data directories are never read |
//! | `user_scram` | user | [`ScramRecord`](super::records::ScramRecord): SCRAM verifiers (XMPP gateway) |
//!
//! Outside the log, in a sled tree of its own: `presence_last_seen` (user → u64 BE ms).

/// Each table; its value is the key prefix byte in the `state` tree and its index in [`TREES`].
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

impl TreeId {
    /// Every table, in order.
    pub const ALL: [TreeId; 13] = [
        TreeId::Meta,
        TreeId::Users,
        TreeId::Tokens,
        TreeId::UserHead,
        TreeId::UserEvEvent,
        TreeId::ConvMeta,
        TreeId::ConvSeqMessage,
        TreeId::SenderIdAck,
        TreeId::DeviceCursor,
        TreeId::UserConvState,
        TreeId::Groups,
        TreeId::UserMinCursor,
        TreeId::UserScram,
    ];
}

/// The tables' names, in [`TreeId`] order (also the sled tree names of the layout before the
/// single tree, which [`Store::open`](super::store::Store::open) migrates).
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
/// `meta` key of the cluster's Raft applied state (never written by a single node).
pub const RAFT_APPLIED_KEY: &[u8] = b"raft";
/// `meta` key prefix of a recently applied Raft batch (cluster only): `b"rb"` + origin node id
/// (u64 BE) + batch id (u64 BE) → the index it was applied at (u64 BE).
pub const RAFT_BATCH_PREFIX: &[u8] = b"rb";
/// `meta` key prefix of the same, by index: `b"ri"` + index (u64 BE) → origin + id (16 bytes),
/// so the record [`RAFT_BATCH_WINDOW`] entries old can be found and deleted.
pub const RAFT_BATCH_AT_PREFIX: &[u8] = b"ri";
/// How many entries a batch id is remembered for: a batch proposed again within this many
/// entries of its first copy is not applied twice (a proposal is retried only within
/// `cluster.commit_timeout_ms`, a few thousand entries at most).
pub const RAFT_BATCH_WINDOW: u64 = 100_000;
