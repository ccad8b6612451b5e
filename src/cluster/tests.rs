//! The cluster module's tests: openraft's storage suite on the log store, and reopen and
//! power-loss tests of what the log store promises (vote, truncate, purge, torn tail).
//!
//! `Suite::test_all` needs a state machine next to the log store. parley's own adapter over
//! `State::apply` does not exist yet, so the suite runs with [`TestSm`], a small state machine
//! kept in memory whose snapshots are files: it checks the log store, not parley's apply.

use std::io::SeekFrom;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use openraft::storage::{RaftLogStorage, RaftLogStorageExt, RaftStateMachine};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{
    AnyError, BasicNode, CommittedLeaderId, EntryPayload, Membership, RaftLogReader, RaftSnapshotBuilder, Snapshot, SnapshotMeta,
    StorageIOError, StoredMembership,
};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::log_store::LogStore;
use super::types::{Applied, Batch, Entry, LogId, StorageError, TypeConfig, Vote};
use crate::storage::disk::{Disk, SimDisk};

/// Small segments, so the tests roll, purge and truncate across segment files.
const SEGMENT_BYTES: u64 = 256;

/// What [`TestSm`] holds (and writes as its snapshot).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct SmImage {
    applied: Option<LogId>,
    membership: StoredMembership<u64, BasicNode>,
    /// Normal entries applied.
    batches: u64,
}

struct SmInner {
    /// Where the snapshot files go.
    dir: PathBuf,
    image: SmImage,
    /// The current snapshot and its file.
    current: Option<(SnapshotMeta<u64, BasicNode>, PathBuf)>,
    /// Numbers the snapshot files.
    seq: u64,
}

/// A state machine in memory, for the storage suite (see the module docs).
#[derive(Clone)]
struct TestSm {
    inner: Arc<Mutex<SmInner>>,
}

fn sm_err(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::write_state_machine(AnyError::new(&e)).into()
}

impl TestSm {
    fn new(dir: PathBuf) -> TestSm {
        std::fs::create_dir_all(&dir).expect("sm dir");
        TestSm { inner: Arc::new(Mutex::new(SmInner { dir, image: SmImage::default(), current: None, seq: 0 })) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SmInner> {
        self.inner.lock().expect("test sm lock")
    }

    /// Writes `image` as a new snapshot file and makes it current.
    fn store_snapshot(&self, image: &SmImage, meta: SnapshotMeta<u64, BasicNode>) -> Result<PathBuf, StorageError> {
        let mut g = self.lock();
        g.seq += 1;
        let path = g.dir.join(format!("snapshot-{}", g.seq));
        let bytes = postcard::to_allocvec(image).map_err(sm_err)?;
        std::fs::write(&path, bytes).map_err(sm_err)?;
        g.current = Some((meta, path.clone()));
        Ok(path)
    }
}

impl RaftSnapshotBuilder<TypeConfig> for TestSm {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let (image, id) = {
            let g = self.lock();
            (g.image.clone(), g.seq + 1)
        };
        let meta = SnapshotMeta { last_log_id: image.applied, last_membership: image.membership.clone(), snapshot_id: id.to_string() };
        let path = self.store_snapshot(&image, meta.clone())?;
        let f = tokio::fs::File::open(&path).await.map_err(sm_err)?;
        Ok(Snapshot { meta, snapshot: Box::new(f) })
    }
}

impl RaftStateMachine<TypeConfig> for TestSm {
    type SnapshotBuilder = TestSm;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership<u64, BasicNode>), StorageError> {
        let g = self.lock();
        Ok((g.image.applied, g.image.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Applied>, StorageError>
    where
        I: IntoIterator<Item = Entry> + openraft::OptionalSend,
        I::IntoIter: openraft::OptionalSend,
    {
        let mut g = self.lock();
        let mut out = Vec::new();
        for e in entries {
            g.image.applied = Some(e.log_id);
            match e.payload {
                EntryPayload::Blank => out.push(Applied::default()),
                EntryPayload::Normal(_) => {
                    g.image.batches += 1;
                    out.push(Applied { commands: 1 });
                }
                EntryPayload::Membership(m) => {
                    g.image.membership = StoredMembership::new(Some(e.log_id), m);
                    out.push(Applied::default());
                }
            }
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<tokio::fs::File>, StorageError> {
        let path = {
            let mut g = self.lock();
            g.seq += 1;
            g.dir.join(format!("receiving-{}", g.seq))
        };
        Ok(Box::new(tokio::fs::File::create(&path).await.map_err(sm_err)?))
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta<u64, BasicNode>, mut snapshot: Box<tokio::fs::File>) -> Result<(), StorageError> {
        let mut bytes = Vec::new();
        snapshot.seek(SeekFrom::Start(0)).await.map_err(sm_err)?;
        snapshot.read_to_end(&mut bytes).await.map_err(sm_err)?;
        let image: SmImage = postcard::from_bytes(&bytes).map_err(sm_err)?;
        self.store_snapshot(&image, meta.clone())?;
        self.lock().image = image;
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let current = self.lock().current.clone();
        let Some((meta, path)) = current else { return Ok(None) };
        let f = tokio::fs::File::open(&path).await.map_err(sm_err)?;
        Ok(Some(Snapshot { meta, snapshot: Box::new(f) }))
    }
}

/// Builds a fresh log store (on the real file system, in a temp dir) and a [`TestSm`].
struct Builder;

impl StoreBuilder<TypeConfig, LogStore, TestSm, tempfile::TempDir> for Builder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, TestSm), StorageError> {
        let tmp = tempfile::tempdir().map_err(sm_err)?;
        let log = LogStore::open(&tmp.path().join("raft"), SEGMENT_BYTES)?;
        let sm = TestSm::new(tmp.path().join("sm"));
        Ok((tmp, log, sm))
    }
}

#[test]
fn openraft_storage_suite_passes_on_the_wal_log_store() {
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
        EntryPayload::Normal(Batch(format!("batch {index} of term {term}").into_bytes().repeat((index % 5) as usize + 1)))
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
