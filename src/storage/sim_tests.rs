//! Seeded crash rounds of the write-ahead log on [`SimDisk`] (FoundationDB's simulation,
//! TigerBeetle's simulated storage; LazyFS's crash model, see `disk.rs`).
//!
//! Each round drives the real [`Wal`] like the commit thread does: batches of commands are
//! appended as one entry, fdatasync'd, then "acked"; now and then a checkpoint writes the
//! applied state (a marker file: temporary file, fdatasync, rename, directory fsync) and purges
//! the log below it. At a random step the power goes ([`SimDisk::fail_after`]), or only the
//! process dies (`kill -9`: the page cache survives), or an fdatasync fails as Linux's do.
//! Recovery reads the checkpoint, opens the log and replays it, like `storage::open`, and
//! sometimes crashes again while doing so. Then: every acked command (and every command a
//! previous recovery replayed) is present exactly once, in order, and nothing is there that
//! was never submitted.
//!
//! `PARLEY_SIM_ROUNDS` sets the number of rounds (default 30,000 in release, 1,000 in debug);
//! `PARLEY_SIM_SEED=N` replays one round; `PARLEY_SIM_BASE` fixes the first seed (else random,
//! printed).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::disk::{Disk, OpenMode, SimDisk, SimStats};
use super::wal::{Entry, Wal, WalError};

const DATA: &str = "/data";
const MAGIC: &[u8; 8] = b"PRLYCKP1";

fn wal_dir() -> PathBuf {
    Path::new(DATA).join("wal")
}
fn ckpt() -> PathBuf {
    Path::new(DATA).join("checkpoint")
}
fn ckpt_tmp() -> PathBuf {
    Path::new(DATA).join("checkpoint.tmp")
}

/// The state machine of the model: the ids of the applied commands in order and the index of
/// the last applied entry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct State {
    applied: u64,
    ids: Vec<u64>,
}

/// A batch's payload: count, ids, then filler (so records have many sizes around 512 and
/// 4,096 bytes).
fn encode_batch(ids: &[u64], filler: usize) -> Vec<u8> {
    let mut b = Vec::with_capacity(8 + ids.len() * 8 + filler);
    b.extend_from_slice(&(ids.len() as u64).to_le_bytes());
    for id in ids {
        b.extend_from_slice(&id.to_le_bytes());
    }
    b.extend((0..filler).map(|i| (i as u8).wrapping_mul(37) | 1));
    b
}

fn decode_batch(p: &[u8]) -> Vec<u64> {
    let n = u64::from_le_bytes(p[..8].try_into().expect("count")) as usize;
    (0..n).map(|i| u64::from_le_bytes(p[8 + i * 8..16 + i * 8].try_into().expect("id"))).collect()
}

fn encode_ckpt(s: &State) -> Vec<u8> {
    let mut b = MAGIC.to_vec();
    b.extend_from_slice(&s.applied.to_le_bytes());
    b.extend_from_slice(&(s.ids.len() as u64).to_le_bytes());
    for id in &s.ids {
        b.extend_from_slice(&id.to_le_bytes());
    }
    let crc = crc32fast::hash(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

fn decode_ckpt(b: &[u8]) -> Result<State, String> {
    if b.len() < 28 || &b[..8] != MAGIC {
        return Err(format!("checkpoint of {} bytes has no valid header", b.len()));
    }
    let (body, crc) = b.split_at(b.len() - 4);
    if crc32fast::hash(body) != u32::from_le_bytes(crc.try_into().expect("crc")) {
        return Err("checkpoint CRC mismatch".into());
    }
    let applied = u64::from_le_bytes(body[8..16].try_into().expect("applied"));
    let n = u64::from_le_bytes(body[16..24].try_into().expect("n")) as usize;
    if body.len() != 24 + n * 8 {
        return Err("checkpoint length".into());
    }
    Ok(State { applied, ids: (0..n).map(|i| u64::from_le_bytes(body[24 + i * 8..32 + i * 8].try_into().expect("id"))).collect() })
}

/// Writes the checkpoint marker durably: temporary file, fdatasync, rename, directory fsync.
fn write_ckpt(disk: &SimDisk, s: &State) -> std::io::Result<()> {
    let mut f = disk.open(&ckpt_tmp(), OpenMode::CreateTruncate)?;
    f.write_all_at(&encode_ckpt(s), 0)?;
    f.sync_data()?;
    disk.rename(&ckpt_tmp(), &ckpt())?;
    disk.sync_dir(Path::new(DATA))
}

/// What recovery found.
enum Recovered {
    Ok(State, Wal),
    /// The disk died during recovery (a crash during recovery).
    Crashed,
}

/// `storage::open` for the model: the checkpoint, then the log, then replay.
fn recover(disk: &SimDisk, segment_bytes: u64) -> Result<Recovered, String> {
    let crashed = |e: &std::io::Error| e.to_string().contains("simulated power loss");
    if let Err(e) = disk.create_dir_all(Path::new(DATA)).and_then(|_| disk.sync_dir(Path::new("/"))) {
        return if crashed(&e) { Ok(Recovered::Crashed) } else { Err(e.to_string()) };
    }
    let mut state = match disk.open(&ckpt(), OpenMode::Read) {
        Ok(f) => {
            let len = f.len().map_err(|e| e.to_string())? as usize;
            let mut b = vec![0u8; len];
            let n = f.read_at(&mut b, 0).map_err(|e| e.to_string())?;
            decode_ckpt(&b[..n])?
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::default(),
        Err(e) if crashed(&e) => return Ok(Recovered::Crashed),
        Err(e) => return Err(e.to_string()),
    };
    let wal = match Wal::open_on(Arc::new(disk.clone()), &wal_dir(), segment_bytes) {
        Ok((w, _)) => w,
        Err(WalError::Io { source, .. }) if crashed(&source) || disk.is_dead() => return Ok(Recovered::Crashed),
        Err(e) => return Err(format!("the log does not open: {e}")),
    };
    match wal.first_index() {
        Some(first) if first > state.applied + 1 => return Err(format!("log gap: the log starts at {first}, the checkpoint is at {}", state.applied)),
        None if wal.last_index() > state.applied => return Err(format!("log gap: empty log ending at {}, checkpoint at {}", wal.last_index(), state.applied)),
        _ => {}
    }
    let reader = wal.read_from(state.applied + 1).map_err(|e| e.to_string())?;
    for e in reader {
        let e = match e {
            Ok(e) => e,
            Err(WalError::Io { source, .. }) if crashed(&source) => return Ok(Recovered::Crashed),
            Err(e) => return Err(format!("replay: {e}")),
        };
        if e.index != state.applied + 1 {
            return Err(format!("replay: entry {} after {}", e.index, state.applied));
        }
        state.ids.extend(decode_batch(&e.payload));
        state.applied = e.index;
    }
    Ok(Recovered::Ok(state, wal))
}

/// Checks the recovered state against what must be there.
fn check(state: &State, must: &[u64], issued: u64) -> Result<(), String> {
    let mut seen = HashSet::new();
    for w in state.ids.windows(2) {
        if w[1] <= w[0] {
            return Err(format!("commands out of order or duplicated: {} after {}", w[1], w[0]));
        }
    }
    for id in &state.ids {
        if *id >= issued {
            return Err(format!("command {id} was never submitted"));
        }
        seen.insert(*id);
    }
    if let Some(lost) = must.iter().find(|id| !seen.contains(id)) {
        return Err(format!("acked command {lost} lost ({} acked, {} recovered)", must.len(), state.ids.len()));
    }
    Ok(())
}

/// Totals over all rounds.
#[derive(Default, Debug)]
struct Totals {
    rounds: u64,
    crashes: u64,
    power_losses: u64,
    process_crashes: u64,
    recovery_crashes: u64,
    fsync_failures: u64,
    acked_checked: u64,
    checkpoints: u64,
    disk: SimStats,
}

/// One seeded round; `Err` names what went wrong.
fn round(seed: u64, t: &mut Totals) -> Result<(), String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let disk = SimDisk::new(rng.gen());
    let segment_bytes = [0u64, 100, 700, 5000, 1 << 20][rng.gen_range(0..5)];
    let max_filler = [0usize, 600, 5000][rng.gen_range(0..3)];
    let fsync_failures = rng.gen_bool(0.2);
    let mut issued = 0u64;
    // Acked commands, and commands a recovery replayed: all must survive every later crash.
    let mut must: Vec<u64> = Vec::new();
    let epochs = rng.gen_range(1..=4);
    for epoch in 0..epochs {
        // Recovery, perhaps crashing in the middle of it (then recovered again).
        trace(format_args!("epoch {epoch}: recovery (segment_bytes {segment_bytes})"));
        let (mut state, mut wal) = loop {
            if rng.gen_bool(0.2) {
                disk.fail_after(rng.gen_range(0..6));
            }
            match recover(&disk, segment_bytes).map_err(|e| format!("epoch {epoch}: recovery: {e}"))? {
                Recovered::Ok(s, w) => {
                    disk.revive();
                    break (s, w);
                }
                Recovered::Crashed => {
                    trace(format_args!("crash during recovery"));
                    t.recovery_crashes += 1;
                    disk.power_loss();
                }
            }
        };
        check(&state, &must, issued).map_err(|e| format!("epoch {epoch}: after recovery: {e}"))?;
        t.acked_checked += must.len() as u64;
        must = state.ids.clone();
        if epoch + 1 == epochs {
            break;
        }
        disk.set_fsync_failure_rate(if fsync_failures { 0.05 } else { 0.0 });
        disk.fail_after(rng.gen_range(0..120));
        let mut last_ckpt = state.applied;
        // Commands until the disk dies (bounded).
        for _step in 0..400 {
            if disk.is_dead() {
                break;
            }
            if rng.gen_bool(0.08) && state.applied > last_ckpt {
                // Checkpoint: the state durable first, then the log below it may go.
                if write_ckpt(&disk, &state).is_err() {
                    continue;
                }
                t.checkpoints += 1;
                trace(format_args!("checkpoint at {}", state.applied));
                last_ckpt = state.applied;
                if wal.purge_upto(state.applied).is_err() {
                    continue;
                }
                continue;
            }
            // One entry per write as the commit thread appends (append_next), or several
            // entries in one write (append, as a replicated log would).
            let entries = if rng.gen_bool(0.3) { rng.gen_range(2..=3) } else { 1 };
            let mut batch = Vec::new();
            for k in 0..entries {
                let n = rng.gen_range(1..=4);
                let ids: Vec<u64> = (issued..issued + n).collect();
                issued += n;
                let payload = encode_batch(&ids, rng.gen_range(0..=max_filler));
                batch.push((Entry { index: wal.last_index() + 1 + k, term: 1, payload }, ids));
            }
            let r = if entries == 1 {
                wal.append_next(1, &batch[0].0.payload).map(|_| ())
            } else {
                wal.append(&batch.iter().map(|(e, _)| e.clone()).collect::<Vec<_>>())
            };
            match r.and_then(|()| wal.sync()) {
                Ok(()) => {
                    for (e, ids) in &batch {
                        if e.index != state.applied + 1 || wal.last_index() < e.index {
                            return Err(format!("epoch {epoch}: entry {} appended after {}", e.index, state.applied));
                        }
                        trace(format_args!("acked entry {}", e.index));
                        state.applied = e.index;
                        state.ids.extend(ids);
                        must.extend(ids); // acked
                    }
                }
                Err(_) if disk.is_dead() => break,
                Err(_) => {
                    // The commit thread's recovery: answer `unavailable`, reopen, replay.
                    t.fsync_failures += 1;
                    trace(format_args!("append/fsync failed; reopen"));
                    let mut reopened = None;
                    for _ in 0..10 {
                        match wal.reopen() {
                            Ok((w, _)) => {
                                reopened = Some(w);
                                break;
                            }
                            Err(_) if disk.is_dead() => break,
                            Err(_) => continue,
                        }
                    }
                    let Some(w) = reopened else { break };
                    wal = w;
                    for e in wal.read_from(state.applied + 1).map_err(|e| e.to_string())? {
                        let e = e.map_err(|e| format!("epoch {epoch}: replay after a failed fsync: {e}"))?;
                        state.ids.extend(decode_batch(&e.payload));
                        state.applied = e.index;
                        must.extend(decode_batch(&e.payload)); // replayed: visible now
                    }
                    if wal.last_index() != state.applied {
                        return Err(format!("epoch {epoch}: reopened log ends at {}, state at {}", wal.last_index(), state.applied));
                    }
                }
            }
        }
        drop(wal);
        t.crashes += 1;
        disk.set_fsync_failure_rate(0.0);
        if rng.gen_bool(0.3) {
            t.process_crashes += 1;
            trace(format_args!("process crash"));
            disk.revive(); // kill -9: the page cache survives
        } else {
            t.power_losses += 1;
            trace(format_args!("power loss"));
            disk.power_loss();
        }
    }
    let s = disk.stats();
    t.disk.ops_kept += s.ops_kept;
    t.disk.ops_dropped += s.ops_dropped;
    t.disk.torn_writes += s.torn_writes;
    t.disk.ns_dropped += s.ns_dropped;
    t.disk.fsync_failures += s.fsync_failures;
    t.rounds += 1;
    Ok(())
}

fn trace(what: std::fmt::Arguments) {
    if std::env::var_os("PARLEY_SIM_TRACE").is_some() {
        eprintln!("{what}");
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

/// The property: thousands of seeded rounds, 0 acked commands lost or duplicated.
#[test]
fn sim_crash_rounds_lose_no_acked_command() {
    let started = std::time::Instant::now();
    let mut t = Totals::default();
    let seeds: Vec<u64> = match env_u64("PARLEY_SIM_SEED") {
        Some(s) => vec![s],
        None => {
            let n = env_u64("PARLEY_SIM_ROUNDS").unwrap_or(if cfg!(debug_assertions) { 1_000 } else { 30_000 });
            let base = env_u64("PARLEY_SIM_BASE").unwrap_or_else(|| rand::random::<u32>() as u64);
            eprintln!("sim crash rounds: seeds {base}..{} (PARLEY_SIM_BASE={base} repeats them)", base + n);
            (base..base + n).collect()
        }
    };
    for seed in seeds {
        if let Err(e) = round(seed, &mut t) {
            panic!("sim crash round with seed {seed} failed: {e}\nreplay: PARLEY_SIM_SEED={seed} cargo test --lib sim_crash_rounds");
        }
    }
    eprintln!(
        "sim crash rounds: {} rounds, {} crashes ({} power losses, {} process kills, {} during recovery), {} failed fsyncs, {} checkpoints, \
         {} acked commands checked, 0 lost or duplicated; disk: {} volatile ops kept, {} dropped, {} writes torn, {} names dropped; {:?}",
        t.rounds,
        t.crashes + t.recovery_crashes,
        t.power_losses,
        t.process_crashes,
        t.recovery_crashes,
        t.fsync_failures,
        t.checkpoints,
        t.acked_checked,
        t.disk.ops_kept,
        t.disk.ops_dropped,
        t.disk.torn_writes,
        t.disk.ns_dropped,
        started.elapsed()
    );
    assert!(t.rounds > 0);
}
