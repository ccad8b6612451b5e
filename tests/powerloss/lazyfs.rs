//! A FUSE file system that forgets: LazyFS's idea ("When Amnesia Strikes", VLDB 2024) as an
//! in-memory file system on the `fuser` crate, for the power-loss test.
//!
//! Every file has its current bytes (what reads see, the page cache) and its durable bytes;
//! `fsync`/`fdatasync` on it copies the first to the second. Every directory has its current
//! entries and its durable entries; `fsync` of the directory copies them, so a create, rename,
//! unlink, mkdir or rmdir is held back until the directory holding the name is fsync'd (the
//! strict POSIX reading; ext4 is usually kinder). [`LazyFs::drop_unsynced`] is the power cut:
//! every file and directory goes back to its durable image, and whatever is no longer reachable
//! from the root is gone. The test calls it only while nothing has the file system open (after
//! the server was killed), the way a machine reboots with no process alive.
//!
//! Everything is in memory: fine for a test's few MiB. Files are opened with `FOPEN_DIRECT_IO`
//! and attributes and names have a zero TTL, so the kernel caches nothing that a drop would
//! make stale.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};

const TTL: Duration = Duration::ZERO;
const ROOT: u64 = 1;

#[derive(Debug, Clone)]
struct Node {
    kind: FileType,
    perm: u16,
    /// File bytes as reads see them.
    data: Vec<u8>,
    /// File bytes that survive [`LazyFs::drop_unsynced`].
    durable: Vec<u8>,
    /// Directory entries now.
    children: BTreeMap<OsString, u64>,
    /// Directory entries that survive a drop.
    durable_children: BTreeMap<OsString, u64>,
    mtime: SystemTime,
}

impl Node {
    fn new(kind: FileType, perm: u16) -> Node {
        Node { kind, perm, data: Vec::new(), durable: Vec::new(), children: BTreeMap::new(), durable_children: BTreeMap::new(), mtime: SystemTime::now() }
    }
}

/// What the file system saw, for the test's report.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    /// fsync/fdatasync of files.
    pub file_syncs: u64,
    /// fsync of directories.
    pub dir_syncs: u64,
    /// Drops (simulated power cuts).
    pub drops: u64,
    /// Bytes of file data thrown away by drops.
    pub bytes_dropped: u64,
    /// Names (creates, renames, unlinks) undone by drops.
    pub names_dropped: u64,
}

#[derive(Debug)]
struct Inner {
    nodes: HashMap<u64, Node>,
    next_ino: u64,
    stats: Stats,
}

/// The file system; clones share it (one is handed to the FUSE session, one kept by the test).
#[derive(Debug, Clone)]
pub struct LazyFs {
    inner: Arc<Mutex<Inner>>,
}

impl Default for LazyFs {
    fn default() -> Self {
        let mut nodes = HashMap::new();
        let mut root = Node::new(FileType::Directory, 0o755);
        root.durable_children = BTreeMap::new();
        nodes.insert(ROOT, root);
        LazyFs { inner: Arc::new(Mutex::new(Inner { nodes, next_ino: ROOT + 1, stats: Stats::default() })) }
    }
}

impl LazyFs {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The power cut: every file and directory back to its durable image; unreachable ones gone.
    pub fn drop_unsynced(&self) {
        let mut g = self.lock();
        let inner = &mut *g;
        for n in inner.nodes.values_mut() {
            if n.data != n.durable {
                inner.stats.bytes_dropped += n.data.len().abs_diff(n.durable.len()).max(1) as u64;
            }
            if n.children != n.durable_children {
                let changed = n.children.iter().filter(|(k, v)| n.durable_children.get(*k) != Some(v)).count()
                    + n.durable_children.keys().filter(|k| !n.children.contains_key(*k)).count();
                inner.stats.names_dropped += changed as u64;
            }
            n.data = n.durable.clone();
            n.children = n.durable_children.clone();
        }
        let mut seen = std::collections::HashSet::new();
        let mut stack = vec![ROOT];
        while let Some(i) = stack.pop() {
            if seen.insert(i) {
                if let Some(n) = inner.nodes.get(&i) {
                    stack.extend(n.children.values().copied());
                }
            }
        }
        inner.nodes.retain(|i, _| seen.contains(i));
        inner.stats.drops += 1;
    }

    /// Counters so far.
    pub fn stats(&self) -> Stats {
        self.lock().stats
    }

    /// Mounts a new, empty file system at `at` (an existing empty directory) on a background
    /// thread; unmounted when the returned [`Mounted`] is dropped.
    pub fn mount(at: &Path) -> std::io::Result<(LazyFs, Mounted)> {
        let fs = LazyFs::default();
        let mut cfg = fuser::Config::default();
        cfg.mount_options = vec![fuser::MountOption::FSName("parley-lazyfs".into()), fuser::MountOption::RW];
        let session = fuser::spawn_mount(fs.clone(), at, &cfg)?;
        Ok((fs, Mounted { session: Some(session), at: at.to_owned() }))
    }
}

/// A mounted [`LazyFs`]. Dropping it detaches the mount (`umount2(MNT_DETACH)`, which works
/// even while a killed server's files are still being closed), then ends the session.
pub struct Mounted {
    session: Option<fuser::BackgroundSession>,
    at: std::path::PathBuf,
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Ok(c) = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(self.at.as_os_str())) {
            // SAFETY: umount2 with a valid NUL-terminated path.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
        drop(self.session.take());
    }
}

fn attr(ino: u64, n: &Node) -> FileAttr {
    let size = if n.kind == FileType::Directory { 0 } else { n.data.len() as u64 };
    FileAttr {
        ino: INodeNo(ino),
        size,
        blocks: size.div_ceil(512),
        atime: n.mtime,
        mtime: n.mtime,
        ctime: n.mtime,
        crtime: n.mtime,
        kind: n.kind,
        perm: n.perm,
        nlink: if n.kind == FileType::Directory { 2 } else { 1 },
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

impl Inner {
    fn dir(&mut self, ino: u64) -> Result<&mut Node, Errno> {
        match self.nodes.get_mut(&ino) {
            Some(n) if n.kind == FileType::Directory => Ok(n),
            Some(_) => Err(Errno::ENOTDIR),
            None => Err(Errno::ENOENT),
        }
    }

    fn new_node(&mut self, parent: u64, name: &OsStr, kind: FileType, perm: u16) -> Result<(u64, FileAttr), Errno> {
        if self.dir(parent)?.children.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        let node = Node::new(kind, perm);
        let a = attr(ino, &node);
        self.nodes.insert(ino, node);
        self.dir(parent)?.children.insert(name.to_owned(), ino);
        Ok((ino, a))
    }
}

impl Filesystem for LazyFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let mut g = self.lock();
        let r = g.dir(parent.0).and_then(|d| d.children.get(name).copied().ok_or(Errno::ENOENT));
        match r.and_then(|i| g.nodes.get(&i).map(|n| attr(i, n)).ok_or(Errno::ENOENT)) {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let g = self.lock();
        match g.nodes.get(&ino.0) {
            Some(n) => reply.attr(&TTL, &attr(ino.0, n)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut g = self.lock();
        let Some(n) = g.nodes.get_mut(&ino.0) else { return reply.error(Errno::ENOENT) };
        if let Some(m) = mode {
            n.perm = (m & 0o7777) as u16;
        }
        if let Some(s) = size {
            if n.kind == FileType::Directory {
                return reply.error(Errno::EISDIR);
            }
            n.data.resize(s as usize, 0);
            n.mtime = SystemTime::now();
        }
        reply.attr(&TTL, &attr(ino.0, n));
    }

    fn mkdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, mode: u32, _umask: u32, reply: ReplyEntry) {
        match self.lock().new_node(parent.0, name, FileType::Directory, (mode & 0o7777) as u16) {
            Ok((_, a)) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut g = self.lock();
        let r = g.dir(parent.0).and_then(|d| d.children.get(name).copied().ok_or(Errno::ENOENT));
        match r {
            Ok(i) if g.nodes.get(&i).is_some_and(|n| n.kind == FileType::Directory) => reply.error(Errno::EISDIR),
            Ok(_) => {
                if let Ok(d) = g.dir(parent.0) {
                    d.children.remove(name);
                }
                reply.ok()
            }
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut g = self.lock();
        let r = g.dir(parent.0).and_then(|d| d.children.get(name).copied().ok_or(Errno::ENOENT));
        match r {
            Ok(i) => match g.nodes.get(&i) {
                Some(n) if n.kind != FileType::Directory => reply.error(Errno::ENOTDIR),
                Some(n) if !n.children.is_empty() => reply.error(Errno::ENOTEMPTY),
                _ => {
                    if let Ok(d) = g.dir(parent.0) {
                        d.children.remove(name);
                    }
                    reply.ok()
                }
            },
            Err(e) => reply.error(e),
        }
    }

    fn rename(&self, _req: &Request, parent: INodeNo, name: &OsStr, newparent: INodeNo, newname: &OsStr, _flags: RenameFlags, reply: ReplyEmpty) {
        let mut g = self.lock();
        let r = g.dir(parent.0).and_then(|d| d.children.get(name).copied().ok_or(Errno::ENOENT));
        let ino = match r {
            Ok(i) => i,
            Err(e) => return reply.error(e),
        };
        if let Err(e) = g.dir(newparent.0) {
            return reply.error(e);
        }
        if let Some(old) = g.dir(newparent.0).ok().and_then(|d| d.children.get(newname).copied()) {
            if g.nodes.get(&old).is_some_and(|n| n.kind == FileType::Directory && !n.children.is_empty()) {
                return reply.error(Errno::ENOTEMPTY);
            }
        }
        if let Ok(d) = g.dir(parent.0) {
            d.children.remove(name);
        }
        if let Ok(d) = g.dir(newparent.0) {
            d.children.insert(newname.to_owned(), ino);
        }
        reply.ok()
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if self.lock().nodes.contains_key(&ino.0) {
            reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO)
        } else {
            reply.error(Errno::ENOENT)
        }
    }

    fn read(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, size: u32, _flags: OpenFlags, _lock: Option<LockOwner>, reply: ReplyData) {
        let g = self.lock();
        let Some(n) = g.nodes.get(&ino.0) else { return reply.error(Errno::ENOENT) };
        let start = (offset as usize).min(n.data.len());
        let end = (start + size as usize).min(n.data.len());
        reply.data(&n.data[start..end]);
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let mut g = self.lock();
        let Some(n) = g.nodes.get_mut(&ino.0) else { return reply.error(Errno::ENOENT) };
        let (o, end) = (offset as usize, offset as usize + data.len());
        if n.data.len() < end {
            n.data.resize(end, 0);
        }
        n.data[o..end].copy_from_slice(data);
        n.mtime = SystemTime::now();
        reply.written(data.len() as u32);
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock: LockOwner, reply: ReplyEmpty) {
        reply.ok()
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        let mut g = self.lock();
        g.stats.file_syncs += 1;
        match g.nodes.get_mut(&ino.0) {
            Some(n) => {
                n.durable = n.data.clone();
                if n.kind == FileType::Directory {
                    n.durable_children = n.children.clone();
                }
                reply.ok()
            }
            None => reply.error(Errno::ENOENT),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.lock().dir(ino.0) {
            Ok(_) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let mut g = self.lock();
        let entries: Vec<(u64, FileType, OsString)> = match g.dir(ino.0) {
            Ok(d) => {
                let kids: Vec<(OsString, u64)> = d.children.iter().map(|(k, v)| (k.clone(), *v)).collect();
                let mut v = vec![(ino.0, FileType::Directory, OsString::from(".")), (ino.0, FileType::Directory, OsString::from(".."))];
                for (name, i) in kids {
                    let kind = g.nodes.get(&i).map(|n| n.kind).unwrap_or(FileType::RegularFile);
                    v.push((i, kind, name));
                }
                v
            }
            Err(e) => return reply.error(e),
        };
        for (k, (i, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(i), (k + 1) as u64, kind, &name) {
                break;
            }
        }
        reply.ok()
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        reply.ok()
    }

    fn fsyncdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        let mut g = self.lock();
        g.stats.dir_syncs += 1;
        match g.dir(ino.0) {
            Ok(d) => {
                d.durable_children = d.children.clone();
                reply.ok()
            }
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // 4 GiB free in 4 KiB blocks; plenty of inodes.
        reply.statfs(1 << 20, 1 << 20, 1 << 20, 1 << 20, 1 << 20, 4096, 255, 4096);
    }

    fn create(&self, _req: &Request, parent: INodeNo, name: &OsStr, mode: u32, _umask: u32, _flags: i32, reply: ReplyCreate) {
        match self.lock().new_node(parent.0, name, FileType::RegularFile, (mode & 0o7777) as u16) {
            Ok((_, a)) => reply.created(&TTL, &a, Generation(0), FileHandle(0), FopenFlags::FOPEN_DIRECT_IO),
            Err(e) => reply.error(e),
        }
    }
}
