//! Node-to-node RPC: parley's own listener (`cluster.listen`), postcard bodies, and a bounded
//! queue per peer and lane, so that a sick node backs up only its own traffic.
//!
//! # Wire format
//!
//! A connection carries frames both ways: `len: u32 BE | id: u64 BE | body`, where `len` counts
//! `id` and `body` (at most [`MAX_FRAME`] bytes) and `body` is a postcard [`Request`] (dialer →
//! listener) or [`Response`] (back, with the request's `id`). Requests on one connection are
//! handled concurrently and answered in any order (the id matches them up), so a forwarded write
//! waiting for its commit does not hold up the next one.
//!
//! # Lanes
//!
//! Each peer has two [`Lane`]s, each one connection with its own bounded queue
//! ([`LANE_QUEUE`] calls) and its own task: `raft` (append entries, votes, snapshot chunks:
//! openraft's replication) and `client` (forwarded writes, read indexes, probes, membership
//! changes, presence and typing). A full queue or a dead peer fails the call at once
//! ([`CallError::Unreachable`]); openraft then backs off (`RaftNetwork::backoff`).
//!
//! The shape follows openraft's `raft-kv-memstore` example (`/append`, `/vote`, `/snapshot`
//! handlers that call `Raft::append_entries`, `vote` and `install_snapshot`), on a plain TCP
//! framing instead of HTTP + JSON.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest, VoteResponse};
use openraft::{AnyError, BasicNode};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use super::types::{Batch, NodeId, TypeConfig};

/// Largest frame, bytes (a snapshot chunk or a run of append entries fits well inside).
pub const MAX_FRAME: usize = 64 << 20;
/// Most entry bytes in one AppendEntries (beyond its first entry), bytes.
pub const MAX_APPEND_BYTES: usize = 512 << 10;
/// Calls queued per peer and lane before a call fails as unreachable.
pub const LANE_QUEUE: usize = 256;
/// How long a dial may take, ms.
const CONNECT_MS: u64 = 500;

/// A request from one node to another.
#[derive(Debug, Serialize, Deserialize)]
pub enum Request {
    /// Raft AppendEntries (Raft paper §5.3).
    Append(AppendEntriesRequest<TypeConfig>),
    /// Raft RequestVote (§5.2).
    Vote(VoteRequest<NodeId>),
    /// One chunk of a snapshot (§7; openraft's chunked transport).
    Snapshot(InstallSnapshotRequest<TypeConfig>),
    /// To the leader: propose this batch (`Raft::client_write`); answered once committed.
    Propose(Batch),
    /// To the leader: its read index (the Raft paper §6.4 read-only queries: the commit index,
    /// confirmed by a heartbeat round to a quorum).
    ReadIndex,
    /// Start-up: is your log or vote non-empty? (The lowest id initializes the membership only
    /// when every peer answers no.)
    Probe,
    /// To the leader: add a voter (as a learner first, then a membership change).
    AddMember { id: NodeId, addr: String },
    /// To the leader: remove a voter.
    RemoveMember { id: NodeId },
    /// Presence and typing, broadcast to every peer (not through Raft), from node `from`.
    Gossip { from: NodeId, g: Gossip },
}

/// Presence and typing between nodes: each node tells the others what its own sessions do
/// (not through Raft: presence is not messaging state, and a lost gossip costs a stale dot).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Gossip {
    /// Users whose number of online devices on the sending node changed (0: none left), as of
    /// `at_ms` (ms since the Unix epoch; a user that went to 0 was last seen then).
    Presence { changes: Vec<(String, u32)>, at_ms: u64 },
    /// The sending node's whole presence table (every user with devices online there), sent
    /// every second: it replaces what the receiver knew of that node, and its absence for
    /// [`crate::actors::presence::REMOTE_TTL_MS`] takes that node's users offline (a dead node
    /// takes its sessions' presence with it).
    Table { online: Vec<(String, u32)>, at_ms: u64 },
    /// A typing notification to relay to `to`'s devices on the receiving node.
    Typing { to: Vec<String>, from: String, conv: String, state: crate::protocol::TypingState },
}

/// An answer.
#[derive(Debug, Serialize, Deserialize)]
pub enum Response {
    Append(AppendEntriesResponse<NodeId>),
    Vote(VoteResponse<NodeId>),
    Snapshot(InstallSnapshotResponse<NodeId>),
    /// The proposal is committed at this Raft index.
    Proposed { index: u64 },
    /// The leader's read index (Raft index; `None` before anything was committed).
    ReadIndex { index: Option<u64> },
    /// Whether this node's log or vote holds anything.
    Probe { initialized: bool },
    /// Done (membership change, gossip).
    Done,
    /// This node is not the leader; the one it knows of, if any.
    NotLeader { leader: Option<NodeId> },
    /// The call failed on the remote node, in words.
    Error(String),
}

/// Why a call got no response.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    /// Not sent: the peer is unknown, its queue is full, or it cannot be dialed.
    #[error("peer {0} is unreachable: {1}")]
    Unreachable(NodeId, String),
    /// Sent, but no answer came (the connection broke or the time ran out): the request may
    /// or may not have taken effect.
    #[error("peer {0} did not answer: {1}")]
    NoAnswer(NodeId, String),
}

struct Call {
    body: Vec<u8>,
    reply: oneshot::Sender<Result<Vec<u8>, CallError>>,
}

/// One connection to one peer, with its bounded queue (see the module docs).
#[derive(Clone)]
pub struct Lane {
    tx: mpsc::Sender<Call>,
    peer: NodeId,
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Vec<u8>, CallError>>>>>;

impl Lane {
    fn start(peer: NodeId, addr: String) -> Lane {
        let (tx, rx) = mpsc::channel(LANE_QUEUE);
        tokio::spawn(lane_task(peer, addr, rx));
        Lane { tx, peer }
    }

    /// Sends `req` and waits up to `ttl` for its response.
    pub async fn call(&self, req: &Request, ttl: Duration) -> Result<Response, CallError> {
        let body = postcard::to_allocvec(req).map_err(|e| CallError::Unreachable(self.peer, format!("cannot encode: {e}")))?;
        let (reply, rx) = oneshot::channel();
        self.tx.try_send(Call { body, reply }).map_err(|e| {
            let why = match e {
                mpsc::error::TrySendError::Full(_) => "its queue is full",
                mpsc::error::TrySendError::Closed(_) => "its lane stopped",
            };
            CallError::Unreachable(self.peer, why.into())
        })?;
        let bytes = match tokio::time::timeout(ttl, rx).await {
            Ok(Ok(r)) => r?,
            Ok(Err(_)) => return Err(CallError::NoAnswer(self.peer, "the lane dropped the call".into())),
            Err(_) => return Err(CallError::NoAnswer(self.peer, format!("no answer within {} ms", ttl.as_millis()))),
        };
        postcard::from_bytes(&bytes).map_err(|e| CallError::NoAnswer(self.peer, format!("undecodable answer: {e}")))
    }
}

/// The lane's task: dials on demand, writes calls in queue order, and hands each response to
/// its caller (a reader task per connection).
async fn lane_task(peer: NodeId, addr: String, mut rx: mpsc::Receiver<Call>) {
    let mut next_id: u64 = 1;
    let mut conn: Option<(tokio::net::tcp::OwnedWriteHalf, Pending, Arc<std::sync::atomic::AtomicBool>)> = None;
    while let Some(call) = rx.recv().await {
        if conn.as_ref().is_some_and(|(_, _, dead)| dead.load(std::sync::atomic::Ordering::Acquire)) {
            conn = None;
        }
        if conn.is_none() {
            match tokio::time::timeout(Duration::from_millis(CONNECT_MS), TcpStream::connect(&addr)).await {
                Ok(Ok(s)) => {
                    let _ = s.set_nodelay(true);
                    let (r, w) = s.into_split();
                    let pending: Pending = Arc::default();
                    let dead = Arc::new(std::sync::atomic::AtomicBool::new(false));
                    tokio::spawn(read_responses(peer, r, pending.clone(), dead.clone()));
                    conn = Some((w, pending, dead));
                }
                Ok(Err(e)) => {
                    let _ = call.reply.send(Err(CallError::Unreachable(peer, format!("cannot connect to {addr}: {e}"))));
                    continue;
                }
                Err(_) => {
                    let _ = call.reply.send(Err(CallError::Unreachable(peer, format!("cannot connect to {addr} within {CONNECT_MS} ms"))));
                    continue;
                }
            }
        }
        let Some((w, pending, dead)) = conn.as_mut() else { continue };
        let id = next_id;
        next_id += 1;
        pending.lock().insert(id, call.reply);
        if let Err(e) = w.write_all(&frame(id, &call.body)).await {
            dead.store(true, std::sync::atomic::Ordering::Release);
            fail_all(pending, &CallError::NoAnswer(peer, format!("write to {addr}: {e}")));
            conn = None;
        }
    }
}

fn fail_all(pending: &Pending, err: &CallError) {
    for (_, reply) in pending.lock().drain() {
        let _ = reply.send(Err(err.clone()));
    }
}

async fn read_responses(peer: NodeId, mut r: tokio::net::tcp::OwnedReadHalf, pending: Pending, dead: Arc<std::sync::atomic::AtomicBool>) {
    let why = loop {
        match read_frame(&mut r).await {
            Ok((id, body)) => {
                if let Some(reply) = pending.lock().remove(&id) {
                    let _ = reply.send(Ok(body));
                }
            }
            Err(e) => break e,
        }
    };
    dead.store(true, std::sync::atomic::Ordering::Release);
    fail_all(&pending, &CallError::NoAnswer(peer, format!("connection lost: {why}")));
}

/// One frame: `len: u32 BE | id: u64 BE | body` (see the module docs).
fn frame(id: u64, body: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(12 + body.len());
    f.extend_from_slice(&((8 + body.len()) as u32).to_be_bytes());
    f.extend_from_slice(&id.to_be_bytes());
    f.extend_from_slice(body);
    f
}

/// Reads one frame written by [`frame`]: `(id, body)`.
pub async fn read_frame<R: AsyncReadExt + Unpin>(r: &mut R) -> std::io::Result<(u64, Vec<u8>)> {
    let len = r.read_u32().await? as usize;
    if !(8..=MAX_FRAME).contains(&len) {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("a frame of {len} bytes (8 to {MAX_FRAME} allowed)")));
    }
    let id = r.read_u64().await?;
    let mut body = vec![0; len - 8];
    r.read_exact(&mut body).await?;
    Ok((id, body))
}

/// Every peer's lanes, by node id. Addresses come from this node's `cluster.peers` first (so
/// each node may reach a peer its own way, e.g. through a test's fault proxy), then from the
/// membership (nodes added with `parley cluster add`).
pub struct Peers {
    me: NodeId,
    configured: BTreeMap<NodeId, String>,
    lanes: Mutex<HashMap<(NodeId, bool), (String, Lane)>>,
}

impl Peers {
    /// `configured` is `cluster.peers` (this node's own entry is never dialed).
    pub fn new(me: NodeId, configured: BTreeMap<NodeId, String>) -> Arc<Peers> {
        Arc::new(Peers { me, configured, lanes: Mutex::new(HashMap::new()) })
    }

    /// The configured peers other than this node.
    pub fn others(&self) -> Vec<NodeId> {
        self.configured.keys().copied().filter(|&id| id != self.me).collect()
    }

    /// The address to dial `id` at: configured, else `known` (from the membership).
    fn addr(&self, id: NodeId, known: Option<&str>) -> Option<String> {
        self.configured.get(&id).cloned().or_else(|| known.map(str::to_owned))
    }

    /// The lane to `id` (`raft`: replication; else the client lane), started on first use;
    /// `None` for an unknown peer.
    pub fn lane(&self, id: NodeId, raft: bool, known: Option<&str>) -> Option<Lane> {
        let addr = self.addr(id, known)?;
        let mut lanes = self.lanes.lock();
        match lanes.get(&(id, raft)) {
            Some((a, l)) if *a == addr && !l.tx.is_closed() => Some(l.clone()),
            _ => {
                let l = Lane::start(id, addr.clone());
                lanes.insert((id, raft), (addr, l.clone()));
                Some(l)
            }
        }
    }

    /// Sends `req` on the client lane of `id`.
    pub async fn call(&self, id: NodeId, known: Option<&str>, req: &Request, ttl: Duration) -> Result<Response, CallError> {
        match self.lane(id, false, known) {
            Some(l) => l.call(req, ttl).await,
            None => Err(CallError::Unreachable(id, "no address for it in cluster.peers or the membership".into())),
        }
    }
}

/// openraft's network factory: one [`Conn`] per replication target.
pub struct Network {
    pub peers: Arc<Peers>,
}

/// A connection to one target for openraft (its `raft` lane).
pub struct Conn {
    target: NodeId,
    addr: String,
    peers: Arc<Peers>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Conn;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Conn {
        Conn { target, addr: node.addr.clone(), peers: self.peers.clone() }
    }
}

type RpcErr<E = openraft::error::Infallible> = RPCError<NodeId, BasicNode, RaftError<NodeId, E>>;

impl Conn {
    async fn call<E: std::error::Error>(&self, req: Request, option: &RPCOption) -> Result<Response, RpcErr<E>> {
        let Some(lane) = self.peers.lane(self.target, true, Some(&self.addr)) else {
            return Err(RPCError::Unreachable(Unreachable::new(&AnyError::error(format!("no address for node {}", self.target)))));
        };
        match lane.call(&req, option.hard_ttl()).await {
            Ok(Response::Error(e)) => Err(RPCError::Network(NetworkError::new(&AnyError::error(e)))),
            Ok(r) => Ok(r),
            Err(e @ CallError::Unreachable(..)) => Err(RPCError::Unreachable(Unreachable::new(&AnyError::new(&e)))),
            Err(e @ CallError::NoAnswer(..)) => Err(RPCError::Network(NetworkError::new(&AnyError::new(&e)))),
        }
    }
}

fn unexpected<E: std::error::Error>(what: &str, r: Response) -> RpcErr<E> {
    RPCError::Network(NetworkError::new(&AnyError::error(format!("a {what} call was answered {r:?}"))))
}

impl RaftNetwork<TypeConfig> for Conn {
    /// Sends at most [`MAX_APPEND_BYTES`] of entries (or one entry): a larger request is
    /// answered `PayloadTooLarge` with the number of entries that fit, and openraft sends that
    /// many at once instead. openraft 0.9 gives every AppendEntries `heartbeat_ms` to be
    /// answered, follower fsync included; a request of many large batches would time out on
    /// every try, and the follower would never catch up.
    async fn append_entries(&mut self, rpc: AppendEntriesRequest<TypeConfig>, option: RPCOption) -> Result<AppendEntriesResponse<NodeId>, RpcErr> {
        let mut bytes = 0usize;
        for (i, e) in rpc.entries.iter().enumerate() {
            bytes += match &e.payload {
                openraft::EntryPayload::Normal(b) => b.entry.len() + 32,
                _ => 256,
            };
            if bytes > MAX_APPEND_BYTES && i > 0 {
                return Err(RPCError::PayloadTooLarge(openraft::error::PayloadTooLarge::new_entries_hint(i as u64)));
            }
        }
        match self.call(Request::Append(rpc), &option).await? {
            Response::Append(r) => Ok(r),
            r => Err(unexpected("append", r)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RpcErr<InstallSnapshotError>> {
        match self.call(Request::Snapshot(rpc), &option).await? {
            Response::Snapshot(r) => Ok(r),
            r => Err(unexpected("snapshot", r)),
        }
    }

    async fn vote(&mut self, rpc: VoteRequest<NodeId>, option: RPCOption) -> Result<VoteResponse<NodeId>, RpcErr> {
        match self.call(Request::Vote(rpc), &option).await? {
            Response::Vote(r) => Ok(r),
            r => Err(unexpected("vote", r)),
        }
    }

    fn backoff(&self) -> openraft::network::Backoff {
        // A dead peer is retried every 500 ms (openraft's default): a restarted node is back in the cluster quickly.
        openraft::network::Backoff::new(std::iter::repeat(Duration::from_millis(500)))
    }
}

/// What answers requests on this node's listener.
pub trait Handler: Send + Sync + 'static {
    /// Answers one request (called concurrently, one task per request).
    fn handle(self: Arc<Self>, req: Request) -> impl std::future::Future<Output = Response> + Send;
}

/// Accepts node-to-node connections on `listener` and answers their requests with `handler`.
pub async fn serve<H: Handler>(listener: tokio::net::TcpListener, handler: Arc<H>) {
    loop {
        let (s, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "cluster listener: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = s.set_nodelay(true);
        tokio::spawn(connection(s, peer, handler.clone()));
    }
}

async fn connection<H: Handler>(s: TcpStream, peer: std::net::SocketAddr, handler: Arc<H>) {
    let (mut r, mut w) = s.into_split();
    let (tx, mut rx) = mpsc::channel::<(u64, Vec<u8>)>(LANE_QUEUE);
    let writer = tokio::spawn(async move {
        while let Some((id, body)) = rx.recv().await {
            if w.write_all(&frame(id, &body)).await.is_err() {
                return;
            }
        }
    });
    loop {
        let (id, body) = match read_frame(&mut r).await {
            Ok(f) => f,
            Err(e) => {
                if e.kind() != std::io::ErrorKind::UnexpectedEof {
                    tracing::debug!(%peer, error = %e, "cluster connection closed");
                }
                break;
            }
        };
        let req: Request = match postcard::from_bytes(&body) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "an undecodable node-to-node request; closing the connection");
                break;
            }
        };
        let (h, tx) = (handler.clone(), tx.clone());
        tokio::spawn(async move {
            let resp = h.handle(req).await;
            match postcard::to_allocvec(&resp) {
                Ok(b) => {
                    let _ = tx.send((id, b)).await;
                }
                Err(e) => tracing::error!(error = %e, "cannot encode a node-to-node response"),
            }
        });
    }
    drop(tx);
    let _ = writer.await;
}

/// The error type openraft's RPC handlers return, for [`Response::Error`].
pub fn remote_error<E: std::fmt::Display>(e: E) -> Response {
    Response::Error(e.to_string())
}

