//! The write-ahead log: the durable, ordered record of every command batch.
//!
//! Every command batch of the server is appended as one log *entry*, fsync'd with
//! [`Wal::sync`], and only then acknowledged. On start-up the server replays the entries
//! past its state machine's applied index ([`Wal::read_from`]). The log is the truth: when
//! it cannot be read back exactly as written, [`Wal::open`] refuses to start instead of
//! silently dropping acknowledged entries.
//!
//! Entries are numbered by `index` (1, 2, 3, ... without gaps) and carry a `term` (always 1
//! for now; later Raft's term), so the log can later back openraft's log store.
//!
//! # On-disk format (version 1)
//!
//! A directory holds *segment* files named `{first_index:020}.wal`, where `first_index` is
//! the index of the first entry the segment holds (or will hold, if it is still empty), e.g.
//! `00000000000000000001.wal`. Other files in the directory are ignored; a `.wal` file with
//! any other name is reported as corrupt.
//!
//! Each segment starts with an 8-byte header: the magic `b"PRLYWAL"` followed by the format
//! version byte `1`. Then come records, back to back, all integers little-endian:
//!
//! ```text
//! +-----------+-----------+------------------------------------------------+
//! | len: u32  | crc: u32  | body (len bytes)                               |
//! |           |           | index: u64 | term: u64 | payload (len-16 bytes)  |
//! +-----------+-----------+------------------------------------------------+
//! ```
//!
//! * `len` counts the bytes of the body (so `len >= 16`; a payload is at most
//!   `u32::MAX - 16` bytes).
//! * `crc` is CRC-32 (IEEE, as computed by `crc32fast`) over the four `len` bytes followed
//!   by the body.
//! * The payload is opaque to the log.
//!
//! Within a segment, indexes are consecutive starting at the segment's `first_index`;
//! each segment starts right after the previous one's last index.
//!
//! A segment is closed ("rolled") when an append would start a record in a segment that
//! already holds at least one record and is `>= segment_bytes` long: the old segment is
//! fsync'd first, then a new segment named after the record's index is created. So a
//! segment exceeds `segment_bytes` by less than one record, and only the last segment (the
//! *active* one) is ever written to. A closed segment always holds at least one record.
//!
//! # Recovery: torn tail versus corruption
//!
//! A power loss can damage only what was written after the last fdatasync, and each append
//! is one write (a new segment's header goes out in the same write as its first records), so
//! it leaves the *last* segment with a bad record (or header) and nothing valid after it:
//! the rest of the torn write may be missing, zeros or garbage. [`Wal::open`] scans every
//! segment (header, record lengths, CRCs, index continuity) and treats a bad record in the
//! last segment as a *torn tail* when
//!
//! * everything from the record's start to the end of the file is zero bytes, or
//! * no valid record with a later index can be found in the bytes after the record's start
//!   (this catches a bit flip in the middle of the last segment, which would otherwise look
//!   like a torn tail and silently cut the valid records after it).
//!
//! A torn tail is cut off (`ftruncate` + fdatasync) and reported in
//! [`RecoveryReport::torn_tail_bytes`]. A missing, partial, all-zero or garbage segment header
//! in the last segment with no valid record of the segment after it (a crash right after
//! creating it) is a torn tail too: the header is rewritten.
//!
//! Everything else is [`WalError::Corrupt`] and nothing is modified: a bad record followed by
//! a valid later record, any bad record or header in a segment that is not the last, a record
//! whose CRC is valid but whose index is not the expected one, a gap or overlap between
//! segments, an unknown format version. An operator must look at the log then; the error
//! names the file and byte offset.
//!
//! These rules, and the durability rules below, are checked by thousands of seeded crash
//! rounds on a simulated disk that forgets what was not synced (`storage::sim_tests` on
//! [`super::disk::SimDisk`]).
//!
//! # Durability and ownership
//!
//! All I/O goes through a [`Disk`] ([`Wal::open`] uses the real file system,
//! [`Wal::open_on`] any other). [`Wal::append`] writes but does not fsync, except on a roll:
//! the segment being closed is fdatasync'd, and the directory too if an earlier segment's
//! name is still unsynced, so at most one segment name ever waits for a directory fsync.
//! [`Wal::sync`] fdatasyncs the active segment and, when a segment was created or deleted
//! since the last sync, fsyncs the directory. [`Wal::purge_upto`] fsyncs the directory after
//! each unlink, oldest first, so a power loss never leaves a gap. [`Wal::open`] rewrites and
//! fdatasyncs the last segment and fsyncs the directory, making durable whatever a killed
//! process left in the page cache before it is replayed. After a failed write that could not
//! be rolled back, or any failed fsync, the `Wal` refuses further appends and syncs (the state
//! of the page cache is unknown after a failed fsync); [`Wal::reopen`] cuts the active
//! segment back to its last synced length and opens it again.
//!
//! A `Wal` is owned by a single thread (the commit thread). There is no inter-process lock:
//! two processes must never open the same directory at once.

use std::collections::VecDeque;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::disk::{self, Cursor, Disk, DiskFile, OpenMode};

/// Segment header: magic + format version.
const HEADER: [u8; 8] = *b"PRLYWAL\x01";
/// Length of the magic part of the header.
const MAGIC_LEN: usize = 7;
/// Format version written into (and accepted from) segment headers.
const VERSION: u8 = 1;
/// Bytes of a segment header.
const HEADER_LEN: u64 = 8;
/// Bytes of a record header (`len` + `crc`).
const RECORD_HEADER_LEN: u64 = 8;
/// Bytes of the fixed part of a record body (`index` + `term`).
const BODY_FIXED_LEN: u32 = 16;
/// Largest payload a record can carry, in bytes.
const MAX_PAYLOAD_BYTES: usize = (u32::MAX - BODY_FIXED_LEN) as usize;
/// File name extension of segment files.
const SEGMENT_EXT: &str = "wal";
/// Buffer size for sequential reads, in bytes.
const READ_BUF_BYTES: usize = 64 * 1024;

/// One log entry: the unit the log appends, stores and replays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Position in the log: 1, 2, 3, ... without gaps.
    pub index: u64,
    /// Term the entry was written in (always 1 for now; Raft's term later).
    pub term: u64,
    /// The command batch, opaque to the log; at most `u32::MAX - 16` bytes.
    pub payload: Vec<u8>,
}

/// Errors of the write-ahead log.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    /// An operating-system call on `path` (a segment file or the log directory) failed.
    /// Also used, with the directory as `path`, for a payload that is too large
    /// (`InvalidInput`) and for a log that refuses work after an earlier failed write or
    /// fsync (`Other`; reopen the log).
    #[error("log I/O error in {path}: {source}")]
    Io {
        /// The file or directory the operation was on.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The log's content is damaged in a way that is not a torn tail; nothing was modified.
    #[error("corrupt log record in {path} at byte {offset}: {reason}; refusing to start (the log after it would be lost)")]
    Corrupt {
        /// The segment file that is damaged.
        path: PathBuf,
        /// Byte offset in that file of the bad header (0) or record.
        offset: u64,
        /// What is wrong, for the operator.
        reason: String,
    },
    /// An appended entry's index is not the next one. Nothing of the batch was written.
    #[error("log entry index {got} where {expected} was expected")]
    OutOfOrder {
        /// The index the log needed at that position.
        expected: u64,
        /// The index the entry carried.
        got: u64,
    },
}

/// What [`Wal::open`] found (and repaired) or what [`verify`] found.
#[derive(Debug, Clone, Copy, Default)]
pub struct RecoveryReport {
    /// Number of valid entries in the log (after cutting a torn tail).
    pub entries: u64,
    /// Number of segment files.
    pub segments: usize,
    /// Bytes cut off the end of the last segment as a torn tail (0 when the log was clean).
    /// For a damaged segment header this is the whole former length of that file.
    pub torn_tail_bytes: u64,
}

/// What the scan knows about one segment file.
#[derive(Debug, Clone)]
struct SegMeta {
    /// Index of the first entry the segment holds or will hold (from its file name).
    first_index: u64,
    /// Index of its last entry; `first_index - 1` when it holds none.
    last_index: u64,
    /// Length of the file in bytes (as far as valid).
    len: u64,
    /// Full path of the file.
    path: PathBuf,
}

impl SegMeta {
    fn has_entries(&self) -> bool {
        self.last_index >= self.first_index
    }
}

/// How the last segment must be repaired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TailFix {
    /// Cut the file to this many bytes.
    Truncate(u64),
    /// The header is damaged and no record follows: rewrite the file as a bare header.
    RewriteHeader,
}

/// Result of scanning one segment.
struct SegScan {
    meta: SegMeta,
    entries: u64,
    last_term: Option<u64>,
    fix: Option<TailFix>,
    torn_bytes: u64,
}

/// Result of scanning the whole directory (read-only).
struct DirScan {
    segments: Vec<SegMeta>,
    last_term: u64,
    fix: Option<TailFix>,
    report: RecoveryReport,
}

/// Outcome of reading one record during a scan.
enum RecordRead {
    Valid { index: u64, term: u64, end: u64 },
    Bad { reason: String, claimed_end: u64 },
}

/// The write-ahead log: a directory of segment files, appended to by a single owner
/// (the commit thread).
#[derive(Debug)]
pub struct Wal {
    /// The storage under the log (the real file system, or a simulated disk in tests).
    disk: Arc<dyn Disk>,
    dir: PathBuf,
    segment_bytes: u64,
    /// All segments, oldest first; the last one is the active segment.
    segments: Vec<SegMeta>,
    /// Open handle of the active segment (written at `segments.last().len`). `Some` iff
    /// `segments` is not empty.
    active: Option<Box<dyn DiskFile>>,
    /// Length in bytes of the active segment as of its last successful fdatasync (or as found
    /// on open): a failed fsync makes everything after it suspect (see [`Wal::reopen`]).
    synced_len: u64,
    /// Index the next appended entry gets.
    next_index: u64,
    last_term: u64,
    /// The active segment was written since its last fsync.
    active_dirty: bool,
    /// A segment was created or deleted since the directory's last fsync.
    dir_dirty: bool,
    /// A write could not be rolled back or an fsync failed: refuse appends and syncs.
    poisoned: bool,
    /// Reused encoding buffer.
    buf: Vec<u8>,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> WalError + '_ {
    move |source| WalError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn corrupt(path: &Path, offset: u64, reason: impl Into<String>) -> WalError {
    WalError::Corrupt {
        path: path.to_path_buf(),
        offset,
        reason: reason.into(),
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        a.copy_from_slice(s);
    }
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        a.copy_from_slice(s);
    }
    u64::from_le_bytes(a)
}

fn segment_path(dir: &Path, first_index: u64) -> PathBuf {
    dir.join(format!("{first_index:020}.{SEGMENT_EXT}"))
}

/// Parses a segment file stem: exactly 20 ASCII digits, value >= 1.
fn parse_segment_stem(stem: &str) -> Option<u64> {
    if stem.len() != 20 || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    stem.parse::<u64>().ok().filter(|v| *v >= 1)
}

/// Lists the segment files of `dir`, sorted by first index.
fn list_segments(disk: &dyn Disk, dir: &Path) -> Result<Vec<(u64, PathBuf)>, WalError> {
    let mut out = Vec::new();
    for ent in disk.read_dir(dir).map_err(io_err(dir))? {
        let path = ent.path;
        if path.extension().and_then(|e| e.to_str()) != Some(SEGMENT_EXT) {
            continue;
        }
        let is_file = ent.is_file;
        let first = path
            .file_stem()
            .and_then(|s| s.to_str())
            .and_then(parse_segment_stem);
        match first {
            Some(first) if is_file => out.push((first, path)),
            _ => {
                return Err(corrupt(
                    &path,
                    0,
                    "unexpected entry in the log directory: segment files must be regular files \
                     named {first_index:020}.wal with first_index >= 1",
                ))
            }
        }
    }
    out.sort_by_key(|(first, _)| *first);
    Ok(out)
}

/// Reads `r` to its end and tells whether every byte was zero.
fn rest_is_zero<R: Read>(r: &mut R, path: &Path) -> Result<bool, WalError> {
    let mut buf = vec![0u8; READ_BUF_BYTES];
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => return Ok(true),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err(path)(e)),
        };
        if buf.iter().take(n).any(|&b| b != 0) {
            return Ok(false);
        }
    }
}

/// Whether `rest` (the bytes from a bad record's start to EOF) holds, at some offset after
/// its start, a record with a valid CRC and a plausible later index (> `expected`).
/// (For a bad segment header, `rest` is the whole file and `expected` is `first_index - 1`.)
fn valid_record_follows(rest: &[u8], expected: u64) -> bool {
    let min_record = (RECORD_HEADER_LEN as usize) + (BODY_FIXED_LEN as usize);
    let max_index = expected.saturating_add((rest.len() / min_record) as u64 + 1);
    for p in 1..rest.len() {
        let Some(head) = rest.get(p..p + min_record) else {
            break;
        };
        let len = u32_at(head, 0);
        if len < BODY_FIXED_LEN {
            continue;
        }
        let index = u64_at(head, 8);
        if index <= expected || index > max_index {
            continue;
        }
        let body_start = p + RECORD_HEADER_LEN as usize;
        let Some(body) = body_start
            .checked_add(len as usize)
            .and_then(|end| rest.get(body_start..end))
        else {
            continue;
        };
        let mut h = crc32fast::Hasher::new();
        h.update(&len.to_le_bytes());
        h.update(body);
        if h.finalize() == u32_at(head, 4) {
            return true;
        }
    }
    false
}

/// Reads the bytes of `path` from `off` to `file_len`.
fn read_rest(disk: &dyn Disk, path: &Path, off: u64, file_len: u64) -> Result<Vec<u8>, WalError> {
    let mut f = Cursor::new(disk.open(path, OpenMode::Read).map_err(io_err(path))?);
    f.seek(SeekFrom::Start(off)).map_err(io_err(path))?;
    let mut rest = Vec::new();
    f.take(file_len.saturating_sub(off))
        .read_to_end(&mut rest)
        .map_err(io_err(path))?;
    Ok(rest)
}

/// Decides whether a bad record at `off` in the last segment is a torn tail: the rest of the
/// file is zeros, or no valid record with a later index follows it. (A power loss tears only
/// what was written after the last fdatasync, and the log writes each batch with one write
/// before its fdatasync, so a torn write leaves a bad record and nothing valid after it: its
/// cut-off rest may be missing, zeros or garbage. The earlier rule, which also required the
/// bad record to claim to end at or past EOF, refused to start on a torn multi-entry write
/// with garbage after the tear: simulated disk, seed 2730.)
fn tail_is_torn(disk: &dyn Disk, path: &Path, off: u64, file_len: u64, expected: u64) -> Result<bool, WalError> {
    let rest = read_rest(disk, path, off, file_len)?;
    if rest.iter().all(|&b| b == 0) {
        return Ok(true);
    }
    Ok(!valid_record_follows(&rest, expected))
}

/// Reads the record at `off` during a scan. The reader is positioned at `off`.
fn read_scan_record(
    r: &mut BufReader<Cursor>,
    path: &Path,
    off: u64,
    file_len: u64,
    body: &mut Vec<u8>,
) -> Result<RecordRead, WalError> {
    let remaining = file_len - off;
    if remaining < RECORD_HEADER_LEN {
        return Ok(RecordRead::Bad {
            reason: format!("record header cut short ({remaining} of 8 bytes before end of file)"),
            claimed_end: off + RECORD_HEADER_LEN,
        });
    }
    let mut head = [0u8; RECORD_HEADER_LEN as usize];
    r.read_exact(&mut head).map_err(io_err(path))?;
    let len = u32_at(&head, 0);
    let crc = u32_at(&head, 4);
    let claimed_end = off + RECORD_HEADER_LEN + u64::from(len);
    if len < BODY_FIXED_LEN {
        return Ok(RecordRead::Bad {
            reason: format!("record length {len} is below the minimum of {BODY_FIXED_LEN}"),
            claimed_end,
        });
    }
    if claimed_end > file_len {
        return Ok(RecordRead::Bad {
            reason: format!(
                "record of {len} bytes runs past the end of the file ({file_len} bytes)"
            ),
            claimed_end,
        });
    }
    body.resize(len as usize, 0);
    r.read_exact(body).map_err(io_err(path))?;
    let mut h = crc32fast::Hasher::new();
    h.update(&head[0..4]);
    h.update(body);
    let computed = h.finalize();
    if computed != crc {
        return Ok(RecordRead::Bad {
            reason: format!("CRC mismatch (stored {crc:#010x}, computed {computed:#010x})"),
            claimed_end,
        });
    }
    Ok(RecordRead::Valid {
        index: u64_at(body, 0),
        term: u64_at(body, 8),
        end: claimed_end,
    })
}

/// Scans one segment read-only: header, every record's length and CRC, index continuity.
fn scan_segment(disk: &dyn Disk, path: &Path, first_index: u64, is_last: bool) -> Result<SegScan, WalError> {
    let file = disk.open(path, OpenMode::Read).map_err(io_err(path))?;
    let file_len = file.len().map_err(io_err(path))?;
    let mut r = BufReader::with_capacity(READ_BUF_BYTES, Cursor::new(file));
    let empty = |len: u64| SegMeta {
        first_index,
        last_index: first_index - 1,
        len,
        path: path.to_path_buf(),
    };

    // Header.
    let mut hdr = Vec::with_capacity(HEADER_LEN as usize);
    (&mut r)
        .take(HEADER_LEN)
        .read_to_end(&mut hdr)
        .map_err(io_err(path))?;
    let hlen = hdr.len();
    if hdr != HEADER {
        let seen = hdr.as_slice();
        // A last segment whose header was torn: cut short, zeros, or garbage with no valid
        // record of this segment anywhere after it (the header and the first record are one
        // write, so a torn header means no record of it was durable).
        let torn = is_last
            && if hlen < HEADER_LEN as usize {
                HEADER.starts_with(seen) || seen.iter().all(|&b| b == 0)
            } else if seen.iter().all(|&b| b == 0) && rest_is_zero(&mut r, path)? {
                true
            } else {
                let whole = read_rest(disk, path, 0, file_len)?;
                !valid_record_follows(&whole, first_index - 1)
            };
        if torn {
            return Ok(SegScan {
                meta: empty(HEADER_LEN),
                entries: 0,
                last_term: None,
                fix: Some(TailFix::RewriteHeader),
                torn_bytes: file_len,
            });
        }
        let reason = if hlen < HEADER_LEN as usize {
            format!("segment header cut short ({hlen} of 8 bytes)")
        } else if hdr.get(..MAGIC_LEN) == HEADER.get(..MAGIC_LEN) {
            format!(
                "unsupported log format version {} (this build reads version {VERSION})",
                hdr.get(MAGIC_LEN).copied().unwrap_or_default()
            )
        } else {
            "bad segment header (not a parley log segment)".to_string()
        };
        return Err(corrupt(path, 0, reason));
    }

    // Records.
    let mut off = HEADER_LEN;
    let mut expected = first_index;
    let mut entries = 0u64;
    let mut last_term = None;
    let mut body = Vec::new();
    while off < file_len {
        match read_scan_record(&mut r, path, off, file_len, &mut body)? {
            RecordRead::Valid { index, term, end } => {
                if index != expected {
                    return Err(corrupt(
                        path,
                        off,
                        format!("record has index {index} where {expected} was expected"),
                    ));
                }
                expected = expected.checked_add(1).ok_or_else(|| {
                    corrupt(
                        path,
                        off,
                        "record index u64::MAX leaves no room for the next",
                    )
                })?;
                entries += 1;
                last_term = Some(term);
                off = end;
            }
            RecordRead::Bad {
                reason,
                claimed_end,
            } => {
                let _ = claimed_end;
                if is_last && tail_is_torn(disk, path, off, file_len, expected)? {
                    return Ok(SegScan {
                        meta: SegMeta {
                            first_index,
                            last_index: expected - 1,
                            len: off,
                            path: path.to_path_buf(),
                        },
                        entries,
                        last_term,
                        fix: Some(TailFix::Truncate(off)),
                        torn_bytes: file_len - off,
                    });
                }
                return Err(corrupt(path, off, reason));
            }
        }
    }
    if !is_last && entries == 0 {
        return Err(corrupt(
            path,
            HEADER_LEN,
            "closed segment holds no records (only the last segment may be empty)",
        ));
    }
    Ok(SegScan {
        meta: SegMeta {
            first_index,
            last_index: expected - 1,
            len: file_len,
            path: path.to_path_buf(),
        },
        entries,
        last_term,
        fix: None,
        torn_bytes: 0,
    })
}

/// Scans the whole log directory read-only.
fn scan_dir(disk: &dyn Disk, dir: &Path) -> Result<DirScan, WalError> {
    let files = list_segments(disk, dir)?;
    let count = files.len();
    let mut segments: Vec<SegMeta> = Vec::with_capacity(count);
    let mut last_term = 0;
    let mut entries = 0;
    let mut fix = None;
    let mut torn_tail_bytes = 0;
    for (i, (first, path)) in files.into_iter().enumerate() {
        if let Some(prev) = segments.last() {
            if prev.last_index.checked_add(1) != Some(first) {
                return Err(corrupt(
                    &path,
                    0,
                    format!(
                        "segment starts at index {first} but the previous segment {} ends at index {}",
                        prev.path.display(),
                        prev.last_index
                    ),
                ));
            }
        }
        let is_last = i + 1 == count;
        let s = scan_segment(disk, &path, first, is_last)?;
        if let Some(t) = s.last_term {
            last_term = t;
        }
        entries += s.entries;
        if is_last {
            fix = s.fix;
            torn_tail_bytes = s.torn_bytes;
        }
        segments.push(s.meta);
    }
    Ok(DirScan {
        report: RecoveryReport {
            entries,
            segments: segments.len(),
            torn_tail_bytes,
        },
        segments,
        last_term,
        fix,
    })
}

/// fsyncs a directory so that file creations and deletions in it are durable.
fn sync_dir(disk: &dyn Disk, dir: &Path) -> Result<(), WalError> {
    disk.sync_dir(dir).map_err(io_err(dir))
}

/// Starts an empty log in `dir` whose first entry will be `next_index` (a header-only segment
/// named after it, fsync'd with its directory). For a state restored from a backup at
/// `next_index - 1`. Refuses a directory that already holds segments.
pub fn create_empty_at(dir: &Path, next_index: u64) -> Result<(), WalError> {
    create_empty_at_on(&disk::RealDisk, dir, next_index)
}

/// [`create_empty_at`] on any [`Disk`]. The new directory's parent is fsync'd too.
pub fn create_empty_at_on(disk: &dyn Disk, dir: &Path, next_index: u64) -> Result<(), WalError> {
    let io = |path: &Path, source| WalError::Io { path: path.to_owned(), source };
    let existed = disk.is_dir(dir).unwrap_or(false);
    disk.create_dir_all(dir).map_err(|e| io(dir, e))?;
    if !existed {
        sync_dir(disk, parent_of(dir))?;
    }
    let has_segments = disk
        .read_dir(dir)
        .map_err(|e| io(dir, e))?
        .iter()
        .any(|e| e.path.extension().is_some_and(|x| x == SEGMENT_EXT));
    if has_segments {
        return Err(io(dir, std::io::Error::new(std::io::ErrorKind::AlreadyExists, "the log already has segments")));
    }
    let path = segment_path(dir, next_index);
    let mut f = disk.open(&path, OpenMode::CreateNew).map_err(|e| io(&path, e))?;
    f.write_all_at(&HEADER, 0).map_err(|e| io(&path, e))?;
    f.sync_data().map_err(|e| io(&path, e))?;
    sync_dir(disk, dir)
}

/// Writes the first `len` bytes of `f` again, in place, so that its fdatasync writes them to
/// the disk. After a failed fdatasync Linux marks the dirty pages clean without writing them,
/// and a process that opens the file later is not told (the error is reported to descriptors
/// open at the time), so the bytes it reads may exist only in the page cache. Found by the
/// simulated disk's crash rounds (seed 671831839: an fdatasync failed, the process died before
/// its recovery cut the tail, the next process's acked entries followed a hole after a power
/// loss). Costs one read and one write of the last segment (at most `segment_bytes` plus one
/// record) per start. Rewriting only when the failing process left a marker was tried and
/// leaves a window: the process can die between the failed fdatasync and the marker (seed
/// 13259).
fn rewrite(f: &mut dyn DiskFile, path: &Path, len: u64) -> Result<(), WalError> {
    let mut buf = vec![0u8; READ_BUF_BYTES.min(len as usize)];
    let mut off = 0u64;
    while off < len {
        let want = buf.len().min((len - off) as usize);
        let n = f.read_at(&mut buf[..want], off).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        f.write_all_at(&buf[..n], off).map_err(io_err(path))?;
        off += n as u64;
    }
    Ok(())
}

/// The directory holding `dir` (`.` for a bare relative name).
fn parent_of(dir: &Path) -> &Path {
    match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Checks the log in `dir` read-only, exactly as [`Wal::open`] would, without repairing
/// anything: the returned report's `torn_tail_bytes` is what `open` would cut.
///
/// # Errors
/// [`WalError::Io`] if `dir` or a segment cannot be read (including a missing `dir`);
/// [`WalError::Corrupt`] for damage that `open` would refuse to start on.
pub fn verify(dir: &Path) -> Result<RecoveryReport, WalError> {
    verify_on(&disk::RealDisk, dir)
}

/// [`verify`] on any [`Disk`].
pub fn verify_on(disk: &dyn Disk, dir: &Path) -> Result<RecoveryReport, WalError> {
    Ok(scan_dir(disk, dir)?.report)
}

impl Wal {
    /// Opens the log in `dir`, creating the directory if it does not exist: scans every
    /// segment, checks headers, record lengths, CRCs and index continuity, cuts a torn tail
    /// off the last segment (ftruncate + fsync) and positions for appending.
    ///
    /// `segment_bytes` is the size in bytes past which the active segment is closed and a
    /// new one started (see the module docs); 0 means one record per segment.
    ///
    /// An empty directory is an empty log; no file is created until the first append.
    ///
    /// # Errors
    /// [`WalError::Io`] when the directory or a file cannot be created, read, truncated or
    /// fsync'd; [`WalError::Corrupt`] for damage that is not a torn tail (then nothing was
    /// modified).
    pub fn open(dir: &Path, segment_bytes: u64) -> Result<(Wal, RecoveryReport), WalError> {
        Wal::open_on(disk::real(), dir, segment_bytes)
    }

    /// [`Wal::open`] on any [`Disk`] (the real file system, or a [`disk::SimDisk`] in tests).
    ///
    /// Besides cutting a torn tail, open makes what it found durable before anyone replays it:
    /// the last segment is fdatasync'd and the directory fsync'd. After a `kill -9` the page
    /// cache still holds the dead process's unsynced appends and segment names; they are
    /// replayed into the state now, so they must not vanish at a later power loss while the
    /// state keeps them (the next entry would reuse their index; simulated disk, seeds 1055
    /// and 1106). The last segment is rewritten before its fdatasync (see `rewrite`).
    pub fn open_on(disk: Arc<dyn Disk>, dir: &Path, segment_bytes: u64) -> Result<(Wal, RecoveryReport), WalError> {
        match disk.is_dir(dir) {
            Ok(true) => {}
            Ok(false) => {
                return Err(io_err(dir)(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "the log path exists but is not a directory",
                )))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                disk.create_dir_all(dir).map_err(io_err(dir))?;
                sync_dir(&*disk, parent_of(dir))?;
            }
            Err(e) => return Err(io_err(dir)(e)),
        }

        let scan = scan_dir(&*disk, dir)?;
        let mut active = None;
        let mut synced_len = 0;
        if let Some(last) = scan.segments.last() {
            let path = &last.path;
            let mut f = disk.open(path, OpenMode::ReadWrite).map_err(io_err(path))?;
            match scan.fix {
                Some(TailFix::Truncate(at)) => {
                    f.set_len(at).map_err(io_err(path))?;
                }
                Some(TailFix::RewriteHeader) => {
                    f.set_len(0).map_err(io_err(path))?;
                    f.write_all_at(&HEADER, 0).map_err(io_err(path))?;
                }
                None => {}
            }
            rewrite(&mut *f, path, last.len)?;
            f.sync_data().map_err(io_err(path))?;
            failpoint!("wal.open.after_tail_sync", e => Err(io_err(path)(e)));
            sync_dir(&*disk, dir)?;
            synced_len = last.len;
            active = Some(f);
        }
        let next_index = match scan.segments.last() {
            Some(last) => last.last_index + 1,
            None => 1,
        };
        let wal = Wal {
            disk,
            dir: dir.to_path_buf(),
            segment_bytes,
            segments: scan.segments,
            active,
            synced_len,
            next_index,
            last_term: scan.last_term,
            active_dirty: false,
            dir_dirty: false,
            poisoned: false,
            buf: Vec::new(),
        };
        Ok((wal, scan.report))
    }

    /// Opens the log again after a failure, on the same storage (the commit thread's
    /// recovery). Appends after the last successful fdatasync were never acknowledged; after a
    /// failed fdatasync they may sit in the page cache marked clean (Linux after a writeback
    /// error, PostgreSQL's "fsyncgate"), readable but never to be durable, so a reopen that
    /// trusted them would let later acknowledged entries follow a hole. The active segment is
    /// therefore cut back to its last synced length first (and the cut fdatasync'd), then the
    /// log is opened as on start-up.
    ///
    /// # Errors
    /// As [`Wal::open`]; and [`WalError::Io`] when the cut fails (retry later).
    pub fn reopen(&self) -> Result<(Wal, RecoveryReport), WalError> {
        if let Some(seg) = self.segments.last() {
            let path = &seg.path;
            let mut f = self.disk.open(path, OpenMode::ReadWrite).map_err(io_err(path))?;
            if f.len().map_err(io_err(path))? > self.synced_len {
                f.set_len(self.synced_len).map_err(io_err(path))?;
                f.sync_data().map_err(io_err(path))?;
            }
        }
        Wal::open_on(self.disk.clone(), &self.dir, self.segment_bytes)
    }

    /// Index of the oldest entry still in the log; `None` when the log holds no entry.
    pub fn first_index(&self) -> Option<u64> {
        self.segments
            .first()
            .map(|s| s.first_index)
            .filter(|first| *first <= self.last_index())
    }

    /// Index of the newest entry; 0 for a log that never held an entry. After the newest
    /// entries' segment was found empty on open (its entries were never durable), this is
    /// the index just before that segment's name.
    pub fn last_index(&self) -> u64 {
        self.next_index - 1
    }

    /// Term of the newest entry; 0 when no entry is known (empty log, or a log whose only
    /// remaining segment is empty).
    pub fn last_term(&self) -> u64 {
        self.last_term
    }

    /// Appends `entries` (their indexes must be `last_index() + 1`, `+ 2`, ...), encoded
    /// into one write per segment touched (normally one). Does not fsync, except that a
    /// segment closed by a roll is fsync'd before the next one is created; call
    /// [`Wal::sync`] before acknowledging. An empty slice is a no-op.
    ///
    /// # Errors
    /// [`WalError::OutOfOrder`] for a wrong index (nothing written);
    /// [`WalError::Io`] with kind `InvalidInput` for a payload over `u32::MAX - 16` bytes
    /// (nothing written); [`WalError::Io`] when writing, creating a segment or the roll's
    /// fsync fails. If a batch spanning a roll fails in its second segment, the entries
    /// written to the first segment stay in the log (`last_index()` tells).
    pub fn append(&mut self, entries: &[Entry]) -> Result<(), WalError> {
        let mut expected = self.next_index;
        for e in entries {
            if e.index != expected {
                return Err(WalError::OutOfOrder {
                    expected,
                    got: e.index,
                });
            }
            self.check_payload(&e.payload)?;
            expected = expected.checked_add(1).ok_or_else(|| self.exhausted())?;
        }
        self.write_batch(entries.iter().map(|e| (e.term, e.payload.as_slice())))
    }

    /// Appends one entry with index `last_index() + 1` and returns that index. Does not
    /// fsync (see [`Wal::append`]).
    ///
    /// # Errors
    /// As [`Wal::append`].
    pub fn append_next(&mut self, term: u64, payload: &[u8]) -> Result<u64, WalError> {
        self.check_payload(payload)?;
        let index = self.next_index;
        if index == u64::MAX {
            return Err(self.exhausted());
        }
        self.write_batch(std::iter::once((term, payload)))?;
        Ok(index)
    }

    /// fsyncs the active segment if it was written since the last sync, and the directory
    /// if a segment was created or deleted since then. When this returns `Ok`, every entry
    /// appended so far is durable.
    ///
    /// # Errors
    /// [`WalError::Io`] if an fsync fails; the `Wal` then refuses further appends and syncs
    /// (reopen it), because a failed fsync leaves the file's durable state unknown.
    pub fn sync(&mut self) -> Result<(), WalError> {
        self.check_poisoned()?;
        if self.active_dirty {
            if let (Some(f), Some(seg)) = (&self.active, self.segments.last()) {
                if let Err(e) = f.sync_data() {
                    self.poisoned = true;
                    return Err(io_err(&seg.path)(e));
                }
                self.synced_len = seg.len;
            }
            self.active_dirty = false;
        }
        failpoint!("wal.sync.after_fdatasync", e => {
            self.poisoned = true;
            Err(io_err(&self.dir)(e))
        });
        if self.dir_dirty {
            if let Err(e) = sync_dir(&*self.disk, &self.dir) {
                self.poisoned = true;
                return Err(e);
            }
            self.dir_dirty = false;
        }
        Ok(())
    }

    /// Returns a streaming iterator over the entries with index `>= from`, in order,
    /// reading segment by segment (one record in memory at a time). Entries already purged
    /// are not there: the first entry yielded is `max(from, first_index())`, so a caller
    /// that needs `from` exactly should compare the first entry's index. `from` past
    /// `last_index()` yields nothing. The reader sees the entries present when it was
    /// created, not later appends; purging segments it has yet to read makes it yield an
    /// [`WalError::Io`] error.
    ///
    /// # Errors
    /// None at creation (the `Result` is for future use); the iterator yields
    /// [`WalError::Io`] or [`WalError::Corrupt`] items on read failures and ends after one.
    pub fn read_from(&self, from: u64) -> Result<WalReader, WalError> {
        let pending = self
            .segments
            .iter()
            .filter(|s| s.has_entries() && s.last_index >= from)
            .cloned()
            .collect();
        Ok(WalReader {
            disk: self.disk.clone(),
            pending,
            from,
            cur: None,
            done: false,
        })
    }

    /// Deletes the closed segments (oldest first) all of whose entries have index `<= upto`;
    /// the active segment is never deleted. Returns how many files were deleted.
    ///
    /// Each unlink is made durable (directory fsync) before the next one: a power loss keeps
    /// any subset of the unlinks not yet fsync'd, and a subset of several could leave a gap
    /// in the middle of the log, which [`Wal::open`] must refuse as corruption (found by the
    /// simulated disk's crash rounds, seed 2252986785). One at a time, a power loss can only
    /// bring back the oldest deleted segment, which is harmless.
    ///
    /// # Errors
    /// [`WalError::Io`] if deleting a file or the directory fsync fails (the segments deleted
    /// before stay deleted; the next purge or [`Wal::sync`] fsyncs the directory again).
    pub fn purge_upto(&mut self, upto: u64) -> Result<usize, WalError> {
        let mut deleted = 0;
        while self.segments.len() > 1 {
            let Some(oldest) = self.segments.first() else {
                break;
            };
            if oldest.last_index > upto {
                break;
            }
            failpoint!("wal.purge.before_unlink", e => Err(io_err(&oldest.path)(e)));
            match self.disk.remove_file(&oldest.path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&oldest.path)(e)),
            }
            self.segments.remove(0);
            self.dir_dirty = true;
            deleted += 1;
            sync_dir(&*self.disk, &self.dir)?;
            self.dir_dirty = false;
        }
        Ok(deleted)
    }

    /// Removes every entry with index `>= from` (Raft's log truncation, §5.3: a follower drops
    /// the conflicting suffix of its log), durably: when this returns `Ok`, a reopen finds the
    /// log ending at `from - 1`, and the next append gets index `from`. `from` past
    /// `last_index()` is a no-op.
    ///
    /// Crash safety: the segments wholly at or after `from` are deleted newest first, each
    /// unlink made durable (directory fsync) before the next, so a power loss leaves the log a
    /// contiguous prefix of what it was; then the segment holding `from` is cut at that
    /// record's start (ftruncate + fdatasync). A crash in between leaves a longer log than
    /// asked for, never a hole; the caller was not told it was done and truncates again. A
    /// segment cut to its header stays as the (empty) active segment.
    ///
    /// # Errors
    /// [`WalError::Io`] with kind `InvalidInput` when `from` is below `first_index()` (those
    /// entries were purged; nothing changed); [`WalError::Io`] when an unlink, the cut or an
    /// fsync fails (the `Wal` then refuses further work until [`Wal::reopen`]);
    /// [`WalError::Corrupt`] when the segment holding `from` cannot be read back.
    pub fn truncate_from(&mut self, from: u64) -> Result<(), WalError> {
        self.check_poisoned()?;
        if from > self.last_index() {
            return Ok(());
        }
        let Some(k) = self.segments.iter().rposition(|s| s.first_index <= from) else {
            return Err(io_err(&self.dir)(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("cannot truncate the log from entry {from}: it starts at a later entry (purged)"),
            )));
        };
        // Where entry `from` starts in segment k, and the term of the entry kept before it.
        let seg = self.segments[k].clone();
        let (cut, last_term) = if from > seg.first_index {
            let mut cur = SegCursor::open(&*self.disk, seg.clone())?;
            let prev = cur
                .next_entry(from - 1)?
                .ok_or_else(|| corrupt(&seg.path, cur.off, format!("segment ends before entry {}", from - 1)))?;
            (cur.off, prev.term)
        } else if k > 0 {
            let before = self.segments[k - 1].clone();
            let mut cur = SegCursor::open(&*self.disk, before.clone())?;
            let prev = cur
                .next_entry(before.last_index)?
                .ok_or_else(|| corrupt(&before.path, cur.off, format!("segment ends before entry {}", before.last_index)))?;
            (HEADER_LEN, prev.term)
        } else {
            (HEADER_LEN, 0)
        };
        // From here on a failure leaves the in-memory view unsure: poison until reopened.
        self.poisoned = true;
        self.active = None;
        while self.segments.len() > k + 1 {
            let Some(newest) = self.segments.last() else { break };
            match self.disk.remove_file(&newest.path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&newest.path)(e)),
            }
            self.segments.pop();
            sync_dir(&*self.disk, &self.dir)?;
        }
        failpoint!("wal.truncate.before_cut", e => Err(io_err(&seg.path)(e)));
        let mut f = self.disk.open(&seg.path, OpenMode::ReadWrite).map_err(io_err(&seg.path))?;
        f.set_len(cut).map_err(io_err(&seg.path))?;
        f.sync_data().map_err(io_err(&seg.path))?;
        if let Some(s) = self.segments.last_mut() {
            s.len = cut;
            s.last_index = from - 1;
        }
        self.active = Some(f);
        self.synced_len = cut;
        self.next_index = from;
        self.last_term = last_term;
        self.active_dirty = false;
        self.dir_dirty = false;
        self.poisoned = false;
        Ok(())
    }

    /// Empties the log and starts it again at `next_index`, durably: every segment is deleted
    /// (oldest first, a directory fsync after each, so a power loss leaves a contiguous suffix
    /// of the old log), then an empty, header-only segment named after `next_index` is created
    /// and fsync'd with its directory. For a log whose every entry is covered by a snapshot
    /// that reaches past its end (Raft §7: a follower that installed a leader's snapshot
    /// continues its log after the snapshot's last entry). A crash in between leaves the old
    /// suffix or an empty log; the caller must record `next_index - 1` elsewhere first (the
    /// cluster log store keeps it with the vote) and restart again on open.
    ///
    /// # Errors
    /// [`WalError::Io`] with kind `InvalidInput` when `next_index` is 0, or is not above
    /// `last_index()` while the log holds entries (use [`Wal::truncate_from`]); [`WalError::Io`] when an unlink,
    /// the new segment or an fsync fails (the `Wal` then refuses further work until
    /// [`Wal::reopen`]).
    pub fn restart_at(&mut self, next_index: u64) -> Result<(), WalError> {
        self.check_poisoned()?;
        if (next_index <= self.last_index() && self.first_index().is_some()) || next_index == 0 {
            return Err(io_err(&self.dir)(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("cannot restart the log at entry {next_index}: it holds entries up to {}", self.last_index()),
            )));
        }
        self.poisoned = true;
        self.active = None;
        while let Some(oldest) = self.segments.first() {
            match self.disk.remove_file(&oldest.path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&oldest.path)(e)),
            }
            self.segments.remove(0);
            sync_dir(&*self.disk, &self.dir)?;
        }
        failpoint!("wal.restart.before_create", e => Err(io_err(&self.dir)(e)));
        let path = segment_path(&self.dir, next_index);
        let mut f = self.disk.open(&path, OpenMode::CreateTruncate).map_err(io_err(&path))?;
        f.write_all_at(&HEADER, 0).map_err(io_err(&path))?;
        f.sync_data().map_err(io_err(&path))?;
        sync_dir(&*self.disk, &self.dir)?;
        self.segments.push(SegMeta { first_index: next_index, last_index: next_index - 1, len: HEADER_LEN, path });
        self.active = Some(f);
        self.synced_len = HEADER_LEN;
        self.next_index = next_index;
        self.last_term = 0;
        self.active_dirty = false;
        self.dir_dirty = false;
        self.poisoned = false;
        Ok(())
    }

    /// Total size in bytes of all segment files (headers included).
    pub fn size_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.len).sum()
    }

    /// Number of segment files (0 for a log that never held an entry).
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// The log directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn check_poisoned(&self) -> Result<(), WalError> {
        if self.poisoned {
            return Err(io_err(&self.dir)(io::Error::other(
                "an earlier write or fsync of the log failed; the log must be reopened",
            )));
        }
        Ok(())
    }

    fn check_payload(&self, payload: &[u8]) -> Result<(), WalError> {
        if payload.len() > MAX_PAYLOAD_BYTES {
            return Err(io_err(&self.dir)(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "log payload of {} bytes exceeds the maximum of {MAX_PAYLOAD_BYTES} bytes",
                    payload.len()
                ),
            )));
        }
        Ok(())
    }

    fn exhausted(&self) -> WalError {
        io_err(&self.dir)(io::Error::new(
            io::ErrorKind::InvalidInput,
            "log index space exhausted",
        ))
    }

    /// Encodes and writes already validated `(term, payload)` items with consecutive
    /// indexes from `next_index`, rolling segments as needed.
    fn write_batch<'a, I>(&mut self, items: I) -> Result<(), WalError>
    where
        I: Iterator<Item = (u64, &'a [u8])>,
    {
        self.check_poisoned()?;
        self.buf.clear();
        if self.segments.last().is_some_and(|seg| seg.len == 0) {
            // A segment created by an append that failed: its header is still to be written.
            self.buf.extend_from_slice(&HEADER);
        }
        let mut pending = 0u64;
        let mut pending_term = 0u64;
        for (term, payload) in items {
            let index = self.next_index + pending;
            let roll = match self.segments.last() {
                None => true,
                Some(seg) => {
                    let holds_records = seg.has_entries() || pending > 0;
                    holds_records && seg.len + self.buf.len() as u64 >= self.segment_bytes
                }
            };
            if roll {
                self.flush(pending, pending_term)?;
                pending = 0;
                if !self.segments.is_empty() {
                    self.sync_active_for_roll()?;
                    failpoint!("wal.roll.after_sync_old", e => Err(io_err(&self.dir)(e)));
                    // At most one segment name may wait for the directory's fsync: with two, a
                    // power loss could keep the later and lose the earlier, a gap that open
                    // refuses (a batch spanning two rolls; simulated disk, seed 1006).
                    if self.dir_dirty {
                        if let Err(e) = sync_dir(&*self.disk, &self.dir) {
                            self.poisoned = true;
                            return Err(e);
                        }
                        self.dir_dirty = false;
                    }
                }
                self.create_segment(index)?;
                failpoint!("wal.roll.after_create", e => Err(io_err(&self.dir)(e)));
                // The header goes out in one write with the segment's first records: a torn
                // write can then only leave a prefix of both (see the recovery rules). Written
                // alone, a power loss could keep the record and lose the header, and open
                // refused the log (simulated disk, seed 1093).
                self.buf.extend_from_slice(&HEADER);
            }
            // Checked by the callers: the payload fits.
            let len = BODY_FIXED_LEN + payload.len() as u32;
            let len_bytes = len.to_le_bytes();
            let index_bytes = index.to_le_bytes();
            let term_bytes = term.to_le_bytes();
            let mut h = crc32fast::Hasher::new();
            h.update(&len_bytes);
            h.update(&index_bytes);
            h.update(&term_bytes);
            h.update(payload);
            self.buf.extend_from_slice(&len_bytes);
            self.buf.extend_from_slice(&h.finalize().to_le_bytes());
            self.buf.extend_from_slice(&index_bytes);
            self.buf.extend_from_slice(&term_bytes);
            self.buf.extend_from_slice(payload);
            pending += 1;
            pending_term = term;
        }
        self.flush(pending, pending_term)
    }

    /// Writes the encoded buffer (`count` records, the last with `last_term`) to the active
    /// segment and updates the in-memory state. On failure, tries to cut the file back.
    fn flush(&mut self, count: u64, last_term: u64) -> Result<(), WalError> {
        if count == 0 {
            return Ok(());
        }
        let (Some(f), Some(seg)) = (self.active.as_mut(), self.segments.last_mut()) else {
            return Err(io_err(&self.dir)(io::Error::other(
                "log has no active segment to write to",
            )));
        };
        if let Err(e) = f.write_all_at(&self.buf, seg.len) {
            let restored = f.set_len(seg.len);
            if restored.is_err() {
                self.poisoned = true;
            }
            return Err(io_err(&seg.path)(e));
        }
        seg.len += self.buf.len() as u64;
        seg.last_index += count;
        self.next_index += count;
        self.last_term = last_term;
        self.active_dirty = true;
        self.buf.clear();
        Ok(())
    }

    /// fsyncs the active segment before it is closed by a roll.
    fn sync_active_for_roll(&mut self) -> Result<(), WalError> {
        if !self.active_dirty {
            return Ok(());
        }
        if let (Some(f), Some(seg)) = (&self.active, self.segments.last()) {
            if let Err(e) = f.sync_data() {
                self.poisoned = true;
                return Err(io_err(&seg.path)(e));
            }
            self.synced_len = seg.len;
        }
        self.active_dirty = false;
        Ok(())
    }

    /// Creates a new, empty segment file for entries from `first_index` on and makes it
    /// active. Its header is written by the next flush, together with the first records.
    fn create_segment(&mut self, first_index: u64) -> Result<(), WalError> {
        let path = segment_path(&self.dir, first_index);
        let f = self.disk.open(&path, OpenMode::CreateNew).map_err(io_err(&path))?;
        self.dir_dirty = true;
        self.segments.push(SegMeta {
            first_index,
            last_index: first_index - 1,
            len: 0,
            path,
        });
        self.active = Some(f);
        self.synced_len = 0;
        self.active_dirty = true;
        Ok(())
    }
}

/// Streaming iterator over log entries, returned by [`Wal::read_from`]. Holds at most one
/// segment file open and one record in memory. Yields `Err` at most once, then ends.
#[derive(Debug)]
pub struct WalReader {
    disk: Arc<dyn Disk>,
    pending: VecDeque<SegMeta>,
    from: u64,
    cur: Option<SegCursor>,
    done: bool,
}

/// Read position in one segment.
#[derive(Debug)]
struct SegCursor {
    r: BufReader<Cursor>,
    meta: SegMeta,
    off: u64,
    expected: u64,
}

impl SegCursor {
    fn open(disk: &dyn Disk, meta: SegMeta) -> Result<SegCursor, WalError> {
        let f = disk.open(&meta.path, OpenMode::Read).map_err(io_err(&meta.path))?;
        let mut r = BufReader::with_capacity(READ_BUF_BYTES, Cursor::new(f));
        let mut hdr = [0u8; HEADER_LEN as usize];
        r.read_exact(&mut hdr).map_err(io_err(&meta.path))?;
        if hdr != HEADER {
            return Err(corrupt(&meta.path, 0, "bad segment header"));
        }
        Ok(SegCursor {
            r,
            expected: meta.first_index,
            off: HEADER_LEN,
            meta,
        })
    }

    /// Next entry with index >= `from` in this segment, or `None` at its (snapshot) end.
    fn next_entry(&mut self, from: u64) -> Result<Option<Entry>, WalError> {
        let path = &self.meta.path;
        loop {
            if self.expected > self.meta.last_index {
                return Ok(None);
            }
            let remaining = self.meta.len.saturating_sub(self.off);
            let fixed = RECORD_HEADER_LEN + u64::from(BODY_FIXED_LEN);
            if remaining < fixed {
                return Err(corrupt(
                    path,
                    self.off,
                    format!(
                        "segment ends before entry {} (it should hold entries up to {})",
                        self.expected, self.meta.last_index
                    ),
                ));
            }
            let mut head = [0u8; 24];
            self.r.read_exact(&mut head).map_err(io_err(path))?;
            let len = u32_at(&head, 0);
            let crc = u32_at(&head, 4);
            let index = u64_at(&head, 8);
            let term = u64_at(&head, 16);
            if len < BODY_FIXED_LEN || RECORD_HEADER_LEN + u64::from(len) > remaining {
                return Err(corrupt(path, self.off, format!("bad record length {len}")));
            }
            if index != self.expected {
                return Err(corrupt(
                    path,
                    self.off,
                    format!(
                        "record has index {index} where {} was expected",
                        self.expected
                    ),
                ));
            }
            let payload_len = len - BODY_FIXED_LEN;
            let record_off = self.off;
            self.off += RECORD_HEADER_LEN + u64::from(len);
            self.expected += 1;
            if index < from {
                self.r
                    .seek_relative(i64::from(payload_len))
                    .map_err(io_err(path))?;
                continue;
            }
            let mut payload = vec![0u8; payload_len as usize];
            self.r.read_exact(&mut payload).map_err(io_err(path))?;
            let mut h = crc32fast::Hasher::new();
            h.update(&head[0..4]);
            h.update(&head[8..24]);
            h.update(&payload);
            if h.finalize() != crc {
                return Err(corrupt(path, record_off, "CRC mismatch"));
            }
            return Ok(Some(Entry {
                index,
                term,
                payload,
            }));
        }
    }
}

impl WalReader {
    fn advance(&mut self) -> Result<Option<Entry>, WalError> {
        loop {
            if self.cur.is_none() {
                let Some(meta) = self.pending.pop_front() else {
                    return Ok(None);
                };
                self.cur = Some(SegCursor::open(&*self.disk, meta)?);
            }
            let Some(cur) = self.cur.as_mut() else {
                return Ok(None);
            };
            match cur.next_entry(self.from)? {
                Some(e) => return Ok(Some(e)),
                None => self.cur = None,
            }
        }
    }
}

impl Iterator for WalReader {
    type Item = Result<Entry, WalError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.advance() {
            Ok(Some(e)) => Some(Ok(e)),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                self.cur = None;
                Some(Err(e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::fs::{self, OpenOptions};

    fn payload(i: u64) -> Vec<u8> {
        // Varying lengths, including empty payloads.
        let n = (i * 7 % 23) as usize;
        (0..n)
            .map(|k| (i as u8).wrapping_mul(31).wrapping_add(k as u8) | 1)
            .collect()
    }

    fn entry(i: u64) -> Entry {
        Entry {
            index: i,
            term: 1,
            payload: payload(i),
        }
    }

    fn entries(range: std::ops::RangeInclusive<u64>) -> Vec<Entry> {
        range.map(entry).collect()
    }

    fn read_all(wal: &Wal, from: u64) -> Vec<Entry> {
        wal.read_from(from)
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap()
    }

    /// Creates a log with entries 1..=n (appended in batches of 3) and syncs it.
    fn build(dir: &Path, segment_bytes: u64, n: u64) -> Wal {
        let (mut wal, _) = Wal::open(dir, segment_bytes).unwrap();
        let all = entries(1..=n);
        for chunk in all.chunks(3) {
            wal.append(chunk).unwrap();
        }
        wal.sync().unwrap();
        wal
    }

    fn seg_files(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("wal"))
            .collect();
        v.sort();
        v
    }

    fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let p = e.unwrap().path();
                let b = fs::read(&p).unwrap();
                (p, b)
            })
            .collect()
    }

    /// Byte offsets (start, end) of every record in a segment file.
    fn record_spans(path: &Path) -> Vec<(u64, u64)> {
        let b = fs::read(path).unwrap();
        let mut off = HEADER_LEN as usize;
        let mut out = Vec::new();
        while off + 8 <= b.len() {
            let len = u32_at(&b, off) as usize;
            out.push((off as u64, (off + 8 + len) as u64));
            off += 8 + len;
        }
        out
    }

    fn truncate(path: &Path, len: u64) {
        OpenOptions::new()
            .write(true)
            .open(path)
            .unwrap()
            .set_len(len)
            .unwrap();
    }

    fn flip(path: &Path, at: u64) {
        let mut b = fs::read(path).unwrap();
        b[at as usize] ^= 0xFF;
        fs::write(path, b).unwrap();
    }

    fn assert_corrupt_at(err: WalError, path: &Path, offset: u64) {
        match err {
            WalError::Corrupt {
                path: p,
                offset: o,
                reason,
            } => {
                assert_eq!(p, path, "reason: {reason}");
                assert_eq!(o, offset, "reason: {reason}");
                let msg = WalError::Corrupt {
                    path: p,
                    offset: o,
                    reason,
                }
                .to_string();
                assert!(msg.contains(&path.display().to_string()), "{msg}");
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    #[test]
    fn empty_dir_is_empty_log_and_first_append_creates_first_segment() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("wal"); // does not exist yet
        let (mut wal, rep) = Wal::open(&dir, 1024).unwrap();
        assert_eq!((rep.entries, rep.segments, rep.torn_tail_bytes), (0, 0, 0));
        assert_eq!(wal.first_index(), None);
        assert_eq!(wal.last_index(), 0);
        assert_eq!(wal.last_term(), 0);
        assert_eq!(wal.segment_count(), 0);
        assert_eq!(wal.size_bytes(), 0);
        assert!(seg_files(&dir).is_empty());
        assert_eq!(read_all(&wal, 0), vec![]);
        wal.append(&[]).unwrap();
        assert!(seg_files(&dir).is_empty());
        assert_eq!(wal.append_next(1, b"hello").unwrap(), 1);
        wal.sync().unwrap();
        assert_eq!(seg_files(&dir), vec![dir.join("00000000000000000001.wal")]);
        let bytes = fs::read(dir.join("00000000000000000001.wal")).unwrap();
        assert_eq!(&bytes[..8], b"PRLYWAL\x01");
        assert_eq!(bytes.len() as u64, 8 + 8 + 16 + 5);
        assert_eq!(wal.size_bytes(), bytes.len() as u64);
        assert_eq!(wal.dir(), dir.as_path());
    }

    #[test]
    fn round_trip_across_reopen() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let (mut wal, _) = Wal::open(dir, 1 << 20).unwrap();
        wal.append(&entries(1..=5)).unwrap();
        assert_eq!(wal.append_next(2, b"six").unwrap(), 6);
        wal.append(&[Entry {
            index: 7,
            term: 3,
            payload: vec![],
        }])
        .unwrap();
        wal.sync().unwrap();
        assert_eq!(wal.first_index(), Some(1));
        assert_eq!(wal.last_index(), 7);
        assert_eq!(wal.last_term(), 3);
        let before = read_all(&wal, 1);
        assert_eq!(before.len(), 7);
        assert_eq!(
            before[5],
            Entry {
                index: 6,
                term: 2,
                payload: b"six".to_vec()
            }
        );
        drop(wal);

        let (mut wal, rep) = Wal::open(dir, 1 << 20).unwrap();
        assert_eq!((rep.entries, rep.segments, rep.torn_tail_bytes), (7, 1, 0));
        assert_eq!(wal.first_index(), Some(1));
        assert_eq!(wal.last_index(), 7);
        assert_eq!(wal.last_term(), 3);
        assert_eq!(read_all(&wal, 0), before);
        assert_eq!(read_all(&wal, 4), before[3..].to_vec());
        assert_eq!(read_all(&wal, 8), vec![]);
        assert_eq!(wal.append_next(3, b"eight").unwrap(), 8);
        wal.sync().unwrap();
        drop(wal);

        let (wal, rep) = Wal::open(dir, 1 << 20).unwrap();
        assert_eq!(rep.entries, 8);
        assert_eq!(read_all(&wal, 8)[0].payload, b"eight".to_vec());
        assert_eq!(verify(dir).unwrap().entries, 8);
    }

    #[test]
    fn rotation_many_segments_and_read_from_anywhere() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let n = 60;
        let wal = build(dir, 100, n);
        let files = seg_files(dir);
        assert!(files.len() >= 10, "only {} segments", files.len());
        assert_eq!(wal.segment_count(), files.len());
        let total: u64 = files.iter().map(|p| fs::metadata(p).unwrap().len()).sum();
        assert_eq!(wal.size_bytes(), total);
        // File names give each segment's first index; segments roll once >= 100 bytes.
        let mut next = 1;
        for (i, p) in files.iter().enumerate() {
            assert_eq!(p, &segment_path(dir, next));
            let spans = record_spans(p);
            assert!(!spans.is_empty());
            let len = fs::metadata(p).unwrap().len();
            if i + 1 < files.len() {
                let last_start = spans.last().unwrap().0;
                assert!(
                    last_start < 100 && len >= 100,
                    "segment {p:?} rolled wrongly"
                );
            }
            next += spans.len() as u64;
        }
        assert_eq!(next, n + 1);
        let all = entries(1..=n);
        let check = |wal: &Wal| {
            for from in [0, 1, 2, 3, 4, 5, 17, 29, 30, 31, 45, 59, 60] {
                let start = from.max(1) as usize - 1;
                assert_eq!(read_all(wal, from), all[start..].to_vec(), "from {from}");
            }
            assert_eq!(read_all(wal, 61), vec![]);
            // Every segment boundary.
            for p in seg_files(dir) {
                let first: u64 = p.file_stem().unwrap().to_str().unwrap().parse().unwrap();
                assert_eq!(read_all(wal, first)[0].index, first);
            }
        };
        check(&wal);
        drop(wal);
        let (wal, rep) = Wal::open(dir, 100).unwrap();
        assert_eq!((rep.entries, rep.segments), (n, files.len()));
        check(&wal);
        // Iteration is lazy: taking a few works without reading the rest.
        let first3: Vec<u64> = wal
            .read_from(10)
            .unwrap()
            .take(3)
            .map(|e| e.unwrap().index)
            .collect();
        assert_eq!(first3, vec![10, 11, 12]);
    }

    #[test]
    fn batch_spanning_a_roll_and_zero_segment_bytes() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let (mut wal, _) = Wal::open(dir, 0).unwrap();
        wal.append(&entries(1..=4)).unwrap();
        wal.sync().unwrap();
        assert_eq!(wal.segment_count(), 4);
        drop(wal);
        let (mut wal, rep) = Wal::open(dir, 120).unwrap();
        assert_eq!((rep.entries, rep.segments), (4, 4));
        wal.append(&entries(5..=20)).unwrap();
        wal.sync().unwrap();
        assert!(wal.segment_count() > 5);
        assert_eq!(read_all(&wal, 1), entries(1..=20));
        drop(wal);
        let (wal, rep) = Wal::open(dir, 120).unwrap();
        assert_eq!(rep.entries, 20);
        assert_eq!(read_all(&wal, 3), entries(3..=20));
    }

    #[test]
    fn purge_then_read_from_and_reopen() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let mut wal = build(dir, 100, 40);
        let segs = wal.segment_count();
        let firsts: Vec<u64> = seg_files(dir)
            .iter()
            .map(|p| p.file_stem().unwrap().to_str().unwrap().parse().unwrap())
            .collect();
        // Nothing whose segment still holds an index > upto goes.
        assert_eq!(wal.purge_upto(0).unwrap(), 0);
        assert_eq!(wal.purge_upto(firsts[1] - 2).unwrap(), 0);
        assert_eq!(wal.purge_upto(firsts[1] - 1).unwrap(), 1);
        assert_eq!(wal.first_index(), Some(firsts[1]));
        assert_eq!(wal.purge_upto(firsts[3] - 2).unwrap(), 1); // segment 2 whole, segment 3 not
        assert_eq!(wal.first_index(), Some(firsts[2]));
        assert_eq!(wal.segment_count(), segs - 2);
        wal.sync().unwrap();
        assert_eq!(read_all(&wal, firsts[2]), entries(firsts[2]..=40));
        assert_eq!(read_all(&wal, 1), entries(firsts[2]..=40)); // purged entries are gone
        assert_eq!(read_all(&wal, 33), entries(33..=40));
        // Everything but the active segment.
        let last_first = *firsts.last().unwrap();
        assert_eq!(wal.purge_upto(u64::MAX).unwrap(), segs - 3);
        assert_eq!(wal.segment_count(), 1);
        assert_eq!(wal.first_index(), Some(last_first));
        assert_eq!(wal.last_index(), 40);
        assert_eq!(wal.last_term(), 1);
        let total: u64 = seg_files(dir)
            .iter()
            .map(|p| fs::metadata(p).unwrap().len())
            .sum();
        assert_eq!(wal.size_bytes(), total);
        wal.sync().unwrap();
        drop(wal);
        let (mut wal, rep) = Wal::open(dir, 100).unwrap();
        assert_eq!(rep.segments, 1);
        assert_eq!(rep.entries, 40 - last_first + 1);
        assert_eq!(wal.first_index(), Some(last_first));
        assert_eq!(wal.last_index(), 40);
        assert_eq!(read_all(&wal, 0), entries(last_first..=40));
        assert_eq!(wal.append_next(1, &payload(41)).unwrap(), 41);
        wal.sync().unwrap();
        assert_eq!(read_all(&wal, 41), entries(41..=41));
    }

    /// Truncates the last record of the last segment to every length and checks recovery.
    fn torn_tail_every_cut(segment_bytes: u64, n: u64) {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        drop(build(&src, segment_bytes, n));
        let last = seg_files(&src).pop().unwrap();
        let (start, end) = *record_spans(&last).last().unwrap();
        let name = last.file_name().unwrap().to_owned();
        for cut in start..=end {
            let dir = tmp.path().join(format!("cut{cut}"));
            fs::create_dir(&dir).unwrap();
            for p in seg_files(&src) {
                fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
            }
            let seg = dir.join(&name);
            truncate(&seg, cut);
            let expect_n = if cut == end { n } else { n - 1 };
            let v = verify(&dir).unwrap();
            assert_eq!(v.torn_tail_bytes, if cut == end { 0 } else { cut - start });
            assert_eq!(
                fs::metadata(&seg).unwrap().len(),
                cut,
                "verify modified the file"
            );
            let (mut wal, rep) = Wal::open(&dir, segment_bytes).unwrap();
            assert_eq!(
                (rep.entries, rep.segments, rep.torn_tail_bytes),
                (v.entries, v.segments, v.torn_tail_bytes)
            );
            assert_eq!(rep.entries, expect_n, "cut {cut}");
            assert_eq!(
                fs::metadata(&seg).unwrap().len(),
                if cut == end { end } else { start }
            );
            assert_eq!(wal.last_index(), expect_n);
            assert_eq!(read_all(&wal, 1), entries(1..=expect_n), "cut {cut}");
            let next = wal.append_next(7, b"after crash").unwrap();
            assert_eq!(next, expect_n + 1);
            wal.sync().unwrap();
            drop(wal);
            let (wal, rep) = Wal::open(&dir, segment_bytes).unwrap();
            assert_eq!((rep.entries, rep.torn_tail_bytes), (expect_n + 1, 0));
            assert_eq!(wal.last_term(), 7);
            let got = read_all(&wal, 1);
            assert_eq!(got[..expect_n as usize], entries(1..=expect_n)[..]);
            assert_eq!(
                got[expect_n as usize],
                Entry {
                    index: next,
                    term: 7,
                    payload: b"after crash".to_vec()
                }
            );
        }
    }

    #[test]
    fn torn_tail_every_cut_mid_segment() {
        torn_tail_every_cut(1 << 20, 6);
    }

    #[test]
    fn torn_tail_every_cut_of_only_record_in_last_segment() {
        // segment_bytes 0: every record is alone in its segment, so cutting it at its start
        // leaves a header-only last segment whose name gives the next index.
        torn_tail_every_cut(0, 4);
    }

    #[test]
    fn torn_segment_header_is_rewritten() {
        for partial in [
            &b""[..],
            &b"PRL"[..],
            &b"PRLYWAL"[..],
            &[0u8; 5][..],
            &[0u8; 8][..],
            &[0u8; 64][..],
        ] {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path();
            drop(build(dir, 1 << 20, 5));
            let new_seg = segment_path(dir, 6);
            fs::write(&new_seg, partial).unwrap();
            assert_eq!(verify(dir).unwrap().torn_tail_bytes, partial.len() as u64);
            let (mut wal, rep) = Wal::open(dir, 1 << 20).unwrap();
            assert_eq!(
                (rep.entries, rep.segments, rep.torn_tail_bytes),
                (5, 2, partial.len() as u64)
            );
            assert_eq!(fs::read(&new_seg).unwrap(), HEADER.to_vec());
            assert_eq!(wal.last_index(), 5);
            assert_eq!(wal.last_term(), 1);
            assert_eq!(wal.append_next(1, &payload(6)).unwrap(), 6);
            wal.sync().unwrap();
            drop(wal);
            let (wal, rep) = Wal::open(dir, 1 << 20).unwrap();
            assert_eq!((rep.entries, rep.segments), (6, 2));
            assert_eq!(read_all(&wal, 1), entries(1..=6));
        }
    }

    #[test]
    fn empty_last_segment_name_gives_next_index() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        // Only segment, empty, after a purge-like history: the log starts at 50.
        fs::write(segment_path(dir, 50), HEADER).unwrap();
        let (mut wal, rep) = Wal::open(dir, 1 << 20).unwrap();
        assert_eq!((rep.entries, rep.segments, rep.torn_tail_bytes), (0, 1, 0));
        assert_eq!(wal.first_index(), None);
        assert_eq!(wal.last_index(), 49);
        assert!(matches!(wal.append_next(1, b"x"), Ok(50)));
        assert!(matches!(
            wal.append(&[entry(52)]),
            Err(WalError::OutOfOrder {
                expected: 51,
                got: 52
            })
        ));
        wal.sync().unwrap();
        assert_eq!(wal.first_index(), Some(50));
        assert_eq!(seg_files(dir), vec![segment_path(dir, 50)]);
    }

    #[test]
    fn trailing_zeros_are_cut() {
        for zeros in [1usize, 7, 8, 30, 4096] {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path();
            drop(build(dir, 1 << 20, 5));
            let seg = seg_files(dir).pop().unwrap();
            let clean_len = fs::metadata(&seg).unwrap().len();
            let mut b = fs::read(&seg).unwrap();
            b.extend_from_slice(&vec![0u8; zeros]);
            fs::write(&seg, &b).unwrap();
            let (wal, rep) = Wal::open(dir, 1 << 20).unwrap();
            assert_eq!((rep.entries, rep.torn_tail_bytes), (5, zeros as u64));
            assert_eq!(fs::metadata(&seg).unwrap().len(), clean_len);
            assert_eq!(read_all(&wal, 1), entries(1..=5));
        }
        // The last record zeroed out entirely (size persisted, data not).
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        drop(build(dir, 1 << 20, 5));
        let seg = seg_files(dir).pop().unwrap();
        let (start, end) = *record_spans(&seg).last().unwrap();
        let mut b = fs::read(&seg).unwrap();
        b[start as usize..end as usize].fill(0);
        fs::write(&seg, &b).unwrap();
        let (_, rep) = Wal::open(dir, 1 << 20).unwrap();
        assert_eq!((rep.entries, rep.torn_tail_bytes), (4, end - start));
    }

    #[test]
    fn garbage_crc_of_last_record_ending_at_eof_is_torn() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        drop(build(dir, 1 << 20, 5));
        let seg = seg_files(dir).pop().unwrap();
        let (start, end) = *record_spans(&seg).last().unwrap();
        flip(&seg, end - 1);
        let (_, rep) = Wal::open(dir, 1 << 20).unwrap();
        assert_eq!((rep.entries, rep.torn_tail_bytes), (4, end - start));
    }

    #[test]
    fn flipped_byte_in_middle_record_is_corrupt_and_nothing_changes() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        drop(build(dir, 1 << 20, 6));
        let seg = seg_files(dir).pop().unwrap();
        let (start, end) = record_spans(&seg)[2];
        let original = snapshot(dir);
        // Every byte of the record: len, crc, index, term, payload.
        for at in start..end {
            flip(&seg, at);
            let damaged = snapshot(dir);
            assert_corrupt_at(verify(dir).unwrap_err(), &seg, start);
            assert_corrupt_at(Wal::open(dir, 1 << 20).unwrap_err(), &seg, start);
            assert_eq!(
                snapshot(dir),
                damaged,
                "open modified a corrupt log (byte {at})"
            );
            flip(&seg, at);
        }
        assert_eq!(snapshot(dir), original);
        // A zeroed middle record followed by valid records is corrupt too, not a torn tail.
        let mut b = fs::read(&seg).unwrap();
        b[start as usize..end as usize].fill(0);
        fs::write(&seg, &b).unwrap();
        assert_corrupt_at(Wal::open(dir, 1 << 20).unwrap_err(), &seg, start);
        assert_eq!(fs::read(&seg).unwrap(), b);
    }

    #[test]
    fn flipped_byte_in_last_record_of_non_last_segment_is_corrupt() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        drop(build(dir, 100, 20));
        let files = seg_files(dir);
        assert!(files.len() >= 3);
        let seg = &files[1];
        let (start, end) = *record_spans(seg).last().unwrap();
        for at in start..end {
            flip(seg, at);
            let damaged = snapshot(dir);
            assert_corrupt_at(Wal::open(dir, 100).unwrap_err(), seg, start);
            assert_corrupt_at(verify(dir).unwrap_err(), seg, start);
            assert_eq!(snapshot(dir), damaged);
            flip(seg, at);
        }
        // A truncated non-last segment is corrupt as well.
        truncate(seg, end - 3);
        assert_corrupt_at(Wal::open(dir, 100).unwrap_err(), seg, start);
        assert_eq!(fs::metadata(seg).unwrap().len(), end - 3);
        // And a bad header in a non-last segment.
        let tmp2 = tempfile::tempdir().unwrap();
        drop(build(tmp2.path(), 100, 20));
        let seg0 = seg_files(tmp2.path())[0].clone();
        flip(&seg0, 7);
        assert_corrupt_at(Wal::open(tmp2.path(), 100).unwrap_err(), &seg0, 0);
    }

    #[test]
    fn index_discontinuity_on_disk_is_corrupt() {
        // A missing middle segment.
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        drop(build(dir, 100, 20));
        let files = seg_files(dir);
        fs::remove_file(&files[1]).unwrap();
        let before = snapshot(dir);
        assert_corrupt_at(Wal::open(dir, 100).unwrap_err(), &files[2], 0);
        assert_corrupt_at(verify(dir).unwrap_err(), &files[2], 0);
        assert_eq!(snapshot(dir), before);

        // A record with a valid CRC but a wrong index (even as the last record).
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let (mut wal, _) = Wal::open(dir, 1 << 20).unwrap();
        wal.append(&entries(1..=3)).unwrap();
        wal.sync().unwrap();
        drop(wal);
        let seg = segment_path(dir, 1);
        let mut b = fs::read(&seg).unwrap();
        let rogue = {
            let mut w = Vec::new();
            let e = entry(9);
            let len = (16 + e.payload.len()) as u32;
            let mut h = crc32fast::Hasher::new();
            h.update(&len.to_le_bytes());
            h.update(&e.index.to_le_bytes());
            h.update(&e.term.to_le_bytes());
            h.update(&e.payload);
            w.extend_from_slice(&len.to_le_bytes());
            w.extend_from_slice(&h.finalize().to_le_bytes());
            w.extend_from_slice(&e.index.to_le_bytes());
            w.extend_from_slice(&e.term.to_le_bytes());
            w.extend_from_slice(&e.payload);
            w
        };
        let at = b.len() as u64;
        b.extend_from_slice(&rogue);
        fs::write(&seg, &b).unwrap();
        assert_corrupt_at(Wal::open(dir, 1 << 20).unwrap_err(), &seg, at);
        assert_eq!(fs::read(&seg).unwrap(), b);

        // A segment whose name does not match its first record.
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        drop(build(dir, 1 << 20, 3));
        fs::rename(segment_path(dir, 1), segment_path(dir, 2)).unwrap();
        assert_corrupt_at(
            Wal::open(dir, 1 << 20).unwrap_err(),
            &segment_path(dir, 2),
            8,
        );

        // Stray .wal names and unknown versions are refused; other files are ignored.
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        drop(build(dir, 1 << 20, 3));
        fs::write(dir.join("notes.txt"), b"hi").unwrap();
        assert_eq!(Wal::open(dir, 1 << 20).unwrap().1.entries, 3);
        fs::write(dir.join("backup.wal"), b"").unwrap();
        assert!(matches!(
            Wal::open(dir, 1 << 20),
            Err(WalError::Corrupt { .. })
        ));
        fs::remove_file(dir.join("backup.wal")).unwrap();
        let seg = segment_path(dir, 1);
        let mut b = fs::read(&seg).unwrap();
        b[7] = 2;
        fs::write(&seg, &b).unwrap();
        let err = Wal::open(dir, 1 << 20).unwrap_err();
        assert!(
            err.to_string().contains("unsupported log format version 2"),
            "{err}"
        );
    }

    #[test]
    fn out_of_order_appends_are_refused_and_write_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let (mut wal, _) = Wal::open(dir, 1 << 20).unwrap();
        assert!(matches!(
            wal.append(&[entry(5)]),
            Err(WalError::OutOfOrder {
                expected: 1,
                got: 5
            })
        ));
        assert_eq!(wal.segment_count(), 0);
        wal.append(&entries(1..=3)).unwrap();
        let size = wal.size_bytes();
        let batch = vec![entry(4), entry(5), entry(7)];
        let err = wal.append(&batch).unwrap_err();
        assert!(matches!(
            err,
            WalError::OutOfOrder {
                expected: 6,
                got: 7
            }
        ));
        assert_eq!(err.to_string(), "log entry index 7 where 6 was expected");
        assert!(matches!(
            wal.append(&[entry(3)]),
            Err(WalError::OutOfOrder {
                expected: 4,
                got: 3
            })
        ));
        assert_eq!(wal.last_index(), 3);
        assert_eq!(wal.size_bytes(), size);
        wal.sync().unwrap();
        assert_eq!(fs::metadata(segment_path(dir, 1)).unwrap().len(), size);
        wal.append(&entries(4..=5)).unwrap();
        assert_eq!(read_all(&wal, 1), entries(1..=5));
    }

    #[test]
    fn corrupt_len_field_in_middle_of_last_segment_is_not_a_torn_tail() {
        // A bit flip that makes a middle record's length run past EOF must not silently
        // cut the valid records after it.
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        drop(build(dir, 1 << 20, 6));
        let seg = segment_path(dir, 1);
        let (start, _) = record_spans(&seg)[4];
        let mut b = fs::read(&seg).unwrap();
        b[start as usize + 2] = 0x7F;
        fs::write(&seg, &b).unwrap();
        assert_corrupt_at(Wal::open(dir, 1 << 20).unwrap_err(), &seg, start);
        assert_eq!(fs::read(&seg).unwrap(), b);
    }

    #[test]
    fn verify_agrees_with_open() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        assert!(matches!(
            verify(&dir.join("missing")),
            Err(WalError::Io { .. })
        ));
        drop(build(dir, 100, 25));
        let v = verify(dir).unwrap();
        let (wal, rep) = Wal::open(dir, 100).unwrap();
        drop(wal);
        assert_eq!(
            (v.entries, v.segments, v.torn_tail_bytes),
            (rep.entries, rep.segments, rep.torn_tail_bytes)
        );
        assert_eq!(
            (v.entries, v.segments, v.torn_tail_bytes),
            (25, seg_files(dir).len(), 0)
        );

        // Torn: verify reports what open cuts and changes nothing.
        let last = seg_files(dir).pop().unwrap();
        let len = fs::metadata(&last).unwrap().len();
        truncate(&last, len - 5);
        let before = snapshot(dir);
        let v = verify(dir).unwrap();
        assert_eq!(snapshot(dir), before);
        let (_, rep) = Wal::open(dir, 100).unwrap();
        assert_eq!(
            (v.entries, v.segments, v.torn_tail_bytes),
            (rep.entries, rep.segments, rep.torn_tail_bytes)
        );
        assert_eq!(v.entries, 24);
        assert!(v.torn_tail_bytes > 0);
        assert_eq!(verify(dir).unwrap().torn_tail_bytes, 0);

        // Corrupt: both refuse with the same error.
        let first = seg_files(dir)[0].clone();
        flip(&first, 12);
        let a = verify(dir).unwrap_err().to_string();
        let b = Wal::open(dir, 100).unwrap_err().to_string();
        assert_eq!(a, b);
        assert!(a.contains("refusing to start"), "{a}");
    }

    #[test]
    fn torn_multi_entry_write_with_garbage_after_the_tear_is_a_torn_tail() {
        // One append of three entries torn inside the second, garbage after the tear (a disk
        // that extended the file but never wrote the rest). Seed 2730 of the crash rounds.
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let mut wal = build(dir, 1 << 20, 3);
        wal.append(&entries(4..=6)).unwrap();
        wal.sync().unwrap();
        drop(wal);
        let seg = segment_path(dir, 1);
        let spans = record_spans(&seg);
        let (start5, end5) = spans[4];
        let mut b = fs::read(&seg).unwrap();
        let tear = (start5 + end5) as usize / 2;
        for (i, x) in b[tear..].iter_mut().enumerate() {
            *x = (i as u8).wrapping_mul(151).wrapping_add(3) | 0x40;
        }
        fs::write(&seg, &b).unwrap();
        let (wal, rep) = Wal::open(dir, 1 << 20).unwrap();
        assert_eq!((rep.entries, rep.torn_tail_bytes), (4, b.len() as u64 - start5));
        assert_eq!(read_all(&wal, 1), entries(1..=4));
    }

    #[test]
    fn reopen_after_a_failed_fdatasync_cuts_back_to_the_last_synced_length() {
        let disk = disk::SimDisk::new(7);
        let dir = Path::new("/log");
        let (mut wal, _) = Wal::open_on(Arc::new(disk.clone()), dir, 1 << 20).unwrap();
        wal.append(&entries(1..=3)).unwrap();
        wal.sync().unwrap();
        let synced = wal.size_bytes();
        disk.set_fsync_failure_rate(1.0);
        wal.append(&entries(4..=4)).unwrap();
        assert!(wal.sync().is_err());
        assert!(wal.append(&entries(5..=5)).is_err(), "a log whose fdatasync failed must refuse appends");
        disk.set_fsync_failure_rate(0.0);
        // The page cache still holds entry 4 (marked clean, never written).
        assert_eq!(disk.read_file(&segment_path(dir, 1)).unwrap().len() as u64, synced + 8 + 16 + payload(4).len() as u64);
        let (mut wal, _) = wal.reopen().unwrap();
        assert_eq!(wal.last_index(), 3);
        assert_eq!(disk.read_file(&segment_path(dir, 1)).unwrap().len() as u64, synced);
        assert_eq!(wal.append_next(1, &payload(4)).unwrap(), 4);
        wal.sync().unwrap();
        disk.power_loss();
        let (wal, _) = Wal::open_on(Arc::new(disk.clone()), dir, 1 << 20).unwrap();
        assert_eq!(read_all(&wal, 1), entries(1..=4));
    }

    /// A log in `/log` on a fresh simulated disk (`seed`), 100-byte segments, entries 1..=40
    /// appended in batches of 3 and synced.
    fn sim_log_of_40(seed: u64) -> (disk::SimDisk, Wal) {
        let disk = disk::SimDisk::new(seed);
        let (mut wal, _) = Wal::open_on(Arc::new(disk.clone()), Path::new("/log"), 100).unwrap();
        for chunk in entries(1..=40).chunks(3) {
            wal.append(chunk).unwrap();
        }
        wal.sync().unwrap();
        (disk, wal)
    }

    #[test]
    fn purge_then_power_loss_never_leaves_a_gap() {
        // Seed 2252986785 of the crash rounds: unlinks fsync'd only at the end could come back
        // in any subset.
        for seed in 0..64 {
            let (disk, mut wal) = sim_log_of_40(seed);
            let dir = Path::new("/log");
            assert!(wal.segment_count() > 5);
            let last_first = wal.segments.last().unwrap().first_index;
            disk.fail_after(seed % 7);
            let _ = wal.purge_upto(u64::MAX);
            drop(wal);
            disk.power_loss();
            let (wal, _) = Wal::open_on(Arc::new(disk.clone()), dir, 100).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
            let first = wal.first_index().unwrap();
            assert!(first <= last_first, "seed {seed}");
            assert_eq!(read_all(&wal, 1), entries(first..=40), "seed {seed}");
        }
    }

    #[test]
    fn reader_snapshot_ignores_later_appends() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let mut wal = build(dir, 1 << 20, 3);
        let reader = wal.read_from(1).unwrap();
        wal.append(&entries(4..=5)).unwrap();
        let got: Vec<u64> = reader.map(|e| e.unwrap().index).collect();
        assert_eq!(got, vec![1, 2, 3]);
        assert_eq!(read_all(&wal, 1), entries(1..=5));
    }

    /// Entry `i` written in term `t` (a truncated suffix is rewritten in a later term).
    fn entry_in(i: u64, t: u64) -> Entry {
        Entry { index: i, term: t, payload: payload(i * 31 + t) }
    }

    #[test]
    fn truncate_from_cuts_mid_segment_at_a_segment_start_and_everything_and_survives_reopen() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let mut wal = build(dir, 100, 30);
        assert!(wal.segment_count() > 4);
        let starts: Vec<u64> = wal.segments.iter().map(|s| s.first_index).collect();
        // Mid-segment (not a segment start), then exactly at a later segment's start.
        let mid = (2..30).find(|i| !starts.contains(i) && *i > starts[1]).unwrap();
        wal.truncate_from(mid).unwrap();
        assert_eq!((wal.last_index(), wal.last_term()), (mid - 1, 1));
        let (mut wal, _) = Wal::open(dir, 100).unwrap();
        assert_eq!(read_all(&wal, 1), entries(1..=mid - 1));
        wal.truncate_from(starts[1]).unwrap();
        assert_eq!(wal.last_index(), starts[1] - 1);
        // New entries in a later term continue at the cut, durable after sync.
        let again: Vec<Entry> = (starts[1]..starts[1] + 5).map(|i| entry_in(i, 2)).collect();
        wal.append(&again).unwrap();
        wal.sync().unwrap();
        assert_eq!(wal.last_term(), 2);
        let (mut wal, rep) = Wal::open(dir, 100).unwrap();
        assert_eq!(rep.torn_tail_bytes, 0);
        let mut want = entries(1..=starts[1] - 1);
        want.extend(again);
        assert_eq!(read_all(&wal, 1), want);
        // Past the end: nothing; the whole log: an empty log that continues at 1.
        wal.truncate_from(1000).unwrap();
        assert_eq!(wal.last_index(), starts[1] + 4);
        wal.truncate_from(1).unwrap();
        assert_eq!((wal.last_index(), wal.last_term(), wal.first_index()), (0, 0, None));
        drop(wal);
        let (mut wal, _) = Wal::open(dir, 100).unwrap();
        assert_eq!((wal.last_index(), seg_files(dir).len()), (0, 1));
        wal.append(&entries(1..=2)).unwrap();
        wal.sync().unwrap();
        assert_eq!(read_all(&Wal::open(dir, 100).unwrap().0, 1), entries(1..=2));
    }

    #[test]
    fn truncate_below_the_first_entry_is_refused_and_changes_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let mut wal = build(dir, 100, 30);
        wal.purge_upto(10).unwrap();
        let first = wal.first_index().unwrap();
        assert!(first > 1);
        let before = snapshot(dir);
        let e = wal.truncate_from(first - 1).unwrap_err();
        assert!(matches!(&e, WalError::Io { source, .. } if source.kind() == io::ErrorKind::InvalidInput), "{e}");
        assert_eq!(snapshot(dir), before);
        wal.append_next(1, &payload(31)).unwrap();
        wal.sync().unwrap();
    }

    #[test]
    fn restart_at_empties_the_log_and_continues_there_after_reopen() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let mut wal = build(dir, 100, 30);
        assert!(wal.restart_at(30).is_err(), "not past the end");
        wal.restart_at(200).unwrap();
        // A log without entries may restart anywhere, lower too.
        wal.restart_at(100).unwrap();
        assert_eq!((wal.first_index(), wal.last_index(), seg_files(dir).len()), (None, 99, 1));
        drop(wal);
        let (mut wal, _) = Wal::open(dir, 100).unwrap();
        assert_eq!((wal.first_index(), wal.last_index()), (None, 99));
        wal.append(&[entry_in(100, 3), entry_in(101, 3)]).unwrap();
        wal.sync().unwrap();
        let (wal, _) = Wal::open(dir, 100).unwrap();
        assert_eq!(read_all(&wal, 1), vec![entry_in(100, 3), entry_in(101, 3)]);
    }

    #[test]
    fn truncate_and_restart_then_power_loss_leave_a_contiguous_log_and_what_returned_ok_holds() {
        for seed in 0..96 {
            let (disk, mut wal) = sim_log_of_40(seed);
            let dir = Path::new("/log");
            let restart = seed % 2 == 1;
            let from = 3 + seed % 30;
            disk.fail_after(seed % 9);
            let done = if restart { wal.restart_at(60).is_ok() } else { wal.truncate_from(from).is_ok() };
            drop(wal);
            disk.power_loss();
            let (wal, _) = Wal::open_on(Arc::new(disk.clone()), dir, 100).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
            let got = read_all(&wal, 1);
            if restart {
                if done {
                    assert_eq!((got.len(), wal.last_index()), (0, 59), "seed {seed}");
                } else {
                    // A suffix of the old log (or nothing, or the new empty log).
                    let first = got.first().map_or(41, |e| e.index);
                    assert_eq!(got, entries(first..=40).into_iter().take(got.len()).collect::<Vec<_>>(), "seed {seed}");
                    assert!(got.is_empty() || got.last().unwrap().index == 40, "seed {seed}");
                }
            } else {
                let last = got.last().map_or(0, |e| e.index);
                assert_eq!(got, entries(1..=last), "seed {seed}");
                assert!(last >= from - 1 && last <= 40, "seed {seed}: {last}");
                if done {
                    assert_eq!(last, from - 1, "seed {seed}");
                }
            }
        }
    }
}
