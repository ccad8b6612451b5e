//! Presence: who is online, when each user was last seen, and who watches whom.
//!
//! In memory, per node. A user is online while any device is connected (the registry's map is
//! the source). Changes are coalesced: the hub marks users dirty, and a flusher pushes at most one
//! `presence` frame per watcher and user every `coalesce` window, and only when the state a
//! watcher last saw changed, so a reconnect storm does not become a presence storm.
//!
//! `last_seen` is written lazily to its own sled tree (`presence_last_seen`, outside the log:
//! presence is not messaging state) by the flusher, so it survives a restart.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actix::Recipient;
use dashmap::DashMap;
use parking_lot::Mutex;

use super::messages::{DeviceConn, Relay};
use crate::protocol::ServerFrame;

/// Now, in ms since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// The presence hub. Shared by sessions (watch/unwatch) and the registry (changes).
pub struct PresenceHub {
    /// watched user → (watching session → where to send).
    watchers: DashMap<String, HashMap<u64, Recipient<Relay>>>,
    /// user → last_seen ms (when its last device disconnected).
    last_seen: DashMap<String, u64>,
    /// Users whose state changed since the last flush.
    dirty: Mutex<HashSet<String>>,
    /// Users whose last_seen must still be written.
    unsaved: Mutex<HashSet<String>>,
    /// user → state each watcher was last told, to skip no-op frames: (online, last_seen).
    told: DashMap<String, (bool, Option<u64>)>,
    tree: sled::Tree,
}

impl PresenceHub {
    /// A hub persisting last_seen in `tree`; loads what is there.
    pub fn new(tree: sled::Tree) -> Arc<Self> {
        let last_seen = DashMap::new();
        for (k, v) in tree.iter().flatten() {
            if let (Ok(u), Ok(b)) = (std::str::from_utf8(&k), <[u8; 8]>::try_from(&v[..])) {
                last_seen.insert(u.to_owned(), u64::from_be_bytes(b));
            }
        }
        Arc::new(PresenceHub {
            watchers: DashMap::new(),
            last_seen,
            dirty: Mutex::new(HashSet::new()),
            unsaved: Mutex::new(HashSet::new()),
            told: DashMap::new(),
            tree,
        })
    }

    /// The user's first device connected.
    pub fn set_online(&self, user: &str, _online: &DashMap<String, Vec<DeviceConn>>) {
        self.dirty.lock().insert(user.to_owned());
    }

    /// The user's last device disconnected.
    pub fn set_offline(&self, user: &str, _online: &DashMap<String, Vec<DeviceConn>>) {
        self.last_seen.insert(user.to_owned(), now_ms());
        self.unsaved.lock().insert(user.to_owned());
        self.dirty.lock().insert(user.to_owned());
    }

    /// The presence frame of `user` now.
    pub fn frame(&self, user: &str, online: &DashMap<String, Vec<DeviceConn>>) -> ServerFrame {
        ServerFrame::Presence {
            user: user.to_owned(),
            online: online.get(user).is_some_and(|v| !v.is_empty()),
            last_seen: self.last_seen.get(user).map(|v| *v),
        }
    }

    /// `session` watches `users`; returns their presence now.
    pub fn watch(
        &self,
        session: u64,
        to: &Recipient<Relay>,
        users: &[String],
        online: &DashMap<String, Vec<DeviceConn>>,
    ) -> Vec<ServerFrame> {
        users
            .iter()
            .map(|u| {
                self.watchers.entry(u.clone()).or_default().insert(session, to.clone());
                self.frame(u, online)
            })
            .collect()
    }

    /// `session` stops watching `users`.
    pub fn unwatch<'a>(&self, session: u64, users: impl IntoIterator<Item = &'a String>) {
        for u in users {
            if let Some(mut w) = self.watchers.get_mut(u) {
                w.remove(&session);
            }
            self.watchers.remove_if(u, |_, w| w.is_empty());
        }
    }

    /// Pushes coalesced changes to watchers and writes unsaved last_seen values.
    pub fn flush(&self, online: &DashMap<String, Vec<DeviceConn>>) {
        let dirty: Vec<String> = self.dirty.lock().drain().collect();
        for u in dirty {
            let frame = self.frame(&u, online);
            let ServerFrame::Presence { online: on, last_seen, .. } = &frame else { continue };
            let state = (*on, *last_seen);
            if self.told.get(&u).is_some_and(|t| *t == state) {
                continue;
            }
            self.told.insert(u.clone(), state);
            if let Some(w) = self.watchers.get(&u) {
                let frame = Arc::new(frame);
                for r in w.values() {
                    r.do_send(Relay(frame.clone()));
                }
            }
        }
        let unsaved: Vec<String> = self.unsaved.lock().drain().collect();
        for u in unsaved {
            if let Some(ts) = self.last_seen.get(&u).map(|v| *v) {
                if let Err(e) = self.tree.insert(u.as_bytes(), &ts.to_be_bytes()) {
                    tracing::warn!(error = %e, "cannot store last_seen");
                }
            }
        }
        metrics::gauge!("parley_presence_watched_users").set(self.watchers.len() as f64);
    }
}

/// Flushes the hub every `every` (coalescing window): a long-lived actor under
/// `actix::Supervisor`; its state lives in the shared hub, so a restart loses nothing.
pub struct PresenceFlusher {
    pub hub: Arc<PresenceHub>,
    pub online: Arc<DashMap<String, Vec<DeviceConn>>>,
    pub every: Duration,
}

impl actix::Actor for PresenceFlusher {
    type Context = actix::Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        use actix::AsyncContext;
        ctx.run_interval(self.every, |act, _| act.hub.flush(&act.online));
    }
}

impl actix::Supervised for PresenceFlusher {
    fn restarting(&mut self, _: &mut Self::Context) {
        tracing::warn!("presence flusher restarting");
        metrics::counter!("parley_actor_restarts_total", "actor" => "presence").increment(1);
    }
}
