//! Recovery when sled itself is damaged (ARCHITECTURE "the log is the truth, sled is derived"):
//! a deleted or garbled `DATA/state` is rebuilt from the write-ahead log when the log still
//! starts at entry 1, or from the newest snapshot and the log after it, with every message,
//! cursor and group back; when checkpoints already deleted the log's beginning and no snapshot
//! is there, start-up stops with an error naming the data directory and what is missing, and
//! changes nothing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use parley::protocol::{ClientFrame, MessageView};

use crate::common::{within, Client, Server, TestDir, T};
use crate::overload::metrics;

/// Every file below `dir`, by path, with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(p.clone(), std::fs::read(&p).expect("read"));
            }
        }
    }
    out
}

/// Overwrites every file of sled's directory with garbage of the same length (at least 64
/// bytes), as a disk that lost or scrambled its unsynced pages could leave it.
fn garble(state: &Path) {
    for (p, b) in snapshot(state) {
        let n = b.len().max(64);
        let junk: Vec<u8> = (0..n).map(|i| (i as u8).wrapping_mul(131).wrapping_add(7)).collect();
        std::fs::write(&p, junk).expect("garble");
    }
}

/// One stored message: (seq, id, from, body, ts).
type Row = (u64, String, String, String, u64);

/// What must come back: two conversations' histories, the group, and bob's stored cursor.
#[derive(Debug, PartialEq)]
struct Snapshot {
    histories: BTreeMap<String, Vec<Row>>,
    group: (String, Vec<String>, Vec<String>),
    bob_head: u64,
}

fn rows(ms: &[MessageView]) -> Vec<Row> {
    ms.iter().map(|m| (m.seq, m.id.clone(), m.from.clone(), m.body.clone(), m.ts)).collect()
}

async fn take_snapshot(srv: &Server, tokens: &BTreeMap<&str, String>, group: &str, bob_cursor: u64) -> Snapshot {
    let mut a = Client::connect(srv.addr, &tokens["alice"], Some(0), parley::protocol::Encoding::Json).await.client;
    let mut histories = BTreeMap::new();
    for conv in ["dm:alice:bob", group] {
        histories.insert(conv.to_owned(), rows(&a.history_all(conv).await));
    }
    let info = a.group_info(group).await;
    a.close().await;
    // bob resumes from his stored cursor: the backlog starts right after it.
    let s = Client::connect(srv.addr, &tokens["bob"], None, parley::protocol::Encoding::Json).await;
    assert_eq!(s.backlog.first().map(|(ev, _)| *ev), Some(bob_cursor + 1), "bob's stored cursor {bob_cursor} is not back");
    let bob_head = s.head;
    s.client.close().await;
    Snapshot { histories, group: info, bob_head }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_or_garbled_state_is_rebuilt_from_the_log() {
    let dir = TestDir::new();
    let mut srv = Server::start(&dir).await;
    let mut tokens = BTreeMap::new();
    for u in ["alice", "bob", "carol"] {
        tokens.insert(u, srv.user(u).await);
    }
    let mut a = srv.connect(&tokens["alice"], None).await.client;
    let group = a.create_group("rebuild 🔧", &["bob", "carol"]).await;
    for (i, body) in crate::common::dialog(14, 30).iter().enumerate() {
        a.send_acked(&format!("d{i}"), "bob", body).await;
    }
    for (i, body) in crate::common::dialog(3, 20).iter().enumerate() {
        a.send_acked(&format!("g{i}"), &group, body).await;
    }
    a.close().await;
    let mut c = srv.connect(&tokens["carol"], None).await.client;
    for i in 0..5 {
        c.send_acked(&format!("c{i}"), &group, "hola a todos").await;
    }
    c.close().await;
    // bob confirms all but the last seven events.
    let s = srv.connect(&tokens["bob"], None).await;
    let bob_cursor = s.head - 7;
    let mut b = s.client;
    b.send(ClientFrame::Received { up_to: bob_cursor }).await;
    b.barrier().await;
    b.close().await;
    let want = take_snapshot(&srv, &tokens, &group, bob_cursor).await;
    assert_eq!(want.histories["dm:alice:bob"].len(), 30);
    assert_eq!(want.histories[&group].len(), 25);

    // 1. The state's directory deleted (kill -9): replayed from entry 1.
    srv.kill9().await;
    std::fs::remove_dir_all(dir.data().join("state")).expect("delete the state");
    srv.restart().await;
    assert_eq!(srv.recovery_report()["applied_before"], 0);
    assert_eq!(take_snapshot(&srv, &tokens, &group, bob_cursor).await, want, "after deleting the state");

    // 2. Every file of sled garbled (after a clean stop): sled cannot open it; the directory is
    //    moved aside, the state rebuilt from the log, loudly.
    srv.sigterm();
    assert!(srv.wait_exit().await.success());
    let before = snapshot(&dir.data().join("state"));
    garble(&dir.data().join("state"));
    let garbled = snapshot(&dir.data().join("state"));
    srv.restart().await;
    let log = srv.log();
    let line = log
        .lines()
        .find(|l| l.contains("REBUILT FROM THE WRITE-AHEAD LOG"))
        .unwrap_or_else(|| panic!("no rebuild line in the log (sled opened a garbled state?):\n{log}"));
    assert!(line.contains("\"level\":\"ERROR\""), "the rebuild is not logged at error level: {line}");
    let m = metrics(srv.addr).await;
    assert!(m.lines().any(|l| l == "parley_state_rebuilds_total 1"), "parley_state_rebuilds_total is not 1:\n{m}");
    assert_eq!(take_snapshot(&srv, &tokens, &group, bob_cursor).await, want, "after garbling the state");
    // The damaged directory is kept, byte for byte, beside the new one.
    let aside: Vec<PathBuf> = std::fs::read_dir(dir.data())
        .expect("data dir")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("state.damaged-")))
        .collect();
    assert_eq!(aside.len(), 1, "one damaged state kept aside: {aside:?}");
    let kept: BTreeMap<PathBuf, Vec<u8>> = snapshot(&aside[0]).into_iter().map(|(p, b)| (dir.data().join("state").join(p.strip_prefix(&aside[0]).expect("prefix")), b)).collect();
    assert_eq!(kept, garbled, "the damaged state was not kept as it was");
    assert_ne!(before, garbled);

    // 3. And it keeps working: a new message, after one more restart.
    let mut a = srv.connect(&tokens["alice"], None).await.client;
    let (_, seq, _) = a.send_acked("after", "bob", "still here").await;
    assert_eq!(seq, 31);
    a.close().await;
    srv.sigterm();
    assert!(srv.wait_exit().await.success());
    srv.restart().await;
    let mut a = srv.connect(&tokens["alice"], None).await.client;
    assert_eq!(a.history_all("dm:alice:bob").await.len(), 31);
    a.close().await;
}

/// Tiny segments, frequent checkpoints and snapshots: the log's first segments are deleted
/// quickly (only up to the newest snapshot).
const PURGING: [(&str, &str); 4] = [
    ("PARLEY__STORAGE__SEGMENT_BYTES", "4096"),
    ("PARLEY__STORAGE__CHECKPOINT_INTERVAL_MS", "50"),
    ("PARLEY__STORAGE__CHECKPOINT_LOG_BYTES", "4096"),
    ("PARLEY__STORAGE__SNAPSHOT_INTERVAL_MS", "50"),
];

/// Sends until checkpoints deleted the log's first segment; returns the acked (id, seq) pairs.
async fn send_until_segment_1_is_deleted(dir: &TestDir, a: &mut Client) -> Vec<(String, u64)> {
    let first = dir.data().join("wal").join("00000000000000000001.wal");
    let mut acked = Vec::new();
    while first.exists() {
        assert!(acked.len() < 5000, "segment 1 was never deleted after {} messages", acked.len());
        let id = format!("m{}", acked.len());
        let (_, seq, _) = a.send_acked(&id, "bob", "a message long enough to fill the small segments quickly").await;
        acked.push((id, seq));
    }
    acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_state_after_the_log_was_purged_is_rebuilt_from_the_newest_snapshot() {
    let dir = TestDir::new();
    let mut srv = Server::start_with(&dir, &PURGING).await;
    let token = srv.user("alice").await;
    srv.register("bob").await;
    let mut a = srv.connect(&token, None).await.client;
    let mut acked = send_until_segment_1_is_deleted(&dir, &mut a).await;
    // A few more after the purge, so the log holds entries past the snapshot.
    for i in 0..20 {
        let id = format!("late{i}");
        let (_, seq, _) = a.send_acked(&id, "bob", "after the purge").await;
        acked.push((id, seq));
    }
    a.close().await;
    srv.kill9().await;
    assert!(std::fs::read_dir(dir.data().join("snapshots")).expect("a snapshots directory").flatten().any(|e| e.path().extension().is_some_and(|x| x == "snap")));
    garble(&dir.data().join("state"));
    srv.restart().await;
    assert!(srv.log().contains("REBUILT FROM THE WRITE-AHEAD LOG"), "no rebuild line:\n{}", srv.log());
    assert!(srv.recovery_report()["applied_before"].as_u64().unwrap_or(0) > 0, "the rebuild did not start from a snapshot: {}", srv.recovery_report());
    let mut a = srv.connect(&token, None).await.client;
    let got: Vec<(String, u64)> = a.history_all("dm:alice:bob").await.into_iter().map(|m| (m.id, m.seq)).collect();
    assert_eq!(got, acked, "every acked message, once, in order, after a rebuild from the snapshot");
    a.close().await;

    // The state deleted outright (sled then opens empty, behind the log's first entry): the same.
    srv.kill9().await;
    std::fs::remove_dir_all(dir.data().join("state")).expect("delete the state");
    srv.restart().await;
    let mut a = srv.connect(&token, None).await.client;
    let got: Vec<(String, u64)> = a.history_all("dm:alice:bob").await.into_iter().map(|m| (m.id, m.seq)).collect();
    assert_eq!(got, acked, "every acked message, once, in order, after deleting the state");
    a.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_state_without_the_log_from_entry_1_refuses_to_start_and_changes_nothing() {
    let dir = TestDir::new();
    let env = PURGING;
    let mut srv = Server::start_with(&dir, &env).await;
    let token = srv.user("alice").await;
    srv.register("bob").await;
    let mut a = srv.connect(&token, None).await.client;
    send_until_segment_1_is_deleted(&dir, &mut a).await;
    a.close().await;
    srv.sigterm();
    assert!(srv.wait_exit().await.success());
    garble(&dir.data().join("state"));
    // Without a snapshot to start from either.
    std::fs::remove_dir_all(dir.data().join("snapshots")).expect("delete the snapshots");
    let before = snapshot(&dir.data());

    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_parley"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(dir.data())
        .env("PARLEY__XMPP__LISTEN", "")
        .envs(env)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output();
    let out = within(T, "parley to refuse to start", out).await.expect("run parley");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "it started on a damaged state without the whole log: {stderr}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("listening"), "it listened anyway");
    let data = dir.data().display().to_string();
    assert!(
        stderr.contains("cannot be rebuilt") && stderr.contains(&data) && stderr.contains("were deleted by checkpoints") && stderr.contains("Nothing was changed"),
        "the error does not say what is missing and where: {stderr}"
    );
    let after = snapshot(&dir.data());
    let changed: Vec<&PathBuf> = after.keys().chain(before.keys()).filter(|p| !p.ends_with("LOCK") && before.get(*p) != after.get(*p)).collect();
    assert!(changed.is_empty(), "a refused start changed the data directory: {changed:?}");
}
