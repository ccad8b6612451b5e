//! The chat engine: pairs of users replaying dialogs to each other over live sockets, with ack
//! and delivery latencies and an exactly-once, in-order check of every acked message. Used by
//! the `chat` and `ramp` scenarios.
//!
//! Each user has three tasks: a *writer* owning the socket's write half (fed by a channel), a
//! *reader* handling acks, errors and events (and confirming events with `received` every
//! `received_ms`), and a *sender* pacing the user's sends: closed loop (`window` sends in flight,
//! the next one as soon as one is acked) or open loop (a rate, scheduled in advance; latency is
//! measured from the scheduled time, so a client or server that falls behind cannot hide it:
//! no coordinated omission).
//!
//! A message's id is `K.T`: the user's K-th send, scheduled T µs after the run started. The
//! recipient reads T from the id to measure delivery latency, with no shared state.
//!
//! Integrity: each user's stream must carry the conversation's messages with seq 1, 2, 3, ...
//! (its own and its peer's), each exactly once and in order, and its ev numbers without gaps.
//! At the end every message the sender saw acked (id, body hash, and seq where the ack says it)
//! must be among the ones the recipient received, exactly once, with the same id and body.
//!
//! Over XMPP ([`Protocol::Xmpp`], the wire in [`super::xmpp`]) the same users, scripts, rates and
//! checks run over XMPP-over-WebSocket: a send is a `<message/>` and `<r/>`, its ack the
//! gateway's XEP-0198 `<a h/>` covering it (no seq in it: acked messages are matched by id), a
//! delivery a `<message/>` whose XEP-0359 stanza-id gives the seq. A user's own messages are not
//! echoed to the resource that sent them, so its stream holds only its peer's: their seqs must
//! increase (not step by 1), and there are no ev numbers to check.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use parking_lot::Mutex;
use rand::Rng;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

use super::accounts::Account;
use super::dialogs::{Dialogs, Script};
use super::http::Target;
use super::stats::{self, Stats};
use super::ws::{self, Ws};
use crate::protocol::ids::Conv;
use crate::protocol::{ClientFrame, Encoding, ErrorCode, EventPayload, ServerFrame};

/// The wire protocol of the simulated clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// The native protocol over `/v1/ws` (PROTOCOL.md).
    Native,
    /// XMPP over WebSocket (RFC 7395) at `/xmpp-websocket`, with XEP-0198 acks.
    Xmpp,
}

/// How a user paces its sends.
#[derive(Debug, Clone, Copy)]
pub enum Mode {
    /// `window` sends in flight per user; the next goes as soon as one is acked.
    Closed { window: usize },
    /// At the rate in [`ChatConfig::rate_milli`], whatever the acks do.
    Open,
}

/// Settings of the engine.
#[derive(Clone)]
pub struct ChatConfig {
    pub enc: Encoding,
    pub protocol: Protocol,
    /// XMPP: the server's domain (`xmpp.domain`), for the JIDs.
    pub xmpp_domain: String,
    /// XMPP: the users' password (SASL PLAIN).
    pub password: String,
    pub mode: Mode,
    /// Open loop: each user's rate, in thousandths of a message per second; 0 pauses. Shared
    /// so that `ramp` can change it while the run goes on.
    pub rate_milli: Arc<AtomicU64>,
    /// How often a reader confirms its events with `received`.
    pub received_every: Duration,
    /// Open loop: most sends in flight per user; a tick beyond it is skipped and counted.
    pub max_inflight: usize,
    /// Sockets opened at once while connecting.
    pub connect_concurrency: usize,
}

/// A send waiting for its ack.
struct Pending {
    /// Scheduled send time, µs since the start of the run.
    t0: u64,
    /// Hash of the body, for the end-to-end check.
    hash: u64,
    /// The encoded frame, for a resend with the same id.
    msg: Message,
    attempts: u32,
}

/// XMPP: the client side of the XEP-0198 counters.
#[derive(Default)]
struct SmOut {
    /// Stanzas sent after `<enable/>`, mod 2^32.
    out: u32,
    /// The last `h` the server acked.
    acked: u32,
    /// (count after the stanza, message id, attempt) of messages not yet covered by an `<a/>`.
    sent: std::collections::VecDeque<(u32, String, u32)>,
}

/// What one user saw, for the final check.
#[derive(Default)]
struct Ledger {
    /// Own messages acked: id → (seq when the ack gives it, body hash).
    acked: HashMap<String, (Option<u64>, u64)>,
    /// The peer's messages as delivered, in arrival order: (seq, id, body hash).
    got: Vec<(u64, String, u64)>,
    /// Conversation messages whose seq was not the previous one + 1.
    out_of_order: u64,
    /// Events whose ev was not the previous one + 1.
    ev_gaps: u64,
    /// Acks for no pending send.
    stray_acks: u64,
    /// Why the socket ended, if it ended before the run did.
    lost_socket: Option<String>,
    /// Highest ev seen.
    last_ev: u64,
}

/// One simulated user.
struct User {
    name: String,
    peer: String,
    conv: String,
    /// To the writer task; the reader holds a clone for `received`, resends and the close.
    tx: mpsc::UnboundedSender<Message>,
    pending: Mutex<HashMap<String, Pending>>,
    /// Closed loop: permits for new sends; the reader returns one per answered send.
    window: Semaphore,
    ledger: Mutex<Ledger>,
    /// XMPP: stanza counting (messages are queued to the writer under this lock, so the count
    /// follows the wire order).
    sm: Mutex<SmOut>,
}

impl User {
    /// XMPP: queues message `id` (attempt `attempt`) and an `<r/>`, counted.
    fn send_xmpp(&self, id: &str, attempt: u32, msg: Message) -> bool {
        let mut sm = self.sm.lock();
        sm.out = sm.out.wrapping_add(1);
        let n = sm.out;
        sm.sent.push_back((n, id.to_owned(), attempt));
        self.tx.send(msg).is_ok() && self.tx.send(super::xmpp::request_ack()).is_ok()
    }

    /// Queues a first send or a resend on the user's socket.
    fn resend(&self, protocol: Protocol, id: &str, attempt: u32, msg: Message) -> bool {
        match protocol {
            Protocol::Native => self.tx.send(msg).is_ok(),
            Protocol::Xmpp => self.send_xmpp(id, attempt, msg),
        }
    }
}

/// A running chat load.
pub struct Engine {
    pub stats: Arc<Stats>,
    users: Vec<Arc<User>>,
    /// Set to true: the senders begin.
    go: watch::Sender<bool>,
    /// Set: the senders stop.
    stop_sending: Arc<AtomicBool>,
    stop_tx: watch::Sender<bool>,
    /// Set to true: readers confirm, close their sockets and end.
    closing: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    /// When `go` was set.
    pub began: Option<Instant>,
}

/// The outcome of the end-to-end check.
#[derive(Debug, Default, Clone)]
pub struct Verdict {
    pub acked: u64,
    /// Acked messages found exactly once at the recipient, with the same id and body.
    pub delivered_ok: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub out_of_order: u64,
    /// Delivered with another id or body than the sender's ack says.
    pub mismatched: u64,
    pub ev_gaps: u64,
    /// Sends never answered (neither ack nor final error) by the end of the drain.
    pub unacked: u64,
    /// Peer messages delivered whose ack the sender never saw.
    pub delivered_unacked: u64,
    pub stray_acks: u64,
    /// Sockets the server closed during the run.
    pub lost_sockets: u64,
}

impl Verdict {
    /// Whether the run kept every promise: nothing lost, duplicated, reordered or altered.
    pub fn ok(&self) -> bool {
        self.lost == 0 && self.duplicated == 0 && self.out_of_order == 0 && self.mismatched == 0 && self.ev_gaps == 0 && self.unacked == 0
    }

    pub fn json(&self) -> Value {
        json!({
            "ok": self.ok(),
            "acked": self.acked,
            "delivered_exactly_once": self.delivered_ok,
            "lost": self.lost,
            "duplicated": self.duplicated,
            "out_of_order": self.out_of_order,
            "mismatched": self.mismatched,
            "ev_gaps": self.ev_gaps,
            "unacked": self.unacked,
            "delivered_unacked": self.delivered_unacked,
            "stray_acks": self.stray_acks,
            "lost_sockets": self.lost_sockets,
        })
    }

    pub fn line(&self) -> String {
        format!(
            "{}: {} acked, {} delivered exactly once in order; lost {}, duplicated {}, out of order {}, \
             mismatched {}, ev gaps {}, unacked {}, sockets lost {}",
            if self.ok() { "OK" } else { "FAILED" },
            stats::thousands(self.acked),
            stats::thousands(self.delivered_ok),
            self.lost,
            self.duplicated,
            self.out_of_order,
            self.mismatched,
            self.ev_gaps,
            self.unacked,
            self.lost_sockets
        )
    }
}

fn body_hash(s: &str) -> u64 {
    let mut h = DefaultHasher::new();
    s.hash(&mut h);
    h.finish()
}

/// The scheduled time in a message id `K.T`.
fn sent_at(id: &str) -> Option<u64> {
    id.split_once('.')?.1.parse().ok()
}

impl Engine {
    /// Connects every account (pairs: 0-1, 2-3, ...), account i to `targets[i mod n]`, syncs
    /// them, and starts their tasks; the senders wait for [`Engine::go`].
    pub async fn start(targets: &[Target], accounts: &[Account], dialogs: Arc<Dialogs>, cfg: ChatConfig, stats: Arc<Stats>) -> anyhow::Result<Engine> {
        anyhow::ensure!(accounts.len() >= 2 && accounts.len() % 2 == 0, "chat needs an even number of users, at least 2");
        let pairs = accounts.len() / 2;
        // Connect and sync every socket first, a few at a time.
        let sem = Arc::new(Semaphore::new(cfg.connect_concurrency.max(1)));
        let mut conns = Vec::new();
        for (i, a) in accounts.iter().enumerate() {
            let target = targets[i % targets.len()].clone();
            let (sem, token, cfg, user) = (sem.clone(), a.token.clone(), cfg.clone(), a.user.clone());
            conns.push(tokio::spawn(async move {
                let _p = sem.acquire().await;
                match cfg.protocol {
                    Protocol::Native => {
                        let mut w = ws::connect(&target, None, false).await.map_err(|e| anyhow!("connect: {e}"))?;
                        let s = ws::hello(&mut w, &token, None, cfg.enc, false).await?;
                        Ok::<_, anyhow::Error>((w, s.head, super::xmpp::LoggedIn::default()))
                    }
                    Protocol::Xmpp => {
                        let mut w = super::xmpp::connect(&target, None, false).await.map_err(|e| anyhow!("connect: {e}"))?;
                        let l = super::xmpp::login(&mut w, &cfg.xmpp_domain, &user, &cfg.password, "load", true).await?;
                        Ok((w, 0, l))
                    }
                }
            }));
        }
        let (go, _) = watch::channel(false);
        let (stop_tx, _) = watch::channel(false);
        let (closing, _) = watch::channel(false);
        let stop_sending = Arc::new(AtomicBool::new(false));
        let mut users = Vec::new();
        let mut tasks = Vec::new();
        for (i, c) in conns.into_iter().enumerate() {
            let (w, head, logged) = c.await.map_err(|e| anyhow!("connect task: {e}"))?.with_context(|| format!("user {}", accounts[i].user))?;
            let me = &accounts[i].user;
            let peer = &accounts[i ^ 1].user;
            let (sink, stream) = w.split();
            let (tx, rx) = mpsc::unbounded_channel();
            let window = match cfg.mode {
                Mode::Closed { window } => window.max(1),
                Mode::Open => 0,
            };
            let u = Arc::new(User {
                name: me.clone(),
                peer: peer.clone(),
                conv: Conv::dm(me, peer).to_string(),
                tx,
                pending: Mutex::new(HashMap::new()),
                window: Semaphore::new(window),
                ledger: Mutex::new(Ledger { last_ev: head, ..Default::default() }),
                sm: Mutex::new(SmOut { out: logged.outbound, acked: logged.outbound, ..Default::default() }),
            });
            tasks.push(tokio::spawn(writer(sink, rx)));
            match cfg.protocol {
                Protocol::Native => tasks.push(tokio::spawn(reader(u.clone(), stream, stats.clone(), cfg.clone(), closing.subscribe()))),
                Protocol::Xmpp => {
                    tasks.push(tokio::spawn(xmpp_reader(u.clone(), stream, stats.clone(), cfg.clone(), closing.subscribe(), logged.inbound)))
                }
            }
            let script = Script::new(dialogs.clone(), Script::start_of(&dialogs, i / 2, pairs), Some(i % 2));
            tasks.push(tokio::spawn(sender(
                u.clone(),
                script,
                stats.clone(),
                cfg.clone(),
                go.subscribe(),
                stop_sending.clone(),
                stop_tx.subscribe(),
            )));
            users.push(u);
        }
        Ok(Engine { stats, users, go, stop_sending, stop_tx, closing, tasks, began: None })
    }

    /// Lets the senders begin.
    pub fn go(&mut self) {
        self.began = Some(Instant::now());
        let _ = self.go.send(true);
    }

    /// Stops new sends; answers and deliveries still arrive.
    pub fn stop_sending(&self) {
        self.stop_sending.store(true, Ordering::Relaxed);
        let _ = self.stop_tx.send(true);
    }

    /// Waits until every send is answered and every acked message delivered, or `timeout`.
    /// Returns whether it got there.
    pub async fn drain(&self, timeout: Duration) -> bool {
        let t0 = Instant::now();
        loop {
            let s = &self.stats;
            let inflight = self.users.iter().map(|u| u.pending.lock().len()).sum::<usize>();
            if inflight == 0 && Stats::load(&s.delivered) >= Stats::load(&s.acked) {
                return true;
            }
            if t0.elapsed() >= timeout {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Sends outstanding `received`s, closes the sockets, ends the tasks, and checks the ledgers.
    pub async fn finish(self) -> Verdict {
        let _ = self.closing.send(true);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        for t in self.tasks {
            let abort = t.abort_handle();
            if tokio::time::timeout_at(deadline, t).await.is_err() {
                abort.abort();
            }
        }
        verify(&self.users)
    }

    /// Total sends waiting for an answer.
    pub fn inflight(&self) -> u64 {
        Stats::load(&self.stats.inflight)
    }
}

fn verify(users: &[Arc<User>]) -> Verdict {
    let mut v = Verdict::default();
    for pair in users.chunks(2) {
        let (a, b) = (pair[0].ledger.lock(), pair[1].ledger.lock());
        for (sender, recipient) in [(&a, &b), (&b, &a)] {
            // By id: an XMPP ack carries no seq. A message delivered under another seq than its
            // ack said, or with another body, is mismatched.
            let mut got: HashMap<&str, Vec<(u64, u64)>> = HashMap::new();
            for (seq, id, h) in &recipient.got {
                got.entry(id.as_str()).or_default().push((*seq, *h));
            }
            for (id, (seq, h)) in &sender.acked {
                v.acked += 1;
                match got.get(id.as_str()) {
                    None => v.lost += 1,
                    Some(list) => {
                        if list.len() > 1 {
                            v.duplicated += list.len() as u64 - 1;
                        }
                        if list[0].1 != *h || seq.is_some_and(|s| s != list[0].0) {
                            v.mismatched += 1;
                        } else if list.len() == 1 {
                            v.delivered_ok += 1;
                        }
                    }
                }
            }
            v.delivered_unacked += got.keys().filter(|id| !sender.acked.contains_key(**id)).count() as u64;
        }
        for l in [&a, &b] {
            v.out_of_order += l.out_of_order;
            v.ev_gaps += l.ev_gaps;
            v.stray_acks += l.stray_acks;
            v.lost_sockets += u64::from(l.lost_socket.is_some());
        }
    }
    v.unacked = users.iter().map(|u| u.pending.lock().len() as u64).sum();
    v
}

/// Owns the write half: writes what the channel brings, flushing when it runs dry. Ends after
/// writing a close, or when every sender is gone.
async fn writer(mut sink: SplitSink<Ws, Message>, mut rx: mpsc::UnboundedReceiver<Message>) {
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(m) = next {
            let close = matches!(m, Message::Close(_));
            if sink.feed(m).await.is_err() {
                return;
            }
            if close {
                let _ = sink.flush().await;
                return;
            }
            next = rx.try_recv().ok();
        }
        if sink.flush().await.is_err() {
            return;
        }
    }
}

/// Paces one user's sends.
async fn sender(
    u: Arc<User>,
    mut script: Script,
    stats: Arc<Stats>,
    cfg: ChatConfig,
    mut go: watch::Receiver<bool>,
    stop: Arc<AtomicBool>,
    mut stop_rx: watch::Receiver<bool>,
) {
    if go.wait_for(|g| *g).await.is_err() {
        return;
    }
    let mut k = 0u64;
    let mut send = |t: u64| {
        k += 1;
        let body = script.next_turn();
        let id = format!("{k}.{t}");
        let hash = body_hash(&body);
        let msg = match cfg.protocol {
            Protocol::Native => ws::encode(ClientFrame::Send { id: id.clone(), to: u.peer.clone(), body }, cfg.enc),
            Protocol::Xmpp => super::xmpp::chat(&format!("{}@{}", u.peer, cfg.xmpp_domain), &id, &body),
        };
        u.pending.lock().insert(id.clone(), Pending { t0: t, hash, msg: msg.clone(), attempts: 0 });
        stats.inflight.fetch_add(1, Ordering::Relaxed);
        stats.sent.fetch_add(1, Ordering::Relaxed);
        u.resend(cfg.protocol, &id, 0, msg)
    };
    match cfg.mode {
        Mode::Closed { .. } => loop {
            let permit = tokio::select! {
                p = u.window.acquire() => p,
                _ = stop_rx.wait_for(|s| *s) => return,
            };
            let Ok(permit) = permit else { return };
            permit.forget();
            if stop.load(Ordering::Relaxed) || !send(stats.now_us()) {
                return;
            }
        },
        Mode::Open => {
            // A random phase, so the users do not all send in the same instant.
            let first = cfg.rate_milli.load(Ordering::Relaxed).max(1);
            let mut next = stats.now_us() + rand::thread_rng().gen_range(0..(1_000_000_000 / first).max(1));
            loop {
                let r = cfg.rate_milli.load(Ordering::Relaxed);
                if r == 0 {
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                        _ = stop_rx.wait_for(|s| *s) => return,
                    }
                    next = stats.now_us();
                    continue;
                }
                let at = tokio::time::Instant::from_std(stats.start + Duration::from_micros(next));
                tokio::select! {
                    _ = tokio::time::sleep_until(at) => {}
                    _ = stop_rx.wait_for(|s| *s) => return,
                }
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let now = stats.now_us();
                if now > next + 1_000_000 {
                    // More than a second behind: this client cannot keep the pace. Skip the
                    // missed ticks (counted) instead of bursting.
                    let missed = (now - next) * r / 1_000_000_000;
                    stats.skipped.fetch_add(missed, Ordering::Relaxed);
                    next = now;
                }
                if u.pending.lock().len() >= cfg.max_inflight {
                    stats.skipped.fetch_add(1, Ordering::Relaxed);
                } else if !send(next) {
                    return;
                }
                next += (1_000_000_000 / r).max(1);
            }
        }
    }
}

/// A send the server refused: sent again after a jittered backoff when the refusal is
/// retryable (at most 100 attempts), else given up (its window permit returned).
fn refused(u: &Arc<User>, stats: &Stats, protocol: Protocol, id: &str, retry: bool) {
    let mut pending = u.pending.lock();
    let give_up = match pending.get_mut(id) {
        Some(p) if retry && p.attempts < 100 => {
            p.attempts += 1;
            let delay = (5u64 << p.attempts.min(7)).min(500) + rand::thread_rng().gen_range(0..5);
            let (u2, m, attempt, id2) = (u.clone(), p.msg.clone(), p.attempts, id.to_owned());
            stats.retries.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(delay)).await;
                u2.resend(protocol, &id2, attempt, m);
            });
            false
        }
        Some(_) => true,
        None => false,
    };
    if give_up {
        pending.remove(id);
        drop(pending);
        if retry {
            stats.error("gave_up");
        }
        stats.inflight.fetch_sub(1, Ordering::Relaxed);
        u.window.add_permits(1);
    }
}

/// Handles what the server sends one user.
async fn reader(u: Arc<User>, mut stream: SplitStream<Ws>, stats: Arc<Stats>, cfg: ChatConfig, mut closing: watch::Receiver<bool>) {
    let mut confirmed = u.ledger.lock().last_ev;
    let mut last_seq = 0u64;
    let mut tick = tokio::time::interval(cfg.received_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ending: Option<tokio::time::Instant> = None;
    loop {
        let msg = tokio::select! {
            m = stream.next() => m,
            _ = tick.tick() => {
                let last = u.ledger.lock().last_ev;
                if last > confirmed {
                    confirmed = last;
                    let _ = u.tx.send(ws::encode(ClientFrame::Received { up_to: last }, cfg.enc));
                }
                continue;
            }
            _ = closing.wait_for(|c| *c), if ending.is_none() => {
                let last = u.ledger.lock().last_ev;
                if last > confirmed {
                    let _ = u.tx.send(ws::encode(ClientFrame::Received { up_to: last }, cfg.enc));
                }
                let _ = u.tx.send(Message::Close(None));
                ending = Some(tokio::time::Instant::now() + Duration::from_secs(3));
                continue;
            }
            _ = async { tokio::time::sleep_until(ending.unwrap_or_else(tokio::time::Instant::now)).await }, if ending.is_some() => return,
        };
        let msg = match msg {
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                if ending.is_none() {
                    stats.error("socket_error");
                    u.ledger.lock().lost_socket = Some(e.to_string());
                }
                return;
            }
            None => {
                if ending.is_none() {
                    stats.error("socket_eof");
                    u.ledger.lock().lost_socket = Some("eof".into());
                }
                return;
            }
        };
        if let Some(code) = ws::close_code(&msg) {
            if ending.is_none() {
                stats.error(&code);
                u.ledger.lock().lost_socket = Some(code);
            }
            return;
        }
        let frame = match ws::decode(&msg) {
            Ok(Some(f)) => f,
            Ok(None) => continue,
            Err(_) => {
                stats.error("undecodable_frame");
                continue;
            }
        };
        match frame {
            ServerFrame::Ack { id, seq, .. } => {
                let p = u.pending.lock().remove(&id);
                match p {
                    Some(p) => {
                        stats.ack.lock().record(stats.now_us().saturating_sub(p.t0));
                        stats.acked.fetch_add(1, Ordering::Relaxed);
                        stats.inflight.fetch_sub(1, Ordering::Relaxed);
                        u.ledger.lock().acked.insert(id, (Some(seq), p.hash));
                        u.window.add_permits(1);
                    }
                    None => u.ledger.lock().stray_acks += 1,
                }
            }
            ServerFrame::Error { code, id: Some(id), .. } => {
                stats.error(code.as_str());
                let retry = matches!(code, ErrorCode::RateLimited | ErrorCode::Overloaded | ErrorCode::Unavailable);
                refused(&u, &stats, Protocol::Native, &id, retry);
            }
            ServerFrame::Error { code, .. } => stats.error(code.as_str()),
            ServerFrame::Event { ev, payload } => {
                let mut l = u.ledger.lock();
                if ev != l.last_ev + 1 {
                    l.ev_gaps += 1;
                }
                l.last_ev = l.last_ev.max(ev);
                if let EventPayload::Message(m) = payload {
                    if m.conv != u.conv {
                        continue;
                    }
                    let first = m.seq > last_seq;
                    if m.seq != last_seq + 1 {
                        l.out_of_order += 1;
                    }
                    last_seq = last_seq.max(m.seq);
                    if m.from == u.peer {
                        if first {
                            stats.delivered.fetch_add(1, Ordering::Relaxed);
                        }
                        if let Some(t) = sent_at(&m.id) {
                            stats.delivery.lock().record(stats.now_us().saturating_sub(t));
                        }
                        l.got.push((m.seq, m.id, body_hash(&m.body)));
                    } else if m.from != u.name {
                        stats.error("message_from_stranger");
                    }
                }
            }
            ServerFrame::Goaway { .. } => stats.error("goaway"),
            _ => {}
        }
    }
}

/// XMPP: handles what the gateway sends one user (see [`super::xmpp`] for the mapping): counts
/// the stanzas (XEP-0198) and answers every `<r/>`, takes the gateway's `<a h/>` as the acks of
/// the messages it covers, stanza errors as refusals (retried when of type `wait`), and the
/// peer's messages as deliveries. `inbound` is the count after the login.
async fn xmpp_reader(u: Arc<User>, mut stream: SplitStream<Ws>, stats: Arc<Stats>, cfg: ChatConfig, mut closing: watch::Receiver<bool>, mut inbound: u32) {
    use super::xmpp;
    use crate::xmpp::stanza::ns;
    let mut last_seq = 0u64;
    let peer_jid = format!("{}@{}", u.peer, cfg.xmpp_domain);
    let mut ending: Option<tokio::time::Instant> = None;
    loop {
        let msg = tokio::select! {
            m = stream.next() => m,
            _ = closing.wait_for(|c| *c), if ending.is_none() => {
                // The last confirmation, then an orderly end of the stream (RFC 7395 §3.6).
                let _ = u.tx.send(xmpp::answer_ack(inbound));
                let _ = u.tx.send(xmpp::close());
                let _ = u.tx.send(Message::Close(None));
                ending = Some(tokio::time::Instant::now() + Duration::from_secs(3));
                continue;
            }
            _ = async { tokio::time::sleep_until(ending.unwrap_or_else(tokio::time::Instant::now)).await }, if ending.is_some() => return,
        };
        let lost = |why: String| {
            if ending.is_none() {
                stats.error(&why);
                u.ledger.lock().lost_socket = Some(why);
            }
        };
        let text = match msg {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Close(c))) => return lost(c.map_or("close:none".into(), |c| format!("close:{}", u16::from(c.code)))),
            Some(Ok(_)) => continue,
            Some(Err(_)) => return lost("socket_error".into()),
            None => return lost("socket_eof".into()),
        };
        let el = match crate::xmpp::parser::parse_frame(text.as_str()) {
            Ok(el) => el,
            Err(_) => {
                stats.error("undecodable_frame");
                continue;
            }
        };
        match (el.name(), el.ns().as_str()) {
            ("r", ns::SM) => {
                let _ = u.tx.send(xmpp::answer_ack(inbound));
                continue;
            }
            ("a", ns::SM) => {
                let Ok(xmpp_parsers::sm::A { h }) = xmpp_parsers::sm::A::try_from(el) else {
                    stats.error("bad_sm_ack");
                    continue;
                };
                let covered: Vec<(String, u32)> = {
                    let mut sm = u.sm.lock();
                    let newly = h.wrapping_sub(sm.acked);
                    if newly > sm.out.wrapping_sub(sm.acked) {
                        drop(sm);
                        stats.error("sm_ack_too_high");
                        continue;
                    }
                    let base = sm.acked;
                    let mut v = Vec::new();
                    while let Some((c, _, _)) = sm.sent.front() {
                        if c.wrapping_sub(base) > newly {
                            break;
                        }
                        if let Some((_, id, attempt)) = sm.sent.pop_front() {
                            v.push((id, attempt));
                        }
                    }
                    sm.acked = h;
                    v
                };
                for (id, attempt) in covered {
                    let mut pending = u.pending.lock();
                    // An attempt that was refused (its error came before this <a/>) is not acked.
                    if pending.get(&id).is_some_and(|p| p.attempts == attempt) {
                        let p = pending.remove(&id).expect("checked");
                        drop(pending);
                        stats.ack.lock().record(stats.now_us().saturating_sub(p.t0));
                        stats.acked.fetch_add(1, Ordering::Relaxed);
                        stats.inflight.fetch_sub(1, Ordering::Relaxed);
                        u.ledger.lock().acked.insert(id, (None, p.hash));
                        u.window.add_permits(1);
                    }
                }
                continue;
            }
            ("close", ns::FRAMING) => return lost("stream_closed".into()),
            _ => {}
        }
        if !xmpp::is_stanza(&el) {
            continue;
        }
        inbound = inbound.wrapping_add(1);
        if el.name() != "message" {
            continue;
        }
        let id = el.attr(rxml::xml_ncname!("id")).unwrap_or("").to_owned();
        if el.attr(rxml::xml_ncname!("type")) == Some("error") {
            let (cond, kind) = xmpp::stanza_error(&el);
            stats.error(&cond);
            let retry = kind == "wait";
            refused(&u, &stats, Protocol::Xmpp, &id, retry);
            continue;
        }
        let Some(body) = el.get_child("body", ns::CLIENT).map(|b| b.text()) else { continue };
        let from = el.attr(rxml::xml_ncname!("from")).unwrap_or("");
        let bare = from.split('/').next().unwrap_or("");
        let Some((conv, seq)) = xmpp::stanza_seq(&el) else {
            stats.error("message_without_stanza_id");
            continue;
        };
        if conv != u.conv {
            continue;
        }
        if bare != peer_jid {
            stats.error("message_from_stranger");
            continue;
        }
        let mut l = u.ledger.lock();
        let first = seq > last_seq;
        // Only the peer's messages come to this resource: seqs rise, with gaps for our own.
        if !first {
            l.out_of_order += 1;
        }
        last_seq = last_seq.max(seq);
        if first {
            stats.delivered.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(t) = sent_at(&id) {
            stats.delivery.lock().record(stats.now_us().saturating_sub(t));
        }
        l.got.push((seq, id, body_hash(&body)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_carry_the_send_time() {
        assert_eq!(sent_at("12.3456"), Some(3456));
        assert_eq!(sent_at("12"), None);
        assert_eq!(sent_at("x.y"), None);
    }

    fn user(name: &str, peer: &str) -> Arc<User> {
        let (tx, _rx) = mpsc::unbounded_channel();
        Arc::new(User {
            name: name.into(),
            peer: peer.into(),
            conv: Conv::dm(name, peer).to_string(),
            tx,
            pending: Mutex::new(HashMap::new()),
            window: Semaphore::new(1),
            ledger: Mutex::new(Ledger::default()),
            sm: Mutex::new(SmOut::default()),
        })
    }

    #[test]
    fn verify_finds_lost_duplicated_and_altered_messages() {
        let (a, b) = (user("a", "b"), user("b", "a"));
        {
            let mut la = a.ledger.lock();
            la.acked.insert("1.0".into(), (Some(1), 11));
            la.acked.insert("2.0".into(), (Some(2), 22));
            la.acked.insert("3.0".into(), (None, 33));
            la.acked.insert("4.0".into(), (Some(4), 44));
            let mut lb = b.ledger.lock();
            lb.got.push((1, "1.0".into(), 11));
            lb.got.push((2, "2.0".into(), 22));
            lb.got.push((2, "2.0".into(), 22));
            lb.got.push((3, "3.0".into(), 99));
        }
        let v = verify(&[a, b]);
        assert_eq!((v.acked, v.delivered_ok, v.lost, v.duplicated, v.mismatched), (4, 1, 1, 1, 1));
        assert!(!v.ok());
    }

    #[test]
    fn verify_accepts_a_clean_run() {
        let (a, b) = (user("a", "b"), user("b", "a"));
        a.ledger.lock().acked.insert("1.0".into(), (Some(1), 11));
        b.ledger.lock().got.push((1, "1.0".into(), 11));
        b.ledger.lock().acked.insert("1.5".into(), (None, 12));
        a.ledger.lock().got.push((2, "1.5".into(), 12));
        let v = verify(&[a, b]);
        assert!(v.ok(), "{v:?}");
        assert_eq!(v.delivered_ok, 2);
    }
}

/// Prints a progress line per second for `secs` seconds (or until `stop`), from the engine's
/// counters; returns the per-second acked rates.
pub async fn progress(ctx: &super::Ctx, engine: &Engine, secs: f64, label: &str) -> Vec<f64> {
    let s = &engine.stats;
    let t0 = Instant::now();
    let mut last = (Instant::now(), Stats::load(&s.acked), Stats::load(&s.delivered));
    let mut rates = Vec::new();
    while t0.elapsed().as_secs_f64() < secs {
        let left = secs - t0.elapsed().as_secs_f64();
        tokio::time::sleep(Duration::from_secs_f64(left.clamp(0.0, 1.0))).await;
        let now = (Instant::now(), Stats::load(&s.acked), Stats::load(&s.delivered));
        let dt = now.0.duration_since(last.0).as_secs_f64().max(1e-6);
        let (ar, dr) = ((now.1 - last.1) as f64 / dt, (now.2 - last.2) as f64 / dt);
        last = now;
        rates.push(ar);
        let (a50, a99) = take_tick(&s.ack);
        let (_, d99) = take_tick(&s.delivery);
        ctx.progress(&format!(
            "{label}[{:>5.1}s] acked {:>7.0}/s  delivered {:>7.0}/s  ack p50 {} p99 {} ms  delivery p99 {} ms  in flight {}  errors {}",
            t0.elapsed().as_secs_f64(),
            ar,
            dr,
            stats::ms(a50),
            stats::ms(a99),
            stats::ms(d99),
            engine.inflight(),
            s.error_total()
        ));
    }
    rates
}

/// p50 and p99 of the last tick, then starts a new tick.
fn take_tick(l: &Mutex<stats::Lat>) -> (u64, u64) {
    let mut l = l.lock();
    let r = if l.tick.is_empty() { (0, 0) } else { (l.tick.value_at_quantile(0.5), l.tick.value_at_quantile(0.99)) };
    l.tick.reset();
    r
}

/// Seconds the drain may take after the senders stop.
const DRAIN: Duration = Duration::from_secs(30);

/// The `chat` scenario.
pub async fn run(ctx: &super::Ctx) -> anyhow::Result<super::Outcome> {
    let a = &ctx.args;
    let users = a.users.unwrap_or(100);
    anyhow::ensure!(users >= 2, "--users must be at least 2");
    let users = users - users % 2;
    let rate = a.rate(10.0)?;
    let secs = a.duration.unwrap_or(10.0);
    let dialogs = ctx.dialogs()?;
    let mode = match rate {
        None => Mode::Closed { window: a.window.max(1) },
        Some(_) => Mode::Open,
    };
    let rate_desc = match rate {
        None => format!("closed loop, {} in flight per user", a.window.max(1)),
        Some(r) => format!("{r} msg/s per user ({} msg/s offered)", r * users as f64),
    };
    let wire = match a.chat_protocol() {
        Protocol::Native => format!("{:?} frames", ctx.enc),
        Protocol::Xmpp => "XMPP over WebSocket (XEP-0198 acks)".to_owned(),
    };
    ctx.progress(&format!(
        "chat: {users} users ({} pairs), {rate_desc}, {secs} s, {wire}, {} dialogs ({} turns) from {}",
        users / 2,
        dialogs.dialogs.len(),
        dialogs.turns,
        dialogs.path.display()
    ));
    let t_setup = Instant::now();
    let accounts = super::accounts::setup(&ctx.targets, super::accounts::names(&ctx.prefix, users), &ctx.password, a.setup_concurrency, a.quiet).await?;
    let setup_s = t_setup.elapsed().as_secs_f64();
    let cfg = ChatConfig {
        enc: ctx.enc,
        protocol: a.chat_protocol(),
        xmpp_domain: a.xmpp_domain.clone(),
        password: ctx.password.clone(),
        mode,
        rate_milli: Arc::new(AtomicU64::new(rate.map_or(0, |r| (r * 1000.0).round().max(1.0) as u64))),
        received_every: Duration::from_millis(a.received_ms.max(1)),
        max_inflight: 10_000,
        connect_concurrency: a.setup_concurrency,
    };
    let t_conn = Instant::now();
    let stats = Arc::new(Stats::new());
    let mut engine = Engine::start(&ctx.targets, &accounts, dialogs, cfg, stats.clone()).await?;
    let connect_s = t_conn.elapsed().as_secs_f64();
    ctx.progress(&format!("setup: {users} users registered and logged in in {setup_s:.1} s, connected and synced in {connect_s:.2} s"));
    let server_pid = super::procfs::listener_pid(ctx.target.addr.port());
    let cpu0 = super::procfs::CpuSample::now(server_pid);
    engine.go();
    let t_run = Instant::now();
    let rates = progress(ctx, &engine, secs, "").await;
    engine.stop_sending();
    let run_s = t_run.elapsed().as_secs_f64();
    let (cpu_line, cpu_json) = super::procfs::cpu_report(super::procfs::CpuSample::now(server_pid).since(&cpu0));
    let t_drain = Instant::now();
    let drained = engine.drain(DRAIN).await;
    let drain_s = t_drain.elapsed().as_secs_f64();
    let verdict = engine.finish().await;
    let (sent, acked, delivered) = (Stats::load(&stats.sent), Stats::load(&stats.acked), Stats::load(&stats.delivered));
    let ack = stats.ack.lock().total.clone();
    let dlv = stats.delivery.lock().total.clone();
    let rate_limited = stats.errors.lock().iter().filter(|(k, _)| *k == "rate_limited" || *k == "resource-constraint").map(|(_, v)| *v).sum::<u64>();
    let mut human = format!(
        "chat: {users} users, {wire}, {rate_desc}, {run_s:.1} s of sending (+{drain_s:.1} s drain{})\n\
         \x20 sent       {:>10}  ({:.0}/s)\n\
         \x20 acked      {:>10}  ({:.0}/s; per second: median {:.0}, min {:.0}, max {:.0})\n\
         \x20 delivered  {:>10}  ({:.0}/s)\n\
         \x20 ack latency       {}\n\
         \x20 delivery latency  {}\n\
         \x20 errors: {}   retries {}   skipped ticks {}\n\
         \x20 cpu while sending: {}\n\
         \x20 integrity: {}",
        if drained { "" } else { ", NOT drained" },
        stats::thousands(sent),
        sent as f64 / run_s,
        stats::thousands(acked),
        acked as f64 / run_s,
        median(&rates),
        rates.iter().cloned().fold(f64::INFINITY, f64::min),
        rates.iter().cloned().fold(0.0, f64::max),
        stats::thousands(delivered),
        delivered as f64 / run_s,
        stats::line(&ack),
        stats::line(&dlv),
        stats.errors_line(),
        Stats::load(&stats.retries),
        Stats::load(&stats.skipped),
        cpu_line,
        verdict.line()
    );
    if rate_limited > 0 {
        human.push_str(
            "\n  note: the server's per-user send limit answered rate_limited (those sends were retried); \
             raise PARLEY__LIMITS__SEND_RATE_PER_S and PARLEY__LIMITS__SEND_BURST to measure the server itself",
        );
    }
    let json = json!({
        "scenario": "chat",
        "protocol": match a.chat_protocol() { Protocol::Native => "native", Protocol::Xmpp => "xmpp" },
        "users": users,
        "mode": match rate { None => json!({"closed_loop": true, "window": a.window.max(1)}), Some(r) => json!({"rate_per_user": r}) },
        "encoding": format!("{:?}", ctx.enc).to_lowercase(),
        "duration_s": run_s,
        "drain_s": drain_s,
        "drained": drained,
        "setup_s": setup_s,
        "connect_s": connect_s,
        "sent": sent,
        "acked": acked,
        "delivered": delivered,
        "acked_per_s": acked as f64 / run_s,
        "delivered_per_s": delivered as f64 / run_s,
        "acked_per_s_each_second": rates,
        "ack_latency": stats::summary(&ack),
        "delivery_latency": stats::summary(&dlv),
        "errors": stats.errors_json(),
        "retries": Stats::load(&stats.retries),
        "skipped_ticks": Stats::load(&stats.skipped),
        "cpu": cpu_json,
        "integrity": verdict.json(),
    });
    Ok(super::Outcome { human, json, ok: verdict.ok() && drained })
}

/// The median of a list (0 when empty).
pub fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s[s.len() / 2]
}
