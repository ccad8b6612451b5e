//! Every actor message, in one module (STYLE habit 7). These are in-memory verbs and events: none
//! derives `Serialize`.

use std::sync::Arc;

use actix::prelude::*;

use crate::protocol::{EventPayload, ServerFrame};
use crate::storage::records::TokenHash;

/// Registry → Session: a new event of the session's user at position `ev` (after commit).
#[derive(Message, Clone)]
#[rtype(result = "()")]
pub struct Deliver {
    pub ev: u64,
    pub payload: Arc<EventPayload>,
}

/// Anyone → Session: send this frame now (typing, presence); dropped if the queue is full.
#[derive(Message, Clone)]
#[rtype(result = "()")]
pub struct Relay(pub Arc<ServerFrame>);

/// Registry/server → Session: close the socket with `code` (e.g. 4001 after logout, 1001 at shutdown
/// after a `goaway` that says to come back in `retry_after_ms`).
#[derive(Message, Clone)]
#[rtype(result = "()")]
pub struct Kick {
    pub code: u16,
    pub reason: &'static str,
    /// Send `goaway` with this delay first.
    pub goaway_ms: Option<u64>,
}

/// Session → the user's other Sessions: the user sent a message in `conv` from another device,
/// so typing there ends on every device (PROTOCOL.md §4.6).
#[derive(Message, Clone)]
#[rtype(result = "()")]
pub struct StopTyping {
    pub conv: String,
}

/// One online device, as the registry holds it.
#[derive(Clone)]
pub struct DeviceConn {
    /// Unique per socket.
    pub session: u64,
    pub device: String,
    pub token_hash: TokenHash,
    pub deliver: Recipient<Deliver>,
    pub relay: Recipient<Relay>,
    pub kick: Recipient<Kick>,
    pub stop_typing: Recipient<StopTyping>,
}

/// Session → Registry: this device is online; answered once lookups see it.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Connect {
    pub user: String,
    pub conn: DeviceConn,
}

/// Session → Registry: this socket is gone.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Disconnect {
    pub user: String,
    pub session: u64,
}
