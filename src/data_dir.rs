//! What may serve as a data directory, checked before anything binds or writes.
//!
//! parley takes a directory that is missing (it is created), empty, or one that parley made: it
//! holds the marker file [`MARKER`], or (directories from before the marker, backups restored
//! with `parley admin restore`) `LOCK`, `state/` or `wal/`. Anything else, a file or a directory
//! of someone else's files, is refused, so parley never writes its files beside a user's. (A
//! mount point's `lost+found` does not count.)

use std::path::{Path, PathBuf};

/// The marker file parley writes into every data directory it uses.
pub const MARKER: &str = "PARLEY_DATA";

/// What the marker file says (for a person who finds it).
const MARKER_TEXT: &str = "This directory holds a parley server's data (write-ahead log in wal/, state in state/).\n";

/// Entries that only parley puts into a data directory.
const OURS: &[&str] = &[MARKER, "LOCK", "state", "wal"];

/// Entries that do not make a directory someone else's: a fresh file system's `lost+found` (a
/// data directory is often a mount point).
const IGNORED: &[&str] = &["lost+found"];

/// A path that cannot be used as a data directory.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    /// The path exists and is not a directory.
    #[error("{} is a file, not a directory; --data (server.data_dir) must name a directory", .0.display())]
    NotADirectory(PathBuf),
    /// A non-empty directory that parley did not make.
    #[error(
        "{} is not empty and is not a parley data directory (it holds {found}); \
         give --data (server.data_dir) an empty or new directory",
        path.display()
    )]
    Foreign {
        /// The directory.
        path: PathBuf,
        /// A few of its entries, for the message.
        found: String,
    },
    /// A backup target that is a file.
    #[error("{} is a file; a backup goes into a new or empty directory", .0.display())]
    BackupIsAFile(PathBuf),
    /// A backup target inside the data directory (a backup must survive losing it).
    #[error("{} is inside the data directory {}; a backup goes outside it", .0.display(), .1.display())]
    BackupInsideData(PathBuf, PathBuf),
    /// A relative backup target (the server's working directory is not the client's).
    #[error("{} is a relative path; give the server an absolute one", .0.display())]
    BackupRelative(PathBuf),
    /// A backup target that holds files already.
    #[error("{} is not empty; a backup goes into a new or empty directory", .0.display())]
    NotEmpty(PathBuf),
    /// A backup (it holds `BACKUP.json`). Serving it or running an admin command on it would
    /// change it in place (a lock file, the marker, sled's files, new log entries) while its
    /// `BACKUP.json` still names the index it was taken at.
    #[error(
        "{} is a backup (it holds BACKUP.json), not a data directory; restore it into one first: parley admin restore {} --data DIR",
        .0.display(), .0.display()
    )]
    IsBackup(PathBuf),
    /// The path could not be inspected.
    #[error("cannot use {} as the data directory: {source}", path.display())]
    Io {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Checks that `path` can be used as a data directory, leaving nothing changed: it is missing and
/// can be created (it is created and removed again, with any missing parents), an empty
/// directory, or a directory parley made. The error says what is wrong.
pub fn check(path: &Path) -> Result<(), DataDirError> {
    let io = |source| DataDirError::Io { path: path.to_owned(), source };
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return probe_create(path).map_err(io),
        Err(e) => return Err(io(e)),
    };
    if !meta.is_dir() {
        return Err(DataDirError::NotADirectory(path.to_owned()));
    }
    if path.join("BACKUP.json").exists() {
        return Err(DataDirError::IsBackup(path.to_owned()));
    }
    let mut names = Vec::new();
    for e in std::fs::read_dir(path).map_err(io)? {
        let name = e.map_err(io)?.file_name().to_string_lossy().into_owned();
        if OURS.contains(&name.as_str()) {
            return Ok(());
        }
        if !IGNORED.contains(&name.as_str()) {
            names.push(name);
        }
    }
    if names.is_empty() {
        return Ok(());
    }
    names.sort();
    let more = names.len().saturating_sub(3);
    let mut found = names.into_iter().take(3).collect::<Vec<_>>().join(", ");
    if more > 0 {
        found.push_str(&format!(" and {more} more"));
    }
    Err(DataDirError::Foreign { path: path.to_owned(), found })
}

/// Creates `path` and the parents it lacks, then removes what it created, deepest first (so a
/// directory parley cannot create, like one under `/proc`, is a start-up error, not a storage
/// error once the server runs).
fn probe_create(path: &Path) -> std::io::Result<()> {
    let mut missing = Vec::new();
    let mut p = path;
    while std::fs::symlink_metadata(p).is_err() {
        missing.push(p.to_owned());
        match p.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => p = parent,
            _ => break,
        }
    }
    std::fs::create_dir_all(path)?;
    for d in &missing {
        std::fs::remove_dir(d)?;
    }
    Ok(())
}

/// Checks that `dir` can receive a backup of the data directory `data`, without changing
/// anything: it is missing or an empty directory (a backup is never mixed with other files), and
/// it is not inside `data` (a backup must survive losing the data directory).
pub fn check_backup_target(dir: &Path, data: &Path) -> Result<(), DataDirError> {
    let io = |source| DataDirError::Io { path: dir.to_owned(), source };
    if let (Some(target), Ok(data_abs)) = (absolute_through_existing(dir), data.canonicalize()) {
        if target.starts_with(&data_abs) {
            return Err(DataDirError::BackupInsideData(dir.to_owned(), data.to_owned()));
        }
    }
    match std::fs::metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(e)),
        Ok(m) if !m.is_dir() => Err(DataDirError::BackupIsAFile(dir.to_owned())),
        Ok(_) if std::fs::read_dir(dir).map_err(io)?.next().is_some() => Err(DataDirError::NotEmpty(dir.to_owned())),
        Ok(_) => Ok(()),
    }
}

/// `p` made absolute with its longest existing prefix canonicalized (symlinks resolved) and the
/// rest appended as given.
fn absolute_through_existing(p: &Path) -> Option<PathBuf> {
    let abs = std::path::absolute(p).ok()?;
    let mut head = abs.as_path();
    let mut tail = Vec::new();
    loop {
        if let Ok(c) = head.canonicalize() {
            return Some(tail.iter().rev().fold(c, |acc: PathBuf, part| acc.join(part)));
        }
        tail.push(head.file_name()?.to_owned());
        head = head.parent()?;
    }
}

/// Writes the marker file into `path` (an existing data directory) unless it is there already.
///
/// # Errors
/// The I/O error of writing it.
pub fn mark(path: &Path) -> std::io::Result<()> {
    let p = path.join(MARKER);
    if p.exists() {
        return Ok(());
    }
    std::fs::write(&p, MARKER_TEXT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_empty_and_parleys_own_directories_are_accepted() {
        let t = tempfile::tempdir().unwrap();
        assert!(check(&t.path().join("new")).is_ok(), "missing");
        assert!(check(&t.path().join("a/b/c")).is_ok(), "missing with its parents");
        assert!(!t.path().join("a").exists(), "the probe left nothing behind");
        assert!(check(t.path()).is_ok(), "empty");
        std::fs::create_dir(t.path().join("lost+found")).unwrap();
        assert!(check(t.path()).is_ok(), "a fresh mount point");
        for ours in ["LOCK", "state", "wal", MARKER] {
            let d = t.path().join(format!("d-{ours}"));
            std::fs::create_dir_all(d.join(ours)).unwrap();
            std::fs::write(d.join("notes.txt"), "x").unwrap();
            assert!(check(&d).is_ok(), "a directory with {ours}");
        }
        // A backup: state/, wal/, BACKUP.json.
        let b = t.path().join("backup");
        std::fs::create_dir_all(b.join("state")).unwrap();
        std::fs::create_dir_all(b.join("wal")).unwrap();
        std::fs::write(b.join("BACKUP.json"), "{}").unwrap();
        assert!(matches!(check(&b), Err(DataDirError::IsBackup(_))), "a backup is not a data directory");
        assert_eq!(std::fs::read_dir(&b).unwrap().count(), 3, "the check left the backup as it was");
        let m = t.path().join("marked");
        std::fs::create_dir(&m).unwrap();
        mark(&m).unwrap();
        mark(&m).unwrap();
        assert!(check(&m).is_ok());
    }

    #[test]
    fn a_file_or_someone_elses_directory_is_refused_with_a_clear_message() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("file");
        std::fs::write(&f, "x").unwrap();
        let e = check(&f).unwrap_err().to_string();
        assert!(e.contains("is a file, not a directory"), "{e}");
        // A missing directory that cannot be created (procfs refuses mkdir, even to root).
        #[cfg(target_os = "linux")]
        {
            let e = check(Path::new("/proc/parley-no-such-dir")).unwrap_err().to_string();
            assert!(e.contains("cannot use /proc/parley-no-such-dir as the data directory"), "{e}");
        }
        let d = t.path().join("docs");
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join("notes.txt"), "x").unwrap();
        let e = check(&d).unwrap_err().to_string();
        assert!(e.contains("not a parley data directory") && e.contains("notes.txt"), "{e}");
        let data = t.path().join("data");
        std::fs::create_dir_all(data.join("state")).unwrap();
        assert!(check_backup_target(&d, &data).unwrap_err().to_string().contains("is not empty"));
        assert!(check_backup_target(&f, &data).unwrap_err().to_string().contains("is a file; a backup goes"));
        assert!(check_backup_target(&t.path().join("new"), &data).is_ok());
        for inside in [data.join("state").join("x"), data.join("bk"), data.join("state/../new/deeper")] {
            assert!(check_backup_target(&inside, &data).unwrap_err().to_string().contains("inside the data directory"), "{inside:?}");
        }
    }
}
