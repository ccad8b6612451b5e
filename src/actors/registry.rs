//! The registry: which devices of which user are online on this node.
//!
//! Writes (connect, disconnect) go through the [`Registry`] actor, which runs under
//! `actix::Supervisor`; lookups read the sharded [`Online`] map directly from any thread (the
//! commit thread delivering events, sessions relaying typing).

use std::sync::Arc;

use actix::prelude::*;
use dashmap::DashMap;

use super::messages::*;
use super::presence::PresenceHub;
use crate::storage::{Effects, Sink};

/// user → online devices. Shared by the registry actor (writer) and readers.
pub type Online = Arc<DashMap<String, Vec<DeviceConn>>>;

/// The registry actor.
pub struct Registry {
    online: Online,
    presence: Arc<PresenceHub>,
}

impl Registry {
    /// A registry over `online` (kept across restarts of the actor, so lookups never see a gap).
    pub fn new(online: Online, presence: Arc<PresenceHub>) -> Self {
        Registry { online, presence }
    }
}

impl Actor for Registry {
    type Context = Context<Self>;
}

impl Supervised for Registry {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        tracing::warn!("registry restarting");
        metrics::counter!("parley_actor_restarts_total", "actor" => "registry").increment(1);
    }
}

impl Handler<Connect> for Registry {
    type Result = ();
    fn handle(&mut self, m: Connect, _: &mut Context<Self>) {
        let mut e = self.online.entry(m.user.clone()).or_default();
        let first = e.is_empty();
        e.push(m.conn);
        drop(e);
        metrics::gauge!("parley_sessions_authenticated").increment(1.0);
        if first {
            self.presence.set_online(&m.user, &self.online);
        }
    }
}

impl Handler<Disconnect> for Registry {
    type Result = ();
    fn handle(&mut self, m: Disconnect, _: &mut Context<Self>) {
        let mut now_empty = false;
        let mut removed = false;
        if let Some(mut e) = self.online.get_mut(&m.user) {
            let before = e.len();
            e.retain(|c| c.session != m.session);
            removed = e.len() < before;
            now_empty = e.is_empty();
        }
        if removed {
            metrics::gauge!("parley_sessions_authenticated").decrement(1.0);
        }
        if now_empty {
            self.online.remove_if(&m.user, |_, v| v.is_empty());
            self.presence.set_offline(&m.user, &self.online);
        }
    }
}

/// Delivers the effects of committed batches to online devices. Runs on the commit thread; only
/// reads the map and queues actor messages, so it never blocks on a socket.
pub struct Deliverer {
    pub online: Online,
}

impl Sink for Deliverer {
    fn committed(&self, effects: Effects) {
        for p in effects.events {
            if let Some(conns) = self.online.get(&p.user) {
                for c in conns.iter() {
                    c.deliver.do_send(Deliver { ev: p.ev, payload: p.payload.clone() });
                }
            }
        }
        for (user, hash) in effects.revoked {
            if let Some(conns) = self.online.get(&user) {
                for c in conns.iter().filter(|c| c.token_hash == hash) {
                    c.kick.do_send(Kick { code: crate::protocol::close::UNAUTHORIZED, reason: "logged out", goaway_ms: None });
                }
            }
        }
    }
}
