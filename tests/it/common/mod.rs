//! Shared helpers of the integration tests: the real `parley` binary as a child process on port 0
//! with its own data directory, a tiny HTTP/1.1 client, a WebSocket client that speaks the
//! protocol in JSON or postcard, and real message bodies from the dialog corpus.
//!
//! Nothing here sleeps to synchronise: every wait is for a condition (a line on stdout, a frame,
//! a process exit) under a generous timeout, so the tests do not depend on the machine's speed.

#![allow(dead_code)] // each test module uses a different part of the helpers

pub mod cluster;
pub mod proxy;

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use parley::protocol::codec::{decode_server_json, decode_server_postcard, encode_request};
use parley::protocol::{ClientFrame, Encoded, Encoding, EventPayload, MessageView, Request, ServerFrame};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long to wait for any one expected thing (a frame, a reply, the server to start or stop).
/// Generous on purpose: a condition is awaited, so a fast machine never waits this long.
pub const T: Duration = Duration::from_secs(20);

/// The password of every test user.
pub const PASSWORD: &str = "correct horse battery staple";

/// Environment of every server child: cheap argon2 (registering is fast), and send rate limits
/// high enough that tests which send hundreds of messages are not throttled (the limits have
/// their own tests in the conformance suite).
const BASE_ENV: &[(&str, &str)] = &[
    ("PARLEY__AUTH__ARGON2_MEMORY_KIB", "1024"),
    ("PARLEY__AUTH__ARGON2_ITERATIONS", "1"),
    ("PARLEY__LIMITS__SEND_RATE_PER_S", "1000000"),
    ("PARLEY__LIMITS__SEND_BURST", "1000000"),
    // The XMPP gateway's TCP listener on a fresh port too (its default is 127.0.0.1:5222).
    ("PARLEY__XMPP__LISTEN", "127.0.0.1:0"),
];

/// Awaits `f` for at most `d`; panics naming `what` when it takes longer.
pub async fn within<F: Future>(d: Duration, what: &str, f: F) -> F::Output {
    match tokio::time::timeout(d, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {d:?} waiting for {what}"),
    }
}

/// Server time now, ms since the Unix epoch (the server runs on this machine's clock).
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

// ---------------------------------------------------------------------------------- bodies

/// Real chat turns (many languages and scripts) used as message bodies: the project's copy of
/// the corpus (`assets/dialogs.jsonl`) when it exists, else the shared one, else a built-in list.
pub fn turns() -> &'static [String] {
    static TURNS: OnceLock<Vec<String>> = OnceLock::new();
    TURNS.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        for p in [root.join("assets/dialogs.jsonl"), root.join("../shared/data/dialogs.jsonl")] {
            let Ok(text) = std::fs::read_to_string(&p) else { continue };
            let mut out = Vec::new();
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{}: bad line: {e}", p.display()));
                for t in v["turns"].as_array().into_iter().flatten() {
                    if let Some(s) = t.as_str().filter(|s| !s.is_empty() && s.len() <= parley::protocol::MAX_BODY_BYTES) {
                        out.push(s.to_owned());
                    }
                }
            }
            if !out.is_empty() {
                return out;
            }
        }
        [
            "Hello, how are you?",
            "Bien, merci ! Et toi ?",
            "こんにちは、元気ですか？",
            "你好，最近怎么样？",
            "שלום, מה שלומך?",
            "مرحبا، كيف حالك؟",
            "Привет! Как дела?",
            "नमस्ते, आप कैसे हैं?",
            "สวัสดีครับ",
            "안녕하세요, 잘 지내세요?",
            "Γεια σου! 😀 \"quoted\" \\ back\nslash",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    })
}

/// A real dialog of `n` consecutive turns starting at a position derived from `seed`.
pub fn dialog(seed: usize, n: usize) -> Vec<String> {
    let t = turns();
    (0..n).map(|i| t[(seed.wrapping_mul(7919) + i) % t.len()].clone()).collect()
}

// ---------------------------------------------------------------------------------- server

/// A test's own directory: the server's data directory (`data/`) and one stderr log per start.
/// Deleted on drop (kept, with its path printed, when the test panics, for post-mortems).
pub struct TestDir {
    tmp: Option<tempfile::TempDir>,
}

impl TestDir {
    pub fn new() -> TestDir {
        TestDir { tmp: Some(tempfile::Builder::new().prefix("it-").tempdir().expect("temp dir")) }
    }

    pub fn path(&self) -> &Path {
        self.tmp.as_ref().map(|t| t.path()).expect("temp dir")
    }

    pub fn data(&self) -> PathBuf {
        self.path().join("data")
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(t) = self.tmp.take() {
                eprintln!("test failed: keeping its directory {}", t.keep().display());
            }
        }
    }
}

/// The `parley` binary running as a child process. Killed (SIGKILL) on drop.
pub struct Server {
    /// `None` while stopped.
    child: Option<Child>,
    /// The address of the current run (port 0: a new port on each start).
    pub addr: SocketAddr,
    root: PathBuf,
    env: Vec<(String, String)>,
    /// The environment given to `start_with`, once [`Server::set_env`] changed `env`.
    base_env: Option<Vec<(String, String)>>,
    /// Number of starts so far; names the log file of each run.
    pub starts: u32,
    /// The XMPP gateway's TCP address of the current run (None: `xmpp.listen` is empty).
    pub xmpp: Option<SocketAddr>,
    /// The node-to-node (Raft RPC) address of the current run, from its `parley cluster
    /// listening on` line (None: a single node).
    pub cluster: Option<SocketAddr>,
    /// Called with that address as soon as the line appears, before the start returns (a
    /// cluster harness points its proxies at the node while it may still wait for its peers).
    pub on_cluster_addr: Option<Box<dyn Fn(SocketAddr) + Send + Sync>>,
}

impl Server {
    /// Starts the server on `127.0.0.1:0` with `dir.data()` as its data directory.
    pub async fn start(dir: &TestDir) -> Server {
        Server::start_with(dir, &[]).await
    }

    /// Like [`Server::start`] with extra environment variables (e.g. `PARLEY__SECTION__KEY`).
    pub async fn start_with(dir: &TestDir, env: &[(&str, &str)]) -> Server {
        let mut s = Server::prepared(dir, env);
        s.restart().await;
        s
    }

    /// A server on `dir` with `env` that is not started yet ([`Server::restart`] starts it).
    pub fn prepared(dir: &TestDir, env: &[(&str, &str)]) -> Server {
        Server {
            child: None,
            addr: "127.0.0.1:0".parse().expect("addr"),
            root: dir.path().to_owned(),
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            base_env: None,
            starts: 0,
            xmpp: None,
            cluster: None,
            on_cluster_addr: None,
        }
    }

    /// Replaces the extra environment of the next starts, keeping the variables given to
    /// [`Server::start_with`] (e.g. to arm a fail point for one run).
    pub fn set_env(&mut self, extra: &[(&str, &str)]) {
        let base = self.base_env.get_or_insert_with(|| self.env.clone()).clone();
        self.env = base.into_iter().chain(extra.iter().map(|(k, v)| (k.to_string(), v.to_string()))).collect();
    }

    /// The path of the stderr log of start number `n` (1-based).
    pub fn log_path(&self, n: u32) -> PathBuf {
        self.root.join(format!("server-{n}.log"))
    }

    /// The stderr (JSON log lines) of the current or last run.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path(self.starts)).unwrap_or_default()
    }

    fn log_tail(&self) -> String {
        self.log_tail_of(self.starts, 30)
    }

    /// The last `lines` lines of the log of start number `n` (empty when there is none).
    pub fn log_tail_of(&self, n: u32, lines: usize) -> String {
        let l = std::fs::read_to_string(self.log_path(n)).unwrap_or_default();
        let all: Vec<&str> = l.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Starts the binary again on the same data directory (the previous run must have ended);
    /// returns once it printed its listening line.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "restart while the server is running");
        self.starts += 1;
        let log = std::fs::File::create(self.log_path(self.starts)).expect("log file");
        let mut cmd = Command::new(self.exe());
        cmd.arg("serve")
            .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
            .arg("--data")
            .arg(self.root.join("data"))
            .env_remove("RUST_LOG")
            // PARLEY_IT_LOG=debug (an EnvFilter) turns up the children's logs for a post-mortem.
            .envs(std::env::var("PARLEY_IT_LOG").ok().map(|l| ("RUST_LOG", l)))
            .envs(BASE_ENV.iter().copied())
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .kill_on_drop(true);
        // SAFETY: prctl is async-signal-safe. If this test process dies without dropping the
        // child (killed, or a harness timeout), the kernel kills the server too.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("spawn parley");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let (mut xmpp, mut cluster) = (None, None);
        let found = tokio::time::timeout(T, async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(rest) = line.strip_prefix("parley xmpp listening on ") {
                    xmpp = rest.trim().parse::<SocketAddr>().ok();
                }
                if let Some(rest) = line.strip_prefix("parley cluster listening on ") {
                    let a = rest.trim().parse::<SocketAddr>().expect("cluster listening address");
                    if let Some(f) = &self.on_cluster_addr {
                        f(a);
                    }
                    cluster = Some(a);
                }
                if let Some(rest) = line.strip_prefix("parley listening on http://") {
                    return Some(rest.trim().parse::<SocketAddr>().expect("listening address"));
                }
            }
            None
        })
        .await;
        let addr = match found {
            Ok(Some(a)) => a,
            other => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                panic!(
                    "the server did not start ({}); its log:\n{}",
                    if other.is_err() { "timed out" } else { "exited" },
                    std::fs::read_to_string(self.log_path(self.starts)).unwrap_or_default()
                );
            }
        };
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        self.addr = addr;
        self.xmpp = xmpp;
        self.cluster = cluster;
        self.child = Some(child);
    }

    /// Whether the process of the current run was started and not yet stopped or reaped.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The binary under test, started through a symlink in the test's directory: its process
    /// name and command line then hold no "parley", so a broad `pkill parley` run by someone
    /// else on a shared machine cannot stop a test's server (only the test stops it).
    fn exe(&self) -> PathBuf {
        let link = self.root.join("it-server");
        if !link.exists() {
            std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_parley"), &link).expect("symlink the binary");
        }
        link
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().and_then(|c| c.id()).expect("server is running") as i32
    }

    /// `kill -9` and reap.
    pub async fn kill9(&mut self) {
        let mut child = self.child.take().expect("server is running");
        child.start_kill().expect("SIGKILL");
        within(T, "the killed server to exit", child.wait()).await.expect("wait");
    }

    /// Sends SIGTERM (graceful shutdown) without waiting.
    pub fn sigterm(&self) {
        // SAFETY: kill(2) on our own child's pid, which is not reaped yet.
        let r = unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        assert_eq!(r, 0, "kill(SIGTERM)");
    }

    /// Waits for the process to exit (after [`Server::sigterm`]) and returns its status.
    pub async fn wait_exit(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("server is running");
        match tokio::time::timeout(T, child.wait()).await {
            Ok(s) => s.expect("wait"),
            Err(_) => {
                let _ = child.start_kill();
                panic!("the server did not exit within {T:?}; log:\n{}", self.log_tail());
            }
        }
    }

    /// The fields of this run's `storage recovered` log line (torn_tail_bytes, replayed, ...).
    pub fn recovery_report(&self) -> Value {
        self.log()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| v["fields"]["message"] == "storage recovered")
            .map(|v| v["fields"].clone())
            .unwrap_or_else(|| panic!("no `storage recovered` line in the log:\n{}", self.log_tail()))
    }

    /// Registers `user` and logs its device `web` in; returns the token.
    pub async fn user(&self, user: &str) -> String {
        self.register(user).await;
        self.login(user, "web").await
    }

    /// `POST /v1/register`, expecting 201.
    pub async fn register(&self, user: &str) {
        let (st, body) = http(self.addr, "POST", "/v1/register", Some(&json!({"user": user, "password": PASSWORD})), None).await;
        assert_eq!(st, 201, "register {user}: {body}");
        assert_eq!(body["user"], user);
    }

    /// `POST /v1/login` for `device`, expecting 200; returns the token.
    pub async fn login(&self, user: &str, device: &str) -> String {
        let req = json!({"user": user, "password": PASSWORD, "device": device});
        let (st, body) = http(self.addr, "POST", "/v1/login", Some(&req), None).await;
        assert_eq!(st, 200, "login {user}/{device}: {body}");
        assert_eq!((body["user"].as_str(), body["device"].as_str()), (Some(user), Some(device)), "{body}");
        body["token"].as_str().expect("token").to_owned()
    }

    /// Opens a JSON socket with `hello` and reads the backlog up to `synced`.
    pub async fn connect(&self, token: &str, cursor: Option<u64>) -> Synced {
        Client::connect(self.addr, token, cursor, Encoding::Json).await
    }

    /// Registers each of `users` and connects its `web` device (JSON), in order.
    pub async fn clients<const N: usize>(&self, users: [&str; N]) -> [Client; N] {
        let mut v = Vec::new();
        for u in users {
            let token = self.user(u).await;
            v.push(self.connect(&token, None).await.client);
        }
        v.try_into().ok().expect("one client per user")
    }
}

// ---------------------------------------------------------------------------------- HTTP

/// One HTTP/1.1 request (`Connection: close`); returns the status and the JSON body (`Null`
/// when empty).
pub async fn http(addr: SocketAddr, method: &str, path: &str, body: Option<&Value>, bearer: Option<&str>) -> (u16, Value) {
    within(T, &format!("{method} {path}"), try_http(addr, method, path, body, bearer))
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

/// [`http`] without the time limit and with I/O errors returned (for polls of a server that may
/// be starting, cut off or gone).
pub async fn try_http(addr: SocketAddr, method: &str, path: &str, body: Option<&Value>, bearer: Option<&str>) -> Result<(u16, Value), String> {
    let mut s = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    if !body.is_empty() {
        req.push_str("Content-Type: application/json\r\n");
    }
    if let Some(t) = bearer {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(&body);
    s.write_all(req.as_bytes()).await.map_err(|e| format!("write request: {e}"))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.map_err(|e| format!("read response: {e}"))?;
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or("no end of headers")?;
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut payload = raw[split + 4..].to_vec();
    let status: u16 = head.split(' ').nth(1).and_then(|s| s.parse().ok()).ok_or("no status")?;
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        payload = dechunk(&payload);
    }
    let v = if payload.is_empty() { Value::Null } else { serde_json::from_slice(&payload).unwrap_or(Value::Null) };
    Ok((status, v))
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else { return out };
        let n = usize::from_str_radix(String::from_utf8_lossy(&b[..eol]).trim(), 16).unwrap_or(0);
        if n == 0 || b.len() < eol + 2 + n {
            return out;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + n]);
        b = &b[(eol + 4 + n).min(b.len())..];
    }
}

// ---------------------------------------------------------------------------------- WebSocket

/// What the socket gave next.
#[derive(Debug)]
pub enum Incoming {
    Frame(ServerFrame),
    /// The socket closed: the close code, if a close frame came.
    Closed(Option<u16>),
}

/// A protocol client over one WebSocket. Every frame it receives must be of its encoding's kind
/// (text for JSON, binary for postcard): that is checked on each frame.
pub struct Client {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub enc: Encoding,
    /// The raw text of the last JSON frame received (for checks of the wire shape).
    pub last_raw: Option<String>,
    /// Frames read while waiting for another one ([`Client::until`]), in arrival order; the next
    /// reads return them first, so no frame is lost to a wait.
    stash: VecDeque<ServerFrame>,
}

/// A socket after `welcome`, its backlog and `synced`.
pub struct Synced {
    pub client: Client,
    /// `welcome.user`, `welcome.device`.
    pub user: String,
    pub device: String,
    /// `welcome.head` (== `synced.head`).
    pub head: u64,
    /// The backlog events (ev, payload) between `welcome` and `synced`.
    pub backlog: Vec<(u64, EventPayload)>,
}

impl Synced {
    /// The message events of the backlog.
    pub fn messages(&self) -> Vec<(u64, MessageView)> {
        self.backlog
            .iter()
            .filter_map(|(ev, p)| match p {
                EventPayload::Message(m) => Some((*ev, m.clone())),
                _ => None,
            })
            .collect()
    }
}

impl Client {
    /// Opens `/v1/ws` and sends `hello`; reads nothing.
    pub async fn open(addr: SocketAddr, token: &str, cursor: Option<u64>, enc: Encoding) -> Client {
        let mut c = Client::open_raw(addr, enc).await.expect("WebSocket connect");
        c.send(ClientFrame::Hello { token: token.to_owned(), cursor }).await;
        c
    }

    /// Opens `/v1/ws` without sending anything.
    pub async fn open_raw(addr: SocketAddr, enc: Encoding) -> Result<Client, String> {
        let url = format!("ws://{addr}/v1/ws");
        let (ws, _resp) = tokio::time::timeout(T, tokio_tungstenite::connect_async(url.as_str()))
            .await
            .map_err(|_| "timeout".to_owned())?
            .map_err(|e| e.to_string())?;
        Ok(Client { ws, enc, last_raw: None, stash: VecDeque::new() })
    }

    /// `hello`, then `welcome`, the backlog and `synced`. Checks that the backlog is exactly the
    /// events `cursor < ev <= head` in order (`cursor` as given, or the stored one when `None`,
    /// in which case only gaplessness up to the head is checked).
    pub async fn connect(addr: SocketAddr, token: &str, cursor: Option<u64>, enc: Encoding) -> Synced {
        let c = Client::open(addr, token, cursor, enc).await;
        c.sync(cursor).await
    }

    /// Reads `welcome`, the backlog and `synced` after a `hello` (see [`Client::connect`]).
    pub async fn sync(mut self, cursor: Option<u64>) -> Synced {
        let (user, device, head) = match self.recv().await {
            ServerFrame::Welcome { user, device, head, server_time } => {
                assert!(server_time.abs_diff(now_ms()) < 60_000, "welcome.server_time {server_time} is not now");
                (user, device, head)
            }
            f => panic!("expected welcome, got {f:?}"),
        };
        let mut backlog = Vec::new();
        loop {
            match self.recv().await {
                ServerFrame::Event { ev, payload } => {
                    if let Some((prev, _)) = backlog.last() {
                        assert_eq!(ev, prev + 1, "backlog ev after {prev} is {ev}: not gapless");
                    } else if let Some(c) = cursor {
                        assert_eq!(ev, c + 1, "the backlog after cursor {c} starts at ev {ev}");
                    }
                    assert!(ev <= head, "backlog ev {ev} is past the welcome head {head}");
                    backlog.push((ev, payload));
                }
                ServerFrame::Synced { head: h } => {
                    assert_eq!(h, head, "synced.head differs from welcome.head");
                    break;
                }
                f => panic!("expected a backlog event or synced, got {f:?}"),
            }
        }
        if let Some((last, _)) = backlog.last() {
            assert_eq!(*last, head, "the backlog does not reach the head {head}");
        }
        if let Some(c) = cursor {
            assert_eq!(backlog.len() as u64, head - c, "backlog after cursor {c} up to head {head}");
        }
        Synced { client: self, user, device, head, backlog }
    }

    /// Sends one frame without `rid`.
    pub async fn send(&mut self, frame: ClientFrame) {
        self.send_req(Request { rid: None, frame }).await
    }

    /// Sends one frame with `rid`.
    pub async fn send_rid(&mut self, rid: &str, frame: ClientFrame) {
        self.send_req(Request { rid: Some(rid.to_owned()), frame }).await
    }

    pub async fn send_req(&mut self, req: Request) {
        self.try_send_req(req).await.expect("WebSocket send");
    }

    /// Sends one frame; an error when the socket is gone (for tests that kill the server).
    pub async fn try_send_req(&mut self, req: Request) -> Result<(), String> {
        let msg = match encode_request(&req, self.enc) {
            Encoded::Text(s) => Message::text(s),
            Encoded::Binary(b) => Message::binary(b),
        };
        within(T, "a frame to be written", self.ws.send(msg)).await.map_err(|e| e.to_string())
    }

    /// `send` of a message.
    pub async fn send_msg(&mut self, id: &str, to: &str, body: &str) {
        self.send(ClientFrame::Send { id: id.to_owned(), to: to.to_owned(), body: body.to_owned() }).await
    }

    /// The next frame or the close, within `d` (`None` on timeout): stashed frames first, then
    /// the socket. Pings are answered by tungstenite itself.
    pub async fn next_within(&mut self, d: Duration) -> Option<Incoming> {
        if let Some(f) = self.stash.pop_front() {
            return Some(Incoming::Frame(f));
        }
        self.read_within(d).await
    }

    /// The next frame or the close from the socket itself, within `d`.
    async fn read_within(&mut self, d: Duration) -> Option<Incoming> {
        let (incoming, raw) = read_incoming(&mut self.ws, tokio::time::Instant::now() + d, self.enc).await?;
        if raw.is_some() {
            self.last_raw = raw;
        }
        Some(incoming)
    }

    /// The next frame or the close, within [`T`].
    pub async fn next(&mut self) -> Incoming {
        match self.next_within(T).await {
            Some(i) => i,
            None => panic!("no frame within {T:?}"),
        }
    }

    /// The next frame; panics on a close or a timeout.
    pub async fn recv(&mut self) -> ServerFrame {
        match self.next().await {
            Incoming::Frame(f) => f,
            Incoming::Closed(c) => panic!("the socket closed ({c:?}) while a frame was expected"),
        }
    }

    /// The first frame (stashed or read) for which `pick` returns `Some`. Frames passed over stay
    /// stashed, in order, for the next reads: waiting for one reply loses no event or ack.
    pub async fn until<R>(&mut self, what: &str, mut pick: impl FnMut(&ServerFrame) -> Option<R>) -> R {
        if let Some(i) = self.stash.iter().position(|f| pick(f).is_some()) {
            let f = self.stash.remove(i).expect("stashed frame");
            return pick(&f).expect("picked");
        }
        loop {
            let f = match self.read_within(T).await {
                Some(Incoming::Frame(f)) => f,
                Some(Incoming::Closed(c)) => panic!("the socket closed ({c:?}) while waiting for {what}; passed over {:?}", self.stash),
                None => panic!("no {what} within {T:?}; passed over {:?}", self.stash),
            };
            if let Some(r) = pick(&f) {
                return r;
            }
            self.stash.push_back(f);
        }
    }

    /// Drops the stashed frames (those passed over by [`Client::until`]); returns them.
    pub fn take_stash(&mut self) -> Vec<ServerFrame> {
        self.stash.drain(..).collect()
    }

    /// Waits for the `ack` of send `id` (skipping other frames); returns (conv, seq, ts).
    pub async fn ack(&mut self, id: &str) -> (String, u64, u64) {
        self.until(&format!("the ack of {id}"), |f| match f {
            ServerFrame::Ack { id: i, conv, seq, ts, .. } if i == id => Some((conv.clone(), *seq, *ts)),
            ServerFrame::Error { id: Some(i), code, message, .. } if i == id => panic!("send {id} failed: {code:?} {message}"),
            _ => None,
        })
        .await
    }

    /// Sends a message and waits for its ack.
    pub async fn send_acked(&mut self, id: &str, to: &str, body: &str) -> (String, u64, u64) {
        self.send_msg(id, to, body).await;
        self.ack(id).await
    }

    /// Waits for the next `event` (skipping typing/presence, never acks or replies).
    pub async fn event(&mut self) -> (u64, EventPayload) {
        loop {
            match self.recv().await {
                ServerFrame::Event { ev, payload } => return (ev, payload),
                ServerFrame::Typing { .. } | ServerFrame::Presence { .. } => continue,
                f => panic!("expected an event, got {f:?}"),
            }
        }
    }

    /// Waits for the next message event.
    pub async fn message_event(&mut self) -> (u64, MessageView) {
        match self.event().await {
            (ev, EventPayload::Message(m)) => (ev, m),
            (ev, p) => panic!("expected a message event, got ev {ev}: {p:?}"),
        }
    }

    /// The next `presence` frame about `user` (other frames stay stashed): (online, last_seen).
    pub async fn presence_of(&mut self, user: &str) -> (bool, Option<u64>) {
        self.until(&format!("presence of {user}"), |f| match f {
            ServerFrame::Presence { user: u, online, last_seen } if u == user => Some((*online, *last_seen)),
            _ => None,
        })
        .await
    }

    /// A request with `rid`; returns its reply (the frame echoing `rid`). Other frames stay stashed.
    pub async fn request(&mut self, rid: &str, frame: ClientFrame) -> ServerFrame {
        self.send_rid(rid, frame).await;
        self.until(&format!("the reply to {rid}"), |f| {
            let r = match f {
                ServerFrame::History { rid, .. } | ServerFrame::Conversations { rid, .. } | ServerFrame::Result { rid, .. } => rid,
                ServerFrame::Error { rid, .. } => rid,
                _ => return None,
            };
            (r.as_deref() == Some(rid)).then(|| f.clone())
        })
        .await
    }

    /// Waits until every frame sent before on this socket has taken effect (a read request is
    /// answered after the socket's earlier writes are applied).
    pub async fn barrier(&mut self) {
        let reply = self.request("barrier", ClientFrame::Conversations).await;
        assert!(matches!(reply, ServerFrame::Conversations { .. }), "barrier: {reply:?}");
    }

    /// Every message of `conv`, read newest first in pages of 200 with `before`, checked page by
    /// page: ascending, contiguous seqs, full pages while older messages exist, `more` exactly
    /// when they do. Returned in ascending seq order, which must be 1..N (the reader must see
    /// the whole conversation).
    pub async fn history_all(&mut self, conv: &str) -> Vec<MessageView> {
        let mut pages: Vec<Vec<MessageView>> = Vec::new();
        let mut before = None;
        loop {
            let frame = ClientFrame::History { conv: conv.to_owned(), before, limit: Some(200) };
            let reply = self.request(&format!("h{}", pages.len()), frame).await;
            let ServerFrame::History { conv: c, messages, more, .. } = reply else { panic!("history of {conv}: {reply:?}") };
            assert_eq!(c, conv);
            assert!(messages.len() <= 200, "a page of {} messages with limit 200", messages.len());
            for w in messages.windows(2) {
                assert_eq!(w[1].seq, w[0].seq + 1, "history page of {conv} not contiguous: {} then {}", w[0].seq, w[1].seq);
            }
            if let (Some(b), Some(last)) = (before, messages.last()) {
                assert_eq!(last.seq + 1, b, "the page before {b} of {conv} ends at {}", last.seq);
            }
            for m in &messages {
                assert_eq!(m.conv, conv, "a message of another conversation in the history of {conv}");
            }
            let first = messages.first().map(|m| m.seq);
            let full = messages.len() == 200;
            pages.push(messages);
            match first {
                Some(s) if s > 1 => {
                    assert!(more, "history of {conv}: seq {s} is the oldest of a page but more=false");
                    assert!(full, "history of {conv}: a short page (oldest seq {s}) while older messages exist");
                    before = Some(s);
                }
                _ => {
                    assert!(!more, "history of {conv}: more=true on a page reaching seq 1 (or empty)");
                    break;
                }
            }
        }
        let all: Vec<MessageView> = pages.into_iter().rev().flatten().collect();
        for (i, m) in all.iter().enumerate() {
            assert_eq!(m.seq, i as u64 + 1, "history of {conv}: seqs are not 1..N without gaps");
        }
        all
    }

    /// Reads until the socket closes; returns the frames before the close and its code.
    pub async fn until_closed(&mut self) -> (Vec<ServerFrame>, Option<u16>) {
        let mut frames = Vec::new();
        loop {
            match self.next().await {
                Incoming::Frame(f) => frames.push(f),
                Incoming::Closed(c) => return (frames, c),
            }
        }
    }

    /// Closes the socket (normal closure) and waits for the server's close frame (not for the
    /// end of the TCP connection, which the server delays by about a second).
    pub async fn close(mut self) {
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

/// `(conv, seq) -> (id, body)` of a list of messages, for comparisons.
pub fn by_seq(ms: &[MessageView]) -> BTreeMap<(String, u64), (String, String)> {
    ms.iter().map(|m| ((m.conv.clone(), m.seq), (m.id.clone(), m.body.clone()))).collect()
}

// ---------------------------------------------------------------------------------- requests

impl Client {
    /// A request that must fail: returns the `error` echoing `rid` as (code, message).
    pub async fn request_err(&mut self, rid: &str, frame: ClientFrame) -> (parley::protocol::ErrorCode, String) {
        let what = format!("{frame:?}");
        match self.request(rid, frame).await {
            ServerFrame::Error { code, message, .. } => (code, message),
            f => panic!("{what} should have failed, got {f:?}"),
        }
    }

    /// `group_create`; returns the new group's conversation id (`g:<id>`).
    pub async fn create_group(&mut self, name: &str, members: &[&str]) -> String {
        let frame = ClientFrame::GroupCreate { name: name.to_owned(), members: members.iter().map(|m| m.to_string()).collect() };
        match self.request("group_create", frame).await {
            ServerFrame::Result { group: Some(g), .. } => g,
            f => panic!("group_create {name:?} {members:?}: {f:?}"),
        }
    }

    /// `group_info`: (name, members sorted, admins sorted).
    pub async fn group_info(&mut self, group: &str) -> (String, Vec<String>, Vec<String>) {
        match self.request("group_info", ClientFrame::GroupInfo { group: group.to_owned() }).await {
            ServerFrame::Result { group: Some(g), name: Some(n), members: Some(mut m), admins: Some(mut a), .. } => {
                assert_eq!(g, group, "group_info answers about another group");
                m.sort();
                a.sort();
                (n, m, a)
            }
            f => panic!("group_info {group}: {f:?}"),
        }
    }
}

/// The next frame or the close from a WebSocket, until `deadline` (`None` on timeout): a frame in
/// the wrong encoding for `enc` fails the test; pings and pongs are passed over (tungstenite
/// answers pings while reading). Also returns a text frame's raw JSON. Shared by the harness's
/// [`Client`] and the raw sockets of the overload tests.
pub(crate) async fn read_incoming<S>(
    ws: &mut WebSocketStream<S>,
    deadline: tokio::time::Instant,
    enc: Encoding,
) -> Option<(Incoming, Option<String>)>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        let m = match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return None,
            Ok(None) | Ok(Some(Err(_))) => return Some((Incoming::Closed(None), None)),
            Ok(Some(Ok(m))) => m,
        };
        match m {
            Message::Text(t) => {
                assert_eq!(enc, Encoding::Json, "a text frame on a binary socket: {t}");
                let f = decode_server_json(t.as_str()).unwrap_or_else(|e| panic!("undecodable frame {t}: {e:?}"));
                return Some((Incoming::Frame(f), Some(t.to_string())));
            }
            Message::Binary(b) => {
                assert_eq!(enc, Encoding::Postcard, "a binary frame on a JSON socket");
                let f = decode_server_postcard(&b).unwrap_or_else(|e| panic!("undecodable binary frame: {e:?}"));
                return Some((Incoming::Frame(f), None));
            }
            Message::Close(c) => return Some((Incoming::Closed(c.map(|c| u16::from(c.code))), None)),
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
        }
    }
}

/// Opens a socket to `addr` and says `hello` with the stored cursor, reading nothing; `None`
/// when the server is gone (for the tests that kill servers).
pub async fn hello_stored(addr: SocketAddr, token: &str) -> Option<Client> {
    let mut c = Client::open_raw(addr, Encoding::Json).await.ok()?;
    let hello = ClientFrame::Hello { token: token.to_owned(), cursor: None };
    c.try_send_req(Request { rid: None, frame: hello }).await.ok()?;
    Some(c)
}

/// The event stream of one socket as a client reads it: checks that each ev follows its
/// predecessor, and confirms with `received` every `every` events.
pub struct LiveStream {
    last_ev: Option<u64>,
    confirmed: u64,
    every: u64,
}

impl LiveStream {
    pub fn new(every: u64) -> LiveStream {
        LiveStream { last_ev: None, confirmed: 0, every }
    }

    /// Takes event `ev`; `Err` when the socket is gone.
    pub async fn event(&mut self, c: &mut Client, user: &str, ev: u64) -> Result<(), ()> {
        if let Some(p) = self.last_ev {
            assert_eq!(ev, p + 1, "{user}: ev {ev} after {p} on one socket");
        }
        self.last_ev = Some(ev);
        if ev >= self.confirmed + self.every {
            self.confirmed = ev;
            c.try_send_req(Request { rid: None, frame: ClientFrame::Received { up_to: ev } }).await.map_err(|_| ())?;
        }
        Ok(())
    }
}

/// Runs `parley load ARGS --url URLS --json --quiet --threads 2` to its end (within 120 s);
/// returns its JSON summary (the run must have exited 0: every promise kept).
pub async fn parley_load_json(urls: &str, args: &[&str]) -> Value {
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        Command::new(env!("CARGO_BIN_EXE_parley"))
            .arg("load")
            .args(args)
            .args(["--url", urls, "--json", "--quiet", "--threads", "2"])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("parley load ended within 120 s")
    .expect("run parley load");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "parley load {args:?}: {:?}\n{stdout}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

/// Checks the JSON summary of a `parley load chat` run: every promise kept, something acked,
/// every acked message delivered exactly once, every send acked once, no counter of trouble
/// above 0. Returns the number acked.
pub fn assert_load_kept_every_promise(j: &Value) -> u64 {
    let i = &j["integrity"];
    assert_eq!(i["ok"], true, "{j}");
    let acked = i["acked"].as_u64().expect("acked");
    assert!(acked > 0, "{j}");
    assert_eq!(i["delivered_exactly_once"].as_u64(), Some(acked), "{j}");
    for k in ["lost", "duplicated", "out_of_order", "mismatched", "ev_gaps", "unacked", "delivered_unacked", "stray_acks", "lost_sockets"] {
        assert_eq!(i[k].as_u64(), Some(0), "{k}: {j}");
    }
    assert_eq!(j["sent"].as_u64(), Some(acked), "every send acked once: {j}");
    acked
}

/// One message a crash-test sender has sent at least once (`tests/it/crash.rs`,
/// `tests/powerloss.rs`).
#[derive(Clone, Debug)]
#[allow(dead_code)] // not every test binary that includes this module uses it
pub struct Sent {
    pub id: String,
    pub to: String,
    pub conv: String,
    pub body: String,
}

impl Sent {
    /// Message `k` of crash-test sender `user` (seeded by `seed`): id `{user}-{k}`, every fourth
    /// to `group`, the others to `recipient`, a dialog turn as its body.
    #[allow(dead_code)]
    pub fn nth(user: &str, k: usize, recipient: &str, group: &str, seed: usize) -> Sent {
        let to = if k % 4 == 3 { group.to_owned() } else { recipient.to_owned() };
        let conv = if to.starts_with("g:") { to.clone() } else { parley::protocol::ids::Conv::dm(user, &to).to_string() };
        let body = dialog(seed * 100_003 + k, 1).remove(0);
        Sent { id: format!("{user}-{k}"), to, conv, body }
    }
}

/// The user name of crash-test sender `i`.
#[allow(dead_code)]
pub fn sender_name(i: usize) -> String {
    format!("s{i}")
}
