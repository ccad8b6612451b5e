//! The state machine: `apply(entry)` to the tables of [`Store`], and the read queries (sync,
//! history, conversations, groups, auth).
//!
//! **Invariant:** apply is deterministic. It reads only the entry and the tables: no clock, no
//! randomness, no configuration (limits that apply enforces travel inside the command). The
//! writes of one entry reach the store's in-memory overlay at once, together with the new applied
//! index; the materializer writes many entries to sled as one atomic batch with the index they
//! cover, so after a crash sled holds the state after some whole entry, and recovery re-applies
//! the rest of the log.
//!
//! **Invariant:** `seq` per conversation and `ev` per user are assigned here, 1, 2, 3, ... with
//! no gaps.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;

use sled::IVec;

use super::hot::{self, Hot};
use super::keys;
use super::records::*;
use super::store::{self, be_u64, full_key, Layer, Store, STATE_TREE};
use super::trees::TreeId;
use super::StorageError;
use crate::protocol::ids::Conv;
use crate::protocol::{
    ConversationItem, EventPayload, GroupAction, GroupView, MessageView, ReadMarkerView, ReceiptStatus,
    ReceiptView,
};

/// Why apply refused a command. The command stays in the log and is refused again on replay;
/// nothing of it reaches the state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// `register` of an existing user.
    UserExists,
    /// A named user does not exist.
    UnknownUser(String),
    /// The user is not a member of the conversation.
    NotMember,
    /// The request needs a group admin.
    NotAdmin,
    /// A group would exceed its size cap.
    TooLarge(String),
    /// Anything else malformed.
    BadRequest(String),
    /// Unknown user at login.
    Unauthorized,
}

/// What one command did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Done; nothing to return.
    Done,
    /// A message is `seq` of `conv` at `ts`; `duplicate` when answered from the dedup record.
    Sent { conv: String, seq: u64, ts: u64, duplicate: bool },
    /// A group was created.
    GroupCreated { group: String },
    /// Retention deleted `deleted` messages; `next` is where the next purge resumes (None: done).
    Purged { deleted: u32, next: Option<String> },
    /// Refused; see [`Refusal`].
    Refused(Refusal),
}

/// A page of a user's event stream.
#[derive(Debug, Clone, Default)]
pub struct EventsPage {
    /// (ev, payload) in ev order.
    pub events: Vec<(u64, EventPayload)>,
    /// The highest ev read (returned or skipped); `after` when nothing was read.
    pub scanned_to: u64,
}

/// One page of history.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HistoryPage {
    /// Ascending seq.
    pub messages: Vec<MessageView>,
    /// Older visible messages exist.
    pub more: bool,
    /// The page reached messages deleted by retention: every seq up to this one.
    pub deleted_upto: Option<u64>,
}

/// An event appended to a user's stream, for live delivery after the batch is durable.
#[derive(Debug, Clone)]
pub struct Pushed {
    /// Whose stream.
    pub user: String,
    /// Its position.
    pub ev: u64,
    /// The payload as clients see it; shared between the members of a fan-out.
    pub payload: Arc<EventPayload>,
}

/// Side effects of applying entries, handed to the registry after the commit.
#[derive(Debug, Default)]
pub struct Effects {
    /// New events, in ev order per user.
    pub events: Vec<Pushed>,
    /// Revoked tokens: (user, token hash); their sockets close with 4001.
    pub revoked: Vec<(String, TokenHash)>,
}

/// The state machine: apply into the in-memory overlay of [`Store`], materialized into sled off
/// the ack path.
pub struct State {
    db: sled::Db,
    store: Store,
    dir: PathBuf,
    /// Apply's hot state; locked by apply only (on the commit thread, so never contended).
    hot: parking_lot::Mutex<Hot>,
    /// Client message ids stored lately, for the sessions' early duplicate check.
    ids: super::idfilter::IdFilter,
    /// Set by tests that simulate a crash: drop without writing the overlay to sled.
    crash_on_drop: std::sync::atomic::AtomicBool,
}

impl Drop for State {
    /// A clean close writes what is still in memory to sled (a crash does not, and start-up
    /// replays it from the log).
    fn drop(&mut self) {
        if self.crash_on_drop.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        if let Err(e) = self.store.materialize().and_then(|_| self.db.flush().map_err(StorageError::from)) {
            tracing::warn!(error = %e, "closing the state: could not write it to sled; the log will be replayed at start");
        }
    }
}

const DELIVERED: u8 = 0;
const READ: u8 = 1;

impl State {
    /// Opens (creating) the state in `dir` with a page cache of `cache_bytes`. A database of
    /// this process just closed is waited for ([`store::open_sled`], at most 5 s).
    pub fn open(dir: &Path, cache_bytes: u64) -> Result<State, StorageError> {
        std::fs::create_dir_all(dir).map_err(|e| StorageError::io(dir, e))?;
        let db = store::open_sled(&sled::Config::new().path(dir).cache_capacity(cache_bytes))?;
        let store = Store::open(&db, dir)?;
        Ok(State { db, store, dir: dir.to_owned(), hot: Default::default(), ids: Default::default(), crash_on_drop: Default::default() })
    }

    /// Index of the last applied log entry (0: none).
    pub fn applied(&self) -> u64 {
        self.store.applied()
    }

    /// Index of the last entry whose writes are all in sled (≤ [`applied`](Self::applied)).
    pub fn materialized(&self) -> u64 {
        self.store.materialized()
    }

    /// Writes what apply left in memory to sled, as one atomic batch (see [`Store`]). Returns
    /// the materialized index. Called by the materializer thread, and before checkpoints.
    pub fn materialize(&self) -> Result<u64, StorageError> {
        self.store.materialize()
    }

    /// [`materialize`](Self::materialize) with the sled writes on `writer`'s thread.
    pub fn materialize_with(&self, writer: Option<&super::store::IdleWriter>) -> Result<u64, StorageError> {
        self.store.materialize_with(writer)
    }

    /// Drops the state as a crash would: what is not materialized yet is lost (tests).
    #[cfg(test)]
    pub(crate) fn crash(self) {
        self.crash_on_drop.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Writes a snapshot of the whole state into `dir` (see [`snapshot`](super::snapshot)):
    /// materializes, then copies sled's tree while the materializer waits (apply goes on in
    /// memory meanwhile). Returns the file and its record count.
    pub fn snapshot(&self, dir: &Path) -> Result<(super::snapshot::SnapshotFile, u64), StorageError> {
        self.store.quiescent(|tree, index| super::snapshot::write(dir, index, tree.iter().map(|kv| kv.map_err(StorageError::from))))
    }

    /// [`snapshot`](Self::snapshot), also returning what [`apply_recording`](Self::apply_recording)
    /// stored as of the snapshot's index (`None`: never), read from the same quiescent tree the
    /// file is copied from, so it describes exactly the state in the file whatever apply does
    /// meanwhile. For the cluster's snapshots (the Raft metadata beside the file); a single node
    /// never calls it.
    pub fn snapshot_recorded(&self, dir: &Path) -> Result<(super::snapshot::SnapshotFile, u64, Option<Vec<u8>>), StorageError> {
        self.store.quiescent(|tree, index| {
            let raft = tree.get(full_key(TreeId::Meta, super::trees::RAFT_APPLIED_KEY))?.map(|v| v.to_vec());
            let (file, records) = super::snapshot::write(dir, index, tree.iter().map(|kv| kv.map_err(StorageError::from)))?;
            Ok((file, records, raft))
        })
    }

    /// Creates the state in `dir` (which must not hold one) from a snapshot file, durably, and
    /// returns its applied index. The log after that index is replayed by [`open`](super::open).
    pub fn restore_snapshot(dir: &Path, file: &Path) -> Result<u64, StorageError> {
        std::fs::create_dir_all(dir).map_err(|e| StorageError::io(dir, e))?;
        let db = store::open_sled(&sled::Config::new().path(dir))?;
        let index = store::load_snapshot(&db.open_tree(STATE_TREE)?, file)?;
        db.flush()?;
        drop(db);
        store::fsync_tree(dir)?;
        Ok(index)
    }

    /// Keys applied but not yet in sled.
    pub fn dirty_keys(&self) -> usize {
        self.store.dirty_keys()
    }

    /// How full the overlay is, in keys (keys or bytes waiting, see [`Store::fill`]).
    pub fn fill(&self) -> usize {
        self.store.fill()
    }

    /// Applies log entry `index` (which must be `applied() + 1`). Returns one outcome per command.
    pub fn apply(&self, index: u64, entry: &LogEntry) -> Result<(Vec<Outcome>, Effects), StorageError> {
        self.apply_with(index, entry, Vec::new())
    }

    /// Applies log entry `index` like [`apply`](Self::apply), and stores `raft` (opaque bytes)
    /// under `meta` `b"raft"` in the same layer as the entry's own writes. The cluster's state
    /// machine keeps there the Raft log id it applied last and the membership (openraft's
    /// `RaftStateMachine::applied_state`), so they are durable exactly when the state they
    /// describe is: with the applied index, in the overlay, in sled, in snapshots. A single
    /// node never calls it.
    ///
    /// # Errors
    /// As [`apply`](Self::apply); then `raft` is not stored either.
    pub fn apply_recording(&self, index: u64, entry: &LogEntry, raft: Vec<u8>) -> Result<(Vec<Outcome>, Effects), StorageError> {
        self.apply_with(index, entry, vec![(super::trees::RAFT_APPLIED_KEY.to_vec(), Some(raft))])
    }

    /// [`apply_recording`](Self::apply_recording) of a batch named `(origin, id)` (a cluster
    /// node's proposal): when a batch of that name was applied in the last
    /// [`RAFT_BATCH_WINDOW`](super::trees::RAFT_BATCH_WINDOW) entries, its commands are **not**
    /// applied again (the entry only moves the applied index and the Raft record) and `None` is
    /// returned. The name is recorded in the same layer as the entry's writes, and the name
    /// recorded `RAFT_BATCH_WINDOW` entries earlier is forgotten, so every node decides alike.
    pub fn apply_batch_once(&self, index: u64, entry: &LogEntry, raft: Vec<u8>, origin: u64, id: u64) -> Result<Option<(Vec<Outcome>, Effects)>, StorageError> {
        use super::trees::{RAFT_APPLIED_KEY, RAFT_BATCH_AT_PREFIX, RAFT_BATCH_PREFIX, RAFT_BATCH_WINDOW};
        let mut name = Vec::with_capacity(16);
        name.extend_from_slice(&origin.to_be_bytes());
        name.extend_from_slice(&id.to_be_bytes());
        let by_name = |n: &[u8]| [RAFT_BATCH_PREFIX, n].concat();
        let at = |i: u64| [RAFT_BATCH_AT_PREFIX, &i.to_be_bytes()[..]].concat();
        // Applied within the window: the record is younger than RAFT_BATCH_WINDOW entries (the
        // one exactly that old is forgotten by this very entry, below).
        let duplicate = match self.store.get(TreeId::Meta, &by_name(&name))? {
            Some(v) => <[u8; 8]>::try_from(&v[..]).map(u64::from_be_bytes).is_ok_and(|at| at + RAFT_BATCH_WINDOW > index),
            None => false,
        };
        let mut meta = vec![(RAFT_APPLIED_KEY.to_vec(), Some(raft))];
        if !duplicate {
            meta.push((by_name(&name), Some(index.to_be_bytes().to_vec())));
            meta.push((at(index), Some(name.clone())));
        }
        if let Some(old) = index.checked_sub(RAFT_BATCH_WINDOW).filter(|&i| i > 0) {
            if let Some(old_name) = self.store.get(TreeId::Meta, &at(old))? {
                // Unless it is this very batch again, just recorded anew above.
                if old_name[..] != name[..] {
                    meta.push((by_name(&old_name), None));
                }
                meta.push((at(old), None));
            }
        }
        if duplicate {
            let empty = LogEntry { ts: entry.ts, commands: Vec::new() };
            self.apply_with(index, &empty, meta)?;
            return Ok(None);
        }
        self.apply_with(index, entry, meta).map(Some)
    }

    /// What [`apply_recording`](Self::apply_recording) stored last, as of the last applied
    /// entry; `None` if it never ran.
    pub fn raft_applied(&self) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.store.get(TreeId::Meta, super::trees::RAFT_APPLIED_KEY)?.map(|v| v.to_vec()))
    }

    /// Applies `entry` at `index`, with `meta` (raw `meta`-table keys and values, `None` to
    /// delete) written in the same layer.
    fn apply_with(&self, index: u64, entry: &LogEntry, meta: Vec<(Vec<u8>, Option<Vec<u8>>)>) -> Result<(Vec<Outcome>, Effects), StorageError> {
        let applied = self.applied();
        if index != applied + 1 {
            return Err(StorageError::Sequence { applied, got: index });
        }
        let mut hot = self.hot.lock();
        hot.trim();
        let mut a = Applier {
            // Up to 8 writes per command (a 1:1 send makes 6; a group one, one per member and
            // more): sized once rather than rehashed as it grows.
            tx: Tx { store: &self.store, writes: Writes::with_capacity_and_hasher(entry.commands.len() * 8, Default::default()), hot: &mut hot, ids: &self.ids },
            ts: entry.ts,
            index,
            position: 0,
            effects: Effects::default(),
            receipts: BTreeMap::new(),
        };
        let mut outcomes = Vec::with_capacity(entry.commands.len());
        let applied = entry.commands.iter().enumerate().try_for_each(|(i, c)| {
            a.position = i as u64;
            outcomes.push(a.command(c)?);
            Ok(())
        });
        if let Err(e) = applied.and_then(|()| a.flush_receipts()) {
            // Nothing of the entry reached the store; what the cache saw of it must go too.
            a.tx.hot.clear();
            return Err(e);
        }
        let Applier { tx, effects, .. } = a;
        let mut writes = tx.writes;
        for (k, v) in meta {
            writes.insert(full_key(TreeId::Meta, &k), v.map(IVec::from));
        }
        self.store.merge(index, writes);
        match store::slowdown(self.store.fill()) {
            // The materializer is behind: slow down, then wait for it, rather than grow without
            // bound. The entry is applied already, so a failure here is not the entry's: the
            // materializer retries.
            Some(pause) if pause.is_zero() => {}
            Some(pause) => std::thread::sleep(pause),
            None => {
                if let Err(e) = self.store.wait_below(store::MAX_DIRTY_KEYS, std::time::Duration::from_secs(5)) {
                    tracing::error!(error = %e, "materializing the state into sled failed; retrying later");
                }
            }
        }
        Ok((outcomes, effects))
    }

    /// Makes everything applied so far durable in sled's own files: `flush()`, then fsync of every
    /// file and directory of sled (its flush uses `sync_file_range`, which is not enough).
    /// Returns the applied index that is now durable; log entries up to it may be deleted.
    pub fn checkpoint(&self) -> Result<u64, StorageError> {
        let upto = self.store.materialize()?;
        self.db.flush()?;
        store::fsync_tree(&self.dir)?;
        Ok(upto)
    }

    /// Writes a consistent copy of the state into `dir` (`dir/state`, a fresh sled database with
    /// every tree, and `dir/wal`, an empty log that continues after the copied applied index),
    /// plus `dir/BACKUP.json`. The caller guarantees that nothing is applied meanwhile (the commit
    /// thread between batches, or an admin command holding the data directory lock). Returns the
    /// applied index of the copy.
    pub fn backup_to(&self, dir: &Path) -> Result<u64, StorageError> {
        let applied = self.store.materialize()?;
        let target = dir.join("state");
        if target.exists() || dir.join("wal").exists() {
            return Err(StorageError::io(dir, std::io::Error::new(std::io::ErrorKind::AlreadyExists, "the backup directory is not empty")));
        }
        std::fs::create_dir_all(dir).map_err(|e| StorageError::io(dir, e))?;
        let db = store::open_sled(&sled::Config::new().path(&target))?;
        for name in [STATE_TREE, "presence_last_seen"] {
            let (src, dst) = (self.db.open_tree(name)?, db.open_tree(name)?);
            let mut batch = sled::Batch::default();
            let mut n = 0;
            for kv in src.iter() {
                let (k, v) = kv?;
                batch.insert(k, v);
                n += 1;
                if n % 10_000 == 0 {
                    dst.apply_batch(std::mem::take(&mut batch))?;
                }
            }
            dst.apply_batch(batch)?;
        }
        db.flush()?;
        drop(db);
        store::fsync_tree(&target)?;
        super::wal::create_empty_at(&dir.join("wal"), applied + 1)?;
        let manifest = serde_json::json!({
            "applied_index": applied,
            "format_version": FORMAT_VERSION,
            "created_ms": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0),
        });
        let mpath = dir.join("BACKUP.json");
        std::fs::write(&mpath, manifest.to_string()).map_err(|e| StorageError::io(&mpath, e))?;
        store::fsync_tree(dir)?;
        // And the backup directory's own name, in its parent.
        let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::File::open(parent).and_then(|d| d.sync_all()).map_err(|e| StorageError::io(parent, e))?;
        Ok(applied)
    }

    /// Every key and value of every log-derived tree, in tree and key order (for verify and tests).
    pub fn dump(&self) -> Result<Vec<Vec<(Vec<u8>, Vec<u8>)>>, StorageError> {
        self.store.materialize()?;
        TreeId::ALL
            .iter()
            .map(|&t| Ok(self.store.table(t)?.into_iter().map(|(k, v)| (k, v.to_vec())).collect()))
            .collect()
    }

    /// Checks the state's own invariants; returns a list of problems (empty: consistent).
    /// Seqs gapless per conversation (above what retention deleted), events gapless per user,
    /// every message event pointing at a stored or purged message, cursors within the head,
    /// every dedup record pointing at a stored seq.
    pub fn check_invariants(&self) -> Result<Vec<String>, StorageError> {
        let mut problems = Vec::new();
        for (k, v) in self.store.table(TreeId::ConvMeta)? {
            let conv = String::from_utf8_lossy(&k).into_owned();
            let meta: ConvMeta = decode(&v)?;
            let seqs: Vec<u64> = self
                .store
                .scan_prefix(TreeId::ConvSeqMessage, &keys::prefix(&conv), usize::MAX, None)?
                .into_iter()
                .map(|(k, _)| keys::num_suffix(&k).unwrap_or(0))
                .collect();
            let want: Vec<u64> = (meta.purged_to + 1..=meta.last_seq).collect();
            if seqs != want {
                problems.push(format!("{conv}: stored seqs are not {}..={}", meta.purged_to + 1, meta.last_seq));
            }
        }
        // Each user's events, in key order: user by user, ev by ev.
        let mut user = String::new();
        let mut expect = 1;
        for (k, v) in self.store.table(TreeId::UserEvEvent)? {
            let Some((u, ev)) = hot::split_num_key(&k) else {
                problems.push(format!("event key {k:?} is not user + ev"));
                continue;
            };
            if u != user {
                user = u.to_owned();
                expect = 1;
            }
            if ev != expect {
                // Reported once per gap; the events after it are checked from where they are.
                problems.push(format!("{user}: event {expect} missing (found {ev})"));
            }
            expect = ev + 1;
            if let EventRecord::Message { conv, seq, .. } = decode(&v)? {
                let meta: ConvMeta = get(&self.store, TreeId::ConvMeta, conv.as_bytes())?.unwrap_or_default();
                if seq > meta.last_seq || (seq > meta.purged_to && self.message_opt(&conv, seq)?.is_none()) {
                    problems.push(format!("{user}: event {ev} points at missing message {conv}#{seq}"));
                }
            }
        }
        for (k, v) in self.store.table(TreeId::DeviceCursor)? {
            let key = String::from_utf8_lossy(&k).into_owned();
            let user = key.split('\0').next().unwrap_or_default().to_owned();
            if be_u64(&v)? > self.head(&user)? {
                problems.push(format!("{}: cursor past the head", key.replace('\0', "/")));
            }
        }
        for (_, v) in self.store.table(TreeId::SenderIdAck)? {
            let a: AckRecord = decode(&v)?;
            let meta: ConvMeta = get(&self.store, TreeId::ConvMeta, a.conv.as_bytes())?.unwrap_or_default();
            if a.seq > meta.last_seq {
                problems.push(format!("dedup record points past the end of {}", a.conv));
            }
        }
        Ok(problems)
    }

    /// The sled database (for trees outside the log, like presence's last_seen).
    pub fn db(&self) -> &sled::Db {
        &self.db
    }

    /// Bytes sled uses on disk.
    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }

    // ------------------------------------------------------------------ queries

    /// A user's record.
    pub fn user(&self, user: &str) -> Result<Option<UserRecord>, StorageError> {
        get(&self.store, TreeId::Users, user.as_bytes())
    }

    /// A token's record.
    pub fn token(&self, hash: &TokenHash) -> Result<Option<TokenRecord>, StorageError> {
        get(&self.store, TreeId::Tokens, hash)
    }

    /// A user's SCRAM verifiers, if stored (XMPP gateway).
    pub fn scram(&self, user: &str) -> Result<Option<ScramRecord>, StorageError> {
        get(&self.store, TreeId::UserScram, user.as_bytes())
    }

    /// A user's latest ev (0: none): the key of its last event (events are only appended, and
    /// the head is not stored apart, see [`TreeId::UserHead`]).
    pub fn head(&self, user: &str) -> Result<u64, StorageError> {
        last_ev(&self.store, user)
    }

    /// A device's stored cursor (0: none).
    pub fn cursor(&self, user: &str, device: &str) -> Result<u64, StorageError> {
        get_u64(&self.store, TreeId::DeviceCursor, &keys::pair(user, device))
    }

    /// The original ack of `(from, id)`, if that message was accepted.
    pub fn dedup(&self, from: &str, id: &str) -> Result<Option<AckRecord>, StorageError> {
        get(&self.store, TreeId::SenderIdAck, &keys::pair(from, id))
    }

    /// [`dedup`](Self::dedup) for a session's early check of a `send`: `Ok(None)` without
    /// reading the store when the id was not stored lately ([`super::idfilter`]). An older
    /// duplicate is then answered by apply (its dedup record), never stored twice.
    pub fn dedup_recent(&self, from: &str, id: &str) -> Result<Option<AckRecord>, StorageError> {
        if !self.ids.may_contain(from, id) {
            return Ok(None);
        }
        get(&self.store, TreeId::SenderIdAck, &keys::pair(from, id))
    }

    /// Events of `user` with `after < ev <= upto`, at most `limit`, in ev order.
    pub fn events(&self, user: &str, after: u64, upto: u64, limit: usize) -> Result<Vec<(u64, EventPayload)>, StorageError> {
        Ok(self.events_page(user, after, upto, limit)?.events)
    }

    /// Like [`events`](Self::events), reading at most `limit` stored events, and saying how far
    /// it read: events whose message retention deleted are skipped (every device had them, or
    /// they expired), so `scanned_to` can be past the last event returned.
    pub fn events_page(&self, user: &str, after: u64, upto: u64, limit: usize) -> Result<EventsPage, StorageError> {
        let mut page = EventsPage { events: Vec::new(), scanned_to: after };
        if upto <= after {
            return Ok(page);
        }
        let lo = keys::num(user, after + 1);
        let hi = keys::num(user, upto);
        for (k, v) in self.store.range(TreeId::UserEvEvent, &lo, std::ops::Bound::Included(&hi), limit, None)? {
            let ev = keys::num_suffix(&k).ok_or_else(|| StorageError::Decode("event key".into()))?;
            page.scanned_to = ev;
            if let Some(p) = self.view(decode(&v)?)? {
                page.events.push((ev, p));
            }
        }
        Ok(page)
    }

    fn view(&self, rec: EventRecord) -> Result<Option<EventPayload>, StorageError> {
        Ok(Some(match rec {
            EventRecord::Message { conv, seq, .. } => match self.message_opt(&conv, seq)? {
                Some(m) => EventPayload::Message(m),
                None => return Ok(None),
            },
            EventRecord::Receipt { conv, by, status, up_to } => EventPayload::Receipt(ReceiptView {
                conv,
                by,
                status: if status == READ { ReceiptStatus::Read } else { ReceiptStatus::Delivered },
                up_to,
            }),
            EventRecord::Group { group, action, users, by } => EventPayload::Group(GroupView {
                group: format!("g:{group}"),
                action: group_action(action),
                users,
                by,
            }),
            EventRecord::ReadMarker { conv, seq } => EventPayload::ReadMarker(ReadMarkerView { conv, seq }),
        }))
    }

    /// A message, or None when retention deleted it.
    fn message_opt(&self, conv: &str, seq: u64) -> Result<Option<MessageView>, StorageError> {
        let m: Option<MessageRecord> = get(&self.store, TreeId::ConvSeqMessage, &keys::num(conv, seq))?;
        Ok(m.map(|m| message_view(conv, seq, m)))
    }

    /// Whether `user` may read and write `conv` now (a dm it is part of, or a group it is in).
    pub fn is_member(&self, user: &str, conv: &Conv) -> Result<bool, StorageError> {
        Ok(match conv {
            Conv::Dm { .. } => conv.dm_has(user),
            Conv::Group(id) => self.group(id)?.is_some_and(|g| g.members.iter().any(|m| m.user == user)),
        })
    }

    /// A group's record.
    pub fn group(&self, id: &str) -> Result<Option<GroupRecord>, StorageError> {
        get(&self.store, TreeId::Groups, id.as_bytes())
    }

    /// A page of `conv` for `user`: messages with seq < `before` (newest when None), at most
    /// `limit`, ascending; `more` when older visible messages exist; `deleted_upto` when the page
    /// reaches messages retention deleted. `Err(NotMember)` for a conversation the user is not
    /// part of (nothing about it is revealed).
    pub fn history(
        &self,
        user: &str,
        conv: &Conv,
        before: Option<u64>,
        limit: u64,
    ) -> Result<Result<HistoryPage, Refusal>, StorageError> {
        let name = conv.to_string();
        let meta: ConvMeta = get(&self.store, TreeId::ConvMeta, name.as_bytes())?.unwrap_or_default();
        let uc = match self.store.get(TreeId::UserConvState, &keys::pair(user, &name))? {
            Some(v) => Some(decode_user_conv(&v, || Ok(meta.last_seq))?),
            None => None,
        };
        let uc = match (uc, conv) {
            (Some(uc), _) => uc,
            (None, Conv::Dm { .. }) if conv.dm_has(user) => return Ok(Ok(HistoryPage::default())),
            _ => return Ok(Err(Refusal::NotMember)),
        };
        let visible_from = uc.visible_from.max(1);
        let lo = visible_from.max(meta.purged_to + 1);
        let deleted_upto = (meta.purged_to >= visible_from).then_some(meta.purged_to);
        let hi = uc.visible_to.map_or(meta.last_seq, |t| t.min(meta.last_seq));
        let top = match before {
            Some(b) => hi.min(b.saturating_sub(1)),
            None => hi,
        };
        if top < lo || limit == 0 {
            return Ok(Ok(HistoryPage { messages: Vec::new(), more: false, deleted_upto }));
        }
        let start = lo.max(top.saturating_sub(limit - 1));
        let mut msgs = Vec::with_capacity((top - start + 1) as usize);
        let (first, last) = (keys::num(&name, start), keys::num(&name, top));
        for (k, v) in self.store.range(TreeId::ConvSeqMessage, &first, std::ops::Bound::Included(&last), usize::MAX, None)? {
            let seq = keys::num_suffix(&k).ok_or_else(|| StorageError::Decode("message key".into()))?;
            msgs.push(message_view(&name, seq, decode(&v)?));
        }
        let more = start > lo;
        Ok(Ok(HistoryPage { messages: msgs, more, deleted_upto: deleted_upto.filter(|_| !more) }))
    }

    /// Every conversation of `user`, newest first.
    pub fn conversations(&self, user: &str) -> Result<Vec<ConversationItem>, StorageError> {
        let mut items = Vec::new();
        for (k, v) in self.store.scan_prefix(TreeId::UserConvState, &keys::prefix(user), usize::MAX, None)? {
            let conv = keys::pair_suffix(&k).ok_or_else(|| StorageError::Decode("user_conv key".into()))?.to_owned();
            let meta: ConvMeta = get(&self.store, TreeId::ConvMeta, conv.as_bytes())?.unwrap_or_default();
            let uc = decode_user_conv(&v, || Ok(meta.last_seq))?;
            let last_seq = uc.visible_to.map_or(meta.last_seq, |t| t.min(meta.last_seq));
            let last = if last_seq >= uc.visible_from.max(1) { self.message_opt(&conv, last_seq)? } else { None };
            // A member that left sorts by what it saw last; a group without messages by its creation.
            let order = if uc.visible_to.is_some() { uc.left_order } else { meta.last_order };
            items.push((order, ConversationItem { conv, last_seq, read_seq: uc.read_seq, unread: uc.unread(meta.last_seq), last }));
        }
        // Newest first by acceptance order (the log's), not by ms: several messages share a ms.
        items.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.conv.cmp(&b.1.conv)));
        Ok(items.into_iter().map(|(_, i)| i).collect())
    }

    /// Counts of stored records, for `admin stats` and metrics: (users, conversations, messages).
    pub fn counts(&self) -> Result<(usize, usize, usize), StorageError> {
        Ok((self.store.table(TreeId::Users)?.len(), self.store.table(TreeId::ConvMeta)?.len(), self.store.table(TreeId::ConvSeqMessage)?.len()))
    }

    /// Every user with its record, in id order (reads the whole table; for admin commands).
    pub fn users(&self) -> Result<Vec<(String, UserRecord)>, StorageError> {
        self.store.table(TreeId::Users)?.into_iter().map(|(k, v)| Ok((String::from_utf8_lossy(&k).into_owned(), decode(&v)?))).collect()
    }

    /// How many groups exist (reads the whole table; for admin commands).
    pub fn group_count(&self) -> Result<usize, StorageError> {
        Ok(self.store.table(TreeId::Groups)?.len())
    }
}

fn message_view(conv: &str, seq: u64, m: MessageRecord) -> MessageView {
    MessageView { conv: conv.to_owned(), seq, id: m.id, from: m.from, body: m.body, ts: m.ts }
}

fn group_action(a: u8) -> GroupAction {
    match a {
        0 => GroupAction::Created,
        1 => GroupAction::Added,
        2 => GroupAction::Removed,
        _ => GroupAction::Left,
    }
}

fn get<T: DeserializeOwned>(store: &Store, t: TreeId, k: &[u8]) -> Result<Option<T>, StorageError> {
    store.get(t, k)?.map(|v| decode(&v)).transpose()
}

fn get_u64(store: &Store, t: TreeId, k: &[u8]) -> Result<u64, StorageError> {
    store.get(t, k)?.map_or(Ok(0), |v| be_u64(&v))
}

/// The ev of `user`'s last event (0: none).
fn last_ev(store: &Store, user: &str) -> Result<u64, StorageError> {
    match store.last_in_prefix(TreeId::UserEvEvent, &keys::prefix(user))? {
        Some((k, _)) => keys::num_suffix(&k).ok_or_else(|| StorageError::Decode("event key".into())),
        None => Ok(0),
    }
}

// ---------------------------------------------------------------------- apply

/// One entry's writes: full key → value (`None`: deleted). A hash map: apply looks keys up far
/// more often than it scans them.
type Writes = fxhash::FxHashMap<Vec<u8>, Option<IVec>>;

/// The write set of one entry: reads see earlier writes of the same entry, then the store;
/// [`State::apply`] merges all of it into the store's overlay at once.
struct Tx<'a> {
    store: &'a Store,
    writes: Writes,
    /// Apply's cache; every write of this entry goes through to it (dropped if apply fails).
    hot: &'a mut Hot,
    /// Ids whose dedup record this entry writes are added (an entry that then fails leaves a
    /// harmless false positive).
    ids: &'a super::idfilter::IdFilter,
}

impl<'a> Tx<'a> {
    fn raw(&mut self, t: TreeId, k: &[u8]) -> Result<Option<IVec>, StorageError> {
        let fk = full_key(t, k);
        if let Some(v) = self.writes.get(&fk) {
            return Ok(v.clone());
        }
        if t == TreeId::UserEvEvent {
            if let Some((user, ev)) = hot::split_num_key(k) {
                if let Some(r) = self.hot.recent.get(user) {
                    if let Some(&(first, _)) = r.front() {
                        if let Some((_, v)) = ev.checked_sub(first).and_then(|i| r.get(i as usize)) {
                            return Ok(Some(v.clone()));
                        }
                    }
                }
            }
        }
        if !hot::cached(t) {
            return self.store.get_full(&fk);
        }
        if let Some(v) = self.hot.values.get(&fk) {
            return Ok(v.clone());
        }
        let v = self.store.get_full(&fk)?;
        self.hot.values.insert(fk, v.clone());
        Ok(v)
    }

    fn get<T: DeserializeOwned>(&mut self, t: TreeId, k: &[u8]) -> Result<Option<T>, StorageError> {
        self.raw(t, k)?.map(|v| decode(&v)).transpose()
    }

    fn get_u64(&mut self, t: TreeId, k: &[u8]) -> Result<u64, StorageError> {
        self.raw(t, k)?.map_or(Ok(0), |v| be_u64(&v))
    }

    fn exists(&mut self, t: TreeId, k: &[u8]) -> Result<bool, StorageError> {
        Ok(self.raw(t, k)?.is_some())
    }

    /// False when `user` certainly never sent a message with this `id` (no dedup record to
    /// read); true when it may have.
    fn maybe_sent(&mut self, user: &str, id: &str) -> Result<bool, StorageError> {
        if !self.hot.sent.contains_key(user) {
            let ids = self.scan_prefix(TreeId::SenderIdAck, &keys::prefix(user))?;
            let set = (ids.len() <= hot::MAX_IDS_PER_USER)
                .then(|| ids.iter().filter_map(|(k, _)| keys::pair_suffix(k)).map(hot::id_hash).collect::<fxhash::FxHashSet<u64>>());
            self.hot.sent_ids += set.as_ref().map_or(0, |s| s.len());
            self.hot.sent.insert(user.to_owned(), set);
        }
        Ok(match self.hot.sent.get(user) {
            Some(Some(set)) => set.contains(&hot::id_hash(id)),
            _ => true,
        })
    }

    /// Remembers that `user` sent `id` (its dedup record is written in this entry).
    fn note_sent(&mut self, user: &str, id: &str) {
        self.ids.add(user, id);
        if let Some(Some(set)) = self.hot.sent.get_mut(user) {
            if set.insert(hot::id_hash(id)) {
                self.hot.sent_ids += 1;
            }
        }
    }

    /// The member user ids of group `gid` (`None`: no such group), decoded once and cached.
    fn group_members(&mut self, gid: &str) -> Result<Option<Arc<Vec<String>>>, StorageError> {
        if let Some(m) = self.hot.groups.get(gid) {
            return Ok(Some(m.clone()));
        }
        let Some(g) = self.get::<GroupRecord>(TreeId::Groups, gid.as_bytes())? else { return Ok(None) };
        let members = Arc::new(g.members.into_iter().map(|m| m.user).collect::<Vec<_>>());
        self.hot.group_members += members.len();
        self.hot.groups.insert(gid.to_owned(), members.clone());
        Ok(Some(members))
    }

    /// `user`'s latest ev (0: none), from the cache or from its last stored event.
    fn head(&mut self, user: &str) -> Result<u64, StorageError> {
        if let Some(&h) = self.hot.heads.get(user) {
            return Ok(h);
        }
        // Every event this entry wrote went through `write`, which sets the cache: a miss means
        // the store has them all.
        let h = last_ev(self.store, user)?;
        self.hot.heads.insert(user.to_owned(), h);
        Ok(h)
    }

    /// Every device cursor of `user`.
    fn device_cursors(&mut self, user: &str) -> Result<Vec<u64>, StorageError> {
        if !self.hot.devices.contains_key(user) {
            let all = self.scan_prefix(TreeId::DeviceCursor, &keys::prefix(user))?;
            self.hot.devices.insert(user.to_owned(), all.into_iter().collect());
        }
        self.hot.devices.get(user).map_or(Ok(Vec::new()), |d| d.values().map(|v| be_u64(v)).collect())
    }

    /// Records a write in this entry's write set and in the cache.
    fn write(&mut self, t: TreeId, k: Vec<u8>, v: Option<IVec>) {
        let fk = full_key(t, &k);
        if t == TreeId::DeviceCursor {
            let user = k.split(|&b| b == keys::SEP).next().map(|u| String::from_utf8_lossy(u).into_owned()).unwrap_or_default();
            if let Some(d) = self.hot.devices.get_mut(&user) {
                match &v {
                    Some(v) => d.insert(k.clone(), v.clone()),
                    None => d.remove(&k),
                };
            }
        }
        if t == TreeId::UserEvEvent {
            // Events are only ever appended (ev = head + 1) and never rewritten.
            if let (Some((user, ev)), Some(v)) = (hot::split_num_key(&k), &v) {
                match self.hot.heads.get_mut(user) {
                    Some(h) => *h = (*h).max(ev),
                    None => {
                        self.hot.heads.insert(user.to_owned(), ev);
                    }
                }
                let r = match self.hot.recent.get_mut(user) {
                    Some(r) => r,
                    None => self.hot.recent.entry(user.to_owned()).or_default(),
                };
                if r.back().is_some_and(|&(last, _)| last + 1 != ev) {
                    r.clear();
                }
                r.push_back((ev, v.clone()));
                if r.len() > hot::RECENT_EVENTS {
                    r.pop_front();
                }
            }
        }
        if t == TreeId::Groups {
            if let Some(old) = std::str::from_utf8(&k).ok().and_then(|g| self.hot.groups.remove(g)) {
                self.hot.group_members -= old.len();
            }
        }
        if hot::cached(t) {
            self.hot.values.insert(fk.clone(), v.clone());
        }
        self.writes.insert(fk, v);
    }

    /// Every live key of table `t` starting with `prefix`, as it reads now (earlier writes of
    /// this entry included), in key order; keys without the table byte.
    fn scan_prefix(&self, t: TreeId, prefix: &[u8]) -> Result<Vec<(Vec<u8>, IVec)>, StorageError> {
        let lo = full_key(t, prefix);
        self.store.scan_prefix(t, prefix, usize::MAX, Some(&self.writes_from(|k| k.starts_with(&lo))))
    }

    /// This entry's writes whose key passes `keep`, in key order (for scans, which are rare).
    fn writes_from(&self, keep: impl Fn(&[u8]) -> bool) -> Layer {
        self.writes.iter().filter(|(k, _)| keep(k)).map(|(k, v)| (store::Key::from_slice(k), v.clone())).collect()
    }

    /// Keys of table `t` from `from` on (inclusive), in key order.
    fn keys_from(&self, t: TreeId, from: &[u8]) -> Result<Vec<Vec<u8>>, StorageError> {
        let lo = full_key(t, from);
        let extra = self.writes_from(|k| k >= lo.as_slice() && k.first() == Some(&(t as u8)));
        Ok(self.store.range(t, from, std::ops::Bound::Unbounded, usize::MAX, Some(&extra))?.into_iter().map(|(k, _)| k).collect())
    }

    fn put<T: Serialize>(&mut self, t: TreeId, k: Vec<u8>, v: &T) -> Result<(), StorageError> {
        self.write(t, k, Some(IVec::from(encode(v)?)));
        Ok(())
    }

    fn put_u64(&mut self, t: TreeId, k: Vec<u8>, n: u64) {
        self.write(t, k, Some(IVec::from(&n.to_be_bytes()[..])));
    }

    fn del(&mut self, t: TreeId, k: Vec<u8>) {
        self.write(t, k, None);
    }
}

struct Applier<'a> {
    tx: Tx<'a>,
    ts: u64,
    /// Log index of the entry, and the position of the command being applied in it.
    index: u64,
    position: u64,
    effects: Effects,
    /// Receipts of this entry, coalesced: (recipient, conv, by, status) → up_to.
    receipts: BTreeMap<(String, String, String, u8), u64>,
}

impl Applier<'_> {
    /// A number that grows with every command in log order (entry index, then position).
    fn order(&self) -> u64 {
        self.index.saturating_mul(1 << 24).saturating_add(self.position)
    }

    fn command(&mut self, c: &Command) -> Result<Outcome, StorageError> {
        match c {
            Command::Register { user, password_hash } => {
                if self.tx.exists(TreeId::Users, user.as_bytes())? {
                    return Ok(Outcome::Refused(Refusal::UserExists));
                }
                let rec = UserRecord { password_hash: password_hash.clone(), created: self.ts, deleted: false };
                self.tx.put(TreeId::Users, user.as_bytes().to_vec(), &rec)?;
                Ok(Outcome::Done)
            }
            Command::Login { token_hash, user, device } => {
                match self.tx.get::<UserRecord>(TreeId::Users, user.as_bytes())? {
                    Some(u) if !u.deleted => {}
                    _ => return Ok(Outcome::Refused(Refusal::Unauthorized)),
                }
                let rec = TokenRecord { user: user.clone(), device: device.clone(), created: self.ts };
                self.tx.put(TreeId::Tokens, token_hash.to_vec(), &rec)?;
                // A device exists from its first login: until it confirms, it holds retention.
                let ck = keys::pair(user, device);
                if !self.tx.exists(TreeId::DeviceCursor, &ck)? {
                    self.tx.put_u64(TreeId::DeviceCursor, ck, 0);
                }
                Ok(Outcome::Done)
            }
            Command::DeleteUser { user } => self.delete_user(user),
            Command::SetPassword { user, password_hash } => {
                let Some(mut u) = self.tx.get::<UserRecord>(TreeId::Users, user.as_bytes())? else {
                    return Ok(Outcome::Refused(Refusal::UnknownUser(user.clone())));
                };
                u.password_hash = password_hash.clone();
                self.tx.put(TreeId::Users, user.as_bytes().to_vec(), &u)?;
                self.revoke_all(user)?;
                Ok(Outcome::Done)
            }
            Command::Purge { policy, max, from } => self.purge(*policy, *max, from),
            Command::Logout { token_hash } => {
                if let Some(t) = self.tx.get::<TokenRecord>(TreeId::Tokens, token_hash)? {
                    self.tx.del(TreeId::Tokens, token_hash.to_vec());
                    self.effects.revoked.push((t.user, *token_hash));
                    Ok(Outcome::Done)
                } else {
                    Ok(Outcome::Refused(Refusal::Unauthorized))
                }
            }
            Command::Send { from, device: _, id, conv, body } => self.send(from, id, conv, body),
            Command::Received { user, device, up_to } => self.received(user, device, *up_to),
            Command::Read { user, conv, seq } => self.read(user, conv, *seq),
            Command::GroupCreate { group, by, name, members, cap } => self.group_create(group, by, name, members, *cap),
            Command::GroupAdd { group, by, users, cap } => self.group_add(group, by, users, *cap),
            Command::GroupRemove { group, by, users } => self.group_remove(group, by, users),
            Command::GroupLeave { group, by } => self.group_leave(group, by),
            Command::SetScram { user, scram } => match self.tx.get::<UserRecord>(TreeId::Users, user.as_bytes())? {
                Some(u) if !u.deleted => self.tx.put(TreeId::UserScram, user.as_bytes().to_vec(), scram).map(|_| Outcome::Done),
                _ => Ok(Outcome::Refused(Refusal::UnknownUser(user.clone()))),
            },
        }
    }

    /// Appends an event to `user`'s stream: ev = head + 1.
    fn append_event(&mut self, user: &str, rec: &EventRecord, payload: Arc<EventPayload>) -> Result<(), StorageError> {
        self.append_encoded(user, IVec::from(encode(rec)?), payload)
    }

    /// [`append_event`](Self::append_event) of an encoded record: a fan-out encodes its one
    /// record once and shares the bytes between the members' streams.
    fn append_encoded(&mut self, user: &str, rec: IVec, payload: Arc<EventPayload>) -> Result<(), StorageError> {
        let ev = self.tx.head(user)? + 1;
        self.tx.write(TreeId::UserEvEvent, keys::num(user, ev), Some(rec));
        self.effects.events.push(Pushed { user: user.to_owned(), ev, payload });
        Ok(())
    }

    fn user_conv(&mut self, user: &str, conv: &str) -> Result<Option<UserConvRecord>, StorageError> {
        match self.tx.raw(TreeId::UserConvState, &keys::pair(user, conv))? {
            Some(v) => {
                let mut last_seq = || Ok(self.meta(conv)?.last_seq);
                decode_user_conv(&v, &mut last_seq).map(Some)
            }
            None => Ok(None),
        }
    }

    fn put_user_conv(&mut self, user: &str, conv: &str, uc: &UserConvRecord) -> Result<(), StorageError> {
        self.tx.write(TreeId::UserConvState, keys::pair(user, conv), Some(IVec::from(encode_user_conv(uc)?)));
        Ok(())
    }

    fn meta(&mut self, conv: &str) -> Result<ConvMeta, StorageError> {
        Ok(self.tx.get(TreeId::ConvMeta, conv.as_bytes())?.unwrap_or_default())
    }

    fn send(&mut self, from: &str, id: &str, conv: &str, body: &str) -> Result<Outcome, StorageError> {
        if self.tx.maybe_sent(from, id)? {
            if let Some(a) = self.tx.get::<AckRecord>(TreeId::SenderIdAck, &keys::pair(from, id))? {
                return Ok(Outcome::Sent { conv: a.conv, seq: a.seq, ts: a.ts, duplicate: true });
            }
        }
        let Some(parsed) = Conv::parse(conv) else {
            return Ok(Outcome::Refused(Refusal::BadRequest(format!("bad conversation {conv}"))));
        };
        let members: Arc<Vec<String>> = match &parsed {
            Conv::Dm { a, b } => {
                if !parsed.dm_has(from) {
                    return Ok(Outcome::Refused(Refusal::NotMember));
                }
                for u in [a, b] {
                    if !self.tx.exists(TreeId::Users, u.as_bytes())? {
                        return Ok(Outcome::Refused(Refusal::UnknownUser(u.clone())));
                    }
                }
                Arc::new(if a == b { vec![a.clone()] } else { vec![a.clone(), b.clone()] })
            }
            Conv::Group(gid) => match self.tx.group_members(gid)? {
                Some(m) if m.iter().any(|u| u == from) => m,
                _ => return Ok(Outcome::Refused(Refusal::NotMember)),
            },
        };
        let mut meta = self.meta(conv)?;
        meta.last_seq += 1;
        // A conversation's ts never goes backwards, whichever clock stamped the entry (on a
        // cluster each node stamps the batches it proposes; a single node's stamps only rise).
        let ts = self.ts.max(meta.last_ts);
        meta.last_ts = ts;
        meta.last_order = self.order();
        let seq = meta.last_seq;
        self.tx.put(TreeId::ConvMeta, conv.as_bytes().to_vec(), &meta)?;
        let rec = MessageRecord { id: id.to_owned(), from: from.to_owned(), body: body.to_owned(), ts };
        self.tx.put(TreeId::ConvSeqMessage, keys::num(conv, seq), &rec)?;
        let ack = AckRecord { conv: conv.to_owned(), seq, ts };
        self.tx.put(TreeId::SenderIdAck, keys::pair(from, id), &ack)?;
        self.tx.note_sent(from, id);
        let payload = Arc::new(EventPayload::Message(message_view(conv, seq, rec)));
        let ev_rec = IVec::from(encode(&EventRecord::Message { conv: conv.to_owned(), seq, from: from.to_owned() })?);
        for m in members.iter() {
            self.append_encoded(m, ev_rec.clone(), payload.clone())?;
            // Only the sender's state changes (one more own message after its read marker); the
            // others' unread counts follow from the conversation's last seq, so for them only
            // whether a state exists matters (not decoded): a first message creates it.
            let uc = if m == from {
                let mut uc = self.user_conv(m, conv)?.unwrap_or(UserConvRecord { visible_from: 1, ..Default::default() });
                uc.own_after_read += 1;
                uc
            } else if self.tx.exists(TreeId::UserConvState, &keys::pair(m, conv))? {
                continue;
            } else {
                UserConvRecord { visible_from: 1, ..Default::default() }
            };
            self.put_user_conv(m, conv, &uc)?;
        }
        Ok(Outcome::Sent { conv: conv.to_owned(), seq, ts, duplicate: false })
    }

    /// A device confirms events up to `up_to`: its cursor moves; the user's lowest cursor (over
    /// its devices) may move too. Each event in between is read once, for both: the messages from
    /// others that this device now has (`delivered_seq`, and a `delivered` receipt to their
    /// senders) and those every device now has (`all_devices_seq`, for the `delivered`
    /// retention). Each conversation state touched is written once.
    fn received(&mut self, user: &str, device: &str, up_to: u64) -> Result<Outcome, StorageError> {
        let head = self.tx.head(user)?;
        let key = keys::pair(user, device);
        let cur = self.tx.get_u64(TreeId::DeviceCursor, &key)?;
        let new = up_to.min(head);
        if new <= cur {
            return Ok(Outcome::Done);
        }
        // The lowest cursor over the user's devices, before and after this one moves (it is
        // not stored apart, see [`TreeId::UserMinCursor`]). A device not stored yet has not
        // confirmed anything; this device's cursor is among them after, so that is at most `new`.
        let min_old = self.tx.device_cursors(user)?.into_iter().min().unwrap_or(0);
        self.tx.put_u64(TreeId::DeviceCursor, key, new);
        let min_new = self.tx.device_cursors(user)?.into_iter().min().unwrap_or(0);
        let min_moves = min_new > min_old;
        let from_ev = if min_moves { cur.min(min_old) } else { cur };
        // Per conversation: (newest seq from others this device got, their senders, newest seq
        // every device got).
        let mut covered: BTreeMap<String, (u64, BTreeSet<String>, u64)> = BTreeMap::new();
        for ev in from_ev + 1..=new {
            let Some(EventRecord::Message { conv, seq, from }) = self.tx.get(TreeId::UserEvEvent, &keys::num(user, ev))? else { continue };
            let this_device = ev > cur && from != user;
            let every_device = min_moves && ev > min_old && ev <= min_new;
            if !this_device && !every_device {
                continue;
            }
            let e = covered.entry(conv).or_default();
            if this_device {
                e.0 = e.0.max(seq);
                e.1.insert(from);
            }
            if every_device {
                e.2 = e.2.max(seq);
            }
        }
        for (conv, (seq, senders, all_seq)) in covered {
            let Some(mut uc) = self.user_conv(user, &conv)? else { continue };
            let mut changed = false;
            if all_seq > uc.all_devices_seq {
                uc.all_devices_seq = all_seq;
                changed = true;
            }
            if seq > uc.delivered_seq {
                uc.delivered_seq = seq;
                changed = true;
                for s in senders {
                    self.receipt(&s, &conv, user, DELIVERED, seq);
                }
            }
            if changed {
                self.put_user_conv(user, &conv, &uc)?;
            }
        }
        Ok(Outcome::Done)
    }

    fn receipt(&mut self, to: &str, conv: &str, by: &str, status: u8, up_to: u64) {
        let e = self.receipts.entry((to.to_owned(), conv.to_owned(), by.to_owned(), status)).or_insert(0);
        *e = (*e).max(up_to);
    }

    fn read(&mut self, user: &str, conv: &str, seq: u64) -> Result<Outcome, StorageError> {
        let Some(parsed) = Conv::parse(conv) else {
            return Ok(Outcome::Refused(Refusal::BadRequest(format!("bad conversation {conv}"))));
        };
        // Anyone who is or was in the conversation may mark what it could see as read (a
        // removed member still lists the group); a dm of one's own with no message yet has
        // nothing to mark.
        let Some(mut uc) = self.user_conv(user, conv)? else {
            return Ok(match parsed {
                Conv::Dm { .. } if parsed.dm_has(user) => Outcome::Done,
                _ => Outcome::Refused(Refusal::NotMember),
            });
        };
        let meta = self.meta(conv)?;
        let hi = uc.visible_to.map_or(meta.last_seq, |t| t.min(meta.last_seq));
        let new = seq.min(hi);
        if new <= uc.read_seq {
            return Ok(Outcome::Done);
        }
        let mut senders = BTreeSet::new();
        for s in uc.read_seq.max(uc.visible_from.max(1) - 1) + 1..=new {
            if let Some(m) = self.tx.get::<MessageRecord>(TreeId::ConvSeqMessage, &keys::num(conv, s))? {
                if m.from != user {
                    senders.insert(m.from);
                }
            }
        }
        let mut own = 0;
        for s in new + 1..=hi {
            if let Some(m) = self.tx.get::<MessageRecord>(TreeId::ConvSeqMessage, &keys::num(conv, s))? {
                if m.from == user {
                    own += 1;
                }
            }
        }
        uc.read_seq = new;
        uc.delivered_seq = uc.delivered_seq.max(new);
        uc.own_after_read = own;
        self.put_user_conv(user, conv, &uc)?;
        let marker = EventRecord::ReadMarker { conv: conv.to_owned(), seq: new };
        let payload = Arc::new(EventPayload::ReadMarker(ReadMarkerView { conv: conv.to_owned(), seq: new }));
        self.append_event(user, &marker, payload)?;
        for s in senders {
            self.receipt(&s, conv, user, READ, new);
        }
        Ok(Outcome::Done)
    }

    /// Appends the entry's coalesced receipts: one event per (recipient, conv, by, status).
    fn flush_receipts(&mut self) -> Result<(), StorageError> {
        let receipts = std::mem::take(&mut self.receipts);
        for ((to, conv, by, status), up_to) in receipts {
            let rec = EventRecord::Receipt { conv: conv.clone(), by: by.clone(), status, up_to };
            let payload = Arc::new(EventPayload::Receipt(ReceiptView {
                conv,
                by,
                status: if status == READ { ReceiptStatus::Read } else { ReceiptStatus::Delivered },
                up_to,
            }));
            self.append_event(&to, &rec, payload)?;
        }
        Ok(())
    }

    /// Deletes every token of `user` (their sockets close with 4001).
    fn revoke_all(&mut self, user: &str) -> Result<(), StorageError> {
        for (k, v) in self.tx.scan_prefix(TreeId::Tokens, &[])? {
            let t: TokenRecord = decode(&v)?;
            if t.user == user {
                if let Ok(hash) = <TokenHash>::try_from(k.as_slice()) {
                    self.effects.revoked.push((user.to_owned(), hash));
                }
                self.tx.del(TreeId::Tokens, k);
            }
        }
        Ok(())
    }

    fn delete_user(&mut self, user: &str) -> Result<Outcome, StorageError> {
        let Some(mut u) = self.tx.get::<UserRecord>(TreeId::Users, user.as_bytes())? else {
            return Ok(Outcome::Refused(Refusal::UnknownUser(user.to_owned())));
        };
        u.deleted = true;
        u.password_hash.clear();
        self.tx.put(TreeId::Users, user.as_bytes().to_vec(), &u)?;
        self.revoke_all(user)?;
        for (k, _) in self.tx.scan_prefix(TreeId::UserConvState, &keys::prefix(user))? {
            let Some(conv) = keys::pair_suffix(&k).map(str::to_owned) else { continue };
            if let Some(gid) = conv.strip_prefix("g:") {
                if let Some(g) = self.tx.get::<GroupRecord>(TreeId::Groups, gid.as_bytes())? {
                    if g.members.iter().any(|m| m.user == user) {
                        self.drop_members(gid, g, &[user.to_owned()], 3, user)?;
                    }
                }
            }
        }
        Ok(Outcome::Done)
    }

    /// Retention: deletes up to `max` messages that `policy` allows, visiting conversations in
    /// key order from `from`. Bounded work per entry, so purging never holds up live traffic.
    fn purge(&mut self, policy: PurgePolicy, max: u32, from: &str) -> Result<Outcome, StorageError> {
        let mut deleted = 0u32;
        let convs = self.tx.keys_from(TreeId::ConvMeta, from.as_bytes())?;
        for key in convs {
            let conv = String::from_utf8_lossy(&key).into_owned();
            if deleted >= max {
                return Ok(Outcome::Purged { deleted, next: Some(conv) });
            }
            let Some(mut meta) = self.tx.get::<ConvMeta>(TreeId::ConvMeta, &key)? else { continue };
            let upto = match policy {
                PurgePolicy::Before { .. } => meta.last_seq,
                PurgePolicy::Delivered => self.delivered_everywhere(&conv)?.min(meta.last_seq),
            };
            let mut seq = meta.purged_to + 1;
            loop {
                if seq > upto {
                    break;
                }
                if deleted >= max {
                    // Out of budget inside this conversation: resume here next time.
                    self.tx.put(TreeId::ConvMeta, key, &meta)?;
                    return Ok(Outcome::Purged { deleted, next: Some(conv) });
                }
                let k = keys::num(&conv, seq);
                if let PurgePolicy::Before { ts } = policy {
                    match self.tx.get::<MessageRecord>(TreeId::ConvSeqMessage, &k)? {
                        Some(m) if m.ts >= ts => break,
                        _ => {}
                    }
                }
                self.tx.del(TreeId::ConvSeqMessage, k);
                meta.purged_to = seq;
                deleted += 1;
                seq += 1;
            }
            self.tx.put(TreeId::ConvMeta, key, &meta)?;
        }
        Ok(Outcome::Purged { deleted, next: None })
    }

    /// The highest seq of `conv` that reached every device of every current member.
    fn delivered_everywhere(&mut self, conv: &str) -> Result<u64, StorageError> {
        let members: Vec<String> = match Conv::parse(conv) {
            Some(Conv::Dm { a, b }) => vec![a, b],
            Some(Conv::Group(g)) => match self.tx.get::<GroupRecord>(TreeId::Groups, g.as_bytes())? {
                Some(rec) => rec.members.into_iter().map(|m| m.user).collect(),
                None => Vec::new(),
            },
            None => Vec::new(),
        };
        let mut upto = u64::MAX;
        for m in members {
            let seq = self.user_conv(&m, conv)?.map_or(0, |uc| uc.all_devices_seq);
            upto = upto.min(seq);
        }
        Ok(if upto == u64::MAX { 0 } else { upto })
    }

    fn group_event(&mut self, group: &str, action: u8, users: Vec<String>, by: &str, to: &[String]) -> Result<(), StorageError> {
        let rec = EventRecord::Group { group: group.to_owned(), action, users: users.clone(), by: by.to_owned() };
        let payload = Arc::new(EventPayload::Group(GroupView {
            group: format!("g:{group}"),
            action: group_action(action),
            users,
            by: by.to_owned(),
        }));
        let rec = IVec::from(encode(&rec)?);
        for u in to {
            self.append_encoded(u, rec.clone(), payload.clone())?;
        }
        Ok(())
    }

    /// Dedups `users` (keeping order) and checks each exists.
    fn existing_users(&mut self, users: &[String]) -> Result<Result<Vec<String>, Refusal>, StorageError> {
        let mut seen = BTreeSet::new();
        let mut out = Vec::new();
        for u in users {
            if seen.insert(u.as_str()) {
                if !self.tx.exists(TreeId::Users, u.as_bytes())? {
                    return Ok(Err(Refusal::UnknownUser(u.clone())));
                }
                out.push(u.clone());
            }
        }
        Ok(Ok(out))
    }

    fn group_create(&mut self, group: &str, by: &str, name: &str, members: &[String], cap: u32) -> Result<Outcome, StorageError> {
        if self.tx.exists(TreeId::Groups, group.as_bytes())? {
            return Ok(Outcome::Refused(Refusal::BadRequest("group id taken".into())));
        }
        let mut all = vec![by.to_owned()];
        all.extend(members.iter().cloned());
        // Too many names is the answer before any of them is looked up (a refusal either way:
        // no state changes, so a replay of an older log answers differently but ends the same).
        if all.iter().collect::<BTreeSet<_>>().len() > cap as usize {
            return Ok(Outcome::Refused(Refusal::TooLarge(format!("a group holds at most {cap} members"))));
        }
        let users = match self.existing_users(&all)? {
            Ok(u) => u,
            Err(r) => return Ok(Outcome::Refused(r)),
        };
        if users.len() > cap as usize {
            return Ok(Outcome::Refused(Refusal::TooLarge(format!("a group holds at most {cap} members"))));
        }
        let rec = GroupRecord {
            name: name.to_owned(),
            members: users.iter().map(|u| Member { user: u.clone(), admin: u == by }).collect(),
            created: self.ts,
        };
        self.tx.put(TreeId::Groups, group.as_bytes().to_vec(), &rec)?;
        let conv = format!("g:{group}");
        for u in &users {
            self.put_user_conv(u, &conv, &UserConvRecord { visible_from: 1, ..Default::default() })?;
        }
        let meta = ConvMeta { last_order: self.order(), ..Default::default() };
        self.tx.put(TreeId::ConvMeta, conv.as_bytes().to_vec(), &meta)?;
        self.group_event(group, 0, users.clone(), by, &users)?;
        Ok(Outcome::GroupCreated { group: conv })
    }

    /// The group, when `by` is an admin of it.
    fn admin_group(&mut self, group: &str, by: &str) -> Result<Result<GroupRecord, Refusal>, StorageError> {
        let Some(g) = self.tx.get::<GroupRecord>(TreeId::Groups, group.as_bytes())? else {
            return Ok(Err(Refusal::NotMember));
        };
        match g.members.iter().find(|m| m.user == by) {
            None => Ok(Err(Refusal::NotMember)),
            Some(m) if !m.admin => Ok(Err(Refusal::NotAdmin)),
            Some(_) => Ok(Ok(g)),
        }
    }

    fn group_add(&mut self, group: &str, by: &str, users: &[String], cap: u32) -> Result<Outcome, StorageError> {
        let mut g = match self.admin_group(group, by)? {
            Ok(g) => g,
            Err(r) => return Ok(Outcome::Refused(r)),
        };
        let users = match self.existing_users(users)? {
            Ok(u) => u,
            Err(r) => return Ok(Outcome::Refused(r)),
        };
        let new: Vec<String> = users.into_iter().filter(|u| !g.members.iter().any(|m| &m.user == u)).collect();
        if g.members.len() + new.len() > cap as usize {
            return Ok(Outcome::Refused(Refusal::TooLarge(format!("a group holds at most {cap} members"))));
        }
        if new.is_empty() {
            return Ok(Outcome::Done);
        }
        let conv = format!("g:{group}");
        let from = self.meta(&conv)?.last_seq + 1;
        for u in &new {
            g.members.push(Member { user: u.clone(), admin: false });
            let mut uc = self.user_conv(u, &conv)?.unwrap_or_default();
            uc.visible_from = from;
            uc.visible_to = None;
            uc.read_seq = uc.read_seq.max(from - 1);
            uc.delivered_seq = uc.delivered_seq.max(from - 1);
            uc.own_after_read = 0;
            self.put_user_conv(u, &conv, &uc)?;
        }
        self.tx.put(TreeId::Groups, group.as_bytes().to_vec(), &g)?;
        let to: Vec<String> = g.members.iter().map(|m| m.user.clone()).collect();
        self.group_event(group, 1, new, by, &to)?;
        Ok(Outcome::Done)
    }

    fn group_remove(&mut self, group: &str, by: &str, users: &[String]) -> Result<Outcome, StorageError> {
        let g = match self.admin_group(group, by)? {
            Ok(g) => g,
            Err(r) => return Ok(Outcome::Refused(r)),
        };
        let gone: Vec<String> = g.members.iter().filter(|m| users.contains(&m.user)).map(|m| m.user.clone()).collect();
        if gone.is_empty() {
            return Ok(Outcome::Done);
        }
        self.drop_members(group, g, &gone, 2, by)?;
        Ok(Outcome::Done)
    }

    fn group_leave(&mut self, group: &str, by: &str) -> Result<Outcome, StorageError> {
        let Some(g) = self.tx.get::<GroupRecord>(TreeId::Groups, group.as_bytes())? else {
            return Ok(Outcome::Refused(Refusal::NotMember));
        };
        if !g.members.iter().any(|m| m.user == by) {
            return Ok(Outcome::Refused(Refusal::NotMember));
        }
        self.drop_members(group, g, &[by.to_owned()], 3, by)?;
        Ok(Outcome::Done)
    }

    /// Removes `gone` from the group (action 2 removed, 3 left), tells every member before the
    /// change, freezes what the gone members may see, and promotes the longest-standing member
    /// when no admin is left.
    fn drop_members(&mut self, group: &str, mut g: GroupRecord, gone: &[String], action: u8, by: &str) -> Result<(), StorageError> {
        let to: Vec<String> = g.members.iter().map(|m| m.user.clone()).collect();
        g.members.retain(|m| !gone.contains(&m.user));
        if !g.members.is_empty() && !g.members.iter().any(|m| m.admin) {
            g.members[0].admin = true;
        }
        self.tx.put(TreeId::Groups, group.as_bytes().to_vec(), &g)?;
        let conv = format!("g:{group}");
        let last = self.meta(&conv)?.last_seq;
        let left_order = self.meta(&conv)?.last_order;
        for u in gone {
            if let Some(mut uc) = self.user_conv(u, &conv)? {
                uc.visible_to = Some(last);
                uc.left_order = left_order;
                self.put_user_conv(u, &conv, &uc)?;
            }
        }
        self.group_event(group, action, gone.to_vec(), by, &to)
    }
}
