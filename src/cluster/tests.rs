//! The cluster module's tests: openraft's storage suite on the log store and parley's state
//! machine adapter; reopen and power-loss tests of what the log store promises (vote, truncate,
//! purge, torn tail); snapshot transfer and reopen tests of the state machine over real
//! commands.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use openraft::storage::{RaftLogStorage, RaftLogStorageExt, RaftStateMachine};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{BasicNode, CommittedLeaderId, EntryPayload, Membership, RaftLogReader, RaftSnapshotBuilder, StoredMembership};
use tokio::io::AsyncWriteExt;

use super::log_store::LogStore;
use super::state_machine::StateMachine;
use super::types::{Batch, Entry, LogId, StorageError, Vote};
use crate::protocol::ids::Conv;
use crate::storage::disk::{Disk, SimDisk};
use crate::storage::records::{self, Command, LogEntry};
use crate::storage::{Effects, Outcome, Sink};

/// Small segments, so the tests roll, purge and truncate across segment files.
const SEGMENT_BYTES: u64 = 256;
/// sled's page cache in the tests, bytes.
const CACHE_BYTES: u64 = 1 << 20;

/// A sink that keeps every event it is handed, as (user, ev).
#[derive(Default)]
struct Collect(Mutex<Vec<(String, u64)>>);

impl Sink for Collect {
    fn committed(&self, effects: Effects) {
        self.0.lock().unwrap().extend(effects.events.into_iter().map(|p| (p.user, p.ev)));
    }
}

fn open_sm(dir: &Path) -> (StateMachine, Arc<Collect>) {
    let sink = Arc::new(Collect::default());
    (StateMachine::open(dir, CACHE_BYTES, sink.clone()).expect("open the state machine"), sink)
}

/// Builds a fresh log store and state machine (on the real file system, in a temp dir).
struct Builder;

impl StoreBuilder<super::types::TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError> {
        let tmp = tempfile::tempdir().expect("temp dir");
        let log = LogStore::open(&tmp.path().join("raft"), SEGMENT_BYTES)?;
        let sm = StateMachine::open(&tmp.path().join("sm"), CACHE_BYTES, Arc::new(Collect::default()))?;
        Ok((tmp, log, sm))
    }
}

#[test]
fn openraft_storage_suite_passes_on_the_wal_log_store_and_the_state_machine() {
    Suite::test_all(Builder).expect("openraft::testing::Suite::test_all");
}

/// Log id (term, leader 1, index).
fn lid(term: u64, index: u64) -> LogId {
    LogId::new(CommittedLeaderId::new(term, 1), index)
}

/// Entry `index` of `term`: the membership {1, 2, 3} at 0, else a batch whose bytes name it.
fn ent(term: u64, index: u64) -> Entry {
    let payload = if index == 0 {
        let nodes = (1..=3).map(|i| (i, BasicNode::new(format!("127.0.0.1:{}", 7000 + i)))).collect::<std::collections::BTreeMap<_, _>>();
        EntryPayload::Membership(Membership::new(vec![nodes.keys().copied().collect()], nodes))
    } else {
        EntryPayload::Normal(Batch::anonymous(format!("batch {index} of term {term}").into_bytes().repeat((index % 5) as usize + 1)))
    };
    Entry { log_id: lid(term, index), payload }
}

fn ents(term: u64, range: std::ops::RangeInclusive<u64>) -> Vec<Entry> {
    range.map(|i| ent(term, i)).collect()
}

/// Every entry the store returns, as (log id, payload) debug strings (openraft's `Entry` is
/// compared by what it shows).
async fn all(store: &mut LogStore) -> Vec<String> {
    store.try_get_log_entries(0..).await.expect("read").iter().map(|e| format!("{e:?}")).collect()
}

fn shown(entries: &[Entry]) -> Vec<String> {
    entries.iter().map(|e| format!("{e:?}")).collect()
}

fn segments(dir: &Path) -> usize {
    std::fs::read_dir(dir.join("log")).expect("log dir").filter(|e| e.as_ref().is_ok_and(|e| e.path().extension().is_some_and(|x| x == "wal"))).count()
}

#[tokio::test]
async fn the_vote_survives_a_reopen_and_the_latest_one_wins() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("raft");
    let mut s = LogStore::open(&dir, SEGMENT_BYTES).unwrap();
    assert_eq!(s.read_vote().await.unwrap(), None);
    s.save_vote(&Vote::new(3, 2)).await.unwrap();
    s.save_vote(&Vote::new_committed(4, 1)).await.unwrap();
    drop(s);
    let mut s = LogStore::open(&dir, SEGMENT_BYTES).unwrap();
    assert_eq!(s.read_vote().await.unwrap(), Some(Vote::new_committed(4, 1)));
    assert!(!dir.join("meta.tmp").exists(), "the temporary file was renamed");
    // A damaged vote file is refused, not read as "no vote" (that could vote twice in a term).
    drop(s);
    let mut b = std::fs::read(dir.join("meta")).unwrap();
    b[1] ^= 0x40;
    std::fs::write(dir.join("meta"), b).unwrap();
    let e = LogStore::open(&dir, SEGMENT_BYTES).unwrap_err().to_string();
    assert!(e.contains("meta") && e.contains("CRC"), "{e}");
}

/// A store in a new temp dir holding entries 0..=40 of term 1.
async fn store_of_41() -> (tempfile::TempDir, PathBuf, LogStore) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("raft");
    let mut s = LogStore::open(&dir, SEGMENT_BYTES).unwrap();
    s.blocking_append(ents(1, 0..=40)).await.unwrap();
    (tmp, dir, s)
}

#[tokio::test]
async fn a_truncate_survives_a_reopen_and_the_log_continues_in_the_new_term() {
    let (_tmp, dir, mut s) = store_of_41().await;
    assert!(segments(&dir) > 3, "small segments roll");
    s.truncate(lid(1, 17)).await.unwrap();
    assert_eq!(s.get_log_state().await.unwrap().last_log_id, Some(lid(1, 16)));
    drop(s);
    let mut s = LogStore::open(&dir, SEGMENT_BYTES).unwrap();
    assert_eq!(s.get_log_state().await.unwrap().last_log_id, Some(lid(1, 16)));
    assert_eq!(all(&mut s).await, shown(&ents(1, 0..=16)));
    s.blocking_append(ents(2, 17..=25)).await.unwrap();
    drop(s);
    let mut s = LogStore::open(&dir, SEGMENT_BYTES).unwrap();
    let mut want = ents(1, 0..=16);
    want.extend(ents(2, 17..=25));
    assert_eq!(all(&mut s).await, shown(&want));
    assert_eq!(s.get_log_state().await.unwrap().last_log_id, Some(lid(2, 25)));
    // Truncating everything leaves an empty log that starts at index 0 again.
    s.truncate(lid(1, 0)).await.unwrap();
    drop(s);
    let mut s = LogStore::open(&dir, SEGMENT_BYTES).unwrap();
    let st = s.get_log_state().await.unwrap();
    assert_eq!((st.last_purged_log_id, st.last_log_id), (None, None));
    s.blocking_append(ents(3, 0..=1)).await.unwrap();
}

#[tokio::test]
async fn a_purge_survives_a_reopen_and_a_purge_past_the_end_restarts_the_log_after_it() {
    let (_tmp, dir, mut s) = store_of_41().await;
    let before = segments(&dir);
    s.purge(lid(1, 20)).await.unwrap();
    assert!(segments(&dir) < before, "whole segments up to the mark are deleted");
    drop(s);
    let mut s = LogStore::open(&dir, SEGMENT_BYTES).unwrap();
    let st = s.get_log_state().await.unwrap();
    assert_eq!((st.last_purged_log_id, st.last_log_id), (Some(lid(1, 20)), Some(lid(1, 40))));
    assert_eq!(all(&mut s).await, shown(&ents(1, 21..=40)), "nothing at or below the mark is read");
    // A follower that installed a snapshot up to 60: its log continues at 61.
    s.purge(lid(2, 60)).await.unwrap();
    assert_eq!(segments(&dir), 1);
    drop(s);
    let mut s = LogStore::open(&dir, SEGMENT_BYTES).unwrap();
    let st = s.get_log_state().await.unwrap();
    assert_eq!((st.last_purged_log_id, st.last_log_id), (Some(lid(2, 60)), Some(lid(2, 60))));
    assert!(all(&mut s).await.is_empty());
    s.blocking_append(ents(2, 61..=63)).await.unwrap();
    drop(s);
    let mut s = LogStore::open(&dir, SEGMENT_BYTES).unwrap();
    assert_eq!(all(&mut s).await, shown(&ents(2, 61..=63)));
    // A log restarted by an append at a later index into an empty log can be truncated below
    // its first entry, and then starts wherever the next append says.
    let tmp2 = tempfile::tempdir().unwrap();
    let mut g = LogStore::open(&tmp2.path().join("raft"), SEGMENT_BYTES).unwrap();
    g.blocking_append(ents(1, 5..=7)).await.unwrap();
    g.truncate(lid(1, 2)).await.unwrap();
    assert_eq!(g.get_log_state().await.unwrap().last_log_id, None);
    g.blocking_append(ents(2, 0..=1)).await.unwrap();
    assert_eq!(all(&mut g).await, shown(&ents(2, 0..=1)));
    // A hole, and an append over entries without a truncate, are refused.
    assert!(s.blocking_append(ents(2, 65..=65)).await.is_err());
    assert!(s.blocking_append(ents(3, 62..=62)).await.is_err());
    assert_eq!(s.get_log_state().await.unwrap().last_log_id, Some(lid(2, 63)));
}

#[tokio::test]
async fn a_torn_last_write_is_cut_on_reopen_and_the_log_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("raft");
    let mut s = LogStore::open(&dir, 1 << 20).unwrap();
    s.blocking_append(ents(1, 0..=9)).await.unwrap();
    drop(s);
    // A power loss in the middle of the next append: half a record at the end of the segment.
    let seg = std::fs::read_dir(dir.join("log")).unwrap().next().unwrap().unwrap().path();
    let whole = std::fs::read(&seg).unwrap();
    let mut torn = whole.clone();
    torn.extend_from_slice(&[60, 0, 0, 0, 0xde, 0xad, 0xbe, 0xef, 11, 0, 0]);
    std::fs::write(&seg, &torn).unwrap();
    let mut s = LogStore::open(&dir, 1 << 20).unwrap();
    assert_eq!(std::fs::read(&seg).unwrap(), whole, "the torn record is cut");
    assert_eq!(s.get_log_state().await.unwrap().last_log_id, Some(lid(1, 9)));
    s.blocking_append(ents(1, 10..=11)).await.unwrap();
    drop(s);
    let mut s = LogStore::open(&dir, 1 << 20).unwrap();
    assert_eq!(all(&mut s).await, shown(&ents(1, 0..=11)));
}

/// Opens the store on the simulated disk.
fn open_sim(disk: &SimDisk) -> Result<LogStore, StorageError> {
    let d: Arc<dyn Disk> = Arc::new(disk.clone());
    LogStore::open_on(d, Path::new("/raft"), SEGMENT_BYTES)
}

#[tokio::test]
async fn vote_truncate_and_purge_then_power_loss_keep_what_returned_ok_and_never_leave_a_hole() {
    for seed in 0..60u64 {
        let disk = SimDisk::new(seed);
        let mut s = open_sim(&disk).unwrap();
        s.blocking_append(ents(1, 0..=30)).await.unwrap();
        s.save_vote(&Vote::new(1, 1)).await.unwrap();
        disk.fail_after(seed % 12);
        let op = seed % 3;
        let ok = match op {
            0 => s.save_vote(&Vote::new(5, 2)).await.is_ok(),
            1 => s.truncate(lid(1, 11)).await.is_ok(),
            _ => s.purge(lid(2, 50)).await.is_ok(),
        };
        drop(s);
        disk.power_loss();
        let mut s = open_sim(&disk).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        let vote = s.read_vote().await.unwrap();
        let st = s.get_log_state().await.unwrap();
        let got = all(&mut s).await;
        match op {
            0 => {
                assert!(vote == Some(Vote::new(5, 2)) || (!ok && vote == Some(Vote::new(1, 1))), "seed {seed}: {vote:?}");
                assert_eq!(got, shown(&ents(1, 0..=30)), "seed {seed}");
            }
            1 => {
                let last = st.last_log_id.map(|l| l.index).unwrap_or(0);
                assert_eq!(got, shown(&ents(1, 0..=last)), "seed {seed}: not a prefix");
                assert!(if ok { last == 10 } else { (10..=30).contains(&last) }, "seed {seed}: {last}");
            }
            _ => {
                if ok || st.last_purged_log_id.is_some() {
                    assert_eq!((st.last_purged_log_id, st.last_log_id, got.len()), (Some(lid(2, 50)), Some(lid(2, 50)), 0), "seed {seed}");
                } else {
                    assert_eq!(got, shown(&ents(1, 0..=30)), "seed {seed}: the log went before the mark was durable");
                }
            }
        }
        // Whatever happened, the log takes the next entry.
        let next = st.last_log_id.map_or(0, |l| l.index + 1);
        s.blocking_append(vec![ent(3, next)]).await.unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    }
}

/// Every range of `0..=hi+2` read from `cached` (the store that appended, reading its tail
/// cache where it can) and from `fresh` (reopened: every read from disk).
async fn same_reads(cached: &mut LogStore, dir: &Path, hi: u64) {
    let mut fresh = LogStore::open(dir, SEGMENT_BYTES).unwrap();
    for start in 0..=hi + 2 {
        for end in start..=hi + 2 {
            let a = cached.try_get_log_entries(start..end).await.unwrap();
            let b = fresh.try_get_log_entries(start..end).await.unwrap();
            assert_eq!(shown(&a), shown(&b), "{start}..{end}");
        }
    }
}

#[tokio::test]
async fn reads_from_the_tail_cache_equal_reads_from_disk_after_appends_truncates_and_purges() {
    let (_tmp, dir, mut s) = store_of_41().await;
    same_reads(&mut s, &dir, 40).await;
    s.truncate(lid(1, 30)).await.unwrap();
    s.blocking_append(ents(2, 30..=35)).await.unwrap();
    same_reads(&mut s, &dir, 35).await;
    s.purge(lid(2, 32)).await.unwrap();
    same_reads(&mut s, &dir, 35).await;
    s.purge(lid(3, 50)).await.unwrap();
    s.blocking_append(ents(3, 51..=53)).await.unwrap();
    same_reads(&mut s, &dir, 53).await;
    // Bounded: far more entries than the cache keeps.
    let n = super::log_store::TAIL_CACHE_ENTRIES as u64 + 100;
    for chunk in ents(3, 54..=53 + n).chunks(500) {
        s.blocking_append(chunk.to_vec()).await.unwrap();
    }
    let all_of_it = s.try_get_log_entries(51..).await.unwrap();
    assert_eq!(all_of_it.len() as u64, n + 3);
    assert_eq!(shown(&all_of_it), shown(&LogStore::open(&dir, SEGMENT_BYTES).unwrap().try_get_log_entries(51..).await.unwrap()));
}

#[test]
fn the_raft_applied_state_is_stored_with_the_entry_it_describes_and_survives_as_it_does() {
    use crate::storage::records::LogEntry;
    use crate::storage::State;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("state");
    let empty = LogEntry { ts: 1, commands: vec![] };
    let st = State::open(&dir, 1 << 20).unwrap();
    assert_eq!(st.raft_applied().unwrap(), None);
    st.apply_recording(1, &empty, b"one".to_vec()).unwrap();
    st.apply_recording(2, &empty, b"two".to_vec()).unwrap();
    assert_eq!(st.raft_applied().unwrap().as_deref(), Some(&b"two"[..]), "read through the overlay at once");
    assert_eq!(st.materialize().unwrap(), 2);
    st.apply_recording(3, &empty, b"three".to_vec()).unwrap();
    assert!(st.apply_recording(5, &empty, b"five".to_vec()).is_err(), "out of sequence");
    assert_eq!(st.raft_applied().unwrap().as_deref(), Some(&b"three"[..]), "a refused entry stores nothing");
    // A crash loses what was not materialized: the record goes back with the state it describes.
    st.crash();
    let st = State::open(&dir, 1 << 20).unwrap();
    assert_eq!((st.applied(), st.raft_applied().unwrap().as_deref()), (2, Some(&b"two"[..])));
    // A plain apply (the single node's) leaves it alone.
    st.apply(3, &empty).unwrap();
    st.checkpoint().unwrap();
    drop(st);
    let st = State::open(&dir, 1 << 20).unwrap();
    assert_eq!((st.applied(), st.raft_applied().unwrap().as_deref()), (3, Some(&b"two"[..])));
}

const USERS: [&str; 3] = ["alice", "bob", "carol"];

fn send(from: &str, to: &str, id: String) -> Command {
    let body = format!("{id} from {from}");
    Command::Send { from: from.into(), device: "d1".into(), id, conv: Conv::dm(from, to).to_string(), body }
}

/// Raft entries `range` of term 1 of a small chat: 0 is the membership {1, 2, 3}, 1 is blank,
/// 2 registers [`USERS`], every later one is a batch of two direct messages and a receipt.
fn workload(range: std::ops::RangeInclusive<u64>) -> Vec<Entry> {
    range
        .map(|i| {
            let commands = match i {
                0 => return ent(1, 0),
                1 => return Entry { log_id: lid(1, 1), payload: EntryPayload::Blank },
                2 => USERS.iter().map(|u| Command::Register { user: (*u).into(), password_hash: "h".into() }).collect(),
                _ => {
                    let (a, b) = (USERS[i as usize % 3], USERS[(i as usize + 1) % 3]);
                    vec![send(a, b, format!("m{i}a")), send(b, a, format!("m{i}b")), Command::Received { user: b.into(), device: "d1".into(), up_to: i - 2 }]
                }
            };
            let bytes = records::encode(&LogEntry { ts: 1_000 + i, commands }).unwrap();
            Entry { log_id: lid(1, i), payload: EntryPayload::Normal(Batch::anonymous(bytes)) }
        })
        .collect()
}

/// What a client would see of `state`: every user's head and every direct conversation's history.
fn seen(state: &crate::storage::State) -> Vec<String> {
    let mut out = Vec::new();
    for a in USERS {
        out.push(format!("{a} head {}", state.head(a).unwrap()));
        for b in USERS {
            out.push(format!("{a} {b} {:?}", state.history(a, &Conv::dm(a, b), None, 100).unwrap()));
        }
    }
    out
}

/// Every (user, ev) of every user's stream 1..=head, sorted.
fn all_events(state: &crate::storage::State) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = USERS.iter().flat_map(|u| (1..=state.head(u).unwrap()).map(move |ev| (u.to_string(), ev))).collect();
    v.sort();
    v
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

#[tokio::test]
async fn apply_answers_each_command_records_the_raft_state_and_hands_the_effects_to_the_sink() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut sm, sink) = open_sm(&tmp.path().join("sm"));
    let replies = sm.apply(workload(0..=4)).await.unwrap();
    assert_eq!(replies.iter().map(|r| r.commands).collect::<Vec<_>>(), vec![0, 0, 3, 3, 3]);
    assert!(replies[..2].iter().all(|r| r.outcomes.is_empty()), "blank and membership entries have no command");
    assert_eq!(replies[2].outcomes, vec![Outcome::Done; 3]);
    assert!(matches!(&replies[3].outcomes[0], Outcome::Sent { seq: 1, ts: 1_003, duplicate: false, .. }), "{:?}", replies[3]);
    let (applied, membership) = sm.applied_state().await.unwrap();
    assert_eq!((applied, membership.log_id()), (Some(lid(1, 4)), &Some(lid(1, 0))));
    let state = sm.live().get();
    assert_eq!(state.applied(), 5, "the state's index is the Raft index + 1");
    let mut pushed = sink.0.lock().unwrap().clone();
    pushed.sort();
    assert!(!pushed.is_empty());
    assert_eq!(pushed, all_events(&state), "every event reached the sink once");
    // An entry applied already is refused, and changes nothing.
    assert!(sm.apply(workload(4..=4)).await.is_err());
    assert_eq!((state.applied(), sm.applied_state().await.unwrap().0), (5, Some(lid(1, 4))));
    // A batch that is not a parley log entry is refused too.
    let junk = Entry { log_id: lid(1, 5), payload: EntryPayload::Normal(Batch::anonymous(vec![0xff, 1, 2])) };
    assert!(sm.apply([junk]).await.is_err());
    assert_eq!(state.applied(), 5);
}

#[tokio::test]
async fn a_snapshot_built_on_one_state_machine_and_installed_on_a_fresh_one_gives_the_same_state() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut a, _) = open_sm(&tmp.path().join("a"));
    a.apply(workload(0..=6)).await.unwrap();
    let snap = a.get_snapshot_builder().await.build_snapshot().await.unwrap();
    assert_eq!((snap.meta.last_log_id, snap.meta.last_membership.log_id()), (Some(lid(1, 6)), &Some(lid(1, 0))));
    let at_snapshot = a.live().get().dump().unwrap();
    let seen_at_snapshot = seen(&a.live().get());
    // Streamed in small chunks into the file the follower hands out, as a transfer would.
    let (mut b, sink_b) = open_sm(&tmp.path().join("b"));
    let mut rx = b.begin_receiving_snapshot().await.unwrap();
    let bytes = tokio::fs::read(tmp.path().join("a/snapshots/00000000000000000007.snap")).await.unwrap();
    for chunk in bytes.chunks(97) {
        rx.write_all(chunk).await.unwrap();
    }
    b.install_snapshot(&snap.meta, rx).await.unwrap();
    assert_eq!(b.applied_state().await.unwrap(), a.applied_state().await.unwrap());
    assert_eq!(b.live().get().dump().unwrap(), at_snapshot, "every table byte for byte");
    assert_eq!(seen(&b.live().get()), seen_at_snapshot);
    assert!(sink_b.0.lock().unwrap().is_empty(), "an install pushes nothing");
    assert_eq!(b.get_current_snapshot().await.unwrap().map(|s| s.meta), Some(snap.meta.clone()));
    assert_eq!(files_in(&tmp.path().join("b/snapshots")), vec!["00000000000000000007.raft", "00000000000000000007.snap"]);
    assert_eq!(files_in(&tmp.path().join("b")), vec!["snapshots", "state-00000000000000000001"], "the replaced state is deleted");
    // Both go on the same way.
    let ra = a.apply(workload(7..=9)).await.unwrap();
    let rb = b.apply(workload(7..=9)).await.unwrap();
    assert_eq!(ra, rb);
    assert_eq!(a.live().get().dump().unwrap(), b.live().get().dump().unwrap());
    assert_eq!(seen(&a.live().get()), seen(&b.live().get()));
    // A damaged file, or one that does not hold what its metadata says, is refused and changes nothing.
    let before = b.live().get().dump().unwrap();
    let mut damaged = bytes.clone();
    let mid = damaged.len() / 2;
    damaged[mid] ^= 0x40;
    let mut rx = b.begin_receiving_snapshot().await.unwrap();
    rx.write_all(&damaged).await.unwrap();
    assert!(b.install_snapshot(&snap.meta, rx).await.is_err());
    let mut lying = snap.meta.clone();
    lying.last_log_id = Some(lid(1, 8));
    let mut rx = b.begin_receiving_snapshot().await.unwrap();
    rx.write_all(&bytes).await.unwrap();
    assert!(b.install_snapshot(&lying, rx).await.is_err());
    assert_eq!(b.live().get().dump().unwrap(), before);
    assert_eq!(b.applied_state().await.unwrap().0, Some(lid(1, 9)));
    assert_eq!(files_in(&tmp.path().join("b/snapshots")), vec!["00000000000000000007.raft", "00000000000000000007.snap"], "refused files are deleted");
    // A crash after the snapshot's files were renamed but before the state was replaced: the
    // install is finished on open.
    let c = tmp.path().join("c");
    std::fs::create_dir_all(c.join("snapshots")).unwrap();
    for f in ["00000000000000000007.raft", "00000000000000000007.snap"] {
        std::fs::copy(tmp.path().join("a/snapshots").join(f), c.join("snapshots").join(f)).unwrap();
    }
    let (mut c, _) = open_sm(&c);
    assert_eq!(c.applied_state().await.unwrap().0, Some(lid(1, 6)));
    assert_eq!(c.live().get().dump().unwrap(), at_snapshot);
}

#[tokio::test]
async fn the_applied_state_and_the_current_snapshot_survive_a_reopen() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("sm");
    let (mut sm, _) = open_sm(&dir);
    sm.apply(workload(0..=3)).await.unwrap();
    let snap = sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
    sm.apply(workload(4..=5)).await.unwrap();
    let applied = sm.applied_state().await.unwrap();
    let (dump, shown_before) = (sm.live().get().dump().unwrap(), seen(&sm.live().get()));
    drop(snap.snapshot);
    drop(sm);
    let (mut sm, _) = open_sm(&dir);
    assert_eq!(sm.applied_state().await.unwrap(), applied);
    assert_eq!(applied.0, Some(lid(1, 5)));
    let EntryPayload::Membership(m) = ent(1, 0).payload else { unreachable!() };
    assert_eq!(applied.1, StoredMembership::new(Some(lid(1, 0)), m));
    assert_eq!(sm.live().get().dump().unwrap(), dump);
    assert_eq!(seen(&sm.live().get()), shown_before);
    assert_eq!(sm.get_current_snapshot().await.unwrap().map(|s| s.meta), Some(snap.meta));
    // It goes on at the next index; an entry applied before the reopen is refused.
    assert!(sm.apply(workload(5..=5)).await.is_err());
    sm.apply(workload(6..=6)).await.unwrap();
    assert_eq!(sm.live().get().applied(), 7);
    assert_eq!(sm.applied_state().await.unwrap().0, Some(lid(1, 6)));
    assert_eq!(sm.applied_state().await.unwrap().1, applied.1);
}

/// A batch proposed twice (again to a new leader after a leader change) is in the log twice; the
/// second copy must change nothing, even after a later command undid the first one's effect (a
/// group add applied again after a remove would put the user back). And a name is forgotten
/// after `RAFT_BATCH_WINDOW` entries, by every node alike.
#[test]
fn a_batch_committed_twice_is_applied_once() {
    use crate::storage::records::{Command, LogEntry};
    use crate::storage::trees::RAFT_BATCH_WINDOW;
    use crate::storage::State;
    let tmp = tempfile::tempdir().unwrap();
    let st = State::open(&tmp.path().join("state"), 1 << 20).unwrap();
    let reg = LogEntry { ts: 1, commands: USERS.iter().map(|u| Command::Register { user: (*u).into(), password_hash: "h".into() }).collect() };
    assert!(st.apply_batch_once(1, &reg, b"r".to_vec(), 2, 11).unwrap().is_some());
    let a = LogEntry { ts: 2, commands: vec![send("alice", "bob", "m1".into())] };
    let b = LogEntry { ts: 3, commands: vec![send("alice", "bob", "m2".into())] };
    assert!(st.apply_batch_once(2, &a, b"r".to_vec(), 2, 12).unwrap().is_some(), "first copy");
    assert!(st.apply_batch_once(3, &b, b"r".to_vec(), 3, 12).unwrap().is_some(), "the same id from another node is another batch");
    assert!(st.apply_batch_once(4, &a, b"r".to_vec(), 2, 12).unwrap().is_none(), "second copy");
    assert_eq!((st.applied(), st.head("bob").unwrap()), (4, 2), "the second copy moved the index and nothing else");
    let history = st.history("bob", &Conv::dm("alice", "bob"), None, 10).unwrap().unwrap();
    assert_eq!(history.messages.len(), 2, "{history:?}");
    // Forgotten RAFT_BATCH_WINDOW entries later (the window's first entry named 2/11).
    let empty = LogEntry { ts: 4, commands: vec![] };
    for i in 5..=RAFT_BATCH_WINDOW {
        st.apply_recording(i, &empty, b"r".to_vec()).unwrap();
    }
    assert!(st.apply_batch_once(RAFT_BATCH_WINDOW + 1, &a, b"r".to_vec(), 2, 12).unwrap().is_none(), "2/12 (index 2) is still remembered");
    assert!(st.apply_batch_once(RAFT_BATCH_WINDOW + 2, &empty, b"r".to_vec(), 2, 11).unwrap().is_some(), "2/11 (index 1) was forgotten a window later");
    assert!(st.apply_batch_once(RAFT_BATCH_WINDOW + 3, &empty, b"r".to_vec(), 2, 11).unwrap().is_none(), "and is remembered again from its new copy");
    assert_eq!(st.head("bob").unwrap(), 2);
}
