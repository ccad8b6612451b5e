//! The state machine's key-value store: one sled tree with a table byte in front of every key,
//! under an in-memory **overlay** of the writes that are not in sled yet.
//!
//! Apply (on the commit thread) never writes sled. It merges each entry's writes into the
//! overlay's *active* layer and advances the applied index, both under one write lock; the
//! answer and the ack follow. The **materializer** ([`Store::materialize`], run by a background
//! thread and before checkpoints, backups and dumps) swaps the active layer out to a *flushing*
//! layer and writes it to sled as **one** `apply_batch` (atomic in sled, also across a crash),
//! with the applied index it covers written in the same batch. Reads look at the active layer,
//! then the flushing one, then sled, so a read sees every applied entry whether or not it has
//! reached sled.
//!
//! Why: a 12-tree sled transaction per entry cost ~100 µs per `send` on the ack path (issue 11);
//! batching many entries into one sled batch coalesces the hot keys (heads, cursors, conversation
//! state) and takes sled off the ack path. It is the memtable of a log-structured store (the
//! write-ahead log plays the LSM's log; sled is the table), or Mnesia's `disc_copies`: RAM first,
//! disk from the log.
//!
//! **Invariant:** sled always holds the state after some whole entry: the batch of the writes of
//! entries `..=n` carries `meta/applied = n`. After a crash, start-up replays the log from there.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use sled::IVec;

use super::trees::{TreeId, APPLIED_KEY, TREES};
use super::StorageError;

/// Name of the one sled tree that holds every table.
pub const STATE_TREE: &str = "state";

/// Above this many keys waiting in the active layer, apply materializes inline (backpressure on
/// the commit thread instead of unbounded memory), in keys.
pub const MAX_DIRTY_KEYS: usize = 400_000;

/// Pending writes: full key (table byte + key) → value, `None` for a deletion.
pub type Layer = BTreeMap<Vec<u8>, Option<IVec>>;

#[derive(Default)]
struct Layers {
    /// Writes of applied entries not yet handed to the materializer. Written only by apply.
    active: Layer,
    /// What the materializer is writing to sled now; dropped once sled has it.
    flushing: Option<Arc<Layer>>,
}

/// One sled tree of tables, under the in-memory overlay. See the module docs.
pub struct Store {
    tree: sled::Tree,
    /// Who writes: apply (`merge`) and the materializer (swap, clear). Readers: every query.
    layers: RwLock<Layers>,
    /// Serializes materializations (background thread, checkpoint, backup, inline backpressure).
    flush: Mutex<()>,
    /// Index of the last applied entry (in the overlay or in sled); changed under `layers`' lock.
    applied: AtomicU64,
    /// Index whose writes are all in sled (`meta/applied` in sled).
    materialized: AtomicU64,
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
        let applied = match tree.get(full_key(TreeId::Meta, APPLIED_KEY))? {
            Some(v) => be_u64(&v)?,
            None => 0,
        };
        Ok(Store {
            tree,
            layers: RwLock::new(Layers::default()),
            flush: Mutex::new(()),
            applied: AtomicU64::new(applied),
            materialized: AtomicU64::new(applied),
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
        let l = self.layers.read();
        l.active.len() + l.flushing.as_ref().map_or(0, |f| f.len())
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

    fn range_full(&self, lo: Vec<u8>, hi: Bound<Vec<u8>>, limit: usize, extra: Option<&Layer>) -> Result<Vec<(Vec<u8>, IVec)>, StorageError> {
        let bounds = (Bound::Included(lo.clone()), hi.clone());
        // The overlay's part of the range, newest layer winning.
        let mut over: BTreeMap<Vec<u8>, Option<IVec>> = BTreeMap::new();
        {
            let l = self.layers.read();
            if let Some(f) = &l.flushing {
                over.extend(f.range(bounds.clone()).map(|(k, v)| (k.clone(), v.clone())));
            }
            over.extend(l.active.range(bounds.clone()).map(|(k, v)| (k.clone(), v.clone())));
        }
        if let Some(x) = extra {
            over.extend(x.range(bounds.clone()).map(|(k, v)| (k.clone(), v.clone())));
        }
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

    /// Merges the writes of applied entry `index` into the active layer and makes it the applied
    /// index, atomically for readers.
    pub fn merge(&self, index: u64, writes: Layer) {
        let mut l = self.layers.write();
        if l.active.is_empty() {
            l.active = writes;
        } else {
            l.active.extend(writes);
        }
        self.applied.store(index, Ordering::Release);
    }

    /// Writes the active layer to sled as one atomic batch, with the applied index it covers.
    /// Returns the materialized index. On a sled failure the writes stay in the overlay.
    pub fn materialize(&self) -> Result<u64, StorageError> {
        let _one = self.flush.lock();
        let (layer, upto) = {
            let mut l = self.layers.write();
            if l.active.is_empty() {
                return Ok(self.materialized());
            }
            let layer = Arc::new(std::mem::take(&mut l.active));
            l.flushing = Some(layer.clone());
            (layer, self.applied())
        };
        let mut batch = sled::Batch::default();
        for (k, v) in layer.iter() {
            match v {
                Some(v) => batch.insert(k.as_slice(), v.clone()),
                None => batch.remove(k.as_slice()),
            }
        }
        batch.insert(full_key(TreeId::Meta, APPLIED_KEY), &upto.to_be_bytes()[..]);
        let r = self.tree.apply_batch(batch);
        let mut l = self.layers.write();
        l.flushing = None;
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

pub(crate) fn be_u64(v: &[u8]) -> Result<u64, StorageError> {
    let b: [u8; 8] = v.try_into().map_err(|_| StorageError::Decode("u64 value".into()))?;
    Ok(u64::from_be_bytes(b))
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
