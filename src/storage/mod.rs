//! Storage: the write-ahead log, the commit pipeline (group commit) and the sled state machine.
//!
//! The write path reads top to bottom (STYLE habit 11): append batch → fsync → apply → answer.
//! Nothing else acknowledges.

pub mod keys;
pub mod pipeline;
pub mod records;
pub mod state;
pub mod trees;
pub mod wal;

#[cfg(test)]
mod model_tests;

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

/// Opens the state (`DATA/state`) and the log (`DATA/wal`), then replays every log entry past the
/// state's applied index. A corrupt record in the middle of the log is an error (start-up stops);
/// a torn tail is cut.
pub fn open(data: &Path, segment_bytes: u64, cache_bytes: u64) -> Result<(State, wal::Wal, RecoveryStats), StorageError> {
    let t0 = Instant::now();
    std::fs::create_dir_all(data).map_err(|e| StorageError::io(data, e))?;
    let state = State::open(&data.join("state"), cache_bytes)?;
    let (wal, report) = wal::Wal::open(&data.join("wal"), segment_bytes)?;
    let mut stats = RecoveryStats { applied_before: state.applied(), torn_tail_bytes: report.torn_tail_bytes, ..Default::default() };
    stats.replayed = replay(&state, &wal)?;
    stats.millis = t0.elapsed().as_millis() as u64;
    Ok((state, wal, stats))
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
    let mut last_report = Instant::now();
    for entry in wal.read_from(applied + 1)? {
        let entry = entry?;
        let payload: records::LogEntry = records::decode(&entry.payload)?;
        state.apply(entry.index, &payload)?;
        n += 1;
        if last_report.elapsed().as_secs() >= 2 {
            last_report = Instant::now();
            let left = wal.last_index().saturating_sub(entry.index);
            tracing::info!(replayed = n, at = entry.index, left, "replaying the write-ahead log");
        }
    }
    Ok(n)
}
