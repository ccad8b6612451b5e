//! Fail points at every step of group commit, of a log segment roll and of a checkpoint
//! (feature `failpoints`; without it [`failpoint!`] compiles to nothing). The idea is the
//! `fail` crate's (TiKV), cut down to the two actions a crash test needs.
//!
//! Configured once per process from the environment variable `PARLEY_FAILPOINTS`, a comma
//! separated list of `NAME=ACTION` or `NAME=ACTION@N`:
//!
//! - `abort`: SIGKILL to itself at that step, kill -9 at an exact point (the page cache
//!   keeps what was written; the power-loss test then drops what was not fsync'd);
//! - `error`: the step fails with an injected I/O error, as a failing disk would;
//!
//! and `@N` (default 1) fires on the N-th time the step is reached, and only then.
//! Tests in the library can also arm a point with [`set`].
//!
//! The points (see each call site): `commit.before_append`, `commit.after_append` (written,
//! not yet fsync'd), `commit.after_sync` (durable, not applied), `commit.after_apply`
//! (applied, not answered), `wal.roll.after_sync_old`, `wal.roll.after_create`,
//! `wal.sync.after_fdatasync` (data durable, directory not yet fsync'd),
//! `wal.open.after_tail_sync`, `wal.purge.before_unlink`, `wal.truncate.before_cut` (later
//! segments deleted, the cut not made), `wal.restart.before_create` (every segment deleted, the
//! new one not created), `checkpoint.before`,
//! `checkpoint.after_sync` (sled fsync'd, purge not yet allowed), `purge.before`.

#[cfg(feature = "failpoints")]
use std::collections::HashMap;
#[cfg(feature = "failpoints")]
use std::sync::atomic::{AtomicU64, Ordering};
#[cfg(feature = "failpoints")]
use std::sync::{Mutex, OnceLock};

/// What an armed point does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// SIGKILL to the process itself (kill -9 at an exact step).
    Abort,
    /// Fail the step with an injected I/O error.
    Error,
}

#[cfg(feature = "failpoints")]
struct Point {
    action: Action,
    /// Fires when `hits` reaches this (1-based).
    at: u64,
    hits: AtomicU64,
}

#[cfg(feature = "failpoints")]
fn points() -> &'static Mutex<HashMap<String, std::sync::Arc<Point>>> {
    static P: OnceLock<Mutex<HashMap<String, std::sync::Arc<Point>>>> = OnceLock::new();
    P.get_or_init(|| {
        let mut m = HashMap::new();
        for spec in std::env::var("PARLEY_FAILPOINTS").unwrap_or_default().split(',').filter(|s| !s.trim().is_empty()) {
            match parse(spec.trim()) {
                Some((name, action, at)) => {
                    m.insert(name, std::sync::Arc::new(Point { action, at, hits: AtomicU64::new(0) }));
                }
                None => eprintln!("PARLEY_FAILPOINTS: ignoring {spec:?} (expected NAME=abort|error[@N])"),
            }
        }
        Mutex::new(m)
    })
}

/// Parses `NAME=ACTION[@N]`.
#[cfg(feature = "failpoints")]
fn parse(spec: &str) -> Option<(String, Action, u64)> {
    let (name, rest) = spec.split_once('=')?;
    let (action, at) = match rest.split_once('@') {
        Some((a, n)) => (a, n.parse().ok().filter(|n| *n >= 1)?),
        None => (rest, 1),
    };
    let action = match action {
        "abort" => Action::Abort,
        "error" => Action::Error,
        _ => return None,
    };
    Some((name.to_owned(), action, at))
}

/// Arms `name` to do `action` on its `at`-th hit from now (1-based); `None` disarms it.
#[cfg(feature = "failpoints")]
pub fn set(name: &str, action: Option<(Action, u64)>) {
    let mut m = points().lock().unwrap_or_else(|p| p.into_inner());
    match action {
        Some((action, at)) => {
            m.insert(name.to_owned(), std::sync::Arc::new(Point { action, at: at.max(1), hits: AtomicU64::new(0) }));
        }
        None => {
            m.remove(name);
        }
    }
}

/// Called by [`failpoint!`]: counts a hit of `name`; aborts, or returns the injected error,
/// when the point fires.
#[cfg(feature = "failpoints")]
pub fn check(name: &str) -> Option<std::io::Error> {
    let p = points().lock().unwrap_or_else(|p| p.into_inner()).get(name).cloned()?;
    if p.hits.fetch_add(1, Ordering::SeqCst) + 1 != p.at {
        return None;
    }
    match p.action {
        Action::Abort => {
            eprintln!("fail point {name}: killing the process");
            // SIGKILL to itself, like kill -9 (no core dump, no destructors, nothing flushed).
            // SAFETY: kill(2) on our own pid.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
            std::process::abort()
        }
        Action::Error => Some(std::io::Error::other(format!("injected fault at fail point {name}"))),
    }
}

/// A fail point. `failpoint!("name")` can only abort; `failpoint!("name", e => expr)` also
/// returns `expr` (with `e: std::io::Error`, the injected error) from the enclosing function
/// when armed with `error`. Compiles to nothing without the `failpoints` feature.
#[macro_export]
macro_rules! failpoint {
    ($name:expr) => {{
        #[cfg(feature = "failpoints")]
        {
            let _ = $crate::failpoint::check($name);
        }
    }};
    ($name:expr, $e:ident => $ret:expr) => {{
        #[cfg(feature = "failpoints")]
        {
            if let Some($e) = $crate::failpoint::check($name) {
                return $ret;
            }
        }
    }};
}
