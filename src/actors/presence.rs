//! Presence: who is online, when each user was last seen, and who watches whom.
//!
//! In memory, per node. A user is online while any device is connected (the registry's map is
//! the source). Changes are coalesced: the hub marks users dirty, and a flusher pushes at most one
//! `presence` frame per watcher and user every `coalesce` window, and only when the state a
//! watcher last saw changed, so a reconnect storm does not become a presence storm.
//!
//! `last_seen` is written lazily to its own sled tree (`presence_last_seen`, outside the log:
//! presence is not messaging state) by the flusher, so it survives a restart.
//!
//! On a cluster node, the hub also knows the users online on the other nodes, from their gossip
//! (`cluster::network::Gossip`: deltas at each flush, the whole table every second): a user is
//! online while any device is connected to any node. A node not heard from for
//! [`REMOTE_TTL_MS`] is taken as gone, and its users go offline here (their `last_seen` is
//! then the time it was dropped).

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

/// A peer node's presence table expires this long after its last gossip, ms: then its users go
/// offline here. Three of its whole-table gossips (one a second) missed.
pub const REMOTE_TTL_MS: u64 = 3_000;

/// What the hub knows of one other node.
#[derive(Default)]
struct RemoteNode {
    /// When its last gossip came (ms since the epoch, this node's clock).
    heard_ms: u64,
    /// Its users with devices online there.
    users: HashSet<String>,
}

/// A state as a watcher sees it: (online, last_seen).
type Seen = (bool, Option<u64>);

/// One watching session of one user.
struct Watcher {
    /// The session's mailbox for `presence` frames.
    to: Recipient<Relay>,
    /// The state this session was last told (by the snapshot `watch` returned, or by a push),
    /// so it is told each change once: a push equal to the snapshot is skipped.
    told: Seen,
}

/// The presence hub. Shared by sessions (watch/unwatch) and the registry (changes).
///
/// A watched user's snapshot (on `watch`) and pushes (on `flush`) are both read while holding
/// that user's `watchers` entry, so a push never crosses a snapshot: each watcher's `told` is
/// exactly what it was last sent.
pub struct PresenceHub {
    /// watched user → (watching session → its mailbox and what it was told).
    watchers: DashMap<String, HashMap<u64, Watcher>>,
    /// user → last_seen ms (when its last device disconnected).
    last_seen: DashMap<String, u64>,
    /// Users whose state changed since the last flush.
    dirty: Mutex<HashSet<String>>,
    /// Users whose last_seen must still be written.
    unsaved: Mutex<HashSet<String>>,
    tree: sled::Tree,
    /// Other cluster nodes: node id → its users online there (empty on a single node).
    remote: Mutex<HashMap<u64, RemoteNode>>,
    /// Users online on some other node (a count of nodes), for `frame`.
    remote_online: DashMap<String, u32>,
    /// This node's changes not yet told to the other nodes: user → online here.
    outbox: Mutex<HashMap<String, bool>>,
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
            tree,
            remote: Mutex::new(HashMap::new()),
            remote_online: DashMap::new(),
            outbox: Mutex::new(HashMap::new()),
        })
    }

    /// This node's changes since the last call (user, devices online here: 1 or 0), for the
    /// other nodes.
    pub fn take_outbox(&self) -> Vec<(String, u32)> {
        self.outbox.lock().drain().map(|(u, on)| (u, u32::from(on))).collect()
    }

    /// This node's whole table: every user with a device online here.
    pub fn local_table(online: &DashMap<String, Vec<DeviceConn>>) -> Vec<(String, u32)> {
        online.iter().filter(|e| !e.value().is_empty()).map(|e| (e.key().clone(), e.value().len() as u32)).collect()
    }

    /// Gossip from node `from`: `changes` (user, devices online there) as of `at_ms`. With
    /// `whole`, `changes` is that node's whole table and replaces what was known of it.
    pub fn remote(&self, from: u64, changes: Vec<(String, u32)>, at_ms: u64, whole: bool) {
        let mut remote = self.remote.lock();
        let node = remote.entry(from).or_default();
        node.heard_ms = now_ms();
        let mut gone: Vec<String> = Vec::new();
        if whole {
            let now: HashSet<String> = changes.iter().filter(|(_, n)| *n > 0).map(|(u, _)| u.clone()).collect();
            gone.extend(node.users.difference(&now).cloned());
        } else {
            gone.extend(changes.iter().filter(|(u, n)| *n == 0 && node.users.contains(u)).map(|(u, _)| u.clone()));
        }
        let mut came = Vec::new();
        for (u, n) in changes {
            if n > 0 && node.users.insert(u.clone()) {
                came.push(u);
            }
        }
        for u in &gone {
            node.users.remove(u);
        }
        drop(remote);
        self.moved(came, gone, at_ms);
    }

    /// Takes the users of nodes not heard from for [`REMOTE_TTL_MS`] offline.
    pub fn expire_remote(&self) {
        let now = now_ms();
        let mut gone = Vec::new();
        self.remote.lock().retain(|id, n| {
            let alive = now.saturating_sub(n.heard_ms) < REMOTE_TTL_MS;
            if !alive {
                tracing::info!(node = id, users = n.users.len(), "no presence from a node for a while: its users go offline here");
                gone.extend(n.users.drain());
            }
            alive
        });
        self.moved(Vec::new(), gone, now);
    }

    fn moved(&self, came: Vec<String>, gone: Vec<String>, at_ms: u64) {
        let mut dirty = self.dirty.lock();
        for u in came {
            *self.remote_online.entry(u.clone()).or_insert(0) += 1;
            dirty.insert(u);
        }
        for u in gone {
            let last = self.remote_online.get_mut(&u).map(|mut n| {
                *n = n.saturating_sub(1);
                *n
            });
            if last == Some(0) {
                self.remote_online.remove(&u);
                self.last_seen.insert(u.clone(), at_ms.max(self.last_seen.get(&u).map_or(0, |v| *v)));
            }
            dirty.insert(u);
        }
    }

    /// The user's first device connected.
    pub fn set_online(&self, user: &str, _online: &DashMap<String, Vec<DeviceConn>>) {
        self.dirty.lock().insert(user.to_owned());
        self.outbox.lock().insert(user.to_owned(), true);
    }

    /// The user's last device disconnected.
    pub fn set_offline(&self, user: &str, _online: &DashMap<String, Vec<DeviceConn>>) {
        self.last_seen.insert(user.to_owned(), now_ms());
        self.unsaved.lock().insert(user.to_owned());
        self.dirty.lock().insert(user.to_owned());
        self.outbox.lock().insert(user.to_owned(), false);
    }

    /// The presence frame of `user` now.
    pub fn frame(&self, user: &str, online: &DashMap<String, Vec<DeviceConn>>) -> ServerFrame {
        ServerFrame::Presence {
            user: user.to_owned(),
            online: online.get(user).is_some_and(|v| !v.is_empty()) || self.remote_online.contains_key(user),
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
                let mut w = self.watchers.entry(u.clone()).or_default();
                let frame = self.frame(u, online);
                w.insert(session, Watcher { to: to.clone(), told: seen(&frame) });
                frame
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
            let Some(mut w) = self.watchers.get_mut(&u) else { continue };
            let frame = self.frame(&u, online);
            let now = seen(&frame);
            let frame = Arc::new(frame);
            for watcher in w.values_mut().filter(|w| w.told != now) {
                watcher.told = now;
                watcher.to.do_send(Relay(frame.clone()));
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

/// The (online, last_seen) of a presence frame.
fn seen(frame: &ServerFrame) -> Seen {
    match frame {
        ServerFrame::Presence { online, last_seen, .. } => (*online, *last_seen),
        _ => (false, None),
    }
}

/// Flushes the hub every `every` (coalescing window): a long-lived actor under
/// `actix::Supervisor`; its state lives in the shared hub, so a restart loses nothing.
pub struct PresenceFlusher {
    pub hub: Arc<PresenceHub>,
    pub online: Arc<DashMap<String, Vec<DeviceConn>>>,
    pub every: Duration,
    /// On a cluster node: where this node's presence goes (deltas at each flush, the whole
    /// table every second) and whose silence expires remote tables.
    pub cluster: Option<Arc<crate::cluster::node::Node>>,
}

impl actix::Actor for PresenceFlusher {
    type Context = actix::Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        use actix::AsyncContext;
        ctx.run_interval(self.every, |act, _| act.hub.flush(&act.online));
        if let Some(node) = self.cluster.clone() {
            use crate::cluster::network::Gossip;
            let n = node.clone();
            ctx.run_interval(self.every, move |act, _| {
                let changes = act.hub.take_outbox();
                if !changes.is_empty() {
                    n.broadcast(Gossip::Presence { changes, at_ms: now_ms() });
                }
            });
            ctx.run_interval(Duration::from_secs(1), move |act, _| {
                node.broadcast(Gossip::Table { online: PresenceHub::local_table(&act.online), at_ms: now_ms() });
                act.hub.expire_remote();
            });
        }
    }
}

impl actix::Supervised for PresenceFlusher {
    fn restarting(&mut self, _: &mut Self::Context) {
        tracing::warn!("presence flusher restarting");
        metrics::counter!("parley_actor_restarts_total", "actor" => "presence").increment(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actors::messages::{Deliver, Kick, StopTyping};
    use actix::prelude::*;

    /// A stand-in session that keeps the presence frames it is sent.
    struct Collector(Vec<(bool, Option<u64>)>);

    impl Actor for Collector {
        type Context = Context<Self>;
    }

    impl Handler<Relay> for Collector {
        type Result = ();
        fn handle(&mut self, m: Relay, _: &mut Context<Self>) {
            self.0.push(seen(&m.0));
        }
    }

    /// Answers with every frame received so far (the mailbox is in order, so after every earlier
    /// `Relay`).
    #[derive(Message)]
    #[rtype(result = "Vec<(bool, Option<u64>)>")]
    struct Take;

    impl Handler<Take> for Collector {
        type Result = MessageResult<Take>;
        fn handle(&mut self, _: Take, _: &mut Context<Self>) -> Self::Result {
            MessageResult(std::mem::take(&mut self.0))
        }
    }

    impl Handler<Deliver> for Collector {
        type Result = ();
        fn handle(&mut self, _: Deliver, _: &mut Context<Self>) {}
    }
    impl Handler<Kick> for Collector {
        type Result = ();
        fn handle(&mut self, _: Kick, _: &mut Context<Self>) {}
    }
    impl Handler<StopTyping> for Collector {
        type Result = ();
        fn handle(&mut self, _: StopTyping, _: &mut Context<Self>) {}
    }

    fn conn(addr: &Addr<Collector>, session: u64) -> DeviceConn {
        DeviceConn {
            session,
            device: "web".into(),
            token_hash: [0; 32],
            deliver: addr.clone().recipient(),
            relay: addr.clone().recipient(),
            kick: addr.clone().recipient(),
            stop_typing: addr.clone().recipient(),
        }
    }

    /// A user comes online and, before the next flush, someone watches it: the snapshot says
    /// online, and the flush that follows must not say it again. The next change is pushed once.
    #[actix_rt::test]
    async fn a_watcher_is_told_each_change_once_even_right_after_its_snapshot() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let hub = PresenceHub::new(db.open_tree("presence_last_seen").unwrap());
        let online: DashMap<String, Vec<DeviceConn>> = DashMap::new();
        let watcher = Collector(Vec::new()).start();
        let alice = Collector(Vec::new()).start();

        online.insert("alice".into(), vec![conn(&alice, 1)]);
        hub.set_online("alice", &online);
        let snapshot = hub.watch(7, &watcher.clone().recipient(), &["alice".to_owned()], &online);
        assert_eq!(snapshot.iter().map(seen).collect::<Vec<_>>(), [(true, None)]);
        hub.flush(&online);
        hub.flush(&online);
        assert_eq!(watcher.send(Take).await.unwrap(), [], "a push repeating the snapshot");

        online.remove("alice");
        hub.set_offline("alice", &online);
        hub.flush(&online);
        hub.flush(&online);
        let pushed = watcher.send(Take).await.unwrap();
        assert_eq!(pushed.len(), 1, "{pushed:?}");
        assert!(!pushed[0].0 && pushed[0].1.is_some(), "offline with last_seen: {pushed:?}");

        // A second watcher of the same user, after the change: its snapshot is current.
        let late = Collector(Vec::new()).start();
        hub.watch(8, &late.clone().recipient(), &["alice".to_owned()], &online);
        online.insert("alice".into(), vec![conn(&alice, 2)]);
        hub.set_online("alice", &online);
        hub.flush(&online);
        assert_eq!(watcher.send(Take).await.unwrap(), [(true, pushed[0].1)]);
        assert_eq!(late.send(Take).await.unwrap(), [(true, pushed[0].1)]);
    }
}
