//! Storage: the write-ahead log, the commit pipeline (group commit) and the sled state machine.
//!
//! The write path reads top to bottom (STYLE habit 11): append batch → fsync → apply → answer.
//! Nothing else acknowledges.

pub mod hot;
pub mod idfilter;
pub mod disk;
pub mod keys;
pub mod pipeline;
pub mod records;
pub mod snapshot;
pub mod state;
pub mod store;
pub mod trees;
pub mod wal;

#[cfg(test)]
mod model_tests;
#[cfg(test)]
mod sim_tests;

use std::path::{Path, PathBuf};
use std::time::Instant;

pub use pipeline::{Pipeline, PipelineError, Sink};
pub use state::{Effects, Outcome, Pushed, Refusal, State};

/// The live [`State`], shared with its readers. Cheap to clone.
///
/// A single node never replaces its state. A cluster node's state machine
/// (`cluster::state_machine`) replaces it when it installs a snapshot from the leader: take
/// [`get`](Self::get) for each read rather than keeping the `Arc`; an `Arc<State>` kept longer
/// keeps reading the replaced state (consistent, but stale).
#[derive(Clone)]
pub struct LiveState {
    cell: std::sync::Arc<parking_lot::RwLock<std::sync::Arc<State>>>,
}

impl LiveState {
    /// A cell holding `state`.
    pub fn new(state: std::sync::Arc<State>) -> LiveState {
        LiveState { cell: std::sync::Arc::new(parking_lot::RwLock::new(state)) }
    }

    /// The state as of now.
    pub fn get(&self) -> std::sync::Arc<State> {
        self.cell.read().clone()
    }

    /// Puts `state` in the cell; returns the one it replaces.
    pub(crate) fn replace(&self, state: std::sync::Arc<State>) -> std::sync::Arc<State> {
        std::mem::replace(&mut *self.cell.write(), state)
    }
}

/// Term of every entry until replication exists (Raft terms start at 1).
pub const TERM: u64 = 1;

/// A storage failure: the server is broken, not the request.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// sled failed.
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    /// The write-ahead log failed or is corrupt.
    #[error(transparent)]
    Wal(#[from] wal::WalError),
    /// File I/O outside the log.
    #[error("I/O error on {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// A value could not be encoded.
    #[error("cannot encode a stored value: {0}")]
    Encode(String),
    /// A stored value could not be decoded.
    #[error("cannot decode a stored value: {0}")]
    Decode(String),
    /// A record that must exist does not.
    #[error("missing stored record: {0}")]
    Missing(String),
    /// Entries must be applied in index order.
    #[error("log entry {got} offered for apply, but {applied} is the last applied")]
    Sequence { applied: u64, got: u64 },
    /// Another process holds the data directory.
    #[error("{path} is in use by another parley process ({holder}); stop it first")]
    Locked { path: PathBuf, holder: String },
    /// The log does not reach back to the state's applied index.
    #[error("the write-ahead log starts at entry {first}, but the state has only applied up to {applied}: entries are missing")]
    LogGap { applied: u64, first: u64 },
    /// The state (sled) cannot be opened and the log no longer holds every entry from 1, so
    /// the state cannot be rebuilt from it. Nothing was moved or deleted.
    #[error(transparent)]
    StateUnrecoverable(Box<Unrecoverable>),
    /// The state has applied entries the log does not hold: the log lost acknowledged entries.
    #[error("the state in {state} has applied up to entry {applied}, but the write-ahead log ends at entry {last}: the log lost entries (was the disk's write cache lying about fsync?); refusing to start")]
    LogBehind { state: PathBuf, applied: u64, last: u64 },
}

/// Why a damaged state cannot be rebuilt (see [`StorageError::StateUnrecoverable`]).
#[derive(Debug, thiserror::Error)]
#[error(
    "the state in {state} cannot be opened ({reason}), and it cannot be rebuilt: the write-ahead log in {wal} {log}, \
     and entries 1 to {missing_upto} were deleted by checkpoints, with no snapshot in {data}/snapshots to start from. Nothing was changed. Restore the data directory {data} \
     from a backup (parley admin restore), or move {state} aside to start with an empty state",
    state = .state.display(),
    wal = .wal.display(),
    data = .data.display()
)]
pub struct Unrecoverable {
    /// The data directory.
    pub data: PathBuf,
    /// Its `state/` directory (sled).
    pub state: PathBuf,
    /// Its `wal/` directory.
    pub wal: PathBuf,
    /// Why sled did not open.
    pub reason: String,
    /// Where the log starts, in words.
    pub log: String,
    /// The last entry the log lacks.
    pub missing_upto: u64,
}

impl StorageError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        StorageError::Io { path: path.to_owned(), source }
    }
}

/// What start-up recovery did.
#[derive(Debug, Clone, Copy, Default)]
pub struct RecoveryStats {
    /// The state's applied index when opened.
    pub applied_before: u64,
    /// Entries replayed from the log.
    pub replayed: u64,
    /// Bytes cut off a torn tail.
    pub torn_tail_bytes: u64,
    /// Wall time of recovery, ms.
    pub millis: u64,
    /// The state could not be opened and was rebuilt from the whole log (the damaged one was
    /// moved aside to `state.damaged-<ms>`).
    pub rebuilt: bool,
}

/// An exclusive lock on a data directory (`DATA/LOCK`, `flock`), held by the server or an admin
/// command for its lifetime; released when dropped or when the process dies.
pub struct DataLock {
    _file: std::fs::File,
}

impl DataLock {
    /// Takes the lock or fails at once with [`StorageError::Locked`].
    pub fn acquire(data: &Path) -> Result<DataLock, StorageError> {
        use std::io::{Read, Seek, Write};
        use std::os::fd::AsRawFd;
        std::fs::create_dir_all(data).map_err(|e| StorageError::io(data, e))?;
        let path = data.join("LOCK");
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| StorageError::io(&path, e))?;
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if r != 0 {
            let mut holder = String::new();
            let _ = f.read_to_string(&mut holder);
            let holder = match holder.trim() {
                "" => "unknown pid".to_owned(),
                pid => format!("pid {pid}"),
            };
            return Err(StorageError::Locked { path: data.to_owned(), holder });
        }
        let _ = f.set_len(0).and_then(|_| f.rewind()).and_then(|_| write!(f, "{}", std::process::id()));
        Ok(DataLock { _file: f })
    }
}

/// An opened data directory.
pub struct Opened {
    pub state: State,
    pub wal: wal::Wal,
    pub stats: RecoveryStats,
    pub lock: DataLock,
}

/// Locks the data directory, opens the state (`DATA/state`) and the log (`DATA/wal`), then
/// replays every log entry past the state's applied index. A corrupt record in the middle of the
/// log is an error (start-up stops); a torn tail is cut.
///
/// **Rebuild.** When sled fails to open, panics while opening (caught), or fails while the log
/// is replayed into it, the state is derived data: if the log still starts at entry 1, the
/// damaged directory is moved aside to `DATA/state.damaged-<ms>` (never deleted), a fresh state
/// is rebuilt by replaying the whole log, an error-level line says so, and the counter
/// `parley_state_rebuilds_total` goes up. If the log no longer starts at entry 1 (checkpoints
/// deleted its beginning), start-up stops with [`StorageError::StateUnrecoverable`], naming the
/// data directory and what is missing, and changes nothing.
pub fn open(data: &Path, segment_bytes: u64, cache_bytes: u64) -> Result<Opened, StorageError> {
    let t0 = Instant::now();
    metrics::counter!("parley_state_rebuilds_total").increment(0);
    let lock = DataLock::acquire(data)?;
    // The data directory's own name must be durable before anything in it is acked.
    sync_dir(parent_of(data))?;
    let state_dir = data.join("state");
    let wal_dir = data.join("wal");
    let opened = open_state(&state_dir, cache_bytes).and_then(|state| {
        if state.applied() > 0 && !has_segments(&wal_dir) {
            // A state restored from a backup: the log continues after its applied index.
            wal::create_empty_at(&wal_dir, state.applied() + 1).map_err(|e| Damage::Other(e.into()))?;
        }
        let (wal, report) = wal::Wal::open(&wal_dir, segment_bytes).map_err(|e| Damage::Other(e.into()))?;
        if state.applied() > wal.last_index() {
            return Err(Damage::Other(StorageError::LogBehind { state: state_dir.clone(), applied: state.applied(), last: wal.last_index() }));
        }
        let mut stats = RecoveryStats { applied_before: state.applied(), torn_tail_bytes: report.torn_tail_bytes, ..Default::default() };
        match catch(|| replay(&state, &wal)) {
            Ok(n) => stats.replayed = n,
            Err(Damage::Other(e)) if matches!(e, StorageError::Wal(_)) => return Err(Damage::Other(e)),
            // The state is behind the log's first entry: it was deleted or lost (sled reopened
            // empty) after checkpoints purged the log's beginning. Rebuild it from a snapshot.
            Err(Damage::Other(StorageError::LogGap { applied, first })) => {
                return Err(Damage::State(format!("the state has applied up to entry {applied} but the log starts at entry {first} (was the state deleted?)")))
            }
            Err(Damage::Other(e)) => return Err(Damage::State(format!("replaying the log into it failed: {e}"))),
            Err(d) => return Err(d),
        }
        Ok((state, wal, stats))
    });
    let (state, wal, mut stats) = match opened {
        Ok(x) => x,
        Err(Damage::Other(e)) => return Err(e),
        Err(Damage::State(reason)) => rebuild(data, &state_dir, &wal_dir, segment_bytes, cache_bytes, reason)?,
    };
    // A log that no longer starts at entry 1 with no snapshot beside it (a restored backup, or
    // a data directory from before snapshots existed) could not rebuild a damaged state: take
    // one now rather than at the first checkpoint.
    let snaps = snapshot::dir_of(data);
    if snapshot::list(&snaps)?.is_empty() && wal.first_index().map_or(state.applied() > 0, |f| f > 1) {
        let (file, records) = state.snapshot(&snaps)?;
        tracing::info!(index = file.index, records, "no snapshot and the log does not start at entry 1: took a snapshot at start-up");
    }
    // Every name the data directory holds (`state`, `wal`, `snapshots`, `LOCK`; a restore copies
    // the first two in) is durable before anything is acked into them.
    sync_dir(data)?;
    stats.millis = t0.elapsed().as_millis() as u64;
    Ok(Opened { state, wal, stats, lock })
}

/// Why opening failed: the state is damaged (rebuild it), or something else (stop).
enum Damage {
    State(String),
    Other(StorageError),
}

/// Runs `f`, turning a panic into [`Damage::State`] and errors into [`Damage::Other`].
fn catch<T>(f: impl FnOnce() -> Result<T, StorageError>) -> Result<T, Damage> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Damage::Other(e)),
        Err(p) => {
            let msg = p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned()).unwrap_or_else(|| "a panic".into());
            Err(Damage::State(format!("sled panicked: {msg}")))
        }
    }
}

/// Opens sled's state; any failure or panic of sled itself is [`Damage::State`].
fn open_state(dir: &Path, cache_bytes: u64) -> Result<State, Damage> {
    match catch(|| State::open(dir, cache_bytes)) {
        Ok(s) => Ok(s),
        Err(Damage::Other(StorageError::Io { path, source })) if path == dir => Err(Damage::Other(StorageError::Io { path, source })),
        Err(Damage::Other(e)) => Err(Damage::State(e.to_string())),
        Err(d) => Err(d),
    }
}

/// The state is damaged: rebuild it from the newest snapshot the log continues from, or from
/// the whole log, or refuse (see [`open`]).
fn rebuild(data: &Path, state_dir: &Path, wal_dir: &Path, segment_bytes: u64, cache_bytes: u64, reason: String) -> Result<(State, wal::Wal, RecoveryStats), StorageError> {
    let (wal, report) = wal::Wal::open(wal_dir, segment_bytes)?;
    // The first index the log holds (last + 1 when it holds none).
    let log_from = wal.first_index().unwrap_or(wal.last_index() + 1);
    let from_one = log_from == 1;
    // A snapshot the log continues from, each checked whole (every checksum) before use.
    let mut base = None;
    for s in snapshot::list(&snapshot::dir_of(data))? {
        if s.index + 1 < log_from || s.index > wal.last_index() {
            continue;
        }
        match snapshot::read(&s.path, |_, _| Ok(())) {
            Ok(_) => {
                base = Some(s);
                break;
            }
            Err(e) => tracing::error!(error = %e, "a snapshot is damaged; trying an older one"),
        }
    }
    if !from_one && base.is_none() {
        let (log, missing_upto) = match wal.first_index() {
            Some(first) => (format!("starts at entry {first}"), first - 1),
            None => (format!("holds no entry and continues after entry {}", wal.last_index()), wal.last_index()),
        };
        tracing::error!(data = %data.display(), reason = %reason, "the state cannot be opened and the log does not reach back to entry 1; refusing to start");
        let u = Unrecoverable { data: data.to_owned(), state: state_dir.to_owned(), wal: wal_dir.to_owned(), reason, log, missing_upto };
        return Err(StorageError::StateUnrecoverable(Box::new(u)));
    }
    // The log itself must be readable to the end before the state is touched: a bad log entry
    // would fail the rebuild the same way, after moving a healthy state aside for nothing.
    let replay_from = base.as_ref().map_or(1, |s| s.index + 1);
    for entry in wal.read_from(replay_from)? {
        let _: records::LogEntry = records::decode(&entry?.payload)?;
    }
    let ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
    let aside = data.join(format!("state.damaged-{ms}"));
    if state_dir.exists() {
        std::fs::rename(state_dir, &aside).map_err(|e| StorageError::io(state_dir, e))?;
        sync_dir(data)?;
    }
    tracing::error!(
        data = %data.display(),
        reason = %reason,
        moved_to = %aside.display(),
        entries = wal.last_index(),
        snapshot = base.as_ref().map_or(0, |s| s.index),
        "THE STATE WAS DAMAGED AND IS REBUILT FROM THE WRITE-AHEAD LOG: sled could not be opened; its directory was moved aside, the snapshot at index `snapshot` is loaded (none when 0) and every later log entry is replayed"
    );
    metrics::counter!("parley_state_rebuilds_total").increment(1);
    if let Some(s) = &base {
        State::restore_snapshot(state_dir, &s.path)?;
    }
    let state = State::open(state_dir, cache_bytes)?;
    sync_dir(data)?;
    let replayed = replay(&state, &wal)?;
    let stats = RecoveryStats { applied_before: base.map_or(0, |s| s.index), replayed, torn_tail_bytes: report.torn_tail_bytes, millis: 0, rebuilt: true };
    Ok((state, wal, stats))
}

/// fsync of a directory (its entries' creations, renames and deletions become durable).
fn sync_dir(dir: &Path) -> Result<(), StorageError> {
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| StorageError::io(dir, e))
}

/// The directory holding `p` (`.` for a bare relative name).
fn parent_of(p: &Path) -> &Path {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

fn has_segments(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(Result::ok).any(|e| e.path().extension().is_some_and(|x| x == "wal")))
        .unwrap_or(false)
}

/// Commits commands without the pipeline (admin commands, with the data directory locked):
/// append as one entry, fsync, apply. The same write path as the commit thread's.
pub fn commit_offline(state: &State, wal: &mut wal::Wal, commands: Vec<records::Command>) -> Result<Vec<Outcome>, StorageError> {
    let ts = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    let entry = records::LogEntry { ts, commands };
    let index = wal.append_next(TERM, &records::encode(&entry)?)?;
    wal.sync()?;
    Ok(state.apply(index, &entry)?.0)
}

/// Applies every entry of `wal` past `state.applied()`. Returns how many.
pub fn replay(state: &State, wal: &wal::Wal) -> Result<u64, StorageError> {
    let applied = state.applied();
    if let Some(first) = wal.first_index() {
        if first > applied + 1 {
            return Err(StorageError::LogGap { applied, first });
        }
    } else if wal.last_index() > applied {
        return Err(StorageError::LogGap { applied, first: wal.last_index() });
    }
    let mut n = 0;
    let t0 = Instant::now();
    let mut last_report = Instant::now();
    for entry in wal.read_from(applied + 1)? {
        let entry = entry?;
        let payload: records::LogEntry = records::decode(&entry.payload)?;
        state.apply(entry.index, &payload)?;
        n += 1;
        if last_report.elapsed().as_secs() >= 2 {
            last_report = Instant::now();
            let left = wal.last_index().saturating_sub(entry.index);
            let rate = n as f64 / t0.elapsed().as_secs_f64().max(0.001);
            let eta_s = (left as f64 / rate.max(1.0)).round() as u64;
            tracing::info!(replayed = n, at = entry.index, left, entries_per_s = rate.round() as u64, eta_s, "replaying the write-ahead log");
        }
    }
    Ok(n)
}

/// What [`verify`] found.
#[derive(Debug, Default)]
pub struct VerifyReport {
    /// Log records checked (every one's length and CRC).
    pub log_entries: u64,
    /// Log segment files.
    pub log_segments: usize,
    /// Bytes of a torn tail (cut at the next start; not an error).
    pub torn_tail_bytes: u64,
    /// The state's applied index.
    pub applied: u64,
    /// Whether the whole log was replayed into a scratch state and compared byte for byte.
    pub replay_compared: bool,
    /// Problems found; empty means consistent.
    pub problems: Vec<String>,
}

/// Verifies a data directory (which must not be in use): every log record's CRC and index, that
/// the log reaches back to the state's applied index, the state's invariants, and, when the log
/// still starts at entry 1, that replaying it from scratch gives the same state byte for byte.
pub fn verify(data: &Path, cache_bytes: u64) -> Result<VerifyReport, StorageError> {
    let _lock = DataLock::acquire(data)?;
    let wal_dir = data.join("wal");
    let mut r = VerifyReport::default();
    if has_segments(&wal_dir) {
        let log = wal::verify(&wal_dir)?;
        r.log_entries = log.entries;
        r.log_segments = log.segments;
        r.torn_tail_bytes = log.torn_tail_bytes;
    }
    let state = State::open(&data.join("state"), cache_bytes)?;
    r.applied = state.applied();
    r.problems = state.check_invariants()?;
    if !has_segments(&wal_dir) {
        if r.applied > 0 {
            r.problems.push(format!("the state has applied {} entries but there is no log", r.applied));
        }
        return Ok(r);
    }
    let (wal, _) = wal::Wal::open(&wal_dir, u64::MAX)?;
    match wal.first_index() {
        Some(first) if first > r.applied + 1 => {
            r.problems.push(format!("the log starts at {first}, after the state's applied index {}", r.applied));
        }
        Some(1) => {
            let scratch = tempdir_in(data)?;
            let replayed = State::open(&scratch, cache_bytes)?;
            for entry in wal.read_from(1)? {
                let entry = entry?;
                if entry.index > r.applied {
                    break;
                }
                replayed.apply(entry.index, &records::decode(&entry.payload)?)?;
            }
            r.replay_compared = true;
            if replayed.dump()? != state.dump()? {
                r.problems.push("replaying the log from entry 1 does not give the stored state".into());
            }
            drop(replayed);
            let _ = std::fs::remove_dir_all(&scratch);
        }
        _ => {}
    }
    Ok(r)
}

fn tempdir_in(data: &Path) -> Result<PathBuf, StorageError> {
    let p = data.join(format!("verify-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).map_err(|e| StorageError::io(&p, e))?;
    Ok(p)
}
