//! Storage: the write-ahead log, the commit pipeline (group commit) and the sled state machine.
//!
//! The write path reads top to bottom (STYLE habit 11): append batch → fsync → apply → answer.
//! Nothing else acknowledges.

pub mod disk;
pub mod keys;
pub mod pipeline;
pub mod records;
pub mod state;
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
    #[error("{path} is in use by another parley process ({holder}); stop it first (a running server takes backups through POST /v1/admin/backup)")]
    Locked { path: PathBuf, holder: String },
    /// The log does not reach back to the state's applied index.
    #[error("the write-ahead log starts at entry {first}, but the state has only applied up to {applied}: entries are missing")]
    LogGap { applied: u64, first: u64 },
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
pub fn open(data: &Path, segment_bytes: u64, cache_bytes: u64) -> Result<Opened, StorageError> {
    let t0 = Instant::now();
    let lock = DataLock::acquire(data)?;
    let state = State::open(&data.join("state"), cache_bytes)?;
    let wal_dir = data.join("wal");
    if state.applied() > 0 && !has_segments(&wal_dir) {
        // A state restored from a backup: the log continues after its applied index.
        wal::create_empty_at(&wal_dir, state.applied() + 1)?;
    }
    let (wal, report) = wal::Wal::open(&wal_dir, segment_bytes)?;
    let mut stats = RecoveryStats { applied_before: state.applied(), torn_tail_bytes: report.torn_tail_bytes, ..Default::default() };
    stats.replayed = replay(&state, &wal)?;
    stats.millis = t0.elapsed().as_millis() as u64;
    Ok(Opened { state, wal, stats, lock })
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
