//! The replicated write-ahead log: a parley cluster on openraft 0.9 (issue 12).
//!
//! What exists:
//! - [`types`]: the Raft type configuration (node ids, node addresses, one group-commit batch
//!   per entry, file snapshots).
//! - [`log_store`]: openraft's `RaftLogStorage` on parley's own write-ahead log, checked by
//!   openraft's storage suite (`openraft::testing::Suite::test_all`, in `tests`) and by reopen
//!   and power-loss tests.
//!
//! - [`state_machine`]: openraft's `RaftStateMachine` over parley's own `State`: each entry's
//!   batch applied through [`State::apply_recording`](crate::storage::State::apply_recording)
//!   (the applied log id and membership durable with the state), outcomes returned per command,
//!   effects handed to a `storage::Sink`; snapshots in parley's snapshot format plus a metadata
//!   file, received into a file, installed by fsync + rename into a new state generation that
//!   replaces the live one (`LiveState`). Checked by the same suite and by snapshot transfer and
//!   reopen tests.
//!
//! - [`network`]: node-to-node RPC (own listener, postcard frames, a bounded queue per peer
//!   and lane) and openraft's `RaftNetwork` on it.
//! - [`node`]: the running node: start-up initialization, proposals forwarded to the leader and
//!   answered from this node's own apply, the read index, status, membership changes, gossip.
//! - [`cli`]: `parley cluster status|add|remove`.

pub mod cli;
pub mod log_store;
pub mod network;
pub mod node;
pub mod state_machine;
pub mod types;

#[cfg(test)]
mod tests;
