//! The replicated write-ahead log: a parley cluster on openraft 0.9 (issue 12).
//!
//! What exists:
//! - [`types`]: the Raft type configuration (node ids, node addresses, one group-commit batch
//!   per entry, file snapshots).
//! - [`log_store`]: openraft's `RaftLogStorage` on parley's own write-ahead log, checked by
//!   openraft's storage suite (`openraft::testing::Suite::test_all`, in `tests`) and by reopen
//!   and power-loss tests.
//!
//! - In `storage/state.rs`, [`State::apply_recording`](crate::storage::State::apply_recording):
//!   apply that also stores the Raft applied state (log id, membership) in the same layer as the
//!   entry's writes, so it is durable with the state it describes (and in its snapshots).
//!
//! What does not exist yet: the state machine adapter over `State::apply` (`RaftStateMachine`:
//! `apply` through `apply_recording`, snapshots from `storage/snapshot.rs` installed by fsync +
//! rename, which needs a way to swap the live `State`), the node-to-node network, membership start-up,
//! forwarding to the leader, and the wiring into `server::run`; `parley serve` refuses
//! `cluster.node_id` above 0 until then (`server::check_supported`).

pub mod log_store;
pub mod types;

#[cfg(test)]
mod tests;
