//! Operations (issue 7): `parley admin` on a stopped data directory (users, stats, verify,
//! backup, restore), the online backup `POST /v1/admin/backup` under load, retention, metrics,
//! and logs that never hold a password, a token or a message body.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use parley::protocol::{close, ClientFrame, EventPayload, MessageView, ServerFrame};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::common::{dialog, http, within, Client, Server, TestDir, PASSWORD, T};
use crate::overload::{http_full, metric, metrics, Raw};

// ---------------------------------------------------------------------------------- helpers

/// What one `parley admin` run did.
struct Run {
    code: Option<i32>,
    out: String,
    err: String,
}

impl Run {
    fn ok(&self) -> bool {
        self.code == Some(0)
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit {:?}\nstdout: {}\nstderr: {}", self.code, self.out, self.err)
    }
}

/// The binary through a symlink in the test's directory (like the harness's servers: its
/// command line holds no "parley", so nobody's broad `pkill parley` stops it).
fn exe(dir: &TestDir) -> PathBuf {
    let link = dir.path().join("it-admin");
    if !link.exists() {
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_parley"), &link).expect("symlink the binary");
    }
    link
}

/// `parley admin --data DATA ARGS...` with `stdin` as its standard input (cheap argon2).
async fn admin(dir: &TestDir, data: &Path, args: &[&str], stdin: Option<&str>) -> Run {
    let mut cmd = tokio::process::Command::new(exe(dir));
    cmd.arg("admin")
        .arg("--data")
        .arg(data)
        .args(args)
        .env_remove("RUST_LOG")
        .env("PARLEY__AUTH__ARGON2_MEMORY_KIB", "1024")
        .env("PARLEY__AUTH__ARGON2_ITERATIONS", "1")
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().expect("spawn parley admin");
    if let Some(s) = stdin {
        let mut i = child.stdin.take().expect("stdin");
        i.write_all(s.as_bytes()).await.expect("write stdin");
        drop(i);
    }
    let o = within(T, &format!("parley admin {args:?}"), child.wait_with_output()).await.expect("wait");
    Run { code: o.status.code(), out: String::from_utf8_lossy(&o.stdout).into_owned(), err: String::from_utf8_lossy(&o.stderr).into_owned() }
}

/// Asserts that an admin command was refused because a server holds the data directory.
fn refused_while_running(r: &Run, what: &str) {
    assert!(!r.ok(), "{what} ran while a server holds the directory: {r}");
    assert!(r.err.contains("in use by another parley process") && r.err.contains("stop it first"), "{what}: unclear refusal: {r}");
}

/// SIGTERM and a clean exit.
async fn stop(srv: &mut Server) {
    srv.sigterm();
    let st = srv.wait_exit().await;
    assert_eq!(st.code(), Some(0), "exit after SIGTERM: {st:?}");
}

/// Opens a socket with `hello` and returns how it closed (for tokens that must be refused).
async fn hello_close(addr: std::net::SocketAddr, token: &str) -> Option<u16> {
    let mut s = Raw::open(addr).await;
    s.hello(token, None).await;
    let (frames, code) = s.until_closed().await;
    assert!(frames.is_empty(), "frames before the close: {frames:?}");
    code
}

/// The `.wal` segment files of a data directory, in order.
fn segments(data: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(data.join("wal"))
        .expect("wal dir")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "wal"))
        .collect();
    v.sort();
    v
}

/// The byte ranges of the records of a segment (format version 1: an 8-byte header, then
/// `len: u32 LE | crc: u32 | body (len bytes)`).
fn records(seg: &[u8]) -> Vec<std::ops::Range<usize>> {
    assert_eq!(&seg[..7], b"PRLYWAL", "segment magic");
    let mut out = Vec::new();
    let mut at = 8;
    while at + 8 <= seg.len() {
        let len = u32::from_le_bytes(seg[at..at + 4].try_into().expect("4 bytes")) as usize;
        if len == 0 || at + 8 + len > seg.len() {
            break;
        }
        out.push(at..at + 8 + len);
        at += 8 + len;
    }
    out
}

/// A message history page: (messages, more, deleted_upto).
pub(crate) async fn page(c: &mut Client, conv: &str) -> (Vec<MessageView>, bool, Option<u64>) {
    match c.request("page", ClientFrame::History { conv: conv.to_owned(), before: None, limit: Some(200) }).await {
        ServerFrame::History { messages, more, deleted_upto, .. } => (messages, more, deleted_upto),
        f => panic!("history of {conv}: {f:?}"),
    }
}

/// Polls the history of `conv` until retention has deleted everything up to `upto` (an empty
/// page with `deleted_upto`, or one starting after it).
pub(crate) async fn wait_purged(c: &mut Client, conv: &str, upto: u64) -> Vec<MessageView> {
    let deadline = Instant::now() + T;
    loop {
        let (ms, more, deleted) = page(c, conv).await;
        if deleted == Some(upto) {
            assert!(!more, "{conv}: more=true on a page reaching deleted messages");
            assert!(ms.first().is_none_or(|m| m.seq == upto + 1), "{conv}: page after deleted_upto {upto}: {ms:?}");
            return ms;
        }
        assert!(deleted.is_none_or(|d| d < upto), "{conv}: deleted_upto {deleted:?} is past {upto}");
        assert!(Instant::now() < deadline, "{conv}: messages up to {upto} not deleted within {T:?} (deleted_upto {deleted:?})");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// alice sends five messages to bob; bob reads and confirms them, then alice confirms her own
/// stream; returns once retention has deleted them (`deleted_upto` 5).
async fn five_delivered_then_deleted(alice: &mut Client, bob: &mut Client, t: &[String]) {
    for (k, body) in t[..5].iter().enumerate() {
        alice.send_acked(&format!("m{k}"), "bob", body).await;
    }
    for _ in 0..5 {
        bob.message_event().await;
    }
    bob.send(ClientFrame::Received { up_to: 5 }).await;
    bob.barrier().await;
    alice.send(ClientFrame::Received { up_to: u64::MAX / 2 }).await;
    alice.barrier().await;
    let left = wait_purged(bob, "dm:alice:bob", 5).await;
    assert!(left.is_empty());
}

// ---------------------------------------------------------------------------------- 11. admin

/// `parley admin` adds (password from --password or stdin), lists, deletes users and resets
/// passwords on a stopped directory; refuses everything while a server holds it; `stats`
/// counts what was sent; `verify` passes a healthy directory and names a corrupt log record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_manages_users_offline_counts_verifies_and_refuses_while_a_server_runs() {
    const NEW_PASSWORD: &str = "a brand new passphrase";
    let dir = TestDir::new();
    let data = dir.data();
    let r = admin(&dir, &data, &["user", "add", "alice", "--password", PASSWORD], None).await;
    assert!(r.ok() && r.out.contains("alice"), "{r}");
    let r = admin(&dir, &data, &["user", "add", "bob"], Some(&format!("{PASSWORD}\n"))).await;
    assert!(r.ok(), "password from stdin: {r}");
    let r = admin(&dir, &data, &["user", "add", "alice", "--password", PASSWORD], None).await;
    assert!(!r.ok() && r.err.contains("exists"), "adding alice twice: {r}");
    let r = admin(&dir, &data, &["user", "add", "Not Valid", "--password", PASSWORD], None).await;
    assert!(!r.ok() && r.err.contains("user must be"), "{r}");
    let r = admin(&dir, &data, &["user", "add", "dave", "--password", "short"], None).await;
    assert!(!r.ok() && r.err.contains("8-256"), "{r}");
    let r = admin(&dir, &data, &["user", "add", "dave"], Some("")).await;
    assert!(!r.ok() && r.err.contains("no password"), "{r}");
    let r = admin(&dir, &data, &["user", "list"], None).await;
    assert!(r.ok(), "{r}");
    let listed: Vec<&str> = r.out.lines().filter_map(|l| l.split('\t').next()).collect();
    assert_eq!(listed, ["alice", "bob"], "{r}");

    // A server on the directory: the users added offline log in.
    let token = "ops-admin-token-0123456789";
    let mut srv = Server::start_with(&dir, &[("PARLEY__ADMIN__TOKEN", token)]).await;
    let a = srv.login("alice", "web").await;
    let b_old = srv.login("bob", "web").await;
    let c_old = srv.user("carol").await;
    let mut alice = srv.connect(&a, None).await.client;
    let mut carol = srv.connect(&c_old, None).await.client;
    let t = dialog(11, 20);
    for (k, body) in t[..7].iter().enumerate() {
        alice.send_acked(&format!("ab{k}"), "bob", body).await;
    }
    for (k, body) in t[7..11].iter().enumerate() {
        carol.send_acked(&format!("ca{k}"), "alice", body).await;
    }
    let group = match alice.request("g", ClientFrame::GroupCreate { name: "ops".into(), members: vec!["bob".into(), "carol".into()] }).await {
        ServerFrame::Result { group: Some(g), .. } => g,
        f => panic!("group_create: {f:?}"),
    };
    for (k, body) in t[11..14].iter().enumerate() {
        alice.send_acked(&format!("g{k}"), &group, body).await;
    }
    // An online backup, to try an offline restore onto the running directory below.
    let bdir = dir.path().join("online-backup");
    let r = http_full(srv.addr, "POST", "/v1/admin/backup", &[("Authorization", &format!("Bearer {token}"))], &json!({"dir": bdir}).to_string()).await;
    assert_eq!(r.status, 200, "{}", r.text());

    // Every admin command refuses while the server holds the directory.
    let b2 = dir.path().join("b2");
    let b2s = b2.to_str().expect("utf-8 path");
    let bds = bdir.to_str().expect("utf-8 path");
    let running: [&[&str]; 9] = [
        &["user", "list"],
        &["user", "add", "dave", "--password", PASSWORD],
        &["user", "delete", "carol"],
        &["user", "reset-password", "bob", "--password", NEW_PASSWORD],
        &["stats"],
        &["verify"],
        &["backup", b2s],
        &["restore", bds],
        &["restore", bds, "--force"],
    ];
    for args in running {
        let r = admin(&dir, &data, args, None).await;
        refused_while_running(&r, &args.join(" "));
    }
    assert!(!b2.exists(), "the refused backup wrote {}", b2.display());
    // ... and left the server alone.
    alice.send_acked("after-refusals", "bob", &t[14]).await;
    stop(&mut srv).await;

    // stats: 3 users, 3 conversations (2 dms, 1 group), 1 group, 15 messages.
    let r = admin(&dir, &data, &["stats"], None).await;
    assert!(r.ok(), "{r}");
    for want in ["users: 3", "conversations: 3", "groups: 1", "messages: 15"] {
        assert!(r.out.lines().any(|l| l == want), "stats lacks `{want}`: {r}");
    }
    let r = admin(&dir, &data, &["verify"], None).await;
    assert!(r.ok() && r.out.contains("verify: OK") && r.out.contains("replay compared: yes"), "{r}");

    // Delete carol; reset bob's password (from stdin).
    let r = admin(&dir, &data, &["user", "delete", "carol"], None).await;
    assert!(r.ok(), "{r}");
    let r = admin(&dir, &data, &["user", "delete", "nobody"], None).await;
    assert!(!r.ok() && r.err.contains("no user nobody"), "{r}");
    let r = admin(&dir, &data, &["user", "reset-password", "bob"], Some(&format!("{NEW_PASSWORD}\n"))).await;
    assert!(r.ok(), "{r}");
    let r = admin(&dir, &data, &["user", "list"], None).await;
    assert!(r.out.lines().any(|l| l.starts_with("carol\t") && l.ends_with("\tdeleted")), "{r}");

    srv.restart().await;
    // carol: her token is refused, she cannot log in, her id cannot be registered again.
    assert_eq!(hello_close(srv.addr, &c_old).await, Some(close::UNAUTHORIZED), "a deleted user's token");
    let (st, body) = http(srv.addr, "POST", "/v1/login", Some(&json!({"user": "carol", "password": PASSWORD})), None).await;
    assert_eq!(st, 401, "login of a deleted user: {body}");
    let (st, body) = http(srv.addr, "POST", "/v1/register", Some(&json!({"user": "carol", "password": PASSWORD})), None).await;
    assert_eq!((st, body["error"].as_str()), (409, Some("user_exists")), "registering a deleted id: {body}");
    assert!(body["message"].as_str().is_some_and(|m| m.contains("deleted user")), "the refusal says why: {body}");
    // She left the group.
    let mut alice = srv.connect(&a, None).await.client;
    match alice.request("gi", ClientFrame::GroupInfo { group: group.clone() }).await {
        ServerFrame::Result { members: Some(mut m), .. } => {
            m.sort();
            assert_eq!(m, ["alice", "bob"], "members after carol's deletion");
        }
        f => panic!("group_info: {f:?}"),
    }
    // bob: the old token and the old password are refused, the new one works.
    assert_eq!(hello_close(srv.addr, &b_old).await, Some(close::UNAUTHORIZED), "a token from before the reset");
    let (st, body) = http(srv.addr, "POST", "/v1/login", Some(&json!({"user": "bob", "password": PASSWORD})), None).await;
    assert_eq!(st, 401, "the old password after a reset: {body}");
    let (st, body) = http(srv.addr, "POST", "/v1/login", Some(&json!({"user": "bob", "password": NEW_PASSWORD})), None).await;
    assert_eq!(st, 200, "the new password: {body}");
    let mut bob = srv.connect(body["token"].as_str().expect("token"), None).await.client;
    assert_eq!(bob.history_all("dm:alice:bob").await.len(), 8);
    stop(&mut srv).await;

    // verify names a corrupt record in the middle of the log.
    let r = admin(&dir, &data, &["verify"], None).await;
    assert!(r.ok(), "{r}");
    let segs = segments(&data);
    let seg = segs.last().expect("a log segment");
    let mut bytes = std::fs::read(seg).expect("read segment");
    let recs = records(&bytes);
    assert!(recs.len() >= 10, "only {} log records", recs.len());
    let mid = recs[recs.len() / 2].clone();
    let at = mid.start + 8 + 16 + (mid.len() - 24) / 2; // inside the payload
    bytes[at] ^= 0x20;
    std::fs::write(seg, &bytes).expect("write segment");
    let r = admin(&dir, &data, &["verify"], None).await;
    let name = seg.file_name().and_then(|n| n.to_str()).expect("name");
    println!("verify on a corrupt log: {r}");
    assert!(!r.ok(), "verify passed a corrupt log: {r}");
    assert!(r.err.contains("corrupt") && r.err.contains(name) && r.err.contains(&mid.start.to_string()), "verify does not name the bad record ({name} at byte {}): {r}", mid.start);
}

/// The papercuts of issue 15: `--data` after the subcommand, dates in ISO 8601 (raw ms under
/// `--json`), deleted users counted apart, a deleted user's id refused with a reason, a second
/// delete refused, and a backup refusal said once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_says_what_happened_to_deleted_users_and_takes_data_anywhere() {
    let dir = TestDir::new();
    let data = dir.data();
    let d = data.to_str().expect("utf-8 path");
    // `--data` after the subcommand, and before it (the harness's way).
    for user in ["frank", "grace"] {
        let r = admin(&dir, &data, &["user", "add", user, "--password", PASSWORD, "--data", d], None).await;
        assert!(r.ok(), "{r}");
    }
    assert!(data.join(parley::data_dir::MARKER).is_file(), "no marker in a directory admin made");
    let r = admin(&dir, &data, &["user", "delete", "frank", "--data", d], None).await;
    assert!(r.ok(), "{r}");
    let r = admin(&dir, &data, &["user", "delete", "frank"], None).await;
    assert_eq!(r.code, Some(1), "{r}");
    assert!(r.err.contains("user frank was already deleted"), "{r}");
    let r = admin(&dir, &data, &["user", "add", "frank", "--password", PASSWORD], None).await;
    assert!(!r.ok() && r.err.contains("belonged to a deleted user") && r.err.contains("never given out again"), "{r}");
    let r = admin(&dir, &data, &["user", "reset-password", "frank", "--password", PASSWORD], None).await;
    assert!(r.code == Some(1) && r.err.contains("user frank was deleted"), "{r}");

    let r = admin(&dir, &data, &["user", "list", "--data", d], None).await;
    assert!(r.ok(), "{r}");
    let lines: Vec<Vec<&str>> = r.out.lines().map(|l| l.split('\t').collect()).collect();
    assert_eq!(lines.len(), 2, "{r}");
    assert_eq!((lines[0][0], lines[0].get(2).copied()), ("frank", Some("deleted")), "{r}");
    let created = lines[1][1].strip_prefix("created=").unwrap_or_else(|| panic!("no created=: {r}"));
    // 2026-11-29T10:32:11.346Z
    let shape: String = created.chars().map(|c| if c.is_ascii_digit() { '9' } else { c }).collect();
    assert_eq!(shape, "9999-99-99T99:99:99.999Z", "not ISO 8601 UTC: {created}");
    let r = admin(&dir, &data, &["user", "list", "--json"], None).await;
    let v: Value = serde_json::from_str(&r.out).unwrap_or_else(|e| panic!("--json: {e}: {r}"));
    let grace = &v.as_array().expect("an array")[1];
    assert_eq!((grace["user"].as_str(), grace["deleted"].as_bool()), (Some("grace"), Some(false)), "{v}");
    let ms = grace["created_ms"].as_u64().expect("created_ms");
    assert!(ms.abs_diff(crate::common::now_ms()) < 3_600_000, "created_ms {ms} is not ms since the epoch");
    assert_eq!(parley::admin::iso8601_utc(ms), created);

    let r = admin(&dir, &data, &["stats", "--data", d], None).await;
    for want in ["users: 1", "deleted users: 1"] {
        assert!(r.out.lines().any(|l| l == want), "stats lacks `{want}`: {r}");
    }

    // A second backup into the same directory is refused, and says so once.
    let b = dir.path().join("backup");
    let r = admin(&dir, &data, &["backup", b.to_str().expect("utf-8")], None).await;
    assert!(r.ok(), "{r}");
    let r = admin(&dir, &data, &["backup", b.to_str().expect("utf-8")], None).await;
    assert!(!r.ok() && r.err.matches("not empty").count() == 1, "said once: {r}");
    assert_eq!(r.err.trim().lines().count(), 1, "{r}");
    // ... and so is one holding someone's files (a backup is never mixed with them).
    let full = dir.path().join("full");
    std::fs::create_dir(&full).expect("mkdir");
    std::fs::write(full.join("notes.txt"), "x").expect("write");
    let r = admin(&dir, &data, &["backup", full.to_str().expect("utf-8")], None).await;
    assert!(!r.ok() && r.err.contains("is not empty; a backup goes into a new or empty directory"), "{r}");
    assert_eq!(std::fs::read_dir(&full).expect("read").count(), 1, "the refused backup wrote into {}", full.display());
}

// ---------------------------------------------------------------------------------- 12. backup

/// Sends `me` → `to` in windows of 4 until `stop`; returns every ack with when it arrived.
async fn backup_load(mut c: Client, me: &'static str, to: &'static str, stop: tokio::sync::watch::Receiver<bool>, tick: tokio::sync::mpsc::UnboundedSender<()>) -> Vec<(String, String, u64, Instant)> {
    let t = dialog(me.len() * 13, 50);
    let mut acks = Vec::new();
    let mut k = 0;
    while !*stop.borrow() {
        let ids: Vec<String> = (0..4).map(|i| format!("{me}-{}", k + i)).collect();
        for (i, id) in ids.iter().enumerate() {
            c.send_msg(id, to, &t[(k + i) % t.len()]).await;
        }
        k += 4;
        for id in &ids {
            let (conv, seq, _) = c.ack(id).await;
            acks.push((id.clone(), conv, seq, Instant::now()));
            let _ = tick.send(());
        }
        c.take_stash();
    }
    acks
}

/// `POST /v1/admin/backup` while clients send (401 without the token, 404 when none is set),
/// then `parley admin restore`: the restored server has every message acked before the backup
/// was asked for, exactly once, and its sequences go on without a gap. Also the offline
/// `parley admin backup`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_under_load_and_restore_keep_every_acked_message_once() {
    const TOKEN: &str = "ops-backup-token-0123456789";
    let dir = TestDir::new();
    let mut srv = Server::start_with(&dir, &[("PARLEY__ADMIN__TOKEN", TOKEN)]).await;
    let ann = srv.user("ann").await;
    let ben = srv.user("ben").await;
    let backup = dir.path().join("backup");
    let body = json!({"dir": backup}).to_string();
    let r = http_full(srv.addr, "POST", "/v1/admin/backup", &[], &body).await;
    assert_eq!((r.status, r.json()["error"].as_str()), (401, Some("unauthorized")), "{}", r.text());
    let r = http_full(srv.addr, "POST", "/v1/admin/backup", &[("Authorization", "Bearer not-the-token-at-all")], &body).await;
    assert_eq!(r.status, 401, "{}", r.text());
    let r = http_full(srv.addr, "GET", "/v1/admin/backup", &[("Authorization", &format!("Bearer {TOKEN}"))], "").await;
    assert_eq!((r.status, r.json()["error"].as_str(), r.header("allow")), (405, Some("bad_request"), Some("POST")), "GET with a token set: {}", r.text());
    assert!(!backup.exists());

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (tick, mut ticks) = tokio::sync::mpsc::unbounded_channel();
    let ca = srv.connect(&ann, None).await.client;
    let cb = srv.connect(&ben, None).await.client;
    let ta = tokio::spawn(backup_load(ca, "ann", "ben", stop_rx.clone(), tick.clone()));
    let tb = tokio::spawn(backup_load(cb, "ben", "ann", stop_rx, tick));
    for _ in 0..100 {
        within(T, "acks before the backup", ticks.recv()).await.expect("a sender ended");
    }
    let t_asked = Instant::now();
    let r = http_full(srv.addr, "POST", "/v1/admin/backup", &[("Authorization", &format!("Bearer {TOKEN}"))], &body).await;
    let t_answered = Instant::now();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.json()["applied_index"].as_u64().is_some_and(|i| i > 0), "{}", r.text());
    // A second backup into the same directory is refused.
    let r2 = http_full(srv.addr, "POST", "/v1/admin/backup", &[("Authorization", &format!("Bearer {TOKEN}"))], &body).await;
    assert_eq!(r2.status, 400, "{}", r2.text());
    for _ in 0..50 {
        within(T, "acks after the backup", ticks.recv()).await.expect("a sender ended");
    }
    stop_tx.send(true).expect("stop");
    let mut acks = within(T, "ann's sender", ta).await.expect("ann");
    acks.extend(within(T, "ben's sender", tb).await.expect("ben"));
    let all: BTreeMap<String, (String, u64)> = acks.iter().map(|(id, c, s, _)| (id.clone(), (c.clone(), *s))).collect();
    let before: BTreeMap<String, (String, u64)> = acks.iter().filter(|a| a.3 < t_asked).map(|(id, c, s, _)| (id.clone(), (c.clone(), *s))).collect();
    let during: BTreeSet<String> = acks.iter().filter(|a| a.3 >= t_asked && a.3 <= t_answered).map(|a| a.0.clone()).collect();

    // Restore into a fresh directory and start a server there.
    let fresh = TestDir::new();
    let r = admin(&dir, &fresh.data(), &["restore", backup.to_str().expect("path")], None).await;
    assert!(r.ok(), "{r}");
    let mut restored = Server::start(&fresh).await;
    // Its log starts after the backup's index: a snapshot is taken at start-up, so a damaged
    // state could be rebuilt at once rather than after the first checkpoint.
    let snaps: Vec<_> = std::fs::read_dir(fresh.data().join("snapshots")).expect("a snapshots directory").flatten().filter(|e| e.path().extension().is_some_and(|x| x == "snap")).collect();
    assert_eq!(snaps.len(), 1, "one snapshot after starting on a restored backup");
    let r = http_full(restored.addr, "POST", "/v1/admin/backup", &[("Authorization", &format!("Bearer {TOKEN}"))], &body).await;
    assert_eq!((r.status, r.json()["error"].as_str()), (404, Some("not_found")), "no admin token set: {}", r.text());
    let r = http_full(restored.addr, "GET", "/v1/admin/backup", &[], "").await;
    assert_eq!((r.status, r.json()["error"].as_str()), (404, Some("not_found")), "GET, no admin token set: {}", r.text());
    let mut c = restored.connect(&ann, None).await.client;
    let h = c.history_all("dm:ann:ben").await;
    let ids: BTreeSet<String> = h.iter().map(|m| m.id.clone()).collect();
    assert_eq!(ids.len(), h.len(), "a message is stored twice in the backup");
    for (id, (_, seq)) in &before {
        assert_eq!(h.get(*seq as usize - 1).map(|m| m.id.as_str()), Some(id.as_str()), "{id}, acked before the backup was asked for, is not at seq {seq}");
    }
    for m in &h {
        assert_eq!(all.get(&m.id).map(|a| a.1), Some(m.seq), "the backup holds {} at seq {}, which was not acked so", m.id, m.seq);
    }
    let in_window = during.iter().filter(|id| ids.contains(*id)).count();
    println!(
        "backup: {} acked in all, {} before the request ({} in the backup), {} while it ran ({in_window} in it), backup took {:?}",
        all.len(),
        before.len(),
        h.len(),
        during.len(),
        t_answered - t_asked
    );
    // The sequences go on without a gap.
    let n = h.len() as u64;
    for k in 0..3 {
        let (_, seq, _) = c.send_acked(&format!("new{k}"), "ben", &dialog(5, 3)[k]).await;
        assert_eq!(seq, n + 1 + k as u64, "seq after the restore");
    }
    assert_eq!(c.history_all("dm:ann:ben").await.len() as u64, n + 3);
    stop(&mut restored).await;
    // Restoring onto a directory in use (not empty) needs --force.
    let r = admin(&dir, &fresh.data(), &["restore", backup.to_str().expect("path")], None).await;
    assert!(!r.ok() && r.err.contains("--force"), "{r}");

    // Offline backup of the original directory, restored: everything acked is there once.
    stop(&mut srv).await;
    let offline = dir.path().join("offline-backup");
    let r = admin(&dir, &dir.data(), &["backup", offline.to_str().expect("path")], None).await;
    assert!(r.ok(), "{r}");
    // A backup is not a data directory: commands that would open it (and so change it in place,
    // while its BACKUP.json names the index it was taken at) are refused, and leave it as it was.
    let before = std::fs::read_dir(&offline).expect("backup").count();
    for args in [&["stats"][..], &["verify"], &["user", "add", "zed", "--password", "correct horse battery"]] {
        let r = admin(&dir, &offline, args, None).await;
        assert!(!r.ok() && r.err.contains("is a backup") && r.err.contains("parley admin restore"), "{args:?} on a backup: {r}");
    }
    assert_eq!(std::fs::read_dir(&offline).expect("backup").count(), before, "the refused commands left the backup unchanged");
    assert!(!offline.join("LOCK").exists(), "no lock file in the backup");
    let fresh2 = TestDir::new();
    let r = admin(&dir, &fresh2.data(), &["restore", offline.to_str().expect("path")], None).await;
    assert!(r.ok(), "{r}");
    let r = admin(&dir, &fresh2.data(), &["verify"], None).await;
    assert!(r.ok(), "verify of a restored backup: {r}");
    let restored2 = Server::start(&fresh2).await;
    let mut c = restored2.connect(&ben, None).await.client;
    let h = c.history_all("dm:ann:ben").await;
    assert_eq!(h.len(), all.len(), "the offline backup holds every acked message");
    for m in &h {
        assert_eq!(all.get(&m.id).map(|a| a.1), Some(m.seq), "{} at seq {}", m.id, m.seq);
    }
}

// ---------------------------------------------------------------------------------- 13. retention

/// `retention.mode = "delivered"`: once every device of both users confirmed them, messages are
/// deleted (history: `deleted_upto`, a resync skips them); messages a device has not confirmed
/// are kept until it does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivered_retention_deletes_what_every_device_confirmed_and_keeps_the_rest() {
    let dir = TestDir::new();
    let env = [("PARLEY__RETENTION__MODE", "delivered"), ("PARLEY__RETENTION__INTERVAL_MS", "100")];
    let srv = Server::start_with(&dir, &env).await;
    let a = srv.user("alice").await;
    let b = srv.user("bob").await;
    let c = srv.user("carol").await;
    let t = dialog(13, 10);
    let mut alice = srv.connect(&a, None).await.client;
    let mut bob = srv.connect(&b, None).await.client;
    five_delivered_then_deleted(&mut alice, &mut bob, &t).await;
    match bob.request("cv", ClientFrame::Conversations).await {
        ServerFrame::Conversations { items, .. } => {
            let it = items.iter().find(|i| i.conv == "dm:alice:bob").expect("the conversation is still listed");
            assert_eq!((it.last_seq, it.last.is_none()), (5, true), "{it:?}");
        }
        f => panic!("{f:?}"),
    }

    // bob gets a second device, which has confirmed nothing yet.
    let phone = srv.login("bob", "phone").await;
    let mut carol = srv.connect(&c, None).await.client;
    for (k, body) in t[5..8].iter().enumerate() {
        alice.send_acked(&format!("m{}", 5 + k), "bob", body).await;
    }
    for (k, body) in t[8..10].iter().enumerate() {
        alice.send_acked(&format!("c{k}"), "carol", body).await;
    }
    alice.send(ClientFrame::Received { up_to: u64::MAX / 2 }).await;
    alice.barrier().await;
    for _ in 0..3 {
        bob.message_event().await;
    }
    bob.send(ClientFrame::Received { up_to: u64::MAX / 2 }).await;
    bob.barrier().await;
    // carol confirms last: once her conversation is purged, a retention pass has seen every
    // confirmation above.
    for _ in 0..2 {
        carol.message_event().await;
    }
    carol.send(ClientFrame::Received { up_to: u64::MAX / 2 }).await;
    carol.barrier().await;
    wait_purged(&mut carol, "dm:alice:carol", 2).await;
    let (kept, more, deleted) = page(&mut bob, "dm:alice:bob").await;
    assert_eq!((kept.iter().map(|m| m.seq).collect::<Vec<_>>(), more, deleted), (vec![6, 7, 8], false, Some(5)), "bob's phone has not confirmed 6-8");
    // The phone syncs (the deleted ones skipped) and confirms: now they go too.
    let mut p = Raw::open(srv.addr).await;
    p.hello(&phone, None).await;
    let (_, backlog) = p.sync().await;
    let seqs: Vec<u64> = backlog.iter().filter_map(|(_, e)| if let EventPayload::Message(m) = e { Some(m.seq) } else { None }).collect();
    assert_eq!(seqs, [6, 7, 8], "the phone's first sync");
    p.json(json!({"type": "received", "up_to": u64::MAX / 2})).await;
    p.barrier().await;
    wait_purged(&mut bob, "dm:alice:bob", 8).await;
    let m = metrics(srv.addr).await;
    assert_eq!(metric(&m, "parley_retention_deleted_total", &[]), Some(10.0));
}

/// A resync from a cursor before messages that retention deleted skips their events and still
/// ends with `synced` (docs/protocol.md: "a resync skips their events, so `ev` numbers jump over
/// them"), also when a whole page of `sync_page_events` events is deleted ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resync_over_deleted_messages_skips_them_and_ends_with_synced() {
    let dir = TestDir::new();
    let env = [("PARLEY__RETENTION__MODE", "delivered"), ("PARLEY__RETENTION__INTERVAL_MS", "100"), ("PARLEY__SESSION__SYNC_PAGE_EVENTS", "2")];
    let srv = Server::start_with(&dir, &env).await;
    let a = srv.user("alice").await;
    let b = srv.user("bob").await;
    let t = dialog(16, 8);
    let mut alice = srv.connect(&a, None).await.client;
    let mut bob = srv.connect(&b, None).await.client;
    five_delivered_then_deleted(&mut alice, &mut bob, &t).await;
    // Everything up to the head is deleted: welcome, no message event, synced.
    let mut r = Raw::open(srv.addr).await;
    r.hello(&b, Some(0)).await;
    let (head, backlog) = within(T, "a resync from 0 over deleted messages", r.sync()).await;
    assert_eq!(head, 5);
    assert!(backlog.iter().all(|(_, p)| !matches!(p, EventPayload::Message(_))), "deleted messages in a resync: {backlog:?}");
    r.close().await;
    // Deleted ones first (more than a page), then live ones.
    for (k, body) in t[5..8].iter().enumerate() {
        alice.send_acked(&format!("m{}", 5 + k), "bob", body).await;
    }
    let mut r = Raw::open(srv.addr).await;
    r.hello(&b, Some(0)).await;
    let (head, backlog) = r.sync().await;
    let evs: Vec<u64> = backlog.iter().filter(|(_, p)| matches!(p, EventPayload::Message(_))).map(|(ev, _)| *ev).collect();
    assert_eq!((head, evs), (8, vec![6, 7, 8]));
}

/// `retention.mode = "forever"` (the default) deletes nothing, even when everything was
/// confirmed everywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forever_retention_keeps_everything() {
    let dir = TestDir::new();
    let env = [("PARLEY__RETENTION__MODE", "forever"), ("PARLEY__RETENTION__INTERVAL_MS", "50")];
    let srv = Server::start_with(&dir, &env).await;
    let a = srv.user("alice").await;
    let b = srv.user("bob").await;
    let t = dialog(14, 4);
    let mut alice = srv.connect(&a, None).await.client;
    let mut bob = srv.connect(&b, None).await.client;
    for (k, body) in t.iter().enumerate() {
        alice.send_acked(&format!("m{k}"), "bob", body).await;
    }
    for _ in 0..4 {
        bob.message_event().await;
    }
    bob.send(ClientFrame::Received { up_to: u64::MAX / 2 }).await;
    bob.barrier().await;
    alice.send(ClientFrame::Received { up_to: u64::MAX / 2 }).await;
    alice.barrier().await;
    // Nothing may happen, so there is no event to wait for: 20 intervals pass.
    let quiet = bob.next_within(Duration::from_millis(1000)).await;
    assert!(quiet.is_none(), "{quiet:?}");
    let (ms, more, deleted) = page(&mut bob, "dm:alice:bob").await;
    assert_eq!((ms.len(), more, deleted), (4, false, None));
    let m = metrics(srv.addr).await;
    // Exported from the start (issue 15), and still at zero: nothing was deleted.
    assert_eq!(metric(&m, "parley_retention_deleted_total", &[]), Some(0.0));
}

// ---------------------------------------------------------------------------------- 14. metrics

/// `/metrics` has the documented series and they move with traffic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_have_the_documented_names_and_move_with_traffic() {
    let dir = TestDir::new();
    let env = [
        ("PARLEY__LIMITS__SEND_RATE_PER_S", "0.01"),
        ("PARLEY__LIMITS__SEND_BURST", "6"),
        ("PARLEY__ADMISSION__MAX_SOCKETS", "3"),
        ("PARLEY__STORAGE__CHECKPOINT_INTERVAL_MS", "200"),
    ];
    let srv = Server::start_with(&dir, &env).await;
    let m0 = metrics(srv.addr).await;
    // Set from the start (histograms and labelled counters appear with their first sample).
    for name in [
        "parley_sockets_open",
        "parley_sessions_authenticated",
        "parley_messages_acked_total",
        "parley_duplicate_sends_total",
        "parley_slow_consumer_closes_total",
        "parley_session_restarts_total",
        "parley_recovery_seconds",
    ] {
        assert!(metric(&m0, name, &[]).is_some(), "{name} missing at start:\n{m0}");
    }
    let a = srv.user("alice").await;
    let log0 = metric(&metrics(srv.addr).await, "parley_log_bytes", &[]).expect("parley_log_bytes after the first commit");
    let b = srv.user("bob").await;
    let mut alice = srv.connect(&a, None).await.client;
    let mut bob = srv.connect(&b, None).await.client;
    let t = dialog(15, 7);
    for (k, body) in t[..6].iter().enumerate() {
        alice.send_acked(&format!("m{k}"), "bob", body).await;
    }
    alice.send_msg("m6", "bob", &t[6]).await;
    let e = alice.until("m6's reply", |f| matches!(f, ServerFrame::Error { id: Some(i), .. } if i == "m6").then(|| f.clone())).await;
    assert!(matches!(e, ServerFrame::Error { code: parley::protocol::ErrorCode::RateLimited, .. }), "{e:?}");
    assert_eq!(alice.send_acked("m0", "bob", &t[0]).await.1, 1, "a resend");
    // A 3rd socket fills max_sockets; the 4th upgrade is refused.
    let third = Raw::open(srv.addr).await;
    let deadline = Instant::now() + T;
    while http(srv.addr, "GET", "/v1/healthz", None, None).await.1["sockets"].as_u64() != Some(3) {
        assert!(Instant::now() < deadline, "the server never counted 3 sockets");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    match tokio_tungstenite::connect_async(format!("ws://{}/v1/ws", srv.addr)).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status().as_u16(), 503),
        Ok(_) => panic!("a 4th socket was accepted with max_sockets 3"),
        Err(e) => panic!("{e}"),
    }
    #[cfg(feature = "fault-injection")]
    {
        bob.send(ClientFrame::Fault { what: "panic".into(), count: 0 }).await;
        bob.until("the resync", |f| matches!(f, ServerFrame::Synced { .. }).then_some(())).await;
    }
    bob.send(ClientFrame::Watch { users: vec!["alice".into()] }).await;
    bob.barrier().await;
    // A checkpoint runs every 200 ms here, presence is flushed every 100 ms: wait for both.
    let deadline = Instant::now() + T;
    loop {
        let m = metrics(srv.addr).await;
        if metric(&m, "parley_checkpoint_duration_seconds_count", &[]).is_some() && metric(&m, "parley_presence_watched_users", &[]) == Some(1.0) {
            break;
        }
        assert!(Instant::now() < deadline, "no checkpoint or presence flush within {T:?}:\n{m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let m = metrics(srv.addr).await;
    // Every name the README documents.
    for name in [
        "parley_sockets_open",
        "parley_sessions_authenticated",
        "parley_messages_acked_total",
        "parley_ack_latency_seconds_bucket",
        "parley_commit_batch_size_bucket",
        "parley_fsync_duration_seconds_bucket",
        "parley_commit_duration_seconds_bucket",
        "parley_checkpoint_duration_seconds_bucket",
        "parley_log_bytes",
        "parley_log_segments",
        "parley_duplicate_sends_total",
        "parley_slow_consumer_closes_total",
        "parley_session_restarts_total",
        "parley_rate_limited_total",
        "parley_logins_total",
        "parley_recovery_seconds",
        "parley_presence_watched_users",
        "parley_admission_rejections_total",
    ] {
        assert!(metric(&m, name, &[]).is_some(), "{name} missing after traffic:\n{m}");
    }
    println!("metrics after traffic:\n{}", m.lines().filter(|l| l.starts_with("parley_") && !l.contains("_bucket")).collect::<Vec<_>>().join("\n"));
    let v = |name: &str, labels: &[&str]| metric(&m, name, labels).unwrap_or_else(|| panic!("{name}{labels:?} missing:\n{m}"));
    assert_eq!(v("parley_sockets_open", &[]), 3.0);
    assert_eq!(v("parley_sessions_authenticated", &[]), 2.0);
    assert_eq!(v("parley_messages_acked_total", &[]), 6.0);
    assert_eq!(v("parley_duplicate_sends_total", &[]), 1.0);
    assert_eq!(v("parley_rate_limited_total", &["what=\"send\""]), 1.0);
    assert_eq!(v("parley_admission_rejections_total", &[]), 1.0);
    assert_eq!(v("parley_logins_total", &["result=\"ok\""]), 2.0);
    assert_eq!(v("parley_registrations_total", &[]), 2.0);
    #[cfg(feature = "fault-injection")]
    assert_eq!(v("parley_session_restarts_total", &[]), 1.0);
    assert_eq!(v("parley_slow_consumer_closes_total", &[]), 0.0);
    // Histograms: buckets, sum and count.
    assert_eq!(v("parley_ack_latency_seconds_count", &[]), 6.0);
    assert_eq!(v("parley_ack_latency_seconds_bucket", &["le=\"+Inf\""]), 6.0);
    assert!(m.contains("# TYPE parley_ack_latency_seconds histogram"), "{m}");
    assert!(metric(&m, "parley_ack_latency_seconds_bucket", &["le=\"0.005\""]).is_some(), "latency buckets:\n{m}");
    for h in ["parley_commit_batch_size", "parley_fsync_duration_seconds", "parley_commit_duration_seconds"] {
        assert!(v(&format!("{h}_count"), &[]) >= 1.0, "{h}");
        assert!(v(&format!("{h}_bucket"), &["le=\"+Inf\""]) >= 1.0, "{h} buckets");
        assert!(v(&format!("{h}_sum"), &[]) > 0.0, "{h} sum");
    }
    assert!(v("parley_log_bytes", &[]) > log0, "parley_log_bytes did not grow from {log0}");
    assert!(v("parley_log_segments", &[]) >= 1.0);
    drop((third, alice, bob));
}

/// A fresh server exports every metric family of the README's table, at zero, with its known
/// label values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_server_exports_every_documented_metric_family() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).expect("README.md");
    let table = readme.split("### Metrics").nth(1).expect("a Metrics section");
    let mut families = Vec::new();
    for row in table.lines().skip_while(|l| !l.starts_with('|')).take_while(|l| l.starts_with('|')) {
        let first = row.split('|').nth(1).unwrap_or_default();
        for name in first.split('`').filter(|w| w.starts_with("parley_")) {
            families.push(name.split('{').next().expect("name").to_owned());
        }
    }
    assert_eq!(families.len(), 32, "the README's table: {families:?}");
    let dir = TestDir::new();
    let srv = Server::start(&dir).await;
    let m = metrics(srv.addr).await;
    let missing: Vec<&String> = families.iter().filter(|f| !m.contains(&format!("# TYPE {f} "))).collect();
    assert!(missing.is_empty(), "a fresh server lacks {missing:?}:\n{m}");
    for f in &families {
        let histogram = m.contains(&format!("# TYPE {f} histogram"));
        let sample = if histogram { format!("{f}_count") } else { f.clone() };
        assert!(metric(&m, &sample, &[]).is_some(), "{f} has no sample:\n{m}");
    }
    for (name, label) in [
        ("parley_logins_total", "result=\"ok\""),
        ("parley_logins_total", "result=\"failed\""),
        ("parley_rate_limited_total", "what=\"send\""),
        ("parley_rate_limited_total", "what=\"login\""),
        ("parley_actor_restarts_total", "actor=\"registry\""),
        ("parley_actor_restarts_total", "actor=\"presence\""),
        ("parley_admission_rejections_total", "why=\"draining\""),
        ("parley_admission_rejections_total", "why=\"sockets\""),
        ("parley_admission_rejections_total", "why=\"rate\""),
        ("parley_admission_rejections_total", "why=\"xmpp\""),
    ] {
        assert_eq!(metric(&m, name, &[label]), Some(0.0), "{name}{{{label}}} at zero:\n{m}");
    }
}

// ---------------------------------------------------------------------------------- 15. logs

/// Starts the binary with `env` and no `--log-format`, waits for its listening line, stops it
/// (SIGTERM) and returns its stderr.
async fn run_and_capture_stderr(dir: &TestDir, env: &[(&str, &str)]) -> String {
    let log = dir.path().join("own-run.log");
    let mut cmd = tokio::process::Command::new(exe(dir));
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(dir.path().join("own-data"))
        .env("PARLEY__XMPP__LISTEN", "")
        .env_remove("RUST_LOG")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .kill_on_drop(true);
    let mut child = cmd.spawn().expect("spawn");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let addr: std::net::SocketAddr = within(T, "the listening line", async {
        while let Ok(Some(l)) = lines.next_line().await {
            if let Some(a) = l.strip_prefix("parley listening on http://") {
                return a.trim().parse().expect("address");
            }
        }
        panic!("the server exited before listening");
    })
    .await;
    // Served a request before it is stopped (see
    // `overload::sigterm_right_after_the_listening_line_is_graceful`).
    assert_eq!(http(addr, "GET", "/v1/healthz", None, None).await.0, 200);
    // SAFETY: kill(2) on our own child, not reaped yet.
    assert_eq!(unsafe { libc::kill(child.id().expect("pid") as i32, libc::SIGTERM) }, 0);
    let st = within(T, "the server to exit", child.wait()).await.expect("wait");
    assert_eq!(st.code(), Some(0));
    std::fs::read_to_string(&log).expect("read log")
}

/// Logs are JSON lines with `--log-format json` or `PARLEY__LOG__FORMAT=json`, and a whole
/// session at debug level logs no password, token or message body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_never_hold_passwords_tokens_or_bodies() {
    const SECRET_PASSWORD: &str = "Zq7-only-in-this-test-password";
    const WRONG_PASSWORD: &str = "Wx3-a-wrong-password-for-logs";
    const ADMIN_TOKEN: &str = "Ak9-admin-token-only-in-this-test";
    let body = format!("quokka-body-5519: {}", dialog(17, 1)[0]);
    // The harness passes --log-format json; debug level unless PARLEY_IT_LOG sets another.
    let dir = TestDir::new();
    let mut srv = Server::start_with(&dir, &[("PARLEY__LOG__LEVEL", "debug"), ("PARLEY__ADMIN__TOKEN", ADMIN_TOKEN)]).await;
    let (st, _) = http(srv.addr, "POST", "/v1/register", Some(&json!({"user": "loggy", "password": SECRET_PASSWORD})), None).await;
    assert_eq!(st, 201);
    let (st, _) = http(srv.addr, "POST", "/v1/login", Some(&json!({"user": "loggy", "password": WRONG_PASSWORD})), None).await;
    assert_eq!(st, 401);
    let (st, v) = http(srv.addr, "POST", "/v1/login", Some(&json!({"user": "loggy", "password": SECRET_PASSWORD, "device": "web"})), None).await;
    assert_eq!(st, 200);
    let token = v["token"].as_str().expect("token").to_owned();
    let bob = srv.user("bob").await;
    let mut c = srv.connect(&token, None).await.client;
    let mut b = srv.connect(&bob, None).await.client;
    c.send_acked("secret-1", "bob", &body).await;
    assert_eq!(b.message_event().await.1.body, body);
    c.history_all("dm:bob:loggy").await;
    // A bad frame carrying the body, and a backup with the admin token.
    c.send(ClientFrame::Send { id: String::new(), to: "bob".into(), body: body.clone() }).await;
    c.until("the error", |f| matches!(f, ServerFrame::Error { .. }).then_some(())).await;
    let r = http_full(srv.addr, "POST", "/v1/admin/backup", &[("Authorization", &format!("Bearer {ADMIN_TOKEN}"))], &json!({"dir": dir.path().join("b")}).to_string()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let (st, _) = http(srv.addr, "POST", "/v1/logout", None, Some(&token)).await;
    assert_eq!(st, 204);
    assert_eq!(c.until_closed().await.1, Some(close::UNAUTHORIZED), "the socket of a logged-out token");
    stop_server(&mut srv).await;
    let log = srv.log();
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() > 5, "too few log lines:\n{log}");
    for l in &lines {
        let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("a log line that is not JSON ({e}): {l}"));
        assert!(v["level"].is_string() && v["timestamp"].is_string(), "{l}");
    }
    if std::env::var("PARLEY_IT_LOG").is_err() {
        assert!(lines.iter().any(|l| l.contains("\"level\":\"DEBUG\"")), "no debug line at level debug:\n{log}");
    }
    println!("logs: {} JSON lines at debug level, none with a secret", lines.len());
    for (what, secret) in [("password", SECRET_PASSWORD), ("wrong password", WRONG_PASSWORD), ("token", token.as_str()), ("admin token", ADMIN_TOKEN), ("body", "quokka-body-5519")] {
        if let Some(l) = log.lines().find(|l| l.contains(secret)) {
            panic!("the log holds the {what}: {l}");
        }
    }

    // PARLEY__LOG__FORMAT=json without the flag; text by default.
    let dir2 = TestDir::new();
    let json_log = run_and_capture_stderr(&dir2, &[("PARLEY__LOG__FORMAT", "json")]).await;
    assert!(!json_log.trim().is_empty());
    for l in json_log.lines().filter(|l| !l.trim().is_empty()) {
        assert!(serde_json::from_str::<Value>(l).is_ok(), "PARLEY__LOG__FORMAT=json wrote a non-JSON line: {l}");
    }
    let dir3 = TestDir::new();
    let text_log = run_and_capture_stderr(&dir3, &[]).await;
    assert!(text_log.lines().any(|l| l.contains("parley listening")), "{text_log}");
    assert!(text_log.lines().all(|l| serde_json::from_str::<Value>(l).is_err()), "text format wrote JSON:\n{text_log}");
}

async fn stop_server(srv: &mut Server) {
    stop(srv).await
}

/// An admin command whose reader went away (`parley admin user list | head -1`) ends quietly
/// with status 0: no panic, no backtrace.
#[tokio::test]
async fn admin_output_into_a_closed_pipe_ends_quietly() {
    let dir = TestDir::new();
    let data = dir.data();
    let r = admin(&dir, &data, &["user", "add", "alice", "--password", PASSWORD], None).await;
    assert!(r.ok(), "{r}");
    // A pipe whose read end is closed before the command writes: its first line gets EPIPE.
    let (read, write) = std::io::pipe().expect("pipe");
    drop(read);
    let mut cmd = tokio::process::Command::new(exe(&dir));
    cmd.arg("admin").arg("--data").arg(&data).args(["user", "list"]).env_remove("RUST_LOG").stdin(Stdio::null()).stdout(write).stderr(Stdio::piped());
    let o = within(T, "parley admin user list", cmd.output()).await.expect("run");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "stderr: {err}");
    assert!(!err.contains("panicked"), "stderr: {err}");
}
