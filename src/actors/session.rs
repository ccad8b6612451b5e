//! The Session actor: one per WebSocket, the supervised process of one connected device.
//!
//! It owns the socket's read side (the [`InStream`](super::socket::InStream) of WebSocket messages
//! added to its `Context`) and the bounded outbound queue that the upgrade's response body drains
//! into the socket ([`super::socket`]: no writer task, no channel). It authenticates the
//! `hello`, syncs the backlog from storage, decodes and validates frames, hands commands to the
//! commit pipeline, answers `ack`s, and pushes live events in ev order.
//!
//! Delivery: `last_sent` is the highest ev written to the outbound queue. A [`Deliver`] for
//! `last_sent + 1` goes straight out when the session is live; anything else (a gap, or a backlog
//! not yet sent) raises `target` and the *pump* reads the missing events from storage, one page at
//! a time and only while the outbound queue has room. So a backlog never overflows the queue, and
//! a live event that finds the queue full means the reader is slow: close 4008; the device
//! resyncs from its durable cursor when it comes back.
//!
//! Order: frames are handled in arrival order. Writes (`send`, `received`, `read`, group changes)
//! are pipelined through the single commit thread, which keeps their order; a read (`history`,
//! `conversations`, `group_info`) waits until this socket's earlier writes are applied, so each
//! frame sees the effects of the frames before it.
//!
//! Supervision (Erlang/OTP): each frame is handled under `catch_unwind`. A panic restarts the
//! session's state from storage (its durable cursor) and resyncs the device on the same socket;
//! more than `restart_intensity` restarts within `restart_period_ms` closes with 1011.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_http::ws::{Item, Message as WsMessage, ProtocolError};
use bytes::{Bytes, BytesMut};


use super::messages::*;
use super::presence::now_ms;
use super::socket::{OutQueue, Outbound, PushError};
use crate::protocol::codec::{decode_request_json, decode_request_postcard, encode_server};
use crate::protocol::ids::{valid_client_id, valid_group_id, valid_user_id, Conv};
use crate::protocol::{
    close, ClientFrame, Encoded, Encoding, ErrorCode, EventPayload, Request, ServerFrame, TypingState,
    HISTORY_DEFAULT_LIMIT, HISTORY_MAX_LIMIT, MAX_GROUP_NAME_CHARS, MAX_WATCH_USERS,
};
use crate::limits::FrameLimit;
use crate::shared::Shared;
use crate::storage::records::Command;
use crate::storage::{Outcome, PipelineError, Refusal};

/// Most requests waiting behind this socket's in-flight writes.
const MAX_DEFERRED: usize = 1024;

/// A write waiting for its outcome.
struct PendingWrite {
    rid: Option<String>,
    id: Option<String>,
    /// Answer `result` on success (group requests).
    reply_done: bool,
    /// When the request was submitted (ack latency).
    t0: Instant,
}

/// A reply that is ready but may have to wait for earlier ones.
enum Ready {
    Outcome(Result<Outcome, PipelineError>, PendingWrite),
    Frame(ServerFrame),
}

/// The authenticated identity of a session.
#[derive(Clone)]
struct Authed {
    user: String,
    device: String,
}

/// One socket's session actor.
pub struct Session {
    /// Unique per socket on this node.
    id: u64,
    shared: Arc<Shared>,
    /// The outbound queue, drained by the connection's response body.
    out: OutQueue,
    /// The frame-size guard on this socket's incoming bytes (cap raised after `hello`).
    limit: Arc<FrameLimit>,
    /// Malformed frames in the current minute: (window start, count).
    bad_frames: (Instant, u32),
    /// Chosen by the first frame's kind.
    enc: Option<Encoding>,
    auth: Option<Authed>,
    /// Highest ev written to the outbound queue.
    last_sent: u64,
    /// Highest ev known to exist for this user.
    target: u64,
    /// The `head` of `welcome` until `synced` has been sent.
    sync_head: Option<u64>,
    /// A wait for room in the outbound queue is pending; the pump resumes when it ends.
    waiting_room: bool,
    /// Since when the queue has been full with no frame taken by the body (slow consumer
    /// detection), and the timer that checks it.
    stalled_since: Option<Instant>,
    stall_check: Option<SpawnHandle>,
    /// Replies and control frames waiting for room, in order (drained before stored events).
    overflow: VecDeque<Encoded>,
    overflow_bytes: usize,
    /// Highest `up_to` submitted by this device (skips redundant `received`).
    cursor_sent: u64,
    /// Writes submitted and not yet answered.
    inflight: usize,
    /// Replies are sent in request order (the commit thread answers in order, but actix polls
    /// spawned futures in no particular order): the next number to give a reply, the next one to
    /// send, and the replies that arrived early.
    next_write: u64,
    next_reply: u64,
    early: BTreeMap<u64, Ready>,
    /// Requests waiting for `inflight` to drop to 0 (reads) or for the requests before them.
    deferred: VecDeque<Request>,
    /// A fragmented message being reassembled: (is text, bytes so far).
    frag: Option<(bool, BytesMut)>,
    /// Times of recent handler restarts (supervision intensity).
    restarts: VecDeque<Instant>,
    /// Last time anything arrived from the peer (heartbeat).
    last_heard: Instant,
    /// conv → expiry timer of this device's `composing`.
    composing: HashMap<String, SpawnHandle>,
    /// Users this session watches.
    watching: Vec<String>,
    closing: bool,
    /// The actor stops once the body is done (`stop_after_writer` ran).
    stop_pending: bool,
}

impl Session {
    /// A session for a new socket; `out` is its outbound queue.
    pub fn new(id: u64, shared: Arc<Shared>, out: OutQueue, limit: Arc<FrameLimit>) -> Self {
        Session {
            id,
            shared,
            out,
            limit,
            bad_frames: (Instant::now(), 0),
            enc: None,
            auth: None,
            last_sent: 0,
            target: 0,
            sync_head: None,
            waiting_room: false,
            stalled_since: None,
            stall_check: None,
            overflow: VecDeque::new(),
            overflow_bytes: 0,
            cursor_sent: 0,
            inflight: 0,
            next_write: 0,
            next_reply: 0,
            early: BTreeMap::new(),
            deferred: VecDeque::new(),
            frag: None,
            restarts: VecDeque::new(),
            last_heard: Instant::now(),
            composing: HashMap::new(),
            watching: Vec::new(),
            closing: false,
            stop_pending: false,
        }
    }

    // ------------------------------------------------------------------ output

    fn encode(&self, f: &ServerFrame) -> Encoded {
        encode_server(f, self.enc.unwrap_or(Encoding::Json))
    }

    /// Queues a reply or control frame. When the queue has no room it waits, in order, in a small
    /// overflow that the pump drains first; a reader that lets the overflow grow past the queue's
    /// own caps is a slow consumer (4008).
    fn send(&mut self, f: &ServerFrame, ctx: &mut Context<Self>) -> bool {
        if self.closing {
            return false;
        }
        let e = self.encode(f);
        if self.overflow.is_empty() && self.has_room(e.len()) {
            return self.push(Outbound::Frame(e), ctx);
        }
        self.overflow_bytes += e.len();
        self.overflow.push_back(e);
        let cfg = &self.shared.cfg.session;
        if self.overflow.len() > cfg.outbound_queue_frames || self.overflow_bytes > cfg.outbound_queue_bytes {
            self.slow_consumer(ctx);
            return false;
        }
        self.wait_room(ctx);
        true
    }

    /// Puts a frame on the queue; the caller checked that there is room.
    fn push(&mut self, o: Outbound, ctx: &mut Context<Self>) -> bool {
        if self.closing {
            return false;
        }
        match self.out.push(o) {
            Ok(()) => true,
            // Only pings and pongs get here without a room check; dropping them is harmless.
            Err(PushError::Full) => false,
            Err(PushError::Closed) => {
                self.closing = true;
                ctx.stop();
                false
            }
        }
    }

    /// Closes with 4008: the reader did not keep up. Nothing is lost: the device resyncs from its
    /// durable cursor when it reconnects.
    fn slow_consumer(&mut self, ctx: &mut Context<Self>) {
        metrics::counter!("parley_slow_consumer_closes_total").increment(1);
        tracing::info!(session = self.id, "slow consumer: closing with 4008");
        self.close_now(close::SLOW_CONSUMER, "slow consumer", ctx);
    }

    fn error(&mut self, code: ErrorCode, msg: impl Into<String>, rid: Option<String>, id: Option<String>, ctx: &mut Context<Self>) {
        self.reply(ServerFrame::error(code, msg, rid, id), ctx);
    }

    /// Sends a reply after the replies to earlier requests of this socket.
    fn reply(&mut self, f: ServerFrame, ctx: &mut Context<Self>) {
        if self.inflight == 0 {
            self.send(&f, ctx);
        } else {
            let k = self.next_write;
            self.next_write += 1;
            self.inflight += 1;
            self.early.insert(k, Ready::Frame(f));
            self.flush_replies(ctx);
        }
    }

    /// Sends the replies whose turn has come, then runs deferred requests.
    fn flush_replies(&mut self, ctx: &mut Context<Self>) {
        while let Some(r) = self.early.remove(&self.next_reply) {
            self.next_reply += 1;
            self.inflight -= 1;
            match r {
                Ready::Frame(f) => {
                    self.send(&f, ctx);
                }
                Ready::Outcome(res, w) => self.finish_write(res, w, ctx),
            }
        }
        self.drain_deferred(ctx);
    }

    /// Whether a frame of `n` bytes fits in the outbound queue now (an empty queue takes a frame
    /// of any size, so one large reply never counts as a slow reader).
    fn has_room(&self, n: usize) -> bool {
        let queued = self.out.queued_bytes();
        self.out.free() > 0 && (queued == 0 || queued + n <= self.shared.cfg.session.outbound_queue_bytes)
    }

    /// Closes after what is queued.
    fn close(&mut self, code: u16, reason: &str, ctx: &mut Context<Self>) {
        if self.closing {
            return;
        }
        if self.out.push(Outbound::Close(code, reason.to_owned())).is_err() {
            return self.close_now(code, reason, ctx);
        }
        self.closing = true;
        self.stop_after_writer(ctx);
    }

    /// Stops the actor once the response body has handed its close frame to the connection (at
    /// most 2 s): stopping earlier drops the request payload, and the connection would go before
    /// the close frame is written.
    fn stop_after_writer(&mut self, ctx: &mut Context<Self>) {
        // A second close while the first waits stops at once, as before.
        if self.stop_pending {
            return ctx.stop();
        }
        self.stop_pending = true;
        let done = self.out.done();
        ctx.spawn(
            async move {
                let _ = tokio::time::timeout(Duration::from_secs(2), done).await;
            }
            .into_actor(self)
            .map(|_, _, ctx| ctx.stop()),
        );
    }

    /// Closes at once, dropping what is queued.
    fn close_now(&mut self, code: u16, reason: &str, ctx: &mut Context<Self>) {
        self.out.close_urgent(code, reason);
        self.closing = true;
        self.stop_after_writer(ctx);
    }

    // ------------------------------------------------------------------ input

    fn on_frame(&mut self, data: Bytes, text: bool, ctx: &mut Context<Self>) {
        let cap = if self.auth.is_some() {
            self.shared.cfg.session.max_frame_bytes
        } else {
            self.shared.cfg.session.unauth_max_frame_bytes
        };
        if data.len() > cap {
            return self.close_now(close::TOO_BIG, "frame too big", ctx);
        }
        let enc = if text { Encoding::Json } else { Encoding::Postcard };
        self.enc.get_or_insert(enc);
        let decoded = if text {
            match std::str::from_utf8(&data) {
                Ok(s) => decode_request_json(s),
                Err(_) => return self.close_now(close::INVALID_PAYLOAD, "invalid UTF-8", ctx),
            }
        } else {
            decode_request_postcard(&data)
        };
        metrics::counter!("parley_frames_received_total").increment(1);
        match decoded {
            Ok(req) => self.supervised(req, ctx),
            Err(e) if self.auth.is_none() => {
                // Say what was wrong with it (a hello without its token, a cursor that is not a
                // number...), then close as PROTOCOL.md 3.1 says, as for a cursor past the head.
                self.error(e.code, e.message, e.rid, e.id, ctx);
                self.close(close::VIOLATION, "the first frame must be a well-formed hello", ctx)
            }
            Err(e) => {
                metrics::counter!("parley_bad_frames_total").increment(1);
                let (since, n) = &mut self.bad_frames;
                if since.elapsed() >= Duration::from_secs(60) {
                    *since = Instant::now();
                    *n = 0;
                }
                *n += 1;
                if *n > self.shared.cfg.limits.bad_frames_per_min {
                    tracing::info!(session = self.id, "flood of bad frames: closing with 4003");
                    return self.close(close::VIOLATION, "too many malformed frames", ctx);
                }
                // After the replies to earlier requests, like any reply.
                self.reply(ServerFrame::error(e.code, e.message, e.rid, e.id), ctx);
            }
        }
    }

    /// Handles a request under `catch_unwind`; a panic restarts the session from storage.
    fn supervised(&mut self, req: Request, ctx: &mut Context<Self>) {
        let r = catch_unwind(AssertUnwindSafe(|| self.request(req, ctx)));
        if r.is_err() {
            self.restart(ctx);
        }
    }

    fn restart(&mut self, ctx: &mut Context<Self>) {
        metrics::counter!("parley_session_restarts_total").increment(1);
        let now = Instant::now();
        let period = Duration::from_millis(self.shared.cfg.session.restart_period_ms);
        self.restarts.push_back(now);
        while self.restarts.front().is_some_and(|t| now.duration_since(*t) > period) {
            self.restarts.pop_front();
        }
        if self.restarts.len() > self.shared.cfg.session.restart_intensity as usize {
            tracing::error!(session = self.id, "session handler keeps failing: closing with 1011");
            return self.close(close::INTERNAL, "internal error", ctx);
        }
        tracing::warn!(session = self.id, "session handler panicked: restarting from storage");
        self.deferred.clear();
        if let Some(a) = self.auth.clone() {
            match self.shared.state().cursor(&a.user, &a.device) {
                Ok(c) => {
                    self.cursor_sent = c;
                    self.begin_sync(c, ctx);
                }
                Err(_) => self.close(close::INTERNAL, "internal error", ctx),
            }
        }
    }

    fn request(&mut self, req: Request, ctx: &mut Context<Self>) {
        if self.auth.is_none() {
            return match req.frame {
                ClientFrame::Hello { token, cursor } => self.hello(token, cursor, ctx),
                _ => self.close(close::VIOLATION, "the first frame must be hello", ctx),
            };
        }
        let is_read = matches!(
            req.frame,
            ClientFrame::History { .. } | ClientFrame::Conversations | ClientFrame::GroupInfo { .. }
        );
        if !self.deferred.is_empty() || (is_read && self.inflight > 0) {
            if self.deferred.len() >= MAX_DEFERRED {
                return self.error(ErrorCode::Overloaded, "too many requests waiting", req.rid, None, ctx);
            }
            self.deferred.push_back(req);
            return;
        }
        self.dispatch(req, ctx);
    }

    /// Runs deferred requests whose turn has come.
    fn drain_deferred(&mut self, ctx: &mut Context<Self>) {
        while let Some(front) = self.deferred.front() {
            let is_read = matches!(
                front.frame,
                ClientFrame::History { .. } | ClientFrame::Conversations | ClientFrame::GroupInfo { .. }
            );
            if is_read && self.inflight > 0 {
                return;
            }
            let Some(req) = self.deferred.pop_front() else { return };
            let r = catch_unwind(AssertUnwindSafe(|| self.dispatch(req, ctx)));
            if r.is_err() {
                return self.restart(ctx);
            }
        }
    }

    fn dispatch(&mut self, req: Request, ctx: &mut Context<Self>) {
        let Some(me) = self.auth.clone() else { return };
        let rid = req.rid.filter(|r| valid_client_id(r));
        match req.frame {
            ClientFrame::Hello { .. } => self.error(ErrorCode::BadRequest, "already authenticated", rid, None, ctx),
            ClientFrame::Send { id, to, body } => self.send_message(&me, rid, id, to, body, ctx),
            ClientFrame::Received { up_to } => {
                if up_to > self.cursor_sent {
                    // Apply clamps to the head; remember no more than this socket has seen, so
                    // an over-eager `up_to` cannot hide later, real confirmations.
                    self.cursor_sent = up_to.min(self.last_sent.max(self.cursor_sent));
                    let cmd = Command::Received { user: me.user, device: me.device, up_to };
                    self.write(cmd, rid, None, ctx);
                }
            }
            ClientFrame::Read { conv, seq } => {
                if Conv::parse(&conv).is_none() {
                    return self.error(ErrorCode::BadRequest, "conv must be dm:<a>:<b> or g:<id>", rid, None, ctx);
                }
                self.write(Command::Read { user: me.user, conv, seq }, rid, None, ctx);
            }
            ClientFrame::Typing { conv, state } => self.typing(&me, conv, state, rid, ctx),
            ClientFrame::Watch { users } => {
                if users.len() > MAX_WATCH_USERS {
                    return self.error(ErrorCode::TooLarge, "watch at most 1000 users at once", rid, None, ctx);
                }
                // Each user once, in the order asked: one presence frame per user.
                let mut seen = std::collections::HashSet::new();
                let users: Vec<String> = users.into_iter().filter(|u| valid_user_id(u) && seen.insert(u.clone())).collect();
                let me_r = ctx.address().recipient::<Relay>();
                let frames = self.shared.presence.watch(self.id, &me_r, &users, &self.shared.online);
                for u in users {
                    if !self.watching.contains(&u) {
                        self.watching.push(u);
                    }
                }
                for f in frames {
                    self.send(&f, ctx);
                }
            }
            ClientFrame::Unwatch { users } => {
                self.shared.presence.unwatch(self.id, &users);
                self.watching.retain(|u| !users.contains(u));
            }
            ClientFrame::History { conv, before, limit } => {
                let limit = limit.unwrap_or(HISTORY_DEFAULT_LIMIT);
                if !(1..=HISTORY_MAX_LIMIT).contains(&limit) {
                    return self.error(ErrorCode::BadRequest, "limit must be 1-200", rid, None, ctx);
                }
                let Some(c) = Conv::parse(&conv) else {
                    return self.error(ErrorCode::BadRequest, "conv must be dm:<a>:<b> or g:<id>", rid, None, ctx);
                };
                match self.shared.state().history(&me.user, &c, before, limit) {
                    Ok(Ok(p)) => self.send(
                        &ServerFrame::History { rid, conv, messages: p.messages, more: p.more, deleted_upto: p.deleted_upto },
                        ctx,
                    ),
                    Ok(Err(r)) => return self.refused(r, rid, None, ctx),
                    Err(e) => return self.internal(e, rid, ctx),
                };
            }
            ClientFrame::Conversations => match self.shared.state().conversations(&me.user) {
                Ok(items) => {
                    self.send(&ServerFrame::Conversations { rid, items }, ctx);
                }
                Err(e) => self.internal(e, rid, ctx),
            },
            ClientFrame::GroupCreate { name, members } => {
                let n = name.chars().count();
                if n == 0 || n > MAX_GROUP_NAME_CHARS {
                    return self.error(ErrorCode::BadRequest, "name must be 1-100 chars", rid, None, ctx);
                }
                if let Some(bad) = members.iter().find(|u| !valid_user_id(u)) {
                    return self.error(ErrorCode::UnknownUser, format!("no user {bad}"), rid, None, ctx);
                }
                let group = new_group_id();
                let cap = self.shared.cfg.limits_group_members();
                self.write(Command::GroupCreate { group, by: me.user, name, members, cap }, rid, None, ctx);
            }
            ClientFrame::GroupAdd { group, users } => {
                let Some(g) = group_id(&group) else { return self.error(ErrorCode::BadRequest, "group must be g:<id>", rid, None, ctx) };
                let cap = self.shared.cfg.limits_group_members();
                self.write(Command::GroupAdd { group: g, by: me.user, users, cap }, rid, None, ctx);
            }
            ClientFrame::GroupRemove { group, users } => {
                let Some(g) = group_id(&group) else { return self.error(ErrorCode::BadRequest, "group must be g:<id>", rid, None, ctx) };
                self.write(Command::GroupRemove { group: g, by: me.user, users }, rid, None, ctx);
            }
            ClientFrame::GroupLeave { group } => {
                let Some(g) = group_id(&group) else { return self.error(ErrorCode::BadRequest, "group must be g:<id>", rid, None, ctx) };
                self.write(Command::GroupLeave { group: g, by: me.user }, rid, None, ctx);
            }
            ClientFrame::GroupInfo { group } => {
                let Some(g) = group_id(&group) else { return self.error(ErrorCode::BadRequest, "group must be g:<id>", rid, None, ctx) };
                match self.shared.state().group(&g) {
                    Ok(Some(rec)) if rec.members.iter().any(|m| m.user == me.user) => {
                        let members = rec.members.iter().map(|m| m.user.clone()).collect();
                        let admins = rec.members.iter().filter(|m| m.admin).map(|m| m.user.clone()).collect();
                        self.send(
                            &ServerFrame::Result { rid, group: Some(group), name: Some(rec.name), members: Some(members), admins: Some(admins) },
                            ctx,
                        );
                    }
                    Ok(_) => self.error(ErrorCode::NotMember, "not a member of this group", rid, None, ctx),
                    Err(e) => self.internal(e, rid, ctx),
                }
            }
            #[cfg(feature = "fault-injection")]
            ClientFrame::Fault { what, count } => match what.as_str() {
                "panic" => panic!("fault injected by a test"),
                "storage" => {
                    crate::storage::pipeline::fault::fail_next_commits(count);
                    self.send(&ServerFrame::Result { rid, group: None, name: None, members: None, admins: None }, ctx);
                }
                _ => self.error(ErrorCode::BadRequest, "unknown fault", rid, None, ctx),
            },
        }
    }

    fn send_message(&mut self, me: &Authed, rid: Option<String>, id: String, to: String, body: String, ctx: &mut Context<Self>) {
        let conv = match super::ops::check_send(&self.shared, &me.user, &id, &to, &body) {
            Ok(super::ops::SendCheck::Duplicate(a)) => {
                self.reply(ServerFrame::Ack { rid, id, conv: a.conv, seq: a.seq, ts: a.ts }, ctx);
                return;
            }
            Ok(super::ops::SendCheck::New(conv)) => conv,
            Err(e) => {
                return self.error(e.code, e.message, rid, Some(id), ctx);
            }
        };
        // Sending ends this device's typing there (PROTOCOL.md §4.6). Done here, in frame order,
        // so a `composing` sent after this message is not cancelled by it.
        if let Some(h) = self.composing.remove(&conv) {
            ctx.cancel_future(h);
            self.relay_typing(&conv, TypingState::Paused);
        }
        super::ops::stop_typing_elsewhere(&self.shared, &me.user, self.id, &conv);
        let cmd = Command::Send { from: me.user.clone(), device: me.device.clone(), id: id.clone(), conv, body };
        self.write(cmd, rid, Some(id), ctx);
    }

    /// Submits a write; answers (in request order) when it is durable and applied.
    fn write(&mut self, cmd: Command, rid: Option<String>, id: Option<String>, ctx: &mut Context<Self>) {
        // Group requests answer `result` on success; `received` and `read` stay silent.
        let reply_done = matches!(cmd, Command::GroupAdd { .. } | Command::GroupRemove { .. } | Command::GroupLeave { .. });
        let w = PendingWrite { rid, id, reply_done, t0: Instant::now() };
        let rx = match self.shared.pipeline.submit(cmd) {
            Ok(rx) => rx,
            Err(e) => return self.pipeline_error(e, w.rid, w.id, ctx),
        };
        let k = self.next_write;
        self.next_write += 1;
        self.inflight += 1;
        ctx.spawn(rx.into_actor(self).map(move |res, act, ctx| {
            act.early.insert(k, Ready::Outcome(res.unwrap_or(Err(PipelineError::Unavailable)), w));
            act.flush_replies(ctx);
        }));
    }

    fn finish_write(&mut self, res: Result<Outcome, PipelineError>, w: PendingWrite, ctx: &mut Context<Self>) {
        let PendingWrite { rid, id, reply_done, t0 } = w;
        match res {
            Ok(Outcome::Sent { conv, seq, ts, duplicate }) => {
                if duplicate {
                    metrics::counter!("parley_duplicate_sends_total").increment(1);
                } else {
                    metrics::counter!("parley_messages_acked_total").increment(1);
                    metrics::histogram!("parley_ack_latency_seconds").record(t0.elapsed().as_secs_f64());
                }
                let id = id.unwrap_or_default();
                self.send(&ServerFrame::Ack { rid, id, conv, seq, ts }, ctx);
            }
            Ok(Outcome::GroupCreated { group }) => {
                self.send(&ServerFrame::Result { rid, group: Some(group), name: None, members: None, admins: None }, ctx);
            }
            Ok(Outcome::Done) => {
                if reply_done {
                    self.send(&ServerFrame::Result { rid, group: None, name: None, members: None, admins: None }, ctx);
                }
            }
            // Sent at once, not through `reply`: this is the reply's turn (`flush_replies`), and
            // `reply` would queue it behind the replies of later requests still waiting.
            Ok(Outcome::Refused(r)) => {
                self.send(&refusal(r, rid, id), ctx);
            }
            // Sessions never submit purges.
            Ok(Outcome::Purged { .. }) => {}
            Err(e) => {
                self.send(&pipeline_error_frame(e, rid, id), ctx);
            }
        }
    }

    fn refused(&mut self, r: Refusal, rid: Option<String>, id: Option<String>, ctx: &mut Context<Self>) {
        self.reply(refusal(r, rid, id), ctx);
    }

    fn pipeline_error(&mut self, e: PipelineError, rid: Option<String>, id: Option<String>, ctx: &mut Context<Self>) {
        self.reply(pipeline_error_frame(e, rid, id), ctx);
    }
}

/// The `error` frame of a command that apply refused.
fn refusal(r: Refusal, rid: Option<String>, id: Option<String>) -> ServerFrame {
    let (code, msg) = match r {
        Refusal::UserExists => (ErrorCode::UserExists, "user exists".to_owned()),
        Refusal::UnknownUser(u) => (ErrorCode::UnknownUser, format!("no user {u}")),
        Refusal::NotMember => (ErrorCode::NotMember, "not a member of this conversation".to_owned()),
        Refusal::NotAdmin => (ErrorCode::NotAdmin, "only group admins may do this".to_owned()),
        Refusal::TooLarge(m) => (ErrorCode::TooLarge, m),
        Refusal::BadRequest(m) => (ErrorCode::BadRequest, m),
        Refusal::Unauthorized => (ErrorCode::Unauthorized, "unauthorized".to_owned()),
    };
    ServerFrame::error(code, msg, rid, id)
}

/// The `error` frame of a command the commit pipeline did not take or did not answer.
fn pipeline_error_frame(e: PipelineError, rid: Option<String>, id: Option<String>) -> ServerFrame {
    let code = match e {
        PipelineError::Overloaded => ErrorCode::Overloaded,
        PipelineError::Unavailable => ErrorCode::Unavailable,
    };
    ServerFrame::error(code, e.to_string(), rid, id)
}

impl Session {
    fn internal(&mut self, e: crate::storage::StorageError, rid: Option<String>, ctx: &mut Context<Self>) {
        tracing::error!(session = self.id, error = %e, "storage read failed");
        self.error(ErrorCode::Internal, "internal error", rid, None, ctx);
    }

    // ------------------------------------------------------------------ typing

    fn typing(&mut self, me: &Authed, conv: String, state: TypingState, rid: Option<String>, ctx: &mut Context<Self>) {
        let others = match super::ops::typing_audience(&self.shared, &me.user, &conv) {
            Ok(o) => o,
            Err(ErrorCode::BadRequest) => {
                return self.error(ErrorCode::BadRequest, "conv must be dm:<a>:<b> or g:<id>", rid, None, ctx)
            }
            Err(ErrorCode::NotMember) => {
                return self.error(ErrorCode::NotMember, "not a member of this conversation", rid, None, ctx)
            }
            Err(code) => return self.error(code, "internal error", rid, None, ctx),
        };
        let timeout = Duration::from_millis(self.shared.cfg.session.typing_timeout_ms);
        super::ops::arm_typing(self, ctx, &conv, state, timeout);
        self.relay_to(&others, &me.user, &conv, state);
    }

    fn relay_to(&self, users: &[String], from: &str, conv: &str, state: TypingState) {
        super::ops::relay_typing(&self.shared, users, from, conv, state);
    }

    /// Relays `state` for `conv` to its other members (looked up again: membership may change).
    fn relay_typing(&self, conv: &str, state: TypingState) {
        let Some(me) = &self.auth else { return };
        let others = super::ops::others_in(&self.shared, &me.user, conv);
        self.relay_to(&others, &me.user, conv, state);
    }

    // ------------------------------------------------------------------ hello and sync

    fn hello(&mut self, token: String, cursor: Option<u64>, ctx: &mut Context<Self>) {
        if self.shared.cluster.is_none() {
            return self.hello_now(token, cursor, ctx);
        }
        // A cluster node first applies everything the leader had committed (its read index), so
        // a token issued, or events seen, through another node are here too: a client that
        // moves between nodes never reads backwards. No leader in time: goaway, retry later.
        let shared = self.shared.clone();
        let barrier = async move { shared.read_barrier().await };
        ctx.wait(barrier.into_actor(self).map(move |r, act, ctx| match r {
            Ok(()) => act.hello_now(token, cursor, ctx),
            Err(why) => {
                tracing::info!(session = act.id, %why, "hello on a node without a leader: goaway");
                let retry_after_ms = act.shared.cfg.cluster.election_timeout_ms * 2;
                act.send(&ServerFrame::Goaway { reason: format!("this node cannot reach a quorum ({why}); reconnect, here or to another node"), retry_after_ms }, ctx);
                act.close(close::GOING_AWAY, "no quorum", ctx);
            }
        }));
    }

    fn hello_now(&mut self, token: String, cursor: Option<u64>, ctx: &mut Context<Self>) {
        let hash = crate::tokens::token_hash(&token);
        let rec = match self.shared.state().token(&hash) {
            Ok(Some(r)) => r,
            Ok(None) => return self.close(close::UNAUTHORIZED, "unauthorized", ctx),
            Err(_) => return self.close(close::INTERNAL, "internal error", ctx),
        };
        let me = Authed { user: rec.user, device: rec.device };
        self.auth = Some(me.clone());
        self.limit.cap.store(self.shared.cfg.session.max_frame_bytes, std::sync::atomic::Ordering::Relaxed);
        let conn = DeviceConn {
            session: self.id,
            device: me.device.clone(),
            token_hash: hash,
            deliver: ctx.address().recipient(),
            relay: ctx.address().recipient(),
            kick: ctx.address().recipient(),
            stop_typing: ctx.address().recipient(),
        };
        // Register first, then read the head: every event applied after the read is pushed to us,
        // every event before it is in storage. Nothing else runs on this actor meanwhile.
        let fut = self.shared.registry.send(Connect { user: me.user.clone(), conn });
        ctx.wait(fut.into_actor(self).map(move |r, act, ctx| {
            if r.is_err() {
                return act.close(close::INTERNAL, "registry unavailable", ctx);
            }
            let stored = match act.shared.state().cursor(&me.user, &me.device) {
                Ok(c) => c,
                Err(_) => return act.close(close::INTERNAL, "internal error", ctx),
            };
            let head = act.shared.state().head(&me.user).unwrap_or(0);
            let cursor = cursor.unwrap_or(stored);
            if cursor > head {
                act.error(ErrorCode::BadRequest, format!("cursor {cursor} is past the head {head}"), None, None, ctx);
                return act.close(close::VIOLATION, "cursor past head", ctx);
            }
            act.cursor_sent = stored;
            act.begin_sync(cursor, ctx);
        }));
    }

    /// Sends `welcome`, then (through the pump) every event after `cursor` up to the head, then
    /// `synced`. Also the restart path of supervision.
    fn begin_sync(&mut self, cursor: u64, ctx: &mut Context<Self>) {
        let Some(me) = self.auth.clone() else { return };
        let head = match self.shared.state().head(&me.user) {
            Ok(h) => h,
            Err(_) => return self.close(close::INTERNAL, "internal error", ctx),
        };
        let welcome = ServerFrame::Welcome { user: me.user, device: me.device, head, server_time: now_ms() };
        if !self.send(&welcome, ctx) {
            return;
        }
        self.last_sent = cursor.min(head);
        self.target = self.target.max(head);
        self.sync_head = Some(head);
        self.pump(ctx);
    }

    /// Sends stored events from `last_sent + 1` up to `target` while the queue has room, then
    /// `synced` once the welcome head is reached. Never overflows the queue: when it is full, it
    /// waits for the body to make room.
    fn pump(&mut self, ctx: &mut Context<Self>) {
        if self.waiting_room || self.closing {
            return;
        }
        while let Some(e) = self.overflow.front() {
            if !self.has_room(e.len()) {
                return self.wait_room(ctx);
            }
            let Some(e) = self.overflow.pop_front() else { break };
            self.overflow_bytes -= e.len();
            if !self.push(Outbound::Frame(e), ctx) {
                return;
            }
        }
        let Some(me) = self.auth.clone() else { return };
        let page = self.shared.cfg.session.sync_page_events;
        loop {
            if let Some(h) = self.sync_head {
                if self.last_sent >= h {
                    let f = self.encode(&ServerFrame::Synced { head: h });
                    if !self.has_room(f.len()) {
                        return self.wait_room(ctx);
                    }
                    self.sync_head = None;
                    self.push(Outbound::Frame(f), ctx);
                }
            }
            if self.last_sent >= self.target {
                return;
            }
            let room = self.out.free();
            if room == 0 {
                return self.wait_room(ctx);
            }
            let page = match self.shared.state().events_page(&me.user, self.last_sent, self.target, page.min(room)) {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(session = self.id, error = %e, "cannot read events");
                    return self.close(close::INTERNAL, "internal error", ctx);
                }
            };
            if page.scanned_to <= self.last_sent {
                // Cannot happen: events are pushed only after they are applied.
                return;
            }
            let scanned_to = page.scanned_to;
            for (ev, payload) in page.events {
                let f = self.encode(&ServerFrame::Event { ev, payload });
                if !self.has_room(f.len()) {
                    // The rest of the page is read again once there is room.
                    return self.wait_room(ctx);
                }
                if !self.push(Outbound::Frame(f), ctx) {
                    return;
                }
                self.last_sent = ev;
            }
            // Events of messages deleted by retention were skipped: move past them too.
            self.last_sent = self.last_sent.max(scanned_to);
        }
    }

    /// Resumes the pump once the body has taken a frame off the queue. If the body takes
    /// nothing for `slow_consumer_timeout_ms`, the reader is a slow consumer: close 4008.
    fn wait_room(&mut self, ctx: &mut Context<Self>) {
        if self.waiting_room || self.closing {
            return;
        }
        self.waiting_room = true;
        self.stalled_since.get_or_insert_with(Instant::now);
        if self.stall_check.is_none() {
            self.schedule_stall_check(Duration::from_millis(self.shared.cfg.session.slow_consumer_timeout_ms), ctx);
        }
        ctx.spawn(self.out.room().into_actor(self).map(|_, act, ctx| {
            act.waiting_room = false;
            act.stalled_since = None;
            act.pump(ctx);
        }));
    }

    fn schedule_stall_check(&mut self, after: Duration, ctx: &mut Context<Self>) {
        self.stall_check = Some(ctx.run_later(after, |act, ctx| {
            act.stall_check = None;
            let timeout = Duration::from_millis(act.shared.cfg.session.slow_consumer_timeout_ms);
            match act.stalled_since {
                Some(t) if act.waiting_room && t.elapsed() >= timeout => act.slow_consumer(ctx),
                Some(t) if act.waiting_room => act.schedule_stall_check(timeout - t.elapsed(), ctx),
                _ => {}
            }
        }));
    }

    fn live(&self) -> bool {
        self.sync_head.is_none() && !self.waiting_room && self.overflow.is_empty() && self.last_sent >= self.target
    }
}

/// Parses `g:<id>` into the id.
fn group_id(s: &str) -> Option<String> {
    s.strip_prefix("g:").filter(|g| valid_group_id(g)).map(str::to_owned)
}

/// A fresh group id: 16 random lowercase hex chars, chosen before the command enters the log.
fn new_group_id() -> String {
    use rand::Rng;
    format!("{:016x}", rand::thread_rng().gen::<u64>())
}

impl super::ops::TypingTimers for Session {
    fn composing(&mut self) -> &mut HashMap<String, SpawnHandle> {
        &mut self.composing
    }
    fn typing_expired(&mut self, conv: &str) {
        self.relay_typing(conv, TypingState::Paused);
    }
}

impl Actor for Session {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        metrics::gauge!("parley_sockets_open").increment(1.0);

        let hello = self.shared.cfg.hello_timeout();
        ctx.run_later(hello, |act, ctx| {
            if act.auth.is_none() {
                act.close(close::HELLO_TIMEOUT, "hello timeout", ctx);
            }
        });
        let every = Duration::from_millis(self.shared.cfg.session.ping_interval_ms);
        let timeout = Duration::from_millis(self.shared.cfg.session.ping_timeout_ms);
        ctx.run_interval(every, move |act, ctx| {
            if act.last_heard.elapsed() > timeout {
                tracing::info!(session = act.id, "no pong: closing");
                act.close_now(close::GOING_AWAY, "ping timeout", ctx);
            } else {
                act.push(Outbound::Ping, ctx);
            }
        });
    }

    fn stopping(&mut self, _ctx: &mut Self::Context) -> Running {
        self.closing = true;
        Running::Stop
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        metrics::gauge!("parley_sockets_open").decrement(1.0);
        self.shared.sockets.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        self.shared.sessions.remove(&self.id);
        if !self.watching.is_empty() {
            self.shared.presence.unwatch(self.id, &self.watching);
        }
        if let Some(me) = self.auth.clone() {
            // The composing device is gone, so its typing ends now (its expiry timers die with
            // the actor). With one device this is PROTOCOL.md's "last device disconnects".
            let convs: Vec<String> = self.composing.drain().map(|(c, _)| c).collect();
            for c in convs {
                self.relay_typing(&c, TypingState::Paused);
            }
            self.auth = None;
            self.shared.registry.do_send(Disconnect { user: me.user, session: self.id });
        }
    }
}

impl StreamHandler<Result<WsMessage, ProtocolError>> for Session {
    fn handle(&mut self, msg: Result<WsMessage, ProtocolError>, ctx: &mut Self::Context) {
        if self.closing {
            return;
        }
        self.last_heard = Instant::now();
        let msg = match msg {
            Ok(_) | Err(_) if self.limit.tripped.load(std::sync::atomic::Ordering::Relaxed) => {
                return self.close_now(close::TOO_BIG, "frame too big", ctx);
            }
            Ok(m) => m,
            Err(e) => {
                let (code, why) = match &e {
                    ProtocolError::Overflow => (close::TOO_BIG, "frame too big"),
                    // actix-ws reports a text frame that is not UTF-8 as InvalidData wrapping
                    // the Utf8Error (RFC 6455 §8.1: 1007); actix-http reports non-zero RSV
                    // bits with no extension negotiated as InvalidData too (§5.2: fail, 1002).
                    ProtocolError::Io(io) if io.get_ref().is_some_and(|e| e.is::<std::str::Utf8Error>()) => (close::INVALID_PAYLOAD, "invalid UTF-8"),
                    ProtocolError::Io(io) if io.kind() == std::io::ErrorKind::InvalidData => (close::PROTOCOL_ERROR, "WebSocket protocol error"),
                    ProtocolError::Io(_) => {
                        self.closing = true;
                        ctx.stop();
                        return;
                    }
                    _ => (close::PROTOCOL_ERROR, "WebSocket protocol error"),
                };
                tracing::debug!(session = self.id, error = %e, "WebSocket protocol error");
                return self.close_now(code, why, ctx);
            }
        };
        match msg {
            WsMessage::Text(s) => {
                if self.frag.is_some() {
                    return self.close_now(close::PROTOCOL_ERROR, "new message inside a fragmented one", ctx);
                }
                self.on_frame(s.into_bytes(), true, ctx)
            }
            WsMessage::Binary(b) => {
                if self.frag.is_some() {
                    return self.close_now(close::PROTOCOL_ERROR, "new message inside a fragmented one", ctx);
                }
                self.on_frame(b, false, ctx)
            }
            WsMessage::Continuation(item) => self.continuation(item, ctx),
            WsMessage::Ping(b) => {
                self.push(Outbound::Pong(b), ctx);
            }
            WsMessage::Pong(_) | WsMessage::Nop => {}
            WsMessage::Close(_) => {
                let _ = self.out.push(Outbound::Close(close::NORMAL, String::new()));
                self.closing = true;
                self.stop_after_writer(ctx);
            }
        }
    }

    fn finished(&mut self, ctx: &mut Self::Context) {
        self.closing = true;
        ctx.stop();
    }
}

impl Session {
    /// Reassembles fragmented messages, capped at the frame limit; UTF-8 is checked on the whole.
    fn continuation(&mut self, item: Item, ctx: &mut Context<Self>) {
        let cap = if self.auth.is_some() {
            self.shared.cfg.session.max_frame_bytes
        } else {
            self.shared.cfg.session.unauth_max_frame_bytes
        };
        let (first, text, data, last) = match item {
            Item::FirstText(b) => (true, true, b, false),
            Item::FirstBinary(b) => (true, false, b, false),
            Item::Continue(b) => (false, false, b, false),
            Item::Last(b) => (false, false, b, true),
        };
        if first {
            if self.frag.is_some() {
                return self.close_now(close::PROTOCOL_ERROR, "fragment started twice", ctx);
            }
            self.frag = Some((text, BytesMut::new()));
        }
        let Some((is_text, buf)) = self.frag.as_mut() else {
            return self.close_now(close::PROTOCOL_ERROR, "continuation with nothing to continue", ctx);
        };
        if buf.len() + data.len() > cap {
            return self.close_now(close::TOO_BIG, "frame too big", ctx);
        }
        buf.extend_from_slice(&data);
        let is_text = *is_text;
        if last {
            if let Some((_, buf)) = self.frag.take() {
                self.on_frame(buf.freeze(), is_text, ctx);
            }
        }
    }
}

impl Handler<Deliver> for Session {
    type Result = ();
    fn handle(&mut self, m: Deliver, ctx: &mut Self::Context) {
        if self.closing || m.ev <= self.last_sent {
            return;
        }
        if self.live() && m.ev == self.last_sent + 1 {
            let f = self.encode(&ServerFrame::Event { ev: m.ev, payload: EventPayload::clone(&m.payload) });
            if self.has_room(f.len()) {
                if self.push(Outbound::Frame(f), ctx) {
                    self.last_sent = m.ev;
                    self.target = self.target.max(m.ev);
                }
                return;
            }
            // No room: the event is in storage; the pump sends it once the body catches up.
        }
        self.target = self.target.max(m.ev);
        self.pump(ctx);
    }
}

impl Handler<Relay> for Session {
    type Result = ();
    fn handle(&mut self, m: Relay, ctx: &mut Self::Context) {
        if self.auth.is_none() || self.closing {
            return;
        }
        // Ephemeral frames are dropped, not queued, when the socket is backed up.
        let e = self.encode(&m.0);
        if self.has_room(e.len()) {
            self.push(Outbound::Frame(e), ctx);
        }
    }
}

impl Handler<Kick> for Session {
    type Result = ();
    fn handle(&mut self, m: Kick, ctx: &mut Self::Context) {
        match m.goaway_ms {
            Some(ms) => {
                self.send(&ServerFrame::Goaway { reason: m.reason.to_owned(), retry_after_ms: ms }, ctx);
                self.close(m.code, m.reason, ctx);
            }
            None => self.close(m.code, m.reason, ctx),
        }
    }
}

impl Handler<StopTyping> for Session {
    type Result = ();
    fn handle(&mut self, m: StopTyping, ctx: &mut Self::Context) {
        if let Some(h) = self.composing.remove(&m.conv) {
            ctx.cancel_future(h);
            self.relay_typing(&m.conv, TypingState::Paused);
        }
    }
}
