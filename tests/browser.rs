//! The web client end to end, in a real headless Chromium (Debian's `chromium` and
//! `chromium-driver`), driven over WebDriver by fantoccini.
//!
//! Two browsers (separate profiles, so separate localStorage) register alice and bob on the real
//! `parley` binary, then: a chat opened by user id, messages both ways with ✓ → ✓✓ → blue ✓✓,
//! unread counts, the typing indicator, presence, RTL text, an HTML-injection probe shown as text,
//! long messages wrapped, history paged on scroll, a reload with the history intact, a server
//! restart (goaway, reconnect, unsent messages resent with the same id, one of them from
//! localStorage after the page was closed), and a group with its members. Screenshots of the chat
//! view go to `target/tmp/screenshots/`, or to `docs/` (the README's pictures) with
//! `PARLEY_UPDATE_SCREENSHOTS=1`, so a plain `cargo test` leaves the tracked files alone.
//!
//! The file has its own harness (libtest-mimic, `harness = false`): without Chromium or
//! chromedriver the test is reported as `ignored` in the summary, with the reason on stderr,
//! except under CI (`CI` set), where a missing browser fails it. Every wait is for a condition in
//! the page or the process, polled under a timeout; nothing sleeps to synchronise.

use std::io::Write as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The longest wait for any one condition (generous: a condition is polled, so a fast machine
/// never waits this long).
const T: Duration = Duration::from_secs(30);
/// How often a page condition is polled.
const POLL: Duration = Duration::from_millis(50);
const PASSWORD: &str = "correct horse battery staple";
/// The HTML-injection probe of the issue: must appear as these characters, never as an element.
const XSS: &str = "<img src=x onerror=alert(1)>";
/// WebDriver's Enter key.
const ENTER: &str = "\u{e007}";

/// Progress lines, written past the test harness's capture so CI logs show each phase's time.
fn step(t0: Instant, what: &str) {
    let _ = writeln!(std::io::stderr(), "[browser {:>6.2}s] {what}", t0.elapsed().as_secs_f64());
}

// ---------------------------------------------------------------------------------- the browser

/// A program on `PATH` (or the path in `env`, when set).
fn program(env: &str, names: &[&str]) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    for dir in std::env::split_paths(&path) {
        for n in names {
            let p = dir.join(n);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

/// Whether this run is CI's (where a missing browser is a failure, not a skip).
fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// A child process, killed (SIGKILL) and reaped on drop, so a failing test leaves none behind.
/// A child started in its own process group (chromedriver) takes the group with it: the
/// browsers it started.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the process group our own child leads (it was started with
        // process_group(0)); for other children there is no such group and this does nothing.
        unsafe { libc::kill(-(self.0.id() as libc::pid_t), libc::SIGKILL) };
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// chromedriver as a child process on a free loopback port.
struct Driver {
    _child: Reaped,
    url: String,
}

async fn start_driver(chromedriver: &Path, log: &Path) -> Driver {
    // chromedriver cannot listen on port 0 and report the port, so take a free one from the OS.
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
    let child = std::process::Command::new(chromedriver)
        .process_group(0) // its own group, with the browsers: see Reaped
        .arg(format!("--port={port}"))
        .arg(format!("--log-path={}", log.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", chromedriver.display()));
    let driver = Driver { _child: Reaped(child), url: format!("http://127.0.0.1:{port}") };
    let deadline = Instant::now() + T;
    // Ready when it accepts connections (it binds before it serves).
    while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(Instant::now() < deadline, "chromedriver did not listen on port {port} within {T:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    driver
}

/// A new headless Chromium with its own empty profile (its own localStorage).
async fn browser(driver: &Driver, chromium: &Path, profile: &Path) -> Client {
    let caps = json!({
        "browserName": "chrome",
        "goog:chromeOptions": {
            "binary": chromium,
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--disable-breakpad", "--disable-crash-reporter", "--lang=en-US", "--force-device-scale-factor=1",
                "--window-size=1200,800", format!("--user-data-dir={}", profile.display()),
            ],
        },
    });
    let caps = match caps {
        Value::Object(m) => m,
        _ => unreachable!(),
    };
    let mut b = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new());
    b.capabilities(caps);
    let c = b.connect(&driver.url).await.expect("a WebDriver session in chromium");
    c.set_window_size(1200, 800).await.expect("window size");
    c
}

// ---------------------------------------------------------------------------------- the server

/// The `parley` binary as a child process.
struct Server {
    child: Reaped,
    addr: String,
}

fn start_server(data: &Path, listen: &str, log: &Path) -> Server {
    let stderr = std::fs::OpenOptions::new().create(true).append(true).open(log).expect("server log");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_parley"))
        .args(["serve", "--listen", listen, "--data"])
        .arg(data)
        .env("PARLEY__AUTH__ARGON2_MEMORY_KIB", "1024")
        .env("PARLEY__AUTH__ARGON2_ITERATIONS", "1")
        .env("PARLEY__LIMITS__SEND_RATE_PER_S", "1000")
        .env("PARLEY__LIMITS__SEND_BURST", "1000")
        // goaway's retry_after_ms is spread over half of this: keep the restart phase short.
        .env("PARLEY__SERVER__SHUTDOWN_TIMEOUT_MS", "2000")
        // No XMPP listener: its default port (5222) may be another server's.
        .env("PARLEY__XMPP__LISTEN", "")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("start parley");
    // A thread reads stdout (so the child never blocks on a full pipe) and hands over the address.
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(a) = line.strip_prefix("parley listening on http://") {
                let _ = tx.send(a.trim().to_owned());
            }
        }
    });
    let mut server = Server { child: Reaped(child), addr: String::new() };
    match rx.recv_timeout(T) {
        Ok(addr) => server.addr = addr,
        Err(_) => panic!("parley did not start; its log:\n{}", std::fs::read_to_string(log).unwrap_or_default()),
    }
    server
}

impl Server {
    /// SIGTERM (the graceful path: goaway to every session), then wait for the exit.
    async fn stop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.0.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + T;
        let status = loop {
            if let Some(s) = self.child.0.try_wait().expect("wait for parley") {
                break s;
            }
            assert!(Instant::now() < deadline, "parley did not exit within {T:?} of SIGTERM");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(status.success(), "parley exited with {status} after SIGTERM");
    }
}

/// A plain HTTP/1.1 GET: (status line, lower-cased headers, body).
async fn http_get(addr: &str, path: &str) -> (String, Vec<(String, String)>, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.expect("read");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    let mut lines = head.lines();
    let status = lines.next().unwrap_or_default().to_owned();
    let headers = lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned())).collect();
    (status, headers, body.to_owned())
}

fn header<'a>(h: &'a [(String, String)], name: &str) -> &'a str {
    h.iter().find(|(k, _)| k == name).map_or("", |(_, v)| v.as_str())
}

// ---------------------------------------------------------------------------------- bodies

/// Real chat turns from the shared corpus: (an English dialog, a Hebrew one, more English turns,
/// the longest English turn). Only characters chromedriver can type (the BMP) and no newlines
/// (WebDriver types a newline as Enter, which sends).
struct Bodies {
    english: Vec<String>,
    hebrew: Vec<String>,
    more: Vec<String>,
    long: String,
}

fn bodies() -> Bodies {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let path = [root.join("assets/dialogs.jsonl"), root.join("../shared/data/dialogs.jsonl")]
        .into_iter()
        .find(|p| p.is_file())
        .expect("the dialog corpus (../shared/data/dialogs.jsonl)");
    let typable = |t: &str| !t.is_empty() && !t.contains('\n') && t.chars().all(|c| (c as u32) < 0x10000);
    let mut english = None;
    let mut hebrew = None;
    let mut more = Vec::new();
    let mut long = String::new();
    for line in std::fs::read_to_string(&path).expect("read the corpus").lines() {
        let Ok(d) = serde_json::from_str::<Value>(line) else { continue };
        let turns: Vec<String> = d["turns"].as_array().into_iter().flatten().filter_map(|t| t.as_str().map(str::to_owned)).collect();
        if !turns.iter().all(|t| typable(t)) {
            continue;
        }
        match (d["lang"].as_str(), d["topic"].as_str()) {
            (Some("english"), Some("conversations")) if turns.len() >= 4 && english.is_none() => english = Some(turns),
            (Some("hebrew"), Some("conversations")) if turns.len() >= 4 && hebrew.is_none() => hebrew = Some(turns),
            (Some("english"), _) => {
                for t in turns {
                    if t.len() > long.len() && t.len() <= 1100 {
                        long = t.clone();
                    }
                    // Distinct bodies, so that seeing one tells which message arrived.
                    if more.len() < 80 && t.len() <= 120 && !more.contains(&t) {
                        more.push(t);
                    }
                }
            }
            _ => {}
        }
    }
    let english = english.expect("an English dialog");
    more.retain(|t| !english.contains(t) && *t != long);
    Bodies { english, hebrew: hebrew.expect("a Hebrew dialog"), more, long }
}

// ---------------------------------------------------------------------------------- page helpers

/// Runs `script` (a function body; `arguments` holds `args`) in the page.
async fn js(c: &Client, script: &str, args: Vec<Value>) -> Value {
    c.execute(script, args).await.unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
}

/// Polls `script` until it returns something other than null/false/undefined; returns it.
async fn wait(c: &Client, what: &str, script: &str, args: Vec<Value>) -> Value {
    let deadline = Instant::now() + T;
    loop {
        let v = js(c, script, args.clone()).await;
        if !(v.is_null() || v == Value::Bool(false)) {
            return v;
        }
        if Instant::now() > deadline {
            let page = js(c, "return document.body ? document.body.innerText : ''", vec![]).await;
            panic!("timed out after {T:?} waiting for {what}; the page says:\n{}", page.as_str().unwrap_or_default());
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn find(c: &Client, css: &str) -> fantoccini::elements::Element {
    c.wait().at_most(T).for_element(Locator::Css(css)).await.unwrap_or_else(|e| panic!("no element {css}: {e}"))
}

/// Types `text` into an element, as a user would (key events, input events).
async fn type_into(c: &Client, css: &str, text: &str) {
    find(c, css).await.send_keys(text).await.unwrap_or_else(|e| panic!("typing into {css}: {e}"));
}

async fn click(c: &Client, css: &str) {
    find(c, css).await.click().await.unwrap_or_else(|e| panic!("clicking {css}: {e}"));
}

async fn wait_online(c: &Client, who: &str) {
    wait(c, &format!("{who}'s client to be online"), "return document.body.dataset.conn === 'online'", vec![]).await;
}

/// Registers `user` in the page at `url` (the device name is left to its default).
async fn register(c: &Client, url: &str, user: &str) {
    c.goto(url).await.expect("open the client");
    wait(c, "the login form", "return !document.getElementById('auth').hidden", vec![]).await;
    let device = js(c, "return document.getElementById('device').value", vec![]).await;
    let device = device.as_str().unwrap_or_default().to_owned();
    assert!(
        !device.is_empty() && device.chars().all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || "_.-".contains(ch)),
        "the device name defaults to one derived from the browser, got {device:?}"
    );
    type_into(c, "#user", user).await;
    type_into(c, "#password", PASSWORD).await;
    click(c, "#register").await;
    wait(c, "the app after registering", "return !document.getElementById('app').hidden && document.getElementById('me').textContent", vec![]).await;
    wait_online(c, user).await;
}

/// Every message of the open chat, as a JS expression: [{id, from, seq, body, html, state}].
const MESSAGES: &str = "[...document.querySelectorAll('#messages li.msg')].map(li => ({
    id: li.dataset.id, from: li.dataset.from, seq: li.dataset.seq ? Number(li.dataset.seq) : null,
    body: li.querySelector('.body').textContent, html: li.querySelector('.body').innerHTML,
    state: li.querySelector('.tick') ? li.querySelector('.tick').dataset.state : null }))";

async fn messages(c: &Client) -> Vec<Value> {
    js(c, &format!("return {MESSAGES}"), vec![]).await.as_array().cloned().unwrap_or_default()
}

/// Waits until the open chat shows a message from `from` with `body`; returns it.
async fn wait_message(c: &Client, who: &str, from: &str, body: &str) -> Value {
    let script = format!("return {MESSAGES}.filter(m => m.from === arguments[0] && m.body === arguments[1]).pop() || null");
    wait(c, &format!("{who} to see {from}'s message {body:?}"), &script, vec![json!(from), json!(body)]).await
}

/// Waits until the own message with `body` in the open chat has the tick `state`.
async fn wait_tick(c: &Client, who: &str, body: &str, state: &str) {
    let script = format!("return {MESSAGES}.some(m => m.body === arguments[0] && m.state === arguments[1])");
    wait(c, &format!("{who}'s message {body:?} to show {state}"), &script, vec![json!(body), json!(state)]).await;
}

/// Types a message into the compose box and presses Enter.
async fn send(c: &Client, body: &str) {
    type_into(c, "#compose", &format!("{body}{ENTER}")).await;
}

/// Records every state each own message's tick goes through, from now on (window.__ticks).
const RECORD_TICKS: &str = "
    window.__ticks = {};
    const note = () => document.querySelectorAll('#messages li.msg.own').forEach(li => {
        const s = li.querySelector('.tick').dataset.state, a = (window.__ticks[li.dataset.id] ||= []);
        if (s && a[a.length - 1] !== s) a.push(s);
    });
    new MutationObserver(note).observe(document.getElementById('messages'),
        { subtree: true, childList: true, attributes: true, attributeFilter: ['data-state'] });
    note();";

async fn tick_history(c: &Client, id: &str) -> Vec<String> {
    let v = js(c, "return (window.__ticks || {})[arguments[0]] || []", vec![json!(id)]).await;
    serde_json::from_value(v).unwrap_or_default()
}

/// Keeps, in the page, every `error` frame, every `ack` (id, seq) and every `send` id in the
/// order they went out (window.__wire), for a failure's message.
const RECORD_WIRE: &str = "
    const parse = JSON.parse, send = WebSocket.prototype.send;
    window.__wire = { errors: [], acks: [], sends: [] };
    JSON.parse = function (...a) {
        const v = parse.apply(this, a);
        if (v && v.type === 'error') window.__wire.errors.push(v);
        if (v && v.type === 'ack') window.__wire.acks.push(v.id + '=' + v.seq);
        return v;
    };
    WebSocket.prototype.send = function (d) {
        if (typeof d === 'string' && d.includes('\"type\":\"send\"')) window.__wire.sends.push(parse(d).id);
        return send.call(this, d);
    };";

/// Notes, in the page, when a goaway arrives and when each new WebSocket is opened (window.__ws).
/// The socket open now predates the patch, so its frames are seen where the client parses them.
const WATCH_SOCKETS: &str = "
    const W = window.WebSocket, parse = JSON.parse;
    window.__ws = { goaway: null, opens: [] };
    window.WebSocket = class extends W {
        constructor(...a) {
            super(...a);
            window.__ws.opens.push(Date.now());
        }
    };
    JSON.parse = function (...a) {
        const v = parse.apply(this, a);
        if (v && v.type === 'goaway' && !window.__ws.goaway) window.__ws.goaway = { at: Date.now(), ms: v.retry_after_ms };
        return v;
    };";

/// Saves a screenshot under `target/tmp/screenshots/`, or into `docs/` (tracked: the README's
/// pictures) when `PARLEY_UPDATE_SCREENSHOTS=1`.
async fn screenshot(c: &Client, name: &str) {
    let png = c.screenshot().await.expect("screenshot");
    let dir = if std::env::var("PARLEY_UPDATE_SCREENSHOTS").is_ok_and(|v| v == "1") {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("docs")
    } else {
        Path::new(env!("CARGO_TARGET_TMPDIR")).join("screenshots")
    };
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    std::fs::write(dir.join(name), png).expect("write the screenshot");
}

async fn no_alert(c: &Client, who: &str) {
    if let Ok(text) = c.get_alert_text().await {
        panic!("{who}'s page opened an alert ({text:?}): markup from a message body ran");
    }
}

// ---------------------------------------------------------------------------------- the test

/// The test's name in the harness's output.
const NAME: &str = "web_client_in_headless_chromium";

/// Runs the test when Chromium and chromedriver are found; otherwise reports it `ignored` (or,
/// under CI, failed), with the reason.
fn main() -> std::process::ExitCode {
    let args = libtest_mimic::Arguments::from_args();
    let chromium = program("PARLEY_CHROMIUM", &["chromium", "chromium-browser", "google-chrome"]);
    let chromedriver = program("PARLEY_CHROMEDRIVER", &["chromedriver"]);
    let missing = "the web client's browser test needs Chromium and chromedriver \
                   (Debian: apt-get install -y chromium chromium-driver; or set PARLEY_CHROMIUM and PARLEY_CHROMEDRIVER)";
    let trial = match (chromium, chromedriver) {
        (Some(chromium), Some(chromedriver)) => libtest_mimic::Trial::test(NAME, move || {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().map_err(|e| e.to_string())?;
            rt.block_on(web_client_in_headless_chromium(chromium, chromedriver));
            Ok(())
        }),
        _ if in_ci() => libtest_mimic::Trial::test(NAME, move || Err(format!("CI: {missing}, and neither may be missing in CI").into())),
        _ => {
            let _ = writeln!(std::io::stderr(), "{NAME} is ignored: {missing}; not found on PATH");
            // Run anyway (`-- --ignored`), it fails with the reason.
            libtest_mimic::Trial::test(NAME, move || Err(missing.into())).with_ignored_flag(true)
        }
    };
    libtest_mimic::run(&args, vec![trial]).exit_code()
}

async fn web_client_in_headless_chromium(chromium: PathBuf, chromedriver: PathBuf) {
    let t0 = Instant::now();
    let b = bodies();
    let tmp = tempfile::Builder::new().prefix("parley-browser-").tempdir().expect("temp dir");
    let data = tmp.path().join("data");
    let server_log = tmp.path().join("parley.log");
    let mut server = start_server(&data, "127.0.0.1:0", &server_log);
    let addr = server.addr.clone();
    let url = format!("http://{addr}/");
    step(t0, &format!("server at {url}"));

    // The files are served from the binary with their types and a CSP without inline script.
    let (status, h, body) = http_get(&addr, "/").await;
    assert!(status.contains(" 200 "), "GET / → {status}");
    assert!(header(&h, "content-type").starts_with("text/html"), "GET / content type");
    assert!(body.contains("<script type=\"module\" src=\"/app.js\">"), "the page loads /app.js as a module");
    let csp = header(&h, "content-security-policy").to_owned();
    assert!(csp.contains("script-src 'self'") && !csp.contains("unsafe-inline") && csp.contains("default-src 'none'"), "CSP: {csp}");
    for (path, ty) in [("/app.js", "text/javascript"), ("/conn.js", "text/javascript"), ("/store.js", "text/javascript"), ("/dom.js", "text/javascript"), ("/style.css", "text/css")] {
        let (status, h, _) = http_get(&addr, path).await;
        assert!(status.contains(" 200 ") && header(&h, "content-type").starts_with(ty), "GET {path} → {status} {h:?}");
        assert_eq!(header(&h, "content-security-policy"), csp, "{path} has the CSP");
    }

    let driver = start_driver(&chromedriver, &tmp.path().join("chromedriver.log")).await;
    let alice = browser(&driver, &chromium, &tmp.path().join("profile-alice")).await;
    let bob = browser(&driver, &chromium, &tmp.path().join("profile-bob")).await;
    step(t0, "two browsers up");

    // Two users register in two browsers.
    register(&alice, &url, "alice").await;
    register(&bob, &url, "bob").await;
    step(t0, "alice and bob registered and online");
    // Bob closes his page: he is offline, so alice's first message stays at ✓.
    bob.goto("about:blank").await.expect("bob leaves");

    // Alice starts a chat by user id.
    click(&alice, "#new-chat-btn").await;
    type_into(&alice, "#peer", "bob").await;
    type_into(&alice, "#peer", ENTER).await;
    wait(&alice, "the chat with bob", "return document.getElementById('chat-title').textContent === 'bob'", vec![]).await;
    wait(&alice, "bob's last seen in the header", "return document.getElementById('chat-status').textContent.startsWith('last seen')", vec![]).await;
    js(&alice, RECORD_TICKS, vec![]).await;

    // Clock, then ✓ (stored; bob is offline).
    let a1 = &b.english[0];
    send(&alice, a1).await;
    wait_tick(&alice, "alice", a1, "sent").await;
    let m1 = wait_message(&alice, "alice", "alice", a1).await;
    let m1_id = m1["id"].as_str().expect("id").to_owned();
    assert_eq!(m1["seq"], json!(1), "the first message of the chat has seq 1");
    let list_preview = js(&alice, "return document.querySelector('#convs li[data-conv=\"dm:alice:bob\"] .preview').textContent", vec![]).await;
    assert!(list_preview.as_str().unwrap_or_default().contains(a1.as_str()), "the list shows the last message: {list_preview}");
    step(t0, "alice: clock then ✓ while bob is offline");

    // Bob comes back: his browser logs in from localStorage, gets the message: ✓✓ for alice.
    bob.goto(&url).await.expect("bob returns");
    wait_online(&bob, "bob").await;
    wait_tick(&alice, "alice", a1, "delivered").await;
    let unread = wait(
        &bob,
        "bob's unread count for the chat with alice",
        "const li = document.querySelector('#convs li[data-conv=\"dm:alice:bob\"]'); const u = li && li.querySelector('.unread'); return u ? u.textContent : null",
        vec![],
    )
    .await;
    assert_eq!(unread, json!("1"), "one unread message");
    let preview = js(&bob, "return document.querySelector('#convs li[data-conv=\"dm:alice:bob\"] .preview').textContent", vec![]).await;
    assert!(preview.as_str().unwrap_or_default().contains(a1.as_str()), "bob's list shows alice's message: {preview}");
    step(t0, "alice: ✓✓ (delivered); bob: 1 unread");

    // Bob opens the chat: read, blue ✓✓.
    click(&bob, "#convs li[data-conv=\"dm:alice:bob\"] button").await;
    wait_message(&bob, "bob", "alice", a1).await;
    wait_tick(&alice, "alice", a1, "read").await;
    let color = js(&alice, "return getComputedStyle(document.querySelector('#messages li.msg.own .tick')).color", vec![]).await;
    assert_eq!(color, json!("rgb(83, 189, 235)"), "a read message's ✓✓ is blue");
    assert_eq!(tick_history(&alice, &m1_id).await, ["sending", "sent", "delivered", "read"], "clock → ✓ → ✓✓ → blue ✓✓");
    wait(&bob, "alice online in bob's header", "return document.getElementById('chat-status').textContent === 'online'", vec![]).await;
    let badge = js(&bob, "return document.querySelector('#convs li[data-conv=\"dm:alice:bob\"] .unread')", vec![]).await;
    assert!(badge.is_null(), "no unread badge once the chat is open");
    step(t0, "alice: blue ✓✓ (read)");

    // Bob types (RTL): alice sees "typing…"; the message ends it.
    js(&bob, RECORD_TICKS, vec![]).await;
    let h1 = &b.hebrew[0];
    type_into(&bob, "#compose", h1).await;
    wait(&alice, "alice to see bob typing", "return document.getElementById('chat-status').textContent === 'typing…'", vec![]).await;
    let list_typing = js(&alice, "return document.querySelector('#convs li[data-conv=\"dm:alice:bob\"] .preview').textContent", vec![]).await;
    assert_eq!(list_typing, json!("typing…"), "the list shows typing too");
    type_into(&bob, "#compose", ENTER).await;
    let hm = wait_message(&alice, "alice", "bob", h1).await;
    wait(&alice, "the typing indicator to end", "return document.getElementById('chat-status').textContent !== 'typing…'", vec![]).await;
    let dir = js(
        &alice,
        "const b = document.querySelector(`#messages li.msg[data-id=\"${arguments[0]}\"] .body`); return [b.getAttribute('dir'), getComputedStyle(b).direction]",
        vec![hm["id"].clone()],
    )
    .await;
    assert_eq!(dir, json!(["auto", "rtl"]), "Hebrew is laid out right to left");
    wait_tick(&bob, "bob", h1, "read").await; // alice has the chat open and visible
    step(t0, "typing indicator; RTL reply read");

    // A few more turns both ways, the injection probe and a long message.
    send(&alice, &b.english[1]).await;
    wait_message(&bob, "bob", "alice", &b.english[1]).await;
    send(&bob, &b.hebrew[1]).await;
    wait_message(&alice, "alice", "bob", &b.hebrew[1]).await;
    send(&alice, XSS).await;
    let probe = wait_message(&bob, "bob", "alice", XSS).await;
    assert_eq!(probe["html"], json!("&lt;img src=x onerror=alert(1)&gt;"), "the probe is text, not an element");
    let imgs = js(&bob, "return document.querySelectorAll('#messages img, #convs img').length", vec![]).await;
    assert_eq!(imgs, json!(0), "no <img> element came from a message body");
    no_alert(&bob, "bob").await;
    no_alert(&alice, "alice").await;
    send(&alice, &b.long).await;
    wait_message(&bob, "bob", "alice", &b.long).await;
    let unbroken = format!("{}{}", "https://example.org/", "wrap/".repeat(60));
    send(&bob, &unbroken).await;
    wait_message(&alice, "alice", "bob", &unbroken).await;
    for (c, who) in [(&alice, "alice"), (&bob, "bob")] {
        let overflow = js(
            c,
            "const s = document.getElementById('scroller'); return [s.scrollWidth <= s.clientWidth, [...document.querySelectorAll('#messages .bubble')].every(b => b.scrollWidth <= b.clientWidth + 1)]",
            vec![],
        )
        .await;
        assert_eq!(overflow, json!([true, true]), "{who}: long messages wrap inside their bubbles");
    }
    wait_tick(&alice, "alice", &b.long, "read").await;
    wait_tick(&bob, "bob", &unbroken, "read").await;
    screenshot(&alice, "web-client.png").await;
    screenshot(&bob, "web-client-bob.png").await;
    step(t0, "turns both ways, injection probe shown as text, long messages wrapped; screenshots");

    // Enough messages for two history pages; bob reloads and pages back by scrolling up.
    js(&alice, RECORD_WIRE, vec![]).await;
    for t in &b.more[..55] {
        send(&alice, t).await;
    }
    wait_message(&bob, "bob", "alice", &b.more[54]).await;
    // Its own line: typing these key by key through WebDriver is most of this part's time.
    step(t0, "55 more messages typed by alice and shown to bob");
    let pair = |from: &str, body: &str| (from.to_owned(), body.to_owned());
    let mut expected = vec![
        pair("alice", a1),
        pair("bob", h1),
        pair("alice", &b.english[1]),
        pair("bob", &b.hebrew[1]),
        pair("alice", XSS),
        pair("alice", &b.long),
        pair("bob", &unbroken),
    ];
    expected.extend(b.more[..55].iter().map(|t| pair("alice", t)));
    for (i, e) in expected.iter().enumerate() {
        assert!(!expected[..i].contains(e), "the test's bodies are distinct: {e:?}");
    }
    let shown = |ms: &[Value]| -> Vec<(String, String)> { ms.iter().map(|m| pair(m["from"].as_str().unwrap_or_default(), m["body"].as_str().unwrap_or_default())).collect() };
    let before = messages(&bob).await;
    if shown(&before) != expected {
        let missing: Vec<_> = expected.iter().filter(|e| !shown(&before).contains(e)).collect();
        let ids = js(&bob, "return [...document.querySelectorAll('#messages li.msg')].map(li => li.dataset.seq + ':' + li.dataset.id).join(' ')", vec![]).await;
        let errors = js(&alice, "return window.__wire", vec![]).await;
        let first = shown(&before).iter().zip(&expected).position(|(a, b)| a != b);
        panic!("bob's chat before the reload is not every message in order; missing {missing:?}; first difference at {first:?}\nshown seq:id {ids}\nalice's page sent, got acks and errors: {errors}");
    }
    bob.refresh().await.expect("reload bob's page");
    wait_online(&bob, "bob (reloaded)").await;
    wait(&bob, "the chat to reopen after the reload with its newest page", "return document.querySelectorAll('#messages li.msg').length >= 50", vec![]).await;
    let page = messages(&bob).await;
    assert_eq!(page.len(), 50, "the newest page of history after a reload");
    js(&bob, "document.getElementById('scroller').scrollTop = 0", vec![]).await;
    wait(&bob, "the older page after scrolling up", "return document.querySelectorAll('#messages li.msg').length === arguments[0]", vec![json!(expected.len())]).await;
    let after: Vec<Value> = messages(&bob).await;
    assert_eq!(shown(&after), expected, "the history after the reload is the same, in the same order");
    let seqs: Vec<u64> = after.iter().filter_map(|m| m["seq"].as_u64()).collect();
    assert_eq!(seqs, (1..=expected.len() as u64).collect::<Vec<_>>(), "every seq once, in order");
    let bob_states: Vec<Value> = after.iter().filter(|m| m["from"] == json!("bob")).map(|m| m["state"].clone()).collect();
    assert!(bob_states.iter().all(|s| s == "read"), "bob's own messages still show blue ✓✓ after the reload: {bob_states:?}");
    let badge = js(&bob, "return document.querySelector('#convs li[data-conv=\"dm:alice:bob\"] .unread')", vec![]).await;
    assert!(badge.is_null(), "nothing unread after the reload");
    step(t0, "bob reloaded: history intact, paged by seq on scroll");

    // The server restarts. Both clients get goaway and reconnect by themselves; messages sent
    // meanwhile wait with the clock, and are resent with the same id: from the open page (bob),
    // and from localStorage after alice closed hers.
    js(&bob, WATCH_SOCKETS, vec![]).await;
    server.stop().await;
    wait(&bob, "bob's client to notice the restart", "return document.body.dataset.conn !== 'online'", vec![]).await;
    wait(&alice, "alice's client to notice the restart", "return document.body.dataset.conn !== 'online'", vec![]).await;
    js(&bob, RECORD_TICKS, vec![]).await;
    send(&bob, &b.hebrew[2]).await;
    send(&alice, &b.english[2]).await;
    wait_tick(&bob, "bob", &b.hebrew[2], "sending").await;
    wait_tick(&alice, "alice", &b.english[2], "sending").await;
    let banner = js(&bob, "return document.getElementById('conn').textContent", vec![]).await;
    assert!(banner.as_str().unwrap_or_default().contains("1 message waiting to be sent"), "bob's banner: {banner}");
    let outbox = js(
        &alice,
        "const s = JSON.parse(localStorage.getItem(Object.keys(localStorage).find(k => k.startsWith('parley.v1.state:alice:')))); return s.outbox",
        vec![],
    )
    .await;
    let outbox = outbox.as_array().cloned().unwrap_or_default();
    assert_eq!(outbox.len(), 1, "alice's unsent message is in localStorage: {outbox:?}");
    assert_eq!(outbox[0]["body"], json!(b.english[2]));
    let unsent_id = outbox[0]["id"].as_str().expect("id").to_owned();
    alice.goto("about:blank").await.expect("alice closes the page");
    server = start_server(&data, &addr, &server_log);
    assert_eq!(server.addr, addr, "restarted on the same address");
    step(t0, "server restarted");
    wait_online(&bob, "bob (reconnected)").await;
    let ws = js(&bob, "return window.__ws", vec![]).await;
    let (at, ms) = (ws["goaway"]["at"].as_f64(), ws["goaway"]["ms"].as_f64());
    let (Some(at), Some(ms)) = (at, ms) else { panic!("bob's page got no goaway: {ws}") };
    let first = ws["opens"].as_array().and_then(|o| o.first()).and_then(Value::as_f64).expect("bob reconnected");
    assert!(first >= at + ms, "bob's client waited the goaway's retry_after_ms ({ms} ms) before reconnecting: {ws}");
    step(t0, &format!("bob reconnected {:.0} ms after a goaway with retry_after_ms {ms}", first - at));
    wait_tick(&bob, "bob", &b.hebrew[2], "sent").await;
    alice.goto(&url).await.expect("alice reopens the client");
    wait_online(&alice, "alice (reopened)").await;
    let resent = wait_message(&bob, "bob", "alice", &b.english[2]).await;
    assert_eq!(resent["id"], json!(unsent_id), "the message from localStorage was sent with its original id");
    wait_message(&alice, "alice", "bob", &b.hebrew[2]).await;
    wait_tick(&alice, "alice", &b.english[2], "read").await;
    wait_tick(&bob, "bob", &b.hebrew[2], "read").await;
    let bob_id = messages(&bob).await.iter().find(|m| m["body"] == json!(b.hebrew[2])).map(|m| m["id"].clone()).expect("bob's message");
    let hist = tick_history(&bob, bob_id.as_str().unwrap_or_default()).await;
    assert_eq!(hist.first().map(String::as_str), Some("sending"), "bob's offline message began with the clock: {hist:?}");
    for (c, who) in [(&alice, "alice"), (&bob, "bob")] {
        let all = messages(c).await;
        for body in [&b.english[2], &b.hebrew[2]] {
            let n = all.iter().filter(|m| m["body"] == json!(body)).count();
            assert_eq!(n, 1, "{who} sees {body:?} exactly once");
        }
    }
    step(t0, "after the restart: unsent messages delivered once, with their ids");

    // A group: alice creates it with bob, sees its members; bob gets the message.
    click(&alice, "#new-group-btn").await;
    type_into(&alice, "#group-name", "Weekend plans").await;
    type_into(&alice, "#group-members", "bob").await;
    type_into(&alice, "#group-members", ENTER).await;
    wait(&alice, "the group chat", "return document.getElementById('chat-title').textContent === 'Weekend plans'", vec![]).await;
    let gconv = js(&alice, "return document.querySelector('#convs li.active').dataset.conv", vec![]).await;
    let gconv = gconv.as_str().expect("group id").to_owned();
    assert!(gconv.starts_with("g:"), "a group conversation: {gconv}");
    click(&alice, "#members-btn").await;
    let members = wait(
        &alice,
        "the member list",
        "const l = [...document.querySelectorAll('#members-list li')].map(li => li.dataset.user + (li.querySelector('.badge') ? ' (admin)' : '')); return l.length === 2 ? l : null",
        vec![],
    )
    .await;
    let mut members: Vec<String> = serde_json::from_value(members).unwrap_or_default();
    members.sort();
    assert_eq!(members, ["alice (admin)", "bob"], "members, with the admin");
    js(&alice, RECORD_TICKS, vec![]).await;
    send(&alice, &b.english[3]).await;
    wait_tick(&alice, "alice", &b.english[3], "delivered").await;
    click(&bob, &format!("#convs li[data-conv=\"{gconv}\"] button")).await;
    let gm = wait_message(&bob, "bob", "alice", &b.english[3]).await;
    let from_label = js(&bob, "return document.querySelector(`#messages li.msg[data-id=\"${arguments[0]}\"] .from`).textContent", vec![gm["id"].clone()]).await;
    assert_eq!(from_label, json!("alice"), "group messages name their sender");
    let names = wait(&bob, "the group's members in bob's header", "const t = document.getElementById('chat-status').textContent; return t.includes(',') ? t : null", vec![]).await;
    let mut names: Vec<&str> = names.as_str().unwrap_or_default().split(", ").collect();
    names.sort();
    assert_eq!(names, ["You", "alice"], "bob's header lists the group's members");
    wait_tick(&alice, "alice", &b.english[3], "read").await;
    step(t0, "group created, members shown, message read");

    no_alert(&alice, "alice").await;
    no_alert(&bob, "bob").await;
    let _ = alice.close().await;
    let _ = bob.close().await;
    drop(driver);
    drop(server);
    step(t0, "done");
}
