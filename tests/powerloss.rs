//! The real binary on a file system that forgets (LazyFS's idea, "When Amnesia Strikes",
//! VLDB 2024): `parley serve` runs with its data directory on [`lazyfs::LazyFs`], an in-memory
//! FUSE file system that keeps every write, create, rename and unlink only in memory until it
//! is fsync'd. Each round: concurrent senders send real dialog turns and record every ack; the
//! server is `kill -9`ed (sometimes it aborts itself at a fail point of group commit, a segment
//! roll or a checkpoint, when built with `--features failpoints`); everything not fsync'd is
//! dropped, as a power cut would; the server restarts on what is left. After each restart every
//! acked message must be in its conversation's history exactly once at its acked seq, in send
//! order, and (every 10th round and the last; every round in debug) on each recipient's resync
//! from cursor 0.
//!
//! A third test runs sled alone the same way (a child process writing small and ~150 KB values,
//! killed and cut): it must open with everything its last checkpoint held. It is what showed
//! that published sled 0.34.7 loses blob files at a power cut (vendor/sled/PATCHES.md).
//!
//! `PARLEY_POWERLOSS_ROUNDS` sets the rounds (default 200 in release, 8 in debug);
//! `PARLEY_POWERLOSS_SEED` replays a run's kill moments and fail points (the seed is printed).
//! Needs `/dev/fuse` and the right to mount (root); without them the test says why and passes,
//! except under CI (`CI=true`), where it fails. Run it with
//! `cargo test --release --features failpoints --test powerloss -- --nocapture`.

#[path = "it/common/mod.rs"]
mod common;
#[path = "powerloss/lazyfs.rs"]
mod lazyfs;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use parley::protocol::ids::Conv;
use parley::protocol::{ClientFrame, Encoding, ErrorCode, Request, ServerFrame};
use rand::{Rng, SeedableRng};

use common::{dialog, sender_name, within, Client, Incoming, Sent, Server, TestDir, T};

const SENDERS: usize = 3;
const RECIPIENTS: [&str; 2] = ["r0", "r1"];
/// Sends in flight per sender.
const WINDOW: usize = 4;
/// Fail points the server may abort at (only with `--features failpoints`; else ignored).
const FAIL_POINTS: [&str; 9] = [
    "commit.after_append",
    "commit.after_sync",
    "commit.after_apply",
    "wal.roll.after_create",
    "wal.roll.after_sync_old",
    "wal.sync.after_fdatasync",
    "checkpoint.before",
    "checkpoint.after_sync",
    "purge.before",
];


/// What one sender sent and what was acked. Locked only between awaits.
#[derive(Default)]
struct Ledger {
    msgs: Vec<Sent>,
    /// id → (conv, seq).
    acked: HashMap<String, (String, u64)>,
    /// Indexes to send again (unacked when the server died, or refused with a retryable error).
    pending: VecDeque<usize>,
    /// Messages sent more than once: their seq may be older than later sends'.
    resent: HashSet<String>,
    /// id → seq where a check found an unacked message stored: its ack must say the same.
    stored: HashMap<String, u64>,
}


/// Skips the test with a reason, except under CI, where a missing prerequisite is a failure.
fn skip(why: String) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("powerloss: {why} (CI=true: the power-loss test must run; .ci/run installs fuse3)");
    }
    eprintln!("powerloss: SKIPPED: {why}");
}

/// A test directory whose data directory is a fresh [`lazyfs::LazyFs`] mount, or `None` after
/// [`skip`] said why it cannot be had here.
fn mount_data_dir() -> Option<(TestDir, lazyfs::LazyFs, lazyfs::Mounted)> {
    if !std::path::Path::new("/dev/fuse").exists() {
        skip("no /dev/fuse on this machine".into());
        return None;
    }
    let dir = TestDir::new();
    std::fs::create_dir_all(dir.data()).expect("mount point");
    match lazyfs::LazyFs::mount(&dir.data()) {
        Ok((fs, session)) => Some((dir, fs, session)),
        Err(e) => {
            skip(format!("cannot mount the FUSE file system at {}: {e} (needs root or fusermount3)", dir.data().display()));
            None
        }
    }
}

/// One connection of a sender: sends (resends first) with a window, records acks; returns when
/// the socket dies.
async fn sender_conn(addr: SocketAddr, i: usize, token: String, group: String, ledger: Arc<Mutex<Ledger>>, acks: Arc<AtomicUsize>, stop: Arc<AtomicBool>) {
    let me = sender_name(i);
    let Ok(mut c) = Client::open_raw(addr, Encoding::Json).await else { return };
    if c.try_send_req(Request { rid: None, frame: ClientFrame::Hello { token, cursor: None } }).await.is_err() {
        return;
    }
    let mut inflight: Vec<usize> = Vec::new();
    // Per conversation, the seq of the last ack of a message sent once: acks come in order.
    let mut last_seq: HashMap<String, u64> = HashMap::new();
    loop {
        while inflight.len() < WINDOW && !stop.load(Ordering::SeqCst) {
            let (k, m) = {
                let mut l = ledger.lock().unwrap();
                let k = match l.pending.pop_front() {
                    Some(k) => {
                        let id = l.msgs[k].id.clone();
                        l.resent.insert(id);
                        k
                    }
                    None => {
                        let k = l.msgs.len();
                        let to = if k % 3 == 2 { group.clone() } else { RECIPIENTS[(i + k) % 2].to_owned() };
                        let conv = if to == group { group.clone() } else { Conv::dm(&me, &to).to_string() };
                        let body = dialog(i * 100_003 + k, 1).remove(0);
                        l.msgs.push(Sent { id: format!("{me}-{k}"), to, conv, body });
                        k
                    }
                };
                (k, l.msgs[k].clone())
            };
            inflight.push(k);
            let frame = ClientFrame::Send { id: m.id, to: m.to, body: m.body };
            if c.try_send_req(Request { rid: None, frame }).await.is_err() {
                break;
            }
        }
        let f = match c.next_within(T).await {
            Some(Incoming::Frame(f)) => f,
            None | Some(Incoming::Closed(_)) => break,
        };
        match f {
            ServerFrame::Ack { id, conv, seq, .. } => {
                let k: usize = id.rsplit('-').next().and_then(|k| k.parse().ok()).unwrap_or_else(|| panic!("ack of unknown id {id}"));
                let mut l = ledger.lock().unwrap();
                assert_eq!(conv, l.msgs[k].conv, "the ack of {id} names another conversation");
                if let Some(prev) = l.acked.get(&id) {
                    assert_eq!(prev, &(conv.clone(), seq), "a second ack of {id} differs from the first");
                }
                if let Some(s) = l.stored.get(&id) {
                    assert_eq!(*s, seq, "{id} was found stored at seq {s} but its resend was acked at {seq}");
                }
                if !l.resent.contains(&id) {
                    let last = last_seq.entry(conv.clone()).or_default();
                    assert!(seq > *last, "{me}: ack of {id} at seq {seq} after an ack at {last} in {conv}: out of order");
                    *last = seq;
                }
                l.acked.insert(id, (conv, seq));
                inflight.retain(|j| *j != k);
                acks.fetch_add(1, Ordering::SeqCst);
            }
            ServerFrame::Error { id: Some(id), code, message, .. } => {
                assert!(matches!(code, ErrorCode::Overloaded | ErrorCode::Unavailable), "{me}: send {id} refused: {code:?} {message}");
                let k: usize = id.rsplit('-').next().and_then(|k| k.parse().ok()).expect("id");
                inflight.retain(|j| *j != k);
                ledger.lock().unwrap().pending.push_back(k);
            }
            ServerFrame::Welcome { .. } | ServerFrame::Synced { .. } | ServerFrame::Event { .. } => {}
            ServerFrame::Typing { .. } | ServerFrame::Presence { .. } | ServerFrame::Goaway { .. } => {}
            f => panic!("{me}: unexpected frame {f:?}"),
        }
        if stop.load(Ordering::SeqCst) && inflight.is_empty() {
            break;
        }
    }
    let mut l = ledger.lock().unwrap();
    for k in inflight {
        if !l.acked.contains_key(&l.msgs[k].id) {
            l.pending.push_back(k);
        }
    }
}

/// Checks every conversation's history, and with `resync` every recipient's resync from cursor
/// 0, against the ledgers. Returns the number of acked messages checked.
async fn check(srv: &Server, round: usize, tokens: &BTreeMap<String, String>, group: &str, ledgers: &[Arc<Mutex<Ledger>>], resync: bool) -> usize {
    let convs: Vec<String> = (0..SENDERS).flat_map(|i| RECIPIENTS.iter().map(move |r| Conv::dm(&sender_name(i), r).to_string())).chain([group.to_owned()]).collect();
    let mut sent: HashMap<String, (usize, usize, Sent)> = HashMap::new();
    for (i, l) in ledgers.iter().enumerate() {
        for (k, m) in l.lock().unwrap().msgs.iter().enumerate() {
            sent.insert(m.id.clone(), (i, k, m.clone()));
        }
    }
    let mut histories: BTreeMap<String, Vec<(u64, String, String)>> = BTreeMap::new();
    let mut stored: HashMap<String, u64> = HashMap::new();
    for conv in &convs {
        let reader = if conv == group { "r0" } else { conv.split(':').find(|m| m.starts_with('r')).expect("a recipient member") };
        let mut c = Client::connect(srv.addr, &tokens[reader], None, Encoding::Json).await.client;
        let msgs = c.history_all(conv).await;
        c.close().await;
        for m in &msgs {
            let (_, _, s) = sent.get(&m.id).unwrap_or_else(|| panic!("round {round}: {conv} seq {}: a message nobody sent: {m:?}", m.seq));
            assert_eq!((&s.conv, &s.body, &m.from), (conv, &m.body, &sender_name(sent[&m.id].0)), "round {round}: {conv} seq {}", m.seq);
            assert!(stored.insert(m.id.clone(), m.seq).is_none(), "round {round}: {} stored twice", m.id);
        }
        // Send order: a sender's messages sent once are stored in the order they were sent.
        for (i, l) in ledgers.iter().enumerate() {
            let l = l.lock().unwrap();
            let ks: Vec<usize> = msgs.iter().filter(|m| m.from == sender_name(i) && !l.resent.contains(&m.id)).map(|m| sent[&m.id].1).collect();
            assert!(ks.windows(2).all(|w| w[0] < w[1]), "round {round}: {}'s messages in {conv} are out of send order: {ks:?}", sender_name(i));
        }
        histories.insert(conv.clone(), msgs.iter().map(|m| (m.seq, m.id.clone(), m.body.clone())).collect());
    }
    let mut checked = 0;
    for l in ledgers {
        let mut l = l.lock().unwrap();
        for (id, (conv, seq)) in l.acked.clone() {
            if stored.get(&id) != Some(&seq) {
                // What a reader of the failure needs (it happened once, 2026-12-04, and did not
                // come back): the seqs the history had around it, and the logs of the run that
                // was cut and of the restart (recovery, replay, rebuild).
                let around: Vec<u64> = histories.get(&conv).map(|h| h.iter().map(|(s, _, _)| *s).filter(|s| s.abs_diff(seq) <= 5).collect()).unwrap_or_default();
                panic!(
                    "round {round}: acked message {id} (seq {seq} in {conv}) is lost or moved after the power loss: stored at {:?}; seqs in its history within 5 of it: {around:?} \
                     (the data directory as the cut left it is `after-cut` in the kept test directory)\n--- the cut run's log (tail):\n{}\n--- the restart's log (tail):\n{}",
                    stored.get(&id),
                    srv.log_tail_of(srv.starts.saturating_sub(1), 40),
                    srv.log_tail_of(srv.starts, 40)
                );
            }
            checked += 1;
        }
        let unacked: Vec<(String, u64)> = l.msgs.iter().filter(|m| !l.acked.contains_key(&m.id)).filter_map(|m| stored.get(&m.id).map(|s| (m.id.clone(), *s))).collect();
        l.stored.extend(unacked);
    }
    for r in RECIPIENTS.into_iter().filter(|_| resync) {
        let s = Client::connect(srv.addr, &tokens[r], Some(0), Encoding::Json).await;
        let mut per: BTreeMap<String, Vec<(u64, String, String)>> = BTreeMap::new();
        for (_, m) in s.messages() {
            per.entry(m.conv.clone()).or_default().push((m.seq, m.id, m.body));
        }
        s.client.close().await;
        for conv in convs.iter().filter(|c| *c == group || c.split(':').any(|m| m == r)) {
            assert_eq!(per.remove(conv).unwrap_or_default(), histories[conv], "round {round}: {r}'s resync from cursor 0 of {conv} differs from its history");
        }
        assert!(per.is_empty(), "round {round}: {r} resyncs conversations it is not in: {:?}", per.keys());
    }
    checked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_loss_loses_no_acked_message() {
    let started = Instant::now();
    let rounds: usize = std::env::var("PARLEY_POWERLOSS_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(if cfg!(debug_assertions) { 8 } else { 200 });
    let seed: u64 = std::env::var("PARLEY_POWERLOSS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    let Some((dir, fs, session)) = mount_data_dir() else { return };
    eprintln!("powerloss: seed {seed} (PARLEY_POWERLOSS_SEED={seed} replays it), {rounds} rounds, data on FUSE at {}", dir.data().display());
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // Small segments and frequent checkpoints: rolls, checkpoints and purges happen in a round.
    let env_base = [
        ("PARLEY__STORAGE__SEGMENT_BYTES", "4096"),
        ("PARLEY__STORAGE__CHECKPOINT_INTERVAL_MS", "300"),
        ("PARLEY__STORAGE__CHECKPOINT_LOG_BYTES", "16384"),
        // Snapshots too (segments are deleted only up to the newest one), on the forgetful disk.
        ("PARLEY__STORAGE__SNAPSHOT_INTERVAL_MS", "300"),
    ];
    let mut srv = Server::start_with(&dir, &env_base).await;
    srv.set_env(&[]);
    let mut tokens: BTreeMap<String, String> = BTreeMap::new();
    let senders: Vec<String> = (0..SENDERS).map(sender_name).collect();
    for u in senders.iter().map(String::as_str).chain(RECIPIENTS) {
        tokens.insert(u.to_owned(), srv.user(u).await);
    }
    let group = {
        let mut c = srv.connect(&tokens["r0"], None).await.client;
        let members: Vec<&str> = senders.iter().map(String::as_str).chain(["r1"]).collect();
        let g = c.create_group("power loss ⚡", &members).await;
        c.close().await;
        g
    };
    let ledgers: Vec<Arc<Mutex<Ledger>>> = (0..SENDERS).map(|_| Arc::new(Mutex::new(Ledger::default()))).collect();
    let (mut checked_total, mut last_checked, mut aborts, mut rebuilds) = (0usize, 0usize, 0usize, 0usize);
    for round in 1..=rounds {
        // Some rounds restart with a fail point armed (it kills the server at that step):
        // one more kill -9, without a power cut, then the restart with the point.
        let armed = round > 1 && rng.gen_bool(0.3);
        if armed {
            let fp = FAIL_POINTS[rng.gen_range(0..FAIL_POINTS.len())];
            // From the 3rd hit on: a checkpoint point then fires at least ~0.9 s after the start,
            // well after the server printed its listening line.
            let spec = format!("{fp}=abort@{}", rng.gen_range(3..=20));
            srv.kill9().await;
            srv.set_env(&[("PARLEY_FAILPOINTS", &spec)]);
            srv.restart().await;
        }
        let acks = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for (i, u) in senders.iter().enumerate() {
            let (t, g, l, a, s) = (tokens[u].clone(), group.clone(), ledgers[i].clone(), acks.clone(), stop.clone());
            tasks.push(tokio::spawn(sender_conn(srv.addr, i, t, g, l, a, s)));
        }
        // The kill comes after a random number of acks (or when the server aborted itself).
        // With a fail point armed, long enough for it to fire first (mostly).
        let target = if armed { 400 } else { rng.gen_range(3..=40) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while acks.load(Ordering::SeqCst) < target && Instant::now() < deadline && !tasks.iter().all(|t| t.is_finished()) {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let aborted = tasks.iter().all(|t| t.is_finished());
        aborts += usize::from(aborted);
        stop.store(true, Ordering::SeqCst);
        srv.kill9().await;
        for t in tasks {
            within(T, "a sender to notice the kill", t).await.expect("sender task panicked");
        }
        fs.drop_unsynced();
        // What the cut left, before the restart changes it: kept with the test's directory
        // when a check fails (one copy, the last cut's; ~1 MB).
        let after_cut = dir.path().join("after-cut");
        let _ = std::fs::remove_dir_all(&after_cut);
        copy_tree(&dir.data(), &after_cut).expect("copy the data directory after the cut");
        srv.set_env(&[]);
        srv.restart().await;
        if srv.log().contains("REBUILT FROM THE WRITE-AHEAD LOG") {
            rebuilds += 1;
        }
        // The resync from cursor 0 reads everything: every 10th round and the last.
        let checked = check(&srv, round, &tokens, &group, &ledgers, round % 10 == 0 || round == rounds || cfg!(debug_assertions)).await;
        checked_total += checked;
        last_checked = checked;
        if round % 20 == 0 || round == rounds {
            let st = fs.stats();
            eprintln!(
                "powerloss: round {round}/{rounds}: {checked} acked messages checked ({:?}); fs: {} file fsyncs, {} dir fsyncs, {} names and {} bytes dropped",
                started.elapsed(),
                st.file_syncs,
                st.dir_syncs,
                st.names_dropped,
                st.bytes_dropped
            );
        }
    }
    srv.kill9().await;
    drop(session);
    assert!(last_checked > 0, "no message was acknowledged in {rounds} rounds");
    eprintln!(
        "powerloss: {rounds} rounds (power cuts) ran, {aborts} ended by a fail point kill, {rebuilds} restarts rebuilt a damaged sled from the log; \
         {last_checked} acked messages checked after the last, {checked_total} acked-message checks in all; 0 lost, duplicated or out of order ({:?})",
        started.elapsed()
    );
}


/// Copies the directory `from` into `to` (created), recursively: files and directories only.
fn copy_tree(from: &std::path::Path, to: &std::path::Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let (src, dst) = (e.path(), to.join(e.file_name()));
        if e.file_type()?.is_dir() {
            copy_tree(&src, &dst)?;
        } else {
            std::fs::copy(&src, &dst)?;
        }
    }
    Ok(())
}

/// fsyncs every file and directory below `dir`, and `dir` (parley's checkpoint does the same,
/// `storage::store::fsync_tree`, which is not public).
fn fsync_tree(dir: &std::path::Path) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            fsync_tree(&e.path())?;
        } else {
            std::fs::File::open(e.path())?.sync_all()?;
        }
    }
    std::fs::File::open(dir)?.sync_all()
}

/// The first entry of the log in `wal` (the lowest segment's name), if it has a segment.
fn first_segment(wal: &std::path::Path) -> Option<u64> {
    std::fs::read_dir(wal).ok()?.filter_map(|e| e.ok()?.file_name().to_str()?.strip_suffix(".wal")?.parse::<u64>().ok()).min()
}

/// The indexes of the snapshots in `dir`.
fn snapshot_indexes(dir: &std::path::Path) -> Vec<u64> {
    std::fs::read_dir(dir).map_or_else(|_| Vec::new(), |rd| rd.filter_map(|e| e.ok()?.file_name().to_str()?.strip_suffix(".snap")?.parse::<u64>().ok()).collect())
}

/// A power cut after checkpoints purged the log's beginning must leave a snapshot the log
/// continues from (seen once in CI: `DATA/snapshots` was created but never made durable in
/// `DATA`, so the cut took the whole directory, and a sled damaged by the same cut could not be
/// rebuilt). Here sled is taken away entirely after the cut; the server must rebuild it from
/// the snapshot and the log, with every acked message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_power_cut_after_the_log_was_purged_leaves_a_snapshot_to_rebuild_from() {
    let Some((dir, fs, session)) = mount_data_dir() else { return };
    let env = [
        ("PARLEY__STORAGE__SEGMENT_BYTES", "4096"),
        ("PARLEY__STORAGE__CHECKPOINT_INTERVAL_MS", "100"),
        ("PARLEY__STORAGE__CHECKPOINT_LOG_BYTES", "8192"),
        ("PARLEY__STORAGE__SNAPSHOT_INTERVAL_MS", "100"),
    ];
    let mut srv = Server::start_with(&dir, &env).await;
    let [mut a, b] = srv.clients(["pa", "pb"]).await;
    let (wal, snaps) = (dir.data().join("wal"), dir.data().join("snapshots"));
    let turns = dialog(7, 64);
    let mut acked: Vec<(String, u64, String)> = Vec::new();
    // Send until a checkpoint has deleted the log's first segment (bounded: 3,000 messages).
    for k in 0..3000 {
        let body = &turns[k % turns.len()];
        let (_, seq, _) = a.send_acked(&format!("m{k}"), "pb", body).await;
        acked.push((format!("m{k}"), seq, body.clone()));
        if k % 16 == 15 && first_segment(&wal).is_some_and(|f| f > 1) && !snapshot_indexes(&snaps).is_empty() {
            break;
        }
    }
    let first = first_segment(&wal).expect("a log segment");
    assert!(first > 1, "no checkpoint deleted the log's first segment after {} acked messages", acked.len());
    a.close().await;
    b.close().await;
    srv.kill9().await;
    fs.drop_unsynced();
    let first = first_segment(&wal).expect("a log segment after the cut");
    let reach: Vec<u64> = snapshot_indexes(&snaps).into_iter().filter(|s| s + 1 >= first).collect();
    assert!(!reach.is_empty(), "after the power cut the log starts at entry {first} and no snapshot reaches it (snapshots: {:?})", snapshot_indexes(&snaps));
    // Sled lost whole: the rebuild must come from the snapshot and the log after it.
    std::fs::remove_dir_all(dir.data().join("state")).expect("remove sled's directory");
    srv.restart().await;
    assert!(srv.log().contains("REBUILT FROM THE WRITE-AHEAD LOG"), "the restart did not rebuild the state");
    let mut c = Client::connect(srv.addr, &srv.login("pb", "web2").await, None, Encoding::Json).await.client;
    let history: Vec<(String, u64, String)> = c.history_all(&Conv::dm("pa", "pb").to_string()).await.into_iter().map(|m| (m.id, m.seq, m.body)).collect();
    c.close().await;
    assert_eq!(history, acked, "the rebuilt history differs from what was acked");
    srv.kill9().await;
    drop(session);
}

/// The test below as its child process: the sled database it writes into.
const SLED_CHILD_ENV: &str = "PARLEY_SLED_CUT_CHILD";
/// The child's checkpoint period, in keys.
const SLED_CKPT_EVERY: u64 = 40;
/// Keys the child overwrites round-robin.
const SLED_HOT: u64 = 1000;
/// Every `SLED_BIG_EVERY`th key the child also writes a value of ~150 KB under one of 4 keys:
/// a node that large is a *blob* in sled (a file of its own in `blobs/`, over a quarter of the
/// 512 KiB segment), as the meta node holding parley's redo record often is.
const SLED_BIG_EVERY: u64 = 25;

fn sled_value(i: u64) -> Vec<u8> {
    vec![(i % 251) as u8; 50 + (i * 37 % 700) as usize]
}

fn sled_big(i: u64) -> Vec<u8> {
    let mut v = i.to_be_bytes().to_vec();
    v.resize(150_000 + (i % 1000) as usize, 9);
    v
}

/// The newest `i <= applied` with `pred(i)`, looking back at most `window` keys.
fn sled_last(applied: u64, window: u64, pred: impl Fn(u64) -> bool) -> Option<u64> {
    (applied.saturating_sub(window) + 1..=applied).rev().find(|i| pred(*i))
}

/// The child: opens sled in `dir` as parley does (then fsyncs the directory holding it), checks
/// what it finds, prints `OPEN applied <n> bad <k>` (and a `BAD ...` line per problem), then
/// writes keys `applied + 1, ...` until killed, one batch each (the key, `applied`, a hot key,
/// sometimes a big one), and every [`SLED_CKPT_EVERY`] keys does parley's checkpoint (`flush`,
/// then fsync of every file and directory) and prints `CKPT <n>`.
fn sled_child(dir: &std::path::Path) {
    use std::io::Write;
    let db = sled::Config::new().path(dir).open().expect("open sled");
    std::fs::File::open(dir.parent().expect("parent")).and_then(|d| d.sync_all()).expect("fsync the parent");
    let t = db.open_tree("state").expect("tree");
    let get_u64 = |k: &[u8]| t.get(k).expect("get").map(|v| u64::from_be_bytes(v.as_ref()[..8].try_into().expect("8 bytes")));
    let applied = get_u64(b"applied").unwrap_or(0);
    let mut out = std::io::stdout().lock();
    let mut bad = Vec::new();
    for i in 1..=applied {
        if t.get(i.to_be_bytes()).expect("get").is_none_or(|v| v.as_ref() != sled_value(i).as_slice()) {
            bad.push(format!("key {i} is missing or wrong"));
        }
    }
    for h in 0..SLED_HOT {
        let (want, got) = (sled_last(applied, SLED_HOT, |i| i % SLED_HOT == h), get_u64(&[b"h".as_slice(), &h.to_be_bytes()].concat()));
        if want != got {
            bad.push(format!("hot key {h} holds {got:?}, not {want:?}"));
        }
    }
    for k in 0..4 {
        let want = sled_last(applied, 4 * SLED_BIG_EVERY, |i| i % SLED_BIG_EVERY == 0 && (i / SLED_BIG_EVERY) % 4 == k);
        let got = t.get([b"b".as_slice(), &k.to_be_bytes()].concat()).expect("get");
        if want.map(sled_big) != got.as_ref().map(|v| v.to_vec()) {
            bad.push(format!("big key {k} holds {:?}, not {want:?}", got.map(|v| u64::from_be_bytes(v.as_ref()[..8].try_into().expect("8 bytes")))));
        }
    }
    for b in bad.iter().take(5) {
        writeln!(out, "BAD applied {applied}: {b}").expect("stdout");
    }
    writeln!(out, "OPEN applied {applied} bad {}", bad.len()).expect("stdout");
    out.flush().expect("stdout");
    // Until killed (bounded anyway: ~10 minutes of writes at most).
    for i in applied + 1..applied + 10_000_000 {
        let mut b = sled::Batch::default();
        b.insert(&i.to_be_bytes(), sled_value(i));
        b.insert(b"applied", &i.to_be_bytes());
        let mut hot = i.to_be_bytes().to_vec();
        hot.resize(8 + (i * 13 % 300) as usize, 7);
        b.insert([b"h".as_slice(), &(i % SLED_HOT).to_be_bytes()].concat(), hot);
        if i % SLED_BIG_EVERY == 0 {
            b.insert([b"b".as_slice(), &((i / SLED_BIG_EVERY) % 4).to_be_bytes()].concat(), sled_big(i));
        }
        t.apply_batch(b).expect("apply_batch");
        if i % SLED_CKPT_EVERY == 0 {
            db.flush().expect("flush");
            fsync_tree(dir).expect("fsync the tree");
            writeln!(out, "CKPT {i}").expect("stdout");
            out.flush().expect("stdout");
        }
    }
}

/// sled (vendor/sled, with the patches in its PATCHES.md) on the forgetful file system: what
/// a checkpoint made durable survives `kill -9` and power cuts, and sled opens what is left.
/// A child process writes (see [`sled_child`]); this test kills it after 20–800 ms, drops
/// everything unsynced in 7 rounds of 10 (a plain `kill -9` in the others), and the next child
/// checks that sled opens and holds every key up to at least the last checkpoint, each with
/// its value. Unpatched sled 0.34.7 failed 3 of 3 runs of 40 rounds, at rounds 11, 23 and 27 (it
/// panicked at open, "cannot find pid .. in view_for_key": its log pointed at blob files that
/// were never fsync'd; vendor/sled/PATCHES.md, 2a).
/// `PARLEY_SLED_CUT_ROUNDS` sets the rounds (default 40); `PARLEY_SLED_CUT_SEED` replays the
/// kill moments.
#[test]
fn sled_keeps_what_a_checkpoint_made_durable_across_power_cuts() {
    if let Ok(dir) = std::env::var(SLED_CHILD_ENV) {
        return sled_child(std::path::Path::new(&dir));
    }
    let rounds: usize = std::env::var("PARLEY_SLED_CUT_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(40);
    let seed: u64 = std::env::var("PARLEY_SLED_CUT_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    let Some((dir, fs, session)) = mount_data_dir() else { return };
    eprintln!("sled power cuts: seed {seed} (PARLEY_SLED_CUT_SEED={seed} replays it), {rounds} rounds");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let state = dir.data().join("state");
    let exe = std::env::current_exe().expect("the test binary");
    let (mut ckpt, mut highest, mut last_was_cut) = (0u64, 0u64, false);
    for round in 1..=rounds {
        let err = dir.path().join(format!("sled-child-{round}.err"));
        let mut child = std::process::Command::new(&exe)
            .args(["--exact", "sled_keeps_what_a_checkpoint_made_durable_across_power_cuts", "--nocapture", "--test-threads", "1"])
            .env(SLED_CHILD_ENV, &state)
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(&err).expect("child's stderr file"))
            .spawn()
            .expect("start the child");
        let stdout = child.stdout.take().expect("child's stdout");
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let reader = std::thread::spawn(move || {
            use std::io::BufRead;
            for l in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                // libtest prints "test <name> ... " on the same line before the child's output.
                let at = ["OPEN", "BAD", "CKPT"].iter().filter_map(|m| l.find(m)).min().unwrap_or(0);
                if tx.send(l[at..].to_owned()).is_err() {
                    break;
                }
            }
        });
        // Wait for the child's open report (bounded), then let it write for 20-800 ms.
        let mut opened: Option<String> = None;
        let mut problems = Vec::new();
        let open_deadline = Instant::now() + Duration::from_secs(30);
        while opened.is_none() && Instant::now() < open_deadline {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(l) if l.starts_with("BAD") => problems.push(l),
                Ok(l) if l.starts_with("OPEN") => opened = Some(l),
                Ok(_) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        let Some(open) = opened else {
            let _ = child.kill();
            let _ = child.wait();
            let why: Vec<String> = std::fs::read_to_string(&err).unwrap_or_default().lines().filter(|l| !l.starts_with("  ")).take(4).map(str::to_owned).collect();
            panic!("round {round}: sled did not open after the previous round's {} (last checkpoint: key {ckpt}): {}", if last_was_cut { "cut" } else { "kill" }, why.join(" | "));
        };
        let applied: u64 = open.split_whitespace().nth(2).and_then(|s| s.parse().ok()).expect("OPEN line");
        assert!(problems.is_empty() && open.ends_with(" bad 0"), "round {round}: sled opened wrong: {open}; {problems:?}");
        assert!(applied >= ckpt, "round {round}: sled opened at key {applied}, behind the last checkpoint at key {ckpt}");
        highest = highest.max(applied);
        // The child's lines are read after the kill (the channel holds them): the last `CKPT`
        // it printed is the checkpoint the next child must find.
        std::thread::sleep(Duration::from_millis(rng.gen_range(20..800)));
        let _ = child.kill();
        let _ = child.wait();
        for l in rx.iter() {
            if let Some(n) = l.strip_prefix("CKPT ").and_then(|n| n.parse().ok()) {
                ckpt = n;
            }
        }
        let _ = reader.join();
        last_was_cut = rng.gen_bool(0.7);
        if last_was_cut {
            fs.drop_unsynced();
        }
    }
    drop(session);
    assert!(ckpt > 0, "no checkpoint in {rounds} rounds");
    eprintln!("sled power cuts: {rounds} rounds, sled opened every time with every checkpointed key; last checkpoint at key {ckpt}, highest key {highest}");
}
