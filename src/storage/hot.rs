//! Apply's hot state: what the commit thread reads on every command, kept in memory so that apply
//! does not go to sled (whose `apply_batch`, run by the materializer, holds a process-wide lock
//! that stalls every sled read while it writes; see [`store`](super::store)).
//!
//! Only apply reads and writes this, on the commit thread, and only apply writes the tables it
//! caches, so every cached value is exact: a read miss loads the value from the store, and every
//! write of apply goes through to the cache. When apply fails, the whole cache is dropped (its
//! writes never reached the store). When the cache grows past its bound it is dropped and
//! refilled on demand, so memory stays bounded whatever the number of users.
//!
//! The caches:
//! - `values`: raw values of the small per-user and per-conversation tables (users,
//!   conversation meta, per-user conversation state, groups, cursors);
//! - `heads`: each user's latest ev, which is the key of its last event and is not stored apart;
//! - `recent`: the last [`RECENT_EVENTS`] events of each user's stream, which a `received`
//!   reads to find the conversations and senders it confirms;
//! - `devices`: every device cursor of a user, for the lowest-cursor computation of `received`;
//! - `sent`: hashes of every client message id a user ever sent, so a new `send` knows that its
//!   id is not a resend without reading the dedup table (a hit still reads the dedup record);
//! - `groups`: each group's member list, decoded, for the fan-out of a group `send`.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};

use fxhash::{FxHashMap as HashMap, FxHashSet as HashSet, FxHasher};
use sled::IVec;

use super::trees::TreeId;

/// Most cached values before the value cache is dropped and refilled, in entries (~100 bytes
/// each).
pub const MAX_VALUES: usize = 500_000;

/// Events remembered per user (the newest ones), in events.
pub const RECENT_EVENTS: usize = 32;

/// Most ids remembered for one user; a user with more always reads the dedup table.
pub const MAX_IDS_PER_USER: usize = 100_000;

/// Most ids remembered over all users before the id sets are dropped and rebuilt on demand.
pub const MAX_IDS: usize = 4_000_000;

/// Whether apply caches table `t` in [`Hot::values`].
pub fn cached(t: TreeId) -> bool {
    matches!(
        t,
        TreeId::Users | TreeId::ConvMeta | TreeId::UserConvState | TreeId::Groups | TreeId::DeviceCursor
    )
}

/// The hash of a client message id in a [`Hot::sent`] set (in memory only, never stored).
pub fn id_hash(id: &str) -> u64 {
    let mut h = FxHasher::default();
    id.hash(&mut h);
    h.finish()
}

/// See the module docs.
#[derive(Default)]
pub struct Hot {
    /// Full key → value as apply last read or wrote it (`None`: absent).
    pub values: HashMap<Vec<u8>, Option<IVec>>,
    /// User → its latest ev (the key of its last event; heads are not stored apart).
    pub heads: HashMap<String, u64>,
    /// User → its newest events, (ev, value) in ev order, consecutive.
    pub recent: HashMap<String, std::collections::VecDeque<(u64, IVec)>>,
    /// User → (device cursor key without the table byte → value), loaded whole on first use.
    pub devices: HashMap<String, BTreeMap<Vec<u8>, IVec>>,
    /// User → hashes of every id it sent; `None` when it sent more than [`MAX_IDS_PER_USER`].
    pub sent: HashMap<String, Option<HashSet<u64>>>,
    /// Ids held in `sent`, over all users.
    pub sent_ids: usize,
    /// Group id → its members' user ids, in the record's order, decoded once (a send to a
    /// group of 1,024 decoded the whole record each time). Every write of a group record goes
    /// through apply's write, which drops the group's entry here.
    pub groups: HashMap<String, std::sync::Arc<Vec<String>>>,
    /// Members held in `groups`, over all groups.
    pub group_members: usize,
}

impl Hot {
    /// Drops everything (after a failed apply).
    pub fn clear(&mut self) {
        *self = Hot::default();
    }

    /// Keeps memory bounded: drops a cache that grew past its bound. Called between entries.
    pub fn trim(&mut self) {
        if self.values.len() > MAX_VALUES {
            self.values = HashMap::default();
        }
        if self.heads.len() > MAX_VALUES {
            self.heads = HashMap::default();
        }
        if self.recent.len() > MAX_VALUES / RECENT_EVENTS {
            self.recent = HashMap::default();
        }
        if self.devices.len() > MAX_VALUES / 4 {
            self.devices = HashMap::default();
        }
        if self.group_members > MAX_VALUES {
            self.groups = HashMap::default();
            self.group_members = 0;
        }
        if self.sent_ids > MAX_IDS {
            self.sent = HashMap::default();
            self.sent_ids = 0;
        }
    }
}

/// Splits a key made by `keys::num` into its string part and number.
pub fn split_num_key(k: &[u8]) -> Option<(&str, u64)> {
    let n = super::keys::num_suffix(k)?;
    let s = k.get(..k.len().checked_sub(9)?)?;
    Some((std::str::from_utf8(s).ok()?, n))
}
