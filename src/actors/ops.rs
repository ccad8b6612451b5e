//! The request logic shared by every front end of a device: the native [`Session`](super::session)
//! and the XMPP gateway (`crate::xmpp`). Each front end decodes its own wire format, then calls
//! these, so both map a request to the same `Command` with the same checks, in the same order.

use std::sync::Arc;

use super::messages::{Relay, StopTyping};
use crate::protocol::ids::{valid_client_id, Conv};
use crate::protocol::{ErrorCode, ServerFrame, TypingState, MAX_BODY_BYTES};
use crate::shared::Shared;
use crate::storage::records::AckRecord;

/// What a `send` is, after the checks of [`check_send`].
pub enum SendCheck {
    /// A resend of an accepted `(from, id)`: answer the original ack (PROTOCOL.md §4.2), without
    /// touching the log or the rate limit.
    Duplicate(AckRecord),
    /// A new message to this conversation (`dm:a:b` or `g:<id>`), allowed by the rate limit.
    New(String),
}

/// Why a `send` was refused before the log: the code and message. The `error` always echoes
/// the client's `id`, an invalid one too (PROTOCOL.md §3: `send` answers `ack` or `error` with
/// `id`), so a client can settle that pending send.
pub struct SendRefused {
    pub code: ErrorCode,
    pub message: String,
}

/// Checks a `send` of `body` from `user` to `to` (a user id or `g:<id>`) with client id `id`:
/// id 1-64 chars, dedup record, body 1-65,536 bytes, target, per-user rate limit — in that order.
pub fn check_send(shared: &Shared, user: &str, id: &str, to: &str, body: &str) -> Result<SendCheck, SendRefused> {
    let refuse = |code, message: &str| Err(SendRefused { code, message: message.to_owned() });
    if !valid_client_id(id) {
        return refuse(ErrorCode::BadRequest, "id must be 1-64 chars");
    }
    match shared.state().dedup_recent(user, id) {
        Ok(Some(a)) => {
            metrics::counter!("parley_duplicate_sends_total").increment(1);
            return Ok(SendCheck::Duplicate(a));
        }
        Ok(None) => {}
        Err(e) => {
            tracing::error!(error = %e, "storage read failed");
            return refuse(ErrorCode::Internal, "internal error");
        }
    }
    if body.is_empty() {
        return refuse(ErrorCode::BadRequest, "body must not be empty");
    }
    if body.len() > MAX_BODY_BYTES {
        return refuse(ErrorCode::TooLarge, "body is over 65536 bytes");
    }
    let Some(conv) = Conv::from_target(user, to) else {
        return refuse(ErrorCode::BadRequest, "to must be a user id or g:<id>");
    };
    if !shared.send_limiter.allow(user) {
        metrics::counter!("parley_rate_limited_total", "what" => "send").increment(1);
        return refuse(ErrorCode::RateLimited, "too many messages; slow down");
    }
    Ok(SendCheck::New(conv.to_string()))
}

/// Tells `user`'s other online devices (every session but `session`) that typing in `conv`
/// ends, because the user sent a message there (PROTOCOL.md §4.6).
pub fn stop_typing_elsewhere(shared: &Shared, user: &str, session: u64, conv: &str) {
    if let Some(conns) = shared.online.get(user) {
        for c in conns.iter().filter(|c| c.session != session) {
            c.stop_typing.do_send(StopTyping { conv: conv.to_owned() });
        }
    }
}

/// The members of `conv` other than `user` who get its typing state, or `NotMember` (with the
/// storage error logged as `Internal`).
pub fn typing_audience(shared: &Shared, user: &str, conv: &str) -> Result<Vec<String>, ErrorCode> {
    let Some(c) = Conv::parse(conv) else { return Err(ErrorCode::BadRequest) };
    match &c {
        Conv::Dm { a, b } if c.dm_has(user) => Ok([a, b].into_iter().filter(|u| *u != user).cloned().collect()),
        Conv::Group(g) => match shared.state().group(g) {
            Ok(Some(rec)) if rec.members.iter().any(|m| m.user == user) => {
                Ok(rec.members.into_iter().map(|m| m.user).filter(|u| u != user).collect())
            }
            Ok(_) => Err(ErrorCode::NotMember),
            Err(e) => {
                tracing::error!(error = %e, "storage read failed");
                Err(ErrorCode::Internal)
            }
        },
        _ => Err(ErrorCode::NotMember),
    }
}

/// The members of `conv` other than `user` (looked up again each time: membership may change);
/// empty when there are none or the conversation is unknown. For a typing state that ends.
pub fn others_in(shared: &Shared, user: &str, conv: &str) -> Vec<String> {
    match Conv::parse(conv) {
        Some(Conv::Dm { a, b }) => [a, b].into_iter().filter(|u| u != user).collect(),
        Some(Conv::Group(g)) => match shared.state().group(&g) {
            Ok(Some(rec)) => rec.members.into_iter().map(|m| m.user).filter(|u| u != user).collect(),
            _ => Vec::new(),
        },
        None => Vec::new(),
    }
}

/// Relays `from`'s typing `state` in `conv` to every online device of `users` (ephemeral: each
/// session drops it when its queue is full), on this node and, in a cluster, on the others.
pub fn relay_typing(shared: &Shared, users: &[String], from: &str, conv: &str, state: TypingState) {
    relay_typing_here(shared, users, from, conv, state);
    if let Some(n) = &shared.cluster {
        n.broadcast(crate::cluster::network::Gossip::Typing { to: users.to_vec(), from: from.to_owned(), conv: conv.to_owned(), state });
    }
}

/// [`relay_typing`] to this node's devices only (typing gossiped from another node).
pub fn relay_typing_here(shared: &Shared, users: &[String], from: &str, conv: &str, state: TypingState) {
    let f = Arc::new(ServerFrame::Typing { conv: conv.to_owned(), from: from.to_owned(), state });
    for u in users {
        if let Some(conns) = shared.online.get(u) {
            for c in conns.iter() {
                c.relay.do_send(Relay(f.clone()));
            }
        }
    }
}

/// An actor that keeps its device's `composing` timers (PROTOCOL.md §4.6, XEP-0085): the native
/// session and the XMPP session.
pub trait TypingTimers: actix::Actor<Context = actix::Context<Self>> {
    /// conv → the expiry timer of this device's `composing` there.
    fn composing(&mut self) -> &mut std::collections::HashMap<String, actix::SpawnHandle>;
    /// The `composing` in `conv` expired: relay `paused`.
    fn typing_expired(&mut self, conv: &str);
}

/// Records this device's typing `state` in `conv`: a `composing` (re)arms its expiry after
/// `timeout` (`session.typing_timeout_ms`), anything else disarms it. The caller relays `state`.
pub fn arm_typing<A: TypingTimers>(act: &mut A, ctx: &mut actix::Context<A>, conv: &str, state: TypingState, timeout: std::time::Duration) {
    use actix::AsyncContext;
    if let Some(h) = act.composing().remove(conv) {
        ctx.cancel_future(h);
    }
    if state == TypingState::Composing {
        let c2 = conv.to_owned();
        let h = ctx.run_later(timeout, move |act, _| {
            act.composing().remove(&c2);
            act.typing_expired(&c2);
        });
        act.composing().insert(conv.to_owned(), h);
    }
}

/// Gossip from the other cluster nodes, into this node's presence hub and sessions. Holds the
/// [`Shared`] weakly (the node holds this, and `Shared` the node).
pub struct Gossiped(pub std::sync::Weak<Shared>);

impl crate::cluster::node::GossipSink for Gossiped {
    fn gossip(&self, from: u64, g: crate::cluster::network::Gossip) {
        use crate::cluster::network::Gossip;
        let Some(shared) = self.0.upgrade() else { return };
        match g {
            Gossip::Presence { changes, at_ms } => shared.presence.remote(from, changes, at_ms, false),
            Gossip::Table { online, at_ms } => shared.presence.remote(from, online, at_ms, true),
            Gossip::Typing { to, from: user, conv, state } => relay_typing_here(&shared, &to, &user, &conv, state),
        }
    }
}
