//! parley's integration tests: one binary (STYLE habit 14). Every test starts the real `parley`
//! binary as a child process on `127.0.0.1:0` with its own temporary data directory, and talks
//! to it as a client would (HTTP and WebSocket), so restarts and `kill -9` are real.
//!
//! - [`delivery`]: live delivery, offline backlog, idempotent resends.
//! - [`cursors`]: `received`, stored and explicit cursors, per-device independence.
//! - [`restart`]: graceful shutdown (SIGTERM, `goaway`, exit 0) and recovery on the same data.
//! - [`binary`]: the postcard encoding end to end.
//! - [`crash`]: concurrent traffic, repeated `kill -9`, a torn log tail; nothing acked is lost.
//! - [`fsync_audit`]: strace of the real server: acks after fdatasync, new segments after a directory
//!   fsync, unlinks after a checkpoint's fsyncs.
//! - [`rebuild`]: a deleted or garbled sled state rebuilt from the log, or a clear refusal.
//! - [`config`]: a bad setting stops start-up with an error naming the key.
//! - [`overload`]: rate limits, slow consumers, heartbeats, admission, supervision, storage faults.
//! - [`ops`]: `parley admin`, backup and restore, retention, metrics, logs.
//! - [`startup`]: data directory checks, a port in use, config typos: one line, exit 2.
//! - [`http`]: JSON error bodies for every error, `HEAD`, the `Authorization` scheme.
//! - [`xmpp`]: the XMPP gateway: RFC 7395 framing, bad input, slixmpp clients (TCP).
//! - [`cluster`]: three nodes behind fault proxies: forming, read-your-writes and monotonic
//!   reads, the leader killed or stopped under load, double and whole-cluster crashes,
//!   partitions, a proposal across a leader change, presence, catch-up by snapshot, membership
//!   changes, `parley load` through every node.

mod common;

mod binary;
mod cluster;
mod config;
mod crash;
mod cursors;
mod delivery;
mod features;
mod fsync_audit;
mod groups;
mod http;
mod ops;
mod overload;
mod rebuild;
mod restart;
mod startup;
mod xmpp;
