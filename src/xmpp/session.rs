//! The XMPP session actor: one per XMPP stream (TCP or WebSocket), the gateway's counterpart of
//! the native [`Session`](crate::actors::session::Session).
//!
//! It speaks XMPP on one side and parley on the other: stanzas become the same `Command`s a
//! native session submits (through [`crate::actors::ops`], shared with it), and the events the
//! registry delivers become stanzas. It keeps no messages of its own: what it sends comes from
//! the log (the user's event stream from the device cursor, `history` for MAM), and the device
//! cursor moves only through `Command::Received`, after the stanzas of those events were written
//! to the socket.
//!
//! Phases (RFC 6120 §4.3): stream header → SASL (§6) → stream restart → resource binding (§7;
//! the resource is the parley device) → ready. Initial presence (RFC 6121 §4.2) makes the
//! resource *available*: only then are the backlog and live events sent (RFC 6121 §8.5.2).

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use base64::Engine;
use minidom::Element;
use tokio::sync::mpsc;

use super::parser::StreamError;
use super::stanza::{archive_id, attr, build, delay, empty, error_reply, ns, parse_archive_id, stamp, text_el, to_string};
use crate::actors::messages::*;
use crate::actors::ops::{self, SendCheck};
use crate::limits::FrameLimit;
use crate::protocol::ids::{valid_device_id, valid_user_id, Conv};
use crate::protocol::{ErrorCode, EventPayload, MessageView, ReceiptStatus, ServerFrame, TypingState};
use crate::shared::Shared;
use crate::storage::records::{Command, TokenHash};
use crate::storage::{Outcome, PipelineError, Refusal};

/// What the transport's writer task sends.
pub enum Out {
    /// Serialized XML; `ev` (0: none) is the highest event it completes, recorded once written.
    /// An empty string only records `ev` (an event that maps to no stanza).
    Data(String, u64),
    /// Close the connection after what is queued; the stream error condition that ended the
    /// stream, `None` for an orderly end (WebSocket: it picks the close code, [`super::ws::close_code`]).
    Close(Option<&'static str>),
    /// TCP: after what is queued (`<proceed/>`), the TLS handshake (RFC 6120 §5.4.3.3).
    StartTls,
}

/// What a transport hands the session.
#[derive(Message)]
#[rtype(result = "()")]
pub enum In {
    /// A stream header (TCP `<stream:stream>`, RFC 6120 §4.7) or RFC 7395 `<open/>`.
    Open(Element),
    /// A top-level element.
    Stanza(Element),
    /// The peer closed the stream (`</stream:stream>` or `<close/>`).
    Close,
    /// The input was refused; send this stream error and close.
    Error(StreamError),
    /// The connection is gone.
    Gone,
    /// TCP: the TLS handshake after STARTTLS succeeded; a new stream follows.
    Secured,
}

/// The transport side of a session.
pub struct Link {
    /// To the writer task (bounded: `session.outbound_queue_frames`).
    pub tx: mpsc::Sender<Out>,
    /// RFC 7395 framing (WebSocket) rather than an RFC 6120 TCP stream.
    pub ws: bool,
    /// TCP: set before `<success/>`; the reader starts a new parser before its next read (the
    /// stream restart of RFC 6120 §6.4.6).
    pub restart: Arc<AtomicBool>,
    /// The largest stanza accepted now, in bytes (raised after authentication).
    pub limit: Arc<FrameLimit>,
    /// Highest event whose stanzas the writer wrote to the socket.
    pub written: Arc<AtomicU64>,
    /// The peer's address (failed-login rate limit).
    pub peer: IpAddr,
    /// Whether SASL is offered on this stream while unencrypted: `xmpp.allow_plaintext`.
    pub plaintext_ok: bool,
    /// Whether STARTTLS is offered (TCP with `xmpp.tls_cert` and `xmpp.tls_key`).
    pub tls: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for the stream header.
    Start,
    /// Header answered; SASL negotiation.
    Sasl,
    /// SASL succeeded; waiting for the restarted stream's header.
    Restart,
    /// Restarted; waiting for resource binding.
    Bind,
    /// Bound.
    Ready,
}

/// Most own message ids remembered to recognise the echo of this resource's own messages.
const OWN_IDS: usize = 4096;

/// One XMPP stream's session actor.
pub struct XmppSession {
    id: u64,
    shared: Arc<Shared>,
    link: Link,
    phase: Phase,
    /// Whether the TCP stream header has been written (an error before it writes one first).
    header_sent: bool,
    user: Option<String>,
    device: Option<String>,
    /// The token this stream logged its device in with (revoked when the stream ends).
    token: Option<TokenHash>,
    mech: Option<Box<dyn sasl::server::Mechanism + Send>>,
    mech_name: String,
    /// A SASL step is running on the blocking pool.
    sasl_busy: bool,
    /// Initial presence was sent (RFC 6121 §4.2): events flow.
    available: bool,
    /// Highest ev queued to the writer, and the highest known to exist.
    last_sent: u64,
    target: u64,
    /// Highest cursor submitted.
    cursor_sent: u64,
    /// The user's head when this resource bound: events up to it are backlog, stored before
    /// the resource existed. Their group events are history, not news: a new resource gets no
    /// occupant presences of rooms it never joined, only the invitations to rooms it is still
    /// in ([`super::muc::backlog_group_event`]). 0 after a `<resume/>`: that stream was live.
    backlog_head: u64,
    pump_later: bool,
    /// XEP-0280 enabled.
    carbons: bool,
    /// Client ids of messages this resource sent (their events are not echoed back to it).
    own_ids: HashSet<String>,
    own_order: VecDeque<String>,
    /// conv → expiry timer of this resource's `composing` (XEP-0085).
    composing: HashMap<String, SpawnHandle>,
    watching: Vec<String>,
    /// (conv, status) → highest own seq already reported by a receipt or marker.
    reported: HashMap<(String, u8), u64>,
    closing: bool,
    /// The stream runs over TLS (after STARTTLS).
    secure: bool,
    /// XEP-0198: the messages in the commit pipeline and the `<r/>`s waiting for them.
    acks: super::sm::AckGate,
    /// XEP-0198 stream management, once enabled.
    sm: Option<super::sm::Counters>,
    /// The client ended the stream itself (`</stream>`, `<close/>`): nothing to park.
    clean_end: bool,
    /// The stream error condition this stream ended with, if it did.
    ended_by: Option<&'static str>,
}

fn b64(data: &[u8]) -> String {
    if data.is_empty() {
        "=".to_owned()
    } else {
        base64::engine::general_purpose::STANDARD.encode(data)
    }
}

/// A resource as a parley device id: lowercase, `[a-z0-9_.-]`, 1-32 chars (others become `-`);
/// an empty one gets a random id (RFC 6120 §7.6: the server may generate the resource).
pub fn device_of(resource: Option<&str>) -> String {
    let mut d: String = resource
        .unwrap_or("")
        .chars()
        .flat_map(char::to_lowercase)
        .map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-' { c } else { '-' })
        .take(32)
        .collect();
    if d.starts_with(['-', '_', '.']) {
        d.replace_range(0..1, "x");
    }
    if d.is_empty() || !valid_device_id(&d) {
        use rand::Rng;
        d = format!("xmpp-{:08x}", rand::thread_rng().gen::<u32>());
    }
    d
}

/// The parley client message id of a stanza id: itself when it fits (1-64 chars); a longer one
/// becomes `x-` + 40 hex chars of its SHA-256 (stable, so a resend stays idempotent); none gets a
/// random id (no idempotency without an id).
pub fn client_id(stanza_id: Option<&str>) -> String {
    use sha2::Digest;
    match stanza_id {
        Some(i) if crate::protocol::ids::valid_client_id(i) => i.to_owned(),
        Some(i) => format!("x-{}", &hex::encode(sha2::Sha256::digest(i.as_bytes()))[..40]),
        None => format!("xmpp-{}", crate::http::auth::new_token().get(..24).unwrap_or_default()),
    }
}

impl XmppSession {
    /// A session for a new stream on `link`.
    pub fn new(id: u64, shared: Arc<Shared>, link: Link) -> Self {
        XmppSession {
            id,
            shared,
            link,
            phase: Phase::Start,
            header_sent: false,
            user: None,
            device: None,
            token: None,
            mech: None,
            mech_name: String::new(),
            sasl_busy: false,
            available: false,
            last_sent: 0,
            target: 0,
            cursor_sent: 0,
            backlog_head: 0,
            pump_later: false,
            carbons: false,
            own_ids: HashSet::new(),
            own_order: VecDeque::new(),
            composing: HashMap::new(),
            watching: Vec::new(),
            reported: HashMap::new(),
            closing: false,
            secure: false,
            acks: super::sm::AckGate::default(),
            sm: None,
            clean_end: false,
            ended_by: None,
        }
    }

    fn domain(&self) -> &str {
        &self.shared.cfg.xmpp.domain
    }

    /// The MUC service's domain (XEP-0045): `conference.` + the domain.
    fn muc_domain(&self) -> String {
        format!("conference.{}", self.domain())
    }

    fn bare(&self, user: &str) -> String {
        format!("{user}@{}", self.domain())
    }

    fn me(&self) -> &str {
        self.user.as_deref().unwrap_or("")
    }

    fn full_jid(&self) -> String {
        format!("{}@{}/{}", self.me(), self.domain(), self.device.as_deref().unwrap_or(""))
    }

    /// The JID a conversation's messages come from, as seen by `me`: the peer's bare JID for a
    /// dm, the room for a group.
    fn conv_jid(&self, conv: &str) -> String {
        match Conv::parse(conv) {
            Some(Conv::Dm { a, b }) => self.bare(if a == self.me() { &b } else { &a }),
            Some(Conv::Group(g)) => format!("{g}@{}", self.muc_domain()),
            None => self.domain().to_owned(),
        }
    }

    // ------------------------------------------------------------------ output

    /// Queues `el`; false when the queue is full or closed (the caller decides what that means).
    fn write(&mut self, el: &Element, ev: u64) -> bool {
        let stanza = matches!(el.name(), "message" | "presence" | "iq") && el.ns() == ns::CLIENT;
        let ok = self.write_raw(to_string(el), ev);
        if ok {
            if let Some(sm) = &mut self.sm {
                sm.sent(stanza, ev);
            }
        }
        ok
    }

    /// Records that event `ev` needs no stanza here (it is confirmed with the stanzas before it).
    fn mark(&mut self, ev: u64) {
        if self.write_raw(String::new(), ev) {
            if let Some(sm) = &mut self.sm {
                sm.sent(false, ev);
            }
        }
    }

    fn write_raw(&mut self, s: String, ev: u64) -> bool {
        if self.closing {
            return false;
        }
        self.link.tx.try_send(Out::Data(s, ev)).is_ok()
    }

    fn room(&self) -> usize {
        self.link.tx.capacity()
    }

    fn stream_header(&mut self) {
        let id = crate::http::auth::new_token();
        let id = &id[..16];
        if self.link.ws {
            let open = build!("open", ns::FRAMING, "from" => self.domain(), "id" => id, "version" => "1.0").build();
            self.write(&open, 0);
        } else {
            // The one element no DOM can write: it stays open for the whole stream. Every value
            // is ours (validated domain, hex id).
            let h = format!(
                "<?xml version='1.0'?><stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' from='{}' id='{id}' version='1.0' xml:lang='en'>",
                self.domain()
            );
            self.write_raw(h, 0);
        }
        self.header_sent = true;
    }

    /// Sends a stream error (RFC 6120 §4.9) and closes the stream.
    fn stream_error(&mut self, condition: &'static str, text: &str, ctx: &mut Context<Self>) {
        if self.closing {
            return;
        }
        self.ended_by = Some(condition);
        tracing::info!(session = self.id, condition, text, "xmpp stream error");
        metrics::counter!("parley_xmpp_stream_errors_total").increment(1);
        if !self.header_sent {
            self.stream_header();
        }
        let err = build!("error", ns::STREAMS)
            .append(empty(condition, ns::STREAM_ERRORS))
            .append(text_el("text", ns::STREAM_ERRORS, text))
            .build();
        self.write(&err, 0);
        self.end_stream(ctx);
    }

    /// Closes the stream in order: the closing tag (or RFC 7395 `<close/>`), then the connection.
    fn end_stream(&mut self, ctx: &mut Context<Self>) {
        if self.closing {
            return;
        }
        if self.link.ws {
            self.write(&empty("close", ns::FRAMING), 0);
        } else {
            self.write_raw("</stream:stream>".to_owned(), 0);
        }
        self.closing = true;
        let _ = self.link.tx.try_send(Out::Close(self.ended_by));
        ctx.stop();
    }

    // ------------------------------------------------------------------ input

    fn on_open(&mut self, el: Element, ctx: &mut Context<Self>) {
        if let Some(to) = attr!(el, "to") {
            if to != self.domain() {
                self.stream_header();
                return self.stream_error("host-unknown", "this server serves another domain", ctx);
            }
        }
        match self.phase {
            Phase::Start => {
                self.stream_header();
                let mut f = build!("features", ns::STREAMS);
                if self.link.tls && !self.secure {
                    let mut st = Element::builder("starttls", ns::TLS);
                    if !self.link.plaintext_ok {
                        st = st.append(empty("required", ns::TLS));
                    }
                    f = f.append(st.build());
                }
                if self.sasl_allowed() {
                    let mechs = super::sasl::MECHANISMS.iter().map(|m| text_el("mechanism", ns::SASL, *m));
                    f = f.append(Element::builder("mechanisms", ns::SASL).append_all(mechs).build());
                }
                // XEP-0077 §8 (stream feature) and its Security Considerations: registration
                // sends the password in the clear, so it is offered under the SASL rule.
                if self.shared.cfg.server.registration_open && self.sasl_allowed() {
                    f = f.append(empty("register", ns::REGISTER_FEATURE));
                }
                let f = f.build();
                self.write(&f, 0);
                self.phase = Phase::Sasl;
            }
            Phase::Restart => {
                self.stream_header();
                let f = build!("features", ns::STREAMS)
                    .append(empty("bind", ns::BIND))
                    .append(empty("sm", ns::SM))
                    .append(Element::builder("session", ns::SESSION).append(empty("optional", ns::SESSION)).build())
                    .build();
                self.write(&f, 0);
                self.phase = Phase::Bind;
            }
            _ => self.stream_error("invalid-xml", "unexpected stream header", ctx),
        }
    }

    /// SASL (and XEP-0077 registration, which carries a password too) is offered over TLS, or
    /// without it where `xmpp.allow_plaintext` allows.
    pub(super) fn sasl_allowed(&self) -> bool {
        self.secure || self.link.plaintext_ok
    }

    fn on_stanza(&mut self, el: Element, ctx: &mut Context<Self>) {
        match self.phase {
            Phase::Start | Phase::Restart => self.stream_error("not-authorized", "send the stream header first", ctx),
            Phase::Sasl => {
                if el.name() == "starttls" && el.ns() == ns::TLS {
                    if !self.link.tls || self.secure {
                        let f = empty("failure", ns::TLS);
                        self.write(&f, 0);
                        return self.end_stream(ctx);
                    }
                    // Before <proceed/>: what follows is a TLS handshake, then a new stream.
                    self.link.restart.store(true, Ordering::SeqCst);
                    let p = empty("proceed", ns::TLS);
                    self.write(&p, 0);
                    let _ = self.link.tx.try_send(Out::StartTls);
                    return;
                }
                if el.ns() == ns::SASL {
                    return self.sasl(el, ctx);
                }
                if el.name() == "iq" && el.ns() == ns::CLIENT {
                    if let Some(q) = el.get_child("query", ns::REGISTER) {
                        let q = q.clone();
                        return super::register::in_band(self, el, q, ctx);
                    }
                }
                self.stream_error("not-authorized", "authenticate first", ctx)
            }
            Phase::Bind => {
                if el.name() == "resume" && el.ns() == ns::SM {
                    return self.resume(el, ctx);
                }
                if el.ns() == ns::SM {
                    let f = build!("failed", ns::SM).append(empty("unexpected-request", ns::STANZAS)).build();
                    self.write(&f, 0);
                    return;
                }
                if el.name() == "iq" && el.ns() == ns::CLIENT {
                    if let Some(b) = el.get_child("bind", ns::BIND) {
                        let res = b.get_child("resource", ns::BIND).map(|r| r.text());
                        return self.bind(el, res, ctx);
                    }
                }
                self.stream_error("not-authorized", "bind a resource first", ctx)
            }
            Phase::Ready => {
                if el.ns() == ns::SM {
                    return self.sm_element(el, ctx);
                }
                if let Some(sm) = &mut self.sm {
                    sm.inbound = sm.inbound.wrapping_add(1);
                }
                if el.ns() != ns::CLIENT {
                    return self.stream_error("unsupported-stanza-type", "unknown top-level element", ctx);
                }
                if let Some(from) = attr!(el, "from") {
                    let ok = jid::Jid::new(from).is_ok_and(|j| j.to_bare().to_string() == self.bare(self.me()))
                        && (from == self.bare(self.me()) || from == self.full_jid());
                    if !ok {
                        return self.stream_error("invalid-from", "the from address is not yours", ctx);
                    }
                }
                match el.name() {
                    "message" => self.on_message(el, ctx),
                    "presence" => self.on_presence(el, ctx),
                    "iq" => self.on_iq(el, ctx),
                    _ => self.stream_error("unsupported-stanza-type", "unknown stanza", ctx),
                }
            }
        }
    }

    // ------------------------------------------------------------------ SASL

    fn sasl(&mut self, el: Element, ctx: &mut Context<Self>) {
        if self.sasl_busy {
            return self.stream_error("policy-violation", "one SASL step at a time", ctx);
        }
        let failure = |act: &mut Self, cond: &str| {
            let f = build!("failure", ns::SASL).append(empty(cond, ns::SASL)).build();
            act.write(&f, 0);
        };
        let payload = match el.text().trim() {
            "" | "=" => Vec::new(),
            t => match base64::engine::general_purpose::STANDARD.decode(t) {
                Ok(p) => p,
                Err(_) => return failure(self, "incorrect-encoding"),
            },
        };
        match el.name() {
            "auth" => {
                if !self.sasl_allowed() {
                    return failure(self, "encryption-required");
                }
                // The failed-login token is taken now and given back unless the attempt fails
                // (as HTTP logins do): concurrent attempts cannot all pass an empty bucket.
                let ip = self.link.peer.to_string();
                if !self.shared.login_limiter.allow(&ip) {
                    metrics::counter!("parley_rate_limited_total", "what" => "login").increment(1);
                    return failure(self, "temporary-auth-failure");
                }
                let name = attr!(el, "mechanism").unwrap_or("").to_owned();
                if super::sasl::foreign_authzid(&name, &payload, self.domain()) {
                    metrics::counter!("parley_logins_total", "result" => "failed").increment(1);
                    return failure(self, "invalid-authzid");
                }
                let users = super::sasl::Users { shared: self.shared.clone() };
                let Some(mech) = super::sasl::mechanism(&name, users, &payload) else {
                    self.shared.login_limiter.refund(&ip);
                    return failure(self, "invalid-mechanism");
                };
                self.mech_name = name;
                self.sasl_step(mech, payload, ctx);
            }
            "response" => match self.mech.take() {
                Some(mech) => self.sasl_step(mech, payload, ctx),
                None => failure(self, "malformed-request"),
            },
            "abort" => {
                // Aborted between steps: no password was checked.
                if self.mech.take().is_some() {
                    self.shared.login_limiter.refund(&self.link.peer.to_string());
                }
                failure(self, "aborted");
            }
            _ => self.stream_error("unsupported-stanza-type", "unknown SASL element", ctx),
        }
    }

    /// Runs one SASL step on the blocking pool (argon2 and PBKDF2 are slow on purpose); the
    /// session handles nothing else meanwhile.
    fn sasl_step(&mut self, mut mech: Box<dyn sasl::server::Mechanism + Send>, payload: Vec<u8>, ctx: &mut Context<Self>) {
        use sasl::common::Identity;
        use sasl::server::Response;
        self.sasl_busy = true;
        let plain_pw = (self.mech_name == "PLAIN").then(|| super::sasl::plain_password(&payload)).flatten();
        // PLAIN verifies an argon2id hash: through the server's hash slots, like HTTP logins.
        let shared = self.shared.clone();
        let job = async move {
            // A cluster node first applies what the leader had committed: a user registered or
            // a SCRAM verifier set through another node is known here. No leader: try later.
            if shared.read_barrier().await.is_err() {
                return Err(crate::http::auth::HashBusy);
            }
            crate::http::auth::hash_job(&shared, move || {
                let r = mech.respond(&payload);
                (mech, r)
            })
            .await
        };
        ctx.wait(job.into_actor(self).map(move |res, act, ctx| {
            act.sasl_busy = false;
            match res {
                Err(crate::http::auth::HashBusy) => {
                    act.shared.login_limiter.refund(&act.link.peer.to_string());
                    let f = build!("failure", ns::SASL).append(empty("temporary-auth-failure", ns::SASL)).build();
                    act.write(&f, 0);
                }
                Ok((mech, Ok(Response::Proceed(data)))) => {
                    act.mech = Some(mech);
                    let c = text_el("challenge", ns::SASL, b64(&data));
                    act.write(&c, 0);
                }
                Ok((_, Ok(Response::Success(Identity::Username(user), data)))) if valid_user_id(&user) => {
                    metrics::counter!("parley_logins_total", "result" => "ok").increment(1);
                    act.shared.login_limiter.refund(&act.link.peer.to_string());
                    if let Some(pw) = plain_pw {
                        act.add_missing_scram(&user, pw);
                    }
                    act.user = Some(user);
                    act.phase = Phase::Restart;
                    act.link.limit.cap.store(act.shared.cfg.session.max_frame_bytes, Ordering::Relaxed);
                    // Before <success/>: the client's next bytes are a new stream.
                    act.link.restart.store(true, Ordering::SeqCst);
                    let s = if data.is_empty() { empty("success", ns::SASL) } else { text_el("success", ns::SASL, b64(&data)) };
                    act.write(&s, 0);
                }
                _ => {
                    metrics::counter!("parley_logins_total", "result" => "failed").increment(1);
                    let f = build!("failure", ns::SASL).append(empty("not-authorized", ns::SASL)).build();
                    act.write(&f, 0);
                }
            }
            let _ = ctx;
        }));
    }

    /// A user registered before the gateway has no SCRAM verifiers: derive them from the
    /// password of its first successful PLAIN login and store them through the log.
    fn add_missing_scram(&self, user: &str, password: String) {
        if !matches!(self.shared.state().scram(user), Ok(None)) {
            return;
        }
        let (shared, user) = (self.shared.clone(), user.to_owned());
        actix_rt::spawn(async move {
            let Ok(Some(scram)) = tokio::task::spawn_blocking(move || super::sasl::derive_verifiers(&password)).await else { return };
            let _ = shared.pipeline.call(Command::SetScram { user, scram }).await;
        });
    }

    // ------------------------------------------------------------------ bind

    /// A fresh token (its hash; the token itself is never shown) and the registry entry of this
    /// stream as `device`.
    fn device_conn(&self, device: &str, ctx: &mut Context<Self>) -> (TokenHash, DeviceConn) {
        let hash = crate::http::auth::token_hash(&crate::http::auth::new_token());
        let conn = DeviceConn {
            session: self.id,
            device: device.to_owned(),
            token_hash: hash,
            deliver: ctx.address().recipient(),
            relay: ctx.address().recipient(),
            kick: ctx.address().recipient(),
            stop_typing: ctx.address().recipient(),
        };
        (hash, conn)
    }

    fn bind(&mut self, iq: Element, resource: Option<String>, ctx: &mut Context<Self>) {
        if attr!(iq, "type") != Some("set") {
            return self.stream_error("not-authorized", "bind a resource first", ctx);
        }
        let user = self.me().to_owned();
        let device = device_of(resource.as_deref());
        let (hash, conn) = self.device_conn(&device, ctx);
        let (shared, u2, d2) = (self.shared.clone(), user.clone(), device.clone());
        // The device exists from its login (like a native login: tokens, retention), then it is
        // registered online; every event applied after the head read below is pushed to it.
        let fut = async move {
            match shared.pipeline.call(Command::Login { token_hash: hash, user: u2.clone(), device: d2 }).await {
                Ok(Outcome::Done) => shared.registry.send(Connect { user: u2, conn }).await.is_ok(),
                _ => false,
            }
        };
        ctx.wait(fut.into_actor(self).map(move |ok, act, ctx| {
            if !ok {
                let e = error_reply(&iq, None, "wait", "internal-server-error", Some("cannot log the device in"));
                act.write(&e, 0);
                return act.end_stream(ctx);
            }
            act.token = Some(hash);
            let cursor = act.shared.state().cursor(&user, &device).unwrap_or(0);
            let head = act.shared.state().head(&user).unwrap_or(0);
            act.device = Some(device);
            act.last_sent = cursor;
            act.cursor_sent = cursor;
            act.target = head;
            act.backlog_head = head;
            act.phase = Phase::Ready;
            let jid = act.full_jid();
            let r = build!("iq", ns::CLIENT, "type" => "result", "id" => attr!(iq, "id").unwrap_or(""))
                .append(Element::builder("bind", ns::BIND).append(text_el("jid", ns::BIND, jid)).build())
                .build();
            act.write(&r, 0);
        }));
    }

    // ------------------------------------------------------------------ delivery

    /// Sends stored events from `last_sent + 1` to `target` while the queue has room (each event
    /// may become several stanzas); retries shortly when it is full.
    fn pump(&mut self, ctx: &mut Context<Self>) {
        if !self.available || self.closing || self.phase != Phase::Ready {
            return;
        }
        let page_max = self.shared.cfg.session.sync_page_events;
        while self.last_sent < self.target {
            let room = self.room();
            if room < 64 {
                if !self.pump_later {
                    self.pump_later = true;
                    ctx.run_later(Duration::from_millis(20), |act, ctx| {
                        act.pump_later = false;
                        act.pump(ctx);
                    });
                }
                return;
            }
            let page = match self.shared.state().events_page(self.me(), self.last_sent, self.target, page_max.min(room / 8)) {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(session = self.id, error = %e, "cannot read events");
                    return self.stream_error("internal-server-error", "storage read failed", ctx);
                }
            };
            if page.scanned_to <= self.last_sent {
                return;
            }
            for (ev, payload) in page.events {
                if !self.emit(ev, &payload) {
                    return;
                }
            }
            self.last_sent = self.last_sent.max(page.scanned_to);
        }
    }

    /// Writes the stanzas of event `ev`; false when the queue was full (nothing of it is lost:
    /// it stays unsent and the pump sends it again).
    fn emit(&mut self, ev: u64, payload: &EventPayload) -> bool {
        let stanzas = match payload {
            EventPayload::Group(g) if ev <= self.backlog_head => super::muc::backlog_group_event(self, g),
            _ => self.render(payload),
        };
        if self.room() < stanzas.len() + 1 {
            return false;
        }
        let n = stanzas.len();
        for (i, s) in stanzas.iter().enumerate() {
            self.write(s, if i + 1 == n { ev } else { 0 });
        }
        if n == 0 {
            self.mark(ev);
        }
        self.last_sent = ev;
        true
    }

    /// The stanzas of one event for this resource.
    fn render(&mut self, payload: &EventPayload) -> Vec<Element> {
        let me = self.me().to_owned();
        match payload {
            EventPayload::Message(m) if m.from == me && m.conv.starts_with("g:") => {
                // The MUC reflection (XEP-0045 §7.4), to every resource; never a carbon.
                let from = format!("{}/{}", self.conv_jid(&m.conv), me);
                vec![self.chat_message(m, &from, &self.full_jid(), false)]
            }
            EventPayload::Message(m) if m.from == me => {
                if self.own_ids.contains(&m.id) || !self.carbons {
                    return Vec::new();
                }
                // XEP-0280 §6: a copy of what another resource of this user sent.
                let inner = self.chat_message(m, &self.bare(&me), &self.conv_jid(&m.conv), false);
                vec![self.carbon("sent", inner)]
            }
            EventPayload::Message(m) => {
                let from = match Conv::parse(&m.conv) {
                    Some(Conv::Group(_)) => format!("{}/{}", self.conv_jid(&m.conv), m.from),
                    _ => self.bare(&m.from),
                };
                let old = crate::actors::presence::now_ms().saturating_sub(m.ts) > 5_000;
                vec![self.chat_message(m, &from, &self.full_jid(), old)]
            }
            EventPayload::Receipt(r) if r.by != me => {
                let status = if r.status == ReceiptStatus::Read { 1 } else { 0 };
                let key = (r.conv.clone(), status);
                let prev = self.reported.get(&key).copied().unwrap_or(0);
                if r.up_to <= prev {
                    return Vec::new();
                }
                let Ok(Ok(page)) = self.shared.state().history(&me, &Conv::parse(&r.conv).unwrap_or(Conv::Group(String::new())), Some(r.up_to + 1), 20) else {
                    return Vec::new();
                };
                let mine: Vec<&MessageView> = page.messages.iter().filter(|m| m.from == me && m.seq > prev).collect();
                self.reported.insert(key, r.up_to);
                let from = match Conv::parse(&r.conv) {
                    Some(Conv::Group(_)) => format!("{}/{}", self.conv_jid(&r.conv), r.by),
                    _ => self.bare(&r.by),
                };
                let marker = |id: &str| {
                    if status == 1 {
                        build!("displayed", ns::MARKERS, "id" => id).build()
                    } else {
                        build!("received", ns::RECEIPTS, "id" => id).build()
                    }
                };
                // XEP-0333 markers mean "up to here": one for the newest; XEP-0184 receipts are
                // per message: one for each.
                let ids: Vec<&str> = if status == 1 {
                    mine.last().map(|m| m.id.as_str()).into_iter().collect()
                } else {
                    mine.iter().map(|m| m.id.as_str()).collect()
                };
                let typ = if from.contains('/') && from.contains(&self.muc_domain()) { "groupchat" } else { "chat" };
                ids.into_iter()
                    .map(|id| build!("message", ns::CLIENT, "from" => from.as_str(), "to" => self.full_jid(), "type" => typ).append(marker(id)).build())
                    .collect()
            }
            EventPayload::ReadMarker(rm) if self.carbons => {
                // Read on another device of this user: a carbon of a displayed marker (XEP-0333 §5).
                let Some(c) = Conv::parse(&rm.conv) else { return Vec::new() };
                let Ok(Ok(page)) = self.shared.state().history(&me, &c, Some(rm.seq + 1), 1) else { return Vec::new() };
                let Some(last) = page.messages.last() else { return Vec::new() };
                let inner = build!("message", ns::CLIENT, "from" => self.bare(&me), "to" => self.conv_jid(&rm.conv), "type" => "chat")
                    .append(build!("displayed", ns::MARKERS, "id" => last.id.as_str()).build())
                    .build();
                vec![self.carbon("sent", inner)]
            }
            EventPayload::Group(g) => super::muc::group_event(self, g),
            _ => Vec::new(),
        }
    }

    /// A chat (or groupchat) message stanza of `m`, with its XEP-0359 stanza-id (assigned once,
    /// at ingest: the message's conv and seq) and, for old ones, its XEP-0203 delay.
    pub(super) fn chat_message(&self, m: &MessageView, from: &str, to: &str, with_delay: bool) -> Element {
        let group = m.conv.starts_with("g:");
        let mut b = build!("message", ns::CLIENT, "from" => from, "to" => to, "type" => if group { "groupchat" } else { "chat" }, "id" => m.id.as_str())
            .append(text_el("body", ns::CLIENT, m.body.as_str()))
            .append(build!("stanza-id", ns::SID, "by" => if group { self.conv_jid(&m.conv) } else { self.bare(self.me()) }, "id" => archive_id(&m.conv, m.seq)).build())
            .append(empty("markable", ns::MARKERS));
        if with_delay {
            b = b.append(delay(m.ts, self.domain()));
        }
        b.build()
    }

    fn carbon(&self, kind: &str, inner: Element) -> Element {
        let fwd = Element::builder("forwarded", ns::FORWARD).append(inner).build();
        build!("message", ns::CLIENT, "from" => self.bare(self.me()), "to" => self.full_jid(), "type" => "chat")
            .append(Element::builder(kind, ns::CARBONS).append(fwd).build())
            .build()
    }

    /// Submits the device's cursor up to what the writer wrote (without stream management the
    /// socket write is the delivery, as for any XMPP server).
    fn confirm(&mut self) {
        let (Some(user), Some(device)) = (self.user.clone(), self.device.clone()) else { return };
        let w = self.link.written.load(Ordering::Acquire);
        if w > self.cursor_sent {
            self.cursor_sent = w;
            let _ = self.shared.pipeline.submit(Command::Received { user, device, up_to: w });
        }
    }

    // ------------------------------------------------------------------ XEP-0198

    fn sm_element(&mut self, el: Element, ctx: &mut Context<Self>) {
        let name = el.name().to_owned();
        match name.as_str() {
            "enable" => {
                if self.sm.is_some() {
                    let f = build!("failed", ns::SM).append(empty("unexpected-request", ns::STANZAS)).build();
                    self.write(&f, 0);
                    return;
                }
                // XEP-0198 §3, parsed with xmpp-parsers: `resume` is an xs:boolean.
                let Ok(enable) = xmpp_parsers::sm::Enable::try_from(el) else {
                    let f = build!("failed", ns::SM).append(empty("bad-request", ns::STANZAS)).build();
                    self.write(&f, 0);
                    return;
                };
                let resume = enable.resume;
                let id = resume.then(|| crate::http::auth::new_token()[..32].to_owned());
                let mut e = build!("enabled", ns::SM);
                if let Some(id) = &id {
                    e = e
                        .attr(rxml::xml_ncname!("id").into(), id.as_str())
                        .attr(rxml::xml_ncname!("resume").into(), "true")
                        .attr(rxml::xml_ncname!("max").into(), super::sm::RESUME_SECS.to_string());
                    super::sm::LIVE.insert(id.clone(), ctx.address().recipient());
                }
                // Counting starts after <enabled/> (XEP-0198 §4); the events already written
                // are confirmed by the socket write, as without stream management.
                self.confirm();
                let e = e.build();
                self.write(&e, 0);
                self.sm = Some(super::sm::Counters { id, ..Default::default() });
            }
            "r" => {
                // Our <a/> says the stanzas are handled: a message only once it is durable (the
                // same promise as a native `ack`), so wait for the sends before this <r/> that
                // are still in the pipeline.
                if let Some(sm) = &self.sm {
                    self.acks.requested(sm.inbound);
                }
                self.maybe_answer_ack();
            }
            "a" => {
                let Ok(xmpp_parsers::sm::A { h }) = xmpp_parsers::sm::A::try_from(el) else {
                    return self.stream_error("invalid-xml", "<a/> needs h (0 to 2^32-1)", ctx);
                };
                let Some(sm) = &mut self.sm else { return };
                match sm.ack(h) {
                    Ok(ev) => self.confirm_up_to(ev),
                    Err(t) => {
                        let e = build!("error", ns::STREAMS)
                            .append(empty("undefined-condition", ns::STREAM_ERRORS))
                            .append(build!("handled-count-too-high", ns::SM, "h" => t.h.to_string(), "send-count" => t.sent.to_string()).build())
                            .build();
                        self.write(&e, 0);
                        self.ended_by = Some("undefined-condition");
                        self.end_stream(ctx);
                    }
                }
            }
            _ => {
                let f = build!("failed", ns::SM).append(empty("unexpected-request", ns::STANZAS)).build();
                self.write(&f, 0);
            }
        }
    }

    /// Answers the outstanding `<r/>`s whose stanzas are all handled, with one `<a/>`.
    fn maybe_answer_ack(&mut self) {
        let inbound = self.sm.as_ref().map_or(0, |s| s.inbound);
        if let Some(h) = self.acks.answer(inbound) {
            let a = build!("a", ns::SM, "h" => h.to_string()).build();
            self.write(&a, 0);
        }
    }

    /// Moves the device cursor to `ev` (confirmed by an ack).
    fn confirm_up_to(&mut self, ev: u64) {
        let (Some(user), Some(device)) = (self.user.clone(), self.device.clone()) else { return };
        if ev > self.cursor_sent {
            self.cursor_sent = ev;
            let _ = self.shared.pipeline.submit(Command::Received { user, device, up_to: ev });
        }
    }

    /// Asks for an ack when stanzas were sent since the last request.
    fn request_ack(&mut self) {
        let Some(sm) = &mut self.sm else { return };
        if sm.out != sm.acked && sm.out != sm.asked {
            sm.asked = sm.out;
            let r = empty("r", ns::SM);
            let _ = self.write_raw(to_string(&r), 0);
        }
    }

    /// Keeps this stream's counters for a `<resume/>` (a managed stream that did not end cleanly).
    fn park(&mut self) {
        let Some(sm) = self.sm.take() else { return };
        let Some(id) = sm.id.clone() else { return };
        super::sm::LIVE.remove(&id);
        if self.clean_end {
            return;
        }
        let p = super::sm::Parked {
            user: self.me().to_owned(),
            device: self.device.clone().unwrap_or_default(),
            confirmed: self.cursor_sent,
            counters: sm,
            carbons: self.carbons,
            until: super::sm::deadline(),
        };
        super::sm::park(id, p);
    }

    /// `<resume previd h/>` instead of binding: the parked stream's device, confirmed up to `h`;
    /// then only the events after that are sent again, from the log.
    fn resume(&mut self, el: Element, ctx: &mut Context<Self>) {
        let Ok(xmpp_parsers::sm::Resume { h, previd }) = xmpp_parsers::sm::Resume::try_from(el) else {
            let f = build!("failed", ns::SM).append(empty("bad-request", ns::STANZAS)).build();
            self.write(&f, 0);
            return;
        };
        let id = previd.0;
        // The old connection may not have been noticed as gone yet: park it first.
        let live = super::sm::LIVE.get(&id).map(|r| r.clone());
        let fut = async move {
            if let Some(r) = live {
                let _ = r.send(super::sm::Park).await;
                // stopped() of the old stream runs right after its handler.
                for _ in 0..50 {
                    if super::sm::PARKED.contains_key(&id) {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            id
        };
        ctx.wait(fut.into_actor(self).map(move |id, act, ctx| act.resume_parked(id, h, ctx)));
    }

    fn resume_parked(&mut self, id: String, h: u32, ctx: &mut Context<Self>) {
        let user = self.me().to_owned();
        let Some(mut p) = super::sm::take(&id, &user) else {
            let f = build!("failed", ns::SM).append(empty("item-not-found", ns::STANZAS)).build();
            self.write(&f, 0);
            return;
        };
        let confirmed = match p.counters.ack(h) {
            Ok(ev) => ev.max(p.confirmed),
            Err(t) => {
                // Refused; the parked state is dropped (its events are after the cursor anyway).
                let f = build!("failed", ns::SM, "h" => p.counters.inbound.to_string())
                    .append(build!("handled-count-too-high", ns::SM, "h" => t.h.to_string(), "send-count" => t.sent.to_string()).build())
                    .build();
                self.write(&f, 0);
                return;
            }
        };
        let device = p.device.clone();
        let (hash, conn) = self.device_conn(&device, ctx);
        let shared = self.shared.clone();
        let (u2, d2) = (user.clone(), device.clone());
        let fut = async move {
            if confirmed > 0 {
                let _ = shared.pipeline.call(Command::Received { user: u2.clone(), device: d2.clone(), up_to: confirmed }).await;
            }
            match shared.pipeline.call(Command::Login { token_hash: hash, user: u2.clone(), device: d2 }).await {
                Ok(Outcome::Done) => shared.registry.send(Connect { user: u2, conn }).await.is_ok(),
                _ => false,
            }
        };
        ctx.wait(fut.into_actor(self).map(move |ok, act, ctx| {
            if !ok {
                return act.stream_error("internal-server-error", "cannot resume now", ctx);
            }
            act.token = Some(hash);
            let stored = act.shared.state().cursor(&user, &device).unwrap_or(0);
            let from = stored.max(confirmed);
            act.device = Some(device);
            act.cursor_sent = from;
            act.last_sent = from;
            act.target = act.shared.state().head(&user).unwrap_or(0).max(from);
            act.carbons = p.carbons;
            act.phase = Phase::Ready;
            // The client has h stanzas; what follows is counted from there (the events after
            // `from` are sent again as new stanzas).
            p.counters.pending.clear();
            (p.counters.out, p.counters.acked, p.counters.asked) = (h, h, h);
            let inbound = p.counters.inbound;
            act.sm = Some(p.counters);
            super::sm::LIVE.insert(id.clone(), ctx.address().recipient());
            let r = build!("resumed", ns::SM, "previd" => id.as_str(), "h" => inbound.to_string()).build();
            act.write(&r, 0);
            act.available = true;
            let c = act.contacts();
            act.watch(c, ctx);
            act.pump(ctx);
        }));
    }

    // ------------------------------------------------------------------ messages

    fn on_message(&mut self, el: Element, ctx: &mut Context<Self>) {
        let me = self.me().to_owned();
        let to = attr!(el, "to").map(str::to_owned).unwrap_or_else(|| self.bare(&me));
        let Ok(jid) = jid::Jid::new(&to) else {
            let e = error_reply(&el, None, "modify", "jid-malformed", None);
            self.write(&e, 0);
            return;
        };
        let target = match (jid.node(), jid.domain().as_str()) {
            (Some(n), d) if d == self.domain() && valid_user_id(n.as_str()) => n.as_str().to_owned(),
            (Some(n), d) if d == self.muc_domain() => format!("g:{}", n.as_str()),
            _ => {
                let e = error_reply(&el, None, "cancel", "item-not-found", Some("no such user here"));
                self.write(&e, 0);
                return;
            }
        };
        if attr!(el, "type") == Some("error") {
            return;
        }
        if target.starts_with("g:") && super::muc::invite(self, &el, ctx) {
            return;
        }
        if let Some(body) = el.get_child("body", ns::CLIENT).map(|b| b.text()) {
            return self.send_body(el, &me, &target, body, ctx);
        }
        let conv = match Conv::from_target(&me, &target) {
            Some(c) => c.to_string(),
            None => return,
        };
        // XEP-0333: displayed means read up to that message.
        if let Some(id) = el.get_child("displayed", ns::MARKERS).and_then(|d| attr!(d, "id")) {
            let sender_seq = self.seq_of(&conv, &target, id);
            if let Some(seq) = sender_seq {
                let _ = self.shared.pipeline.submit(Command::Read { user: me.clone(), conv: conv.clone(), seq });
            }
        }
        // XEP-0184 <received/>: the device cursor already moved when the stanza was written.
        // XEP-0085 chat states.
        let state = el.children().find(|c| c.ns() == ns::CHATSTATES).map(|c| c.name().to_owned());
        if let Some(s) = state {
            let st = if s == "composing" { TypingState::Composing } else { TypingState::Paused };
            self.typing(&me, conv, st, ctx);
        }
    }

    /// The seq of message `id` in `conv`, which the peer `target` (or this user) sent.
    fn seq_of(&self, conv: &str, target: &str, id: &str) -> Option<u64> {
        if let Some((c, seq)) = parse_archive_id(id) {
            if c == conv {
                return Some(seq);
            }
        }
        let mut senders: Vec<String> = ops::others_in(&self.shared, self.me(), conv);
        if !target.starts_with("g:") {
            senders = vec![target.to_owned()];
        }
        senders.push(self.me().to_owned());
        senders.iter().find_map(|s| self.shared.state().dedup(s, id).ok().flatten().filter(|a| a.conv == conv).map(|a| a.seq))
    }

    fn send_body(&mut self, el: Element, me: &str, target: &str, body: String, ctx: &mut Context<Self>) {
        let id = client_id(attr!(el, "id"));
        let conv = match ops::check_send(&self.shared, me, &id, target, &body) {
            // A resend: stored already, with its stanza-id; nothing new (idempotent).
            Ok(SendCheck::Duplicate(_)) => return,
            Ok(SendCheck::New(conv)) => conv,
            Err(e) => {
                let (kind, cond) = match e.code {
                    ErrorCode::RateLimited => ("wait", "resource-constraint"),
                    ErrorCode::TooLarge => ("modify", "policy-violation"),
                    ErrorCode::Internal => ("wait", "internal-server-error"),
                    _ => ("modify", "bad-request"),
                };
                let r = error_reply(&el, None, kind, cond, Some(&e.message));
                self.write(&r, 0);
                return;
            }
        };
        if let Some(h) = self.composing.remove(&conv) {
            ctx.cancel_future(h);
            ops::relay_typing(&self.shared, &ops::others_in(&self.shared, me, &conv), me, &conv, TypingState::Paused);
        }
        ops::stop_typing_elsewhere(&self.shared, me, self.id, &conv);
        self.remember(id.clone());
        let cmd = Command::Send { from: me.to_owned(), device: self.device.clone().unwrap_or_default(), id, conv, body };
        let rx = match self.shared.pipeline.submit(cmd) {
            Ok(rx) => rx,
            Err(e) => return self.refuse_send(&el, Err(e)),
        };
        // Without stream management nothing waits for the answer.
        let serial = self.sm.as_ref().map(|sm| self.acks.submitted(sm.inbound));
        ctx.spawn(rx.into_actor(self).map(move |res, act, _| {
            if let Some(serial) = serial {
                act.acks.answered(serial);
            }
            let res = res.unwrap_or(Err(PipelineError::Unavailable));
            match &res {
                Ok(Outcome::Sent { duplicate, .. }) => {
                    if !duplicate {
                        metrics::counter!("parley_messages_acked_total").increment(1);
                    }
                }
                _ => act.refuse_send(&el, res),
            }
            // After the refusal, if any: a client reads the error before the <a/> that counts
            // the stanza as handled, so it never takes a refused message for a stored one.
            act.maybe_answer_ack();
        }));
    }

    fn refuse_send(&mut self, el: &Element, res: Result<Outcome, PipelineError>) {
        let (kind, cond, text) = match res {
            Ok(Outcome::Refused(Refusal::UnknownUser(_))) => ("cancel", "item-not-found", "no such user"),
            Ok(Outcome::Refused(Refusal::NotMember)) => ("auth", "forbidden", "not a member of this conversation"),
            Ok(Outcome::Refused(_)) => ("modify", "not-acceptable", "refused"),
            Ok(_) => return,
            Err(PipelineError::Overloaded) => ("wait", "resource-constraint", "the server is overloaded"),
            Err(PipelineError::Unavailable) => ("wait", "internal-server-error", "storage cannot commit now"),
        };
        let r = error_reply(el, None, kind, cond, Some(text));
        self.write(&r, 0);
    }

    fn remember(&mut self, id: String) {
        if self.own_ids.insert(id.clone()) {
            self.own_order.push_back(id);
            if self.own_order.len() > OWN_IDS {
                if let Some(old) = self.own_order.pop_front() {
                    self.own_ids.remove(&old);
                }
            }
        }
    }

    /// XEP-0085 → parley typing, with the native expiry (`session.typing_timeout_ms`).
    fn typing(&mut self, me: &str, conv: String, state: TypingState, ctx: &mut Context<Self>) {
        let Ok(others) = ops::typing_audience(&self.shared, me, &conv) else { return };
        let timeout = Duration::from_millis(self.shared.cfg.session.typing_timeout_ms);
        ops::arm_typing(self, ctx, &conv, state, timeout);
        ops::relay_typing(&self.shared, &others, me, &conv, state);
    }

    // ------------------------------------------------------------------ presence

    /// The users this user has conversations with (the roster, simplified: see README).
    fn contacts(&self) -> Vec<String> {
        let me = self.me();
        let mut v: Vec<String> = self
            .shared
            .state()
            .conversations(me)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|c| match Conv::parse(&c.conv) {
                Some(Conv::Dm { a, b }) if a != b => Some(if a == me { b } else { a }),
                _ => None,
            })
            .collect();
        v.sort();
        v.dedup();
        v
    }

    fn presence_of(&self, user: &str, online: bool, last_seen: Option<u64>) -> Element {
        let mut b = build!("presence", ns::CLIENT, "from" => self.bare(user), "to" => self.full_jid());
        if !online {
            b = b.attr(rxml::xml_ncname!("type").into(), "unavailable");
            if let Some(ts) = last_seen {
                // XEP-0319: when the user was last seen.
                b = b.append(build!("idle", ns::IDLE, "since" => stamp(ts)).build());
            }
        }
        b.build()
    }

    fn watch(&mut self, users: Vec<String>, ctx: &mut Context<Self>) {
        let r = ctx.address().recipient::<Relay>();
        let frames = self.shared.presence.watch(self.id, &r, &users, &self.shared.online);
        for u in users {
            if !self.watching.contains(&u) {
                self.watching.push(u);
            }
        }
        for f in frames {
            if let ServerFrame::Presence { user, online, last_seen } = f {
                let p = self.presence_of(&user, online, last_seen);
                self.write(&p, 0);
            }
        }
    }

    fn on_presence(&mut self, el: Element, ctx: &mut Context<Self>) {
        let to = attr!(el, "to").and_then(|t| jid::Jid::new(t).ok());
        if let Some(j) = &to {
            if j.domain().as_str() == self.muc_domain() {
                return super::muc::presence(self, el, ctx);
            }
        }
        let typ = attr!(el, "type");
        match (typ, to) {
            (None, None) => {
                // Initial (or updated) presence: available; its own presence comes back.
                let me = self.full_jid();
                let echo = build!("presence", ns::CLIENT, "from" => me.as_str(), "to" => me.as_str()).build();
                self.write(&echo, 0);
                if !self.available {
                    self.available = true;
                    let c = self.contacts();
                    self.watch(c, ctx);
                    self.pump(ctx);
                }
            }
            // Subscriptions, simplified: everyone may see everyone's presence; a request is
            // granted at once, and the contact's presence follows.
            (Some("subscribe"), Some(j)) | (Some("probe"), Some(j)) => {
                let Some(u) = j.node().map(|n| n.as_str().to_owned()).filter(|u| valid_user_id(u)) else { return };
                if typ == Some("subscribe") {
                    let ok = build!("presence", ns::CLIENT, "from" => self.bare(&u), "to" => self.bare(self.me()), "type" => "subscribed").build();
                    self.write(&ok, 0);
                }
                self.watch(vec![u], ctx);
            }
            _ => {}
        }
    }

    // ------------------------------------------------------------------ iq

    fn on_iq(&mut self, iq: Element, ctx: &mut Context<Self>) {
        let typ = attr!(iq, "type").unwrap_or("").to_owned();
        if typ == "result" || typ == "error" {
            return;
        }
        let to = attr!(iq, "to").map(str::to_owned);
        let for_us = match &to {
            None => true,
            Some(t) => t == self.domain() || t == &self.bare(self.me()) || t == &self.full_jid() || t.ends_with(&self.muc_domain()),
        };
        let Some(child) = iq.children().next().cloned() else {
            let e = error_reply(&iq, None, "modify", "bad-request", None);
            self.write(&e, 0);
            return;
        };
        let result = |iq: &Element, payload: Option<Element>| {
            let mut b = build!("iq", ns::CLIENT, "type" => "result", "id" => attr!(iq, "id").unwrap_or(""));
            if let Some(t) = attr!(iq, "to") {
                b = b.attr(rxml::xml_ncname!("from").into(), t);
            }
            if let Some(p) = payload {
                b = b.append(p);
            }
            b.build()
        };
        let cns = child.ns();
        let reply = match (typ.as_str(), child.name(), cns.as_str()) {
            _ if !for_us => None,
            ("get", "query", ns::ROSTER) => {
                let items = self.contacts().into_iter().map(|u| build!("item", ns::ROSTER, "jid" => self.bare(&u), "name" => u.as_str(), "subscription" => "both").build());
                Some(result(&iq, Some(Element::builder("query", ns::ROSTER).append_all(items).build())))
            }
            ("set", "query", ns::ROSTER) => Some(result(&iq, None)),
            ("get", "query", ns::DISCO_INFO) => Some(result(&iq, Some(self.disco_info(to.as_deref(), attr!(child, "node"))))),
            ("get", "query", ns::DISCO_ITEMS) => Some(result(&iq, Some(self.disco_items(to.as_deref())))),
            ("get", "ping", ns::PING) => Some(result(&iq, None)),
            ("set", "enable", ns::CARBONS) => {
                self.carbons = true;
                Some(result(&iq, None))
            }
            ("set", "disable", ns::CARBONS) => {
                self.carbons = false;
                Some(result(&iq, None))
            }
            ("set", "session", ns::SESSION) => Some(result(&iq, None)),
            ("set", "query", ns::MAM) => return super::mam::query(self, iq, child),
            (_, "query", super::muc::NS_OWNER) | (_, "query", super::muc::NS_ADMIN) => match super::muc::iq(self, &iq, &child, ctx) {
                Some(()) => return,
                None => None,
            },
            ("set", "query", ns::REGISTER) => return super::register::in_band(self, iq, child, ctx),
            _ => None,
        };
        let reply = reply.unwrap_or_else(|| error_reply(&iq, None, "cancel", "service-unavailable", None));
        self.write(&reply, 0);
    }

    fn disco_info(&self, to: Option<&str>, node: Option<&str>) -> Element {
        let mut q = Element::builder("query", ns::DISCO_INFO);
        if let Some(n) = node {
            q = q.attr(rxml::xml_ncname!("node").into(), n);
        }
        let (identity, features): ((&str, &str, &str), Vec<&str>) = match to {
            Some(t) if t == self.muc_domain() => (("conference", "text", "parley groups"), vec![ns::DISCO_INFO, ns::DISCO_ITEMS, ns::MUC, ns::MAM, ns::SID]),
            Some(t) if t.ends_with(&self.muc_domain()) => (
                ("conference", "text", "group"),
                vec![ns::DISCO_INFO, ns::MUC, ns::MAM, ns::SID, "muc_membersonly", "muc_persistent", "muc_nonanonymous", "muc_hidden"],
            ),
            Some(t) if t.contains('@') => (("account", "registered", ""), vec![ns::DISCO_INFO, ns::MAM, ns::SID]),
            _ => (
                ("server", "im", "parley"),
                vec![
                    ns::DISCO_INFO,
                    ns::DISCO_ITEMS,
                    ns::PING,
                    ns::CARBONS,
                    ns::ROSTER,
                    ns::MAM,
                    ns::SID,
                    ns::RECEIPTS,
                    ns::MARKERS,
                    ns::CHATSTATES,
                    ns::REGISTER,
                ],
            ),
        };
        let mut id = build!("identity", ns::DISCO_INFO, "category" => identity.0, "type" => identity.1);
        if !identity.2.is_empty() {
            id = id.attr(rxml::xml_ncname!("name").into(), identity.2);
        }
        q = q.append(id.build());
        for f in features {
            q = q.append(build!("feature", ns::DISCO_INFO, "var" => f).build());
        }
        q.build()
    }

    fn disco_items(&self, to: Option<&str>) -> Element {
        let mut q = Element::builder("query", ns::DISCO_ITEMS);
        match to {
            Some(t) if t == self.muc_domain() => {
                // The rooms (groups) this user is a member of.
                for c in self.shared.state().conversations(self.me()).unwrap_or_default() {
                    if let Some(Conv::Group(g)) = Conv::parse(&c.conv) {
                        if self.shared.state().is_member(self.me(), &Conv::Group(g.clone())).unwrap_or(false) {
                            q = q.append(build!("item", ns::DISCO_ITEMS, "jid" => format!("{g}@{}", self.muc_domain())).build());
                        }
                    }
                }
            }
            Some(t) if t.contains('@') => {}
            _ => q = q.append(build!("item", ns::DISCO_ITEMS, "jid" => self.muc_domain(), "name" => "groups").build()),
        }
        q.build()
    }

    // ------------------------------------------------------------------ for the other modules

    pub(super) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }
    pub(super) fn user(&self) -> &str {
        self.me()
    }
    pub(super) fn jid(&self) -> String {
        self.full_jid()
    }
    pub(super) fn bare_of(&self, user: &str) -> String {
        self.bare(user)
    }
    pub(super) fn room_jid(&self, conv: &str) -> String {
        self.conv_jid(conv)
    }
    pub(super) fn muc_service(&self) -> String {
        self.muc_domain()
    }
    pub(super) fn send_el(&mut self, el: &Element) -> bool {
        self.write(el, 0)
    }
    pub(super) fn is_pre_auth(&self) -> bool {
        self.phase == Phase::Sasl
    }
}

impl Handler<super::sm::Park> for XmppSession {
    type Result = ();
    fn handle(&mut self, _: super::sm::Park, ctx: &mut Self::Context) {
        // Resumed elsewhere: park now (stopped() stores the counters), without a word on this
        // connection, which is presumed dead.
        self.closing = true;
        let _ = self.link.tx.try_send(Out::Close(self.ended_by));
        ctx.stop();
    }
}

impl ops::TypingTimers for XmppSession {
    fn composing(&mut self) -> &mut HashMap<String, SpawnHandle> {
        &mut self.composing
    }
    fn typing_expired(&mut self, conv: &str) {
        let me = self.me().to_owned();
        ops::relay_typing(&self.shared, &ops::others_in(&self.shared, &me, conv), &me, conv, TypingState::Paused);
    }
}

impl Actor for XmppSession {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        metrics::gauge!("parley_sockets_open").increment(1.0);
        metrics::gauge!("parley_xmpp_streams_open").increment(1.0);
        ctx.run_later(self.shared.cfg.hello_timeout(), |act, ctx| {
            if act.phase != Phase::Ready {
                act.stream_error("connection-timeout", "authenticate and bind in time", ctx);
            }
        });
        ctx.run_interval(Duration::from_millis(100), |act, _| {
            if act.sm.is_some() {
                act.request_ack();
            } else {
                act.confirm();
            }
        });
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        metrics::gauge!("parley_sockets_open").decrement(1.0);
        metrics::gauge!("parley_xmpp_streams_open").decrement(1.0);
        self.shared.sockets.fetch_sub(1, Ordering::Relaxed);
        self.shared.sessions.remove(&self.id);
        let _ = self.link.tx.try_send(Out::Close(self.ended_by));
        if !self.watching.is_empty() {
            self.shared.presence.unwatch(self.id, &self.watching);
        }
        if self.device.is_some() {
            let me = self.me().to_owned();
            let convs: Vec<String> = self.composing.drain().map(|(c, _)| c).collect();
            for c in convs {
                ops::relay_typing(&self.shared, &ops::others_in(&self.shared, &me, &c), &me, &c, TypingState::Paused);
            }
            self.shared.registry.do_send(Disconnect { user: me.clone(), session: self.id });
            self.park();
            // What the writer wrote before the end is delivered; then the stream's token goes.
            let (shared, written, token, device) = (self.shared.clone(), self.link.written.clone(), self.token, self.device.clone());
            let cursor_sent = self.cursor_sent;
            // With stream management only acks confirm: what was written but not acked stays
            // after the cursor (resent on the next resume or login).
            let managed = self.sm.is_some();
            actix_rt::spawn(async move {
                // Give the writer a moment to finish its last write.
                tokio::time::sleep(Duration::from_millis(50)).await;
                let w = if managed { 0 } else { written.load(Ordering::Acquire) };
                if let (true, Some(device)) = (w > cursor_sent, device) {
                    let _ = shared.pipeline.call(Command::Received { user: me, device, up_to: w }).await;
                }
                if let Some(t) = token {
                    let _ = shared.pipeline.call(Command::Logout { token_hash: t }).await;
                }
            });
        }
    }
}

impl Handler<In> for XmppSession {
    type Result = ();
    fn handle(&mut self, m: In, ctx: &mut Self::Context) {
        if self.closing {
            return;
        }
        match m {
            In::Open(el) => self.on_open(el, ctx),
            In::Stanza(el) => {
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.on_stanza(el, ctx)));
                if r.is_err() {
                    metrics::counter!("parley_session_restarts_total").increment(1);
                    self.stream_error("internal-server-error", "internal error", ctx);
                }
            }
            In::Close => {
                self.clean_end = true;
                self.end_stream(ctx)
            }
            In::Error(e) => self.stream_error(e.condition, &e.text, ctx),
            In::Gone => {
                self.closing = true;
                ctx.stop();
            }
            In::Secured => {
                self.secure = true;
                self.phase = Phase::Start;
                self.header_sent = false;
            }
        }
    }
}

impl Handler<Deliver> for XmppSession {
    type Result = ();
    fn handle(&mut self, m: Deliver, ctx: &mut Self::Context) {
        if self.closing || m.ev <= self.last_sent {
            return;
        }
        self.target = self.target.max(m.ev);
        if self.available && m.ev == self.last_sent + 1 && !self.pump_later {
            if self.emit(m.ev, &m.payload) {
                return;
            }
        }
        self.pump(ctx);
    }
}

impl Handler<Relay> for XmppSession {
    type Result = ();
    fn handle(&mut self, m: Relay, _: &mut Self::Context) {
        if !self.available || self.closing {
            return;
        }
        match &*m.0 {
            ServerFrame::Typing { conv, from, state } => {
                let group = conv.starts_with("g:");
                let sender = if group { format!("{}/{from}", self.conv_jid(conv)) } else { self.bare(from) };
                let st = if *state == TypingState::Composing { "composing" } else { "paused" };
                let el = build!("message", ns::CLIENT, "from" => sender, "to" => self.full_jid(), "type" => if group { "groupchat" } else { "chat" })
                    .append(empty(st, ns::CHATSTATES))
                    .build();
                self.write(&el, 0);
            }
            ServerFrame::Presence { user, online, last_seen } => {
                let p = self.presence_of(user, *online, *last_seen);
                self.write(&p, 0);
            }
            _ => {}
        }
    }
}

impl Handler<Kick> for XmppSession {
    type Result = ();
    fn handle(&mut self, m: Kick, ctx: &mut Self::Context) {
        let cond = if m.code == crate::protocol::close::GOING_AWAY { "system-shutdown" } else { "not-authorized" };
        self.stream_error(cond, m.reason, ctx);
    }
}

impl Handler<StopTyping> for XmppSession {
    type Result = ();
    fn handle(&mut self, m: StopTyping, ctx: &mut Self::Context) {
        if let Some(h) = self.composing.remove(&m.conv) {
            ctx.cancel_future(h);
            let me = self.me().to_owned();
            ops::relay_typing(&self.shared, &ops::others_in(&self.shared, &me, &m.conv), &me, &m.conv, TypingState::Paused);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resources_become_devices() {
        assert_eq!(device_of(Some("Gajim.Laptop")), "gajim.laptop");
        assert_eq!(device_of(Some("phone 2")), "phone-2");
        assert_eq!(device_of(Some("-x")), "xx");
        assert!(device_of(None).starts_with("xmpp-"));
        assert_eq!(device_of(Some(&"a".repeat(40))).len(), 32);
    }

    #[test]
    fn stanza_ids_become_client_ids() {
        assert_eq!(client_id(Some("m1")), "m1");
        let long = "z".repeat(100);
        assert_eq!(client_id(Some(&long)), client_id(Some(&long)));
        assert!(client_id(Some(&long)).len() <= 64);
        assert_ne!(client_id(None), client_id(None));
    }
}
