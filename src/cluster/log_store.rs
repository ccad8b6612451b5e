//! The Raft log store: openraft's `RaftLogStorage` + `RaftLogReader` (storage v2) on parley's
//! own write-ahead log ([`crate::storage::wal`]), the same segment files, record format, torn
//! tail cut and corruption checks as the single-node log.
//!
//! # Layout (a directory, e.g. `DATA/raft/`)
//!
//! - `log/`: WAL segments. A Raft entry is one WAL record: the record's `term` is the entry's
//!   term, its `index` is the Raft index **plus one** (openraft's first entry, the initial
//!   membership, has index 0; the WAL numbers from 1), and its payload is
//!   `FORMAT_VERSION` (1 byte) + postcard of (leader node id, `EntryPayload`): the log id is
//!   (term, leader node id, index) since openraft's default leader ids carry the node id.
//! - `meta`: the vote and the last purged log id, one small file: a version byte, postcard,
//!   then CRC-32 (IEEE, little-endian) over the bytes before it. Written whole to `meta.tmp`,
//!   fdatasync'd, renamed over `meta`, then the directory fsync'd, so a power loss leaves the
//!   old or the new file, never a mix.
//!
//! # Durability (openraft's `RaftLogStorage` contract, docs of openraft 0.9 `storage::v2`)
//!
//! - `append` writes the entries and fsyncs ([`Wal::sync`]) before it calls `LogFlushed`, and
//!   before it returns; so the entries are readable on return and durable when the callback
//!   says so. One `append` is one write and one fdatasync, however many entries.
//! - `save_vote` returns only after the new `meta` is fsync'd and its rename is durable
//!   (directory fsync): a node never votes twice in a term across a crash (Raft §5.2, §5.4).
//! - `truncate` ([`Wal::truncate_from`]) and `purge` are durable when they return. A purge
//!   records the purged log id in `meta` first, then deletes whole segments at or below it
//!   ([`Wal::purge_upto`], which keeps the active one); entries at or below the mark still on
//!   disk are never read. A purge past the end of the log (a follower that installed a
//!   snapshot beyond its log, Raft §7) empties the log and restarts it after the mark
//!   ([`Wal::restart_at`]); a crash in between is finished on open.
//! - The committed log id (`save_committed`) is kept in memory only: the state machine's own
//!   applied index is durable with its state, which openraft documents as enough
//!   (`docs::data::log_pointers`, "optionally persisted committed"); after a restart
//!   `read_committed` is `None` and openraft starts from the applied index.
//!
//! # Holes
//!
//! openraft never appends with a hole, but its storage suite does (`Suite::test_all` appends
//! to an empty log at a later index, and appends entries a purge already covers). Entries at
//! or below the purge mark are skipped (they are covered by the snapshot the purge was for);
//! an append at another index into a log with no entry after the mark restarts the log there;
//! any other hole, or an append over an entry without a `truncate` first, is refused.
//!
//! All I/O is blocking and runs on tokio's blocking pool, one operation at a time (a mutex);
//! the reader that openraft's replication uses ([`RaftLogStorage::get_log_reader`]) shares it.
//! Replication reads the newest entries right after they are appended, and a WAL read scans a
//! segment from its start, so the newest entries are also kept decoded in memory (at most
//! [`TAIL_CACHE_ENTRIES`] entries and [`TAIL_CACHE_BYTES`] bytes of payload): a read that
//! starts inside that tail never touches the disk.

use std::collections::VecDeque;
use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{AnyError, CommittedLeaderId, EntryPayload, ErrorSubject, ErrorVerb, LogState, OptionalSend, RaftLogReader, StorageIOError};
use serde::{Deserialize, Serialize};

use super::types::{Entry, LogId, StorageError, TypeConfig, Vote};
use crate::storage::disk::{self, Disk, OpenMode};
use crate::storage::wal::{self, Wal, WalError};

/// The WAL's directory inside the store's directory.
const LOG_DIR: &str = "log";
/// The vote and purge mark.
const META: &str = "meta";
/// Where a new `meta` is written before its rename.
const META_TMP: &str = "meta.tmp";
/// Version byte in front of every entry payload and of `meta`.
pub const FORMAT_VERSION: u8 = 1;
/// Bytes of `meta`'s CRC-32 trailer.
const CRC_LEN: usize = 4;
/// Most entries the tail cache keeps.
pub const TAIL_CACHE_ENTRIES: usize = 4096;
/// Most payload bytes (as stored) the tail cache keeps.
pub const TAIL_CACHE_BYTES: usize = 16 << 20;

/// The Raft log store. Cheap to clone: clones share one log (openraft's log reader is a clone).
#[derive(Clone)]
pub struct LogStore {
    /// The log and its metadata. Locked by one blocking operation at a time (on tokio's blocking
    /// pool); a panic inside poisons it, and every later call returns a storage error.
    inner: Arc<Mutex<Inner>>,
}

impl Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStore").finish_non_exhaustive()
    }
}

/// What the log store knows, under its lock.
struct Inner {
    disk: Arc<dyn Disk>,
    /// The store's directory (holds `log/` and `meta`).
    dir: PathBuf,
    wal: Wal,
    /// The durable `meta` as last written (or read on open).
    meta: Meta,
    /// Log id of the newest entry after the purge mark; `None` when there is none.
    last: Option<LogId>,
    /// The committed log id openraft saved in this process (not durable; see the module docs).
    committed: Option<LogId>,
    /// The newest entries after the purge mark, oldest first, each with its stored payload size:
    /// consecutive indexes ending at `last` (or empty). Filled by appends, cut by truncate and
    /// purge, emptied when the log restarts.
    tail: VecDeque<(Entry, usize)>,
    /// Sum of the sizes in `tail`, bytes.
    tail_bytes: usize,
}

/// The content of `meta`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Meta {
    /// The last vote saved (`save_vote`).
    vote: Option<Vote>,
    /// The last purged log id: entries up to it are gone (or ignored).
    purged: Option<LogId>,
}

/// A Raft entry's stored payload, for encoding (borrowed).
#[derive(Serialize)]
struct StoredEntryRef<'a> {
    /// The node id of the leader that created the entry (the log id's `leader_id.node_id`).
    leader: u64,
    payload: &'a EntryPayload<TypeConfig>,
}

/// A Raft entry's stored payload, decoded.
#[derive(Deserialize)]
struct StoredEntry {
    leader: u64,
    payload: EntryPayload<TypeConfig>,
}

fn io_error(subject: ErrorSubject<u64>, verb: ErrorVerb, e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::new(subject, verb, AnyError::new(&e)).into()
}

fn log_error(verb: ErrorVerb) -> impl Fn(WalError) -> StorageError {
    move |e| io_error(ErrorSubject::Logs, verb, e)
}

fn invalid(subject: ErrorSubject<u64>, verb: ErrorVerb, msg: String) -> StorageError {
    io_error(subject, verb, io::Error::new(io::ErrorKind::InvalidData, msg))
}

/// The WAL index of Raft index `index` (one more: see the module docs).
fn to_wal(index: u64) -> Result<u64, StorageError> {
    index
        .checked_add(1)
        .ok_or_else(|| invalid(ErrorSubject::Logs, ErrorVerb::Write, "Raft log index u64::MAX cannot be stored".into()))
}

/// Encodes `e` as a WAL record.
fn encode(e: &Entry) -> Result<wal::Entry, StorageError> {
    let mut payload = vec![FORMAT_VERSION];
    let stored = StoredEntryRef { leader: e.log_id.leader_id.node_id, payload: &e.payload };
    payload = postcard::to_extend(&stored, payload).map_err(|err| io_error(ErrorSubject::Log(e.log_id), ErrorVerb::Write, err))?;
    Ok(wal::Entry { index: to_wal(e.log_id.index)?, term: e.log_id.leader_id.term, payload })
}

/// Decodes a WAL record written by [`encode`].
fn decode(r: wal::Entry) -> Result<Entry, StorageError> {
    let index = r.index - 1;
    let bad = |why: String| invalid(ErrorSubject::LogIndex(index), ErrorVerb::Read, why);
    let Some((&version, body)) = r.payload.split_first() else {
        return Err(bad(format!("Raft log entry {index} has an empty payload")));
    };
    if version != FORMAT_VERSION {
        return Err(bad(format!("Raft log entry {index} has format version {version}; this build reads {FORMAT_VERSION}")));
    }
    let s: StoredEntry = postcard::from_bytes(body).map_err(|e| bad(format!("Raft log entry {index} cannot be decoded: {e}")))?;
    Ok(Entry { log_id: LogId::new(CommittedLeaderId::new(r.term, s.leader), index), payload: s.payload })
}

/// Encodes `meta` with its version byte and CRC trailer.
fn encode_meta(m: &Meta) -> Result<Vec<u8>, StorageError> {
    let mut b = postcard::to_extend(m, vec![FORMAT_VERSION]).map_err(|e| io_error(ErrorSubject::Vote, ErrorVerb::Write, e))?;
    let crc = crc32fast::hash(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    Ok(b)
}

/// Decodes `meta` (`path` for the messages).
fn decode_meta(b: &[u8], path: &Path) -> Result<Meta, StorageError> {
    let bad = |why: &str| invalid(ErrorSubject::Vote, ErrorVerb::Read, format!("{}: {why}; refusing to start (the vote would be lost)", path.display()));
    if b.len() < 1 + CRC_LEN {
        return Err(bad("too short"));
    }
    let (body, crc) = b.split_at(b.len() - CRC_LEN);
    let mut c = [0u8; CRC_LEN];
    c.copy_from_slice(crc);
    if crc32fast::hash(body) != u32::from_le_bytes(c) {
        return Err(bad("CRC mismatch"));
    }
    if body[0] != FORMAT_VERSION {
        return Err(bad("unknown format version"));
    }
    postcard::from_bytes(&body[1..]).map_err(|_| bad("cannot be decoded"))
}

/// Reads the whole file at `path`; `None` when it does not exist.
fn read_file(disk: &dyn Disk, path: &Path) -> io::Result<Option<Vec<u8>>> {
    let f = match disk.open(path, OpenMode::Read) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let len = f.len()? as usize;
    let mut b = vec![0u8; len];
    let mut at = 0;
    while at < len {
        match f.read_at(&mut b[at..], at as u64)? {
            0 => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("{} shrank while read", path.display()))),
            n => at += n,
        }
    }
    Ok(Some(b))
}

impl LogStore {
    /// Opens (or creates) the log store in `dir` on the real file system. Blocking: call it
    /// before the Raft node starts or from a blocking thread.
    ///
    /// `segment_bytes` is the WAL's segment size (`storage.segment_bytes`).
    ///
    /// # Errors
    /// A [`StorageError`] naming the log or the vote: a corrupt log record (not a torn tail,
    /// which is cut as [`Wal::open`] does), a damaged `meta`, an I/O failure.
    pub fn open(dir: &Path, segment_bytes: u64) -> Result<LogStore, StorageError> {
        LogStore::open_on(disk::real(), dir, segment_bytes)
    }

    /// [`LogStore::open`] on any [`Disk`] (a [`disk::SimDisk`] in tests). Finishes a purge
    /// past the end of the log that a crash interrupted.
    pub fn open_on(disk: Arc<dyn Disk>, dir: &Path, segment_bytes: u64) -> Result<LogStore, StorageError> {
        let store_io = |e: io::Error| io_error(ErrorSubject::Store, ErrorVerb::Write, e);
        if !disk.is_dir(dir).unwrap_or(false) {
            disk.create_dir_all(dir).map_err(store_io)?;
            let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
            disk.sync_dir(parent).map_err(store_io)?;
        }
        let meta_path = dir.join(META);
        let meta = match read_file(&*disk, &meta_path).map_err(|e| io_error(ErrorSubject::Vote, ErrorVerb::Read, e))? {
            Some(b) => decode_meta(&b, &meta_path)?,
            None => Meta::default(),
        };
        let (wal, _report) = Wal::open_on(disk.clone(), &dir.join(LOG_DIR), segment_bytes).map_err(log_error(ErrorVerb::Read))?;
        let mut inner = Inner { disk, dir: dir.to_path_buf(), wal, meta, last: None, committed: None, tail: VecDeque::new(), tail_bytes: 0 };
        if let Some(p) = inner.meta.purged {
            let mark = to_wal(p.index)?;
            if inner.wal.last_index() < mark {
                inner.wal.restart_at(mark + 1).map_err(log_error(ErrorVerb::Write))?;
            }
        }
        inner.last = inner.read_last_live()?;
        Ok(LogStore { inner: Arc::new(Mutex::new(inner)) })
    }

    /// Runs `f` on the store under its lock, on tokio's blocking pool.
    async fn blocking<T, F>(&self, f: F) -> Result<T, StorageError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Inner) -> Result<T, StorageError> + Send + 'static,
    {
        let inner = self.inner.clone();
        let task = tokio::task::spawn_blocking(move || {
            let mut g = inner.lock().map_err(|_| {
                invalid(ErrorSubject::Store, ErrorVerb::Write, "the Raft log store failed earlier (a panic); restart the node".into())
            })?;
            f(&mut g)
        });
        match task.await {
            Ok(r) => r,
            Err(e) => Err(io_error(ErrorSubject::Store, ErrorVerb::Write, io::Error::other(format!("the Raft log store's blocking task failed: {e}")))),
        }
    }
}

impl Inner {
    /// The first Raft index after the purge mark (0 when nothing was purged).
    fn purged_next(&self) -> u64 {
        self.meta.purged.map_or(0, |p| p.index + 1)
    }

    /// The Raft index the next appended entry must have: the WAL's next index minus one.
    fn next_index(&self) -> u64 {
        self.wal.last_index()
    }

    /// The newest entry's log id when it lies after the purge mark.
    fn read_last_live(&self) -> Result<Option<LogId>, StorageError> {
        let next = self.next_index();
        if next == 0 || next <= self.purged_next() || self.wal.first_index().is_none() {
            return Ok(None);
        }
        Ok(self.read_entry(next - 1)?.map(|e| e.log_id))
    }

    /// The entry at Raft index `index`, if the WAL holds it.
    fn read_entry(&self, index: u64) -> Result<Option<Entry>, StorageError> {
        let w = to_wal(index)?;
        match self.wal.read_from(w).map_err(log_error(ErrorVerb::Read))?.next() {
            Some(Ok(r)) if r.index == w => Ok(Some(decode(r)?)),
            Some(Ok(_)) | None => Ok(None),
            Some(Err(e)) => Err(log_error(ErrorVerb::Read)(e)),
        }
    }

    /// Writes `m` as the new `meta`, durably (see the module docs), then keeps it.
    fn save_meta(&mut self, m: Meta) -> Result<(), StorageError> {
        let bytes = encode_meta(&m)?;
        let err = |e: io::Error| io_error(ErrorSubject::Vote, ErrorVerb::Write, e);
        let tmp = self.dir.join(META_TMP);
        let mut f = self.disk.open(&tmp, OpenMode::CreateTruncate).map_err(err)?;
        f.write_all_at(&bytes, 0).map_err(err)?;
        f.sync_data().map_err(err)?;
        drop(f);
        self.disk.rename(&tmp, &self.dir.join(META)).map_err(err)?;
        self.disk.sync_dir(&self.dir).map_err(err)?;
        self.meta = m;
        Ok(())
    }

    fn log_state(&self) -> LogState<TypeConfig> {
        LogState { last_purged_log_id: self.meta.purged, last_log_id: self.last.or(self.meta.purged) }
    }

    /// The entries with Raft index in `[start, end)` that are after the purge mark.
    fn entries(&self, start: u64, end: u64) -> Result<Vec<Entry>, StorageError> {
        let start = start.max(self.purged_next());
        let end = end.min(self.next_index());
        let mut out = Vec::new();
        if start >= end {
            return Ok(out);
        }
        if let Some(front) = self.tail.front().map(|(e, _)| e.log_id.index) {
            if start >= front {
                let skip = (start - front) as usize;
                out.extend(self.tail.iter().skip(skip).take((end - start) as usize).map(|(e, _)| e.clone()));
                return Ok(out);
            }
        }
        for r in self.wal.read_from(to_wal(start)?).map_err(log_error(ErrorVerb::Read))? {
            let r = r.map_err(log_error(ErrorVerb::Read))?;
            if r.index > end {
                break;
            }
            out.push(decode(r)?);
        }
        Ok(out)
    }

    /// Appends `entries` (see "Holes" in the module docs) and fsyncs.
    fn append(&mut self, entries: Vec<Entry>) -> Result<(), StorageError> {
        let purged_next = self.purged_next();
        let entries: Vec<Entry> = entries.into_iter().skip_while(|e| e.log_id.index < purged_next).collect();
        let Some(first) = entries.first().map(|e| e.log_id) else {
            return Ok(());
        };
        let next = self.next_index();
        if first.index != next {
            if self.last.is_none() {
                self.clear_tail();
                self.wal.restart_at(to_wal(first.index)?).map_err(log_error(ErrorVerb::Write))?;
            } else {
                let why = if first.index > next { "would leave a hole after" } else { "would overwrite (no truncate first) up to" };
                return Err(invalid(ErrorSubject::Log(first), ErrorVerb::Write, format!("appending Raft entry {} {why} entry {}", first.index, next.saturating_sub(1))));
            }
        }
        let mut records = Vec::with_capacity(entries.len());
        for e in &entries {
            records.push(encode(e)?);
        }
        if let Err(e) = self.wal.append(&records).and_then(|()| self.wal.sync()) {
            // What reached the log is unknown now (the WAL refuses work until reopened).
            self.clear_tail();
            return Err(log_error(ErrorVerb::Write)(e));
        }
        self.last = entries.last().map(|e| e.log_id);
        for (e, r) in entries.into_iter().zip(&records) {
            self.tail_bytes += r.payload.len();
            self.tail.push_back((e, r.payload.len()));
        }
        while self.tail.len() > TAIL_CACHE_ENTRIES || self.tail_bytes > TAIL_CACHE_BYTES {
            self.pop_tail_front();
        }
        Ok(())
    }

    fn pop_tail_front(&mut self) {
        if let Some((_, n)) = self.tail.pop_front() {
            self.tail_bytes -= n;
        }
    }

    fn clear_tail(&mut self) {
        self.tail.clear();
        self.tail_bytes = 0;
    }

    /// Removes the entries from `log_id.index` on, durably.
    fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // Not below the first entry the WAL holds (an append into an empty log may have
        // restarted it at a later index): entries that are not there are removed already.
        let first_held = self.wal.first_index().map_or(self.next_index(), |w| w - 1);
        let from = log_id.index.max(self.purged_next()).max(first_held);
        if from >= self.next_index() {
            return Ok(());
        }
        while self.tail.back().is_some_and(|(e, _)| e.log_id.index >= from) {
            if let Some((_, n)) = self.tail.pop_back() {
                self.tail_bytes -= n;
            }
        }
        if let Err(e) = self.wal.truncate_from(to_wal(from)?) {
            self.clear_tail();
            return Err(log_error(ErrorVerb::Delete)(e));
        }
        self.last = if from > self.purged_next() { self.read_entry(from - 1)?.map(|e| e.log_id) } else { None };
        Ok(())
    }

    /// Purges the entries up to `log_id` (inclusive), durably.
    fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        if self.meta.purged.is_some_and(|p| p >= log_id) {
            return Ok(());
        }
        self.save_meta(Meta { purged: Some(log_id), ..self.meta.clone() })?;
        while self.tail.front().is_some_and(|(e, _)| e.log_id.index <= log_id.index) {
            self.pop_tail_front();
        }
        let mark = to_wal(log_id.index)?;
        if self.wal.last_index() < mark {
            self.clear_tail();
            self.wal.restart_at(mark + 1).map_err(log_error(ErrorVerb::Delete))?;
        } else {
            self.wal.purge_upto(mark).map_err(log_error(ErrorVerb::Delete))?;
        }
        if self.last.is_some_and(|l| l.index <= log_id.index) {
            self.last = None;
        }
        Ok(())
    }
}

/// `[start, end)` of a range of Raft indexes.
fn bounds(range: &impl RangeBounds<u64>) -> (u64, u64) {
    let start = match range.start_bound() {
        Bound::Included(&s) => s,
        Bound::Excluded(&s) => s.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(&e) => e.saturating_add(1),
        Bound::Excluded(&e) => e,
        Bound::Unbounded => u64::MAX,
    };
    (start, end)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(&mut self, range: RB) -> Result<Vec<Entry>, StorageError> {
        let (start, end) = bounds(&range);
        self.blocking(move |s| s.entries(start, end)).await
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        self.blocking(|s| Ok(s.log_state())).await
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        let vote = *vote;
        self.blocking(move |s| s.save_meta(Meta { vote: Some(vote), ..s.meta.clone() })).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.blocking(|s| Ok(s.meta.vote)).await
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        self.blocking(move |s| {
            s.committed = committed;
            Ok(())
        })
        .await
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        self.blocking(|s| Ok(s.committed)).await
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        self.blocking(move |s| s.append(entries)).await?;
        // Written and fdatasync'd: only now is openraft told the entries are durable.
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.blocking(move |s| s.truncate(log_id)).await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.blocking(move |s| s.purge(log_id)).await
    }
}
