//! The state machine's key-value store: one sled tree with a table byte in front of every key,
//! under an in-memory **overlay** of the writes that are not in sled yet.
//!
//! Apply (on the commit thread) never writes sled. It merges each entry's writes into the
//! overlay's *active* layer and advances the applied index, both under one write lock; the
//! answer and the ack follow. The **materializer** ([`Store::materialize`], run by a background
//! thread and before checkpoints, backups and dumps) swaps the active layer out to a *flushing*
//! layer and writes it to sled. Reads look at the active layer, then the flushing one, then sled,
//! so a read sees every applied entry whether or not it has reached sled.
//!
//! **How a layer reaches sled atomically without stalling readers.** sled's `apply_batch` is
//! atomic but holds a process-wide lock that blocks *every* sled read while it runs (sled 0.34
//! `concurrency_control::write`): 10–50 ms for a layer of a few thousand keys, during which every
//! session's token lookup, history page or resync would wait. Plain inserts take only the shared
//! side of that lock. So the materializer writes a **redo record** first (the whole layer,
//! checksummed, in chunks under `meta/redo/<n>`, then the marker `meta/redo` with the applied
//! index it covers and the chunk count), then every key with plain inserts, then `meta/applied`,
//! then removes the marker and the chunks. sled recovers a prefix of its own operations after a
//! crash, so at open: a marker means the keys may be half written, and writing the redo record's
//! values again (they are final values, not deltas, so this is idempotent) finishes the job;
//! chunks without a marker are left-overs and are removed. This is the redo half of ARIES-style
//! write-ahead logging, applied to one layer.
//!
//! Why: a 12-tree sled transaction per entry cost ~100 µs per `send` on the ack path (issue 11);
//! batching many entries into one sled batch coalesces the hot keys (heads, cursors, conversation
//! state) and takes sled off the ack path. It is the memtable of a log-structured store (the
//! write-ahead log plays the LSM's log; sled is the table), or Mnesia's `disc_copies`: RAM first,
//! disk from the log.
//!
//! **Invariant:** once [`Store::open`] has finished the redo (if any), sled holds the state after
//! some whole entry, `meta/applied`. After a crash, start-up replays the log from there.
//!
//! **Who writes.** The background materializer hands a round's per-key inserts to an
//! [`IdleWriter`], a thread under Linux's `SCHED_IDLE` that holds no lock, and keeps the rest
//! (layer swap, redo record, `meta/applied`) on its own thread; a round the machine leaves no
//! time for is finished by the materializer at normal priority. Checkpoints, backups and the
//! backpressure path write inline on their own thread.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use sled::IVec;

use super::trees::{TreeId, APPLIED_KEY, TREES};
use super::StorageError;

/// Name of the one sled tree that holds every table.
pub const STATE_TREE: &str = "state";

/// Above this many keys waiting in the overlay, apply waits for the materializer (backpressure
/// on the commit thread instead of unbounded memory), in keys. See [`Store::wait_below`].
pub const MAX_DIRTY_KEYS: usize = 400_000;

/// [`MAX_DIRTY_KEYS`] for bytes of keys and values (see [`Store::fill`]): 256 MiB.
pub const MAX_DIRTY_BYTES: usize = 256 << 20;

/// Above this many keys waiting in the overlay, apply slows down in proportion (from 0 here to
/// [`MAX_SLOWDOWN`] per entry at [`MAX_DIRTY_KEYS`]), so that a materializer that falls behind
/// throttles commits gradually (larger group-commit batches, a few ms more per ack) instead of
/// stopping them for a whole round at the hard bound (the slowdown before the stop of
/// RocksDB's write stalls).
pub const SLOW_DIRTY_KEYS: usize = 100_000;

/// The longest pause apply takes per entry while slowing down.
pub const MAX_SLOWDOWN: std::time::Duration = std::time::Duration::from_millis(4);

/// How long apply pauses after an entry when `dirty` keys wait in the overlay (see
/// [`SLOW_DIRTY_KEYS`]); `None` at or over [`MAX_DIRTY_KEYS`] (wait for the materializer).
pub fn slowdown(dirty: usize) -> Option<std::time::Duration> {
    if dirty >= MAX_DIRTY_KEYS {
        return None;
    }
    let over = dirty.saturating_sub(SLOW_DIRTY_KEYS) as f64 / (MAX_DIRTY_KEYS - SLOW_DIRTY_KEYS) as f64;
    Some(MAX_SLOWDOWN.mul_f64(over))
}

/// A full key (table byte + key) in the overlay, held inline up to 48 bytes (every key of the
/// hot tables at typical id lengths: an event key is 10 bytes more than its user id). A layer's
/// B-tree compares a new key with ~20 others on insert; inline, each comparison reads the node it
/// is in, where a `Vec<u8>` key sent it to another heap block each time. Ordered as the bytes.
pub type Key = smallvec::SmallVec<[u8; 48]>;

/// Pending writes: full key (table byte + key) → value, `None` for a deletion.
pub type Layer = BTreeMap<Key, Option<IVec>>;

/// `bounds` over byte slices, for a range over a [`Layer`] (whose keys borrow as `[u8]`).
fn slices(bounds: &(Bound<Vec<u8>>, Bound<Vec<u8>>)) -> (Bound<&[u8]>, Bound<&[u8]>) {
    (bounds.0.as_ref().map(Vec::as_slice), bounds.1.as_ref().map(Vec::as_slice))
}

#[derive(Default)]
struct Layers {
    /// Writes of applied entries not yet handed to the materializer. Written only by apply.
    active: Layer,
    /// What the materializer is writing to sled now; dropped once sled has it.
    flushing: Option<Arc<Layer>>,
    /// Bytes of keys and values merged into `active` (a key written twice counts twice: an upper
    /// bound), and in `flushing`.
    active_bytes: usize,
    flushing_bytes: usize,
}

/// One sled tree of tables, under the in-memory overlay. See the module docs.
pub struct Store {
    tree: sled::Tree,
    /// Who writes: apply (`merge`) and the materializer (swap, clear). Readers: every query.
    layers: RwLock<Layers>,
    /// Serializes materializations (background thread, checkpoint, backup, inline backpressure).
    flush: Mutex<()>,
    /// Signalled after every materialization (with `done`), for [`Store::wait_below`].
    done: parking_lot::Condvar,
    done_lock: Mutex<()>,
    /// Index of the last applied entry (in the overlay or in sled); changed under `layers`' lock.
    applied: AtomicU64,
    /// Index whose writes are all in sled (`meta/applied` in sled).
    materialized: AtomicU64,
    /// Until when rounds skip the idle writer (set for [`IDLE_COOLDOWN`] after a take-over:
    /// the machine is busy, and a writer preempted inside a sled insert holds sled's epoch, so
    /// no thread's sled garbage is freed until it runs again). Only the `flush` lock's holder
    /// reads or writes it.
    idle_off_until: Mutex<Option<std::time::Instant>>,
}

/// The full key of `key` in table `t`.
pub fn full_key(t: TreeId, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 1);
    k.push(t as u8);
    k.extend_from_slice(key);
    k
}

/// The smallest full key strictly after every full key of `t` that starts with `prefix`.
fn prefix_end(t: TreeId, prefix: &[u8]) -> Bound<Vec<u8>> {
    let mut end = full_key(t, prefix);
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Bound::Excluded(end);
        }
    }
    Bound::Unbounded
}

impl Store {
    /// Opens the store in `db`, moving the data of the older layout (one sled tree per table)
    /// into the single tree first if there is any.
    pub fn open(db: &sled::Db, dir: &Path) -> Result<Store, StorageError> {
        let tree = db.open_tree(STATE_TREE)?;
        migrate_from_trees(db, &tree, dir)?;
        finish_redo(&tree)?;
        let applied = match tree.get(full_key(TreeId::Meta, APPLIED_KEY))? {
            Some(v) => be_u64(&v)?,
            None => 0,
        };
        Ok(Store {
            tree,
            layers: RwLock::new(Layers::default()),
            flush: Mutex::new(()),
            done: parking_lot::Condvar::new(),
            done_lock: Mutex::new(()),
            applied: AtomicU64::new(applied),
            materialized: AtomicU64::new(applied),
            idle_off_until: Mutex::new(None),
        })
    }

    /// Index of the last applied entry (0: none).
    pub fn applied(&self) -> u64 {
        self.applied.load(Ordering::Acquire)
    }

    /// Index whose writes are all in sled.
    pub fn materialized(&self) -> u64 {
        self.materialized.load(Ordering::Acquire)
    }

    /// Keys waiting in the overlay (active + flushing).
    pub fn dirty_keys(&self) -> usize {
        self.waiting().0
    }

    /// Bytes of keys and values waiting in the overlay (active + flushing; an upper bound).
    pub fn dirty_bytes(&self) -> usize {
        self.waiting().1
    }

    /// (keys, bytes) waiting in the overlay, read under one lock.
    fn waiting(&self) -> (usize, usize) {
        let l = self.layers.read();
        (l.active.len() + l.flushing.as_ref().map_or(0, |f| f.len()), l.active_bytes + l.flushing_bytes)
    }

    /// How full the overlay is, in keys: the keys waiting, or the bytes waiting counted as keys
    /// of [`MAX_DIRTY_BYTES`] / [`MAX_DIRTY_KEYS`] bytes each, whichever is more. Backpressure
    /// ([`slowdown`], [`Store::wait_below`]) reads this, so that a few large messages bound
    /// memory as many small ones do.
    pub fn fill(&self) -> usize {
        let (keys, bytes) = self.waiting();
        keys.max(bytes / (MAX_DIRTY_BYTES / MAX_DIRTY_KEYS))
    }

    /// Whether the materializer is behind: more than [`BEHIND_KEYS`] keys or [`BEHIND_BYTES`]
    /// bytes wait in the overlay.
    fn behind(&self) -> bool {
        let (keys, bytes) = self.waiting();
        keys > BEHIND_KEYS || bytes > BEHIND_BYTES
    }

    /// A value as of the last applied entry.
    pub fn get(&self, t: TreeId, key: &[u8]) -> Result<Option<IVec>, StorageError> {
        self.get_full(&full_key(t, key))
    }

    /// Like [`get`](Self::get), by full key (table byte + key).
    pub fn get_full(&self, k: &[u8]) -> Result<Option<IVec>, StorageError> {
        {
            let l = self.layers.read();
            if let Some(v) = l.active.get(k) {
                return Ok(v.clone());
            }
            if let Some(v) = l.flushing.as_ref().and_then(|f| f.get(k)) {
                return Ok(v.clone());
            }
        }
        // Absent from both layers now, so sled already has its newest value (the materializer
        // drops a flushing layer only after sled holds it).
        Ok(self.tree.get(k)?)
    }

    /// Live entries of table `t` with `lo <= key <= hi` (keys without the table byte), in key
    /// order, at most `limit`. `extra` is a further layer on top (apply's own writes).
    pub fn range(&self, t: TreeId, lo: &[u8], hi: Bound<&[u8]>, limit: usize, extra: Option<&Layer>) -> Result<Vec<(Vec<u8>, IVec)>, StorageError> {
        let lo = full_key(t, lo);
        let hi: Bound<Vec<u8>> = match hi {
            Bound::Included(h) => Bound::Included(full_key(t, h)),
            Bound::Excluded(h) => Bound::Excluded(full_key(t, h)),
            Bound::Unbounded => match prefix_end(t, &[]) {
                b @ Bound::Excluded(_) => b,
                _ => Bound::Unbounded,
            },
        };
        self.range_full(lo, hi, limit, extra)
    }

    /// Live entries of table `t` whose key starts with `prefix`, in key order, at most `limit`.
    pub fn scan_prefix(&self, t: TreeId, prefix: &[u8], limit: usize, extra: Option<&Layer>) -> Result<Vec<(Vec<u8>, IVec)>, StorageError> {
        self.range_full(full_key(t, prefix), prefix_end(t, prefix), limit, extra)
    }

    /// The live entry of table `t` with the greatest key starting with `prefix` (key without the
    /// table byte), or `None`. Reads the last key of each overlay layer's range and of sled's, so
    /// it costs a few lookups whatever the number of keys; only when the newest of those keys is
    /// a deletion does it fall back to merging the whole range.
    pub fn last_in_prefix(&self, t: TreeId, prefix: &[u8]) -> Result<Option<(Vec<u8>, IVec)>, StorageError> {
        let lo = full_key(t, prefix);
        let bounds = (Bound::Included(lo.clone()), prefix_end(t, prefix));
        // (key, value) of the greatest key of each overlay layer, newest layer first.
        let (active, flushing) = {
            let l = self.layers.read();
            let last = |layer: &Layer| layer.range::<[u8], _>(slices(&bounds)).next_back().map(|(k, v)| (k.to_vec(), v.clone()));
            (last(&l.active), l.flushing.as_deref().and_then(last))
        };
        // Read after the layers: a key that left them since is in sled now.
        let disk = self.tree.range::<Vec<u8>, _>(bounds.clone()).next_back().transpose()?;
        let mut best: Option<(Vec<u8>, Option<IVec>)> = None;
        for (k, v) in [active, flushing].into_iter().flatten().chain(disk.map(|(k, v)| (k.to_vec(), Some(v)))) {
            // Newest first, so on equal keys the first one seen is the current value.
            if best.as_ref().is_none_or(|(b, _)| k > *b) {
                best = Some((k, v));
            }
        }
        match best {
            None => Ok(None),
            Some((k, Some(v))) => Ok(Some((k[1..].to_vec(), v))),
            Some((_, None)) => Ok(self.range_merged(lo, bounds.1, usize::MAX, None, None)?.pop()),
        }
    }

    fn range_full(&self, lo: Vec<u8>, hi: Bound<Vec<u8>>, limit: usize, extra: Option<&Layer>) -> Result<Vec<(Vec<u8>, IVec)>, StorageError> {
        let empty = match &hi {
            Bound::Included(h) => lo > *h,
            Bound::Excluded(h) => lo >= *h,
            Bound::Unbounded => false,
        };
        if empty {
            // (BTreeMap::range panics on such bounds.)
            return Ok(Vec::new());
        }
        if limit < usize::MAX {
            if let Some(out) = self.range_bounded(&lo, &hi, limit, extra)? {
                return Ok(out);
            }
        }
        self.range_merged(lo, hi, limit, extra, None)
    }

    /// A page of at most `limit` entries that copies only the head of each overlay layer's range
    /// (a page of 100 events used to copy all of a 20,000-event backlog waiting in the overlay):
    /// each layer gives its keys up to the one holding its `limit`-th live value, and the merge
    /// stops at the lowest such key, below which every layer's entries were copied. `None` when
    /// the page would need keys past it (tombstones of a newer layer hid values of an older one).
    fn range_bounded(&self, lo: &[u8], hi: &Bound<Vec<u8>>, limit: usize, extra: Option<&Layer>) -> Result<Option<Vec<(Vec<u8>, IVec)>>, StorageError> {
        let bounds = (Bound::Included(lo.to_vec()), hi.clone());
        // The lowest key at which a layer's copy was cut (None: no layer was cut).
        let mut cut: Option<Key> = None;
        let mut copy = |layer: &Layer, over: &mut Vec<(Key, Option<IVec>)>| {
            let mut live = 0;
            for (k, v) in layer.range::<[u8], _>(slices(&bounds)) {
                over.push((k.clone(), v.clone()));
                live += usize::from(v.is_some());
                if live == limit {
                    if cut.as_ref().is_none_or(|c| k < c) {
                        cut = Some(k.clone());
                    }
                    break;
                }
            }
        };
        // Oldest layer first, so that extending a map with them leaves the newest value.
        let mut copied = Vec::new();
        {
            let l = self.layers.read();
            if let Some(f) = &l.flushing {
                copy(f, &mut copied);
            }
            copy(&l.active, &mut copied);
        }
        if let Some(x) = extra {
            copy(x, &mut copied);
        }
        let over: Layer = copied.into_iter().collect();
        let Some(cut) = cut else {
            // Every layer's whole range was copied.
            return self.range_merged(lo.to_vec(), hi.clone(), limit, None, Some(over)).map(Some);
        };
        let upto = Bound::Included(cut.to_vec());
        let below: Layer = over.range::<[u8], _>((Bound::Unbounded, Bound::Included(cut.as_slice()))).map(|(k, v)| (k.clone(), v.clone())).collect();
        let out = self.range_merged(lo.to_vec(), upto, limit, None, Some(below))?;
        Ok((out.len() == limit).then_some(out))
    }

    /// Merges the overlay's part of `lo..hi` (`over` when the caller copied it already, else the
    /// whole range of every layer and of `extra`, newest winning) with sled's.
    fn range_merged(&self, lo: Vec<u8>, hi: Bound<Vec<u8>>, limit: usize, extra: Option<&Layer>, over: Option<Layer>) -> Result<Vec<(Vec<u8>, IVec)>, StorageError> {
        let bounds = (Bound::Included(lo), hi);
        let over = match over {
            Some(o) => o,
            None => {
                // The overlay's part of the range, newest layer winning.
                let mut over: Layer = BTreeMap::new();
                {
                    let l = self.layers.read();
                    if let Some(f) = &l.flushing {
                        over.extend(f.range::<[u8], _>(slices(&bounds)).map(|(k, v)| (k.clone(), v.clone())));
                    }
                    over.extend(l.active.range::<[u8], _>(slices(&bounds)).map(|(k, v)| (k.clone(), v.clone())));
                }
                if let Some(x) = extra {
                    over.extend(x.range::<[u8], _>(slices(&bounds)).map(|(k, v)| (k.clone(), v.clone())));
                }
                over
            }
        };
        let mut out = Vec::new();
        let mut over = over.into_iter().peekable();
        let mut disk = self.tree.range::<Vec<u8>, _>(bounds);
        let mut next_disk = disk.next().transpose()?;
        while out.len() < limit {
            let take_over = match (over.peek(), &next_disk) {
                (None, None) => break,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (Some((ok, _)), Some((dk, _))) => ok.as_slice() <= dk.as_ref(),
            };
            if take_over {
                let Some((k, v)) = over.next() else { break };
                if next_disk.as_ref().is_some_and(|(dk, _)| dk.as_ref() == k.as_slice()) {
                    next_disk = disk.next().transpose()?;
                }
                if let Some(v) = v {
                    out.push((k[1..].to_vec(), v));
                }
            } else if let Some((k, v)) = next_disk.take() {
                out.push((k[1..].to_vec(), v));
                next_disk = disk.next().transpose()?;
            }
        }
        Ok(out)
    }

    /// Merges the writes of applied entry `index` (in any order; a key at most once) into the
    /// active layer and makes it the applied index, atomically for readers. Each write is
    /// inserted straight into the layer: sorting an entry's writes into a map of their own first
    /// cost more than it saved (a group message's ~1,000 keys, each for another user, go to
    /// places all over the layer anyway).
    pub fn merge<K: Into<Key>>(&self, index: u64, writes: impl IntoIterator<Item = (K, Option<IVec>)>) {
        let mut l = self.layers.write();
        let mut bytes = 0;
        for (k, v) in writes {
            let k = k.into();
            bytes += k.len() + v.as_ref().map_or(0, |v| v.len());
            l.active.insert(k, v);
        }
        l.active_bytes += bytes;
        self.applied.store(index, Ordering::Release);
    }

    /// Writes the active layer to sled as one atomic batch, with the applied index it covers.
    /// Returns the materialized index. On a sled failure the writes stay in the overlay.
    pub fn materialize(&self) -> Result<u64, StorageError> {
        self.materialize_with(None)
    }

    /// [`materialize`](Self::materialize), with the sled writes done by `writer` (the
    /// materializer thread's [`IdleWriter`]) instead of the calling thread.
    pub fn materialize_with(&self, writer: Option<&IdleWriter>) -> Result<u64, StorageError> {
        let r = {
            let _one = self.flush.lock();
            self.materialize_locked(writer)
        };
        let _g = self.done_lock.lock();
        self.done.notify_all();
        r
    }

    /// Backpressure for apply: while the overlay holds more than `max` keys ([`Store::fill`]), waits for the
    /// materializer thread to write them (each of its rounds wakes this), at most `patience` in
    /// all; after that (no materializer is running, or it is stuck) materializes here. Waiting
    /// costs the commit thread the rest of the materializer's current round; writing a large
    /// layer here instead stalled every ack for the whole write (2.3 s at 26,000 msg/s).
    pub fn wait_below(&self, max: usize, patience: std::time::Duration) -> Result<(), StorageError> {
        let deadline = std::time::Instant::now() + patience;
        // Checked under `done_lock`, which a round holds to signal its end: no wake-up is lost.
        let mut g = self.done_lock.lock();
        while self.fill() > max {
            if self.done.wait_until(&mut g, deadline).timed_out() {
                drop(g);
                if self.fill() > max {
                    self.materialize()?;
                }
                return Ok(());
            }
        }
        Ok(())
    }

    /// Materializes, then calls `f` with the sled tree while no materialization can change it,
    /// and the applied index it holds (for a consistent snapshot; apply goes on in memory).
    pub fn quiescent<R>(&self, f: impl FnOnce(&sled::Tree, u64) -> Result<R, StorageError>) -> Result<R, StorageError> {
        let _one = self.flush.lock();
        let upto = self.materialize_locked(None)?;
        f(&self.tree, upto)
    }

    /// [`materialize`](Self::materialize), with `flush` held by the caller.
    fn materialize_locked(&self, writer: Option<&IdleWriter>) -> Result<u64, StorageError> {
        let (layer, upto) = {
            let mut l = self.layers.write();
            if l.active.is_empty() && self.applied() == self.materialized() {
                return Ok(self.materialized());
            }
            let layer = Arc::new(std::mem::take(&mut l.active));
            l.flushing = Some(layer.clone());
            l.flushing_bytes = std::mem::take(&mut l.active_bytes);
            (layer, self.applied())
        };
        let cooling = self.idle_off_until.lock().is_some_and(|t| std::time::Instant::now() < t);
        let r = match writer {
            // Already behind, or the machine was too busy lately: no time for idle priority.
            Some(w) if !self.behind() && !cooling => w.write(&self.tree, layer.clone(), upto, IDLE_ROUND_PATIENCE, IDLE_ROUND_MAX, || self.behind()).map(|took_over| {
                if took_over {
                    *self.idle_off_until.lock() = Some(std::time::Instant::now() + IDLE_COOLDOWN);
                }
            }),
            _ => write_with_redo(&self.tree, &layer, upto),
        };
        let mut l = self.layers.write();
        l.flushing = None;
        let flushed_bytes = std::mem::take(&mut l.flushing_bytes);
        match r {
            Ok(()) => {
                self.materialized.store(upto, Ordering::Release);
                Ok(upto)
            }
            Err(e) => {
                // Put the writes back under the newer ones; a later round retries.
                let newer = std::mem::take(&mut l.active);
                l.active = Arc::try_unwrap(layer).unwrap_or_else(|a| (*a).clone());
                l.active.extend(newer);
                l.active_bytes += flushed_bytes;
                Err(e.into())
            }
        }
    }

    /// Every live entry of table `t` in sled and the overlay, in key order (keys without the
    /// table byte). For admin commands, verify and tests: reads the whole table.
    pub fn table(&self, t: TreeId) -> Result<Vec<(Vec<u8>, IVec)>, StorageError> {
        self.scan_prefix(t, &[], usize::MAX, None)
    }

    /// The sled tree (only for a backup's copy, after [`materialize`](Self::materialize)).
    pub fn tree(&self) -> &sled::Tree {
        &self.tree
    }
}

/// A thread that writes layers to sled at the lowest CPU priority (Linux `SCHED_IDLE`, see
/// sched(7)): it runs only when no other thread of the machine wants the core, so a round of
/// sled inserts (10–50 ms of CPU for a few thousand keys) never delays a session or the commit
/// thread. On 2 cores at 4,000 msg/s this took the ack p99 from 14.4–17.6 ms to 7.5–13.0 ms
/// (BENCHMARKS.md, issue 11, fifth round).
///
/// A thread at idle priority must never hold what a normal thread waits for, or it would make
/// that thread wait as long as the machine is busy (priority inversion). So it holds no lock:
/// the materializer thread (normal priority) keeps the overlay's lock work (swap, clear), the
/// `flush` lock and the redo record, hands it only the layer's keys and waits for the answer.
/// While it waits it watches the overlay: once the round has run longer than
/// [`IDLE_ROUND_PATIENCE`] and more than [`BEHIND_KEYS`] keys or [`BEHIND_BYTES`] bytes wait, or
/// the round has run longer than [`IDLE_ROUND_MAX`] (the machine has been too busy to give the
/// writer time), it raises the writer's stop flag,
/// which the writer reads every [`STOP_CHECK_KEYS`] keys; the writer answers where it stopped,
/// and the materializer writes the rest of the layer itself, at normal priority. Only one thread
/// writes a layer at a time, in key order, so the result is the same. A round that starts
/// behind is written by the materializer directly. The thread ends when the writer is dropped.
pub struct IdleWriter {
    jobs: crossbeam_channel::Sender<WriteJob>,
}

/// The keys of one layer for the [`IdleWriter`]: tree, layer, stop flag, and where to answer
/// how far it got (`None`: every key; `Some(i)`: the keys before the `i`-th, stopped by the
/// flag).
type WriteJob = (sled::Tree, Arc<Layer>, Arc<AtomicBool>, crossbeam_channel::Sender<sled::Result<Option<usize>>>);

/// How long a round may take on the idle writer before the materializer considers taking it
/// over (only when [`BEHIND_KEYS`] keys also wait).
pub const IDLE_ROUND_PATIENCE: std::time::Duration = std::time::Duration::from_millis(100);

/// The longest a round may take on the idle writer, behind or not: past it the materializer
/// takes the round over. On a machine kept busy by another process (`SCHED_IDLE` yields to it
/// entirely) rounds otherwise took 2.2 s each (100 users × 20 msg/s beside two busy loops: 29
/// rounds in 65 s), and the overlay held seconds of traffic.
pub const IDLE_ROUND_MAX: std::time::Duration = std::time::Duration::from_millis(500);

/// How long rounds are written at normal priority after a take-over (see
/// [`Store::materialize_with`]): 2 s, so that on a machine that stays busy one round in every
/// 2 s waits for the idle writer instead of every round.
pub const IDLE_COOLDOWN: std::time::Duration = std::time::Duration::from_secs(2);

/// Keys waiting in the overlay above which the materializer writes at normal priority (an
/// eighth of [`MAX_DIRTY_KEYS`], half of where apply starts slowing down).
pub const BEHIND_KEYS: usize = MAX_DIRTY_KEYS / 8;

/// Bytes waiting in the overlay above which the materializer writes at normal priority, as
/// [`BEHIND_KEYS`] for keys: 1 MiB, some 12 rounds of 20 ms at 4,000 msg/s of 100-byte
/// messages (~1.1 KiB of keys and values per message). Without it a machine kept busy by another process (which `SCHED_IDLE` yields to
/// entirely) held a round of few, large messages in memory for as long as it stayed busy: a
/// reader that did not read saw the server grow by 28 MiB for 9.5 MiB sent to it
/// (`tests/it/overload.rs`, the slow consumer, beside a build).
pub const BEHIND_BYTES: usize = 1 << 20;

impl IdleWriter {
    /// Starts the writer thread `parley-sled-write`. With `idle` false, or where the policy
    /// cannot be set (not Linux, or refused; logged), it runs at normal priority.
    pub fn spawn(idle: bool) -> std::io::Result<IdleWriter> {
        let (tx, rx) = crossbeam_channel::bounded::<WriteJob>(1);
        std::thread::Builder::new().name("parley-sled-write".into()).spawn(move || {
            if idle {
                if let Err(e) = set_idle_priority() {
                    tracing::warn!(error = %e, "cannot lower the sled writer to SCHED_IDLE; it runs at normal priority");
                }
            }
            for (tree, layer, stop, reply) in rx {
                let r = write_keys_from(&tree, &layer, 0, Some(&stop));
                // The caller may take the layer back (`Arc::try_unwrap`) once answered.
                drop(layer);
                let _ = reply.send(r);
            }
        })?;
        Ok(IdleWriter { jobs: tx })
    }

    /// Writes `layer` and `meta/applied = upto` into `tree` (module docs): the redo record and,
    /// at the end, `meta/applied` and the record's removal on this thread, the keys on the
    /// writer thread, finishing them on this thread if `behind()` says so once the round has
    /// taken `patience`, or in any case once it has taken `max_round` ([`IDLE_ROUND_MAX`]; looked
    /// at every 10 ms). Returns whether this thread took over.
    fn write(&self, tree: &sled::Tree, layer: Arc<Layer>, upto: u64, patience: std::time::Duration, max_round: std::time::Duration, behind: impl Fn() -> bool) -> sled::Result<bool> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let stop = Arc::new(AtomicBool::new(false));
        let t0 = std::time::Instant::now();
        let look = || {
            let took = t0.elapsed();
            if took >= max_round || (took >= patience && behind()) {
                stop.store(true, Ordering::Release);
            }
        };
        let chunks = write_redo(tree, &layer, upto)?;
        look();
        let gone = || sled::Error::Io(std::io::Error::other("the sled writer thread is gone"));
        self.jobs.send((tree.clone(), layer.clone(), stop.clone(), tx)).map_err(|_| gone())?;
        let stopped_at = loop {
            match rx.recv_timeout(std::time::Duration::from_millis(10)) {
                Ok(r) => break r?,
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => look(),
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return Err(gone()),
            }
        };
        if let Some(next) = stopped_at {
            metrics::counter!("parley_materialize_takeovers_total").increment(1);
            write_keys_from(tree, &layer, next, None)?;
        }
        finish_write(tree, upto, chunks)?;
        Ok(stopped_at.is_some())
    }
}

/// Puts the calling thread under `SCHED_IDLE` (Linux: sched_setscheduler(2) with pid 0 is the
/// calling thread). Lowering one's own priority needs no privilege.
#[cfg(target_os = "linux")]
fn set_idle_priority() -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: a plain syscall on the calling thread with a valid parameter struct.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn set_idle_priority() -> std::io::Result<()> {
    Err(std::io::Error::other("SCHED_IDLE exists only on Linux"))
}

/// Moves the tables of the layout before the single tree (one sled tree per table, named as in
/// [`TREES`]) into `tree`, writing the applied index last, then drops the old trees. Runs again
/// after a crash midway: copying is idempotent and the old trees go only after the copy.
fn migrate_from_trees(db: &sled::Db, tree: &sled::Tree, dir: &Path) -> Result<(), StorageError> {
    let names = db.tree_names();
    if !names.iter().any(|n| n.as_ref() == TREES[TreeId::Meta as usize].as_bytes()) {
        return Ok(());
    }
    let mut applied = None;
    for (i, name) in TREES.iter().enumerate() {
        let old = db.open_tree(name)?;
        let mut batch = sled::Batch::default();
        let mut n = 0;
        for kv in old.iter() {
            let (k, v) = kv?;
            let mut fk = Vec::with_capacity(k.len() + 1);
            fk.push(i as u8);
            fk.extend_from_slice(&k);
            if i == TreeId::Meta as usize && k.as_ref() == APPLIED_KEY {
                applied = Some(v);
                continue;
            }
            batch.insert(fk, v);
            n += 1;
            if n % 10_000 == 0 {
                tree.apply_batch(std::mem::take(&mut batch))?;
            }
        }
        tree.apply_batch(batch)?;
    }
    if let Some(a) = applied {
        tree.insert(full_key(TreeId::Meta, APPLIED_KEY), a)?;
    }
    db.flush()?;
    fsync_tree(dir)?;
    for name in TREES.iter() {
        db.drop_tree(name)?;
    }
    tracing::info!("moved the state into one sled tree (the layout before issue 11 had one tree per table)");
    Ok(())
}

/// `meta` key of the redo marker: applied index (u64 BE), chunk count (u32 BE), CRC-32 of the
/// concatenated chunks (u32 BE).
const REDO_KEY: &[u8] = b"redo";
/// `meta` key prefix of the redo record's chunks: `redo/` + chunk number (u32 BE).
const REDO_CHUNK: &[u8] = b"redo/";
/// Largest redo chunk, in bytes.
const REDO_CHUNK_BYTES: usize = 256 * 1024;

fn redo_chunk_key(i: u32) -> Vec<u8> {
    let mut k = REDO_CHUNK.to_vec();
    k.extend_from_slice(&i.to_be_bytes());
    full_key(TreeId::Meta, &k)
}

/// Writes `layer` and `meta/applied = upto` into `tree` through a redo record (module docs).
fn write_with_redo(tree: &sled::Tree, layer: &Layer, upto: u64) -> sled::Result<()> {
    write_with_redo_until(tree, layer, upto, usize::MAX)
}

/// [`write_with_redo`] that stops, as a crash would, after `crash_after` keys (tests).
fn write_with_redo_until(tree: &sled::Tree, layer: &Layer, upto: u64, crash_after: usize) -> sled::Result<()> {
    let chunks = write_redo(tree, layer, upto)?;
    if crash_after < layer.len() {
        for (k, v) in layer.iter().take(crash_after) {
            match v {
                Some(v) => tree.insert(k.as_slice(), v.clone())?,
                None => tree.remove(k.as_slice())?,
            };
        }
        return Ok(());
    }
    write_keys_from(tree, layer, 0, None)?;
    finish_write(tree, upto, chunks)
}

/// Writes the redo record of `layer` (covering `upto`) and its marker; returns the chunk count.
fn write_redo(tree: &sled::Tree, layer: &Layer, upto: u64) -> sled::Result<u32> {
    // The record: per key, len (u32 BE) + key, then 0 (deleted) or 1 + len (u32 BE) + value.
    let mut rec = Vec::new();
    for (k, v) in layer {
        rec.extend_from_slice(&(k.len() as u32).to_be_bytes());
        rec.extend_from_slice(k);
        match v {
            None => rec.push(0),
            Some(v) => {
                rec.push(1);
                rec.extend_from_slice(&(v.len() as u32).to_be_bytes());
                rec.extend_from_slice(v);
            }
        }
    }
    let chunks: Vec<&[u8]> = rec.chunks(REDO_CHUNK_BYTES).collect();
    for (i, c) in chunks.iter().enumerate() {
        tree.insert(redo_chunk_key(i as u32), *c)?;
    }
    let mut marker = upto.to_be_bytes().to_vec();
    marker.extend_from_slice(&(chunks.len() as u32).to_be_bytes());
    marker.extend_from_slice(&crc32fast::hash(&rec).to_be_bytes());
    tree.insert(full_key(TreeId::Meta, REDO_KEY), marker)?;
    Ok(chunks.len() as u32)
}

/// How many keys the sled writer inserts between two looks at its stop flag: every key (a look
/// is one atomic load beside a sled insert's ~8 µs), so that a writer the machine runs only now
/// and then answers a take-over at its next key, not 32 keys later.
const STOP_CHECK_KEYS: usize = 1;

/// Inserts (or removes) the keys of `layer` from the `start`-th on, in order. With `stop`, looks
/// at it every [`STOP_CHECK_KEYS`] keys and, once set, returns `Some(i)`: the keys before the
/// `i`-th are written. `None`: every key is written.
fn write_keys_from(tree: &sled::Tree, layer: &Layer, start: usize, stop: Option<&AtomicBool>) -> sled::Result<Option<usize>> {
    for (i, (k, v)) in layer.iter().enumerate().skip(start) {
        if let Some(stop) = stop {
            if (i - start) % STOP_CHECK_KEYS == 0 && stop.load(Ordering::Acquire) {
                return Ok(Some(i));
            }
        }
        match v {
            Some(v) => tree.insert(k.as_slice(), v.clone())?,
            None => tree.remove(k.as_slice())?,
        };
    }
    Ok(None)
}

/// After every key of a layer is in sled: `meta/applied = upto`, then the redo record goes.
fn finish_write(tree: &sled::Tree, upto: u64, chunks: u32) -> sled::Result<()> {
    tree.insert(full_key(TreeId::Meta, APPLIED_KEY), &upto.to_be_bytes()[..])?;
    tree.remove(full_key(TreeId::Meta, REDO_KEY))?;
    for i in 0..chunks {
        tree.remove(redo_chunk_key(i))?;
    }
    Ok(())
}

/// Plain inserts and removes of every key, then `meta/applied = upto`.
fn write_layer<'a>(tree: &sled::Tree, kvs: impl Iterator<Item = (&'a [u8], Option<&'a [u8]>)>, upto: u64) -> sled::Result<()> {
    for (k, v) in kvs {
        match v {
            Some(v) => tree.insert(k, v)?,
            None => tree.remove(k)?,
        };
    }
    tree.insert(full_key(TreeId::Meta, APPLIED_KEY), &upto.to_be_bytes()[..])?;
    Ok(())
}

/// At open: finishes a materialization that a crash interrupted (a redo marker is present), and
/// removes redo chunks left without a marker.
fn finish_redo(tree: &sled::Tree) -> Result<(), StorageError> {
    if let Some(marker) = tree.get(full_key(TreeId::Meta, REDO_KEY))? {
        let bad = |what: &str| StorageError::Decode(format!("redo record: {what}"));
        if marker.len() != 16 {
            return Err(bad("marker length"));
        }
        let upto = be_u64(&marker[..8])?;
        let n = u32::from_be_bytes(marker[8..12].try_into().map_err(|_| bad("marker"))?);
        let crc = u32::from_be_bytes(marker[12..16].try_into().map_err(|_| bad("marker"))?);
        let mut rec = Vec::new();
        for i in 0..n {
            let c = tree.get(redo_chunk_key(i))?.ok_or_else(|| bad("missing chunk"))?;
            rec.extend_from_slice(&c);
        }
        if crc32fast::hash(&rec) != crc {
            return Err(bad("checksum mismatch"));
        }
        let mut kvs = Vec::new();
        let mut r = rec.as_slice();
        let take = |n: usize, r: &mut &[u8]| -> Result<Vec<u8>, StorageError> {
            if r.len() < n {
                return Err(bad("truncated"));
            }
            let (a, b) = r.split_at(n);
            *r = b;
            Ok(a.to_vec())
        };
        while !r.is_empty() {
            let kl = be_u32(&take(4, &mut r)?)?;
            let k = take(kl as usize, &mut r)?;
            let v = match take(1, &mut r)?[0] {
                0 => None,
                _ => {
                    let vl = be_u32(&take(4, &mut r)?)?;
                    Some(take(vl as usize, &mut r)?)
                }
            };
            kvs.push((k, v));
        }
        write_layer(tree, kvs.iter().map(|(k, v)| (k.as_slice(), v.as_deref())), upto)?;
        tree.remove(full_key(TreeId::Meta, REDO_KEY))?;
        tracing::warn!(applied = upto, keys = kvs.len(), "finished writing the state into sled after an interrupted materialization (redo record)");
    }
    for kv in tree.scan_prefix(full_key(TreeId::Meta, REDO_CHUNK)) {
        let (k, _) = kv?;
        tree.remove(k)?;
    }
    Ok(())
}

fn be_u32(v: &[u8]) -> Result<u32, StorageError> {
    let b: [u8; 4] = v.try_into().map_err(|_| StorageError::Decode("u32 value".into()))?;
    Ok(u32::from_be_bytes(b))
}

/// Fills an empty `tree` from a snapshot file (see [`snapshot`](super::snapshot)); returns its
/// applied index. Used to rebuild a damaged state.
pub fn load_snapshot(tree: &sled::Tree, file: &Path) -> Result<u64, StorageError> {
    let mut batch = sled::Batch::default();
    let mut n = 0usize;
    let mut err = None;
    let (index, _) = super::snapshot::read(file, |k, v| {
        batch.insert(k, v);
        n += 1;
        if n % 10_000 == 0 {
            if let Err(e) = tree.apply_batch(std::mem::take(&mut batch)) {
                err = Some(e);
            }
        }
        Ok(())
    })?;
    if let Some(e) = err {
        return Err(e.into());
    }
    tree.apply_batch(batch)?;
    let applied = tree.get(full_key(TreeId::Meta, APPLIED_KEY))?.map(|v| be_u64(&v)).transpose()?.unwrap_or(0);
    if applied != index {
        return Err(StorageError::Decode(format!("snapshot {}: holds applied index {applied}, named {index}", file.display())));
    }
    Ok(index)
}

pub(crate) fn be_u64(v: &[u8]) -> Result<u64, StorageError> {
    let b: [u8; 8] = v.try_into().map_err(|_| StorageError::Decode("u64 value".into()))?;
    Ok(u64::from_be_bytes(b))
}

/// How long [`open_sled`] waits for a just-closed database's file lock, in ms.
const LOCK_RELEASE_WAIT_MS: u64 = 5_000;

/// Opens the sled database `cfg` describes, retrying for up to [`LOCK_RELEASE_WAIT_MS`] while
/// its file lock is taken: sled 0.34 releases the lock of a database just dropped only when its
/// background flusher lets go, a moment later, so a database closed and reopened at once (a
/// rebuild restoring a snapshot, a cluster installing one) could fail with "could not acquire
/// lock ... WouldBlock" (seen under parallel test load). Another process cannot hold it: the
/// data directory's own lock (`DataLock`) is taken first.
///
/// # Errors
/// sled's error when it fails otherwise, or when the lock stays taken.
pub(crate) fn open_sled(cfg: &sled::Config) -> sled::Result<sled::Db> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(LOCK_RELEASE_WAIT_MS);
    loop {
        match cfg.open() {
            // sled reports it as kind `Other` with this text (config.rs of 0.34.7), not as
            // `WouldBlock`.
            Err(sled::Error::Io(e)) if e.to_string().starts_with("could not acquire lock") && std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            r => return r,
        }
    }
}

/// fsyncs every file and directory below `dir` (and `dir` itself): sled's own `flush()` is
/// `sync_file_range`, which is not enough.
pub(crate) fn fsync_tree(dir: &Path) -> Result<(), StorageError> {
    let rd = std::fs::read_dir(dir).map_err(|e| StorageError::io(dir, e))?;
    for ent in rd {
        let ent = ent.map_err(|e| StorageError::io(dir, e))?;
        let p = ent.path();
        let ft = ent.file_type().map_err(|e| StorageError::io(&p, e))?;
        if ft.is_dir() {
            fsync_tree(&p)?;
        } else if ft.is_file() {
            std::fs::File::open(&p).and_then(|f| f.sync_all()).map_err(|e| StorageError::io(&p, e))?;
        }
    }
    std::fs::File::open(dir).and_then(|f| f.sync_all()).map_err(|e| StorageError::io(dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(n: u8, gen: u8) -> Layer {
        (0..n).map(|i| (Key::from(full_key(TreeId::Users, &[i])), if i % 7 == 3 { None } else { Some(IVec::from(vec![gen; 1 + i as usize * 997 % 300_000])) })).collect()
    }

    #[test]
    fn apply_slows_down_in_proportion_then_waits() {
        assert_eq!(slowdown(0), Some(std::time::Duration::ZERO));
        assert_eq!(slowdown(SLOW_DIRTY_KEYS), Some(std::time::Duration::ZERO));
        assert_eq!(slowdown((SLOW_DIRTY_KEYS + MAX_DIRTY_KEYS) / 2), Some(MAX_SLOWDOWN / 2));
        assert!(slowdown(MAX_DIRTY_KEYS - 1).unwrap() <= MAX_SLOWDOWN);
        assert_eq!(slowdown(MAX_DIRTY_KEYS), None);
    }

    /// `wait_below` returns once another thread's round wrote the overlay; without one, it
    /// writes the overlay itself after its patience.
    #[test]
    fn wait_below_waits_for_a_round_or_materializes_itself() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let store = Arc::new(Store::open(&db, dir.path()).unwrap());
        store.merge(1, layer(100, 1));
        let other = store.clone();
        let round = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            other.materialize().unwrap()
        });
        store.wait_below(10, std::time::Duration::from_secs(60)).unwrap();
        assert_eq!(store.dirty_keys(), 0);
        assert_eq!(round.join().unwrap(), 1, "the other thread's round wrote it");
        store.merge(2, layer(100, 2));
        store.wait_below(10, std::time::Duration::from_millis(20)).unwrap();
        assert_eq!((store.dirty_keys(), store.materialized()), (0, 2), "no round came: written here");
    }

    /// The writer thread is under `SCHED_IDLE` (sched(7): policy 5, field 41 of
    /// /proc/TID/stat) once it has a job.
    #[cfg(target_os = "linux")]
    #[test]
    fn the_sled_writer_runs_at_idle_priority() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let store = Store::open(&db, dir.path()).unwrap();
        let w = IdleWriter::spawn(true).unwrap();
        store.merge(1, layer(10, 1));
        // One round done means the thread has started and set its policy.
        assert_eq!(store.materialize_with(Some(&w)).unwrap(), 1);
        let policies: Vec<String> = std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|t| {
                let t = t.ok()?.path();
                (std::fs::read_to_string(t.join("comm")).ok()?.trim() == "parley-sled-wri").then(|| std::fs::read_to_string(t.join("stat")).ok())?
            })
            .map(|stat| stat[stat.rfind(')').unwrap() + 2..].split(' ').nth(38).unwrap().to_owned())
            .collect();
        assert!(policies.contains(&"5".to_owned()), "policies of the writer threads: {policies:?}");
    }

    /// A layer the writer leaves half-written (its stop flag raised, because the store is behind or
    /// the round ran past its longest) is finished by the caller, with the same result in sled as
    /// a layer written by one thread; so is one it writes whole. (The longest round is a
    /// parameter, so that how fast this machine writes does not decide the answer.)
    #[test]
    fn a_layer_the_writer_stops_is_finished_by_the_caller() {
        let reference = {
            let dir = tempfile::tempdir().unwrap();
            let db = sled::Config::new().path(dir.path()).open().unwrap();
            let tree = db.open_tree(STATE_TREE).unwrap();
            write_with_redo(&tree, &layer(200, 1), 7).unwrap();
            write_with_redo(&tree, &layer(150, 2), 8).unwrap();
            contents(&tree)
        };
        let (zero, never) = (std::time::Duration::ZERO, std::time::Duration::MAX);
        // (behind, longest round, taken over): behind, or a round past its longest, is taken over.
        for (behind, max_round, taken) in [(true, never, true), (false, never, false), (false, zero, true)] {
            let dir = tempfile::tempdir().unwrap();
            let db = sled::Config::new().path(dir.path()).open().unwrap();
            let tree = db.open_tree(STATE_TREE).unwrap();
            let w = IdleWriter::spawn(false).unwrap();
            assert_eq!(w.write(&tree, Arc::new(layer(200, 1)), 7, zero, max_round, || behind).unwrap(), taken);
            assert_eq!(w.write(&tree, Arc::new(layer(150, 2)), 8, zero, max_round, || behind).unwrap(), taken);
            assert_eq!(contents(&tree), reference, "behind: {behind}, longest round {max_round:?}");
        }
    }

    /// The materializer counts itself behind (and so takes a round over from the idle writer,
    /// or does not hand it one) once more than [`BEHIND_BYTES`] wait, however few the keys;
    /// backpressure counts the bytes as keys; a round clears the bytes it wrote.
    #[test]
    fn a_round_of_large_values_is_taken_over_when_too_many_bytes_wait() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let store = Store::open(&db, dir.path()).unwrap();
        let big = |i: u8, n: usize| (full_key(TreeId::ConvSeqMessage, &[i]), Some(IVec::from(vec![i; n])));
        let half = BEHIND_BYTES / 2 - 64;
        store.merge(1, [big(1, half), big(2, half)]);
        assert_eq!(store.dirty_keys(), 2);
        assert!(store.dirty_bytes() > 2 * half && !store.behind());
        store.merge(2, [big(3, 3 << 20)]);
        assert!(store.behind(), "{} bytes wait", store.dirty_bytes());
        assert_eq!(store.fill(), store.dirty_bytes() / (MAX_DIRTY_BYTES / MAX_DIRTY_KEYS));
        // Behind at the start of the round: written at normal priority, not handed to the writer.
        let w = IdleWriter::spawn(false).unwrap();
        assert_eq!(store.materialize_with(Some(&w)).unwrap(), 2);
        assert_eq!((store.dirty_keys(), store.dirty_bytes()), (0, 0));
        assert_eq!(store.get(TreeId::ConvSeqMessage, &[3]).unwrap().map(|v| v.len()), Some(3 << 20));
    }

    /// Opens sled at `dir` again after a drop: sled's own threads may hold its file lock for a
    /// moment after the last handle went (seen as "could not acquire lock" under a parallel
    /// test run), so this tries for at most 10 s.
    /// A database still open (its lock taken) is waited for, not an error; without the wait the
    /// second open fails at once.
    #[test]
    fn open_sled_waits_for_a_database_being_closed() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = sled::Config::new().path(dir.path());
        let db = cfg.open().unwrap();
        let err = cfg.open().err().expect("a second open while the first holds the lock");
        assert!(err.to_string().starts_with("IO error: could not acquire lock"), "{err}");
        let closer = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(100));
            drop(db);
        });
        let again = open_sled(&cfg).expect("opened once the first let go");
        drop(again);
        closer.join().unwrap();
    }

    fn reopen(dir: &Path) -> sled::Db {
        open_sled(&sled::Config::new().path(dir)).unwrap()
    }

    fn contents(tree: &sled::Tree) -> Vec<(Vec<u8>, Vec<u8>)> {
        tree.iter().map(|kv| kv.unwrap()).map(|(k, v)| (k.to_vec(), v.to_vec())).collect()
    }

    /// A materialization cut short at every point (before, inside and after the keys) is
    /// finished at open: every key of the layer, the applied index, and no redo left-overs.
    #[test]
    fn an_interrupted_materialization_is_finished_at_open() {
        for crash_after in [0usize, 1, 17, 99, 100] {
            let dir = tempfile::tempdir().unwrap();
            let db = sled::Config::new().path(dir.path()).open().unwrap();
            let store = Store::open(&db, dir.path()).unwrap();
            // An older generation in sled first, so half-written keys differ from both.
            store.merge(1, layer(100, 1));
            assert_eq!(store.materialize().unwrap(), 1);
            let want: Vec<(Vec<u8>, Option<IVec>)> = layer(100, 2).into_iter().map(|(k, v)| (k.to_vec(), v)).collect();
            write_with_redo_until(store.tree(), &layer(100, 2), 2, crash_after).unwrap();
            drop(store);
            drop(db);
            let db = reopen(dir.path());
            let store = Store::open(&db, dir.path()).unwrap();
            assert_eq!(store.applied(), 2, "crash after {crash_after} keys");
            for (k, v) in &want {
                assert_eq!(store.tree().get(k).unwrap(), v.clone(), "crash after {crash_after} keys");
            }
            let left: Vec<_> = contents(store.tree()).into_iter().filter(|(k, _)| k[0] == TreeId::Meta as u8 && k[1..] != *APPLIED_KEY).collect();
            assert!(left.is_empty(), "redo left-overs: {left:?}");
        }
    }

    /// Chunks written before the marker (a crash before it) are removed, and nothing applies.
    #[test]
    fn redo_chunks_without_a_marker_are_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let store = Store::open(&db, dir.path()).unwrap();
        store.merge(1, layer(10, 1));
        store.materialize().unwrap();
        let before = contents(store.tree());
        store.tree().insert(redo_chunk_key(0), &b"partial"[..]).unwrap();
        drop(store);
        let store = Store::open(&db, dir.path()).unwrap();
        assert_eq!(contents(store.tree()), before);
        assert_eq!(store.applied(), 1);
    }

    /// Reads see the overlay over sled, with deletions, in key order, also for ranges.
    #[test]
    fn reads_merge_the_overlay_over_sled() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let store = Store::open(&db, dir.path()).unwrap();
        let put = |k: u8, v: Option<u8>| (full_key(TreeId::Users, &[k]), v.map(|v| IVec::from(vec![v])));
        store.merge(1, [put(1, Some(1)), put(2, Some(2)), put(3, Some(3))]);
        store.materialize().unwrap();
        store.merge(2, [put(2, None), put(4, Some(4)), put(1, Some(9))]);
        let all: Vec<(Vec<u8>, Vec<u8>)> = store.table(TreeId::Users).unwrap().into_iter().map(|(k, v)| (k, v.to_vec())).collect();
        assert_eq!(all, vec![(vec![1], vec![9]), (vec![3], vec![3]), (vec![4], vec![4])]);
        assert_eq!(store.get(TreeId::Users, &[2]).unwrap(), None);
        let two = store.range(TreeId::Users, &[2], Bound::Unbounded, 1, None).unwrap();
        assert_eq!(two.len(), 1);
        assert_eq!(two[0].0, vec![3]);
        assert!(store.table(TreeId::Groups).unwrap().is_empty());
        assert_eq!(store.materialize().unwrap(), 2);
        assert_eq!(store.dirty_keys(), 0);
        assert_eq!(store.table(TreeId::Users).unwrap().len(), 3);
    }

    /// A limited range (a page) is the first `limit` entries of the whole merged range, whatever
    /// the layers hold: live values and tombstones in sled, the flushing layer, the active layer
    /// and apply's own writes, at any bounds.
    #[test]
    fn a_page_is_the_head_of_the_whole_range() {
        use proptest::prelude::*;
        // Per key 0..40: what sled, the flushing layer, the active layer and `extra` hold (0
        // nothing, 1 a tombstone, 2 a value).
        let cells = proptest::collection::vec((0u8..3, 0u8..3, 0u8..3, 0u8..3), 40);
        let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig { cases: 200, ..ProptestConfig::default() });
        runner
            .run(&(cells, 0u8..42, 0u8..42, 1usize..12), |(cells, lo, hi, limit)| {
                let dir = tempfile::tempdir().unwrap();
                let db = sled::Config::new().temporary(true).path(dir.path()).open().unwrap();
                let store = Store::open(&db, dir.path()).unwrap();
                let layer_of = |pick: &dyn Fn(&(u8, u8, u8, u8)) -> u8, gen: u8| -> Layer {
                    cells
                        .iter()
                        .enumerate()
                        .filter(|(_, c)| pick(c) > 0)
                        .map(|(k, c)| (Key::from(full_key(TreeId::Users, &[k as u8])), (pick(c) == 2).then(|| IVec::from(vec![gen, k as u8]))))
                        .collect()
                };
                store.merge(1, layer_of(&|c| c.0, 1));
                store.materialize().unwrap();
                store.layers.write().flushing = Some(Arc::new(layer_of(&|c| c.1, 2)));
                store.merge(2, layer_of(&|c| c.2, 3));
                let extra = layer_of(&|c| c.3, 4);
                let hi = Bound::Included(&[hi][..]);
                let page = store.range(TreeId::Users, &[lo], hi, limit, Some(&extra)).unwrap();
                let mut whole = store.range(TreeId::Users, &[lo], hi, usize::MAX, Some(&extra)).unwrap();
                whole.truncate(limit);
                prop_assert_eq!(page, whole);
                Ok(())
            })
            .unwrap();
    }

    /// The last entry of a prefix is the last entry of the whole merged range, whatever sled, the
    /// flushing layer and the active layer hold (values and tombstones), and keys of a longer
    /// prefix ("bob" beside "bo") are not in it.
    #[test]
    fn the_last_in_a_prefix_is_the_last_of_the_whole_range() {
        use proptest::prelude::*;
        // Per key 0..24 under each of the prefixes "bo\0" and "bob\0": what sled, the flushing
        // layer and the active layer hold (0 nothing, 1 a tombstone, 2 a value).
        let cells = proptest::collection::vec((0u8..2, 0u8..24, 0u8..3, 0u8..3, 0u8..3), 0..30);
        let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig { cases: 300, ..ProptestConfig::default() });
        runner
            .run(&cells, |cells| {
                let dir = tempfile::tempdir().unwrap();
                let db = sled::Config::new().temporary(true).path(dir.path()).open().unwrap();
                let store = Store::open(&db, dir.path()).unwrap();
                let key = |who: u8, k: u8| {
                    let mut key = if who == 0 { b"bo\0".to_vec() } else { b"bob\0".to_vec() };
                    key.push(k);
                    key
                };
                let layer_of = |pick: &dyn Fn(&(u8, u8, u8, u8, u8)) -> u8, gen: u8| -> Layer {
                    cells
                        .iter()
                        .filter(|c| pick(c) > 0)
                        .map(|c| (Key::from(full_key(TreeId::UserEvEvent, &key(c.0, c.1))), (pick(c) == 2).then(|| IVec::from(vec![gen, c.1]))))
                        .collect()
                };
                store.merge(1, layer_of(&|c| c.2, 1));
                store.materialize().unwrap();
                store.layers.write().flushing = Some(Arc::new(layer_of(&|c| c.3, 2)));
                store.merge(2, layer_of(&|c| c.4, 3));
                for prefix in [&b"bo\0"[..], &b"bob\0"[..]] {
                    let whole = store.scan_prefix(TreeId::UserEvEvent, prefix, usize::MAX, None).unwrap();
                    prop_assert_eq!(store.last_in_prefix(TreeId::UserEvEvent, prefix).unwrap(), whole.last().cloned());
                }
                Ok(())
            })
            .unwrap();
    }
}
