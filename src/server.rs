//! Wires storage, actors and HTTP together, and owns the shutdown sequence.

use std::future::Future;
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use anyhow::Context as _;
use actix_web::{web, App, HttpServer};
use dashmap::DashMap;

use crate::actors::presence::{PresenceFlusher, PresenceHub};
use crate::actors::registry::{Deliverer, Online, Registry};
use crate::config::Config;
use crate::limits::RateLimiter;
use crate::shared::Shared;
use crate::storage::{self, Pipeline, State};

/// A start-up failure that is the user's to fix (an address in use, a missing file named in the
/// configuration): `parley serve` says it in one line and exits 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UserError(pub String);

/// Refuses a data directory of the other kind: a single node's (`wal/`) for a cluster node, a
/// cluster node's (`raft/`) for a single node. Neither converts the other; a node that started
/// anyway would ignore every message stored there.
pub fn check_supported(cfg: &Config) -> Result<(), UserError> {
    let data = &cfg.server.data_dir;
    if cfg.cluster.node_id != 0 && data.join("wal").exists() {
        return Err(UserError(format!(
            "{} holds a single node's log (wal/), and cluster.node_id = {} asks for a cluster node: a single node's data cannot join a cluster; use an empty data directory",
            data.display(),
            cfg.cluster.node_id
        )));
    }
    if cfg.cluster.node_id == 0 && data.join("raft").exists() {
        return Err(UserError(format!(
            "{} holds a cluster node's log (raft/); set cluster.node_id (and cluster.listen, cluster.peers) to run it, or use another data directory for a single node",
            data.display()
        )));
    }
    Ok(())
}

/// The Raft node's tokio runtime. Dropped on an error path inside async code (a start-up
/// failure after it was built), it shuts down in the background: tokio panics when a runtime is
/// dropped where blocking is not allowed, which hid the start-up error behind exit 101.
struct RaftRuntime(Option<tokio::runtime::Runtime>);

impl RaftRuntime {
    fn handle(&self) -> tokio::runtime::Handle {
        self.0.as_ref().map(|r| r.handle().clone()).unwrap_or_else(tokio::runtime::Handle::current)
    }

    /// Waits up to `d` for the runtime's tasks (blocking: call it off the async threads).
    fn shutdown(mut self, d: Duration) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_timeout(d);
        }
    }
}

impl Drop for RaftRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// What the server runs on: its own log (a single node), or a Raft node.
enum Backend {
    Single { commit_thread: std::thread::JoinHandle<()> },
    Cluster {
        node: Arc<crate::cluster::node::Node>,
        rt: RaftRuntime,
        batcher: std::thread::JoinHandle<()>,
        /// Dropping it stops the materializer thread.
        _materializer: crossbeam_channel::Sender<()>,
    },
}

/// A listening socket on `addr` with a listen backlog of `backlog` connections (see
/// `server.listen_backlog`).
///
/// # Errors
/// The address is in use or cannot be bound.
pub fn bind(addr: std::net::SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let l = TcpListener::bind(addr)?;
    set_backlog(&l, backlog)?;
    Ok(l)
}

/// Sets the listen backlog of a listening socket to `backlog` connections: `listen(2)` again,
/// which on Linux changes the queue of a socket already listening (the standard library binds
/// with 128).
///
/// # Errors
/// `listen(2)` failed.
pub fn set_backlog(l: &TcpListener, backlog: u32) -> std::io::Result<()> {
    socket2::SockRef::from(l).listen(i32::try_from(backlog).unwrap_or(i32::MAX))
}

/// Runs the server on `listener` until `shutdown` completes, then shuts down in order: stop
/// accepting upgrades → `goaway` to every session (retry delays spread over the shutdown window)
/// → wait for sockets to drain up to `shutdown_timeout_ms` → stop HTTP → final checkpoint.
///
/// Must run inside an actix `System`.
///
/// # Errors
/// [`UserError`] for a cluster configuration ([`check_supported`]), a bad or busy XMPP address,
/// a missing TLS file; storage and bind errors otherwise.
pub async fn run(cfg: Config, listener: TcpListener, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    check_supported(&cfg)?;
    let cfg = Arc::new(cfg);
    set_backlog(&listener, cfg.server.listen_backlog).context("cannot set the listen backlog (server.listen_backlog)")?;
    // The XMPP gateway's TCP listener (RFC 6120), unless `xmpp.listen` is empty, and its TLS
    // files: before storage recovery, so a port in use or a missing file is said at once.
    let xmpp = if cfg.xmpp.listen.is_empty() {
        None
    } else {
        let a: std::net::SocketAddr = cfg.xmpp.listen.parse().map_err(|e| UserError(format!("xmpp.listen {:?}: {e}", cfg.xmpp.listen)))?;
        Some(bind(a, cfg.server.listen_backlog).map_err(|e| UserError(format!("cannot listen on {a} (xmpp.listen): {e}")))?)
    };
    let xmpp_tls = crate::xmpp::tcp::tls_acceptor(&cfg.xmpp.tls_cert, &cfg.xmpp.tls_key).map_err(|e| UserError(format!("{e:#}")))?;
    // The node-to-node listener, also before recovery.
    let cluster_listener = if cfg.cluster.node_id == 0 {
        None
    } else {
        let a: std::net::SocketAddr = cfg.cluster.listen.parse().map_err(|e| UserError(format!("cluster.listen {:?}: {e}", cfg.cluster.listen)))?;
        Some(bind(a, cfg.server.listen_backlog).map_err(|e| UserError(format!("cannot listen on {a} (cluster.listen): {e}")))?)
    };
    let metrics = crate::http::metrics::install();
    // While recovery replays the log, a stand-in server on the same socket answers 503, so
    // health checks and clients see "starting" rather than a hung connection.
    let boot = HttpServer::new(|| App::new().default_service(web::to(crate::http::starting)))
        .workers(1)
        .tcp_nodelay(true)
        .disable_signals()
        .listen(listener.try_clone()?)?
        .run();
    tracing::info!(data = %cfg.server.data_dir.display(), "recovering storage; a stand-in server answers 503 until it is done");
    let boot_handle = boot.handle();
    let boot_task = actix_rt::spawn(boot);
    let data = cfg.server.data_dir.clone();
    let online: Online = Arc::new(DashMap::new());
    let sink = Arc::new(Deliverer { online: online.clone() });
    let (live, lock, backend_parts) = if cluster_listener.is_none() {
        let storage::Opened { state, wal, stats, lock } = {
            let cfg = cfg.clone();
            let data = data.clone();
            actix_web::rt::task::spawn_blocking(move || storage::open(&data, cfg.storage.segment_bytes, cfg.storage.cache_bytes)).await??
        };
        tracing::info!(
            applied_before = stats.applied_before,
            replayed = stats.replayed,
            torn_tail_bytes = stats.torn_tail_bytes,
            millis = stats.millis,
            data = %data.display(),
            "storage recovered"
        );
        metrics::gauge!("parley_recovery_seconds").set(stats.millis as f64 / 1000.0);
        metrics::gauge!("parley_log_bytes").set(wal.size_bytes() as f64);
        metrics::gauge!("parley_log_segments").set(wal.segment_count() as f64);
        let state = Arc::new(state);
        (storage::LiveState::new(state.clone()), lock, Ok((state, wal)))
    } else {
        let (c, d, k) = (cfg.clone(), data.clone(), sink.clone());
        let opened = actix_web::rt::task::spawn_blocking(move || crate::cluster::node::open(&c, &d, k)).await??;
        tracing::info!(data = %data.display(), node_id = cfg.cluster.node_id, "cluster node storage opened");
        (opened.live, opened.lock, Err((opened.log, opened.sm)))
    };
    crate::data_dir::mark(&data).map_err(|e| anyhow::anyhow!("cannot write {}: {e}", data.join(crate::data_dir::MARKER).display()))?;
    let presence_tree = sled_presence_tree(&live.get())?;
    let presence = PresenceHub::new(presence_tree);
    // The long-lived actors share one arbiter (thread), each under a supervisor.
    let arbiter = Arbiter::new();
    let registry = {
        let online = online.clone();
        let presence = presence.clone();
        Supervisor::start_in_arbiter(&arbiter.handle(), move |_| Registry::new(online, presence))
    };
    let (pipeline, backend) = match backend_parts {
        Ok((state, wal)) => {
            let (pipeline, commit_thread) = Pipeline::start(state, wal, cfg.storage.clone(), storage::snapshot::dir_of(&data), sink);
            (pipeline, Backend::Single { commit_thread })
        }
        Err((log, sm)) => {
            // The Raft node runs on its own runtime: openraft's tasks never share a thread with
            // the actors, and the actors never wait on openraft's.
            let rt = RaftRuntime(Some(tokio::runtime::Builder::new_multi_thread().worker_threads(2).thread_name("parley-raft").enable_all().build()?));
            let l = cluster_listener.ok_or_else(|| anyhow::anyhow!("no cluster listener"))?;
            let caddr = l.local_addr()?;
            let node = crate::cluster::node::Node::start(&cfg, (log, sm), l, rt.handle()).await?;
            tracing::info!(%caddr, node_id = node.id(), "parley cluster listening");
            println!("parley cluster listening on {caddr}");
            let (pipeline, batcher) = Pipeline::start_replicated(cfg.storage.clone(), node.clone());
            let materializer = storage::pipeline::spawn_materializer(live.clone(), Duration::from_millis(cfg.storage.materialize_interval_ms), cfg.storage.materialize_idle_priority);
            (pipeline, Backend::Cluster { node, rt, batcher, _materializer: materializer })
        }
    };
    {
        let (hub, online) = (presence.clone(), online.clone());
        let every = Duration::from_millis(100);
        let cluster = match &backend {
            Backend::Cluster { node, .. } => Some(node.clone()),
            Backend::Single { .. } => None,
        };
        Supervisor::start_in_arbiter(&arbiter.handle(), move |_| PresenceFlusher { hub, online, every, cluster });
    }
    let shared = Arc::new(Shared {
        cfg: cfg.clone(),
        pipeline: pipeline.clone(),
        live,
        cluster: match &backend {
            Backend::Cluster { node, .. } => Some(node.clone()),
            Backend::Single { .. } => None,
        },
        registry: registry.clone(),
        online,
        sessions: DashMap::new(),
        presence,
        sockets: AtomicUsize::new(0),
        next_session: AtomicU64::new(1),
        ready: AtomicBool::new(false),
        draining: AtomicBool::new(false),
        metrics,
        send_limiter: RateLimiter::new(cfg.limits.send_rate_per_s, cfg.limits.send_burst),
        login_limiter: RateLimiter::new(cfg.limits.failed_logins_per_min / 60.0, cfg.limits.failed_login_burst),
        hash_slots: tokio::sync::Semaphore::new(crate::http::auth::hash_slots(&cfg)),
        upgrade_limiter: RateLimiter::new(cfg.admission.upgrades_per_s, cfg.admission.upgrade_burst),
        upgrade_slots: crate::limits::Appointments::new(cfg.admission.upgrades_per_s),
    });
    if let Some(n) = &shared.cluster {
        n.set_gossip(Arc::new(crate::actors::ops::Gossiped(Arc::downgrade(&shared))));
    }
    crate::retention::start(&cfg, &pipeline, shared.cluster.clone());
    let addr = listener.local_addr()?;
    boot_handle.stop(false).await;
    let _ = boot_task.await;
    let data = web::Data::new(shared.clone());
    let workers = if cfg.server.workers == 0 { std::thread::available_parallelism().map_or(2, |n| n.get()) } else { cfg.server.workers };
    let server = HttpServer::new(move || App::new().app_data(data.clone()).wrap(crate::http::json_errors()).configure(crate::http::routes))
        .on_connect(crate::http::on_connect)
        .workers(workers)
        // Frames are small and latency-bound: do not let Nagle hold them for the peer's delayed ACK.
        .tcp_nodelay(true)
        .disable_signals()
        .shutdown_timeout(2)
        .listen(listener)?
        .run();
    let handle = server.handle();
    let serving = actix_rt::spawn(server);
    shared.ready.store(true, Ordering::Relaxed);
    if let Some(l) = xmpp {
        let xaddr = l.local_addr()?;
        tracing::info!(%xaddr, domain = %cfg.xmpp.domain, "parley xmpp listening");
        // Before the HTTP line, so scripts that wait for that line know both addresses.
        println!("parley xmpp listening on {xaddr}");
        actix_rt::spawn(crate::xmpp::tcp::serve(shared.clone(), l, xmpp_tls));
    }
    tracing::info!(%addr, workers, "parley listening");
    // A line for scripts and tests that start the binary on port 0.
    println!("parley listening on http://{addr}");

    shutdown.await;
    tracing::info!("shutting down: goaway to every session");
    shared.draining.store(true, Ordering::Relaxed);
    let deadline = Duration::from_millis(cfg.server.shutdown_timeout_ms);
    let window = deadline.as_millis() as u64 / 2;
    goaway_all(&shared, window);
    let t0 = Instant::now();
    while shared.sockets.load(Ordering::Relaxed) > 0 && t0.elapsed() < deadline {
        actix_rt::time::sleep(Duration::from_millis(20)).await;
    }
    handle.stop(true).await;
    let _ = serving.await;
    pipeline.stop(Duration::from_secs(30)).await;
    drop(pipeline);
    match backend {
        Backend::Single { commit_thread } => {
            let _ = actix_web::rt::task::spawn_blocking(move || commit_thread.join()).await;
        }
        Backend::Cluster { node, rt, batcher, .. } => {
            let _ = actix_web::rt::task::spawn_blocking(move || batcher.join()).await;
            node.shutdown().await;
            drop(node);
            let _ = actix_web::rt::task::spawn_blocking(move || rt.shutdown(Duration::from_secs(5))).await;
        }
    }
    drop(shared);
    drop(lock);
    tracing::info!("stopped");
    Ok(())
}

/// The one tree outside the log: `presence_last_seen` (user → u64 BE ms), written lazily.
fn sled_presence_tree(state: &State) -> anyhow::Result<sled::Tree> {
    Ok(state.db().open_tree("presence_last_seen")?)
}

/// Sends every open socket (authenticated or not) `goaway` with a reconnect delay drawn from
/// `0..window_ms`, then closes it with 1001: the clients' reconnect storm is spread over the
/// window. Returns how many sockets were told.
fn goaway_all(shared: &Shared, window_ms: u64) -> usize {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    let mut n = 0;
    for e in shared.sessions.iter() {
        let delay = if window_ms == 0 { 0 } else { rng.gen_range(0..window_ms) };
        e.value().do_send(crate::actors::messages::Kick {
            code: crate::protocol::close::GOING_AWAY,
            reason: "server shutting down",
            goaway_ms: Some(delay),
        });
        n += 1;
    }
    n
}

#[cfg(test)]
mod tests {
    use std::net::{SocketAddr, TcpStream};
    use std::time::Duration;

    /// Connects up to `n` clients to `l` (which never accepts), each waiting at most 1 s for
    /// the handshake; returns how many connected before the first that did not.
    fn connects_until_refused(l: &std::net::TcpListener, n: usize) -> usize {
        let addr: SocketAddr = l.local_addr().expect("the listener's address");
        let mut held = Vec::new();
        for _ in 0..n {
            match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
                Ok(s) => held.push(s),
                Err(_) => break,
            }
        }
        held.len()
    }

    /// The kernel completes this many handshakes before parley accepts one: a reconnect storm
    /// is queued, not dropped. With the standard library's 128 the 130th client's SYN is dropped
    /// (the control below), which in a storm of 19,000 cost 1-7 s SYN retransmissions and 408s.
    #[test]
    fn the_listen_backlog_queues_more_than_the_standard_librarys_128() {
        let l = super::bind("127.0.0.1:0".parse().expect("an address"), 1024).expect("bind");
        assert_eq!(connects_until_refused(&l, 400), 400);
    }

    #[test]
    fn control_without_the_backlog_the_kernel_drops_the_handshakes_after_128() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let n = connects_until_refused(&l, 400);
        assert!(n < 400, "{n} of 400 connected to a listener with the standard backlog");
    }
}
