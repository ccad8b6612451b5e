//! The commit pipeline: group commit on one dedicated thread.
//!
//! Sessions submit [`Command`]s through a bounded channel. The commit thread takes every command
//! waiting (at most `batch_max_commands`, waiting up to `batch_window_us` for more after the first
//! of a small batch), stamps the batch with the server time, appends it to the write-ahead log as
//! **one entry**, fsyncs **once**, applies it to the state machine, answers every command, and
//! hands the effects (new events) to the [`Sink`] for live delivery.
//!
//! Why a thread and not an actor: the fsync blocks, and a blocking call on an actix arbiter stalls
//! every actor on it. The thread is supervised in the Erlang/OTP sense: a failure of the log or of
//! apply answers every pending command with `unavailable` (never `ack`), then the thread reopens
//! the log and replays it (the same path as start-up recovery) before taking commands again.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError, TrySendError};
use tokio::sync::oneshot;

use super::records::{encode, Command, LogEntry};
use super::state::{Effects, Outcome, State};
use super::wal::Wal;
use super::{StorageError, TERM};
use crate::config::StorageConfig;

/// Why a command got no outcome. Neither means "not stored" for sure: resend with the same id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PipelineError {
    /// The pipeline's queue is full.
    #[error("the commit pipeline is overloaded")]
    Overloaded,
    /// Storage cannot commit now.
    #[error("storage cannot commit now")]
    Unavailable,
}

/// Receives the effects of each committed batch (the registry, which pushes events to sockets).
pub trait Sink: Send + Sync + 'static {
    /// Called on the commit thread after the batch is durable and applied; must not block.
    fn committed(&self, effects: Effects);
}

/// Where one command's outcome goes.
pub type Reply = oneshot::Sender<Result<Outcome, PipelineError>>;

/// A replicated log under the commit pipeline (a cluster node, `cluster::node`): instead of
/// appending to its own log, the batcher hands each group-commit batch to it.
pub trait Replicator: Send + Sync + 'static {
    /// Proposes `entry` (one batch; its `ts` stamped by the batcher) and answers every reply, in
    /// order, once the entry is committed and applied on this node, or `Unavailable` when it is
    /// not within the commit timeout. May block while too many proposals are in flight
    /// (backpressure: the next batch grows meanwhile).
    fn propose(self: Arc<Self>, entry: &LogEntry, replies: Vec<Reply>);
    /// Whether writes can be committed now (a leader is known).
    fn healthy(&self) -> bool;
}

enum Msg {
    Submit(Command, Reply),
    /// Write a consistent backup into the directory (between batches); answers the applied index.
    Backup(std::path::PathBuf, oneshot::Sender<Result<u64, String>>),
    /// Finish, checkpoint, and stop; answered when done.
    Stop(oneshot::Sender<()>),
}

/// A handle to submit commands. Cheap to clone.
#[derive(Clone)]
pub struct Pipeline {
    /// To the commit thread; bounded by `queue_capacity` (a full queue answers `Overloaded`).
    tx: Sender<Msg>,
    /// False while the log or state is failing (healthz answers 503).
    healthy: Arc<AtomicBool>,
    /// The replicated log, in a cluster.
    replicator: Option<Arc<dyn Replicator>>,
}

impl Pipeline {
    /// Starts the commit thread, the checkpoint thread (snapshots into `snapshots`) and the
    /// materializer.
    pub fn start(state: Arc<State>, wal: Wal, cfg: StorageConfig, snapshots: std::path::PathBuf, sink: Arc<dyn Sink>) -> (Pipeline, JoinHandle<()>) {
        let (tx, rx) = crossbeam_channel::bounded(cfg.queue_capacity);
        let healthy = Arc::new(AtomicBool::new(true));
        let purge_to = Arc::new(AtomicU64::new(0));
        let newest = super::snapshot::list(&snapshots).ok().and_then(|l| l.first().map(|s| s.index)).unwrap_or(0);
        let snapshot_index = Arc::new(AtomicU64::new(newest));
        let (ck_tx, ck_rx) = crossbeam_channel::bounded::<()>(1);
        let ck = Checkpointer {
            state: state.clone(),
            wake: ck_rx,
            purge_to: purge_to.clone(),
            interval: Duration::from_millis(cfg.checkpoint_interval_ms),
            snapshots,
            snapshot_every: Duration::from_millis(cfg.snapshot_interval_ms),
            snapshot_index: snapshot_index.clone(),
        };
        std::thread::Builder::new()
            .name("parley-checkpoint".into())
            .spawn(move || ck.run())
            .ok();
        // The materializer: writes applied state from memory to sled off the ack path. It stops
        // when the commit thread drops `_materializer` (the channel disconnects).
        let (mat_tx, mat_rx) = crossbeam_channel::bounded::<()>(1);
        let mat_state = state.clone();
        let every = Duration::from_millis(cfg.materialize_interval_ms);
        let idle = cfg.materialize_idle_priority;
        std::thread::Builder::new()
            .name("parley-materialize".into())
            .spawn(move || materialize_loop(mat_state, mat_rx, every, idle))
            .ok();
        let mut w = Worker {
            state: state.clone(),
            wal,
            cfg,
            sink,
            rx,
            healthy: healthy.clone(),
            purge_to,
            purged: 0,
            last_ts: 0,
            bytes_since_checkpoint: 0,
            checkpoint: ck_tx,
            snapshot_index,
            _materializer: mat_tx,
        };
        metrics::gauge!("parley_log_bytes").set(w.wal.size_bytes() as f64);
        metrics::gauge!("parley_log_segments").set(w.wal.segment_count() as f64);
        let handle = std::thread::Builder::new()
            .name("parley-commit".into())
            .spawn(move || w.run())
            .unwrap_or_else(|e| panic!("cannot start the commit thread: {e}"));
        (Pipeline { tx, healthy, replicator: None }, handle)
    }

    /// Starts the batcher of a cluster node: group commit as on a single node, but each batch
    /// goes to `replicator` (Raft), which answers it once committed and applied here. Backups
    /// are refused (a cluster node's backup is another node).
    pub fn start_replicated(cfg: StorageConfig, replicator: Arc<dyn Replicator>) -> (Pipeline, JoinHandle<()>) {
        let (tx, rx) = crossbeam_channel::bounded(cfg.queue_capacity);
        let healthy = Arc::new(AtomicBool::new(true));
        let rep = replicator.clone();
        let handle = std::thread::Builder::new()
            .name("parley-batcher".into())
            .spawn(move || batcher(rx, cfg, rep))
            .unwrap_or_else(|e| panic!("cannot start the batcher thread: {e}"));
        (Pipeline { tx, healthy, replicator: Some(replicator) }, handle)
    }

    /// Queues a command; the receiver gets its outcome once the batch is durable and applied.
    pub fn submit(&self, cmd: Command) -> Result<oneshot::Receiver<Result<Outcome, PipelineError>>, PipelineError> {
        let (tx, rx) = oneshot::channel();
        match self.tx.try_send(Msg::Submit(cmd, tx)) {
            Ok(()) => Ok(rx),
            Err(TrySendError::Full(_)) => Err(PipelineError::Overloaded),
            Err(TrySendError::Disconnected(_)) => Err(PipelineError::Unavailable),
        }
    }

    /// Submits and waits for the outcome.
    pub async fn call(&self, cmd: Command) -> Result<Outcome, PipelineError> {
        self.submit(cmd)?.await.unwrap_or(Err(PipelineError::Unavailable))
    }

    /// Takes a consistent backup into `dir` on the commit thread, between batches (commits wait
    /// while it copies). Returns the applied index it holds.
    pub async fn backup(&self, dir: std::path::PathBuf) -> Result<u64, String> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Msg::Backup(dir, tx)).map_err(|_| "the commit pipeline is stopped".to_owned())?;
        rx.await.unwrap_or_else(|_| Err("the commit pipeline is stopped".to_owned()))
    }

    /// Whether the log and state accept commits now.
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed) && self.replicator.as_ref().is_none_or(|r| r.healthy())
    }

    /// Commits what is queued, checkpoints, and stops the commit thread. Waits up to `deadline`.
    pub async fn stop(&self, deadline: Duration) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Msg::Stop(tx)).is_ok() {
            let _ = tokio::time::timeout(deadline, rx).await;
        }
    }
}

/// Most bytes (about: message bodies plus a fixed allowance per command) in one batch of a
/// cluster node: a Raft entry is sent whole to every follower inside one AppendEntries, which
/// openraft 0.9 gives `cluster.heartbeat_ms` to answer, so a batch of many 64 KiB messages must
/// not become one 10 MB entry that can never be replicated in time.
pub const REPLICATED_BATCH_BYTES: usize = 256 << 10;

/// A command's size as the batcher counts it, bytes.
fn approx_bytes(c: &Command) -> usize {
    match c {
        Command::Send { body, id, conv, .. } => 96 + body.len() + id.len() + conv.len(),
        _ => 128,
    }
}

/// The cluster's batcher thread (see [`Pipeline::start_replicated`]).
fn batcher(rx: Receiver<Msg>, cfg: StorageConfig, rep: Arc<dyn Replicator>) {
    let window = Duration::from_micros(cfg.batch_window_us);
    let max = cfg.batch_max_commands;
    let mut last_ts = 0u64;
    let mut batch: Vec<(Command, Reply)> = Vec::with_capacity(max);
    let mut stop = None;
    while stop.is_none() {
        match rx.recv() {
            Ok(Msg::Submit(c, r)) => batch.push((c, r)),
            Ok(Msg::Stop(done)) => stop = Some(Some(done)),
            Ok(Msg::Backup(_, reply)) => {
                let _ = reply.send(Err("a cluster node takes no backup: every node holds the whole log and state; back up a stopped node's data directory".into()));
                continue;
            }
            Err(_) => stop = Some(None),
        }
        let deadline = Instant::now() + window;
        let mut bytes: usize = batch.iter().map(|(c, _)| approx_bytes(c)).sum();
        while stop.is_none() && batch.len() < max && bytes < REPLICATED_BATCH_BYTES && !batch.is_empty() {
            let msg = match rx.try_recv() {
                Ok(m) => m,
                Err(TryRecvError::Disconnected) => break,
                Err(TryRecvError::Empty) if window.is_zero() => break,
                Err(TryRecvError::Empty) => match rx.recv_deadline(deadline) {
                    Ok(m) => m,
                    Err(_) => break,
                },
            };
            match msg {
                Msg::Submit(c, r) => {
                    bytes += approx_bytes(&c);
                    batch.push((c, r));
                }
                Msg::Stop(done) => stop = Some(Some(done)),
                Msg::Backup(_, reply) => {
                    let _ = reply.send(Err("a cluster node takes no backup".into()));
                }
            }
        }
        if !batch.is_empty() {
            let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
            last_ts = last_ts.max(now);
            let (commands, replies): (Vec<Command>, Vec<Reply>) = batch.drain(..).unzip();
            metrics::histogram!("parley_commit_batch_size").record(commands.len() as f64);
            rep.clone().propose(&LogEntry { ts: last_ts, commands }, replies);
        }
    }
    if let Some(Some(done)) = stop {
        let _ = done.send(());
    }
}

struct Worker {
    state: Arc<State>,
    wal: Wal,
    cfg: StorageConfig,
    sink: Arc<dyn Sink>,
    rx: Receiver<Msg>,
    healthy: Arc<AtomicBool>,
    /// Set by the checkpoint thread: log entries up to here are durable in sled.
    purge_to: Arc<AtomicU64>,
    purged: u64,
    last_ts: u64,
    bytes_since_checkpoint: u64,
    /// Wakes the checkpoint thread early when the log has grown.
    checkpoint: Sender<()>,
    /// Index of the newest durable snapshot: the log is never purged past it.
    snapshot_index: Arc<AtomicU64>,
    /// Held only so that dropping the worker stops the materializer thread.
    _materializer: Sender<()>,
}

impl Worker {
    fn run(&mut self) {
        let window = Duration::from_micros(self.cfg.batch_window_us);
        let max = self.cfg.batch_max_commands;
        let mut batch: Vec<(Command, Reply)> = Vec::with_capacity(max);
        loop {
            // Some(_) ends the loop after this batch: Some(Some(done)) on a stop request,
            // Some(None) when every handle is gone.
            let stop: Option<Option<oneshot::Sender<()>>> = match self.rx.recv() {
                Ok(Msg::Submit(c, r)) => {
                    batch.push((c, r));
                    self.gather(&mut batch, max, window).map(Some)
                }
                Ok(Msg::Stop(done)) => Some(Some(done)),
                Ok(Msg::Backup(dir, reply)) => {
                    self.backup(dir, reply);
                    None
                }
                Err(_) => Some(None),
            };
            if !batch.is_empty() {
                self.commit(&mut batch);
            }
            self.maybe_purge();
            if let Some(done) = stop {
                match self.state.checkpoint() {
                    Ok(upto) => {
                        let _ = self.wal.purge_upto(upto.min(self.snapshot_index.load(Ordering::Acquire)));
                    }
                    Err(e) => tracing::error!(error = %e, "final checkpoint failed; the log will be replayed at start"),
                }
                if let Some(done) = done {
                    let _ = done.send(());
                }
                return;
            }
        }
    }

    /// Takes what is waiting; waits up to `window` for more while the batch is small.
    fn gather(&mut self, batch: &mut Vec<(Command, Reply)>, max: usize, window: Duration) -> Option<oneshot::Sender<()>> {
        let deadline = Instant::now() + window;
        while batch.len() < max {
            let msg = match self.rx.try_recv() {
                Ok(m) => m,
                Err(TryRecvError::Disconnected) => return None,
                Err(TryRecvError::Empty) if window.is_zero() => return None,
                Err(TryRecvError::Empty) => match self.rx.recv_deadline(deadline) {
                    Ok(m) => m,
                    Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => return None,
                },
            };
            match msg {
                Msg::Submit(c, r) => batch.push((c, r)),
                Msg::Stop(done) => return Some(done),
                Msg::Backup(dir, reply) => {
                    // Commit what came before, so the backup holds everything already acked.
                    self.commit(batch);
                    self.backup(dir, reply);
                }
            }
        }
        None
    }

    fn backup(&mut self, dir: std::path::PathBuf, reply: oneshot::Sender<Result<u64, String>>) {
        let t0 = Instant::now();
        let r = self.state.backup_to(&dir).map_err(|e| e.to_string());
        tracing::info!(dir = %dir.display(), millis = t0.elapsed().as_millis() as u64, ok = r.is_ok(), "backup");
        let _ = reply.send(r);
    }

    fn now_ts(&mut self) -> u64 {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        self.last_ts = self.last_ts.max(now);
        self.last_ts
    }

    /// append → fsync → apply → answer → deliver.
    fn commit(&mut self, batch: &mut Vec<(Command, Reply)>) {
        let (cmds, replies): (Vec<Command>, Vec<Reply>) = batch.drain(..).unzip();
        let entry = LogEntry { ts: self.now_ts(), commands: cmds };
        let n = entry.commands.len();
        let t0 = Instant::now();
        let result = self.write(&entry).and_then(|index| {
            let t_sync = t0.elapsed();
            metrics::histogram!("parley_fsync_duration_seconds").record(t_sync.as_secs_f64());
            self.state.apply(index, &entry)
        });
        match result {
            Ok((outcomes, effects)) => {
                failpoint!("commit.after_apply");
                metrics::histogram!("parley_commit_batch_size").record(n as f64);
                metrics::histogram!("parley_commit_duration_seconds").record(t0.elapsed().as_secs_f64());
                for (reply, outcome) in replies.into_iter().zip(outcomes) {
                    let _ = reply.send(Ok(outcome));
                }
                self.sink.committed(effects);
            }
            Err(e) => {
                tracing::error!(error = %e, commands = n, "commit failed; answering unavailable and recovering");
                metrics::counter!("parley_commit_failures_total").increment(1);
                // Unhealthy before anyone hears `unavailable`.
                self.healthy.store(false, Ordering::Relaxed);
                for reply in replies {
                    let _ = reply.send(Err(PipelineError::Unavailable));
                }
                self.recover();
            }
        }
    }

    fn write(&mut self, entry: &LogEntry) -> Result<u64, StorageError> {
        #[cfg(feature = "fault-injection")]
        if fault::take_storage_failure() {
            return Err(StorageError::io(self.wal.dir(), std::io::Error::other("injected fault: no space left on device")));
        }
        let payload = encode(entry)?;
        failpoint!("commit.before_append", e => Err(StorageError::io(self.wal.dir(), e)));
        let index = self.wal.append_next(TERM, &payload)?;
        failpoint!("commit.after_append", e => Err(StorageError::io(self.wal.dir(), e)));
        self.wal.sync()?;
        failpoint!("commit.after_sync", e => Err(StorageError::io(self.wal.dir(), e)));
        self.bytes_since_checkpoint += payload.len() as u64 + 24;
        if self.bytes_since_checkpoint >= self.cfg.checkpoint_log_bytes {
            self.bytes_since_checkpoint = 0;
            let _ = self.checkpoint.try_send(());
        }
        Ok(index)
    }

    /// Reopens the log (cutting a torn tail) and replays what the state lacks, until it works.
    /// Commands that arrive meanwhile are answered `unavailable`.
    fn recover(&mut self) {
        self.healthy.store(false, Ordering::Relaxed);
        let mut wait = Duration::from_millis(50);
        loop {
            #[cfg(feature = "fault-injection")]
            let injected = fault::take_storage_failure();
            #[cfg(not(feature = "fault-injection"))]
            let injected = false;
            let attempt = if injected {
                Err(StorageError::io(self.wal.dir(), std::io::Error::other("injected fault: no space left on device")))
            } else {
                // Cuts what a failed fsync may have left only in the page cache (Wal::reopen).
                self.wal
                    .reopen()
                    .map_err(StorageError::from)
                    .and_then(|(wal, _)| super::replay(&self.state, &wal).map(|_| wal))
            };
            match attempt {
                Ok(wal) => {
                    self.wal = wal;
                    self.healthy.store(true, Ordering::Relaxed);
                    tracing::info!(applied = self.state.applied(), "commit pipeline recovered");
                    return;
                }
                Err(e) => {
                    tracing::error!(error = %e, "storage still failing; retrying");
                    let until = Instant::now() + wait;
                    while let Some(left) = until.checked_duration_since(Instant::now()) {
                        match self.rx.recv_timeout(left) {
                            Ok(Msg::Submit(_, r)) => {
                                let _ = r.send(Err(PipelineError::Unavailable));
                            }
                            Ok(Msg::Stop(done)) => {
                                let _ = done.send(());
                                return;
                            }
                            Ok(Msg::Backup(_, reply)) => {
                                let _ = reply.send(Err("storage is failing".to_owned()));
                            }
                            Err(_) => break,
                        }
                    }
                    wait = (wait * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    fn maybe_purge(&mut self) {
        let to = self.purge_to.load(Ordering::Acquire);
        if to > self.purged {
            failpoint!("purge.before");
            match self.wal.purge_upto(to) {
                Ok(n) => {
                    self.purged = to;
                    if n > 0 {
                        tracing::debug!(segments = n, upto = to, "deleted log segments below the checkpoint");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot delete old log segments"),
            }
        }
        metrics::gauge!("parley_log_bytes").set(self.wal.size_bytes() as f64);
        metrics::gauge!("parley_log_segments").set(self.wal.segment_count() as f64);
    }
}

/// Materializes every `every` until the channel disconnects (see [`State::materialize`]).
fn materialize_loop(state: Arc<State>, stop: Receiver<()>, every: Duration, idle: bool) {
    materialize_live(&super::LiveState::new(state), stop, every, idle);
}

/// Starts a materializer thread for the state in `live` (a cluster node's, which a snapshot
/// install may replace): every `every` it writes the applied entries from memory to sled, off
/// the apply path, through an [`IdleWriter`](super::store::IdleWriter) at `SCHED_IDLE` when
/// `idle`. It stops when the returned sender is dropped.
pub fn spawn_materializer(live: super::LiveState, every: Duration, idle: bool) -> Sender<()> {
    let (tx, rx) = crossbeam_channel::bounded::<()>(1);
    std::thread::Builder::new()
        .name("parley-materialize".into())
        .spawn(move || materialize_live(&live, rx, every, idle))
        .ok();
    tx
}

fn materialize_live(live: &super::LiveState, stop: Receiver<()>, every: Duration, idle: bool) {
    // The sled inserts run on the writer thread; this thread keeps the overlay's locks (it is
    // never at idle priority, so a lock it holds is never stuck behind a starved thread).
    let writer = match super::store::IdleWriter::spawn(idle) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(error = %e, "cannot start the sled writer thread; materializing on this thread");
            None
        }
    };
    loop {
        // Behind (apply may be waiting, `Store::wait_below`): the next round at once.
        let behind = live.get().fill() > super::store::MAX_DIRTY_KEYS / 2;
        match stop.recv_timeout(if behind { Duration::ZERO } else { every }) {
            Ok(()) | Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        let state = live.get();
        let t0 = Instant::now();
        let keys = state.dirty_keys();
        match state.materialize_with(writer.as_ref()) {
            Ok(_) if keys > 0 => {
                metrics::histogram!("parley_materialize_duration_seconds").record(t0.elapsed().as_secs_f64());
                metrics::histogram!("parley_materialize_keys").record(keys as f64);
            }
            Ok(_) => {}
            Err(e) => {
                tracing::error!(error = %e, "materializing the state into sled failed; retrying");
                std::thread::sleep(every);
            }
        }
    }
}

/// The checkpoint thread: checkpoints every `interval` or when woken (materialize, fsync sled),
/// takes a snapshot at most every `snapshot_every`, then allows the log up to the lower of the
/// two to be purged: log entries are deleted only once sled holds them durably *and* a snapshot
/// independent of sled's files holds them (so a damaged sled can be rebuilt).
struct Checkpointer {
    state: Arc<State>,
    /// From the commit thread, when the log has grown by `checkpoint_log_bytes`; disconnects when
    /// the commit thread ends, which stops this thread.
    wake: Receiver<()>,
    /// To the commit thread: the log may be purged up to here.
    purge_to: Arc<AtomicU64>,
    interval: Duration,
    snapshots: std::path::PathBuf,
    snapshot_every: Duration,
    /// Newest durable snapshot's index, shared with the commit thread's final purge.
    snapshot_index: Arc<AtomicU64>,
}

impl Checkpointer {
    fn run(self) {
        let mut last_snapshot: Option<Instant> = None;
        loop {
            match self.wake.recv_timeout(self.interval) {
                Ok(()) | Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            let t0 = Instant::now();
            failpoint!("checkpoint.before");
            let upto = match self.state.checkpoint() {
                Ok(upto) => {
                    failpoint!("checkpoint.after_sync");
                    upto
                }
                Err(e) => {
                    tracing::error!(error = %e, "checkpoint failed");
                    continue;
                }
            };
            metrics::histogram!("parley_checkpoint_duration_seconds").record(t0.elapsed().as_secs_f64());
            let due = last_snapshot.map_or(true, |t| t.elapsed() >= self.snapshot_every);
            if due && upto > self.snapshot_index.load(Ordering::Acquire) {
                last_snapshot = Some(Instant::now());
                self.snapshot();
            }
            self.purge_to.fetch_max(upto.min(self.snapshot_index.load(Ordering::Acquire)), Ordering::AcqRel);
        }
    }

    fn snapshot(&self) {
        let t0 = Instant::now();
        match self.state.snapshot(&self.snapshots) {
            Ok((file, records)) => {
                self.snapshot_index.fetch_max(file.index, Ordering::AcqRel);
                if let Err(e) = super::snapshot::remove_older(&self.snapshots, file.index) {
                    tracing::warn!(error = %e, "cannot delete old snapshots");
                }
                metrics::histogram!("parley_snapshot_duration_seconds").record(t0.elapsed().as_secs_f64());
                tracing::info!(index = file.index, records, millis = t0.elapsed().as_millis() as u64, "snapshot written");
            }
            Err(e) => tracing::error!(error = %e, "snapshot failed; the log is kept from the previous snapshot on"),
        }
    }
}

/// Test-only storage fault injection (feature `fault-injection`).
#[cfg(feature = "fault-injection")]
pub mod fault {
    use std::sync::atomic::{AtomicU32, Ordering};

    static FAIL_NEXT: AtomicU32 = AtomicU32::new(0);

    /// Makes the next `n` commits (and recovery attempts) fail as if the disk were full.
    pub fn fail_next_commits(n: u32) {
        FAIL_NEXT.store(n, Ordering::SeqCst);
    }

    /// Takes one injected failure, if any.
    pub(crate) fn take_storage_failure() -> bool {
        FAIL_NEXT.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok()
    }
}
