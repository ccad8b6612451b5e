//! One parley cluster node: the openraft `Raft` over the log store and the state machine, its
//! RPC handler, membership start-up, proposals (forwarded to the leader from a follower), read
//! indexes, status and membership changes.
//!
//! # A write's way (issue 12)
//!
//! The commit pipeline's batcher (`storage/pipeline.rs`, replicated mode) groups commands into
//! one batch, as on a single node, and hands it to [`Node`] ([`Replicator::propose`]). The node
//! registers a waiter for the batch's random id, then proposes it: `Raft::client_write` on the
//! leader, or [`Request::Propose`] to the leader from a follower. Every node applies every
//! committed entry; when **this** node's state machine applies a batch whose `origin` is this
//! node, it hands the outcomes to the waiter ([`Waiters`]), and only then are the clients
//! answered. So an `ack` leaves only after the entry is committed on a quorum *and* applied on
//! the node the client is connected to: a history read on that node right after the ack shows
//! the message (read-your-writes).
//!
//! A proposal that finds no leader, or a leader that does not commit it, within
//! `cluster.commit_timeout_ms` is answered `unavailable` (the client resends with the same id;
//! apply's dedup stores it once). A proposal is re-sent only when it certainly did not reach a
//! leader's log (not a leader, cannot connect), never after an ambiguous failure: the waiter
//! alone decides.
//!
//! # Reads
//!
//! Each node answers reads from its own state. [`Node::read_barrier`] (at login and at a
//! session's `hello`) asks the leader for its read index (its commit index, confirmed by a
//! heartbeat round: the Raft paper §6.4) and waits until this node has applied it: a client that
//! saw something on another node, or wrote there, sees at least that here (monotonic reads,
//! read-your-writes across nodes).
//!
//! # Start-up (no init step)
//!
//! When this node is the lowest id in `cluster.peers` and its log and vote are empty, it asks
//! every peer ([`Request::Probe`]) until all answer; if none holds anything it initializes the
//! membership with every configured peer as a voter. A node whose data was wiped is never the
//! one to initialize while any peer holds a log: it waits for the leader to replicate to it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers, Raft, ServerState};
use parking_lot::Mutex;
use tokio::sync::oneshot;

use super::log_store::LogStore;
use super::network::{CallError, Gossip, Handler, Network, Peers, Request, Response};
use super::state_machine::StateMachine;
use super::types::{Batch, NodeId, TypeConfig};
use crate::config::Config;
use crate::storage::pipeline::{Replicator, Reply};
use crate::storage::records::{encode, LogEntry};
use crate::storage::{DataLock, LiveState, Outcome, PipelineError, Sink};

/// How long `parley cluster add` waits for the new node to catch up as a learner.
const LEARNER_CATCH_UP: Duration = Duration::from_secs(30);

/// A follower more than this many entries behind the leader's commit index calls no elections
/// (see `Node::elect_guard`).
const FAR_BEHIND: u64 = 1_000;

/// Proposals in flight at once; the batcher waits for one to finish beyond this (backpressure:
/// meanwhile its batch grows).
const IN_FLIGHT: usize = 8;

/// Who waits for the outcomes of this node's own proposals, by batch id (see the module docs).
pub struct Waiters {
    node: NodeId,
    map: Mutex<HashMap<u64, oneshot::Sender<Vec<Outcome>>>>,
}

impl Waiters {
    /// Waiters of node `node`.
    pub fn new(node: NodeId) -> Arc<Waiters> {
        Arc::new(Waiters { node, map: Mutex::new(HashMap::new()) })
    }

    /// This node's id (batches with this `origin` are answered here).
    pub fn node(&self) -> NodeId {
        self.node
    }

    /// Called by the state machine when it applied batch `id` of this node.
    pub fn applied(&self, id: u64, outcomes: Vec<Outcome>) {
        if let Some(tx) = self.map.lock().remove(&id) {
            let _ = tx.send(outcomes);
        }
    }

    fn wait(&self, id: u64) -> oneshot::Receiver<Vec<Outcome>> {
        let (tx, rx) = oneshot::channel();
        self.map.lock().insert(id, tx);
        rx
    }

    fn forget(&self, id: u64) {
        self.map.lock().remove(&id);
    }
}

/// Presence and typing from other nodes (the presence hub implements it; see `actors/`).
pub trait GossipSink: Send + Sync + 'static {
    /// Handles gossip from node `from`.
    fn gossip(&self, from: NodeId, g: Gossip);
}

/// What `parley cluster status` and `GET /v1/cluster/status` show.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Status {
    pub node_id: NodeId,
    /// `leader`, `follower`, `candidate`, `learner` or `shutdown`.
    pub role: &'static str,
    pub term: u64,
    pub leader: Option<NodeId>,
    /// The highest Raft index this node knows to be committed.
    pub commit_index: Option<u64>,
    /// The highest Raft index applied to this node's state.
    pub applied_index: Option<u64>,
    pub last_log_index: Option<u64>,
    /// Voters of the current membership.
    pub members: Vec<NodeId>,
    /// Learners (non-voting members).
    pub learners: Vec<NodeId>,
}

/// A running cluster node. Its tasks run on the node's own tokio runtime ([`Node::runtime`]).
pub struct Node {
    id: NodeId,
    raft: Raft<TypeConfig>,
    peers: Arc<Peers>,
    waiters: Arc<Waiters>,
    rt: tokio::runtime::Handle,
    commit_timeout: Duration,
    /// `cluster.election_timeout_ms`.
    election_ms: u64,
    in_flight: Arc<tokio::sync::Semaphore>,
    gossip: Mutex<Option<Arc<dyn GossipSink>>>,
    /// The configured members, for the start-up initialization.
    configured: BTreeMap<NodeId, String>,
    /// The address the node-to-node listener is bound to.
    listening: String,
    stopping: AtomicBool,
}

/// What [`open`] recovered from a data directory.
pub struct Opened {
    pub log: LogStore,
    pub sm: StateMachine,
    pub live: LiveState,
    pub lock: DataLock,
}

/// Opens a cluster node's storage under `data` (`raft/log`, `raft/sm`), locked. Blocking.
///
/// # Errors
/// The data directory is locked by another process, or the log or state cannot be opened.
pub fn open(cfg: &Config, data: &Path, sink: Arc<dyn Sink>) -> anyhow::Result<Opened> {
    std::fs::create_dir_all(data.join("raft")).map_err(|e| anyhow::anyhow!("cannot create {}: {e}", data.join("raft").display()))?;
    let lock = DataLock::acquire(data)?;
    // `raft`'s name in the data directory, and the data directory's in its parent, are durable
    // before the log and the state machine below them write anything they promise to keep.
    for d in [data, data.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))] {
        std::fs::File::open(d).and_then(|f| f.sync_all()).map_err(|e| anyhow::anyhow!("cannot fsync {}: {e}", d.display()))?;
    }
    let log = LogStore::open(&data.join("raft").join("log"), cfg.storage.segment_bytes).map_err(|e| anyhow::anyhow!("the Raft log: {e}"))?;
    let sm = StateMachine::open(&data.join("raft").join("sm"), cfg.storage.cache_bytes, sink).map_err(|e| anyhow::anyhow!("the Raft state machine: {e}"))?;
    let live = sm.live();
    Ok(Opened { log, sm, live, lock })
}

impl Node {
    /// Starts the Raft node on `rt` with `opened`'s storage, serving node-to-node RPC on
    /// `listener` (already bound). Returns once openraft runs.
    ///
    /// # Errors
    /// An invalid Raft configuration, or openraft failing to start.
    pub async fn start(cfg: &Config, opened: (LogStore, StateMachine), listener: std::net::TcpListener, rt: tokio::runtime::Handle) -> anyhow::Result<Arc<Node>> {
        let c = &cfg.cluster;
        let configured = c.peer_map().map_err(|e| anyhow::anyhow!("cluster.peers: {e}"))?;
        let raft_cfg = openraft::Config {
            cluster_name: "parley".into(),
            heartbeat_interval: c.heartbeat_ms,
            election_timeout_min: c.election_timeout_ms,
            election_timeout_max: c.election_timeout_ms.saturating_mul(3) / 2,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(c.snapshot_entries),
            max_in_snapshot_log_to_keep: c.keep_entries,
            // Entries per AppendEntries; the network also caps its bytes (MAX_APPEND_BYTES),
            // since it must be answered within heartbeat_ms (openraft 0.9's per-RPC timeout).
            max_payload_entries: 64,
            install_snapshot_timeout: 10_000,
            ..Default::default()
        }
        .validate()
        .map_err(|e| anyhow::anyhow!("the Raft configuration: {e}"))?;
        let (log, sm) = opened;
        let waiters = Waiters::new(c.node_id);
        sm.answer_to(waiters.clone());
        let peers = Peers::new(c.node_id, configured.clone());
        let id = c.node_id;
        let commit_timeout = Duration::from_millis(c.commit_timeout_ms);
        let net = Network { peers: peers.clone() };
        let raft = rt.spawn(async move { Raft::new(id, Arc::new(raft_cfg), net, log, sm).await }).await??;
        let node = Arc::new(Node {
            id,
            raft,
            peers,
            waiters,
            rt: rt.clone(),
            commit_timeout,
            election_ms: c.election_timeout_ms,
            in_flight: Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT)),
            gossip: Mutex::new(None),
            configured,
            listening: listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            stopping: AtomicBool::new(false),
        });
        listener.set_nonblocking(true)?;
        let n = node.clone();
        rt.spawn(async move {
            match tokio::net::TcpListener::from_std(listener) {
                Ok(l) => super::network::serve(l, n).await,
                Err(e) => tracing::error!(error = %e, "the cluster listener cannot be used"),
            }
        });
        rt.spawn(node.clone().bootstrap());
        rt.spawn(node.clone().watchdog());
        rt.spawn(node.clone().elect_guard());
        Ok(node)
    }

    /// Ends the process when openraft's core stops outside a shutdown (a panic or a fatal
    /// storage error inside it): a node without its Raft core would keep its clients and answer
    /// every write `unavailable` forever. Let it crash (Erlang/OTP): the service manager restarts
    /// it, and recovery starts from what is durable.
    async fn watchdog(self: Arc<Self>) {
        let mut m = self.raft.metrics();
        loop {
            let fatal = m.borrow().running_state.clone();
            if let Err(e) = fatal {
                if !self.stopping.load(Ordering::Relaxed) {
                    tracing::error!(error = %e, "the Raft core stopped; exiting so that the node restarts from its durable state");
                    std::process::exit(70);
                }
                return;
            }
            if m.changed().await.is_err() {
                if !self.stopping.load(Ordering::Relaxed) {
                    tracing::error!("the Raft core stopped; exiting so that the node restarts from its durable state");
                    std::process::exit(70);
                }
                return;
            }
        }
    }

    /// Keeps this node from calling elections while it is far behind the leader (more than
    /// [`FAR_BEHIND`] entries short of the leader's commit index): openraft 0.9 has no pre-vote,
    /// and a follower busy installing a large snapshot misses heartbeats, times out, and calls
    /// election after election with ever higher terms, each one deposing a working leader (a
    /// 448,514-entry catch-up moved the leader's term from 1 to 21). Such a node could not win
    /// (its log is behind), and the others can still elect a leader without it. Asked every
    /// 500 ms; while the leader does not answer, the last decision stands; elections are on at
    /// start, so a whole cluster restarting elects as usual.
    async fn elect_guard(self: Arc<Self>) {
        let mut enabled = true;
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if self.stopping.load(Ordering::Relaxed) {
                return;
            }
            let leader = self.raft.metrics().borrow().current_leader;
            let Some(l) = leader.filter(|&l| l != self.id) else {
                if !enabled {
                    enabled = true;
                    self.raft.runtime_config().elect(true);
                }
                continue;
            };
            let Ok(Response::ReadIndex { index }) = self.peers.call(l, self.known(l).as_deref(), &Request::ReadIndex, Duration::from_millis(500)).await else { continue };
            let applied = self.applied_index().unwrap_or(0);
            let behind = index.unwrap_or(0).saturating_sub(applied) > FAR_BEHIND;
            if behind == enabled {
                enabled = !behind;
                self.raft.runtime_config().elect(enabled);
                tracing::info!(leader_commit = ?index, applied, elections = enabled, "{}", if behind { "far behind the leader: not calling elections until caught up" } else { "caught up: elections on again" });
            }
        }
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The runtime the node's tasks run on.
    pub fn runtime(&self) -> &tokio::runtime::Handle {
        &self.rt
    }

    /// Where gossip from other nodes goes (set once the presence hub exists).
    pub fn set_gossip(&self, sink: Arc<dyn GossipSink>) {
        *self.gossip.lock() = Some(sink);
    }

    /// The role and leader as of now.
    pub fn role(&self) -> (&'static str, Option<NodeId>) {
        let m = self.raft.metrics().borrow().clone();
        (role_name(m.state), m.current_leader)
    }

    /// The highest Raft index applied to this node's state.
    pub fn applied_index(&self) -> Option<u64> {
        self.raft.metrics().borrow().last_applied.map(|l| l.index)
    }

    /// The node's status (see [`Status`]).
    pub async fn status(self: &Arc<Self>) -> Status {
        let me = self.clone();
        let committed = self.rt.spawn(async move { me.raft.with_raft_state(|st| st.committed.map(|l| l.index)).await.ok().flatten() }).await.ok().flatten();
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let members: BTreeSet<NodeId> = membership.voter_ids().collect();
        let learners: Vec<NodeId> = membership.learner_ids().collect();
        Status {
            node_id: self.id,
            role: role_name(m.state),
            term: m.current_term,
            leader: m.current_leader,
            commit_index: committed,
            applied_index: m.last_applied.map(|l| l.index),
            last_log_index: m.last_log_index,
            members: members.into_iter().collect(),
            learners,
        }
    }

    /// Waits until this node has applied everything the leader had committed when asked (see
    /// "Reads" in the module docs); at most `cluster.commit_timeout_ms`.
    ///
    /// # Errors
    /// No leader answered in time (no quorum, or this node is cut off), in words.
    pub async fn read_barrier(self: &Arc<Self>) -> Result<(), String> {
        let me = self.clone();
        self.rt.spawn(async move { me.barrier().await }).await.unwrap_or_else(|e| Err(format!("the read barrier failed: {e}")))
    }

    async fn barrier(self: Arc<Self>) -> Result<(), String> {
        let deadline = Instant::now() + self.commit_timeout;
        let index = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err("no leader confirmed its commit index in time".into());
            }
            let leader = self.raft.metrics().borrow().current_leader;
            match leader {
                Some(l) if l == self.id => match tokio::time::timeout(left, self.raft.get_read_log_id()).await {
                    Ok(Ok((read, _))) => break read.map(|l| l.index),
                    Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(_)))) | Ok(Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(_)))) => {}
                    Ok(Err(e)) => return Err(format!("the read index: {e}")),
                    Err(_) => return Err("no quorum confirmed this leader in time".into()),
                },
                Some(l) => match self.peers.call(l, self.known(l).as_deref(), &Request::ReadIndex, left).await {
                    Ok(Response::ReadIndex { index }) => break index,
                    Ok(Response::NotLeader { .. }) | Err(CallError::Unreachable(..)) => {}
                    Ok(r) => return Err(format!("the leader answered the read index with {r:?}")),
                    Err(e) => return Err(e.to_string()),
                },
                None => {}
            }
            self.await_change(Duration::from_millis(20).min(left)).await;
        };
        let left = deadline.saturating_duration_since(Instant::now());
        self.raft
            .wait(Some(left))
            .applied_index_at_least(index, "read barrier")
            .await
            .map(|_| ())
            .map_err(|e| format!("this node did not apply the read index {index:?} in time: {e}"))
    }

    /// The node-to-node address of `id` in the current membership (for a node that this node's
    /// `cluster.peers` does not name: one added with `parley cluster add`).
    fn known(&self, id: NodeId) -> Option<String> {
        let m = self.raft.metrics().borrow().membership_config.clone();
        m.membership().get_node(&id).map(|n| n.addr.clone())
    }

    /// Whether `id` is a voter of the membership this node knows.
    fn is_voter(&self, id: NodeId) -> bool {
        let m = self.raft.metrics().borrow().membership_config.clone();
        m.membership().voter_ids().any(|v| v == id)
    }

    /// Whether this node is in the membership it knows (a node removed from the cluster is not).
    pub fn is_member(&self) -> bool {
        let m = self.raft.metrics().borrow().membership_config.clone();
        m.membership().get_node(&self.id).is_some()
    }

    /// On the leader: waits until learner `id` has replicated up to the leader's last log index
    /// as it was when asked, at most `within`.
    async fn caught_up(&self, id: NodeId, within: Duration) -> Result<(), String> {
        let target = self.raft.metrics().borrow().last_log_index;
        let deadline = Instant::now() + within;
        loop {
            let m = self.raft.metrics().borrow().clone();
            let matched = m.replication.as_ref().and_then(|r| r.get(&id).cloned()).flatten().map(|l| l.index);
            if matched >= target {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!("replicated up to {matched:?} of {target:?} in {} s", within.as_secs()));
            }
            self.await_change(Duration::from_millis(100).min(left)).await;
        }
    }

    /// Waits for a change of the metrics (a new leader, say), at most `d`.
    async fn await_change(&self, d: Duration) {
        let mut rx = self.raft.metrics();
        let _ = tokio::time::timeout(d, rx.changed()).await;
    }

    /// Proposes `batch` until a leader took it into its log, or the deadline passes. `Ok` when
    /// a leader accepted it (it may still fail to commit), `Err` when it certainly was not
    /// taken (the waiter then decides nothing will come).
    async fn submit(&self, batch: &Batch, deadline: Instant) -> Result<(), ()> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(());
            }
            let leader = self.raft.metrics().borrow().current_leader;
            match leader {
                Some(l) if l == self.id => match tokio::time::timeout(left, self.raft.client_write(batch.clone())).await {
                    Ok(Ok(_)) => return Ok(()),
                    Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))) => {}
                    // Stopped, or the time ran out: it may be in this node's log.
                    Ok(Err(_)) | Err(_) => return Ok(()),
                },
                Some(l) => match self.peers.call(l, self.known(l).as_deref(), &Request::Propose(batch.clone()), left).await {
                    Ok(Response::Proposed { .. }) => return Ok(()),
                    Ok(Response::NotLeader { .. }) | Err(CallError::Unreachable(..)) => {}
                    // Sent, with no clear answer: it may be in the leader's log.
                    Ok(_) | Err(CallError::NoAnswer(..)) => return Ok(()),
                },
                None => {}
            }
            self.await_change(Duration::from_millis(20).min(left)).await;
        }
    }

    /// Proposes `batch` and waits for its outcomes until `deadline`. When the leader changes
    /// while it waits (the old one died or was cut off, and may never commit it), the same batch
    /// is proposed to the new leader: should both copies commit, the first one applied takes
    /// effect and answers the waiter, and the state machine skips the second
    /// (`State::apply_batch_once`: batch names are remembered for `RAFT_BATCH_WINDOW` entries,
    /// the Raft paper §8's client serial numbers), so even a command that is not idempotent
    /// (a group add after a remove) takes effect once.
    async fn settle(&self, batch: &Batch, mut rx: oneshot::Receiver<Vec<Outcome>>, deadline: Instant) -> Option<Vec<Outcome>> {
        let mut metrics = self.raft.metrics();
        for _ in 0..16 {
            let leader = self.raft.metrics().borrow().current_leader;
            if self.submit(batch, deadline).await.is_err() {
                return None;
            }
            loop {
                tokio::select! {
                    r = &mut rx => return r.ok(),
                    _ = tokio::time::sleep_until(deadline.into()) => return None,
                    changed = metrics.changed() => {
                        if changed.is_err() {
                            return None;
                        }
                        let now = metrics.borrow().current_leader;
                        if now.is_some() && now != leader {
                            tracing::info!(old = ?leader, new = ?now, "the leader changed while a batch waited: proposing it again");
                            break;
                        }
                    }
                }
            }
        }
        tokio::time::timeout_at(deadline.into(), rx).await.ok().and_then(Result::ok)
    }

    async fn propose_async(self: Arc<Self>, entry: Vec<u8>, replies: Vec<Reply>, permit: tokio::sync::OwnedSemaphorePermit) {
        let id: u64 = rand::random();
        let rx = self.waiters.wait(id);
        let batch = Batch { origin: self.id, id, entry };
        let deadline = Instant::now() + self.commit_timeout;
        let outcomes = self.settle(&batch, rx, deadline).await;
        self.waiters.forget(id);
        drop(permit);
        match outcomes {
            Some(outcomes) if outcomes.len() == replies.len() => {
                for (reply, o) in replies.into_iter().zip(outcomes) {
                    let _ = reply.send(Ok(o));
                }
            }
            Some(outcomes) => {
                tracing::error!(commands = replies.len(), outcomes = outcomes.len(), "a batch's outcomes do not match its commands; answering unavailable");
                for reply in replies {
                    let _ = reply.send(Err(PipelineError::Unavailable));
                }
            }
            None => {
                metrics::counter!("parley_cluster_unavailable_total").increment(replies.len() as u64);
                for reply in replies {
                    let _ = reply.send(Err(PipelineError::Unavailable));
                }
            }
        }
    }

    /// The start-up initialization (see the module docs). Runs until the node is initialized
    /// or learns that another node holds a log.
    async fn bootstrap(self: Arc<Self>) {
        let lowest = self.configured.keys().next().copied();
        if lowest != Some(self.id) {
            return;
        }
        for attempt in 0u64.. {
            if self.stopping.load(Ordering::Relaxed) {
                return;
            }
            match self.raft.is_initialized().await {
                Ok(true) => return,
                Ok(false) => {}
                Err(_) => return,
            }
            let mut all_empty = true;
            for p in self.peers.others() {
                match self.peers.call(p, None, &Request::Probe, Duration::from_millis(500)).await {
                    Ok(Response::Probe { initialized: false }) => {}
                    Ok(Response::Probe { initialized: true }) => {
                        tracing::info!(peer = p, "a peer holds a log: waiting for the leader to replicate to this node");
                        return;
                    }
                    _ => all_empty = false,
                }
            }
            if all_empty {
                // This node's own entry may name port 0 (tests); the membership gets the address
                // it is listening on, which nodes added later dial.
                let members: BTreeMap<NodeId, BasicNode> = self
                    .configured
                    .iter()
                    .map(|(&id, a)| (id, BasicNode::new(if id == self.id && a.ends_with(":0") { self.listening.clone() } else { a.clone() })))
                    .collect();
                match self.raft.initialize(members).await {
                    Ok(()) => tracing::info!(members = ?self.configured.keys().collect::<Vec<_>>(), "initialized the cluster's membership"),
                    Err(e) => tracing::warn!(error = %e, "initialize"),
                }
                return;
            }
            if attempt % 20 == 0 {
                tracing::info!("waiting for every peer to answer before initializing the cluster");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Adds node `id` at `addr` as a voter (a learner first, caught up, then a membership
    /// change), through the leader.
    ///
    /// # Errors
    /// No leader, or the change failed, in words.
    pub async fn add_member(self: &Arc<Self>, id: NodeId, addr: String) -> Result<(), String> {
        self.to_leader(Request::AddMember { id, addr }).await
    }

    /// Removes voter `id`, through the leader.
    ///
    /// # Errors
    /// No leader, or the change failed, in words.
    pub async fn remove_member(self: &Arc<Self>, id: NodeId) -> Result<(), String> {
        self.to_leader(Request::RemoveMember { id }).await
    }

    async fn to_leader(self: &Arc<Self>, req: Request) -> Result<(), String> {
        let me = self.clone();
        self.rt
            .spawn(async move {
                let leader = me.raft.metrics().borrow().current_leader.ok_or("no leader")?;
                let r = if leader == me.id { me.clone().handle(req).await } else { me.peers.call(leader, me.known(leader).as_deref(), &req, Duration::from_secs(60)).await.map_err(|e| e.to_string())? };
                match r {
                    Response::Done => Ok(()),
                    Response::Error(e) => Err(e),
                    Response::NotLeader { leader } => Err(format!("the leader changed (now {leader:?}); retry")),
                    r => Err(format!("unexpected answer {r:?}")),
                }
            })
            .await
            .map_err(|e| e.to_string())?
    }

    /// Tells every peer `g` (fire and forget).
    pub fn broadcast(self: &Arc<Self>, g: Gossip) {
        let me = self.clone();
        self.rt.spawn(async move {
            let members: Vec<(NodeId, String)> = {
                let m = me.raft.metrics().borrow().membership_config.clone();
                m.nodes().map(|(id, n)| (*id, n.addr.clone())).collect()
            };
            let mut ids: BTreeMap<NodeId, Option<String>> = me.peers.others().into_iter().map(|id| (id, None)).collect();
            for (id, a) in members {
                if id != me.id {
                    ids.entry(id).or_insert(Some(a));
                }
            }
            let from = me.id;
            for (id, addr) in ids {
                let (p, g) = (me.peers.clone(), g.clone());
                tokio::spawn(async move {
                    let _ = p.call(id, addr.as_deref(), &Request::Gossip { from, g }, Duration::from_secs(2)).await;
                });
            }
        });
    }

    /// Stops openraft (no more votes, appends or applies).
    pub async fn shutdown(self: &Arc<Self>) {
        self.stopping.store(true, Ordering::Relaxed);
        let me = self.clone();
        let _ = self.rt.spawn(async move { me.raft.shutdown().await }).await;
    }

    fn gossip_from(&self, from: NodeId, g: Gossip) {
        let sink = self.gossip.lock().clone();
        if let Some(s) = sink {
            s.gossip(from, g);
        }
    }
}

fn role_name(s: ServerState) -> &'static str {
    match s {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Candidate => "candidate",
        ServerState::Learner => "learner",
        ServerState::Shutdown => "shutdown",
    }
}

impl Replicator for Node {
    fn propose(self: Arc<Self>, entry: &LogEntry, replies: Vec<Reply>) {
        let bytes = match encode(entry) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "cannot encode a batch");
                for r in replies {
                    let _ = r.send(Err(PipelineError::Unavailable));
                }
                return;
            }
        };
        let sem = self.in_flight.clone();
        // Blocks the batcher while IN_FLIGHT proposals run: its next batch grows meanwhile.
        let permit = match self.rt.block_on(sem.acquire_owned()) {
            Ok(p) => p,
            Err(_) => {
                for r in replies {
                    let _ = r.send(Err(PipelineError::Unavailable));
                }
                return;
            }
        };
        let rt = self.rt.clone();
        rt.spawn(self.propose_async(bytes, replies, permit));
    }

    /// A leader is known and, on the leader, a quorum acknowledged it within an election
    /// timeout (a leader cut off from the majority keeps its role in openraft 0.9 until it
    /// hears a higher term; it is unhealthy meanwhile).
    fn healthy(&self) -> bool {
        let m = self.raft.metrics().borrow().clone();
        let quorum_ok = m.state != ServerState::Leader || m.millis_since_quorum_ack.is_some_and(|ms| ms < self.election_ms.saturating_mul(2));
        let member = m.membership_config.membership().get_node(&self.id).is_some();
        m.running_state.is_ok() && m.current_leader.is_some() && quorum_ok && member
    }
}

impl Handler for Node {
    async fn handle(self: Arc<Self>, req: Request) -> Response {
        use super::network::remote_error;
        match req {
            Request::Append(r) => self.raft.append_entries(r).await.map_or_else(remote_error, Response::Append),
            Request::Vote(r) => self.raft.vote(r).await.map_or_else(remote_error, Response::Vote),
            Request::Snapshot(r) => self.raft.install_snapshot(r).await.map_or_else(remote_error, Response::Snapshot),
            Request::Propose(b) => match self.raft.client_write(b).await {
                Ok(w) => Response::Proposed { index: w.log_id.index },
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => Response::NotLeader { leader: f.leader_id },
                Err(e) => remote_error(e),
            },
            Request::ReadIndex => match self.raft.get_read_log_id().await {
                Ok((read, _)) => Response::ReadIndex { index: read.map(|l| l.index) },
                Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => Response::NotLeader { leader: f.leader_id },
                // No quorum confirmed this leader yet (a membership change, a slow follower):
                // the asking node retries until its deadline, as a local read would.
                Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(_))) => Response::NotLeader { leader: Some(self.id) },
                Err(e) => remote_error(e),
            },
            Request::Probe => Response::Probe { initialized: self.raft.is_initialized().await.unwrap_or(true) },
            Request::AddMember { id, addr } => {
                if self.is_voter(id) {
                    return Response::Error(format!("node {id} is a voter already"));
                }
                if let Err(e) = self.raft.add_learner(id, BasicNode::new(addr.clone()), true).await {
                    return leader_error(e);
                }
                // A voter that is not there would make every later failure fatal (4 voters, one
                // missing: one more down and there is no quorum): it becomes a voter only once
                // it caught up as a learner; else it is dropped again.
                if let Err(why) = self.caught_up(id, LEARNER_CATCH_UP).await {
                    let _ = self.raft.change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([id])), false).await;
                    return Response::Error(format!("node {id} at {addr} did not catch up as a learner ({why}); it was not added"));
                }
                match self.raft.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false).await {
                    Ok(_) => Response::Done,
                    Err(e) => leader_error(e),
                }
            }
            Request::RemoveMember { id } => {
                if !self.is_voter(id) {
                    return Response::Error(format!("node {id} is not a voter of this cluster"));
                }
                match self.raft.change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([id])), false).await {
                    Ok(_) => Response::Done,
                    Err(e) => leader_error(e),
                }
            }
            Request::Gossip { from, g } => {
                self.gossip_from(from, g);
                Response::Done
            }
        }
    }
}

fn leader_error(e: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>) -> Response {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => Response::NotLeader { leader: f.leader_id },
        e => Response::Error(e.to_string()),
    }
}
