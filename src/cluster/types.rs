//! The Raft types of parley's cluster (openraft 0.9's `RaftTypeConfig`, declared with
//! `openraft::declare_raft_types!`).
//!
//! - Node ids are `u64` (`cluster.node_id`; 0 is "no cluster" and never a Raft node).
//! - A node is [`openraft::BasicNode`]: its node-to-node address, `HOST:PORT` as in
//!   `cluster.peers`.
//! - The application data of one Raft entry is one group-commit [`Batch`], so group commit
//!   still decides the fsync rate (one entry, one fsync, however many commands).
//! - Snapshot data is a file ([`tokio::fs::File`]): a snapshot is never held whole in memory.

use serde::{Deserialize, Serialize};

use crate::storage::Outcome;

/// One group-commit batch of parley commands, as proposed by one node.
///
/// `entry` is the bytes of a `storage::records::LogEntry` exactly as the single-node log stores
/// them as a record's payload (a format version byte, then postcard; see `storage/records.rs`),
/// carried opaque through Raft, so the stored formats stay parley's own and a change to
/// openraft's types cannot change them. `origin` and `id` name the proposal: the node that
/// proposed it answers its own clients when its own state machine applies the entry
/// (`cluster::node::Waiters`), whichever node was leader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    /// The node id that proposed the batch (0 in tests that build entries by hand).
    pub origin: u64,
    /// A random id the proposer waits on.
    pub id: u64,
    /// The encoded `LogEntry`.
    pub entry: Vec<u8>,
}

impl Batch {
    /// A batch with no proposer to answer (tests, and entries written by hand).
    pub fn anonymous(entry: Vec<u8>) -> Batch {
        Batch { origin: 0, id: 0, entry }
    }
}

/// What the state machine answers for one applied entry (openraft's `R`: what
/// `Raft::client_write` returns on the node that proposed the entry).
///
/// Only `commands` crosses the network or a disk (openraft's `serde` feature wants `R`
/// serializable); `outcomes` is local to the node that applied the entry and is skipped by
/// serde. Every node applies every entry and answers the clients connected to it from its own
/// apply (an ack goes out after the entry is committed on a quorum *and* applied on the
/// client's node, issue 12). The entry's effects (events to push to local devices) do not
/// travel here: the state machine hands them to its `storage::Sink`
/// (see `cluster::state_machine`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    /// Commands in the entry (0 for a blank or membership entry).
    pub commands: u32,
    /// One outcome per command, in the entry's order, exactly as the single node's commit
    /// thread answers them (`State::apply`); empty for a blank or membership entry, and after
    /// a round trip through serde.
    #[serde(skip)]
    pub outcomes: Vec<Outcome>,
}

openraft::declare_raft_types!(
    /// parley's Raft type configuration.
    pub TypeConfig:
        D = Batch,
        R = Applied,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = tokio::fs::File,
        AsyncRuntime = openraft::TokioRuntime,
);

/// A Raft node id.
pub type NodeId = u64;
/// A Raft log id: (term, leader node id, index); openraft's default (not `single-term-leader`)
/// keeps the leader's node id in the committed leader id.
pub type LogId = openraft::LogId<NodeId>;
/// A Raft vote (term, node voted for, committed).
pub type Vote = openraft::Vote<NodeId>;
/// One Raft log entry.
pub type Entry = openraft::Entry<TypeConfig>;
/// openraft's storage error for this configuration.
pub type StorageError = openraft::StorageError<NodeId>;
