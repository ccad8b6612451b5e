//! Overload, faults and limits (PROTOCOL.md §5; issue 4): the send rate limit, failed logins per
//! address, bad-frame floods, slow consumers, heartbeats, admission control, unauthenticated
//! sockets, supervision of session handlers, storage faults, and graceful shutdown under load.
//!
//! Every test sets the limits it exercises explicitly (the harness raises the send rate limit for
//! all the others). Waits are for conditions (a frame, a close, a metric, a health status) under
//! generous timeouts; times are measured and printed, and any bound on a count is computed from
//! the measured elapsed time, so a slow machine does not fail a test.
//!
//! The helpers at the top (a raw WebSocket that reads only when told, HTTP with headers, metrics,
//! the server's pid and RSS) are shared with [`crate::ops`].

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::os::unix::ffi::OsStrExt;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use parley::protocol::codec::decode_server_json;
use parley::protocol::{close, ClientFrame, ErrorCode, EventPayload, MessageView, Request, ServerFrame};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

use crate::common::{dialog, http, read_incoming, turns, within, Client, Incoming, Server, TestDir, PASSWORD, T};

// ---------------------------------------------------------------------------------- helpers

/// A WebSocket for clients that misbehave on purpose: it sends raw text frames, and it reads
/// (and so answers pings) only when told to, so a test can stop reading while the TCP
/// connection stays open.
pub(crate) struct Raw {
    ws: WebSocketStream<TcpStream>,
}

impl Raw {
    /// Opens `/v1/ws`; panics when the upgrade is refused.
    pub(crate) async fn open(addr: SocketAddr) -> Raw {
        let tcp = within(T, "TCP connect", TcpStream::connect(addr)).await.expect("connect");
        Raw::upgrade(addr, tcp).await
    }

    /// Opens `/v1/ws` over a socket whose receive buffer is `bytes` (set before connecting, so
    /// the kernel does not grow it): a peer that stops reading backs the server up quickly.
    pub(crate) async fn open_small(addr: SocketAddr, bytes: u32) -> Raw {
        let s = TcpSocket::new_v4().expect("socket");
        s.set_recv_buffer_size(bytes).expect("SO_RCVBUF");
        let tcp = within(T, "TCP connect", s.connect(addr)).await.expect("connect");
        Raw::upgrade(addr, tcp).await
    }

    async fn upgrade(addr: SocketAddr, tcp: TcpStream) -> Raw {
        let url = format!("ws://{addr}/v1/ws");
        let (ws, _) = within(T, "the WebSocket upgrade", tokio_tungstenite::client_async(url.as_str(), tcp)).await.expect("upgrade");
        Raw { ws }
    }

    /// Sends one text frame as is.
    pub(crate) async fn text(&mut self, s: &str) -> Result<(), String> {
        within(T, "a frame to be written", self.ws.send(Message::text(s.to_owned()))).await.map_err(|e| e.to_string())
    }

    /// Sends a JSON frame.
    pub(crate) async fn json(&mut self, v: Value) {
        self.text(&v.to_string()).await.expect("WebSocket send")
    }

    /// Sends `hello`.
    pub(crate) async fn hello(&mut self, token: &str, cursor: Option<u64>) {
        let mut f = json!({"type": "hello", "token": token});
        if let Some(c) = cursor {
            f["cursor"] = json!(c);
        }
        self.json(f).await
    }

    /// The next frame or the close within `d` (`None` on timeout). Reading answers pings.
    pub(crate) async fn next_within(&mut self, d: Duration) -> Option<Incoming> {
        let deadline = tokio::time::Instant::now() + d;
        read_incoming(&mut self.ws, deadline, parley::protocol::Encoding::Json).await.map(|(i, _)| i)
    }

    /// The next frame; panics on a close or after [`T`].
    pub(crate) async fn recv(&mut self) -> ServerFrame {
        match self.next_within(T).await {
            Some(Incoming::Frame(f)) => f,
            Some(Incoming::Closed(c)) => panic!("the socket closed ({c:?}) while a frame was expected"),
            None => panic!("no frame within {T:?}"),
        }
    }

    /// `welcome`, the backlog and `synced` after a `hello`: (head, backlog events).
    pub(crate) async fn sync(&mut self) -> (u64, Vec<(u64, EventPayload)>) {
        let head = match self.recv().await {
            ServerFrame::Welcome { head, .. } => head,
            f => panic!("expected welcome, got {f:?}"),
        };
        let mut events = Vec::new();
        loop {
            match self.recv().await {
                ServerFrame::Event { ev, payload } => events.push((ev, payload)),
                ServerFrame::Synced { head: h } => {
                    assert_eq!(h, head, "synced.head differs from welcome.head");
                    return (head, events);
                }
                f => panic!("expected a backlog event or synced, got {f:?}"),
            }
        }
    }

    /// Waits for the `ack` of send `id`, passing over events; panics on its `error`.
    pub(crate) async fn ack(&mut self, id: &str) -> u64 {
        loop {
            match self.recv().await {
                ServerFrame::Ack { id: i, seq, .. } if i == id => return seq,
                ServerFrame::Error { id: Some(i), code, message, .. } if i == id => panic!("send {id} failed: {code:?} {message}"),
                ServerFrame::Event { .. } | ServerFrame::Presence { .. } | ServerFrame::Typing { .. } => {}
                f => panic!("waiting for the ack of {id}, got {f:?}"),
            }
        }
    }

    /// Reads until the socket closes: the frames before the close and its code.
    pub(crate) async fn until_closed(&mut self) -> (Vec<ServerFrame>, Option<u16>) {
        let mut frames = Vec::new();
        loop {
            match self.next_within(T).await {
                Some(Incoming::Frame(f)) => frames.push(f),
                Some(Incoming::Closed(c)) => return (frames, c),
                None => panic!("the socket did not close within {T:?}; frames: {frames:?}"),
            }
        }
    }

    /// A read request answered after this socket's earlier frames took effect.
    pub(crate) async fn barrier(&mut self) {
        self.json(json!({"type": "conversations", "rid": "barrier"})).await;
        loop {
            match self.recv().await {
                ServerFrame::Conversations { rid, .. } if rid.as_deref() == Some("barrier") => return,
                ServerFrame::Event { .. } | ServerFrame::Presence { .. } | ServerFrame::Typing { .. } => {}
                f => panic!("waiting for the barrier, got {f:?}"),
            }
        }
    }

    /// Closes normally and waits for the server's close frame.
    pub(crate) async fn close(mut self) {
        let _ = self.ws.close(None).await;
        let _ = tokio::time::timeout(T, async {
            while let Some(Ok(m)) = self.ws.next().await {
                if matches!(m, Message::Close(_)) {
                    break;
                }
            }
        })
        .await;
    }
}

/// An HTTP reply.
pub(crate) struct Reply {
    pub status: u16,
    /// Header names in lower case, in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub(crate) fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    /// The value of header `name` (lower case), if present.
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One HTTP/1.1 request (`Connection: close`) with extra headers; the status and body.
pub(crate) async fn http_full(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Reply {
    within(T, &format!("{method} {path}"), async {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
        if !body.is_empty() {
            req.push_str("Content-Type: application/json\r\n");
        }
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        req.push_str(body);
        s.write_all(req.as_bytes()).await.expect("write request");
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.expect("read response");
        let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("end of headers");
        let head = String::from_utf8_lossy(&raw[..split]).to_string();
        let mut lines = head.split("\r\n");
        let status: u16 = lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|s| s.parse().ok()).expect("status");
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let mut body = raw[split + 4..].to_vec();
        if headers.iter().any(|(k, v)| k == "transfer-encoding" && v.contains("chunked")) {
            body = dechunk(&body);
        }
        Reply { status, headers, body }
    })
    .await
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = b.windows(2).position(|w| w == b"\r\n") {
        let n = usize::from_str_radix(String::from_utf8_lossy(&b[..eol]).trim(), 16).unwrap_or(0);
        if n == 0 || b.len() < eol + 2 + n {
            break;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + n]);
        b = &b[(eol + 4 + n).min(b.len())..];
    }
    out
}

/// `GET /metrics` (Prometheus text).
pub(crate) async fn metrics(addr: SocketAddr) -> String {
    let r = http_full(addr, "GET", "/metrics", &[], "").await;
    assert_eq!(r.status, 200, "GET /metrics");
    r.text()
}

/// The sum of the samples of series `name` (exact name, any labels) whose label set contains
/// every string of `labels`; `None` when there is no such sample.
pub(crate) fn metric(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    let mut sum = None;
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
        let Some((series, value)) = line.rsplit_once(' ') else { continue };
        let (n, l) = match series.find('{') {
            Some(i) => (&series[..i], &series[i..]),
            None => (series, ""),
        };
        if n == name && labels.iter().all(|want| l.contains(want)) {
            let v: f64 = value.trim().parse().unwrap_or_else(|_| panic!("metric line {line}"));
            sum = Some(sum.unwrap_or(0.0) + v);
        }
    }
    sum
}

/// The pid of the server serving `dir` (found by its command line: `serve ... --data DIR/data`).
pub(crate) fn server_pid(dir: &TestDir) -> u32 {
    let data = dir.data();
    let want = data.as_os_str().as_bytes();
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else { continue };
        let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
        if args.contains(&&b"serve"[..]) && args.contains(&want) {
            return pid;
        }
    }
    panic!("no server process for {}", data.display())
}

/// Resident set size of `pid`, in KiB (`VmRSS` of /proc/PID/status).
pub(crate) fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS")
}

/// A `kB` field of /proc/PID/status (`VmRSS`, `VmHWM`, ...), in KiB.
fn status_kib(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    s.lines()
        .find_map(|l| l.strip_prefix(field).and_then(|r| r.strip_prefix(':')))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
}

/// Waits for `user`'s presence with `online` on a watcher's socket; returns its `last_seen`.
pub(crate) async fn presence(c: &mut Client, user: &str, online: bool) -> Option<u64> {
    c.until(&format!("presence of {user} online={online}"), |f| match f {
        ServerFrame::Presence { user: u, online: o, last_seen } if u == user && *o == online => Some(*last_seen),
        _ => None,
    })
    .await
}

/// The next message event on `c` passing over other frames (stashed); returns (ev, message).
pub(crate) async fn message_from(c: &mut Client, id: &str) -> (u64, MessageView) {
    c.until(&format!("the message {id}"), |f| match f {
        ServerFrame::Event { ev, payload: EventPayload::Message(m) } if m.id == id => Some((*ev, m.clone())),
        _ => None,
    })
    .await
}

/// Real chat turns joined with newlines into one long message of at least `min` bytes (someone
/// pasting a long text); `k` picks where in the corpus it starts.
fn long_body(k: usize, min: usize) -> String {
    let t = turns();
    let mut s = String::new();
    let mut i = k.wrapping_mul(7919);
    while s.len() < min {
        if !s.is_empty() {
            s.push('\n');
        }
        s.push_str(&t[i % t.len()]);
        i += 1;
    }
    while s.len() > parley::protocol::MAX_BODY_BYTES {
        s.pop();
    }
    s
}

/// A `send` frame.
fn send(id: &str, to: &str, body: &str) -> ClientFrame {
    ClientFrame::Send { id: id.to_owned(), to: to.to_owned(), body: body.to_owned() }
}

/// Replies to sends, by id: the ack's (conv, seq) or the error code.
type Outcomes = BTreeMap<String, Result<(String, u64), ErrorCode>>;

/// Reads `c` until every id of `ids` has its ack or error; other frames are passed over
/// (stashed). Returns the outcomes and the order in which the replies came.
async fn replies(c: &mut Client, ids: &[String]) -> (Outcomes, Vec<String>) {
    let mut out = Outcomes::new();
    let mut order = Vec::new();
    let want: BTreeSet<&String> = ids.iter().collect();
    while out.len() < ids.len() {
        let (id, r) = c
            .until("the reply to a send", |f| match f {
                ServerFrame::Ack { id, conv, seq, .. } if want.contains(id) => Some((id.clone(), Ok((conv.clone(), *seq)))),
                ServerFrame::Error { id: Some(id), code, .. } if want.contains(id) => Some((id.clone(), Err(*code))),
                _ => None,
            })
            .await;
        assert!(out.insert(id.clone(), r).is_none(), "two replies to send {id}");
        order.push(id);
    }
    (out, order)
}

/// Checks that every acked id is in `history` exactly once with its acked seq, and that no id
/// appears twice. Returns the ids in the history.
fn exactly_once(history: &[MessageView], acked: &BTreeMap<String, (String, u64)>, conv: &str) -> BTreeSet<String> {
    let mut seen = BTreeMap::new();
    for m in history {
        if let Some(prev) = seen.insert(m.id.clone(), m.seq) {
            panic!("{conv}: message {} stored twice (seq {prev} and {})", m.id, m.seq);
        }
    }
    for (id, (c, seq)) in acked.iter().filter(|(_, (c, _))| c == conv) {
        assert_eq!(seen.get(id), Some(seq), "{c}: acked message {id} (seq {seq}) is not in the history at that seq");
    }
    seen.into_keys().collect()
}

// ---------------------------------------------------------------------------------- 1. send rate

/// PROTOCOL.md §5: a user over its send rate gets `error rate_limited` with the `id`, and its
/// socket stays; another user's messages keep flowing; resends answered from the dedup record
/// do not spend the rate limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_rate_limit_refuses_only_the_flooder_and_resends_do_not_count() {
    const RATE: f64 = 20.0;
    const BURST: f64 = 40.0;
    const FLOOD: usize = 300;
    let dir = TestDir::new();
    let env = [("PARLEY__LIMITS__SEND_RATE_PER_S", "20"), ("PARLEY__LIMITS__SEND_BURST", "40")];
    let srv = Server::start_with(&dir, &env).await;
    let a = srv.user("alice").await;
    let b = srv.user("bob").await;
    let c = srv.user("carol").await;
    let mut alice = srv.connect(&a, None).await.client;
    let mut bob = srv.connect(&b, None).await.client;
    let t = dialog(41, 10 + FLOOD);
    let start = Instant::now();

    // Ten messages, acked: the bucket holds at least 30 tokens after them.
    let mut acked: BTreeMap<String, (String, u64)> = BTreeMap::new();
    for (k, body) in t[..10].iter().enumerate() {
        let id = format!("a{k}");
        let (conv, seq, _) = alice.send_acked(&id, "bob", body).await;
        acked.insert(id, (conv, seq));
    }
    // 500 resends of them, as fast as the socket takes them: every one is answered with the
    // original ack. Were they counted, all but about 40 + 20/s would be refused.
    let t_resend = Instant::now();
    let mut resend_ids = Vec::new();
    for round in 0..50 {
        for k in 0..10 {
            alice.send_rid(&format!("r{round}-{k}"), send(&format!("a{k}"), "bob", &t[k])).await;
            resend_ids.push(format!("r{round}-{k}"));
        }
    }
    let mut answered = 0;
    while answered < resend_ids.len() {
        match alice.recv().await {
            ServerFrame::Ack { rid: Some(rid), id, conv, seq, .. } => {
                let k: usize = rid.rsplit('-').next().and_then(|s| s.parse().ok()).expect("rid");
                assert_eq!(id, format!("a{k}"));
                assert_eq!(acked[&id], (conv, seq), "a resend of {id} is answered with its original ack");
                answered += 1;
            }
            ServerFrame::Event { .. } => {}
            f => panic!("a resend got {f:?} instead of its original ack"),
        }
    }
    println!("rate limit: 500 resends answered from the dedup record in {:?}", t_resend.elapsed());

    // The flood, while carol sends to bob at her own pace: her messages are all acked.
    let carol_task = {
        let (addr, c, turns) = (srv.addr, c.clone(), dialog(42, 20));
        tokio::spawn(async move {
            let mut carol = Client::connect(addr, &c, None, parley::protocol::Encoding::Json).await.client;
            let mut seqs = Vec::new();
            for (k, body) in turns.iter().enumerate() {
                seqs.push(carol.send_acked(&format!("c{k}"), "bob", body).await.1);
            }
            seqs
        })
    };
    let ids: Vec<String> = (0..FLOOD).map(|k| format!("f{k}")).collect();
    for (id, body) in ids.iter().zip(&t[10..]) {
        alice.send_msg(id, "bob", body).await;
    }
    let (out, order) = replies(&mut alice, &ids).await;
    let elapsed = start.elapsed().as_secs_f64();
    assert_eq!(order, ids, "replies come in request order");
    let flood_acked = out.values().filter(|r| r.is_ok()).count();
    let limited: Vec<&String> = out.iter().filter(|(_, r)| matches!(r, Err(ErrorCode::RateLimited))).map(|(id, _)| id).collect();
    assert_eq!(flood_acked + limited.len(), FLOOD, "every flood message is acked or rate_limited: {out:?}");
    let cap = BURST + RATE * elapsed + 1.0;
    println!("rate limit: flood of {FLOOD}: {flood_acked} acked, {} rate_limited; new sends acked in total {} over {elapsed:.2} s (cap {cap:.0})", limited.len(), 10 + flood_acked);
    assert!(flood_acked >= 30, "resends spent the bucket: only {flood_acked} of the flood were acked (≥ 30 expected)");
    assert!((10 + flood_acked) as f64 <= cap, "{} new sends acked in {elapsed:.2} s: over burst {BURST} + {RATE}/s", 10 + flood_acked);
    assert!(!limited.is_empty(), "no send was rate limited ({flood_acked} acked in {elapsed:.2} s)");
    for (id, r) in &out {
        if let Ok(a) = r {
            acked.insert(id.clone(), a.clone());
        }
    }
    // The flooder's socket stays open and usable.
    alice.barrier().await;
    let carol_seqs = within(T, "carol's sends", carol_task).await.expect("carol's task");
    assert_eq!(carol_seqs.len(), 20, "every message of the second user was acked");

    // bob got exactly the acked messages: nothing refused was stored or delivered.
    let h = bob.history_all("dm:alice:bob").await;
    let stored = exactly_once(&h, &acked, "dm:alice:bob");
    assert_eq!(stored, acked.keys().cloned().collect(), "the conversation holds exactly the acked messages");
    let hc = bob.history_all("dm:bob:carol").await;
    assert_eq!(hc.len(), 20);
    let m = metrics(srv.addr).await;
    let counted = metric(&m, "parley_rate_limited_total", &["what=\"send\""]).unwrap_or(0.0);
    assert_eq!(counted as usize, limited.len(), "parley_rate_limited_total{{what=\"send\"}}");
}

// ---------------------------------------------------------------------------------- 2. logins

/// After `failed_login_burst` wrong passwords from one address, even the right password gets
/// `429 rate_limited` (JSON body) with a `Retry-After` of when a token is back (1 per minute
/// here: 1..=60 s); a successful login does not spend the budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_per_address_are_limited_even_for_the_right_password() {
    let dir = TestDir::new();
    let env = [("PARLEY__LIMITS__FAILED_LOGIN_BURST", "5"), ("PARLEY__LIMITS__FAILED_LOGINS_PER_MIN", "1")];
    let srv = Server::start_with(&dir, &env).await;
    srv.register("alice").await;
    let token = srv.login("alice", "web").await;
    let login = |password: &str| json!({"user": "alice", "password": password, "device": "web"});
    for k in 0..4 {
        let (st, body) = http(srv.addr, "POST", "/v1/login", Some(&login(&format!("wrong password {k}"))), None).await;
        assert_eq!((st, body["error"].as_str()), (401, Some("unauthorized")), "wrong password {k}: {body}");
    }
    // A success in between does not count as a failure.
    let (st, body) = http(srv.addr, "POST", "/v1/login", Some(&login(PASSWORD)), None).await;
    assert_eq!(st, 200, "the right password before the limit: {body}");
    let (st, body) = http(srv.addr, "POST", "/v1/login", Some(&login("wrong password 4")), None).await;
    assert_eq!((st, body["error"].as_str()), (401, Some("unauthorized")), "the 5th wrong password: {body}");
    // The bucket is empty now (refill: 1 per minute).
    let r = http_full(srv.addr, "POST", "/v1/login", &[], &login(PASSWORD).to_string()).await;
    let (st, body) = (r.status, r.json());
    assert_eq!(st, 429, "the right password after 5 failures: {body}");
    let retry = r.header("retry-after").unwrap_or_else(|| panic!("a 429 without Retry-After: {:?}", r.headers));
    let retry: u64 = retry.parse().unwrap_or_else(|_| panic!("Retry-After {retry:?} is not whole seconds"));
    assert!((1..=60).contains(&retry), "Retry-After {retry} s with 1 token per minute");
    assert_eq!(body["error"], "rate_limited", "{body}");
    assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    let (st, body) = http(srv.addr, "POST", "/v1/login", Some(&json!({"user": "nobody", "password": "whatever1"})), None).await;
    assert_eq!((st, body["error"].as_str()), (429, Some("rate_limited")), "{body}");
    // Tokens already given out keep working: the limit is on logins only.
    let s = srv.connect(&token, None).await;
    assert_eq!(s.user, "alice");
    let m = metrics(srv.addr).await;
    assert_eq!(metric(&m, "parley_rate_limited_total", &["what=\"login\""]), Some(2.0));
}

/// Concurrent wrong guesses from one address are limited as sequential ones are: each takes its
/// failed-login token before the password is checked, so of 40 sent at once at most the burst
/// (5) are checked and the rest get 429; the right password is then refused too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_wrong_passwords_are_limited_like_sequential_ones() {
    let dir = TestDir::new();
    let env = [("PARLEY__LIMITS__FAILED_LOGIN_BURST", "5"), ("PARLEY__LIMITS__FAILED_LOGINS_PER_MIN", "1")];
    let srv = Server::start_with(&dir, &env).await;
    srv.register("alice").await;
    let guesses = (0..40).map(|k| {
        let body = json!({"user": "alice", "password": format!("wrong password {k}"), "device": "web"});
        async move { http(srv.addr, "POST", "/v1/login", Some(&body), None).await.0 }
    });
    let statuses = futures_util::future::join_all(guesses).await;
    let checked = statuses.iter().filter(|&&st| st == 401).count();
    let limited = statuses.iter().filter(|&&st| st == 429).count();
    assert_eq!(checked + limited, 40, "only 401 and 429: {statuses:?}");
    assert!(checked <= 5, "{checked} of 40 concurrent guesses were checked, with a burst of 5: {statuses:?}");
    let (st, body) = http(srv.addr, "POST", "/v1/login", Some(&json!({"user": "alice", "password": PASSWORD, "device": "web"})), None).await;
    assert_eq!((st, body["error"].as_str()), (429, Some("rate_limited")), "the right password after the burst: {body}");
}

/// Registrations refused because every hash slot is busy get a `503 overloaded` with a
/// `Retry-After`, as logins do (one slot, no wait: of 12 at once some are refused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_refused_for_busy_hash_slots_says_when_to_retry() {
    let dir = TestDir::new();
    let env = [("PARLEY__AUTH__MAX_CONCURRENT_HASHES", "1"), ("PARLEY__AUTH__HASH_WAIT_MS", "0"), ("PARLEY__AUTH__ARGON2_MEMORY_KIB", "65536")];
    let srv = Server::start_with(&dir, &env).await;
    let tries = (0..12).map(|k| {
        let body = json!({"user": format!("user{k}"), "password": PASSWORD}).to_string();
        async move { http_full(srv.addr, "POST", "/v1/register", &[], &body).await }
    });
    let replies = futures_util::future::join_all(tries).await;
    let refused: Vec<_> = replies.iter().filter(|r| r.status == 503).collect();
    assert!(replies.iter().all(|r| r.status == 201 || r.status == 503), "{:?}", replies.iter().map(|r| r.status).collect::<Vec<_>>());
    assert!(!refused.is_empty(), "12 registrations at once through one slot with no wait: none refused");
    for r in refused {
        assert_eq!(r.json()["error"], "overloaded", "{}", r.text());
        assert_eq!(r.header("retry-after"), Some("1"), "a 503 says when to retry: {:?}", r.headers);
    }
}

// ---------------------------------------------------------------------------------- 3. bad frames

/// Malformed frames each get `error bad_frame` and the socket stays, up to
/// `bad_frames_per_min`; one more closes with 4003.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_bad_frames_closes_4003_and_fewer_keep_the_socket() {
    let dir = TestDir::new();
    let srv = Server::start_with(&dir, &[("PARLEY__LIMITS__BAD_FRAMES_PER_MIN", "10")]).await;
    let a = srv.user("alice").await;
    srv.register("bob").await;
    let bad = [
        "not json at all",
        "[1, 2, 3]",
        "{}",
        r#"{"type":"nope"}"#,
        r#"{"type":"send","id":"x1"}"#,
        r#"{"type":"send","id":7,"to":"bob","body":"hi"}"#,
        r#"{"type":"received","up_to":"ten"}"#,
        "42",
        r#"{"type":"history"}"#,
        r#"{"type":"watch","users":"bob"}"#,
    ];
    let mut s = Raw::open(srv.addr).await;
    s.hello(&a, None).await;
    s.sync().await;
    for f in bad {
        s.text(f).await.expect("send");
        match s.recv().await {
            ServerFrame::Error { code: ErrorCode::BadFrame, .. } => {}
            other => panic!("{f} got {other:?}, not error bad_frame"),
        }
    }
    // Ten bad frames (the limit): the socket is open and works.
    s.barrier().await;
    s.json(json!({"type": "send", "id": "ok1", "to": "bob", "body": dialog(3, 1)[0]})).await;
    s.ack("ok1").await;
    // The eleventh within the minute closes with 4003.
    s.text("{\"type\":\"send\"").await.expect("send");
    let (frames, code) = s.until_closed().await;
    let frames: Vec<_> = frames.into_iter().filter(|f| !matches!(f, ServerFrame::Event { .. })).collect();
    assert_eq!(code, Some(close::VIOLATION), "frames before the close: {frames:?}");
    let m = metrics(srv.addr).await;
    assert_eq!(metric(&m, "parley_bad_frames_total", &[]), Some(11.0));
}

/// A first frame that is not a well-formed `hello` (no token, a cursor that is not a number, not
/// an object) is answered with an `error bad_frame` saying what was wrong, then closed with 4003
/// (PROTOCOL.md 3.1); a token is never looked up for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_hello_is_told_why_before_the_close() {
    let dir = TestDir::new();
    let srv = Server::start(&dir).await;
    let a = srv.user("alice").await;
    let cases = [
        (r#"{"type":"hello","rid":"h1"}"#.to_owned(), "token"),
        (json!({"type": "hello", "token": a, "cursor": "0"}).to_string(), "expected u64"),
        (json!({"type": "hello", "token": a, "cursor": -1}).to_string(), "expected u64"),
        ("[1]".to_owned(), "JSON object"),
    ];
    for (text, names) in &cases {
        let mut s = Raw::open(srv.addr).await;
        s.text(text).await.expect("send");
        let (frames, code) = s.until_closed().await;
        assert_eq!(code, Some(close::VIOLATION), "{text}: frames before the close: {frames:?}");
        match frames.as_slice() {
            [ServerFrame::Error { code: ErrorCode::BadFrame, message, .. }] => {
                assert!(message.contains(names), "{text}: the error names {names}: {message}")
            }
            other => panic!("{text}: expected one error bad_frame before the close, got {other:?}"),
        }
    }
    // The rid of a hello without its token is echoed, like any request's.
    let mut s = Raw::open(srv.addr).await;
    s.text(r#"{"type":"hello","rid":"h1"}"#).await.expect("send");
    assert!(matches!(s.recv().await, ServerFrame::Error { rid: Some(r), .. } if r == "h1"));
    // The same token in a well-formed hello works.
    let mut s = Raw::open(srv.addr).await;
    s.hello(&a, None).await;
    s.sync().await;
}

// ---------------------------------------------------------------------------------- 4. slow consumer

/// The size of the long messages of the slow-consumer tests.
const LONG: usize = 8 * 1024;

/// alice sends `n` long messages to bob (their bodies appended to `to_bob`, so body `k` has id
/// `b{k}`); returns their ids.
async fn long_to_bob(alice: &mut Client, to_bob: &mut Vec<String>, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for _ in 0..n {
        let k = to_bob.len();
        let body = long_body(k, LONG);
        let id = format!("b{k}");
        alice.send_msg(&id, "bob", &body).await;
        to_bob.push(body);
        ids.push(id);
    }
    ids
}

/// Waits until every send of `ids` is acked (an error fails) and alice's own event of each has
/// come; drops the frames passed over. Waiting for both keeps alice's own queue short.
async fn acked_and_echoed(alice: &mut Client, ids: &[String]) {
    let (out, _) = replies(alice, ids).await;
    assert!(out.values().all(|r| r.is_ok()), "alice's sends: {out:?}");
    for id in ids {
        message_from(alice, id).await;
    }
    alice.take_stash();
}

/// A device that stops reading while messages keep coming: the server closes it with 4008 once
/// its outbound queue is full (memory held for it stays small), other clients' traffic and
/// delivery go on, and when the device comes back with its stored cursor it gets every message,
/// in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_is_closed_4008_others_flow_and_it_resyncs_everything() {
    slow_consumer(false).await
}

/// The slow device, when it reads again, gets the close frame 4008 after the frames that were
/// already on their way (PROTOCOL.md §5: "close 4008 (slow consumer)"), so it can tell why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_that_reads_again_gets_the_close_frame_4008() {
    slow_consumer(true).await
}

/// The slow-consumer scenario; `close_frame`: also require the close frame 4008 on the stuck
/// socket once it reads again (without it, the 4008 close is observed from the server side:
/// `parley_slow_consumer_closes_total` and the device's presence).
async fn slow_consumer(close_frame: bool) {
    let dir = TestDir::new();
    let env = [
        ("PARLEY__SESSION__OUTBOUND_QUEUE_FRAMES", "16"),
        ("PARLEY__SESSION__OUTBOUND_QUEUE_BYTES", "4194304"),
        ("PARLEY__STORAGE__CACHE_BYTES", "4194304"),
    ];
    let srv = Server::start_with(&dir, &env).await;
    let a = srv.user("alice").await;
    let b = srv.user("bob").await;
    let c = srv.user("carol").await;
    let mut alice = srv.connect(&a, None).await.client;
    let mut carol = srv.connect(&c, None).await.client;
    // carol watches bob: the server's own view of bob's socket.
    carol.send(ClientFrame::Watch { users: vec!["bob".into()] }).await;
    presence(&mut carol, "bob", false).await;

    let mut bob = Raw::open_small(srv.addr, 4096).await;
    bob.hello(&b, None).await;
    assert_eq!(bob.sync().await.0, 0);
    presence(&mut carol, "bob", true).await;

    // bob reads the first five live and confirms three: his stored cursor is 3.
    let mut to_bob: Vec<String> = Vec::new();
    let first = long_to_bob(&mut alice, &mut to_bob, 5).await;
    acked_and_echoed(&mut alice, &first).await;
    for k in 0..5 {
        match bob.recv().await {
            ServerFrame::Event { ev, payload: EventPayload::Message(m) } => assert_eq!((ev, m.id.as_str()), (k as u64 + 1, format!("b{k}").as_str())),
            f => panic!("expected bob's message {k}, got {f:?}"),
        }
    }
    bob.json(json!({"type": "received", "up_to": 3})).await;
    bob.barrier().await;
    // Warm-up: twice sled's cache (4 MiB here) of the same traffic to carol, who reads it, so
    // that the caches and the allocator have grown before the measurement.
    for w in 0..128 {
        let ids: Vec<String> = (0..8).map(|i| format!("w{w}-{i}")).collect();
        for (i, id) in ids.iter().enumerate() {
            alice.send_msg(id, "carol", &long_body(w * 8 + i, LONG)).await;
        }
        acked_and_echoed(&mut alice, &ids).await;
        for id in &ids {
            message_from(&mut carol, id).await;
        }
    }
    let pid = server_pid(&dir);
    let rss_before = rss_kib(pid);

    // bob stops reading (his TCP connection stays open). alice keeps sending to him, 4 at a
    // time, and one message to carol per round, which carol gets live. (alice waits for her
    // acks and her own events each round: with a 16-frame queue, more pipelined sends would
    // overflow her own queue; see
    // `members_reading_as_fast_as_they_can_survive_a_group_burst_within_the_default_limits`.)
    let t_stuck = Instant::now();
    let mut rss_peak = rss_before;
    let mut round = 0;
    loop {
        let mut ids = long_to_bob(&mut alice, &mut to_bob, 4).await;
        let cid = format!("c{round}");
        alice.send_msg(&cid, "carol", &dialog(round, 1)[0]).await;
        ids.push(cid.clone());
        acked_and_echoed(&mut alice, &ids).await;
        message_from(&mut carol, &cid).await;
        rss_peak = rss_peak.max(rss_kib(pid));
        round += 1;
        let m = metrics(srv.addr).await;
        if metric(&m, "parley_slow_consumer_closes_total", &[]).unwrap_or(0.0) >= 1.0 {
            break;
        }
        assert!(to_bob.len() < 5000, "bob was never closed as a slow consumer after {} messages", to_bob.len());
    }
    let closed_after = t_stuck.elapsed();
    let sent_while_stuck = to_bob.len() - 5;
    // The server let bob go: carol sees him offline while he still has not read a byte.
    presence(&mut carol, "bob", false).await;
    // More traffic while bob's socket is still stuck: it is stored, not buffered for him.
    for _ in 0..64 {
        let ids = long_to_bob(&mut alice, &mut to_bob, 4).await;
        acked_and_echoed(&mut alice, &ids).await;
        rss_peak = rss_peak.max(rss_kib(pid));
    }
    let rss_stuck = rss_kib(pid);
    let bytes_to_bob: usize = to_bob[5..].iter().map(|b| b.len()).sum();
    println!(
        "slow consumer: closed 4008 after {sent_while_stuck} messages ({} KiB) in {closed_after:?}; {} messages ({} KiB) sent to bob while stuck in all; server RSS before {rss_before} KiB, peak {rss_peak} KiB, stuck {rss_stuck} KiB (+{} KiB)",
        to_bob[5..5 + sent_while_stuck].iter().map(|b| b.len()).sum::<usize>() / 1024,
        to_bob.len() - 5,
        bytes_to_bob / 1024,
        rss_peak.saturating_sub(rss_before)
    );
    // Allocator and sled noise is a few MiB; a server that kept what it could not deliver would
    // grow by at least what was sent.
    assert!(
        rss_peak.saturating_sub(rss_before) < (bytes_to_bob / 1024) as u64,
        "the server's memory grew by {} KiB while {} KiB were sent to a reader that does not read",
        rss_peak.saturating_sub(rss_before),
        bytes_to_bob / 1024
    );

    // bob reads again: what the buffers held, in order without gaps, then the close 4008.
    let (frames, code) = bob.until_closed().await;
    let mut next = 6;
    for f in &frames {
        match f {
            ServerFrame::Event { ev, payload: EventPayload::Message(m) } => {
                assert_eq!(*ev, next, "events to the slow socket are in order without gaps");
                assert_eq!(m.body, to_bob[*ev as usize - 1]);
                next += 1;
            }
            f => panic!("unexpected frame on the slow socket: {f:?}"),
        }
    }
    println!("slow consumer: the stuck socket still delivered {} events from the buffers, then closed with {code:?}", frames.len());
    if close_frame {
        assert_eq!(code, Some(close::SLOW_CONSUMER), "the slow socket's close code (after {} buffered events)", frames.len());
    }

    // Back with the stored cursor (3): every message from the 4th on, in order.
    let s = srv.connect(&b, None).await;
    let got: Vec<(u64, MessageView)> = s.messages();
    assert_eq!(got.first().map(|(ev, _)| *ev), Some(4), "the resync starts after the stored cursor 3");
    assert_eq!(got.len(), to_bob.len() - 3);
    for (ev, m) in &got {
        assert_eq!((m.seq, &m.body), (*ev, &to_bob[*ev as usize - 1]), "message ev {ev} after the resync");
    }
    // carol's conversation went on meanwhile.
    let mut bobc = s.client;
    let h = bobc.history_all("dm:alice:bob").await;
    assert_eq!(h.len(), to_bob.len());
    assert_eq!(carol.history_all("dm:alice:carol").await.len(), round + 128 * 8);
}

/// A reply larger than `outbound_queue_bytes` to an idle client that reads (a history page of
/// long messages: up to 200 × 64 KiB, over the default 4 MiB) is sent whole or shortened with
/// `more: true`; the socket is not closed as a slow consumer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_history_page_larger_than_the_outbound_byte_cap_does_not_close_the_socket() {
    const N: u64 = 80;
    let dir = TestDir::new();
    let srv = Server::start(&dir).await;
    let a = srv.user("alice").await;
    let b = srv.user("bob").await;
    let mut alice = srv.connect(&a, None).await.client;
    let mut total = 0;
    for k in 0..N as usize {
        let body = long_body(k, 60_000);
        total += body.len();
        alice.send_acked(&format!("l{k}"), "bob", &body).await;
        alice.take_stash();
    }
    // bob is up to date (cursor = head): his queue is empty when he asks.
    let mut bob = srv.connect(&b, Some(N)).await.client;
    bob.send_rid("big", ClientFrame::History { conv: "dm:alice:bob".into(), before: None, limit: Some(200) }).await;
    match bob.next().await {
        Incoming::Frame(ServerFrame::History { messages, more, .. }) => {
            let seqs: Vec<u64> = messages.iter().map(|m| m.seq).collect();
            assert_eq!(seqs.last(), Some(&N), "the newest page ends at the last message");
            assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1));
            assert_eq!(more, seqs[0] > 1, "more iff older messages exist");
        }
        other => panic!("history of {N} messages ({} KiB) answered by {other:?}", total / 1024),
    }
}

/// Reads a socket as fast as frames come until `acks` acks and `events` message events have
/// arrived; panics on a close. Returns how long it took.
async fn read_fast(
    mut rx: futures_util::stream::SplitStream<WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>>,
    who: String,
    acks: usize,
    events: usize,
) -> Duration {
    let t0 = Instant::now();
    let (mut a, mut e) = (0, 0);
    while a < acks || e < events {
        let m = match within(T, &format!("{who}'s frames ({a} acks, {e} events so far)"), rx.next()).await {
            Some(Ok(m)) => m,
            other => panic!("{who}: the socket ended after {a} acks and {e} events: {other:?}"),
        };
        match m {
            Message::Text(t) => match decode_server_json(t.as_str()).expect("frame") {
                ServerFrame::Ack { .. } => a += 1,
                ServerFrame::Event { payload: EventPayload::Message(_), .. } => e += 1,
                ServerFrame::Error { code, message, .. } => panic!("{who}: error {code:?} {message}"),
                _ => {}
            },
            Message::Close(c) => panic!("{who}, reading as fast as it can, was closed after {a} acks and {e} events: {c:?}"),
            _ => {}
        }
    }
    t0.elapsed()
}

/// A client that reads as fast as frames come is not a slow consumer. Within the default limits
/// (send rate 50/s, burst 100; outbound queue 1,024 frames), 11 members of a group each send
/// their burst of 100 at once: every member, reading continuously, must get all 1,100 messages
/// (and the senders their 100 acks) without being closed with 4008.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_reading_as_fast_as_they_can_survive_a_group_burst_within_the_default_limits() {
    const USERS: usize = 12;
    const BURST: usize = 100;
    let dir = TestDir::new();
    let env = [("PARLEY__LIMITS__SEND_RATE_PER_S", "50"), ("PARLEY__LIMITS__SEND_BURST", "100")];
    let srv = Server::start_with(&dir, &env).await;
    let names: Vec<String> = (0..USERS).map(|i| format!("u{i}")).collect();
    let mut tokens = Vec::new();
    for n in &names {
        tokens.push(srv.user(n).await);
    }
    let mut owner = srv.connect(&tokens[0], None).await.client;
    let group = match owner.request("g", ClientFrame::GroupCreate { name: "burst".into(), members: names[1..].to_vec() }).await {
        ServerFrame::Result { group: Some(g), .. } => g,
        f => panic!("group_create: {f:?}"),
    };
    owner.close().await;
    let t = dialog(44, 64);
    let mut readers = Vec::new();
    let mut writers = Vec::new();
    for (i, n) in names.iter().enumerate() {
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/v1/ws", srv.addr)).await.expect("connect");
        let (mut tx, mut rx) = ws.split();
        tx.send(Message::text(json!({"type": "hello", "token": tokens[i]}).to_string())).await.expect("hello");
        while !matches!(within(T, "synced", rx.next()).await, Some(Ok(Message::Text(ref s))) if s.contains("\"synced\"")) {}
        let acks = if i == 0 { 0 } else { BURST };
        readers.push(tokio::spawn(read_fast(rx, n.clone(), acks, (USERS - 1) * BURST)));
        writers.push(tx);
    }
    // Every sender writes its whole burst at once.
    let bursts = writers.iter_mut().enumerate().skip(1).map(|(i, tx)| {
        let frames: Vec<Result<Message, tungstenite::Error>> = (0..BURST)
            .map(|k| Ok(Message::text(json!({"type": "send", "id": format!("p{k}"), "to": group, "body": t[(i * 7 + k) % t.len()]}).to_string())))
            .collect();
        async move { tx.send_all(&mut futures_util::stream::iter(frames)).await.expect("send the burst") }
    });
    futures_util::future::join_all(bursts).await;
    for (n, r) in names.iter().zip(readers) {
        let took = within(T, "a reader", r).await.unwrap_or_else(|e| panic!("{n}: {e}"));
        println!("group burst: {n} got every frame in {took:?}");
    }
}

// ---------------------------------------------------------------------------------- 5. heartbeats

/// With pings every 200 ms and a 600 ms timeout, a peer that answers nothing is closed with
/// 1001 and shown offline to its watchers; a peer that answers pings stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_peer_is_reaped_after_the_ping_timeout() {
    let dir = TestDir::new();
    let env = [("PARLEY__SESSION__PING_INTERVAL_MS", "200"), ("PARLEY__SESSION__PING_TIMEOUT_MS", "600")];
    let srv = Server::start_with(&dir, &env).await;
    let a = srv.user("alice").await;
    let b = srv.user("bob").await;
    let c = srv.user("carol").await;
    // alice reads all the time (answering pings) and gets no frame: she must stay connected.
    let addr = srv.addr;
    let alice_task = tokio::spawn(async move {
        let mut alice = Client::connect(addr, &a, None, parley::protocol::Encoding::Json).await.client;
        let quiet = alice.next_within(Duration::from_millis(3000)).await;
        assert!(quiet.is_none(), "alice (answering pings) got {quiet:?}");
        alice.barrier().await;
    });
    // carol watches bob, reading all the time too.
    let mut carol = srv.connect(&c, None).await.client;
    carol.send(ClientFrame::Watch { users: vec!["bob".into()] }).await;
    presence(&mut carol, "bob", false).await;

    let mut bob = Raw::open(srv.addr).await;
    let t0 = Instant::now();
    bob.hello(&b, None).await;
    bob.sync().await;
    // From now on bob reads nothing, so he answers no ping.
    presence(&mut carol, "bob", true).await;
    presence(&mut carol, "bob", false).await;
    let reaped = t0.elapsed();
    println!("heartbeat: a silent peer was shown offline {reaped:?} after its last frame (interval 200 ms, timeout 600 ms)");
    assert!(reaped >= Duration::from_millis(600), "reaped after {reaped:?}, before the 600 ms timeout");
    assert!(reaped < Duration::from_secs(5), "reaped only after {reaped:?}");
    let (frames, code) = bob.until_closed().await;
    assert_eq!(code, Some(close::GOING_AWAY), "frames: {frames:?}");
    within(T, "alice's task", alice_task).await.expect("alice stays connected while answering pings");
}

// ---------------------------------------------------------------------------------- 6. admission

/// Refuses `/v1/ws` upgrades above `upgrades_per_s`/`upgrade_burst` and above `max_sockets` with
/// HTTP 503 and a `Retry-After` of 1..=`retry_after_max_s` seconds, before the upgrade; health
/// checks keep answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_control_answers_503_with_retry_after_before_the_upgrade() {
    async fn try_upgrade(addr: SocketAddr) -> Result<WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>, (u16, Option<u64>, Value)> {
        let url = format!("ws://{addr}/v1/ws");
        match within(T, "an upgrade", tokio_tungstenite::connect_async(url.as_str())).await {
            Ok((ws, resp)) => {
                assert_eq!(resp.status().as_u16(), 101);
                Ok(ws)
            }
            Err(tungstenite::Error::Http(resp)) => {
                let retry = resp.headers().get("retry-after").map(|v| v.to_str().expect("ascii").parse::<u64>().expect("Retry-After is an integer"));
                let body: Value = resp.body().as_deref().and_then(|b| serde_json::from_slice(b).ok()).unwrap_or(Value::Null);
                Err((resp.status().as_u16(), retry, body))
            }
            Err(e) => panic!("upgrade failed otherwise: {e}"),
        }
    }
    fn check_refusal(r: &(u16, Option<u64>, Value), max: u64) {
        let (status, retry, body) = r;
        assert_eq!(*status, 503, "refused upgrade: {body}");
        let retry = retry.unwrap_or_else(|| panic!("503 without Retry-After: {body}"));
        assert!((1..=max).contains(&retry), "Retry-After {retry} is not in 1..={max}");
        assert_eq!(body["error"], "overloaded", "{body}");
    }

    // The rate of new connections: 5/s, burst 5.
    let dir = TestDir::new();
    let env = [
        ("PARLEY__ADMISSION__UPGRADES_PER_S", "5"),
        ("PARLEY__ADMISSION__UPGRADE_BURST", "5"),
        ("PARLEY__ADMISSION__RETRY_AFTER_MAX_S", "3"),
    ];
    let srv = Server::start_with(&dir, &env).await;
    let t0 = Instant::now();
    let upgrades = futures_util::future::join_all((0..20).map(|_| try_upgrade(srv.addr)));
    let health = futures_util::future::join_all((0..5).map(|_| http(srv.addr, "GET", "/v1/healthz", None, None)));
    let (results, health) = tokio::join!(upgrades, health);
    let elapsed = t0.elapsed().as_secs_f64();
    let ok = results.iter().filter(|r| r.is_ok()).count();
    let refused: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    let retry: Vec<u64> = refused.iter().filter_map(|r| r.1).collect();
    println!("admission: 20 upgrades at once: {ok} accepted, {} refused (Retry-After {retry:?}) in {elapsed:.2} s", refused.len());
    for r in &refused {
        check_refusal(r, 3);
    }
    assert!(ok >= 5, "the burst of 5 is accepted: {ok}");
    assert!(ok as f64 <= 5.0 + 5.0 * elapsed + 1.0, "{ok} upgrades accepted in {elapsed:.2} s at 5/s, burst 5");
    assert!(!refused.is_empty());
    for (st, body) in &health {
        assert_eq!((*st, body["status"].as_str()), (200, Some("ok")), "healthz during the burst: {body}");
    }
    let m = metrics(srv.addr).await;
    assert_eq!(metric(&m, "parley_admission_rejections_total", &[]), Some(refused.len() as f64));
    drop(results);

    // The number of open sockets: 3.
    let dir2 = TestDir::new();
    let srv2 = Server::start_with(&dir2, &[("PARLEY__ADMISSION__MAX_SOCKETS", "3"), ("PARLEY__ADMISSION__RETRY_AFTER_MAX_S", "3")]).await;
    let token = srv2.user("alice").await;
    let first = srv2.connect(&token, None).await.client;
    let mut raws = vec![Raw::open(srv2.addr).await, Raw::open(srv2.addr).await];
    // The server counts a socket when its session starts, just after the upgrade: wait for 3.
    let deadline = Instant::now() + T;
    loop {
        let (st, body) = http(srv2.addr, "GET", "/v1/healthz", None, None).await;
        assert_eq!(st, 200, "{body}");
        if body["sockets"].as_u64() == Some(3) {
            break;
        }
        assert!(Instant::now() < deadline, "healthz never counted 3 sockets: {body}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let r = try_upgrade(srv2.addr).await.err().expect("the 4th socket is refused");
    check_refusal(&r, 3);
    // One closes: a new socket is accepted once the server has counted it out.
    raws.pop().expect("raw").close().await;
    let deadline = Instant::now() + T;
    let again = loop {
        match try_upgrade(srv2.addr).await {
            Ok(ws) => break ws,
            Err(r) => {
                check_refusal(&r, 3);
                assert!(Instant::now() < deadline, "no socket accepted after one of 3 closed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    drop((again, first, raws));
}

/// The XMPP upgrade (`/xmpp-websocket`, RFC 7395) has the same admission control as `/v1/ws`:
/// over `admission.upgrades_per_s` it gets `503 overloaded` with a `Retry-After`, not a bare
/// error a client cannot time its retry by.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_xmpp_upgrade_gets_503_with_retry_after() {
    use tungstenite::client::IntoClientRequest;
    let dir = TestDir::new();
    let env = [
        ("PARLEY__ADMISSION__UPGRADES_PER_S", "0.1"),
        ("PARLEY__ADMISSION__UPGRADE_BURST", "1"),
        ("PARLEY__ADMISSION__RETRY_AFTER_MAX_S", "30"),
    ];
    let srv = Server::start_with(&dir, &env).await;
    let upgrade = || async {
        let mut req = format!("ws://{}/xmpp-websocket", srv.addr).into_client_request().expect("a request");
        req.headers_mut().insert("sec-websocket-protocol", "xmpp".parse().expect("a header value"));
        within(T, "an XMPP upgrade", tokio_tungstenite::connect_async(req)).await
    };
    let first = upgrade().await;
    assert!(first.is_ok(), "the burst's one upgrade: {:?}", first.err());
    match upgrade().await {
        Err(tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status().as_u16(), 503);
            let retry = resp.headers().get("retry-after").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
            assert!(retry.is_some_and(|r| (1..=30).contains(&r)), "Retry-After {retry:?} (one slot every 10 s, at most 30)");
            let body: Value = resp.body().as_deref().and_then(|b| serde_json::from_slice(b).ok()).unwrap_or(Value::Null);
            assert_eq!(body["error"], "overloaded", "{body}");
        }
        other => panic!("the second upgrade within 10 s was not refused with 503: {:?}", other.map(|_| "accepted")),
    }
}

// ---------------------------------------------------------------------------------- 7. before hello

/// A socket that sends no `hello` within `hello_timeout_ms` is closed with 4002; a frame larger
/// than `unauth_max_frame_bytes` before `hello` closes with 1009, one at the limit is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_sockets_time_out_4002_and_big_frames_close_1009() {
    let dir = TestDir::new();
    let srv = Server::start_with(&dir, &[("PARLEY__SESSION__HELLO_TIMEOUT_MS", "300")]).await;
    let mut s = Raw::open(srv.addr).await;
    let t0 = Instant::now();
    let (frames, code) = s.until_closed().await;
    let took = t0.elapsed();
    println!("hello timeout: closed {code:?} after {took:?} (hello_timeout_ms 300)");
    assert_eq!((frames.len(), code), (0, Some(close::HELLO_TIMEOUT)), "{frames:?}");
    assert!(took >= Duration::from_millis(250), "closed after {took:?}, before the hello timeout");

    // Frame size before hello (default limit 16 KiB), on a server with the default hello timeout.
    let dir2 = TestDir::new();
    let srv2 = Server::start(&dir2).await;
    let token = srv2.user("alice").await;
    srv2.register("bob").await;
    let padded_hello = |total: usize| {
        let base = json!({"type": "hello", "token": token, "pad": ""}).to_string();
        json!({"type": "hello", "token": token, "pad": "x".repeat(total - base.len())}).to_string()
    };
    let limit = 16 * 1024;
    let mut big = Raw::open(srv2.addr).await;
    let f = padded_hello(limit + 1);
    assert_eq!(f.len(), limit + 1);
    big.text(&f).await.expect("send");
    let (frames, code) = big.until_closed().await;
    assert_eq!((frames.len(), code), (0, Some(close::TOO_BIG)), "{frames:?}");

    let mut at_limit = Raw::open(srv2.addr).await;
    let f = padded_hello(limit);
    assert_eq!(f.len(), limit);
    at_limit.text(&f).await.expect("send");
    assert_eq!(at_limit.sync().await.0, 0, "a hello of exactly the limit is accepted");
    // After hello the limit is max_frame_bytes: a 40 KB message is fine.
    let body = long_body(1, 40_000);
    at_limit.json(json!({"type": "send", "id": "long", "to": "bob", "body": body})).await;
    at_limit.ack("long").await;
}

// ---------------------------------------------------------------------------------- 8. supervision

/// A panic in a session's handler restarts it from storage on the same socket (welcome, backlog
/// from the durable cursor, synced); other sessions go on; more than `restart_intensity`
/// restarts within `restart_period_ms` close with 1011; nothing is lost.
#[cfg(feature = "fault-injection")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_session_restarts_from_storage_and_too_many_close_1011() {
    let dir = TestDir::new();
    let env = [("PARLEY__SESSION__RESTART_INTENSITY", "3"), ("PARLEY__SESSION__RESTART_PERIOD_MS", "60000")];
    let srv = Server::start_with(&dir, &env).await;
    let a = srv.user("alice").await;
    let b = srv.user("bob").await;
    let t = dialog(8, 40);
    let panic_frame = || ClientFrame::Fault { what: "panic".into(), count: 0 };
    let mut alice = srv.connect(&a, None).await.client;
    let mut bob = srv.connect(&b, None).await.client;
    let mut acked: BTreeMap<String, (String, u64)> = BTreeMap::new();
    // The next `n` messages of alice to bob: (id, body).
    let mut next = 0;
    let mut batch = |n: usize| -> Vec<(String, String)> {
        (0..n)
            .map(|_| {
                next += 1;
                (format!("a{next}"), t[next % 30].clone())
            })
            .collect()
    };
    for (id, body) in batch(5) {
        let (conv, seq, _) = alice.send_acked(&id, "bob", &body).await;
        acked.insert(id, (conv, seq));
    }
    for ev in 1..=5 {
        assert_eq!(bob.message_event().await.0, ev);
    }
    bob.send(ClientFrame::Received { up_to: 3 }).await;
    bob.barrier().await;

    // Restart 1: the same socket resyncs from the durable cursor 3.
    bob.send(panic_frame()).await;
    let s = bob.sync(Some(3)).await;
    assert_eq!((s.head, s.backlog.len()), (5, 2), "welcome head and backlog after a restart");
    let mut bob = s.client;
    // alice was not affected: her sends are acked and reach bob live.
    for (id, body) in batch(3) {
        let (conv, seq, _) = alice.send_acked(&id, "bob", &body).await;
        acked.insert(id.clone(), (conv, seq));
        assert_eq!(message_from(&mut bob, &id).await.1.body, body);
    }

    // Restart 2, with a send of bob's in flight: it is stored at most once.
    bob.send_msg("b1", "alice", &t[30]).await;
    bob.send(panic_frame()).await;
    bob.until("synced after restart 2", |f| matches!(f, ServerFrame::Synced { .. }).then_some(())).await;
    let stash = bob.take_stash();
    assert!(matches!(stash.first(), Some(ServerFrame::Welcome { .. }) | Some(ServerFrame::Ack { .. })), "restart 2 begins with welcome: {stash:?}");
    let (conv, seq, _) = bob.send_acked("b1", "alice", &t[30]).await;
    acked.insert("b1".into(), (conv, seq));

    // Restart 3: still within the intensity.
    bob.send(panic_frame()).await;
    bob.until("synced after restart 3", |f| matches!(f, ServerFrame::Synced { .. }).then_some(())).await;
    bob.take_stash();
    // Restart 4 within the period: more than 3, the socket closes with 1011.
    bob.send(panic_frame()).await;
    let (frames, code) = bob.until_closed().await;
    assert_eq!(code, Some(close::INTERNAL), "frames before the close: {frames:?}");

    // alice still works; bob reconnects and nothing is lost.
    for (id, body) in batch(2) {
        let (conv, seq, _) = alice.send_acked(&id, "bob", &body).await;
        acked.insert(id, (conv, seq));
    }
    let s = srv.connect(&b, None).await;
    assert_eq!(s.messages().first().map(|(ev, _)| *ev), Some(4), "bob resumes after his stored cursor 3");
    let mut bob = s.client;
    let h = bob.history_all("dm:alice:bob").await;
    let stored = exactly_once(&h, &acked, "dm:alice:bob");
    assert_eq!(stored, acked.keys().cloned().collect());
    let m = metrics(srv.addr).await;
    assert_eq!(metric(&m, "parley_session_restarts_total", &[]), Some(4.0));
}

// ---------------------------------------------------------------------------------- 9. storage faults

/// Commits that fail like a full disk: the sends get `error unavailable` (never `ack`),
/// `/v1/healthz` answers 503 while storage fails, the server recovers by itself, and every acked
/// message is stored exactly once; resends of the failed ones are acked consistently.
#[cfg(feature = "fault-injection")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_faults_answer_unavailable_then_the_server_recovers_by_itself() {
    // 6 failures: the failed commit, then recovery attempts after 50, 100, 200, 400, 800 ms:
    // storage is unwritable for about 1.5 s.
    const FAILURES: u32 = 6;
    let dir = TestDir::new();
    let mut srv = Server::start(&dir).await;
    let a = srv.user("alice").await;
    let b = srv.user("bob").await;
    let t = dialog(9, 30);
    let mut alice = srv.connect(&a, None).await.client;
    let mut bob = srv.connect(&b, None).await.client;
    let mut acked: BTreeMap<String, (String, u64)> = BTreeMap::new();
    for k in 0..5 {
        let id = format!("m{k}");
        let (conv, seq, _) = alice.send_acked(&id, "bob", &t[k]).await;
        acked.insert(id, (conv, seq));
    }

    let reply = alice.request("fault", ClientFrame::Fault { what: "storage".into(), count: FAILURES }).await;
    assert!(matches!(reply, ServerFrame::Result { .. }), "{reply:?}");
    let failing: Vec<String> = (5..8).map(|k| format!("m{k}")).collect();
    for (k, id) in failing.iter().enumerate() {
        alice.send_msg(id, "bob", &t[5 + k]).await;
    }
    let (out, _) = replies(&mut alice, &failing).await;
    for (id, r) in &out {
        assert_eq!(r, &Err(ErrorCode::Unavailable), "send {id} while the disk is full");
    }
    // Health says so while it lasts, then recovers without help.
    let t0 = Instant::now();
    let mut seen_503 = None;
    loop {
        let (st, body) = http(srv.addr, "GET", "/v1/healthz", None, None).await;
        match (st, seen_503.is_some()) {
            (503, _) => {
                assert_eq!(body["status"], "storage_unavailable", "{body}");
                seen_503.get_or_insert(t0.elapsed());
            }
            (200, true) => break,
            // The commit thread answers the failed batch just before it marks storage unhealthy:
            // a health check in that instant still says ok. The 503 must come (within ~1.5 s).
            (200, false) => {}
            (st, _) => panic!("healthz {st}: {body}"),
        }
        assert!(t0.elapsed() < T, "within {T:?}: healthz never said 503 while storage failed, or storage did not recover (503 seen at {seen_503:?})");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!("storage fault: healthz 503 seen at {:?}, 200 again after {:?}", seen_503, t0.elapsed());

    // Recovered: new sends are acked, and the failed ones are acked on resend, each once.
    for k in 8..12 {
        let id = format!("m{k}");
        let (conv, seq, _) = alice.send_acked(&id, "bob", &t[k]).await;
        acked.insert(id, (conv, seq));
    }
    for (k, id) in failing.iter().enumerate() {
        let (conv, seq, _) = alice.send_acked(id, "bob", &t[5 + k]).await;
        acked.insert(id.clone(), (conv.clone(), seq));
        // A second resend gets the same ack.
        assert_eq!(alice.send_acked(id, "bob", &t[5 + k]).await.1, seq);
    }
    // bob got each stored message once, live, in seq order.
    let mut got = Vec::new();
    while got.len() < acked.len() {
        let (_, m) = bob.message_event().await;
        got.push(m);
    }
    for (i, m) in got.iter().enumerate() {
        assert_eq!(m.seq, i as u64 + 1, "bob's live messages: {:?}", got.iter().map(|m| (&m.id, m.seq)).collect::<Vec<_>>());
    }
    let h = bob.history_all("dm:alice:bob").await;
    assert_eq!(exactly_once(&h, &acked, "dm:alice:bob"), acked.keys().cloned().collect());
    let m = metrics(srv.addr).await;
    assert!(metric(&m, "parley_commit_failures_total", &[]).unwrap_or(0.0) >= 1.0, "parley_commit_failures_total");

    // And the data directory is sound: after a restart everything is there once.
    srv.sigterm();
    assert_eq!(srv.wait_exit().await.code(), Some(0));
    srv.restart().await;
    let mut bob = srv.connect(&b, None).await.client;
    let h2 = bob.history_all("dm:alice:bob").await;
    assert_eq!(h2, h, "the history after a restart");
}

// ---------------------------------------------------------------------------------- 10. shutdown

/// SIGTERM as soon as the server says it listens (a supervisor stopping it right after a
/// start) is a graceful shutdown too: exit 0, not death by the signal. Tried 20 times, since
/// the window is short.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_right_after_the_listening_line_is_graceful() {
    use tokio::io::AsyncBufReadExt;
    let dir = TestDir::new();
    let link = dir.path().join("it-sigterm");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_parley"), &link).expect("symlink");
    let mut killed = 0;
    for i in 0..20 {
        let mut child = tokio::process::Command::new(&link)
            .args(["serve", "--listen", "127.0.0.1:0", "--data"])
            .arg(dir.path().join(format!("data-{i}")))
            .env("PARLEY__XMPP__LISTEN", "")
            .env_remove("RUST_LOG")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn");
        let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
        within(T, "the listening line", async {
            while let Ok(Some(l)) = lines.next_line().await {
                if l.starts_with("parley listening on") {
                    return;
                }
            }
            panic!("exited before listening");
        })
        .await;
        // SAFETY: kill(2) on our own child, not reaped yet.
        assert_eq!(unsafe { libc::kill(child.id().expect("pid") as i32, libc::SIGTERM) }, 0);
        let st = within(T, "the exit", child.wait()).await.expect("wait");
        if st.code() != Some(0) {
            killed += 1;
        }
    }
    assert_eq!(killed, 0, "{killed} of 20 servers died of a SIGTERM sent right after their listening line");
}

/// What one sending client saw until the server closed it.
struct LoadRun {
    acked: BTreeMap<String, (String, u64)>,
    goaway: Option<u64>,
    frames_after_goaway: usize,
    close: Option<u16>,
}

/// Sends to `to` in windows of 4 until the server says `goaway` and closes; each ack is
/// reported on `tick`.
async fn load_client(mut c: Client, me: String, to: String, tick: tokio::sync::mpsc::UnboundedSender<()>) -> LoadRun {
    let t = dialog(me.len() * 31, 64);
    let mut run = LoadRun { acked: BTreeMap::new(), goaway: None, frames_after_goaway: 0, close: None };
    let mut k = 0;
    loop {
        let mut pending = BTreeSet::new();
        if run.goaway.is_none() {
            for _ in 0..4 {
                let id = format!("{me}-{k}");
                let req = Request { rid: None, frame: send(&id, &to, &t[k % t.len()]) };
                k += 1;
                if c.try_send_req(req).await.is_err() {
                    break;
                }
                pending.insert(id);
            }
        }
        loop {
            let f = match c.next().await {
                Incoming::Closed(code) => {
                    run.close = code;
                    return run;
                }
                Incoming::Frame(f) => f,
            };
            if run.goaway.is_some() {
                run.frames_after_goaway += 1;
            }
            match f {
                ServerFrame::Ack { id, conv, seq, .. } => {
                    pending.remove(&id);
                    run.acked.insert(id, (conv, seq));
                    let _ = tick.send(());
                }
                ServerFrame::Goaway { retry_after_ms, .. } => run.goaway = Some(retry_after_ms),
                ServerFrame::Error { id: Some(id), code, message, .. } => panic!("{me}: send {id} failed: {code:?} {message}"),
                _ => {}
            }
            if pending.is_empty() && run.goaway.is_none() {
                break;
            }
        }
    }
}

/// SIGTERM while clients send: each gets `goaway` (with a `retry_after_ms` within the shutdown
/// window) as its last frame, then 1001; the process exits 0; after a restart every acked
/// message is there exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_says_goaway_to_everyone_and_keeps_every_acked_message() {
    const SHUTDOWN_MS: u64 = 4000;
    let users = ["ann", "ben", "cat", "dan"];
    let dir = TestDir::new();
    let mut srv = Server::start_with(&dir, &[("PARLEY__SERVER__SHUTDOWN_TIMEOUT_MS", "4000")]).await;
    let mut tokens = Vec::new();
    for u in users {
        tokens.push(srv.user(u).await);
    }
    let (tick, mut ticks) = tokio::sync::mpsc::unbounded_channel();
    let mut tasks = Vec::new();
    for (i, u) in users.iter().enumerate() {
        let c = srv.connect(&tokens[i], None).await.client;
        let to = users[(i + 1) % users.len()].to_owned();
        tasks.push(tokio::spawn(load_client(c, u.to_string(), to, tick.clone())));
    }
    drop(tick);
    for _ in 0..200 {
        within(T, "acks under load", ticks.recv()).await.expect("a client ended early");
    }
    srv.sigterm();
    let mut acked = BTreeMap::new();
    let mut delays = Vec::new();
    for (u, task) in users.iter().zip(tasks) {
        let run = within(T, "a client to be closed", task).await.expect("client task");
        let g = run.goaway.unwrap_or_else(|| panic!("{u} got no goaway (close {:?})", run.close));
        assert!(g < SHUTDOWN_MS, "{u}: goaway retry_after_ms {g} is past the shutdown window of {SHUTDOWN_MS} ms");
        assert_eq!(run.frames_after_goaway, 0, "{u}: goaway is the last frame before the close");
        assert_eq!(run.close, Some(close::GOING_AWAY), "{u}: the close after goaway");
        delays.push(g);
        acked.extend(run.acked);
    }
    let status = srv.wait_exit().await;
    assert_eq!(status.code(), Some(0), "exit status after SIGTERM: {status:?}");
    println!("shutdown under load: {} messages acked; goaway retry_after_ms {delays:?}", acked.len());

    srv.restart().await;
    let mut c = srv.connect(&tokens[0], None).await.client;
    let mut total = 0;
    for conv in ["dm:ann:ben", "dm:ann:dan"] {
        let h = c.history_all(conv).await;
        exactly_once(&h, &acked, conv);
        total += h.len();
    }
    let mut c2 = srv.connect(&tokens[2], None).await.client;
    for conv in ["dm:ben:cat", "dm:cat:dan"] {
        let h = c2.history_all(conv).await;
        exactly_once(&h, &acked, conv);
        total += h.len();
    }
    assert!(total >= acked.len(), "{total} stored, {} acked", acked.len());
}

/// The server end of the TCP connection from local port `client_port` to the server on
/// `server_port`: its state in /proc/net/tcp (hex, "01" = established), if it exists.
pub(crate) fn server_side_tcp(server_port: u16, client_port: u16) -> Option<(String, u64, u64)> {
    let t = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    for l in t.lines().skip(1) {
        let f: Vec<&str> = l.split_whitespace().collect();
        let port = |s: &str| u16::from_str_radix(s.rsplit(':').next().unwrap_or(""), 16).unwrap_or(0);
        if port(f[1]) == server_port && port(f[2]) == client_port {
            let (tx, rx) = f[4].split_once(':').unwrap_or(("0", "0"));
            return Some((f[3].to_owned(), u64::from_str_radix(tx, 16).unwrap_or(0), u64::from_str_radix(rx, 16).unwrap_or(0)));
        }
    }
    None
}

/// How the session of a peer that has stopped reading ends, in [`stuck_connection_is_released`].
#[derive(Debug, Clone, Copy)]
enum StuckEnd {
    /// The server closes it as a slow consumer (4008).
    SlowConsumer,
    /// The peer sends a close frame (and still reads nothing).
    PeerCloses,
    /// The peer shuts down its write side (and still reads nothing).
    PeerShutsDown,
}

/// After closing a slow consumer (4008), the server lets go of its TCP connection within a
/// bounded time even if the peer never reads again: otherwise every stuck peer keeps a
/// connection and megabytes of send buffer forever, uncounted by `admission.max_sockets`
/// (the session, and so the socket count, is gone) and unreachable by the heartbeat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumers_connection_is_released_even_if_it_never_reads_again() {
    stuck_connection_is_released(StuckEnd::SlowConsumer).await;
}

/// The same when the peer that stopped reading ends the session itself, with a close frame or by
/// shutting its write side: the server answers, stops the session, and must still cut the
/// connection off once `session.slow_close_wait_ms` has passed (a fresh-user trial found such
/// connections held forever, 5 MB each).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_readers_connection_is_released_after_it_closes_or_shuts_down() {
    stuck_connection_is_released(StuckEnd::PeerCloses).await;
    stuck_connection_is_released(StuckEnd::PeerShutsDown).await;
}

async fn stuck_connection_is_released(end: StuckEnd) {
    let dir = TestDir::new();
    // The slow consumer gets a short queue, so that it is closed soon; a peer that ends its own
    // session gets the default queue (1,024 frames, 4 MiB), which fills with the messages below
    // without a 4008 coming first.
    let env: &[(&str, &str)] = match end {
        StuckEnd::SlowConsumer => &[("PARLEY__SESSION__OUTBOUND_QUEUE_FRAMES", "16"), ("PARLEY__SESSION__SLOW_CLOSE_WAIT_MS", "2000")],
        StuckEnd::PeerCloses | StuckEnd::PeerShutsDown => &[
            ("PARLEY__SESSION__SLOW_CLOSE_WAIT_MS", "2000"),
            ("PARLEY__LIMITS__SEND_RATE_PER_S", "10000"),
            ("PARLEY__LIMITS__SEND_BURST", "10000"),
        ],
    };
    let srv = Server::start_with(&dir, env).await;
    let a = srv.user("alice").await;
    let b = srv.user("bob").await;
    let mut alice = srv.connect(&a, None).await.client;
    let mut bob = Raw::open_small(srv.addr, 4096).await;
    let bob_port = bob.ws.get_ref().local_addr().expect("local address").port();
    bob.hello(&b, None).await;
    bob.sync().await;
    // bob reads no more.
    let mut to_bob = Vec::new();
    match end {
        // alice sends until the server closes him as a slow consumer.
        StuckEnd::SlowConsumer => loop {
            let ids = long_to_bob(&mut alice, &mut to_bob, 4).await;
            acked_and_echoed(&mut alice, &ids).await;
            if metric(&metrics(srv.addr).await, "parley_slow_consumer_closes_total", &[]).unwrap_or(0.0) >= 1.0 {
                break;
            }
            assert!(to_bob.len() < 5000, "bob was never closed as a slow consumer");
        },
        // 160 messages of ~64 KB (10 MB) fill the socket and leave frames queued behind it,
        // well within the slow-consumer timeout; then bob ends the session himself.
        StuckEnd::PeerCloses | StuckEnd::PeerShutsDown => {
            for batch in 0..40 {
                let mut ids = Vec::new();
                for i in 0..4 {
                    let id = format!("big{batch}-{i}");
                    alice.send_msg(&id, "bob", &long_body(batch * 4 + i, 60_000)).await;
                    ids.push(id);
                }
                acked_and_echoed(&mut alice, &ids).await;
            }
            match end {
                StuckEnd::PeerCloses => within(T, "bob's close frame", bob.ws.send(Message::Close(None))).await.expect("close frame"),
                _ => within(T, "bob's shutdown", bob.ws.get_mut().shutdown()).await.expect("shutdown"),
            }
        }
    }
    let t0 = Instant::now();
    let first = server_side_tcp(srv.addr.port(), bob_port);
    while let Some(state) = server_side_tcp(srv.addr.port(), bob_port) {
        if t0.elapsed() >= T {
            let aborted = metric(&metrics(srv.addr).await, "parley_connections_aborted_total", &[]);
            panic!(
                "{end:?}: {:?} after the session's end the server still holds bob's connection: (state, send queue, receive queue) {state:?} (at first {first:?}); parley_connections_aborted_total {aborted:?}",
                t0.elapsed()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let aborted = metric(&metrics(srv.addr).await, "parley_connections_aborted_total", &[]).unwrap_or(0.0);
    assert!(aborted >= 1.0, "{end:?}: the connection went, but parley_connections_aborted_total is {aborted}");
    println!("{end:?}: the server released the stuck connection {:?} after the session's end", t0.elapsed());
    drop(bob);
}

/// A raw TCP connection upgraded to a WebSocket at /v1/ws (the 101 read), for frames no
/// client library would send.
async fn raw_upgrade(addr: SocketAddr) -> TcpStream {
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    let req = format!(
        "GET /v1/ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    tcp.write_all(req.as_bytes()).await.expect("upgrade");
    let mut head = vec![0u8; 4096];
    let n = tcp.read(&mut head).await.expect("101");
    assert!(head[..n].starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head[..n]));
    tcp
}

/// A frame header that declares a huge payload is refused as soon as the header arrives (close
/// 1009), before and after `hello`: the server must not buffer what follows it (actix-http's own
/// parser would buffer up to the declared length before checking the size).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_header_claiming_a_terabyte_closes_1009_without_buffering() {
    let dir = TestDir::new();
    let srv = Server::start(&dir).await;
    let a = srv.user("alice").await;
    let pid = server_pid(&dir);
    for authed in [false, true] {
        let before = rss_kib(pid);
        let mut tcp = raw_upgrade(srv.addr).await;
        if authed {
            let hello = json!({"type": "hello", "token": a}).to_string();
            let mut f = vec![0x81, 0x80 | 126];
            f.extend((hello.len() as u16).to_be_bytes());
            f.extend([0, 0, 0, 0]);
            f.extend(hello.as_bytes());
            tcp.write_all(&f).await.expect("hello");
        }
        let mut frame = vec![0x81, 0x80 | 127];
        frame.extend((1u64 << 40).to_be_bytes());
        frame.extend([1, 2, 3, 4]);
        tcp.write_all(&frame).await.expect("header");
        // Keep sending for a while (64 MiB at most); the server must neither grow nor wait.
        let junk = vec![b'x'; 64 * 1024];
        for _ in 0..1024 {
            if tcp.write_all(&junk).await.is_err() {
                break;
            }
        }
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(T, tcp.read_to_end(&mut buf)).await;
        // The close frame (0x88) with 1009 is among what the server sent last.
        let close_at = buf.windows(2).rposition(|w| w[0] == 0x88);
        let code = close_at.and_then(|i| buf.get(i + 2..i + 4)).map(|c| u16::from_be_bytes([c[0], c[1]]));
        assert_eq!(code, Some(close::TOO_BIG), "authed={authed}: close code");
        let after = rss_kib(pid);
        assert!(after < before + 32 * 1024, "authed={authed}: server RSS grew from {before} to {after} KiB");
    }
}

/// A frame with a reserved bit set (no extension was negotiated) fails the connection with 1002
/// (RFC 6455 §5.2), and a text frame that is not UTF-8 with 1007 (§8.1), before and after `hello`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserved_bits_close_1002_and_bad_utf8_closes_1007() {
    let dir = TestDir::new();
    let srv = Server::start(&dir).await;
    let a = srv.user("alice").await;
    // (first byte, payload, expected close code): RSV1 + text, RSV3 + binary, text with 0xff.
    let cases: [(u8, &[u8], u16); 3] = [(0xC1, b"{}", close::PROTOCOL_ERROR), (0x92, b"{}", close::PROTOCOL_ERROR), (0x81, b"\xff\xfe", close::INVALID_PAYLOAD)];
    for authed in [false, true] {
        for (first, payload, want) in cases {
            let mut tcp = raw_upgrade(srv.addr).await;
            // Masked frames with a zero mask, so the payload goes as it is.
            let frame = |first: u8, p: &[u8]| {
                let mut f = vec![first, 0x80 | 126];
                f.extend((p.len() as u16).to_be_bytes());
                f.extend([0, 0, 0, 0]);
                f.extend(p);
                f
            };
            if authed {
                tcp.write_all(&frame(0x81, json!({"type": "hello", "token": a}).to_string().as_bytes())).await.expect("hello");
            }
            tcp.write_all(&frame(first, payload)).await.expect("frame");
            let mut buf = Vec::new();
            let _ = tokio::time::timeout(T, tcp.read_to_end(&mut buf)).await;
            let close_at = buf.windows(2).rposition(|w| w[0] == 0x88);
            let code = close_at.and_then(|i| buf.get(i + 2..i + 4)).map(|c| u16::from_be_bytes([c[0], c[1]]));
            assert_eq!(code, Some(want), "authed={authed}, first byte {first:#x}: close code");
        }
    }
}

/// Peak resident set size of `pid`, in KiB (`VmHWM`).
fn hwm_kib(pid: u32) -> u64 {
    status_kib(pid, "VmHWM")
}

/// Password hashes (argon2id, 32 MiB each here) run in `auth.max_concurrent_hashes` slots: 8
/// logins at once through one slot all succeed, and the server's peak memory grows by about one
/// hash, not eight (a flood of logins once grew it by gigabytes). With no time to wait for a
/// slot, the logins that find it busy get `503 overloaded` instead of a hash of their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_hashes_run_in_bounded_slots_so_a_login_flood_cannot_exhaust_memory() {
    const KIB: u64 = 32 * 1024;
    const AT_ONCE: usize = 8;
    let dir = TestDir::new();
    let mem = KIB.to_string();
    let mut srv = Server::start_with(&dir, &[("PARLEY__AUTH__ARGON2_MEMORY_KIB", &mem), ("PARLEY__AUTH__MAX_CONCURRENT_HASHES", "1")]).await;
    srv.register("alice").await;
    let logins = |addr| async move {
        let req = json!({"user": "alice", "password": PASSWORD, "device": "web"});
        let tasks: Vec<_> = (0..AT_ONCE)
            .map(|_| {
                let req = req.clone();
                tokio::spawn(async move { http(addr, "POST", "/v1/login", Some(&req), None).await })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(within(T * 4, "a login", t).await.expect("login task"));
        }
        out
    };
    let pid = server_pid(&dir);
    let before = hwm_kib(pid);
    let answers = logins(srv.addr).await;
    assert!(answers.iter().all(|(st, _)| *st == 200), "every login waits for the slot and succeeds: {answers:?}");
    let grown = hwm_kib(pid).saturating_sub(before);
    assert!(grown < 3 * KIB, "peak memory grew by {grown} KiB for {AT_ONCE} logins of {KIB} KiB each through one slot");

    srv.kill9().await;
    srv.set_env(&[("PARLEY__AUTH__HASH_WAIT_MS", "0")]);
    srv.restart().await;
    let answers = logins(srv.addr).await;
    for (st, body) in &answers {
        assert!(*st == 200 || (*st == 503 && body["error"] == "overloaded"), "{st} {body}");
    }
    let busy = answers.iter().filter(|(st, _)| *st == 503).count();
    assert!(busy >= 1 && busy < AT_ONCE, "{busy} of {AT_ONCE} simultaneous logins found the one slot busy: {answers:?}");
}

/// A request whose body does not arrive in `server.body_timeout_ms` gets `408` with the JSON
/// error body, and the connection is closed: a client cannot hold one open by withholding it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_withheld_request_body_gets_408_and_the_connection_closes() {
    let dir = TestDir::new();
    let srv = Server::start_with(&dir, &[("PARLEY__SERVER__BODY_TIMEOUT_MS", "300")]).await;
    for path in ["/v1/login", "/v1/register"] {
        let mut tcp = TcpStream::connect(srv.addr).await.expect("connect");
        let head = format!("POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"user\"", srv.addr);
        tcp.write_all(head.as_bytes()).await.expect("head");
        let mut got = Vec::new();
        within(T, "the 408 and the close", tcp.read_to_end(&mut got)).await.expect("read");
        let got = String::from_utf8_lossy(&got);
        assert!(got.starts_with("HTTP/1.1 408"), "{path}: {got}");
        assert!(got.contains("\"error\"") && got.contains("did not arrive"), "{path}: {got}");
    }
}
