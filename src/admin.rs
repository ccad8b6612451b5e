//! `parley admin ...`: administration on a data directory, without a client.
//!
//! Every command takes the data directory's lock and refuses to run while a server holds it
//! (a running server takes backups through `POST /v1/admin/backup`). Writes go through the
//! write-ahead log like any other command (append, fsync, apply).

use std::io::BufRead;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use argon2::password_hash::{PasswordHasher, SaltString};
use clap::Subcommand;

use crate::config::Config;
use crate::protocol::ids::valid_user_id;
use crate::storage::records::Command;
use crate::storage::{self, Outcome, Refusal};

/// `println!` for the admin commands' output: a reader that went away (`parley admin user list
/// | head -1`) ends the command quietly with status 0 instead of a panic. Every line is printed
/// after the work it reports is done.
macro_rules! out {
    ($($t:tt)*) => { print_line(format_args!($($t)*)) };
}

fn print_line(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    if let Err(e) = writeln!(std::io::stdout().lock(), "{line}") {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("parley admin: cannot write the output: {e}");
        std::process::exit(1);
    }
}


/// The admin subcommands.
#[derive(Debug, Subcommand)]
pub enum AdminCmd {
    /// Manage users.
    User {
        #[command(subcommand)]
        cmd: UserCmd,
    },
    /// Counts: users, conversations, messages, log and sled sizes.
    Stats,
    /// Check every log record's CRC and that the state matches a replay of the log.
    Verify,
    /// Write a consistent snapshot into DIR (which must not exist or be empty).
    Backup { dir: PathBuf },
    /// Replace the data directory by the backup in DIR (the data directory must be empty
    /// unless --force, which moves it aside to DATA.replaced-<unix time>).
    Restore {
        dir: PathBuf,
        #[arg(long)]
        force: bool,
    },
}

/// `parley admin user ...`.
#[derive(Debug, Subcommand)]
pub enum UserCmd {
    /// Create a user; the password is read from --password or the first line of stdin.
    Add {
        user: String,
        #[arg(long)]
        password: Option<String>,
    },
    /// List users: id, creation time (ISO 8601, UTC), deleted ones marked.
    List {
        /// A JSON array instead, with the creation time in ms since the Unix epoch (`created_ms`).
        #[arg(long)]
        json: bool,
    },
    /// Delete a user: tokens revoked, groups left; the id is never given out again.
    Delete { user: String },
    /// Set a new password (from --password or stdin) and revoke every token of the user.
    ResetPassword {
        user: String,
        #[arg(long)]
        password: Option<String>,
    },
}

/// Runs an admin command on `data`.
///
/// # Errors
/// Whatever stops the command, as a message for the operator: a data directory that is not
/// parley's or is held by a running server, a refused change (unknown or deleted user), I/O.
pub fn run(cfg: &Config, data: &Path, cmd: AdminCmd) -> anyhow::Result<()> {
    crate::data_dir::check(data)?;
    // A cluster node's directory holds `raft/`, not a single node's `wal/` and `state/`: opening
    // it as a single node would create those beside the cluster's log, and the node would then
    // refuse to start.
    if data.join("raft").exists() {
        anyhow::bail!(
            "{} is a cluster node's data directory (raft/); parley admin works on a single node's. A cluster's state is on every node: use the cluster's HTTP API (parley cluster status), or stop the node and copy its directory",
            data.display()
        );
    }
    run_on(cfg, data, cmd).map_err(|e| match e.downcast_ref::<storage::StorageError>() {
        // The hint belongs here, not to `serve`: an admin command cannot share the directory.
        Some(storage::StorageError::Locked { .. }) => anyhow::anyhow!("{e}; a running server takes backups through POST /v1/admin/backup"),
        _ => e,
    })
}

fn run_on(cfg: &Config, data: &Path, cmd: AdminCmd) -> anyhow::Result<()> {
    // Every command but restore and `user add` (which may provision a new directory) works on an
    // existing data directory: a typo must not look like an empty, healthy database.
    let creates = matches!(cmd, AdminCmd::Restore { .. } | AdminCmd::User { cmd: UserCmd::Add { .. } });
    if !creates && !data.join("state").is_dir() {
        bail!("{} is not a parley data directory (no state/ in it)", data.display());
    }
    match cmd {
        AdminCmd::Verify => {
            let r = storage::verify(data, cfg.storage.cache_bytes)?;
            out!(
                "log: {} entries in {} segments{}; state applied up to {}; replay compared: {}",
                r.log_entries,
                r.log_segments,
                if r.torn_tail_bytes > 0 { format!(" (a torn tail of {} bytes will be cut at start)", r.torn_tail_bytes) } else { String::new() },
                r.applied,
                if r.replay_compared && r.problems.is_empty() { "yes, identical" } else if r.replay_compared { "yes (see the problems below)" } else { "no (the log does not start at entry 1: checkpointed or restored; invariant checks only)" }
            );
            if r.problems.is_empty() {
                out!("verify: OK");
                Ok(())
            } else {
                for p in &r.problems {
                    out!("problem: {p}");
                }
                bail!("verify: {} problems", r.problems.len())
            }
        }
        AdminCmd::Restore { dir, force } => restore(data, &dir, force),
        cmd => {
            let opened = storage::open(data, cfg.storage.segment_bytes, cfg.storage.cache_bytes)?;
            crate::data_dir::mark(data).with_context(|| format!("writing {}", data.join(crate::data_dir::MARKER).display()))?;
            let (state, mut wal) = (opened.state, opened.wal);
            match cmd {
                AdminCmd::Stats => {
                    let (_, convs, messages) = state.counts()?;
                    let all = state.users()?;
                    let deleted = all.iter().filter(|(_, u)| u.deleted).count();
                    let users = all.len() - deleted;
                    let groups = state.group_count()?;
                    out!("users: {users}");
                    out!("deleted users: {deleted}");
                    out!("conversations: {convs}");
                    out!("groups: {groups}");
                    out!("messages: {messages}");
                    out!("applied index: {}", state.applied());
                    match wal.first_index() {
                        Some(first) => out!("log: {} bytes in {} segments, entries {first} to {}", wal.size_bytes(), wal.segment_count(), wal.last_index()),
                        None => out!("log: {} bytes in {} segments, no entries", wal.size_bytes(), wal.segment_count()),
                    }
                    out!("state (sled): {} bytes", state.size_on_disk());
                    Ok(())
                }
                AdminCmd::Backup { dir } => {
                    crate::data_dir::check_backup_target(&dir, data)?;
                    let applied = state.backup_to(&dir)?;
                    out!("backup of applied index {applied} written to {}", dir.display());
                    Ok(())
                }
                AdminCmd::User { cmd } => user(cfg, &state, &mut wal, cmd),
                AdminCmd::Verify | AdminCmd::Restore { .. } => unreachable!("handled above"),
            }
        }
    }
}

fn user(cfg: &Config, state: &storage::State, wal: &mut storage::wal::Wal, cmd: UserCmd) -> anyhow::Result<()> {
    let commit = |wal: &mut storage::wal::Wal, c: Command| -> anyhow::Result<Outcome> {
        Ok(storage::commit_offline(state, wal, vec![c])?.into_iter().next().context("no outcome")?)
    };
    match cmd {
        UserCmd::List { json } => {
            let users = state.users()?;
            if json {
                let v: Vec<_> = users.iter().map(|(id, u)| serde_json::json!({ "user": id, "created_ms": u.created, "deleted": u.deleted })).collect();
                out!("{}", serde_json::Value::Array(v));
            } else {
                for (id, u) in users {
                    out!("{id}\tcreated={}{}", iso8601_utc(u.created), if u.deleted { "\tdeleted" } else { "" });
                }
            }
            Ok(())
        }
        UserCmd::Add { user, password } => {
            if !valid_user_id(&user) {
                bail!("user must be 1-32 chars of a-z 0-9 _ . -, starting with a letter or digit");
            }
            if state.user(&user)?.is_some_and(|u| u.deleted) {
                bail!("the id {user} belonged to a deleted user, and ids are never given out again: pick another");
            }
            let password = password_or_stdin(password)?;
            let password_hash = hash(cfg, &password)?;
            match commit(wal, Command::Register { user: user.clone(), password_hash })? {
                Outcome::Done => {
                    set_scram(|c| commit(wal, c), &user, &password)?;
                    Ok(out!("user {user} added"))
                }
                Outcome::Refused(Refusal::UserExists) => bail!("user {user} exists"),
                o => bail!("unexpected outcome {o:?}"),
            }
        }
        UserCmd::Delete { user } if state.user(&user)?.is_some_and(|u| u.deleted) => bail!("user {user} was already deleted"),
        UserCmd::Delete { user } => match commit(wal, Command::DeleteUser { user: user.clone() })? {
            Outcome::Done => Ok(out!("user {user} deleted")),
            Outcome::Refused(_) => bail!("no user {user}"),
            o => bail!("unexpected outcome {o:?}"),
        },
        UserCmd::ResetPassword { user, .. } if state.user(&user)?.is_some_and(|u| u.deleted) => bail!("user {user} was deleted"),
        UserCmd::ResetPassword { user, password } => {
            let password = password_or_stdin(password)?;
            let password_hash = hash(cfg, &password)?;
            match commit(wal, Command::SetPassword { user: user.clone(), password_hash })? {
                Outcome::Done => {
                    set_scram(|c| commit(wal, c), &user, &password)?;
                    Ok(out!("password of {user} reset; its tokens are revoked"))
                }
                Outcome::Refused(_) => bail!("no user {user}"),
                o => bail!("unexpected outcome {o:?}"),
            }
        }
    }
}

/// `ms` since the Unix epoch as ISO 8601 in UTC, to the millisecond: `2026-11-29T10:32:11.346Z`.
pub fn iso8601_utc(ms: u64) -> String {
    let (days, rem) = (ms / 86_400_000, ms % 86_400_000);
    let (y, m, d) = civil_from_days(days as i64);
    let (h, min, s, milli) = (rem / 3_600_000, rem / 60_000 % 60, rem / 1000 % 60, rem % 1000);
    format!("{y:04}-{m:02}-{d:02}T{h:02}:{min:02}:{s:02}.{milli:03}Z")
}

/// The proleptic Gregorian (year, month, day) of a day count since 1970-01-01 (Howard
/// Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Stores the XMPP gateway's SCRAM verifiers of `password` (right after `Register` and
/// `SetPassword`, so SCRAM-SHA-1/-256 logins use the new password).
fn set_scram<F: FnMut(Command) -> anyhow::Result<Outcome>>(mut commit: F, user: &str, password: &str) -> anyhow::Result<()> {
    let scram = crate::xmpp::sasl::derive_verifiers(password).context("cannot derive the SCRAM verifiers")?;
    match commit(Command::SetScram { user: user.to_owned(), scram })? {
        Outcome::Done => Ok(()),
        o => bail!("unexpected outcome {o:?}"),
    }
}

fn password_or_stdin(p: Option<String>) -> anyhow::Result<String> {
    let p = match p {
        Some(p) => p,
        None => std::io::stdin().lock().lines().next().context("no password on stdin")??,
    };
    if !crate::http::auth::PASSWORD_BYTES.contains(&p.len()) {
        bail!("password must be 8-256 bytes");
    }
    Ok(p)
}

fn hash(cfg: &Config, password: &str) -> anyhow::Result<String> {
    let a = &cfg.auth;
    let params = argon2::Params::new(a.argon2_memory_kib, a.argon2_iterations, a.argon2_parallelism, None)
        .map_err(|e| anyhow::anyhow!("argon2 parameters: {e}"))?;
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let salt = SaltString::generate(&mut rand::thread_rng());
    Ok(argon.hash_password(password.as_bytes(), &salt).map_err(|e| anyhow::anyhow!("hashing: {e}"))?.to_string())
}

fn restore(data: &Path, backup: &Path, force: bool) -> anyhow::Result<()> {
    if !backup.join("BACKUP.json").exists() || !backup.join("state").is_dir() {
        bail!("{} is not a parley backup (no BACKUP.json and state/)", backup.display());
    }
    let in_use = data.exists() && std::fs::read_dir(data)?.next().is_some();
    if in_use {
        // Refuses while a server runs, before touching anything.
        let lock = storage::DataLock::acquire(data)?;
        if !force {
            bail!("{} is not empty; pass --force to move it aside and restore", data.display());
        }
        drop(lock);
        let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
        let aside = PathBuf::from(format!("{}.replaced-{secs}", data.display()));
        std::fs::rename(data, &aside).with_context(|| format!("moving {} aside", data.display()))?;
        out!("moved the old data directory to {}", aside.display());
    }
    std::fs::create_dir_all(data)?;
    copy_dir(&backup.join("state"), &data.join("state"))?;
    copy_dir(&backup.join("wal"), &data.join("wal"))?;
    let opened = storage::open(data, u64::MAX, 64 << 20)?;
    let problems = opened.state.check_invariants()?;
    if !problems.is_empty() {
        bail!("restored state has problems: {problems:?}");
    }
    crate::data_dir::mark(data)?;
    out!("restored {} (applied index {}) into {}", backup.display(), opened.state.applied(), data.display());
    Ok(())
}

fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let dst = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &dst)?;
        } else {
            std::fs::copy(e.path(), &dst)?;
            std::fs::File::open(&dst)?.sync_all()?;
        }
    }
    std::fs::File::open(to)?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::iso8601_utc;

    #[test]
    fn dates_are_iso_8601_in_utc() {
        assert_eq!(iso8601_utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(iso8601_utc(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(iso8601_utc(1_796_148_731_346), "2026-12-01T18:12:11.346Z");
        assert_eq!(iso8601_utc(4_107_542_399_999), "2100-02-28T23:59:59.999Z");
    }
}
