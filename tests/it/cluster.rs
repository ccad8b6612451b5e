//! The 3-node cluster (issue 12): real `parley` processes on 127.0.0.1 with fault proxies on
//! every node-to-node link ([`crate::common::cluster`]), clients talking to any node.
//!
//! - forming from configuration alone: one leader all agree on, `healthz` and `cluster status`;
//! - read-your-writes on a lagging follower; monotonic reads (history, stream head, cursor) for
//!   a client moving between nodes;
//! - the leader `kill -9`ed or stopped by SIGTERM under load, the leader and a follower killed at
//!   once, the whole cluster killed: nothing acked lost, nothing twice, seq gapless and ts in
//!   order, every node's history identical (failover times printed); the same load over slow
//!   links;
//! - the leader (cut or black-holed) or a follower cut off by a partition: no ack from the
//!   minority, its clients told so, a leader in the majority, convergence after the heal;
//! - a proposal pending across a leader change takes effect once;
//! - presence and typing across nodes, and a dead node's users going offline;
//! - a wiped follower catching up by a multi-chunk snapshot, also under load;
//! - `parley cluster add|remove` of a fourth node, and remove of the leader;
//! - `parley load chat` spread over the three nodes (and `--url` lists on one server).
//!
//! Every wait polls a condition under a deadline; nothing sleeps to synchronise.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use parley::protocol::ids::Conv;
use parley::protocol::{ClientFrame, Encoding, ErrorCode, MessageView, Request, ServerFrame};
use serde_json::Value;

use crate::common::cluster::{Cluster, ADMIN_TOKEN, DEADLINE, POLL};
use crate::common::proxy::Mode;
use crate::common::{assert_load_kept_every_promise, dialog, hello_stored, http, parley_load_json, within, Client, Incoming, LiveStream, Sent, Server, TestDir, T};

// ---------------------------------------------------------------------------------- helpers

/// Runs the binary under test with `args` to its end (within [`T`]); returns (success, stdout,
/// stderr).
async fn parley(args: &[&str]) -> (bool, String, String) {
    let out = within(
        T,
        &format!("parley {args:?}"),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_parley")).args(args).kill_on_drop(true).output(),
    )
    .await
    .expect("run parley");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// `parley cluster status --url URL` as a map of its `key value` lines.
async fn cli_status(url: &str) -> BTreeMap<String, String> {
    let (ok, out, err) = parley(&["cluster", "status", "--url", url]).await;
    assert!(ok, "parley cluster status --url {url} failed:\n{out}\n{err}");
    out.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let (k, v) = l.split_once(char::is_whitespace).unwrap_or((l, ""));
            (k.to_owned(), v.trim().to_owned())
        })
        .collect()
}

/// Polls `cond` every [`POLL`] until it holds, within [`DEADLINE`].
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < DEADLINE, "no {what} within {DEADLINE:?}");
        tokio::time::sleep(POLL).await;
    }
}

/// The comparable part of a stored message.
type Row = (u64, String, String, String, u64);

fn rows(ms: &[MessageView]) -> Vec<Row> {
    ms.iter().map(|m| (m.seq, m.from.clone(), m.id.clone(), m.body.clone(), m.ts)).collect()
}

/// The whole history of each of `convs` as node `i` serves it, read by `reader(conv)`'s token.
async fn histories(c: &Cluster, i: usize, convs: &[String], token_of: &dyn Fn(&str) -> String) -> BTreeMap<String, Vec<MessageView>> {
    let mut out = BTreeMap::new();
    for conv in convs {
        let mut cl = Client::connect(c.addr(i), &token_of(conv), None, Encoding::Json).await.client;
        out.insert(conv.clone(), cl.history_all(conv).await);
        cl.close().await;
    }
    out
}

// ---------------------------------------------------------------------------------- forming

/// A fresh cluster forms from its configuration alone: one leader that every node names, the
/// others followers, the same term and members everywhere; `healthz` says each node's role and
/// the leader; `parley cluster status` prints the same as `/v1/cluster/status`. Node-to-node
/// traffic went through the proxies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_forms_without_an_init_step() {
    let c = Cluster::start(3, &[]).await;
    let l = c.wait_leader().await;
    assert!(c.proxied_bytes() > 0, "no node-to-node byte went through the proxies");
    // Every node's healthz says ok, its role, and the leader, at one moment between two waits
    // for a leader that agree (polled: a starved machine may see a spurious election or a
    // moment without a quorum acknowledgement in between; the check itself is never eased).
    let t0 = Instant::now();
    loop {
        let l = c.wait_leader().await;
        let mut hs = Vec::new();
        for i in 0..3 {
            hs.push(c.healthz(i).await);
        }
        let lid = c.nodes[l].id;
        let want = |i: usize| (200, Some("ok"), Some(if i == l { "leader" } else { "follower" }), Some(lid));
        let got: Vec<_> = hs.iter().map(|(st, h)| (*st, h["status"].as_str(), h["role"].as_str(), h["leader"].as_u64())).collect();
        if c.wait_leader().await == l && (0..3).all(|i| got[i] == want(i)) {
            break;
        }
        assert!(t0.elapsed() < DEADLINE, "healthz never agreed with the leader {lid} within {DEADLINE:?}: {hs:?}");
        tokio::time::sleep(POLL).await;
    }
    for i in 0..3 {
        let s = c.status(i).await.expect("status");
        assert_eq!(s.node_id, i as u64 + 1);
        assert_eq!(s.members, vec![1, 2, 3], "node {}: {s:?}", i + 1);
        assert!(s.term >= 1 && s.commit_index >= 1, "node {}: {s:?}", i + 1);
        assert!(s.applied_index <= s.commit_index && s.commit_index <= s.last_log_index, "node {}: {s:?}", i + 1);
        // The CLI against the same node, between two reads of the JSON that agree.
        let mut checked = false;
        for _ in 0..3 {
            let before = c.status(i).await.expect("status");
            let cli = cli_status(&c.url(i)).await;
            let after = c.status(i).await.expect("status");
            for k in ["node_id", "role", "term", "leader", "commit_index", "applied_index", "last_log_index", "members"] {
                assert!(cli.contains_key(k), "node {}: `parley cluster status` has no `{k}` line: {cli:?}", i + 1);
            }
            if (before.role.clone(), before.term, before.leader) != (after.role.clone(), after.term, after.leader) {
                continue;
            }
            assert_eq!(cli["node_id"], (i + 1).to_string(), "{cli:?}");
            assert_eq!(cli["role"], after.role, "{cli:?}");
            assert_eq!(cli["term"], after.term.to_string(), "{cli:?}");
            assert_eq!(cli["leader"], after.leader.map(|l| l.to_string()).unwrap_or_default(), "{cli:?}");
            assert_eq!(cli["members"], "1,2,3", "{cli:?}");
            for k in ["commit_index", "applied_index", "last_log_index"] {
                let v: u64 = cli[k].parse().unwrap_or_else(|_| panic!("{k} {:?} is not a number", cli[k]));
                let (lo, hi) = match k {
                    "commit_index" => (before.commit_index, after.commit_index),
                    "applied_index" => (before.applied_index, after.applied_index),
                    _ => (before.last_log_index, after.last_log_index),
                };
                assert!(lo <= v && v <= hi, "node {}: cli {k} {v} outside the JSON's {lo}..={hi}", i + 1);
            }
            checked = true;
            break;
        }
        assert!(checked, "node {}: the leader kept changing around `parley cluster status`", i + 1);
    }
    // Writes work through any node: a user registered on one node logs in on another.
    c.nodes[(l + 1) % 3].srv.register("early").await;
    let token = c.nodes[(l + 2) % 3].srv.login("early", "web").await;
    let s = Client::connect(c.addr(l), &token, None, Encoding::Json).await;
    assert_eq!(s.user, "early");
}

/// A single node has no cluster: `healthz` says `single` with no leader, `/v1/cluster/status`
/// is a JSON 404.
#[tokio::test(flavor = "multi_thread")]
async fn a_single_node_says_single_and_has_no_cluster_status() {
    let dir = TestDir::new();
    let srv = Server::start(&dir).await;
    assert!(srv.cluster.is_none(), "a single node printed a cluster listening line");
    let (st, h) = http(srv.addr, "GET", "/v1/healthz", None, None).await;
    assert_eq!((st, h["role"].as_str(), h["leader"].is_null()), (200, Some("single"), true), "{h}");
    let (st, b) = http(srv.addr, "GET", "/v1/cluster/status", None, None).await;
    assert_eq!(st, 404, "{b}");
    assert!(b["error"].is_string() && b["message"].is_string(), "not the JSON error body: {b}");
    // The CLI says so in one line and fails.
    let (ok, out, err) = parley(&["cluster", "status", "--url", &format!("http://{}", srv.addr)]).await;
    assert!(!ok && out.is_empty() && err.trim().lines().count() == 1, "cluster status on a single node: {out:?} {err:?}");
}

// ---------------------------------------------------------------------------------- reads

/// Read-your-writes on a follower that lags (its link from the leader delayed by 300 ms): each
/// ack comes only once the message is applied there, so history read at once shows it. Then a
/// client moving between nodes, sending on one and reading on the next at once, never sees its
/// history or its stream head go backwards, also on the lagging node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_your_writes_on_a_follower_and_monotonic_reads_across_nodes() {
    // A 300 ms link needs a heartbeat (openraft's per-AppendEntries timeout) above its round
    // trip: with the default 100 ms every AppendEntries to the lagging node times out, and it
    // only ever gets the first max_payload_entries after the last answered one.
    let c = Cluster::start(3, &[("PARLEY__CLUSTER__HEARTBEAT_MS", "800"), ("PARLEY__CLUSTER__ELECTION_TIMEOUT_MS", "2400")]).await;
    let l = c.wait_leader().await;
    let (f1, f2) = (c.others(l)[0], c.others(l)[1]);
    let ta = c.nodes[f1].srv.user("alice").await;
    c.nodes[f2].srv.register("bob").await;
    let conv = Conv::dm("alice", "bob").to_string();
    c.set_link(l, f1, Mode::Delay(Duration::from_millis(300)));

    let mut alice = Client::connect(c.addr(f1), &ta, None, Encoding::Json).await.client;
    let mut acked: Vec<(String, u64)> = Vec::new();
    for (k, body) in dialog(1, 8).into_iter().enumerate() {
        let id = format!("ryw-{k}");
        let t0 = Instant::now();
        let (cv, seq, _) = alice.send_acked(&id, "bob", &body).await;
        // The entry reaches this follower 300 ms after the leader sent it (its commit as late):
        // an ack sooner than that was not waiting for this node to apply it.
        assert!(t0.elapsed() >= Duration::from_millis(300), "{id} acked after {:?} by a follower 300 ms behind", t0.elapsed());
        assert_eq!(cv, conv);
        acked.push((id.clone(), seq));
        let h = alice.history_all(&conv).await;
        assert_eq!(h.last().map(|m| (m.id.as_str(), m.seq)), Some((id.as_str(), seq)), "history on the lagging follower right after the ack of {id}");
        assert_eq!(h.len(), acked.len());
    }
    alice.close().await;

    // Moving: send on one node, then at once read on the next (the lagging one included).
    let order = [l, f1, f2, f1, l, f2, f1];
    let (mut seen, mut head) = (acked.len(), 0u64);
    for (hop, w) in order.windows(2).enumerate() {
        let (from, to) = (w[0], w[1]);
        let mut s = Client::connect(c.addr(from), &ta, None, Encoding::Json).await;
        assert!(s.head >= head, "hop {hop}: node {} gives head {} after {head}", from + 1, s.head);
        let id = format!("move-{hop}");
        let (_, seq, _) = s.client.send_acked(&id, "bob", &dialog(hop + 50, 1)[0]).await;
        s.client.close().await;
        seen += 1;
        assert_eq!(seq as usize, seen, "acked seq of {id}");
        let mut r = Client::connect(c.addr(to), &ta, None, Encoding::Json).await;
        let h = r.client.history_all(&conv).await;
        assert_eq!(h.len(), seen, "hop {hop}: node {} shows {} messages right after {id} was acked on node {}", to + 1, h.len(), from + 1);
        assert_eq!(h.last().map(|m| m.id.as_str()), Some(id.as_str()));
        head = r.head;
        r.client.close().await;
    }

    // A cursor confirmed on one node holds on the next: bob reads his backlog on the leader and
    // confirms it (a barrier request after the `received`), then connects to the lagging
    // follower with his stored cursor: his backlog there starts right after it.
    let tb = c.nodes[f2].srv.login("bob", "web").await;
    let s = Client::connect(c.addr(l), &tb, Some(0), Encoding::Json).await;
    let n = s.head;
    assert_eq!(s.messages().len(), seen, "bob's stream on the leader");
    let mut b = s.client;
    b.send(ClientFrame::Received { up_to: n }).await;
    b.barrier().await;
    b.close().await;
    let mut a = Client::connect(c.addr(f2), &ta, None, Encoding::Json).await.client;
    a.send_acked("after-cursor", "bob", "one more").await;
    a.close().await;
    let s = Client::connect(c.addr(f1), &tb, None, Encoding::Json).await;
    let evs: Vec<u64> = s.backlog.iter().map(|(ev, _)| *ev).collect();
    assert_eq!(evs.first(), Some(&(n + 1)), "bob's backlog on the lagging follower after confirming {n} on the leader: {evs:?}");
    assert_eq!(s.messages().last().map(|(_, m)| m.id.as_str()), Some("after-cursor"));
}

// ---------------------------------------------------------------------------------- load

/// Senders: `s0..s5`, sender i at home on node i % 3; each sends to `RECIPIENTS[i % 2]` and
/// every fourth message to a group of everyone.
const SENDERS: usize = 6;
const RECIPIENTS: [&str; 2] = ["r0", "r1"];
/// Recipient r's home node.
const RECIPIENT_HOME: [usize; 2] = [2, 1];
/// Sends in flight per sender.
const WINDOW: usize = 4;
/// `received` after this many events.
const CONFIRM_EVERY: u64 = 16;
/// How long a sender waits before resending what was answered `unavailable`.
const RETRY_AFTER: Duration = Duration::from_millis(100);

/// What one sender sent and what was acknowledged. Locked only between awaits.
#[derive(Default)]
struct Ledger {
    /// Message k has id `{user}-{k}`.
    msgs: Vec<Sent>,
    /// When message k was first sent.
    first_sent: Vec<Instant>,
    /// id → (conv, seq, ts) of its ack.
    acked: HashMap<String, (String, u64, u64)>,
}

/// What the load's client tasks share with the test.
struct World {
    /// Node HTTP addresses; `None` while the test has the node down. A client goes to its home
    /// node, and after a failure to the next node that is up.
    addrs: Mutex<Vec<Option<SocketAddr>>>,
    /// Set: senders start no new message; they end once everything they sent is acked.
    stop: AtomicBool,
    /// Set: recipients end.
    done: AtomicBool,
    /// Acks received, in all.
    acked: AtomicU64,
    /// When the last kill happened.
    kill_at: Mutex<Option<Instant>>,
    /// Kill → the first ack of a message first sent after the kill.
    failover: Mutex<Option<Duration>>,
    /// Kill → the first ack of any send (for the report: it may be of an entry committed
    /// before the kill).
    first_ack: Mutex<Option<Duration>>,
    /// Connections that ended (user, node, why), for the report.
    ends: Mutex<Vec<(String, usize, String)>>,
}

impl World {
    fn new(c: &Cluster) -> Arc<World> {
        Arc::new(World {
            addrs: Mutex::new((0..c.nodes.len()).map(|i| Some(c.addr(i))).collect()),
            stop: AtomicBool::new(false),
            done: AtomicBool::new(false),
            acked: AtomicU64::new(0),
            kill_at: Mutex::new(None),
            failover: Mutex::new(None),
            first_ack: Mutex::new(None),
            ends: Mutex::new(Vec::new()),
        })
    }

    /// The first node from `start` on that is up (none while the test has them all down).
    fn pick(&self, start: usize) -> Option<(usize, SocketAddr)> {
        let a = self.addrs.lock().unwrap();
        (0..a.len()).map(|k| (start + k) % a.len()).find_map(|i| a[i].map(|addr| (i, addr)))
    }

    /// Marks node `i` down (before its kill) and starts the failover clock.
    fn down(&self, i: usize) {
        self.addrs.lock().unwrap()[i] = None;
        *self.kill_at.lock().unwrap() = Some(Instant::now());
        *self.failover.lock().unwrap() = None;
        *self.first_ack.lock().unwrap() = None;
    }

    fn up(&self, i: usize, addr: SocketAddr) {
        self.addrs.lock().unwrap()[i] = Some(addr);
    }

    /// The connection ends by node and reason (the reason's first word), for the report.
    fn ends_summary(&self) -> String {
        let mut by: BTreeMap<(usize, String), usize> = BTreeMap::new();
        for (_, node, why) in self.ends.lock().unwrap().iter() {
            let kind = if why.starts_with("error") { why.clone() } else { why.split_whitespace().next().unwrap_or("").to_owned() };
            *by.entry((node + 1, kind)).or_default() += 1;
        }
        by.iter().map(|((n, w), k)| format!("node {n} {w} x{k}")).collect::<Vec<_>>().join(", ")
    }

    /// Waits until `n` acks were received in all.
    async fn wait_acked(&self, n: u64) {
        until(&format!("{n} acks (have {})", self.acked.load(Ordering::SeqCst)), || self.acked.load(Ordering::SeqCst) >= n).await
    }
}

/// Why a connection ended.
enum End {
    /// Stop was set and everything sent is acked.
    Finished,
    Why(String),
}

/// One connection of sender `user` to node `addr`: resends what is unacked, then new messages,
/// [`WINDOW`] in flight, recording every ack.
async fn sender_conn(w: &World, addr: SocketAddr, user: &str, token: &str, group: &str, l: &Mutex<Ledger>, seed: usize) -> End {
    let Some(mut c) = hello_stored(addr, token).await else { return End::Why("connect failed".into()) };
    let mut queue: VecDeque<usize> = {
        let l = l.lock().unwrap();
        (0..l.msgs.len()).filter(|k| !l.acked.contains_key(&l.msgs[*k].id)).collect()
    };
    let mut inflight: HashSet<usize> = HashSet::new();
    let (mut welcomed, mut stream) = (false, LiveStream::new(CONFIRM_EVERY));
    let mut retry_at = Instant::now();
    let mut quiet_since = Instant::now();
    loop {
        let stop = w.stop.load(Ordering::SeqCst);
        while welcomed && inflight.len() < WINDOW && Instant::now() >= retry_at {
            let sent = {
                let mut l = l.lock().unwrap();
                let k = match queue.pop_front() {
                    Some(k) => k,
                    None if stop => break,
                    None => {
                        let k = l.msgs.len();
                        l.msgs.push(Sent::nth(user, k, RECIPIENTS[seed % 2], group, seed));
                        l.first_sent.push(Instant::now());
                        k
                    }
                };
                inflight.insert(k);
                l.msgs[k].clone()
            };
            let frame = ClientFrame::Send { id: sent.id, to: sent.to, body: sent.body };
            if c.try_send_req(Request { rid: None, frame }).await.is_err() {
                return End::Why("write failed".into());
            }
        }
        if stop && welcomed && inflight.is_empty() && queue.is_empty() {
            return End::Finished;
        }
        let f = match c.next_within(Duration::from_millis(100)).await {
            None => {
                let waiting = !inflight.is_empty() || !welcomed;
                assert!(
                    !(waiting && quiet_since.elapsed() > T),
                    "{user}: nothing from {addr} for {T:?} (welcomed {welcomed}, {} in flight)",
                    inflight.len()
                );
                continue;
            }
            Some(Incoming::Closed(code)) => return End::Why(format!("closed {code:?}")),
            Some(Incoming::Frame(f)) => f,
        };
        quiet_since = Instant::now();
        match f {
            ServerFrame::Welcome { .. } => welcomed = true,
            ServerFrame::Synced { .. } | ServerFrame::Typing { .. } | ServerFrame::Presence { .. } => {}
            ServerFrame::Ack { id, conv, seq, ts, .. } => {
                let k: usize = id.rsplit('-').next().and_then(|k| k.parse().ok()).unwrap_or_else(|| panic!("ack of unknown id {id}"));
                let mut l = l.lock().unwrap();
                assert_eq!(conv, l.msgs[k].conv, "ack of {id} names another conversation");
                if let Some(prev) = l.acked.get(&id) {
                    assert_eq!(prev, &(conv.clone(), seq, ts), "a second ack of {id} differs from the first");
                }
                if let Some(kill) = *w.kill_at.lock().unwrap() {
                    w.first_ack.lock().unwrap().get_or_insert_with(|| kill.elapsed());
                    let mut fo = w.failover.lock().unwrap();
                    if fo.is_none() && l.first_sent[k] > kill {
                        *fo = Some(kill.elapsed());
                    }
                }
                l.acked.insert(id, (conv, seq, ts));
                inflight.remove(&k);
                w.acked.fetch_add(1, Ordering::SeqCst);
            }
            ServerFrame::Error { id: Some(id), code, message, .. } => {
                assert!(matches!(code, ErrorCode::Unavailable | ErrorCode::Overloaded), "{user}: send {id} refused: {code:?} {message}");
                let k: usize = id.rsplit('-').next().and_then(|k| k.parse().ok()).expect("id");
                inflight.remove(&k);
                queue.push_back(k);
                retry_at = Instant::now() + RETRY_AFTER;
            }
            ServerFrame::Error { id: None, code, message, .. } => return End::Why(format!("error {code:?} {message}")),
            ServerFrame::Goaway { reason, .. } => return End::Why(format!("goaway {reason}")),
            ServerFrame::Event { ev, .. } => {
                if stream.event(&mut c, user, ev).await.is_err() {
                    return End::Why("write failed".into());
                }
            }
            f => panic!("{user}: unexpected frame {f:?}"),
        }
    }
}

/// Sender `i`: connections until it finished (after stop, everything acked).
async fn sender(w: Arc<World>, i: usize, token: String, group: String, l: Arc<Mutex<Ledger>>) {
    let user = format!("s{i}");
    let mut node = i % 3;
    for attempt in 0.. {
        assert!(attempt < 10_000, "{user}: 10,000 connections");
        let Some((n, addr)) = w.pick(node) else {
            tokio::time::sleep(Duration::from_millis(50)).await; // every node is down: wait for one
            continue;
        };
        match sender_conn(&w, addr, &user, &token, &group, &l, i).await {
            End::Finished => return,
            End::Why(why) => {
                w.ends.lock().unwrap().push((user.clone(), n, why));
                node = n + 1;
                tokio::time::sleep(Duration::from_millis(50)).await; // reconnect pacing, not a synchronisation
            }
        }
    }
}

/// One connection of a recipient, reading live and confirming as it goes, until `done`.
async fn recipient_conn(w: &World, addr: SocketAddr, user: &str, token: &str) -> Option<String> {
    let Some(mut c) = hello_stored(addr, token).await else { return Some("connect failed".into()) };
    let mut stream = LiveStream::new(CONFIRM_EVERY);
    while !w.done.load(Ordering::SeqCst) {
        match c.next_within(Duration::from_millis(100)).await {
            None => {}
            Some(Incoming::Closed(code)) => return Some(format!("closed {code:?}")),
            Some(Incoming::Frame(ServerFrame::Event { ev, .. })) => stream.event(&mut c, user, ev).await.ok()?,
            Some(Incoming::Frame(ServerFrame::Goaway { reason, .. })) => return Some(format!("goaway {reason}")),
            Some(Incoming::Frame(ServerFrame::Error { code, message, .. })) => return Some(format!("error {code:?} {message}")),
            Some(Incoming::Frame(_)) => {}
        }
    }
    c.close().await;
    None
}

async fn recipient(w: Arc<World>, r: usize, token: String) {
    let mut node = RECIPIENT_HOME[r];
    for attempt in 0.. {
        assert!(attempt < 10_000, "{}: 10,000 connections", RECIPIENTS[r]);
        let Some((n, addr)) = w.pick(node) else {
            tokio::time::sleep(Duration::from_millis(50)).await; // every node is down: wait for one
            continue;
        };
        match recipient_conn(&w, addr, RECIPIENTS[r], &token).await {
            None => return,
            Some(why) => {
                w.ends.lock().unwrap().push((RECIPIENTS[r].to_owned(), n, why));
                node = n + 1;
                tokio::time::sleep(Duration::from_millis(50)).await; // reconnect pacing
            }
        }
    }
}

/// The users, the group and the client tasks of a load on a cluster.
struct Load {
    world: Arc<World>,
    tokens: BTreeMap<String, String>,
    group: String,
    ledgers: Vec<Arc<Mutex<Ledger>>>,
    senders: Vec<tokio::task::JoinHandle<()>>,
    recipients: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    /// Registers everyone (each on its home node), creates the group, starts the clients.
    async fn start(c: &Cluster) -> Load {
        let mut tokens = BTreeMap::new();
        for i in 0..SENDERS {
            tokens.insert(format!("s{i}"), c.nodes[i % 3].srv.user(&format!("s{i}")).await);
        }
        for (r, name) in RECIPIENTS.iter().enumerate() {
            tokens.insert(name.to_string(), c.nodes[RECIPIENT_HOME[r]].srv.user(name).await);
        }
        let group = {
            let mut cl = Client::connect(c.addr(0), &tokens["r0"], None, Encoding::Json).await.client;
            let names: Vec<String> = (0..SENDERS).map(|i| format!("s{i}")).chain(["r1".to_owned()]).collect();
            let members: Vec<&str> = names.iter().map(String::as_str).collect();
            let g = cl.create_group("cluster 🌐", &members).await;
            cl.close().await;
            g
        };
        let world = World::new(c);
        let ledgers: Vec<Arc<Mutex<Ledger>>> = (0..SENDERS).map(|_| Arc::new(Mutex::new(Ledger::default()))).collect();
        let senders = (0..SENDERS)
            .map(|i| tokio::spawn(sender(world.clone(), i, tokens[&format!("s{i}")].clone(), group.clone(), ledgers[i].clone())))
            .collect();
        let recipients = (0..RECIPIENTS.len()).map(|r| tokio::spawn(recipient(world.clone(), r, tokens[RECIPIENTS[r]].clone()))).collect();
        Load { world, tokens, group, ledgers, senders, recipients }
    }

    fn acked(&self) -> u64 {
        self.world.acked.load(Ordering::SeqCst)
    }

    /// Takes node `i` down for the clients (they leave it) and `kill -9`s it.
    async fn kill(&self, c: &mut Cluster, i: usize) {
        self.world.down(i);
        c.kill9(i).await;
    }

    /// Restarts node `i` and lets the clients come back to it.
    async fn revive(&self, c: &mut Cluster, i: usize) {
        c.restart(i).await;
        self.world.up(i, c.addr(i));
    }

    /// Ends the load (everything acked), waits for a leader all agree on, and verifies every
    /// node ([`Load::verify`]). Returns the number of messages.
    async fn end(&mut self, c: &Cluster) -> usize {
        self.finish().await;
        c.wait_leader().await;
        self.verify(c).await
    }

    /// Stops sending, waits until everything sent is acked, ends the clients.
    async fn finish(&mut self) {
        self.world.stop.store(true, Ordering::SeqCst);
        for t in self.senders.drain(..) {
            within(DEADLINE, "the senders to get every message acked", t).await.expect("a sender panicked");
        }
        self.world.done.store(true, Ordering::SeqCst);
        for t in self.recipients.drain(..) {
            within(T, "the recipients to end", t).await.expect("a recipient panicked");
        }
    }

    fn convs(&self) -> Vec<String> {
        (0..SENDERS).map(|i| Conv::dm(&format!("s{i}"), RECIPIENTS[i % 2]).to_string()).chain([self.group.clone()]).collect()
    }

    /// A member of `conv` that reads it (its recipient, or r0 for the group).
    fn reader(&self, conv: &str) -> String {
        let r = if conv == self.group { "r0" } else { conv.rsplit(':').next().expect("dm") };
        self.tokens[r].clone()
    }

    /// On every node: every sent message is stored exactly once, at its acked seq and ts, with
    /// its body, and nothing else is; seqs are 1..N (`history_all`) and ts never go backwards;
    /// the histories are identical on every node; every user's stream from cursor 0 holds its
    /// conversations' messages in history order; and every user's conversation list agrees with
    /// the histories and is the same on every node. Returns the number of messages.
    async fn verify(&self, c: &Cluster) -> usize {
        let mut acked: HashMap<(String, String), (Sent, (String, u64, u64))> = HashMap::new();
        for (i, l) in self.ledgers.iter().enumerate() {
            let l = l.lock().unwrap();
            for m in &l.msgs {
                let a = l.acked.get(&m.id).unwrap_or_else(|| panic!("{} was never acked", m.id)).clone();
                acked.insert((format!("s{i}"), m.id.clone()), (m.clone(), a));
            }
        }
        let convs = self.convs();
        let mut first: Option<BTreeMap<String, Vec<Row>>> = None;
        for i in 0..c.nodes.len() {
            let h = histories(c, i, &convs, &|conv| self.reader(conv)).await;
            let mut stored = HashSet::new();
            for (conv, ms) in &h {
                for m in ms {
                    let key = (m.from.clone(), m.id.clone());
                    let (s, a) = acked.get(&key).unwrap_or_else(|| panic!("node {}: {conv} seq {}: a message nobody sent: {m:?}", i + 1, m.seq));
                    assert_eq!((&s.conv, &s.body), (conv, &m.body), "node {}: {conv} seq {}", i + 1, m.seq);
                    assert_eq!(a, &(conv.clone(), m.seq, m.ts), "node {}: {} stored at another place than its ack says", i + 1, m.id);
                    assert!(stored.insert(key), "node {}: {conv}: {} {} stored twice", i + 1, m.from, m.id);
                }
            }
            for (conv, ms) in &h {
                for w in ms.windows(2) {
                    assert!(w[1].ts >= w[0].ts, "node {}: {conv}: ts goes backwards from seq {} to {}", i + 1, w[0].seq, w[1].seq);
                }
            }
            let lost: Vec<&String> = acked.iter().filter(|(k, _)| !stored.contains(*k)).map(|(k, _)| &k.1).collect();
            assert!(lost.is_empty(), "node {}: acked messages lost: {lost:?}", i + 1);
            let h: BTreeMap<String, Vec<Row>> = h.iter().map(|(k, v)| (k.clone(), rows(v))).collect();
            match &first {
                None => first = Some(h),
                Some(f) => assert!(f == &h, "node {}'s histories differ from node 1's", i + 1),
            }
        }
        let first = first.expect("histories");
        let mut lists: BTreeMap<String, ServerFrame> = BTreeMap::new();
        for i in 0..c.nodes.len() {
            for (u, token) in &self.tokens {
                let mut s = Client::connect(c.addr(i), token, Some(0), Encoding::Json).await;
                let mut per_conv: BTreeMap<String, Vec<Row>> = BTreeMap::new();
                for (_, m) in s.messages() {
                    per_conv.entry(m.conv.clone()).or_default().push((m.seq, m.from.clone(), m.id.clone(), m.body.clone(), m.ts));
                }
                for (conv, want) in first.iter().filter(|(conv, _)| *conv == &self.group || conv.split(':').any(|p| p == u)) {
                    assert_eq!(per_conv.remove(conv).unwrap_or_default(), *want, "node {}: {u}'s stream of {conv} differs from its history", i + 1);
                }
                assert!(per_conv.is_empty(), "node {}: {u}'s stream has conversations it is not in", i + 1);
                // The conversation list: each last message is the history's, the same on every node.
                let list = s.client.request("convs", ClientFrame::Conversations).await;
                let ServerFrame::Conversations { items, .. } = &list else { panic!("node {}: conversations of {u}: {list:?}", i + 1) };
                for it in items {
                    let h = first.get(&it.conv).unwrap_or_else(|| panic!("node {}: {u} lists {} that nobody wrote to", i + 1, it.conv));
                    assert_eq!(it.last_seq, h.len() as u64, "node {}: {u}'s list: last_seq of {}", i + 1, it.conv);
                    assert_eq!(it.last.as_ref().map(|m| m.id.as_str()), h.last().map(|r| r.2.as_str()), "node {}: {u}'s list: last of {}", i + 1, it.conv);
                }
                match lists.get(u) {
                    None => {
                        lists.insert(u.clone(), list);
                    }
                    Some(l0) => assert_eq!(l0, &list, "node {}: {u}'s conversation list differs from node 1's", i + 1),
                }
                s.client.close().await;
            }
        }
        acked.len()
    }
}

/// `kill -9` of the leader under load: see [`leader_down_under_load`].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_kill_9_under_load_loses_no_acked_message() {
    leader_down_under_load(false).await;
}

/// The leader stopped by SIGTERM under load (it says goaway to its sessions, drains, exits 0):
/// see [`leader_down_under_load`].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_sigterm_under_load_loses_no_acked_message() {
    leader_down_under_load(true).await;
}

/// The leader `kill -9`ed (or, `graceful`, stopped by SIGTERM) under load, clients on every
/// node: the dead node's clients go to another node and resend what was unacked with the same
/// ids; a new leader takes over; the stopped node comes back and catches up. At the end nothing
/// acked is lost or stored twice, seqs are gapless and every node serves the same history.
/// Prints the failover time (the kill to the first ack of a message sent after it).
async fn leader_down_under_load(graceful: bool) {
    let t0 = Instant::now();
    let mut c = Cluster::start(3, &[]).await;
    let l = c.wait_leader().await;
    let mut load = Load::start(&c).await;
    load.world.wait_acked(60).await;

    let before = load.acked();
    load.world.down(l);
    let kill = Instant::now();
    if graceful {
        c.stop(l).await;
    } else {
        c.kill9(l).await;
    }
    let l2 = c.wait_leader().await;
    let elected = kill.elapsed();
    assert_ne!(l2, l, "the killed node is the leader");
    until("an ack of a message sent after the kill", || load.world.failover.lock().unwrap().is_some()).await;
    let failover = load.world.failover.lock().unwrap().expect("failover");
    let first = load.world.first_ack.lock().unwrap().expect("an ack");
    let how = if graceful { "SIGTERM" } else { "kill -9" };
    eprintln!(
        "cluster: leader {} stopped ({how}) after {before} acks; new leader {} agreed after {elected:?} (polled every {POLL:?}); \
         first ack after the kill {first:?}; failover (kill → first ack of a message sent after it) {failover:?}",
        l + 1,
        l2 + 1
    );
    load.world.wait_acked(load.acked() + 60).await;

    load.revive(&mut c, l).await;
    load.world.wait_acked(load.acked() + 30).await;
    let n = load.end(&c).await;
    eprintln!("cluster: leader {how}: {n} acked messages verified on 3 nodes, reconnections {}, {:?}", load.world.ends_summary(), t0.elapsed());
}

/// The leader and a follower killed at once (no quorum left), then both restarted: everything
/// acked before is still there on every node, and the load goes on to the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_and_follower_killed_then_restarted_keep_every_acked_message() {
    let mut c = Cluster::start(3, &[]).await;
    let l = c.wait_leader().await;
    let f = c.others(l)[0];
    let mut load = Load::start(&c).await;
    load.world.wait_acked(60).await;
    load.kill(&mut c, l).await;
    load.kill(&mut c, f).await;
    let at_kill = load.acked();
    load.revive(&mut c, l).await;
    load.revive(&mut c, f).await;
    c.wait_leader().await;
    load.world.wait_acked(at_kill + 60).await;
    let failover = load.world.failover.lock().unwrap().expect("an ack after the restarts");
    eprintln!("cluster: double crash: kill of nodes {} and {} → first ack of a new message after {failover:?}", l + 1, f + 1);
    let n = load.end(&c).await;
    eprintln!("cluster: double crash: {n} acked messages verified on 3 nodes; reconnections {}", load.world.ends_summary());
}

/// All three nodes `kill -9`ed at once under load and restarted: a leader again, and every
/// acked message on every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_cluster_killed_and_restarted_keeps_every_acked_message() {
    let mut c = Cluster::start(3, &[]).await;
    c.wait_leader().await;
    let mut load = Load::start(&c).await;
    load.world.wait_acked(60).await;
    for i in 0..3 {
        load.world.down(i);
    }
    for i in 0..3 {
        c.kill9(i).await;
    }
    let at_kill = load.acked();
    c.restart_all(&[0, 1, 2]).await;
    for i in 0..3 {
        load.world.up(i, c.addr(i));
    }
    c.wait_leader().await;
    load.world.wait_acked(at_kill + 60).await;
    let n = load.end(&c).await;
    eprintln!("cluster: whole cluster killed: {n} acked messages verified on 3 nodes; reconnections {}", load.world.ends_summary());
}

/// The leader `kill -9`ed five times in a row under load, each time restarted before the next
/// kill: every acked message survives on every node. Prints the failover times (each kill to
/// the first ack of a message sent after it), median and worst.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_leader_kills_in_a_row_lose_no_acked_message() {
    let mut c = Cluster::start(3, &[]).await;
    c.wait_leader().await;
    let mut load = Load::start(&c).await;
    load.world.wait_acked(40).await;
    let mut times = Vec::new();
    for _ in 0..5 {
        let l = c.wait_leader().await;
        load.kill(&mut c, l).await;
        until("an ack of a message sent after the kill", || load.world.failover.lock().unwrap().is_some()).await;
        times.push(load.world.failover.lock().unwrap().expect("failover"));
        load.revive(&mut c, l).await;
        load.world.wait_acked(load.acked() + 30).await;
    }
    let n = load.end(&c).await;
    times.sort();
    eprintln!("cluster: 5 leader kills: failover median {:?}, max {:?} ({times:?}); {n} acked messages verified on 3 nodes", times[times.len() / 2], times[times.len() - 1]);
}

/// The leader black-holed under load, then healed: its clients' sends are answered
/// `unavailable` (or their sockets end) and resent, the majority goes on, and at the end every
/// message is acked and stored exactly once, at its acked seq, the same on every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_partitioned_under_load_loses_and_doubles_nothing() {
    let c = Cluster::start(3, &[]).await;
    let l = c.wait_leader().await;
    let mut load = Load::start(&c).await;
    load.world.wait_acked(60).await;
    c.isolate(l, Mode::Drop);
    let l2 = c.wait_leader_among(&c.others(l)).await;
    assert_ne!(l2, l);
    load.world.wait_acked(load.acked() + 60).await;
    c.heal();
    load.world.wait_acked(load.acked() + 60).await;
    let n = load.end(&c).await;
    eprintln!("cluster: leader partitioned under load: {n} acked messages verified on 3 nodes; reconnections {}", load.world.ends_summary());
}

/// Every node-to-node link 20 ms slow each way (a cluster across a WAN): users register and
/// log in through followers, the load goes on with slower acks, and nothing is lost, doubled or
/// out of place on any node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_over_slow_links_loses_nothing() {
    let c = Cluster::start(3, &[]).await;
    c.wait_leader().await;
    c.set_all(Mode::Delay(Duration::from_millis(20)));
    let t0 = Instant::now();
    let mut load = Load::start(&c).await;
    load.world.wait_acked(200).await;
    let n = load.end(&c).await;
    eprintln!("cluster: slow links: {n} acked messages verified on 3 nodes in {:?}; reconnections {}", t0.elapsed(), load.world.ends_summary());
}

/// Links with a round trip above the default heartbeat (60 ms each way, 120 ms; openraft 0.9
/// gives each AppendEntries and each read-index heartbeat `heartbeat_ms` to answer) work once
/// `cluster.heartbeat_ms` is above it: hellos are welcomed on every node and sends acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_slower_than_the_default_heartbeat_work_with_a_longer_one() {
    let c = Cluster::start(3, &[("PARLEY__CLUSTER__HEARTBEAT_MS", "300"), ("PARLEY__CLUSTER__ELECTION_TIMEOUT_MS", "1500")]).await;
    let l = c.wait_leader().await;
    let ta = c.nodes[l].srv.user("alice").await;
    c.set_all(Mode::Delay(Duration::from_millis(60)));
    for i in 0..3 {
        let mut s = Client::connect(c.addr(i), &ta, None, Encoding::Json).await;
        let (_, seq, _) = s.client.send_acked(&format!("slow-{i}"), "alice", "over a slow link").await;
        assert_eq!(seq, i as u64 + 1);
        s.client.close().await;
    }
}

/// Six users each send 30 bodies of 60 KB at once to `sink` through `addr` (11 MB in all, within
/// the default send limits), resending what is answered `unavailable` with the same id, as
/// clients do, until everything is acked (within [`DEADLINE`]). Returns the resends.
async fn burst_of_large_messages(addr: SocketAddr, tokens: &[String]) -> u64 {
    const PER: usize = 30;
    let mut clients = Vec::new();
    for t in tokens {
        clients.push(Client::connect(addr, t, None, Encoding::Json).await.client);
    }
    let t0 = Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(k, mut cl)| {
            tokio::spawn(async move {
                let body = |j: usize| incompressible((k * PER + j) as u64, 60_000);
                for j in 0..PER {
                    cl.send_msg(&format!("u{k}-{j}"), "sink", &body(j)).await;
                }
                let (mut acked, mut resends) = (HashSet::new(), 0u64);
                while acked.len() < PER {
                    assert!(t0.elapsed() < DEADLINE, "u{k}: {} of {PER} acked after {DEADLINE:?} ({resends} resends)", acked.len());
                    match cl.next_within(T).await {
                        Some(Incoming::Frame(ServerFrame::Ack { id, .. })) => {
                            acked.insert(id);
                        }
                        Some(Incoming::Frame(ServerFrame::Error { id: Some(id), code: ErrorCode::Unavailable, .. })) => {
                            let j: usize = id.rsplit('-').next().and_then(|j| j.parse().ok()).expect("id");
                            resends += 1;
                            cl.send_msg(&id, "sink", &body(j)).await;
                        }
                        Some(Incoming::Frame(ServerFrame::Event { .. })) => {}
                        other => panic!("u{k}: {other:?} after {:?}, {} of {PER} acked, {resends} resends", t0.elapsed(), acked.len()),
                    }
                }
                cl.close().await;
                resends
            })
        })
        .collect();
    let mut resends = 0;
    for t in tasks {
        resends += within(DEADLINE + T, "the burst's senders", t).await.expect("a sender panicked");
    }
    eprintln!("cluster: a burst of {} x 60 KB: all acked after {:?}, {resends} resends", tokens.len() * PER, t0.elapsed());
    resends
}

/// The users of [`burst_of_large_messages`], registered through `srv`.
async fn burst_users(srv: &Server) -> Vec<String> {
    let mut tokens = Vec::new();
    for k in 0..6 {
        tokens.push(srv.user(&format!("u{k}")).await);
    }
    srv.register("sink").await;
    tokens
}

/// A burst of large messages ([`burst_of_large_messages`]) that a single node takes is taken
/// through a cluster's follower too: every message acked within the deadline, stored once, and
/// the same conversations on every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_large_messages_through_a_follower_is_acked() {
    // The same burst on a single node first: what the cluster is held to.
    {
        let dir = TestDir::new();
        let srv = Server::start(&dir).await;
        let tokens = burst_users(&srv).await;
        burst_of_large_messages(srv.addr, &tokens).await;
    }
    let c = Cluster::start(3, &[]).await;
    let l = c.wait_leader().await;
    let f = c.others(l)[0];
    let tokens = burst_users(&c.nodes[f].srv).await;
    burst_of_large_messages(c.addr(f), &tokens).await;
    c.wait_converged(&[0, 1, 2]).await;
    let mut first: Option<Vec<Vec<Row>>> = None;
    for i in 0..3 {
        let mut hs = Vec::new();
        for (k, t) in tokens.iter().enumerate() {
            let mut cl = Client::connect(c.addr(i), t, None, Encoding::Json).await.client;
            let h = rows(&cl.history_all(&Conv::dm(&format!("u{k}"), "sink").to_string()).await);
            assert_eq!(h.len(), 30, "node {}: u{k}'s conversation", i + 1);
            hs.push(h);
            cl.close().await;
        }
        match &first {
            None => first = Some(hs),
            Some(f) => assert!(f == &hs, "node {}'s histories differ", i + 1),
        }
    }
}

// ---------------------------------------------------------------------------------- partition

/// Waits for the answers to sends `ids` on `c`, a client of a cut-off node: each must be
/// `unavailable`, never an ack, unless the node says `goaway` and closes the socket first.
/// Returns the ids answered `unavailable` and whether a goaway came.
async fn expect_unavailable(c: &mut Client, ids: &[String]) -> (Vec<String>, bool) {
    let (mut answered, mut goaway) = (Vec::new(), false);
    let t0 = Instant::now();
    while answered.len() < ids.len() {
        assert!(t0.elapsed() < DEADLINE, "no answer to the minority's sends within {DEADLINE:?}");
        match c.next_within(T).await {
            None => panic!("the cut-off node left sends {ids:?} unanswered for {T:?} (answered {answered:?}): a client left hanging"),
            Some(Incoming::Closed(code)) => {
                assert!(goaway, "the cut-off node closed the socket ({code:?}) with sends unanswered and no goaway (answered {answered:?})");
                break;
            }
            Some(Incoming::Frame(f)) => match f {
                ServerFrame::Ack { id, .. } if ids.contains(&id) => panic!("the cut-off node acked {id}"),
                ServerFrame::Error { id: Some(id), code, message, .. } if ids.contains(&id) => {
                    assert_eq!(code, ErrorCode::Unavailable, "{id}: {message}");
                    answered.push(id);
                }
                ServerFrame::Goaway { .. } => goaway = true,
                ServerFrame::Event { .. } | ServerFrame::Presence { .. } | ServerFrame::Typing { .. } => {}
                f => panic!("unexpected frame from the cut-off node: {f:?}"),
            },
        }
    }
    (answered, goaway)
}

/// The leader cut off by the proxies (connections reset): see [`partitioned`].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_leader_acks_nothing_and_the_majority_goes_on() {
    partitioned(true, Mode::Cut).await;
}

/// The leader behind a black hole (connections stay open, every byte is swallowed: the nodes
/// must time out on their own): see [`partitioned`].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blackholed_leader_acks_nothing_and_the_majority_goes_on() {
    partitioned(true, Mode::Drop).await;
}

/// A follower cut off: its clients are told so just the same (see [`partitioned`]), and the
/// leader and the other follower go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_follower_acks_nothing_and_the_majority_goes_on() {
    partitioned(false, Mode::Cut).await;
}

/// One node isolated by the proxies (`how`: `Cut` or `Drop`; the leader when `leader`, else a
/// follower): its client's sends get `unavailable`, never an ack; a new client there gets
/// `goaway` and a close; the other two have (or elect) a leader and ack. After the heal the
/// nodes converge by themselves and serve identical histories: every ack there exactly once at
/// its seq; the isolated node's sends at most once, the one resent (same id) exactly once at
/// the seq its ack gives.
async fn partitioned(leader: bool, how: Mode) {
    let c = Cluster::start(3, &[]).await;
    let l = c.wait_leader().await;
    // x is isolated, alice's node; bob is on y, a follower of the majority; z is the third.
    let x = if leader { l } else { c.others(l)[0] };
    let (y, z) = {
        let m = c.others(x);
        if m[0] == l {
            (m[1], m[0])
        } else {
            (m[0], m[1])
        }
    };
    let ta = c.nodes[x].srv.user("alice").await;
    let tb = c.nodes[y].srv.user("bob").await;
    let conv = Conv::dm("alice", "bob").to_string();
    let mut acks: BTreeMap<String, (String, u64, u64)> = BTreeMap::new();
    let mut alice = Client::connect(c.addr(x), &ta, None, Encoding::Json).await.client;
    let mut bob = Client::connect(c.addr(y), &tb, None, Encoding::Json).await.client;
    let bodies = dialog(7, 20);
    for k in 0..3 {
        acks.insert(format!("a-before-{k}"), alice.send_acked(&format!("a-before-{k}"), "bob", &bodies[k]).await);
        acks.insert(format!("b-before-{k}"), bob.send_acked(&format!("b-before-{k}"), "alice", &bodies[k + 3]).await);
    }

    c.isolate(x, how);
    let minority: Vec<String> = (0..3).map(|k| format!("a-minority-{k}")).collect();
    for (k, id) in minority.iter().enumerate() {
        alice.send_msg(id, "bob", &bodies[6 + k]).await;
    }
    let l2 = c.wait_leader_among(&[y, z]).await;
    assert_ne!(l2, x, "the isolated node leads the majority");
    for k in 0..3 {
        let id = format!("b-majority-{k}");
        acks.insert(id.clone(), bob.send_acked(&id, "alice", &bodies[9 + k]).await);
    }
    let (answered, goaway) = expect_unavailable(&mut alice, &minority).await;
    let what = if leader { "leader" } else { "follower" };
    eprintln!("cluster: partition ({how:?}): the cut-off {what} answered {answered:?} unavailable (goaway: {goaway}); its status {:?}", c.status(x).await);
    // Its healthz says it cannot commit; the majority's say ok.
    wait_health(&c, x, "no_quorum").await;
    for i in [y, z] {
        wait_health(&c, i, "ok").await;
    }
    // A new client on the cut-off node is told to go, not welcomed to stale reads.
    let mut fresh = Client::open(c.addr(x), &ta, None, Encoding::Json).await;
    let (frames, code) = within(DEADLINE, "the cut-off node to close a new socket", fresh.until_closed()).await;
    assert!(!frames.iter().any(|f| matches!(f, ServerFrame::Welcome { .. })), "the cut-off node welcomed a client: {frames:?}");
    assert!(frames.iter().any(|f| matches!(f, ServerFrame::Goaway { retry_after_ms, .. } if *retry_after_ms > 0)), "no goaway with a retry hint before the close: {frames:?}");
    assert_eq!(code, Some(1001), "the close after the goaway");

    c.heal();
    c.wait_leader().await;
    c.wait_converged(&[0, 1, 2]).await;
    for i in 0..3 {
        wait_health(&c, i, "ok").await;
    }
    // The client resends its first unanswered message with the same id, through the majority.
    let mut alice = Client::connect(c.addr(z), &ta, None, Encoding::Json).await.client;
    let resent = &minority[0];
    acks.insert(resent.clone(), alice.send_acked(resent, "bob", &bodies[6]).await);
    // A resend of an acked message gets its ack again.
    assert_eq!(alice.send_acked("a-before-0", "bob", &bodies[0]).await, acks["a-before-0"]);
    alice.close().await;

    let mut first: Option<Vec<Row>> = None;
    for i in 0..3 {
        let mut r = Client::connect(c.addr(i), &tb, None, Encoding::Json).await.client;
        let h = r.history_all(&conv).await;
        r.close().await;
        for w in h.windows(2) {
            assert!(w[1].ts >= w[0].ts, "node {}: ts goes backwards from seq {} to {}", i + 1, w[0].seq, w[1].seq);
        }
        let mut count: HashMap<&str, usize> = HashMap::new();
        for m in &h {
            *count.entry(m.id.as_str()).or_default() += 1;
            if let Some(a) = acks.get(&m.id) {
                assert_eq!(a, &(m.conv.clone(), m.seq, m.ts), "node {}: {} is not where its ack says", i + 1, m.id);
            } else {
                assert!(minority.contains(&m.id), "node {}: a message nobody sent: {m:?}", i + 1);
            }
        }
        for id in acks.keys() {
            assert_eq!(count.get(id.as_str()), Some(&1), "node {}: acked {id} is not there exactly once", i + 1);
        }
        for id in &minority {
            assert!(count.get(id.as_str()).copied().unwrap_or(0) <= 1, "node {}: {id} stored twice", i + 1);
        }
        match &first {
            None => first = Some(rows(&h)),
            Some(f) => assert_eq!(f, &rows(&h), "node {}'s history differs", i + 1),
        }
    }
    let kept: Vec<&String> = minority[1..].iter().filter(|id| first.as_ref().is_some_and(|f| f.iter().any(|r| &r.2 == *id))).collect();
    eprintln!("cluster: partition ({how:?}, {what}): unanswered-then-not-resent minority sends stored after the heal: {kept:?}");
}

/// Waits until node `i`'s `healthz` says `status` (200 for `ok`, else 503).
async fn wait_health(c: &Cluster, i: usize, status: &str) {
    let t0 = Instant::now();
    loop {
        let (code, h) = c.healthz(i).await;
        if h["status"] == status {
            assert_eq!(code, if status == "ok" { 200 } else { 503 }, "node {}: {h}", i + 1);
            return;
        }
        assert!(t0.elapsed() < DEADLINE, "node {}'s healthz never said {status} within {DEADLINE:?}: {h}", i + 1);
        tokio::time::sleep(POLL).await;
    }
}

/// A proposal whose proposer did not see it applied when the leader changed is not applied a
/// second time later: alice adds bob to a group through a follower that hears nothing from the
/// leader (its inbound link black-holed), the add commits on the other two, alice (another
/// socket) then removes bob, and the leader dies. Whatever the follower does with its pending
/// proposal, bob must stay removed on every node (a second copy of the add applied after the
/// remove would put him back: an operation taking effect twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proposal_pending_across_a_leader_change_takes_effect_once() {
    // A long election timeout: the follower must not campaign before the leader is killed.
    let mut c = Cluster::start(3, &[("PARLEY__CLUSTER__ELECTION_TIMEOUT_MS", "2000"), ("PARLEY__CLUSTER__COMMIT_TIMEOUT_MS", "15000")]).await;
    let l = c.wait_leader().await;
    let (f1, f2) = (c.others(l)[0], c.others(l)[1]);
    let ta = c.nodes[f1].srv.user("alice").await;
    c.nodes[f2].srv.register("bob").await;
    c.nodes[f2].srv.register("carol").await;
    let mut a1 = Client::connect(c.addr(f1), &ta, None, Encoding::Json).await.client;
    let g = a1.create_group("twice?", &["carol"]).await;
    let group = g.clone();
    let mut a2 = Client::connect(c.addr(f2), &ta, None, Encoding::Json).await.client;
    assert_eq!(a2.group_info(&group).await.1, vec!["alice".to_owned(), "carol".to_owned()]);

    c.set_link(l, f1, Mode::Drop);
    a1.send_rid("add", ClientFrame::GroupAdd { group: group.clone(), users: vec!["bob".into()] }).await;
    let t0 = Instant::now();
    while !a2.group_info(&group).await.1.contains(&"bob".to_owned()) {
        assert!(t0.elapsed() < T, "the add never committed on the majority");
        tokio::time::sleep(POLL).await;
    }
    let removed = a2.request("rm", ClientFrame::GroupRemove { group: group.clone(), users: vec!["bob".into()] }).await;
    assert!(matches!(removed, ServerFrame::Result { .. }), "remove: {removed:?}");
    assert!(!a2.group_info(&group).await.1.contains(&"bob".to_owned()));
    c.kill9(l).await;
    let added = within(DEADLINE, "an answer to the add", a1.until("the reply to add", |f| match f {
        ServerFrame::Result { rid: Some(r), .. } | ServerFrame::Error { rid: Some(r), .. } if r == "add" => Some(f.clone()),
        _ => None,
    }))
    .await;
    c.heal();
    c.restart(l).await;
    c.wait_converged(&[0, 1, 2]).await;
    // For the report only: whether the follower proposed its batch again (its log says so).
    let repropose = c.nodes[f1].srv.log().lines().filter(|l| l.contains("proposing it again")).count();
    eprintln!("cluster: pending proposal: the add was answered {added:?}; the follower re-proposed {repropose} time(s)");
    for i in 0..3 {
        let mut r = Client::connect(c.addr(i), &ta, None, Encoding::Json).await.client;
        let (_, members, _) = r.group_info(&group).await;
        assert_eq!(
            members,
            vec!["alice".to_owned(), "carol".to_owned()],
            "node {}: bob is back in the group after his removal (the add was answered {added:?}; the proposer re-proposed {repropose} time(s))",
            i + 1
        );
        r.close().await;
    }
}

/// `retention.mode = "delivered"` in a cluster: what every device confirmed is deleted on every
/// node alike (one purge entry every node applies), and after the leader dies the new leader
/// goes on purging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivered_retention_purges_every_node_and_survives_a_leader_kill() {
    let mut c = Cluster::start(3, &[("PARLEY__RETENTION__MODE", "delivered"), ("PARLEY__RETENTION__INTERVAL_MS", "100")]).await;
    let l = c.wait_leader().await;
    let (f1, f2) = (c.others(l)[0], c.others(l)[1]);
    let ta = c.nodes[f1].srv.user("alice").await;
    let tb = c.nodes[f2].srv.user("bob").await;
    let conv = Conv::dm("alice", "bob").to_string();
    let t = dialog(17, 10);
    for round in 0..2u64 {
        let mut alice = Client::connect(c.addr(f1), &ta, None, Encoding::Json).await.client;
        let mut bob = Client::connect(c.addr(f2), &tb, None, Encoding::Json).await.client;
        for k in 0..5 {
            alice.send_acked(&format!("r{round}-{k}"), "bob", &t[(round * 5 + k) as usize]).await;
        }
        for _ in 0..5 {
            bob.message_event().await;
        }
        let upto = 5 * (round + 1);
        bob.send(ClientFrame::Received { up_to: u64::MAX / 2 }).await;
        bob.barrier().await;
        alice.send(ClientFrame::Received { up_to: u64::MAX / 2 }).await;
        alice.barrier().await;
        crate::ops::wait_purged(&mut bob, &conv, upto).await;
        // Every node, the leader included, shows the same purge.
        for i in c.live() {
            let mut r = Client::connect(c.addr(i), &tb, None, Encoding::Json).await.client;
            let (ms, more, deleted) = crate::ops::page(&mut r, &conv).await;
            assert_eq!((ms.len(), more, deleted), (0, false, Some(upto)), "node {}: round {round}", i + 1);
            r.close().await;
        }
        alice.close().await;
        bob.close().await;
        if round == 0 {
            c.kill9(l).await;
            let l2 = c.wait_leader().await;
            assert_ne!(l2, l);
        }
    }
}

// ---------------------------------------------------------------------------------- presence

/// Presence and typing cross nodes (gossiped, not through Raft): bob on one node sees alice, on
/// another, come online and her typing; when her node is `kill -9`ed, bob sees her go offline
/// (within the failure-detection time; printed) with a last seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_and_typing_cross_nodes_and_a_dead_node_takes_its_users_offline() {
    let mut c = Cluster::start(3, &[]).await;
    let l = c.wait_leader().await;
    let (a, b) = (c.others(l)[0], c.others(l)[1]);
    let ta = c.nodes[a].srv.user("alice").await;
    let tb = c.nodes[b].srv.user("bob").await;
    let mut bob = Client::connect(c.addr(b), &tb, None, Encoding::Json).await.client;
    bob.send(ClientFrame::Watch { users: vec!["alice".into()] }).await;
    let (online, _) = bob.presence_of("alice").await;
    assert!(!online, "alice is online before she connects");
    let mut alice = Client::connect(c.addr(a), &ta, None, Encoding::Json).await.client;
    let (online, _) = bob.presence_of("alice").await;
    assert!(online, "bob saw alice's presence change, but not to online");
    let conv = Conv::dm("alice", "bob").to_string();
    alice.send(ClientFrame::Typing { conv: conv.clone(), state: parley::protocol::TypingState::Composing }).await;
    let from = bob
        .until("alice's typing", |f| match f {
            ServerFrame::Typing { conv: cv, from, .. } if *cv == conv => Some(from.clone()),
            _ => None,
        })
        .await;
    assert_eq!(from, "alice");

    let t0 = Instant::now();
    c.kill9(a).await;
    let (online, last_seen) = within(DEADLINE, "alice offline after her node died", bob.presence_of("alice")).await;
    assert!(!online && last_seen.is_some(), "after her node died: online {online}, last seen {last_seen:?}");
    eprintln!("cluster: presence: a kill -9'd node's user went offline for a watcher on another node after {:?}", t0.elapsed());
}

// ---------------------------------------------------------------------------------- catch-up

/// A message body of `len` bytes that does not compress (letters from a seeded generator).
fn incompressible(seed: u64, len: usize) -> String {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b'a' + (x % 26) as u8)
        })
        .collect()
}

/// A follower's data directory wiped while the leader snapshots every 20 entries and keeps 5
/// below: restarted empty, it catches up by a snapshot (a new state generation installed) and
/// serves the same history. Most messages after the wipe are 60 KB, so the snapshot (over 5 MB)
/// is larger than openraft's default chunk (3 MiB) and travels in several.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_follower_catches_up_by_snapshot() {
    let mut c = Cluster::start(3, &[("PARLEY__CLUSTER__SNAPSHOT_ENTRIES", "20"), ("PARLEY__CLUSTER__KEEP_ENTRIES", "5")]).await;
    let l = c.wait_leader().await;
    let f = c.others(l)[0];
    let ta = c.nodes[l].srv.user("alice").await;
    let tb = c.nodes[l].srv.user("bob").await;
    let conv = Conv::dm("alice", "bob").to_string();
    let mut alice = Client::connect(c.addr(l), &ta, None, Encoding::Json).await.client;
    let mut bodies = dialog(11, 120);
    for (k, b) in bodies.iter_mut().enumerate().skip(30).filter(|(k, _)| k % 10 != 0) {
        *b = incompressible(k as u64, 60_000);
    }
    for (k, b) in bodies[..30].iter().enumerate() {
        alice.send_acked(&format!("c-{k}"), "bob", b).await;
    }
    c.kill9(f).await;
    c.wipe(f);
    // Sent one by one: each its own entry, so the leader snapshots several times meanwhile.
    for (k, b) in bodies.iter().enumerate().skip(30) {
        alice.send_acked(&format!("c-{k}"), "bob", b).await;
    }
    let before = c.status(l).await.expect("leader status");
    assert!(before.commit_index >= 120, "{before:?}");
    c.restart(f).await;
    let done = c.wait_converged(&[0, 1, 2]).await;
    assert!(done.applied_index >= before.commit_index);
    assert!(installed_a_snapshot(&c, f), "the wiped follower caught up without installing a snapshot");
    let snap = c.nodes[f].dir.data().join("raft/sm/snapshots");
    let bytes: u64 = std::fs::read_dir(&snap).expect("snapshots").filter_map(|e| e.ok()?.metadata().ok()).map(|m| m.len()).sum();
    assert!(bytes > 3 << 20, "the follower's snapshot is {bytes} bytes, not over one 3 MiB chunk");
    eprintln!("cluster: catch-up: the wiped follower holds a {bytes}-byte snapshot");
    let want = rows(&alice.history_all(&conv).await);
    assert_eq!(want.len(), 120);
    let mut r = Client::connect(c.addr(f), &tb, Some(0), Encoding::Json).await;
    assert_eq!(rows(&r.client.history_all(&conv).await), want, "the caught-up follower's history");
    let streamed: Vec<Row> = r.messages().iter().map(|(_, m)| (m.seq, m.from.clone(), m.id.clone(), m.body.clone(), m.ts)).collect();
    assert_eq!(streamed, want, "bob's stream from cursor 0 on the caught-up follower");
}

/// The same catch-up while the load goes on: the follower is wiped and restarted while
/// senders keep writing (the leader snapshots every 20 entries meanwhile), its clients come back
/// to it, and at the end every node, the wiped one included, holds every acked message once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_follower_catches_up_under_load() {
    let mut c = Cluster::start(3, &[("PARLEY__CLUSTER__SNAPSHOT_ENTRIES", "20"), ("PARLEY__CLUSTER__KEEP_ENTRIES", "5")]).await;
    let l = c.wait_leader().await;
    let f = c.others(l)[0];
    let mut load = Load::start(&c).await;
    load.world.wait_acked(60).await;
    load.kill(&mut c, f).await;
    c.wipe(f);
    let at_wipe = c.status(l).await.expect("leader status").commit_index;
    load.world.wait_acked(load.acked() + 150).await;
    until_committed(&c, l, at_wipe + 60).await;
    load.revive(&mut c, f).await;
    load.world.wait_acked(load.acked() + 100).await;
    load.finish().await;
    c.wait_converged(&[0, 1, 2]).await;
    assert!(installed_a_snapshot(&c, f), "the wiped follower caught up without installing a snapshot");
    let n = load.verify(&c).await;
    eprintln!("cluster: catch-up under load: {n} acked messages verified on 3 nodes; reconnections {}", load.world.ends_summary());
}

/// Waits until node `i` has committed index `n`.
async fn until_committed(c: &Cluster, i: usize, n: u64) {
    c.poll(&format!("commit index {n}"), &[i], |st| st[0].as_ref().filter(|s| s.commit_index >= n).map(|_| ())).await
}

/// Whether node `i`'s state machine directory holds a state generation above 0, i.e. one
/// restored from a received snapshot (`DATA/raft/sm/state-N`).
fn installed_a_snapshot(c: &Cluster, i: usize) -> bool {
    let sm = c.nodes[i].dir.data().join("raft/sm");
    std::fs::read_dir(&sm)
        .unwrap_or_else(|e| panic!("{}: {e}", sm.display()))
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .any(|n| n.strip_prefix("state-").and_then(|g| g.parse::<u64>().ok()).is_some_and(|g| g >= 1))
}

// ---------------------------------------------------------------------------------- membership

/// `parley cluster add` of a fourth node through a follower (a wrong token refused first): it
/// catches up and serves the history; `parley cluster remove` takes it out again, and the three
/// go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_add_and_remove_a_fourth_node() {
    let mut c = Cluster::start(3, &[]).await;
    let l = c.wait_leader().await;
    let ta = c.nodes[l].srv.user("alice").await;
    let tb = c.nodes[(l + 1) % 3].srv.user("bob").await;
    let conv = Conv::dm("alice", "bob").to_string();
    let mut alice = Client::connect(c.addr(l), &ta, None, Encoding::Json).await.client;
    for (k, b) in dialog(3, 10).iter().enumerate() {
        alice.send_acked(&format!("m-{k}"), "bob", b).await;
    }
    let k = c.start_extra().await;
    let id = c.nodes[k].id.to_string();
    let addr = c.join_addr(k).to_string();
    // Through a follower: it goes to the leader.
    let url = c.url((l + 1) % 3);

    let (ok, out, err) = parley(&["cluster", "add", "--url", &url, "--id", &id, "--addr", &addr, "--token", "wrong"]).await;
    assert!(!ok, "cluster add with a wrong token succeeded:\n{out}\n{err}");
    assert_eq!(c.status(l).await.expect("status").members, vec![1, 2, 3]);

    let (ok, out, err) = parley(&["cluster", "add", "--url", &url, "--id", &id, "--addr", &addr, "--token", ADMIN_TOKEN]).await;
    assert!(ok, "cluster add failed:\n{out}\n{err}");
    let all = [0, 1, 2, k];
    c.poll("four members everywhere", &all, |st| st.iter().all(|s| s.as_ref().is_some_and(|s| s.members == [1, 2, 3, 4])).then_some(())).await;
    c.wait_converged(&all).await;
    let want = rows(&alice.history_all(&conv).await);
    let mut r = Client::connect(c.addr(k), &tb, None, Encoding::Json).await.client;
    assert_eq!(rows(&r.history_all(&conv).await), want, "the new node's history");
    // It takes part: a message sent through it is acked and seen on the others.
    r.send_acked("via-4", "alice", "hello from the fourth node").await;
    r.close().await;
    assert_eq!(alice.history_all(&conv).await.last().map(|m| m.id.clone()), Some("via-4".to_owned()));

    let url = c.url(c.wait_leader_among(&all).await);
    let (ok, out, err) = parley(&["cluster", "remove", "--url", &url, "--id", &id, "--token", "wrong"]).await;
    assert!(!ok, "cluster remove with a wrong token succeeded:\n{out}\n{err}");
    let (ok, out, err) = parley(&["cluster", "remove", "--url", &url, "--id", &id, "--token", ADMIN_TOKEN]).await;
    assert!(ok, "cluster remove failed:\n{out}\n{err}");
    c.poll("three members on the three", &[0, 1, 2], |st| st.iter().all(|s| s.as_ref().is_some_and(|s| s.members == [1, 2, 3])).then_some(())).await;
    let l3 = c.wait_leader_among(&[0, 1, 2]).await;
    alice.send_acked("after-remove", "bob", "three again").await;
    alice.close().await;
    let mut r = Client::connect(c.addr((l3 + 1) % 3), &tb, None, Encoding::Json).await.client;
    assert_eq!(r.history_all(&conv).await.last().map(|m| m.id.clone()), Some("after-remove".to_owned()));
}

/// `parley cluster remove` of the leader itself (after a fourth node joined, so three voters
/// stay): the others agree on the new members and elect a leader among themselves, the node
/// added later (its election timeout is the shortest: it wins), and writes and reads go on
/// through every one of them, also those whose `cluster.peers` does not name the new leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_remove_of_the_leader_leaves_three_that_go_on() {
    let mut c = Cluster::start(3, &[("PARLEY__CLUSTER__ELECTION_TIMEOUT_MS", "3000")]).await;
    let l0 = c.wait_leader().await;
    let k = c.start_extra_with(&[("PARLEY__CLUSTER__ELECTION_TIMEOUT_MS", "300")]).await;
    let (id, addr) = (c.nodes[k].id.to_string(), c.join_addr(k).to_string());
    let (ok, out, err) = parley(&["cluster", "add", "--url", &c.url(l0), "--id", &id, "--addr", &addr, "--token", ADMIN_TOKEN]).await;
    assert!(ok, "cluster add failed:\n{out}\n{err}");
    let all = [0, 1, 2, k];
    c.poll("four members everywhere", &all, |st| st.iter().all(|s| s.as_ref().is_some_and(|s| s.members == [1, 2, 3, 4])).then_some(())).await;
    let l = c.wait_leader_among(&all).await;
    let ta = c.nodes[(l + 1) % 4].srv.user("alice").await;
    c.nodes[(l + 2) % 4].srv.register("bob").await;

    let lid = c.nodes[l].id;
    let (ok, out, err) = parley(&["cluster", "remove", "--url", &c.url(l), "--id", &lid.to_string(), "--token", ADMIN_TOKEN]).await;
    assert!(ok, "cluster remove of the leader failed:\n{out}\n{err}");
    let rest: Vec<usize> = all.iter().copied().filter(|&i| i != l).collect();
    let want: Vec<u64> = rest.iter().map(|&i| c.nodes[i].id).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
    c.poll("the leader's removal everywhere else", &rest, |st| st.iter().all(|s| s.as_ref().is_some_and(|s| s.members == want)).then_some(())).await;
    let l2 = c.wait_leader_among(&rest).await;
    assert_ne!(l2, l);
    if l2 != k {
        eprintln!("cluster: removed leader: node {} won the election, not the added node {} (the case of a leader outside cluster.peers is not reached)", l2 + 1, k + 1);
    }
    let conv = Conv::dm("alice", "bob").to_string();
    let mut first: Option<Vec<Row>> = None;
    for (n, &i) in rest.iter().enumerate() {
        let mut cl = Client::connect(c.addr(i), &ta, None, Encoding::Json).await.client;
        cl.send_acked(&format!("after-{n}"), "bob", "the leader is gone").await;
        cl.close().await;
    }
    for &i in &rest {
        let mut cl = Client::connect(c.addr(i), &ta, None, Encoding::Json).await.client;
        let h = rows(&cl.history_all(&conv).await);
        assert_eq!(h.len(), rest.len(), "node {}", i + 1);
        match &first {
            None => first = Some(h),
            Some(f) => assert_eq!(f, &h, "node {}'s history differs", i + 1),
        }
        cl.close().await;
    }
    eprintln!("cluster: removed leader {}: its status now {:?}; new leader {}", lid, c.status(l).await, l2 + 1);
    // The removed node says so to a load balancer, and a second removal is refused.
    let (code, h) = crate::common::http(c.addr(l), "GET", "/v1/healthz", None, None).await;
    assert_eq!((code, h["status"].as_str()), (503, Some("removed")), "the removed node's healthz: {h}");
    let (ok, out, err) = parley(&["cluster", "remove", "--url", &c.url(l2), "--id", &lid.to_string(), "--token", ADMIN_TOKEN]).await;
    assert!(!ok && err.contains("not a voter"), "removing a non-member again:\n{out}\n{err}");
}

// ---------------------------------------------------------------------------------- parley load

/// `parley load chat --url A,B,C`: simulated user k on node k mod 3 (every node holds its share
/// of the sockets while it runs), and every acked message delivered exactly once, in order;
/// then the same over XMPP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_chat_through_every_node_loses_nothing() {
    let c = Cluster::start(3, &[]).await;
    c.wait_leader().await;
    let urls = (0..3).map(|i| c.url(i)).collect::<Vec<_>>().join(",");
    let users = 40;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_parley"))
        .args(["load", "chat", "--url", &urls, "--users", &users.to_string(), "--rate", "5", "--duration", "5"])
        .args(["--json", "--quiet", "--threads", "2"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run parley load");
    // While it runs, each node holds its users' sockets: 14, 13 and 13.
    let mut peak = [0u64; 3];
    let t0 = Instant::now();
    let share = |i: usize| ((users - i) as u64).div_ceil(3);
    while peak.iter().enumerate().any(|(i, p)| *p < share(i)) {
        if t0.elapsed() > DEADLINE || child.try_wait().expect("try_wait").is_some() {
            break;
        }
        for (i, p) in peak.iter_mut().enumerate() {
            let (_, h) = c.healthz(i).await;
            *p = (*p).max(h["sockets"].as_u64().unwrap_or(0));
        }
        tokio::time::sleep(POLL).await;
    }
    let out = within(Duration::from_secs(120), "parley load to end", child.wait_with_output()).await.expect("parley load");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "parley load: {:?}\n{stdout}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    for (i, p) in peak.iter().enumerate() {
        assert!(*p >= share(i), "node {} held at most {p} sockets, not its {} users': {peak:?}", i + 1, share(i));
    }
    let j: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"));
    let acked = assert_load_kept_every_promise(&j);
    eprintln!("cluster: load through 3 nodes: {acked} acked; sockets per node {peak:?}; ack latency {}", j["ack_latency"]);
    // The same over XMPP-over-WebSocket (each node's gateway; SASL waits for the read index).
    let j = parley_load_json(&urls, &["chat", "--protocol", "xmpp", "--users", "12", "--rate", "5", "--duration", "3"]).await;
    assert_eq!(j["protocol"], "xmpp", "{j}");
    let acked = assert_load_kept_every_promise(&j);
    eprintln!("cluster: XMPP load through 3 nodes: {acked} acked; ack latency {}", j["ack_latency"]);
}

/// `--url` as a list on a single server (the same node twice, so user k alternates between two
/// entries that are one server): the run keeps every promise as with one URL; a list with an
/// empty entry is refused before anything runs (exit 2, saying why).
#[tokio::test(flavor = "multi_thread")]
async fn load_takes_a_list_of_urls_and_refuses_an_empty_entry() {
    let dir = TestDir::new();
    let srv = Server::start(&dir).await;
    let url = format!("http://{}", srv.addr);
    let j = parley_load_json(&format!("{url},{url}"), &["chat", "--users", "4", "--rate", "5", "--duration", "1"]).await;
    assert_load_kept_every_promise(&j);
    let out = within(
        T,
        "parley load with a bad list",
        tokio::process::Command::new(env!("CARGO_BIN_EXE_parley")).args(["load", "chat", "--url", &format!("{url},")]).kill_on_drop(true).output(),
    )
    .await
    .expect("run parley load");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("empty entry"), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Hellos on every node while a fourth node is added and removed, five times, and on the new
/// node right after each add: a quorum exists all along, so every hello is welcomed (none is
/// told to go away).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hellos_during_membership_changes_are_all_welcomed() {
    let mut c = Cluster::start(3, &[]).await;
    let l = c.wait_leader().await;
    let ta = c.nodes[l].srv.user("alice").await;
    let k = c.start_extra().await;
    let (id, addr) = (c.nodes[k].id.to_string(), c.join_addr(k).to_string());
    let stop = Arc::new(AtomicBool::new(false));
    let addrs: Vec<SocketAddr> = (0..3).map(|i| c.addr(i)).collect();
    let hellos: Vec<_> = (0..4).map(|_| {
        let (stop, ta, addrs) = (stop.clone(), ta.clone(), addrs.clone());
        tokio::spawn(async move {
            let (mut n, mut refused) = (0u64, Vec::new());
            while !stop.load(Ordering::SeqCst) {
                for a in &addrs {
                    let mut cl = Client::open(*a, &ta, None, Encoding::Json).await;
                    match cl.recv().await {
                        ServerFrame::Welcome { .. } => {}
                        f => refused.push(format!("{a}: {f:?}")),
                    }
                    n += 1;
                    cl.close().await;
                }
            }
            (n, refused)
        })
    }).collect();
    for round in 0..5 {
        let url = c.url(c.wait_leader_among(&[0, 1, 2]).await);
        let (ok, out, err) = parley(&["cluster", "add", "--url", &url, "--id", &id, "--addr", &addr, "--token", ADMIN_TOKEN]).await;
        assert!(ok, "round {round}: cluster add failed:\n{out}\n{err}");
        // The new voter itself, at once.
        for _ in 0..5 {
            let mut cl = Client::open(c.addr(k), &ta, None, Encoding::Json).await;
            let f = cl.recv().await;
            assert!(matches!(f, ServerFrame::Welcome { .. }), "round {round}: a hello on the node just added: {f:?}");
            cl.close().await;
        }
        let url = c.url(c.wait_leader_among(&[0, 1, 2, k]).await);
        let (ok, out, err) = parley(&["cluster", "remove", "--url", &url, "--id", &id, "--token", ADMIN_TOKEN]).await;
        assert!(ok, "round {round}: cluster remove failed:\n{out}\n{err}");
    }
    stop.store(true, Ordering::SeqCst);
    let (mut n, mut refused) = (0, Vec::new());
    for h in hellos {
        let (k, r) = within(DEADLINE, "the hello loops to end", h).await.expect("hello loop");
        n += k;
        refused.extend(r);
    }
    assert!(refused.is_empty(), "{} of {n} hellos during membership changes were refused: {refused:#?}", refused.len());
    eprintln!("cluster: {n} hellos during 5 add/remove rounds, all welcomed");
}
