//! The Raft state machine: openraft's `RaftStateMachine` (storage v2) over parley's own
//! [`State`], with snapshots in parley's own snapshot format ([`crate::storage::snapshot`]).
//!
//! # Entries
//!
//! A normal entry's app data is one group-commit batch (a `storage::records::LogEntry`, see
//! [`Batch`](super::types::Batch)), applied with [`State::apply_recording`]: the entry's writes
//! and the Raft applied state ([`Recorded`]: the entry's log id and the last membership) land in
//! the same overlay layer, so the applied state is durable exactly when the state it describes is
//! (in sled, in snapshots) and [`RaftStateMachine::applied_state`] reads it back after a reopen.
//! A blank or membership entry is applied as an empty batch (`ts` 0, no command): it moves the
//! state's applied index and the recorded log id (and, for a membership, the recorded membership)
//! and changes nothing else.
//!
//! **Indexes.** [`State`] numbers what it applied 1, 2, 3, ... and refuses anything but
//! `applied() + 1`; the adapter always applies at `applied() + 1`. openraft applies the entries
//! after the last applied one, in order, without a gap (from index 0, or from a snapshot's last
//! log id), so the state's index is the Raft index + 1, the same numbering as the log store's WAL
//! (`cluster::log_store`). openraft's storage suite applies with gaps (a fresh state machine is
//! handed entry 3); such an entry is applied at `applied() + 1` all the same, with a warning, and
//! the state's index is then only a count. An entry at or below the last applied Raft index is
//! refused ([`crate::storage::StorageError::Sequence`]): applying it twice would apply its
//! commands twice.
//!
//! **Responses and effects.** [`RaftStateMachine::apply`] returns one [`Applied`] per entry, with
//! the commands' [`Outcome`](crate::storage::Outcome)s in order (what `Raft::client_write`
//! returns to the proposer). The entry's [`Effects`](crate::storage::Effects) (events for local
//! devices, revoked tokens) go to the [`Sink`] given to [`StateMachine::open`], called on the
//! applying thread right after each entry with commands, exactly like the single node's commit
//! thread does (`storage/pipeline.rs`); the sink must not block.
//!
//! # Layout (a directory, e.g. `DATA/raft-sm/`)
//!
//! - `state-{gen:020}/`: the live state (sled, [`State::open`]). A snapshot install restores
//!   into `state-{gen+1}.tmp/`, makes it durable, renames it to `state-{gen+1}/` (directory
//!   fsync'd), and only then switches; [`StateMachine::open`] uses the highest generation and
//!   deletes the others and any `.tmp`.
//! - `snapshots/{index:020}.snap`: parley's snapshot file of the state at its applied index
//!   (`storage/snapshot.rs`: blocks with CRC-32, a trailer with the record count), written by
//!   [`State::snapshot_recorded`]; this file is the Raft snapshot data, streamed as it is.
//! - `snapshots/{index:020}.raft`: its Raft metadata (openraft's `SnapshotMeta`: last log id,
//!   last membership, snapshot id): a version byte, postcard, CRC-32 (IEEE, little-endian) of the
//!   bytes before it; written to `.raft.tmp`, fsync'd, renamed, directory fsync'd. A snapshot
//!   counts only with both files; the newest such is the current one, the others are deleted.
//! - `snapshots/receiving-{n}.tmp`: a snapshot being received from the leader
//!   ([`RaftStateMachine::begin_receiving_snapshot`]); left-overs are deleted on open.
//!
//! # Snapshots (Raft paper §7; openraft 0.9 `RaftStateMachine` docs)
//!
//! A snapshot is never held whole in memory: it is written record by record from sled's tree
//! ([`State::snapshot_recorded`], which also reads the Raft applied state from that same
//! quiescent tree, so the metadata describes exactly the file), handed to openraft as an open
//! file, received into a file, and loaded into sled in batches. `install_snapshot` fsyncs the
//! received file, checks every checksum and that the Raft applied state inside the file equals
//! the metadata the leader sent, renames it to its final name, writes the metadata, restores a
//! new state generation from it and swaps it in (see [`LiveState`]). A crash anywhere leaves the
//! old state or the new one: [`StateMachine::open`] finishes an install whose snapshot is newer
//! than the state it finds, which also covers a state whose sled lost (after a power loss)
//! entries that a snapshot of this node already holds, when the log below it may be purged.
//!
//! **Swapping the state.** The adapter owns the live [`State`] in a [`LiveState`] cell (a lock
//! around an `Arc<State>`); an install replaces the `Arc`. Readers (the server's queries) must
//! take [`LiveState::get`] per request: an `Arc<State>` kept longer keeps reading the
//! replaced state (consistent, but stale). The replaced generation is closed and deleted at once
//! when nobody else holds it, otherwise at the next open.
//!
//! All I/O is blocking and runs on tokio's blocking pool. A materializer thread
//! (`storage::pipeline::spawn_materializer`, started by the server) writes the applied entries
//! to sled off the apply path; sled is never fsync'd for the cluster's sake: the Raft log below
//! the newest snapshot is what recovery needs, and open restores this node's own snapshot when
//! sled lost entries it holds. Not here yet: rebuilding a damaged sled (today an open error; wipe
//! the node's data directory and it catches up from the leader).

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use openraft::storage::RaftStateMachine;
use openraft::{AnyError, BasicNode, EntryPayload, ErrorSubject, ErrorVerb, OptionalSend, RaftSnapshotBuilder, Snapshot, SnapshotMeta, StorageIOError, StoredMembership};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncSeekExt, AsyncWriteExt};

use super::types::{Applied, Entry, LogId, StorageError, TypeConfig};
use crate::storage::records::{self, LogEntry};
use crate::storage::store::full_key;
use crate::storage::trees::{TreeId, RAFT_APPLIED_KEY};
use crate::storage::{snapshot, LiveState, Sink, State, StorageError as LocalError};

/// Version byte in front of [`Recorded`] and of a snapshot's `.raft` metadata.
pub const FORMAT_VERSION: u8 = 1;
/// The snapshots' directory inside the state machine's directory.
const SNAPSHOTS: &str = "snapshots";
/// Bytes of the `.raft` file's CRC-32 trailer.
const CRC_LEN: usize = 4;

/// A snapshot's Raft metadata (openraft's `SnapshotMeta`: last log id, last membership, id).
type Meta = SnapshotMeta<u64, BasicNode>;

/// The Raft applied state the adapter stores with every entry (under `meta` `b"raft"`, through
/// [`State::apply_recording`]): what openraft's `applied_state` returns. Stored as
/// [`FORMAT_VERSION`] + postcard.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recorded {
    /// The log id of the last applied entry; `None` before the first.
    pub last: Option<LogId>,
    /// The membership of the last applied membership entry, with its log id.
    pub membership: StoredMembership<u64, BasicNode>,
}

impl Recorded {
    fn encode(&self) -> Result<Vec<u8>, LocalError> {
        postcard::to_extend(self, vec![FORMAT_VERSION]).map_err(|e| LocalError::Encode(e.to_string()))
    }

    fn decode(b: &[u8]) -> Result<Recorded, LocalError> {
        match b.split_first() {
            Some((&FORMAT_VERSION, body)) => postcard::from_bytes(body).map_err(|e| LocalError::Decode(format!("the Raft applied state: {e}"))),
            _ => Err(LocalError::Decode("the Raft applied state has an unknown format version".into())),
        }
    }

    /// What `state` recorded last (the default when it never recorded anything).
    fn of(state: &State) -> Result<Recorded, LocalError> {
        Ok(state.raft_applied()?.map(|b| Recorded::decode(&b)).transpose()?.unwrap_or_default())
    }
}

/// What the state machine and its snapshot builders share.
struct Core {
    /// The state machine's directory (see the module docs).
    dir: PathBuf,
    /// `dir/snapshots`.
    snapshots: PathBuf,
    /// sled's page cache for each state generation, bytes.
    cache_bytes: u64,
    live: LiveState,
    sink: Arc<dyn Sink>,
    /// The live state's generation. Held by whatever touches `snapshots/` or the generations
    /// (build, install, current), so they never interleave.
    files: Mutex<u64>,
    /// Files handed out by `begin_receiving_snapshot` and not installed yet.
    receiving: Mutex<Vec<PathBuf>>,
    /// Numbers the receiving files.
    next_receiving: AtomicU64,
    /// Who waits for the outcomes of this node's own proposals (set once by the node).
    waiters: std::sync::OnceLock<Arc<crate::cluster::node::Waiters>>,
}

/// parley's `RaftStateMachine` (see the module docs).
pub struct StateMachine {
    core: Arc<Core>,
}

/// The snapshot builder openraft runs beside the state machine: snapshots the live state as of
/// `build_snapshot`.
pub struct SnapshotBuilder {
    core: Arc<Core>,
}

fn io_err(path: &Path) -> impl Fn(io::Error) -> LocalError + '_ {
    move |e| LocalError::io(path, e)
}

fn sm_error(verb: ErrorVerb) -> impl Fn(LocalError) -> StorageError {
    move |e| StorageIOError::new(ErrorSubject::StateMachine, verb, AnyError::new(&e)).into()
}

fn snapshot_error(verb: ErrorVerb, meta: Option<&Meta>) -> impl Fn(LocalError) -> StorageError {
    let subject = ErrorSubject::Snapshot(meta.map(|m| m.signature()));
    move |e| StorageIOError::new(subject.clone(), verb, AnyError::new(&e)).into()
}

/// Runs `f` on tokio's blocking pool.
async fn blocking<T, F>(f: F) -> Result<T, StorageError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, StorageError> + Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => Err(sm_error(ErrorVerb::Write)(LocalError::io(Path::new("(state machine)"), io::Error::other(format!("the state machine's blocking task failed: {e}"))))),
    }
}

/// fsync of a directory.
fn sync_dir(dir: &Path) -> Result<(), LocalError> {
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir))
}

fn gen_dir(dir: &Path, gen: u64) -> PathBuf {
    dir.join(format!("state-{gen:020}"))
}

/// The `.raft` metadata file of snapshot file `snap`.
fn meta_path(snap: &Path) -> PathBuf {
    snap.with_extension("raft")
}

/// Writes `meta` as the metadata of snapshot file `snap`, durably (tmp, fsync, rename,
/// directory fsync; the directory fsync also makes an earlier rename of `snap` durable).
fn write_meta(snap: &Path, meta: &Meta) -> Result<(), LocalError> {
    let mut b = postcard::to_extend(meta, vec![FORMAT_VERSION]).map_err(|e| LocalError::Encode(e.to_string()))?;
    let crc = crc32fast::hash(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    let path = meta_path(snap);
    let tmp = snap.with_extension("raft.tmp");
    let f = std::fs::File::create(&tmp).map_err(io_err(&tmp))?;
    io::Write::write_all(&mut &f, &b).and_then(|()| f.sync_all()).map_err(io_err(&tmp))?;
    drop(f);
    std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// The metadata of snapshot file `snap`; `None` when it has none.
fn read_meta(snap: &Path) -> Result<Option<Meta>, LocalError> {
    let path = meta_path(snap);
    let b = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(LocalError::io(&path, e)),
    };
    let bad = |why: &str| LocalError::Decode(format!("{}: {why}", path.display()));
    if b.len() < 1 + CRC_LEN {
        return Err(bad("too short"));
    }
    let (body, crc) = b.split_at(b.len() - CRC_LEN);
    if crc32fast::hash(body).to_le_bytes() != crc {
        return Err(bad("CRC mismatch"));
    }
    if body[0] != FORMAT_VERSION {
        return Err(bad("unknown format version"));
    }
    postcard::from_bytes(&body[1..]).map(Some).map_err(|e| bad(&format!("cannot be decoded: {e}")))
}

/// The newest snapshot in `dir` that has its metadata.
fn newest(dir: &Path) -> Result<Option<(Meta, PathBuf)>, LocalError> {
    for s in snapshot::list(dir)? {
        match read_meta(&s.path) {
            Ok(Some(meta)) => return Ok(Some((meta, s.path))),
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "a snapshot's Raft metadata is damaged; ignoring the snapshot"),
        }
    }
    Ok(None)
}

/// Deletes every snapshot file and metadata file in `dir` but `keep`'s (temporary files of a
/// snapshot being written or received are left alone).
fn remove_snapshots_but(dir: &Path, keep: &Path) -> Result<(), LocalError> {
    let stem = keep.file_stem();
    for ent in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let p = ent.map_err(io_err(dir))?.path();
        let ours = p.extension().is_some_and(|x| x == "snap" || x == "raft");
        if ours && p.file_stem() != stem {
            std::fs::remove_file(&p).map_err(io_err(&p))?;
        }
    }
    sync_dir(dir)
}

/// Checks every checksum of the snapshot file at `path`, and that the Raft applied state it
/// holds is what `meta` says. Returns its applied index (parley's).
fn check_snapshot(path: &Path, meta: &Meta) -> Result<u64, LocalError> {
    let key = full_key(TreeId::Meta, RAFT_APPLIED_KEY);
    let mut raft = None;
    let (index, _) = snapshot::read(path, |k, v| {
        if k == key.as_slice() {
            raft = Some(v.to_vec());
        }
        Ok(())
    })?;
    let rec = raft.map(|b| Recorded::decode(&b)).transpose()?.unwrap_or_default();
    if rec.last != meta.last_log_id || rec.membership != meta.last_membership {
        return Err(LocalError::Decode(format!(
            "snapshot {}: holds Raft applied state {:?} with membership {:?}, but its metadata says {:?} with {:?}",
            path.display(),
            rec.last,
            rec.membership,
            meta.last_log_id,
            meta.last_membership
        )));
    }
    Ok(index)
}

/// Creates state generation `gen` in `dir` from the snapshot file `snap`, durably (restored into
/// `state-{gen}.tmp`, fsync'd, renamed, directory fsync'd), and opens it.
fn restore_generation(dir: &Path, gen: u64, snap: &Path, cache_bytes: u64) -> Result<State, LocalError> {
    let fin = gen_dir(dir, gen);
    let tmp = fin.with_extension("tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
    }
    State::restore_snapshot(&tmp, snap)?;
    std::fs::rename(&tmp, &fin).map_err(io_err(&fin))?;
    sync_dir(dir)?;
    Ok(State::open(&fin, cache_bytes)?)
}

/// Closes and deletes generation `gen` (`old`) when nobody else holds it; otherwise it stays
/// until the next open.
fn retire(dir: &Path, gen: u64, old: Arc<State>) {
    match Arc::try_unwrap(old) {
        Ok(state) => {
            drop(state);
            let d = gen_dir(dir, gen);
            if let Err(e) = std::fs::remove_dir_all(&d) {
                tracing::warn!(dir = %d.display(), error = %e, "could not delete a replaced state; it is deleted at the next open");
            }
        }
        Err(_) => tracing::info!(gen, "the replaced state is still read; it is deleted at the next open"),
    }
}

impl StateMachine {
    /// Opens (or creates) the state machine in `dir` (see the module docs). Blocking: call it
    /// before the Raft node starts or from a blocking thread.
    ///
    /// `cache_bytes` is sled's page cache (`storage.cache_bytes`); `sink` receives the effects
    /// of every applied entry with commands (it must not block).
    ///
    /// Deletes left-overs of an interrupted install or receive, and finishes an install a crash
    /// interrupted (a snapshot newer than the state, by Raft log id, is restored).
    ///
    /// # Errors
    /// A [`StorageError`] (state machine, read) wrapping the cause: sled or a file that cannot be
    /// opened or read, a damaged snapshot that must be restored.
    pub fn open(dir: &Path, cache_bytes: u64, sink: Arc<dyn Sink>) -> Result<StateMachine, StorageError> {
        Self::open_local(dir, cache_bytes, sink).map_err(sm_error(ErrorVerb::Read))
    }

    fn open_local(dir: &Path, cache_bytes: u64, sink: Arc<dyn Sink>) -> Result<StateMachine, LocalError> {
        let snapshots = dir.join(SNAPSHOTS);
        if !dir.is_dir() {
            std::fs::create_dir_all(dir).map_err(io_err(dir))?;
            sync_dir(dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")))?;
        }
        if !snapshots.is_dir() {
            std::fs::create_dir_all(&snapshots).map_err(io_err(&snapshots))?;
            sync_dir(dir)?;
        }
        let mut gens = Vec::new();
        for ent in std::fs::read_dir(dir).map_err(io_err(dir))? {
            let ent = ent.map_err(io_err(dir))?;
            let name = ent.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix("state-") else { continue };
            match rest.parse::<u64>() {
                Ok(g) => gens.push(g),
                Err(_) if rest.ends_with(".tmp") => std::fs::remove_dir_all(ent.path()).map_err(io_err(&ent.path()))?,
                Err(_) => {}
            }
        }
        let mut gen = gens.iter().copied().max().unwrap_or(0);
        for g in gens.into_iter().filter(|&g| g < gen) {
            let d = gen_dir(dir, g);
            std::fs::remove_dir_all(&d).map_err(io_err(&d))?;
        }
        for ent in std::fs::read_dir(&snapshots).map_err(io_err(&snapshots))? {
            let p = ent.map_err(io_err(&snapshots))?.path();
            if p.extension().is_some_and(|x| x == "tmp") {
                std::fs::remove_file(&p).map_err(io_err(&p))?;
            }
        }
        let mut state = State::open(&gen_dir(dir, gen), cache_bytes)?;
        if let Some((meta, path)) = newest(&snapshots)? {
            let have = Recorded::of(&state)?.last;
            if meta.last_log_id > have {
                tracing::warn!(
                    snapshot = ?meta.last_log_id,
                    state = ?have,
                    "the newest snapshot is ahead of the state (an interrupted install, or a state that lost unsynced entries): restoring it"
                );
                check_snapshot(&path, &meta)?;
                drop(state);
                state = restore_generation(dir, gen + 1, &path, cache_bytes)?;
                let d = gen_dir(dir, gen);
                std::fs::remove_dir_all(&d).map_err(io_err(&d))?;
                gen += 1;
            }
            remove_snapshots_but(&snapshots, &path)?;
        }
        let core = Core {
            dir: dir.to_owned(),
            snapshots,
            cache_bytes,
            live: LiveState::new(Arc::new(state)),
            sink,
            files: Mutex::new(gen),
            receiving: Mutex::new(Vec::new()),
            next_receiving: AtomicU64::new(0),
            waiters: std::sync::OnceLock::new(),
        };
        Ok(StateMachine { core: Arc::new(core) })
    }

    /// The live state, for readers (see [`LiveState`]).
    pub fn live(&self) -> LiveState {
        self.core.live.clone()
    }

    /// Hands the outcomes of the entries this node proposed (a [`Batch`](super::types::Batch)
    /// whose `origin` is `waiters.node()`) to `waiters` as they are applied, instead of
    /// returning them in [`Applied`]. Set once, before the Raft node starts.
    pub fn answer_to(&self, waiters: Arc<crate::cluster::node::Waiters>) {
        let _ = self.core.waiters.set(waiters);
    }
}

impl Core {
    /// Applies `entries` in order (see "Entries" in the module docs).
    fn apply(&self, entries: Vec<Entry>) -> Result<Vec<Applied>, StorageError> {
        let state = self.live.get();
        let mut rec = Recorded::of(&state).map_err(sm_error(ErrorVerb::Read))?;
        let mut out = Vec::with_capacity(entries.len());
        for e in entries {
            let log_id = e.log_id;
            let err = |e: LocalError| -> StorageError { StorageIOError::apply(log_id, AnyError::new(&e)).into() };
            if let Some(last) = rec.last.filter(|l| log_id.index <= l.index) {
                return Err(err(LocalError::Sequence { applied: last.index, got: log_id.index }));
            }
            let index = state.applied() + 1;
            if index != log_id.index + 1 {
                tracing::warn!(raft_index = log_id.index, state_index = index, "a Raft entry applied after a gap: the state's index is no longer the Raft index + 1");
            }
            rec.last = Some(log_id);
            let mut proposal = None;
            let batch = match e.payload {
                EntryPayload::Normal(b) => {
                    // Origin 0: a batch with no proposer (tests), never deduplicated.
                    proposal = (b.origin != 0).then_some((b.origin, b.id));
                    records::decode::<LogEntry>(&b.entry).map_err(err)?
                }
                EntryPayload::Blank => LogEntry { ts: 0, commands: Vec::new() },
                EntryPayload::Membership(m) => {
                    rec.membership = StoredMembership::new(Some(log_id), m);
                    LogEntry { ts: 0, commands: Vec::new() }
                }
            };
            let applied = match proposal {
                // A proposal re-sent to a new leader may be in the log twice: applied once.
                Some((origin, id)) => state.apply_batch_once(index, &batch, rec.encode().map_err(err)?, origin, id).map_err(err)?,
                None => Some(state.apply_recording(index, &batch, rec.encode().map_err(err)?).map_err(err)?),
            };
            let Some((outcomes, effects)) = applied else {
                tracing::debug!(raft_index = log_id.index, "a batch applied before was committed again; skipped");
                out.push(Applied { commands: 0, outcomes: Vec::new() });
                continue;
            };
            if !batch.commands.is_empty() {
                self.sink.committed(effects);
            }
            let outcomes = match (proposal, self.waiters.get()) {
                // This node proposed the batch: its clients are answered from this apply.
                (Some((origin, id)), Some(w)) if origin == w.node() => {
                    w.applied(id, outcomes);
                    Vec::new()
                }
                _ => outcomes,
            };
            out.push(Applied { commands: batch.commands.len() as u32, outcomes });
        }
        Ok(out)
    }

    /// Snapshots the live state into `snapshots/` with its metadata, makes it the current
    /// snapshot (deleting the others), and opens it.
    fn build(&self) -> Result<(Meta, std::fs::File), LocalError> {
        let _files = self.files.lock();
        let state = self.live.get();
        let (file, _records, raft) = state.snapshot_recorded(&self.snapshots)?;
        let rec = raft.map(|b| Recorded::decode(&b)).transpose()?.unwrap_or_default();
        let last = rec.last.map_or_else(|| "none".to_owned(), |l| l.to_string());
        let meta = SnapshotMeta { last_log_id: rec.last, last_membership: rec.membership, snapshot_id: format!("{}-{last}", file.index) };
        write_meta(&file.path, &meta)?;
        remove_snapshots_but(&self.snapshots, &file.path)?;
        let f = std::fs::File::open(&file.path).map_err(io_err(&file.path))?;
        Ok((meta, f))
    }

    /// The current snapshot, opened.
    fn current(&self) -> Result<Option<(Meta, std::fs::File)>, LocalError> {
        let _files = self.files.lock();
        let Some((meta, path)) = newest(&self.snapshots)? else { return Ok(None) };
        let f = std::fs::File::open(&path).map_err(io_err(&path))?;
        Ok(Some((meta, f)))
    }

    /// A new, empty receiving file (read + write), remembered.
    fn new_receiving(&self) -> Result<(PathBuf, std::fs::File), LocalError> {
        let n = self.next_receiving.fetch_add(1, Ordering::Relaxed);
        let path = self.snapshots.join(format!("receiving-{n}.tmp"));
        let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).map_err(io_err(&path))?;
        self.receiving.lock().push(path.clone());
        Ok((path, f))
    }

    /// Installs the received snapshot file `tmp` (fsync'd) with `meta` (see "Snapshots" in the
    /// module docs).
    fn install(&self, meta: &Meta, tmp: &Path) -> Result<(), LocalError> {
        let mut gen = self.files.lock();
        let index = match check_snapshot(tmp, meta) {
            Ok(i) => i,
            Err(e) => {
                let _ = std::fs::remove_file(tmp);
                return Err(e);
            }
        };
        let path = self.snapshots.join(format!("{index:020}.snap"));
        std::fs::rename(tmp, &path).map_err(io_err(&path))?;
        write_meta(&path, meta)?;
        let state = restore_generation(&self.dir, *gen + 1, &path, self.cache_bytes)?;
        *gen += 1;
        let old = self.live.replace(Arc::new(state));
        retire(&self.dir, *gen - 1, old);
        remove_snapshots_but(&self.snapshots, &path)
    }
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    /// Snapshots the live state (parley's snapshot file plus its Raft metadata) and makes it the
    /// current snapshot. The returned file is open for reading at its start.
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let core = self.core.clone();
        let (meta, f) = blocking(move || core.build().map_err(snapshot_error(ErrorVerb::Write, None))).await?;
        Ok(Snapshot { meta, snapshot: Box::new(tokio::fs::File::from_std(f)) })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership<u64, BasicNode>), StorageError> {
        let live = self.core.live.clone();
        let rec = blocking(move || Recorded::of(&live.get()).map_err(sm_error(ErrorVerb::Read))).await?;
        Ok((rec.last, rec.membership))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Applied>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let core = self.core.clone();
        blocking(move || core.apply(entries)).await
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder { core: self.core.clone() }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<tokio::fs::File>, StorageError> {
        let core = self.core.clone();
        let (_, f) = blocking(move || core.new_receiving().map_err(snapshot_error(ErrorVerb::Write, None))).await?;
        Ok(Box::new(tokio::fs::File::from_std(f)))
    }

    /// Installs a snapshot. `snapshot` is normally the file `begin_receiving_snapshot` returned
    /// (recognised by device and inode), which is fsync'd and renamed; any other file (openraft's
    /// storage suite hands over the leader's own) is copied into a receiving file first, from
    /// its start.
    async fn install_snapshot(&mut self, meta: &Meta, mut snapshot: Box<tokio::fs::File>) -> Result<(), StorageError> {
        let err = snapshot_error(ErrorVerb::Write, Some(meta));
        let file_err = |p: &Path, e: io::Error| err(LocalError::io(p, e));
        let here = Path::new("(received snapshot)");
        snapshot.flush().await.map_err(|e| file_err(here, e))?;
        let md = snapshot.metadata().await.map_err(|e| file_err(here, e))?;
        let candidates = self.core.receiving.lock().clone();
        let mut ours = None;
        for p in candidates {
            if tokio::fs::metadata(&p).await.is_ok_and(|m| (m.dev(), m.ino()) == (md.dev(), md.ino())) {
                ours = Some(p);
                break;
            }
        }
        let tmp = match ours {
            Some(p) => {
                snapshot.sync_all().await.map_err(|e| file_err(&p, e))?;
                p
            }
            None => {
                let core = self.core.clone();
                let (p, f) = blocking(move || core.new_receiving().map_err(snapshot_error(ErrorVerb::Write, None))).await?;
                let mut f = tokio::fs::File::from_std(f);
                snapshot.seek(io::SeekFrom::Start(0)).await.map_err(|e| file_err(here, e))?;
                tokio::io::copy(&mut *snapshot, &mut f).await.map_err(|e| file_err(&p, e))?;
                f.flush().await.map_err(|e| file_err(&p, e))?;
                f.sync_all().await.map_err(|e| file_err(&p, e))?;
                p
            }
        };
        drop(snapshot);
        self.core.receiving.lock().retain(|p| p != &tmp);
        let core = self.core.clone();
        let meta = meta.clone();
        blocking(move || core.install(&meta, &tmp).map_err(snapshot_error(ErrorVerb::Write, Some(&meta)))).await
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let core = self.core.clone();
        let current = blocking(move || core.current().map_err(snapshot_error(ErrorVerb::Read, None))).await?;
        Ok(current.map(|(meta, f)| Snapshot { meta, snapshot: Box::new(tokio::fs::File::from_std(f)) }))
    }
}
