//! THE crash test (PROTOCOL.md §4.1, §4.2, §4.5; ARCHITECTURE "ack after durable").
//!
//! Four senders send real dialog turns continuously (to two recipients, and every fourth message
//! to a group of all six users), a window of several sends in flight each, recording every ack.
//! The recipients read live and confirm with `received` as they go. The server is `kill -9`ed at
//! a random moment 50-500 ms after each start, restarted on the same data directory, and the
//! clients carry on, resending what was not acknowledged with the same id. Twice, a torn record
//! is appended to the log's tail after the kill (as a crash mid-append leaves it): the restart
//! must cut it and lose nothing.
//!
//! At the end, for every conversation, via `history` pages and via every member's backlog from
//! cursor 0: every acknowledged message is present exactly once, with its body, at its acked seq
//! and ts; seqs are 1..N without gaps; a message that was sent but never acknowledged is either
//! absent or present exactly once, and resending it returns its stored seq.
//!
//! Set `PARLEY_CRASH_SEED` to replay a run's kill timings (the seed is printed).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use parley::protocol::ids::Conv;
use parley::protocol::{ClientFrame, Encoding, ErrorCode, MessageView, Request, ServerFrame};
use rand::{Rng, SeedableRng};

use crate::common::{hello_stored, sender_name, within, Client, Incoming, LiveStream, Sent, Server, TestDir, T};

const SENDERS: usize = 4;
const RECIPIENTS: [&str; 2] = ["r0", "r1"];
const ROUNDS: usize = 10;
/// After the kill of these rounds, a torn record is appended to the log's tail: a record whose
/// header claims 1,000 bytes followed by 40, then a record header cut short after 5 bytes.
const TORN_ROUNDS: [(usize, TornTail); 2] = [(3, TornTail::BodyCutShort), (7, TornTail::HeaderCutShort)];
/// Sends in flight per sender.
const WINDOW: usize = 8;
/// `received` after this many events.
const CONFIRM_EVERY: u64 = 32;

/// What one sender sent and what was acknowledged. Locked only between awaits.
#[derive(Default)]
struct Ledger {
    /// Message k has id `{user}-{k}`.
    msgs: Vec<Sent>,
    /// id → (conv, seq, ts) of its ack.
    acked: HashMap<String, (String, u64, u64)>,
}

/// Problems seen by the client tasks, reported at the end.
#[derive(Default)]
struct Oddities {
    /// Close codes of sockets that closed while the server was alive.
    closes: Vec<(String, Option<u16>)>,
}

struct Shared {
    /// Set just before the kill: a socket that closes after this is expected to.
    killed: AtomicBool,
    odd: Mutex<Oddities>,
}

/// Runs `conn` (one connection) again and again until the server is killed. A connection that
/// ends while the server is up is recorded as an oddity.
async fn until_killed<F: Future<Output = Option<u16>>>(user: &str, sh: &Shared, mut conn: impl FnMut() -> F) {
    while !sh.killed.load(Ordering::SeqCst) {
        let code = conn().await;
        if !sh.killed.load(Ordering::SeqCst) {
            sh.odd.lock().unwrap().closes.push((user.to_owned(), code));
        }
    }
}

/// One connection of a sender: resends what is unacknowledged, then sends new turns, keeping
/// [`WINDOW`] in flight and recording every ack. Returns the close code when the socket ends.
async fn sender_conn(
    addr: SocketAddr,
    user: &str,
    token: &str,
    group: &str,
    ledger: &Mutex<Ledger>,
    sh: &Shared,
    seed: usize,
) -> Option<u16> {
    let mut c = hello_stored(addr, token).await?;
    // First the resends of everything sent before and not acknowledged, in order; then new ones.
    let mut queue: VecDeque<usize> = {
        let l = ledger.lock().unwrap();
        (0..l.msgs.len()).filter(|k| !l.acked.contains_key(&l.msgs[*k].id)).collect()
    };
    let mut inflight: HashSet<usize> = HashSet::new();
    let mut welcomed = false;
    let mut stream = LiveStream::new(CONFIRM_EVERY);
    loop {
        while welcomed && inflight.len() < WINDOW && !sh.killed.load(Ordering::SeqCst) {
            let sent = {
                let mut l = ledger.lock().unwrap();
                let k = match queue.pop_front() {
                    Some(k) => k,
                    None => {
                        let k = l.msgs.len();
                        l.msgs.push(Sent::nth(user, k, RECIPIENTS[seed % 2], group, seed));
                        k
                    }
                };
                inflight.insert(k);
                l.msgs[k].clone()
            };
            let frame = ClientFrame::Send { id: sent.id, to: sent.to, body: sent.body };
            if c.try_send_req(Request { rid: None, frame }).await.is_err() {
                return None;
            }
        }
        let f = match c.next_within(T).await {
            None => panic!("{user}: no frame within {T:?} from a running server"),
            Some(Incoming::Closed(code)) => return code,
            Some(Incoming::Frame(f)) => f,
        };
        match f {
            ServerFrame::Welcome { .. } => welcomed = true,
            ServerFrame::Synced { .. } => {}
            ServerFrame::Ack { id, conv, seq, ts, .. } => {
                let k: usize = id.rsplit('-').next().and_then(|k| k.parse().ok()).unwrap_or_else(|| panic!("ack of unknown id {id}"));
                let mut l = ledger.lock().unwrap();
                assert_eq!(conv, l.msgs[k].conv, "ack of {id} names another conversation");
                if let Some(prev) = l.acked.get(&id) {
                    assert_eq!(prev, &(conv.clone(), seq, ts), "a second ack of {id} differs from the first");
                }
                l.acked.insert(id, (conv, seq, ts));
                inflight.remove(&k);
            }
            ServerFrame::Error { id: Some(id), code, message, .. } => {
                // Storage hiccups are retried like a lost ack; anything else is a bug.
                assert!(matches!(code, ErrorCode::Overloaded | ErrorCode::Unavailable), "{user}: send {id} refused: {code:?} {message}");
                let k: usize = id.rsplit('-').next().and_then(|k| k.parse().ok()).expect("id");
                inflight.remove(&k);
                queue.push_back(k);
            }
            ServerFrame::Event { ev, .. } => stream.event(&mut c, user, ev).await.ok()?,
            f => panic!("{user}: unexpected frame {f:?}"),
        }
    }
}

/// One connection of a recipient, reading live and confirming as it goes.
async fn recipient_conn(addr: SocketAddr, user: &str, token: &str) -> Option<u16> {
    let mut c = hello_stored(addr, token).await?;
    let mut stream = LiveStream::new(CONFIRM_EVERY);
    loop {
        match c.next_within(T).await {
            None => panic!("{user}: no frame within {T:?} from a running server"),
            Some(Incoming::Closed(code)) => return code,
            Some(Incoming::Frame(ServerFrame::Event { ev, .. })) => stream.event(&mut c, user, ev).await.ok()?,
            Some(Incoming::Frame(ServerFrame::Welcome { .. } | ServerFrame::Synced { .. })) => {}
            Some(Incoming::Frame(f)) => panic!("{user}: unexpected frame {f:?}"),
        }
    }
}

/// How the record appended to the log's tail is torn.
#[derive(Clone, Copy, Debug)]
enum TornTail {
    /// A full record header claiming 1,000 bytes of body, and 40 of them.
    BodyCutShort,
    /// 5 of a record header's 8 bytes.
    HeaderCutShort,
}

/// Appends a torn record to the last log segment, as a crash in the middle of an append would
/// leave it. Returns the number of bytes appended.
fn append_torn_record(data: &Path, how: TornTail) -> u64 {
    let wal = data.join("wal");
    let last = std::fs::read_dir(&wal)
        .expect("wal directory")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .max()
        .expect("a log segment");
    let mut junk = Vec::new();
    junk.extend_from_slice(&1000u32.to_le_bytes());
    junk.extend_from_slice(&0xdead_beefu32.to_le_bytes());
    junk.extend_from_slice(&[0x5a; 40]);
    if let TornTail::HeaderCutShort = how {
        junk.truncate(5);
    }
    let mut f = std::fs::OpenOptions::new().append(true).open(&last).expect("open segment");
    f.write_all(&junk).expect("append");
    f.sync_all().expect("fsync");
    junk.len() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_loses_no_acknowledged_message() {
    let started = Instant::now();
    let seed: u64 = std::env::var("PARLEY_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("crash test: seed {seed} (PARLEY_CRASH_SEED={seed} replays the kill timings)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    let dir = TestDir::new();
    let mut srv = Server::start(&dir).await;
    let senders: Vec<String> = (0..SENDERS).map(sender_name).collect();
    let mut tokens: BTreeMap<String, String> = BTreeMap::new();
    for u in senders.iter().map(String::as_str).chain(RECIPIENTS) {
        tokens.insert(u.to_owned(), srv.user(u).await);
    }
    let group = {
        let mut c = srv.connect(&tokens["r0"], None).await.client;
        let members: Vec<String> = senders.iter().cloned().chain(["r1".to_owned()]).collect();
        let reply = c.request("g", ClientFrame::GroupCreate { name: "crash test 💥".into(), members }).await;
        let ServerFrame::Result { group: Some(g), .. } = reply else { panic!("group_create: {reply:?}") };
        c.close().await;
        g
    };
    let ledgers: Vec<Arc<Mutex<Ledger>>> = (0..SENDERS).map(|_| Arc::new(Mutex::new(Ledger::default()))).collect();
    let odd = Arc::new(Mutex::new(Oddities::default()));

    let mut kills = 0;
    let mut torn_cut: Vec<u64> = Vec::new();
    for round in 1..=ROUNDS {
        let round_start = Instant::now();
        let sh = Arc::new(Shared { killed: AtomicBool::new(false), odd: Mutex::new(Oddities::default()) });
        let mut tasks = Vec::new();
        for (i, u) in senders.iter().enumerate() {
            let (u, t, g, l, sh) = (u.clone(), tokens[u].clone(), group.clone(), ledgers[i].clone(), sh.clone());
            let addr = srv.addr;
            tasks.push(tokio::spawn(async move {
                until_killed(&u, &sh, || sender_conn(addr, &u, &t, &g, &l, &sh, i)).await;
            }));
        }
        for r in RECIPIENTS {
            let (addr, t, sh) = (srv.addr, tokens[r].clone(), sh.clone());
            tasks.push(tokio::spawn(async move { until_killed(r, &sh, || recipient_conn(addr, r, &t)).await }));
        }
        // The kill moment is random; this sleep is the experiment, not a synchronisation.
        let delay = Duration::from_millis(rng.gen_range(50..=500));
        tokio::time::sleep(delay).await;
        sh.killed.store(true, Ordering::SeqCst);
        srv.kill9().await;
        kills += 1;
        for t in tasks {
            within(T, "a client task to notice the kill", t).await.expect("client task panicked");
        }
        odd.lock().unwrap().closes.extend(std::mem::take(&mut sh.odd.lock().unwrap().closes));
        let acked: usize = ledgers.iter().map(|l| l.lock().unwrap().acked.len()).sum();
        eprintln!("crash test: round {round}: killed after {delay:?} ({:?} since start), {acked} acked so far", round_start.elapsed());

        let torn = TORN_ROUNDS.iter().find(|(r, _)| *r == round).map(|(_, how)| (*how, append_torn_record(&dir.data(), *how)));
        srv.restart().await;
        if let Some((how, n)) = torn {
            let report = srv.recovery_report();
            let cut = report["torn_tail_bytes"].as_u64().expect("torn_tail_bytes");
            assert!(cut >= n, "the torn tail ({how:?}, {n} bytes) was not cut: {report}");
            torn_cut.push(cut);
        }
    }

    // ---- verification, on the server restarted after the last kill
    eprintln!("crash test: verifying ({:?} since start)", started.elapsed());
    let members_of = |conv: &str| -> Vec<String> {
        if conv == group {
            senders.iter().cloned().chain(RECIPIENTS.iter().map(|r| r.to_string())).collect()
        } else {
            conv.trim_start_matches("dm:").split(':').map(str::to_owned).collect()
        }
    };
    let convs: Vec<String> = (0..SENDERS).map(|i| Conv::dm(&sender_name(i), RECIPIENTS[i % 2]).to_string()).chain([group.clone()]).collect();
    // Everything sent, by (from, id).
    let mut sent: HashMap<(String, String), Sent> = HashMap::new();
    for (i, l) in ledgers.iter().enumerate() {
        for m in &l.lock().unwrap().msgs {
            sent.insert((sender_name(i), m.id.clone()), m.clone());
        }
    }
    let histories = |srv: &Server| {
        let (srv_addr, tokens, convs) = (srv.addr, tokens.clone(), convs.clone());
        let members_of = members_of.clone();
        async move {
            let mut out: BTreeMap<String, Vec<MessageView>> = BTreeMap::new();
            for conv in &convs {
                let reader = members_of(conv).into_iter().find(|u| u.starts_with('r')).expect("a recipient member");
                let mut c = Client::connect(srv_addr, &tokens[&reader], None, Encoding::Json).await.client;
                out.insert(conv.clone(), c.history_all(conv).await);
                c.close().await;
            }
            out
        }
    };

    // 1. Every stored message is one that was sent, stored once, with its body; every acked one
    //    is there at its acked seq and ts.
    let before = histories(&srv).await;
    let mut stored: HashMap<(String, String), (String, u64, u64)> = HashMap::new();
    for (conv, msgs) in &before {
        for m in msgs {
            let key = (m.from.clone(), m.id.clone());
            let s = sent.get(&key).unwrap_or_else(|| panic!("{conv} seq {}: a message nobody sent: {m:?}", m.seq));
            assert_eq!((&s.conv, &s.body), (conv, &m.body), "{conv} seq {}: {m:?}", m.seq);
            assert!(stored.insert(key, (conv.clone(), m.seq, m.ts)).is_none(), "{conv}: {} {} stored twice", m.from, m.id);
        }
    }
    let mut acked_total = 0;
    let mut unacked: Vec<(usize, Sent)> = Vec::new();
    for (i, l) in ledgers.iter().enumerate() {
        let l = l.lock().unwrap();
        for m in &l.msgs {
            match l.acked.get(&m.id) {
                Some(a) => {
                    acked_total += 1;
                    let got = stored.get(&(sender_name(i), m.id.clone()));
                    assert_eq!(got, Some(a), "acked message {} (ack {a:?}) is missing or moved after the crashes", m.id);
                }
                None => unacked.push((i, m.clone())),
            }
        }
    }

    eprintln!("crash test: histories checked ({:?})", started.elapsed());
    // 2. Resends: unacked ones get their stored seq if they were stored; a sample of acked ones
    //    gets the original ack.
    let (mut unacked_stored, mut unacked_lost) = (0, 0);
    for i in 0..SENDERS {
        let u = sender_name(i);
        let mut c = Client::connect(srv.addr, &tokens[&u], None, Encoding::Json).await.client;
        for (_, m) in unacked.iter().filter(|(j, _)| *j == i) {
            let ack = c.send_acked(&m.id, &m.to, &m.body).await;
            match stored.get(&(u.clone(), m.id.clone())) {
                Some(s) => {
                    unacked_stored += 1;
                    assert_eq!(&ack, s, "resend of unacked-but-stored {} did not return its stored seq", m.id);
                }
                None => unacked_lost += 1,
            }
            ledgers[i].lock().unwrap().acked.insert(m.id.clone(), ack);
        }
        let sample: Vec<(Sent, (String, u64, u64))> = {
            let l = ledgers[i].lock().unwrap();
            l.msgs.iter().step_by(7).map(|m| (m.clone(), l.acked[&m.id].clone())).collect()
        };
        for (m, a) in sample {
            assert_eq!(c.send_acked(&m.id, &m.to, &m.body).await, a, "resend of {} after the crashes", m.id);
        }
        c.close().await;
    }

    eprintln!("crash test: resends checked ({:?})", started.elapsed());
    // 3. Now everything sent is acked: every conversation holds exactly the sent messages, each
    //    once at its acked seq, 1..N without gaps (history_all checks the gaps).
    let after = histories(&srv).await;
    let mut total = 0;
    for (conv, msgs) in &after {
        let mut expect: Vec<(u64, String, String)> = Vec::new();
        for (i, l) in ledgers.iter().enumerate() {
            let l = l.lock().unwrap();
            for m in l.msgs.iter().filter(|m| &m.conv == conv) {
                expect.push((l.acked[&m.id].1, sender_name(i), m.id.clone()));
            }
        }
        expect.sort();
        let got: Vec<(u64, String, String)> = msgs.iter().map(|m| (m.seq, m.from.clone(), m.id.clone())).collect();
        assert_eq!(got, expect, "{conv} after the resends");
        total += msgs.len();
    }

    eprintln!("crash test: histories after the resends checked ({:?})", started.elapsed());
    // 4. Every member's stream from cursor 0 has each conversation's messages exactly as the
    //    history has them (Client::sync checks ev 1..head without gaps).
    for u in senders.iter().map(String::as_str).chain(RECIPIENTS) {
        let s = Client::connect(srv.addr, &tokens[u], Some(0), Encoding::Json).await;
        let mut per_conv: BTreeMap<String, Vec<(u64, String, String)>> = BTreeMap::new();
        for (_, m) in s.messages() {
            per_conv.entry(m.conv.clone()).or_default().push((m.seq, m.id.clone(), m.body.clone()));
        }
        for conv in convs.iter().filter(|c| members_of(c).iter().any(|m| m == u)) {
            let want: Vec<(u64, String, String)> = after[conv].iter().map(|m| (m.seq, m.id.clone(), m.body.clone())).collect();
            assert_eq!(per_conv.remove(conv).unwrap_or_default(), want, "{u}'s backlog of {conv} differs from its history");
        }
        assert!(per_conv.is_empty(), "{u}'s backlog has conversations it is not in: {:?}", per_conv.keys());
        s.client.close().await;
    }

    let closes = odd.lock().unwrap().closes.clone();
    assert!(closes.iter().all(|(_, c)| *c == Some(4008)), "sockets closed while the server was up: {closes:?}");
    assert!(acked_total > 0, "no message was acknowledged in {kills} rounds");
    eprintln!(
        "crash test: {acked_total} acked messages verified over {kills} kills \
         ({unacked_stored} unacked found stored, {unacked_lost} unacked not stored, {total} messages in {} conversations, \
         torn tails of {torn_cut:?} bytes cut, {:?})",
        convs.len(),
        started.elapsed()
    );
}
