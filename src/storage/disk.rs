//! The storage trait under everything parley itself writes (log segments, checkpoint markers,
//! directory operations), its real implementation, and [`SimDisk`], a seeded simulated disk
//! that forgets what was not made durable when it "loses power".
//!
//! The idea comes from FoundationDB's `AsyncFileNonDurable` (a file whose unsynced writes may
//! be lost, reordered or torn at a simulated crash) and TigerBeetle's simulated storage (a
//! seeded, deterministic disk under the real code, so a failing seed replays). The crash model
//! follows LazyFS ("When Amnesia Strikes", VLDB 2024): whatever was not fsync'd may vanish,
//! and so may a create, rename or unlink whose directory was never fsync'd.
//!
//! # The crash model of [`SimDisk`]
//!
//! Each file has a *durable* image and the list of write/truncate operations since its last
//! [`DiskFile::sync_data`] (fdatasync); each directory has its durable entries and the
//! create/rename/unlink operations since its last [`Disk::sync_dir`] (fsync of the directory).
//! [`SimDisk::power_loss`] keeps a random subset of those volatile operations (applied in their
//! order; one that no longer applies, such as a rename of a name that is gone, is skipped),
//! and tears the last write of a file at a 512-byte or 4 KiB boundary: the rest of it is cut
//! off, zeros, or garbage (where the write overwrote bytes the disk held, they keep their old
//! content: a torn write only fails to write). Directories whose entry vanished vanish with everything below.
//!
//! [`SimDisk::fail_after`] makes the n-th mutating operation from now and every one after it
//! fail with `EIO` (the moment the power goes); the caller stops, calls `power_loss`, and
//! recovers on the same `SimDisk`, as a restarted process would.
//!
//! Optionally ([`SimDisk::set_fsync_failure_rate`]) an `fdatasync` fails with `EIO` and, as
//! Linux does after a writeback error ("fsyncgate", PostgreSQL 2018), marks the file's dirty
//! data clean without making it durable: reads still see it, a later successful fdatasync does
//! not write it, and a power loss forgets it.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How [`Disk::open`] opens a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// Read only; the file must exist.
    Read,
    /// Read and write; the file must exist.
    ReadWrite,
    /// Read and write a new, empty file; fails with `AlreadyExists` if the name is taken.
    CreateNew,
    /// Read and write, created if missing, truncated to 0 bytes if present.
    CreateTruncate,
}

/// One entry of [`Disk::read_dir`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    /// Full path of the entry.
    pub path: PathBuf,
    /// Whether it is a regular file (false for a directory or anything else).
    pub is_file: bool,
}

/// The operations parley's own files need. Paths are absolute or relative to the process's
/// working directory, as with `std::fs`. Nothing is durable until synced: file data by
/// [`DiskFile::sync_data`], creates, renames and unlinks by [`Disk::sync_dir`] on the directory
/// holding the name.
pub trait Disk: Send + Sync + fmt::Debug + 'static {
    /// Creates `dir` and its missing parents (not durable until each parent is synced).
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// `Ok(true)` for a directory, `Ok(false)` for anything else, `NotFound` when absent.
    fn is_dir(&self, path: &Path) -> io::Result<bool>;
    /// The entries of `dir`, in no particular order.
    fn read_dir(&self, dir: &Path) -> io::Result<Vec<DirEntry>>;
    /// Opens a file.
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Box<dyn DiskFile>>;
    /// Removes a file's name (durable after [`Disk::sync_dir`] of its directory).
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Renames a file within one directory, replacing `to` (durable after `sync_dir`).
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// fsync of a directory: makes the creates, renames and unlinks in it durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
}

/// An open file of a [`Disk`]. Positioned reads and writes (`pread`/`pwrite`).
#[allow(clippy::len_without_is_empty)] // a file's length, not a collection's
pub trait DiskFile: Send + fmt::Debug {
    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Reads up to `buf.len()` bytes at byte offset `off`; returns how many (0 at or past EOF).
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize>;
    /// Writes all of `buf` at byte offset `off`, extending the file as needed.
    fn write_all_at(&mut self, buf: &[u8], off: u64) -> io::Result<()>;
    /// Truncates or extends (with zeros) to `len` bytes.
    fn set_len(&mut self, len: u64) -> io::Result<()>;
    /// fdatasync: makes this file's data (and its length) durable.
    fn sync_data(&self) -> io::Result<()>;
}

/// A [`DiskFile`] as `Read + Seek + Write` with its own position, for `BufReader` and friends.
#[derive(Debug)]
pub struct Cursor {
    file: Box<dyn DiskFile>,
    pos: u64,
}

impl Cursor {
    /// A cursor at byte 0 of `file`.
    pub fn new(file: Box<dyn DiskFile>) -> Cursor {
        Cursor { file, pos: 0 }
    }
}

impl Read for Cursor {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for Cursor {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let base = match to {
            SeekFrom::Start(p) => {
                self.pos = p;
                return Ok(p);
            }
            SeekFrom::End(d) => (self.file.len()?, d),
            SeekFrom::Current(d) => (self.pos, d),
        };
        let p = base.0.checked_add_signed(base.1).ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek before byte 0"))?;
        self.pos = p;
        Ok(p)
    }
}

impl Write for Cursor {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write_all_at(buf, self.pos)?;
        self.pos += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

// ---------------------------------------------------------------------------------- real

/// The real file system (`std::fs`, `pread`/`pwrite`, `fdatasync`, directory `fsync`).
#[derive(Debug, Clone, Copy, Default)]
pub struct RealDisk;

/// The process-wide [`RealDisk`].
pub fn real() -> Arc<dyn Disk> {
    Arc::new(RealDisk)
}

impl Disk for RealDisk {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        fs::create_dir_all(dir)
    }
    fn is_dir(&self, path: &Path) -> io::Result<bool> {
        fs::metadata(path).map(|m| m.is_dir())
    }
    fn read_dir(&self, dir: &Path) -> io::Result<Vec<DirEntry>> {
        let mut out = Vec::new();
        for ent in fs::read_dir(dir)? {
            let path = ent?.path();
            // metadata follows symlinks, as the log always did.
            let is_file = fs::metadata(&path)?.is_file();
            out.push(DirEntry { path, is_file });
        }
        Ok(out)
    }
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Box<dyn DiskFile>> {
        let mut o = OpenOptions::new();
        match mode {
            OpenMode::Read => o.read(true),
            OpenMode::ReadWrite => o.read(true).write(true),
            OpenMode::CreateNew => o.read(true).write(true).create_new(true),
            OpenMode::CreateTruncate => o.read(true).write(true).create(true).truncate(true),
        };
        Ok(Box::new(RealFile(o.open(path)?)))
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
}

/// A file of [`RealDisk`].
#[derive(Debug)]
struct RealFile(File);

impl DiskFile for RealFile {
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        loop {
            match self.0.read_at(buf, off) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => return r,
            }
        }
    }
    fn write_all_at(&mut self, buf: &[u8], off: u64) -> io::Result<()> {
        self.0.write_all_at(buf, off)
    }
    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }
}

// ---------------------------------------------------------------------------------- simulated

/// A volatile file operation (not yet fdatasync'd).
#[derive(Debug, Clone)]
enum FileOp {
    Write { off: u64, data: Vec<u8> },
    SetLen(u64),
}

/// A simulated inode.
#[derive(Debug, Default)]
struct Inode {
    /// What reads see (the page cache).
    current: Vec<u8>,
    /// What survives a power loss.
    durable: Vec<u8>,
    /// Operations since the last fdatasync, in order.
    pending: Vec<FileOp>,
}

/// What a directory entry names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Node {
    File(u64),
    Dir(u64),
}

/// A volatile namespace operation in one directory (not yet fsync'd).
#[derive(Debug, Clone)]
enum NsOp {
    Link(String, Node),
    Unlink(String),
    Rename(String, String),
}

/// A simulated directory.
#[derive(Debug, Default, Clone)]
struct Dir {
    current: BTreeMap<String, Node>,
    durable: BTreeMap<String, Node>,
    pending: Vec<NsOp>,
}

/// Counts of what [`SimDisk::power_loss`] did, over the disk's life (for test reports).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SimStats {
    /// Power losses simulated.
    pub power_losses: u64,
    /// Volatile file operations kept / dropped at power losses.
    pub ops_kept: u64,
    /// See `ops_kept`.
    pub ops_dropped: u64,
    /// Writes torn at a 512-byte or 4 KiB boundary.
    pub torn_writes: u64,
    /// Volatile namespace operations dropped.
    pub ns_dropped: u64,
    /// fdatasyncs failed on purpose.
    pub fsync_failures: u64,
}

#[derive(Debug)]
struct Sim {
    rng: StdRng,
    files: BTreeMap<u64, Inode>,
    dirs: BTreeMap<u64, Dir>,
    next_ino: u64,
    /// Mutating operations left before the power goes (`None`: no crash planned).
    budget: Option<u64>,
    /// The power is gone: every operation fails until `power_loss`.
    dead: bool,
    /// Probability (0..1) that an fdatasync fails (fsyncgate semantics).
    fsync_failure_rate: f64,
    stats: SimStats,
}

/// Inode number of the root directory `/`.
const ROOT: u64 = 0;

/// A seeded simulated disk; see the module docs for its crash model. Cheap to clone (shared).
/// Paths must be absolute; `..` and `.` components are not supported.
#[derive(Debug, Clone)]
pub struct SimDisk {
    sim: Arc<Mutex<Sim>>,
}

fn eio(what: &str) -> io::Error {
    io::Error::other(format!("simulated power loss: {what} failed"))
}

fn not_found(p: &Path) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("{}: no such file or directory", p.display()))
}

fn components(p: &Path) -> io::Result<Vec<String>> {
    let mut out = Vec::new();
    for c in p.components() {
        match c {
            std::path::Component::RootDir => {}
            std::path::Component::Normal(s) => out.push(s.to_string_lossy().into_owned()),
            _ => return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("SimDisk needs absolute plain paths, got {}", p.display()))),
        }
    }
    if !p.is_absolute() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("SimDisk needs absolute paths, got {}", p.display())));
    }
    Ok(out)
}

impl Sim {
    /// Counts one mutating operation against the crash budget; `Err` once the power is gone.
    fn step(&mut self, what: &str) -> io::Result<()> {
        if std::env::var_os("PARLEY_SIM_TRACE").is_some() {
            eprintln!("  disk: {what} (budget {:?}, dead {})", self.budget, self.dead);
        }
        if self.dead {
            return Err(eio(what));
        }
        if let Some(b) = self.budget.as_mut() {
            if *b == 0 {
                self.dead = true;
                return Err(eio(what));
            }
            *b -= 1;
        }
        Ok(())
    }

    fn alive(&self, what: &str) -> io::Result<()> {
        if self.dead {
            return Err(eio(what));
        }
        Ok(())
    }

    fn lookup(&self, p: &Path) -> io::Result<Node> {
        let mut node = Node::Dir(ROOT);
        for c in components(p)? {
            let Node::Dir(d) = node else { return Err(not_found(p)) };
            node = *self.dirs.get(&d).and_then(|d| d.current.get(&c)).ok_or_else(|| not_found(p))?;
        }
        Ok(node)
    }

    /// The parent directory's inode and the last component.
    fn parent(&self, p: &Path) -> io::Result<(u64, String)> {
        let mut cs = components(p)?;
        let name = cs.pop().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the root has no parent"))?;
        let parent: PathBuf = std::iter::once("/".to_owned()).chain(cs).collect();
        match self.lookup(&parent)? {
            Node::Dir(d) => Ok((d, name)),
            Node::File(_) => Err(io::Error::other(format!("{} is not a directory", parent.display()))),
        }
    }

    fn link(&mut self, dir: u64, name: String, node: Node) {
        if let Some(d) = self.dirs.get_mut(&dir) {
            d.current.insert(name.clone(), node);
            d.pending.push(NsOp::Link(name, node));
        }
    }

    fn file(&mut self, ino: u64) -> io::Result<&mut Inode> {
        self.files.get_mut(&ino).ok_or_else(|| io::Error::other("stale simulated file handle"))
    }
}

impl SimDisk {
    /// An empty disk (only `/`), seeded: the same seed and the same operations give the same
    /// power losses.
    pub fn new(seed: u64) -> SimDisk {
        let mut dirs = BTreeMap::new();
        dirs.insert(ROOT, Dir::default());
        SimDisk {
            sim: Arc::new(Mutex::new(Sim {
                rng: StdRng::seed_from_u64(seed),
                files: BTreeMap::new(),
                dirs,
                next_ino: 1,
                budget: None,
                dead: false,
                fsync_failure_rate: 0.0,
                stats: SimStats::default(),
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Sim> {
        // A panic while holding the lock leaves a consistent map (no operation is half done
        // across an await or a callback), so a poisoned lock is still usable.
        self.sim.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Plans the power loss: the `n`-th mutating operation from now (0 = the next one) and
    /// every later one fail with `EIO`, as if the machine stopped there.
    pub fn fail_after(&self, n: u64) {
        self.lock().budget = Some(n);
    }

    /// The process died but the machine did not (`kill -9`): the page cache survives, so
    /// every file and name stays as the dead process left it. Clears the planned failure.
    pub fn revive(&self) {
        let mut s = self.lock();
        s.budget = None;
        s.dead = false;
    }

    /// Whether the planned power loss has happened (operations fail).
    pub fn is_dead(&self) -> bool {
        self.lock().dead
    }

    /// Probability in `[0, 1]` that an fdatasync fails with `EIO`, forgetting the file's dirty
    /// data as Linux does after a writeback error (see the module docs).
    pub fn set_fsync_failure_rate(&self, p: f64) {
        self.lock().fsync_failure_rate = p.clamp(0.0, 1.0);
    }

    /// What the power losses did so far.
    pub fn stats(&self) -> SimStats {
        self.lock().stats
    }

    /// Simulates a power loss and the reboot: every file and directory becomes its durable
    /// image plus a random subset of its volatile operations, the last write of a file possibly
    /// torn (see the module docs). Clears the planned failure; the disk works again.
    pub fn power_loss(&self) {
        let mut g = self.lock();
        let s = &mut *g;
        s.stats.power_losses += 1;
        // Directories first: which names survive.
        let dir_inos: Vec<u64> = s.dirs.keys().copied().collect();
        for ino in dir_inos {
            let Some(d) = s.dirs.get_mut(&ino) else { continue };
            let mut image = std::mem::take(&mut d.durable);
            for op in std::mem::take(&mut d.pending) {
                if !s.rng.gen_bool(0.5) {
                    s.stats.ns_dropped += 1;
                    if std::env::var_os("PARLEY_SIM_TRACE").is_some() {
                        eprintln!("  disk: power loss drops {op:?} in dir {ino}");
                    }
                    continue;
                }
                match op {
                    NsOp::Link(name, node) => {
                        image.insert(name, node);
                    }
                    NsOp::Unlink(name) => {
                        image.remove(&name);
                    }
                    NsOp::Rename(from, to) => {
                        if let Some(n) = image.remove(&from) {
                            image.insert(to, n);
                        }
                    }
                }
            }
            d.current = image.clone();
            d.durable = image;
        }
        // Drop directories no longer reachable from the root (and so everything below them).
        let mut reachable = std::collections::BTreeSet::new();
        let mut stack = vec![ROOT];
        while let Some(d) = stack.pop() {
            if !reachable.insert(d) {
                continue;
            }
            if let Some(dir) = s.dirs.get(&d) {
                stack.extend(dir.current.values().filter_map(|n| match n {
                    Node::Dir(c) => Some(*c),
                    Node::File(_) => None,
                }));
            }
        }
        s.dirs.retain(|ino, _| reachable.contains(ino));
        let live_dirs: std::collections::BTreeSet<u64> = s.dirs.keys().copied().collect();
        for d in s.dirs.values_mut() {
            d.current.retain(|_, n| !matches!(n, Node::Dir(c) if !live_dirs.contains(c)));
            d.durable = d.current.clone();
        }
        // Files: durable data plus a random subset of the volatile writes, the last one torn.
        for f in s.files.values_mut() {
            let mut img = std::mem::take(&mut f.durable);
            let ops = std::mem::take(&mut f.pending);
            let last = ops.len().saturating_sub(1);
            for (i, op) in ops.into_iter().enumerate() {
                if !s.rng.gen_bool(0.5) {
                    s.stats.ops_dropped += 1;
                    continue;
                }
                s.stats.ops_kept += 1;
                match op {
                    FileOp::SetLen(n) => img.resize(n as usize, 0),
                    FileOp::Write { off, data } => {
                        let (off, len) = (off as usize, data.len());
                        let mut keep = len;
                        let mut fill: Option<bool> = None; // Some(true): garbage, Some(false): zeros
                        if i == last && len > 0 && s.rng.gen_bool(0.5) {
                            let block = if s.rng.gen_bool(0.5) { 512 } else { 4096 };
                            // Boundaries strictly inside the write, or its start.
                            let first = off.div_ceil(block) * block;
                            let bounds: Vec<usize> = std::iter::once(off).chain((first..off + len).step_by(block).filter(|b| *b > off)).collect();
                            let b = bounds[s.rng.gen_range(0..bounds.len())];
                            keep = b - off;
                            fill = match s.rng.gen_range(0..3) {
                                0 => None,
                                1 => Some(false),
                                _ => Some(true),
                            };
                            s.stats.torn_writes += 1;
                        }
                        let old_len = img.len();
                        let end = match fill {
                            None => off + keep,
                            Some(_) => off + len,
                        };
                        if img.len() < end {
                            img.resize(end, 0);
                        }
                        img[off..off + keep].copy_from_slice(&data[..keep]);
                        // The part never written keeps what the disk held there; only past
                        // the old end (blocks allocated, data never written) is it zeros or
                        // garbage.
                        let fresh = (off + keep).max(old_len);
                        if fresh < off + len {
                            match fill {
                                Some(true) => s.rng.fill(&mut img[fresh..off + len]),
                                Some(false) => img[fresh..off + len].fill(0),
                                None => {}
                            }
                        }
                    }
                }
            }
            f.current = img.clone();
            f.durable = img;
        }
        // Files no longer named anywhere are gone.
        let named: std::collections::BTreeSet<u64> = s
            .dirs
            .values()
            .flat_map(|d| d.current.values())
            .filter_map(|n| match n {
                Node::File(i) => Some(*i),
                Node::Dir(_) => None,
            })
            .collect();
        s.files.retain(|ino, _| named.contains(ino));
        s.budget = None;
        s.dead = false;
    }

    /// The current content of a file (what a read sees), for tests.
    pub fn read_file(&self, path: &Path) -> io::Result<Vec<u8>> {
        let s = self.lock();
        match s.lookup(path)? {
            Node::File(i) => Ok(s.files.get(&i).map(|f| f.current.clone()).unwrap_or_default()),
            Node::Dir(_) => Err(io::Error::other("a directory")),
        }
    }
}

impl Disk for SimDisk {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        let mut s = self.lock();
        s.alive("mkdir")?;
        let mut cur = ROOT;
        let mut path = PathBuf::from("/");
        for c in components(dir)? {
            path.push(&c);
            let next = s.dirs.get(&cur).and_then(|d| d.current.get(&c)).copied();
            cur = match next {
                Some(Node::Dir(d)) => d,
                Some(Node::File(_)) => return Err(io::Error::new(io::ErrorKind::AlreadyExists, format!("{} is a file", path.display()))),
                None => {
                    s.step("mkdir")?;
                    let ino = s.next_ino;
                    s.next_ino += 1;
                    s.dirs.insert(ino, Dir::default());
                    s.link(cur, c, Node::Dir(ino));
                    ino
                }
            };
        }
        Ok(())
    }

    fn is_dir(&self, path: &Path) -> io::Result<bool> {
        let s = self.lock();
        s.alive("stat")?;
        Ok(matches!(s.lookup(path)?, Node::Dir(_)))
    }

    fn read_dir(&self, dir: &Path) -> io::Result<Vec<DirEntry>> {
        let s = self.lock();
        s.alive("readdir")?;
        let Node::Dir(d) = s.lookup(dir)? else {
            return Err(io::Error::other(format!("{} is not a directory", dir.display())));
        };
        Ok(s.dirs
            .get(&d)
            .map(|d| d.current.iter().map(|(name, n)| DirEntry { path: dir.join(name), is_file: matches!(n, Node::File(_)) }).collect())
            .unwrap_or_default())
    }

    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Box<dyn DiskFile>> {
        let mut s = self.lock();
        s.alive("open")?;
        let found = match s.lookup(path) {
            Ok(n) => Some(n),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let ino = match (found, mode) {
            (Some(Node::Dir(_)), _) => return Err(io::Error::other(format!("{} is a directory", path.display()))),
            (Some(Node::File(_)), OpenMode::CreateNew) => return Err(io::Error::new(io::ErrorKind::AlreadyExists, format!("{} exists", path.display()))),
            (Some(Node::File(i)), OpenMode::CreateTruncate) => {
                s.step("truncate")?;
                let f = s.file(i)?;
                f.current.clear();
                f.pending.push(FileOp::SetLen(0));
                i
            }
            (Some(Node::File(i)), _) => i,
            (None, OpenMode::Read | OpenMode::ReadWrite) => return Err(not_found(path)),
            (None, OpenMode::CreateNew | OpenMode::CreateTruncate) => {
                let (dir, name) = s.parent(path)?;
                s.step("create")?;
                let ino = s.next_ino;
                s.next_ino += 1;
                s.files.insert(ino, Inode::default());
                s.link(dir, name, Node::File(ino));
                ino
            }
        };
        Ok(Box::new(SimFile { disk: self.clone(), ino, writable: mode != OpenMode::Read }))
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut s = self.lock();
        s.alive("unlink")?;
        let (dir, name) = s.parent(path)?;
        match s.dirs.get(&dir).and_then(|d| d.current.get(&name)) {
            Some(Node::File(_)) => {}
            Some(Node::Dir(_)) => return Err(io::Error::other(format!("{} is a directory", path.display()))),
            None => return Err(not_found(path)),
        }
        s.step("unlink")?;
        if let Some(d) = s.dirs.get_mut(&dir) {
            d.current.remove(&name);
            d.pending.push(NsOp::Unlink(name));
        }
        Ok(())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut s = self.lock();
        s.alive("rename")?;
        let (d1, n1) = s.parent(from)?;
        let (d2, n2) = s.parent(to)?;
        if d1 != d2 {
            return Err(io::Error::new(io::ErrorKind::Unsupported, "SimDisk renames only within one directory"));
        }
        if !s.dirs.get(&d1).is_some_and(|d| d.current.contains_key(&n1)) {
            return Err(not_found(from));
        }
        s.step("rename")?;
        if let Some(d) = s.dirs.get_mut(&d1) {
            if let Some(n) = d.current.remove(&n1) {
                d.current.insert(n2.clone(), n);
            }
            d.pending.push(NsOp::Rename(n1, n2));
        }
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut s = self.lock();
        s.alive("fsync(dir)")?;
        let Node::Dir(d) = s.lookup(dir)? else {
            return Err(io::Error::other(format!("{} is not a directory", dir.display())));
        };
        s.step("fsync(dir)")?;
        if let Some(d) = s.dirs.get_mut(&d) {
            d.durable = d.current.clone();
            d.pending.clear();
        }
        Ok(())
    }
}

/// An open file of a [`SimDisk`].
#[derive(Debug)]
struct SimFile {
    disk: SimDisk,
    ino: u64,
    writable: bool,
}

impl SimFile {
    fn check_writable(&self) -> io::Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(io::Error::new(io::ErrorKind::PermissionDenied, "file opened read-only"))
        }
    }
}

impl DiskFile for SimFile {
    fn len(&self) -> io::Result<u64> {
        let mut s = self.disk.lock();
        s.alive("fstat")?;
        Ok(s.file(self.ino)?.current.len() as u64)
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        let mut s = self.disk.lock();
        s.alive("read")?;
        let f = s.file(self.ino)?;
        let Some(src) = usize::try_from(off).ok().and_then(|o| f.current.get(o..)) else { return Ok(0) };
        let n = src.len().min(buf.len());
        buf[..n].copy_from_slice(&src[..n]);
        Ok(n)
    }

    fn write_all_at(&mut self, buf: &[u8], off: u64) -> io::Result<()> {
        self.check_writable()?;
        let mut s = self.disk.lock();
        s.step("write")?;
        let f = s.file(self.ino)?;
        let (o, end) = (off as usize, off as usize + buf.len());
        if f.current.len() < end {
            f.current.resize(end, 0);
        }
        f.current[o..end].copy_from_slice(buf);
        f.pending.push(FileOp::Write { off, data: buf.to_vec() });
        Ok(())
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.check_writable()?;
        let mut s = self.disk.lock();
        s.step("ftruncate")?;
        let f = s.file(self.ino)?;
        f.current.resize(len as usize, 0);
        f.pending.push(FileOp::SetLen(len));
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut g = self.disk.lock();
        g.step("fdatasync")?;
        let s = &mut *g;
        let fail = s.fsync_failure_rate > 0.0 && s.rng.gen_bool(s.fsync_failure_rate);
        let f = s.files.get_mut(&self.ino).ok_or_else(|| io::Error::other("stale simulated file handle"))?;
        let ops = std::mem::take(&mut f.pending);
        if fail {
            // Writeback failed: the dirty data is marked clean but never reached the disk.
            s.stats.fsync_failures += 1;
            return Err(io::Error::other("simulated fdatasync failure (EIO); the dirty data is lost"));
        }
        for op in ops {
            match op {
                FileOp::SetLen(n) => f.durable.resize(n as usize, 0),
                FileOp::Write { off, data } => {
                    let (o, end) = (off as usize, off as usize + data.len());
                    if f.durable.len() < end {
                        f.durable.resize(end, 0);
                    }
                    f.durable[o..end].copy_from_slice(&data);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(d: &SimDisk, p: &str, data: &[u8], sync: bool) {
        let mut f = d.open(Path::new(p), OpenMode::CreateTruncate).unwrap();
        f.write_all_at(data, 0).unwrap();
        if sync {
            f.sync_data().unwrap();
        }
    }

    #[test]
    fn synced_data_and_directory_survive_power_loss() {
        for seed in 0..200 {
            let d = SimDisk::new(seed);
            d.create_dir_all(Path::new("/a/b")).unwrap();
            d.sync_dir(Path::new("/")).unwrap();
            d.sync_dir(Path::new("/a")).unwrap();
            write(&d, "/a/b/x", b"hello", true);
            d.sync_dir(Path::new("/a/b")).unwrap();
            let mut f = d.open(Path::new("/a/b/x"), OpenMode::ReadWrite).unwrap();
            f.write_all_at(b" world", 5).unwrap();
            write(&d, "/a/b/y", b"unsynced", true); // data synced, name not
            d.power_loss();
            let x = d.read_file(Path::new("/a/b/x")).unwrap();
            assert!(x.starts_with(b"hello"), "seed {seed}: {x:?}");
            assert!(x.len() <= 11);
            let names: Vec<_> = d.read_dir(Path::new("/a/b")).unwrap().into_iter().map(|e| e.path).collect();
            assert!(names.contains(&PathBuf::from("/a/b/x")));
        }
    }

    #[test]
    fn unsynced_names_and_data_can_vanish_and_writes_tear() {
        let (mut lost_name, mut torn) = (0, 0);
        for seed in 0..300 {
            let d = SimDisk::new(seed);
            d.create_dir_all(Path::new("/d")).unwrap();
            d.sync_dir(Path::new("/")).unwrap();
            write(&d, "/d/f", &vec![7u8; 10_000], true);
            if d.read_dir(Path::new("/d")).unwrap().is_empty() {
                unreachable!();
            }
            d.power_loss();
            match d.read_file(Path::new("/d/f")) {
                Err(_) => lost_name += 1,
                Ok(b) => assert_eq!(b, vec![7u8; 10_000]),
            }
            let d = SimDisk::new(seed);
            d.create_dir_all(Path::new("/d")).unwrap();
            d.sync_dir(Path::new("/")).unwrap();
            write(&d, "/d/f", b"", true);
            d.sync_dir(Path::new("/d")).unwrap();
            let mut f = d.open(Path::new("/d/f"), OpenMode::ReadWrite).unwrap();
            f.write_all_at(&vec![9u8; 10_000], 0).unwrap();
            d.power_loss();
            let b = d.read_file(Path::new("/d/f")).unwrap();
            if !b.is_empty() && b != vec![9u8; 10_000] {
                torn += 1;
                let nines = b.iter().take_while(|&&x| x == 9).count();
                assert!(nines % 512 == 0, "seed {seed}: torn at {nines}");
            }
        }
        assert!(lost_name > 50 && torn > 20, "lost names {lost_name}, torn {torn}");
    }

    #[test]
    fn planned_failure_stops_every_operation_until_power_loss() {
        let d = SimDisk::new(1);
        d.create_dir_all(Path::new("/d")).unwrap();
        d.sync_dir(Path::new("/")).unwrap();
        d.fail_after(1);
        let mut f = d.open(Path::new("/d/a"), OpenMode::CreateNew).unwrap(); // operation 0
        assert!(f.write_all_at(b"x", 0).is_err()); // operation 1: the power goes
        assert!(d.is_dead());
        assert!(d.open(Path::new("/d/b"), OpenMode::CreateNew).is_err());
        assert!(d.read_dir(Path::new("/d")).is_err());
        d.power_loss();
        assert!(!d.is_dead());
        assert!(d.open(Path::new("/d/c"), OpenMode::CreateNew).is_ok());
    }

    #[test]
    fn failed_fdatasync_forgets_the_dirty_data() {
        let d = SimDisk::new(3);
        d.create_dir_all(Path::new("/d")).unwrap();
        d.sync_dir(Path::new("/")).unwrap();
        write(&d, "/d/f", b"", true);
        d.sync_dir(Path::new("/d")).unwrap();
        d.set_fsync_failure_rate(1.0);
        let mut f = d.open(Path::new("/d/f"), OpenMode::ReadWrite).unwrap();
        f.write_all_at(b"lost", 0).unwrap();
        assert!(f.sync_data().is_err());
        d.set_fsync_failure_rate(0.0);
        f.sync_data().unwrap(); // nothing dirty left
        assert_eq!(d.read_file(Path::new("/d/f")).unwrap(), b"lost"); // the page cache still has it
        d.power_loss();
        assert_eq!(d.read_file(Path::new("/d/f")).unwrap(), b"");
    }
}
