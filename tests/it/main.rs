//! parley's integration tests: one binary (STYLE habit 14). Every test starts the real `parley`
//! binary as a child process on `127.0.0.1:0` with its own temporary data directory, and talks
//! to it as a client would (HTTP and WebSocket), so restarts and `kill -9` are real.
//!
//! - [`delivery`]: live delivery, offline backlog, idempotent resends.
//! - [`cursors`]: `received`, stored and explicit cursors, per-device independence.
//! - [`restart`]: graceful shutdown (SIGTERM, `goaway`, exit 0) and recovery on the same data.
//! - [`binary`]: the postcard encoding end to end.
//! - [`crash`]: concurrent traffic, repeated `kill -9`, a torn log tail; nothing acked is lost.
//! - [`config`]: a bad setting stops start-up with an error naming the key.
//! - [`overload`]: rate limits, slow consumers, heartbeats, admission, supervision, storage faults.
//! - [`ops`]: `parley admin`, backup and restore, retention, metrics, logs.
//! - [`xmpp`]: the XMPP gateway: RFC 7395 framing, bad input, slixmpp clients (TCP).

mod common;

mod binary;
mod config;
mod crash;
mod cursors;
mod delivery;
mod features;
mod groups;
mod ops;
mod overload;
mod restart;
mod xmpp;
