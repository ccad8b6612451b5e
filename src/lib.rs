//! parley: a WhatsApp-class messaging server, modelled on Erlang/Mnesia.
//!
//! Every connected device is a supervised actor holding its socket; a registry maps users to their
//! online devices; a write-ahead log makes every message durable before the sender sees its ack.
//!
//! # Layout
//! - [`config`]: one struct, layered (defaults, file, `PARLEY__SECTION__KEY`), validated.
//! - [`data_dir`]: what may serve as a data directory (checked before anything binds).
//! - [`protocol`]: wire types, ids, JSON and postcard codecs. No I/O.
//! - [`storage`]: write-ahead log ([`storage::wal`]), group commit ([`storage::pipeline`]), the
//!   sled state machine ([`storage::state`]) with its trees ([`storage::trees`]).
//! - [`cluster`]: the replicated log on openraft (so far: its types and the Raft log store on
//!   the write-ahead log; no cluster runs yet).
//! - [`actors`]: the Session actor per socket, the Registry, the presence hub.
//! - [`http`]: register/login/logout, healthz, metrics, the WebSocket upgrade.
//! - [`shared`]: [`shared::Shared`], the context every handler and session holds.
//! - [`limits`]: token-bucket rate limits, a socket's frame-size cap.
//! - [`tokens`]: session tokens and their stored hash.
//! - [`retention`]: the retention job (purges through the log).
//! - [`admin`]: `parley admin` (users, stats, verify, backup, restore).
//! - [`server`]: wires it all and owns the shutdown sequence (wiring only).
//! - [`load`]: the load generator (`parley load`).
//! - [`xmpp`]: the XMPP gateway (RFC 6120 TCP, RFC 7395 WebSocket) over the same commands.

#[macro_use]
pub mod failpoint;
pub mod actors;
pub mod admin;
pub mod cluster;
pub mod config;
pub mod data_dir;
pub mod http;
pub mod limits;
pub mod load;
pub mod protocol;
pub mod retention;
pub mod server;
pub mod shared;
pub mod storage;
pub mod tokens;
pub mod xmpp;
