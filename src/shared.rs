//! [`Shared`]: what every HTTP handler, native session and XMPP session shares (the
//! configuration, the commit pipeline, the state for reads, the registry and presence hub, the
//! rate limits). `server::run` builds it once; `actors/`, `http/` and `xmpp/` take an
//! `Arc<Shared>` without importing the entry point.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::sync::Arc;

use actix::prelude::*;
use dashmap::DashMap;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::actors::presence::PresenceHub;
use crate::actors::registry::{Online, Registry};
use crate::config::Config;
use crate::limits::RateLimiter;
use crate::storage::{LiveState, Pipeline, State};

/// What every handler and session shares.
pub struct Shared {
    pub cfg: Arc<Config>,
    /// Submits commands to the commit thread.
    pub pipeline: Pipeline,
    /// Reads (sync, history, auth): take [`Shared::state`] per request (a cluster node's
    /// state is replaced when it installs a snapshot).
    pub live: LiveState,
    /// This node of a cluster; `None` on a single node.
    pub cluster: Option<Arc<crate::cluster::node::Node>>,
    /// Connect/disconnect go through this actor (under `actix::Supervisor`).
    pub registry: Addr<Registry>,
    /// Online devices, read directly.
    pub online: Online,
    /// Every open socket's session (authenticated or not), for `goaway` at shutdown.
    pub sessions: DashMap<u64, actix::Recipient<crate::actors::messages::Kick>>,
    pub presence: Arc<PresenceHub>,
    /// Open sockets (any state).
    pub sockets: AtomicUsize,
    /// Session ids.
    pub next_session: AtomicU64,
    /// Set once recovery finished and the listener is serving.
    pub ready: AtomicBool,
    /// Set when shutdown begins: new upgrades get 503.
    pub draining: AtomicBool,
    pub metrics: Option<PrometheusHandle>,
    /// Per-user send rate limit (PROTOCOL.md §5).
    pub send_limiter: RateLimiter,
    /// Failed logins per client IP.
    pub login_limiter: RateLimiter,
    /// Slots for password hashing (`auth.max_concurrent_hashes`); see
    /// [`crate::http::auth::hash_job`].
    pub hash_slots: tokio::sync::Semaphore,
    /// WebSocket upgrades (one bucket for the whole server).
    pub upgrade_limiter: RateLimiter,
    /// When upgrades refused by `upgrade_limiter` should come back (their `Retry-After`).
    pub upgrade_slots: crate::limits::Appointments,
}

impl Shared {
    /// The state as of now, for one request's reads (see [`LiveState`]).
    pub fn state(&self) -> Arc<State> {
        self.live.get()
    }

    /// On a cluster node, waits until this node applied everything the leader had committed
    /// (`cluster::node::Node::read_barrier`); at once on a single node. Called before login
    /// and a session's `hello` read the state.
    ///
    /// # Errors
    /// No leader confirmed its commit index within `cluster.commit_timeout_ms`, in words.
    pub async fn read_barrier(&self) -> Result<(), String> {
        match &self.cluster {
            Some(n) => n.read_barrier().await,
            None => Ok(()),
        }
    }
}
