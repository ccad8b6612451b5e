//! Snapshots: a checksummed copy of the whole state at one applied index, in a file of its own,
//! independent of sled's files.
//!
//! Why: the log is the truth, but checkpoints delete its old segments. If sled's directory is
//! then damaged (sled 0.34 has open reports of databases that no longer open after an abrupt
//! stop), the state can only be rebuilt from a copy that does not depend on sled: the newest
//! snapshot, then the log after it. So log segments are deleted only up to the newest durable
//! snapshot (see `pipeline.rs`), and start-up's rebuild loads it. Raft's snapshots (§7 of the
//! Raft paper) are the same idea, and a replicated log will ship these files to lagging
//! followers.
//!
//! File: `DATA/snapshots/{index:020}.snap`, written as `.tmp`, fsync'd, renamed, and the
//! directory fsync'd (and `DATA`, which holds the directory's name), so a snapshot is either
//! whole or absent.
//!
//! | part | layout |
//! | --- | --- |
//! | header | `PRLYSNP1` (8 bytes), applied index (u64 BE), CRC-32 of those 16 bytes (u32 BE) |
//! | block, repeated | payload length (u32 BE, > 0), CRC-32 of the payload (u32 BE), payload: records `klen (u32 BE) key vlen (u32 BE) value` |
//! | trailer | 0 (u32 BE), CRC-32 of the next 8 bytes (u32 BE), record count (u64 BE) |

use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use super::StorageError;

const MAGIC: &[u8; 8] = b"PRLYSNP1";
/// Payload bytes per block before it is written out.
const BLOCK_BYTES: usize = 256 * 1024;
/// Largest block a reader accepts, in bytes (a larger length is corruption).
const MAX_BLOCK_BYTES: u32 = 64 << 20;

/// A snapshot on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotFile {
    /// The applied index it holds.
    pub index: u64,
    pub path: PathBuf,
}

/// `DATA/snapshots`.
pub fn dir_of(data: &Path) -> PathBuf {
    data.join("snapshots")
}

fn io(p: &Path) -> impl Fn(std::io::Error) -> StorageError + '_ {
    move |e| StorageError::io(p, e)
}

/// Writes every `(key, value)` of `records` as the snapshot of applied index `index` in `dir`,
/// durably (tmp file, fsync, rename, fsync of `dir` and of its parent). Returns the file and the
/// record count.
pub fn write<I>(dir: &Path, index: u64, records: I) -> Result<(SnapshotFile, u64), StorageError>
where
    I: IntoIterator<Item = Result<(sled::IVec, sled::IVec), StorageError>>,
{
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    // The directory's own name must be durable in its parent too (the first snapshot creates
    // it; a process that died before this fsync may have created it): without this a power
    // cut can take the whole directory, and with it the snapshot the log was purged up to.
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::File::open(parent).and_then(|d| d.sync_all()).map_err(io(parent))?;
    let path = dir.join(format!("{index:020}.snap"));
    let tmp = dir.join(format!("{index:020}.snap.tmp"));
    let f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    let mut w = BufWriter::new(f);
    let mut header = MAGIC.to_vec();
    header.extend_from_slice(&index.to_be_bytes());
    let crc = crc32fast::hash(&header);
    header.extend_from_slice(&crc.to_be_bytes());
    w.write_all(&header).map_err(io(&tmp))?;
    let mut block = Vec::with_capacity(BLOCK_BYTES + 1024);
    let mut count = 0u64;
    let flush = |w: &mut BufWriter<std::fs::File>, block: &mut Vec<u8>| -> std::io::Result<()> {
        if block.is_empty() {
            return Ok(());
        }
        w.write_all(&(block.len() as u32).to_be_bytes())?;
        w.write_all(&crc32fast::hash(block).to_be_bytes())?;
        w.write_all(block)?;
        block.clear();
        Ok(())
    };
    for r in records {
        let (k, v) = r?;
        block.extend_from_slice(&(k.len() as u32).to_be_bytes());
        block.extend_from_slice(&k);
        block.extend_from_slice(&(v.len() as u32).to_be_bytes());
        block.extend_from_slice(&v);
        count += 1;
        if block.len() >= BLOCK_BYTES {
            flush(&mut w, &mut block).map_err(io(&tmp))?;
        }
    }
    flush(&mut w, &mut block).map_err(io(&tmp))?;
    w.write_all(&0u32.to_be_bytes()).map_err(io(&tmp))?;
    w.write_all(&crc32fast::hash(&count.to_be_bytes()).to_be_bytes()).map_err(io(&tmp))?;
    w.write_all(&count.to_be_bytes()).map_err(io(&tmp))?;
    let f = w.into_inner().map_err(|e| StorageError::io(&tmp, e.into_error()))?;
    f.sync_all().map_err(io(&tmp))?;
    drop(f);
    std::fs::rename(&tmp, &path).map_err(io(&path))?;
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))?;
    Ok((SnapshotFile { index, path }, count))
}

/// Every whole-looking snapshot in `dir` (by name), newest first. Temporary files are ignored.
pub fn list(dir: &Path) -> Result<Vec<SnapshotFile>, StorageError> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(StorageError::io(dir, e)),
    };
    let mut out = Vec::new();
    for ent in rd {
        let ent = ent.map_err(io(dir))?;
        let name = ent.file_name();
        let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".snap")) else { continue };
        if let Ok(index) = stem.parse::<u64>() {
            out.push(SnapshotFile { index, path: ent.path() });
        }
    }
    out.sort_by(|a, b| b.index.cmp(&a.index));
    Ok(out)
}

/// Deletes every snapshot in `dir` older than `keep` (and left-over temporary files).
pub fn remove_older(dir: &Path, keep: u64) -> Result<(), StorageError> {
    for s in list(dir)? {
        if s.index < keep {
            std::fs::remove_file(&s.path).map_err(io(&s.path))?;
        }
    }
    if let Ok(rd) = std::fs::read_dir(dir) {
        for ent in rd.flatten() {
            if ent.file_name().to_str().is_some_and(|n| n.ends_with(".snap.tmp")) {
                let _ = std::fs::remove_file(ent.path());
            }
        }
    }
    Ok(())
}

/// Reads a snapshot, checking every checksum, calling `f` for each record in order. Returns its
/// applied index and record count. A damaged or truncated file is an error naming it.
pub fn read(path: &Path, mut f: impl FnMut(&[u8], &[u8]) -> Result<(), StorageError>) -> Result<(u64, u64), StorageError> {
    let bad = |what: &str| StorageError::Decode(format!("snapshot {}: {what}", path.display()));
    let mut r = BufReader::new(std::fs::File::open(path).map_err(io(path))?);
    let mut header = [0u8; 20];
    r.read_exact(&mut header).map_err(|_| bad("truncated header"))?;
    if &header[..8] != MAGIC {
        return Err(bad("not a parley snapshot"));
    }
    if crc32fast::hash(&header[..16]).to_be_bytes() != header[16..20] {
        return Err(bad("header checksum mismatch"));
    }
    let index = u64::from_be_bytes(header[8..16].try_into().map_err(|_| bad("header"))?);
    let mut count = 0u64;
    loop {
        let mut lc = [0u8; 8];
        r.read_exact(&mut lc).map_err(|_| bad("truncated (no trailer)"))?;
        let len = u32::from_be_bytes(lc[..4].try_into().map_err(|_| bad("block"))?);
        let crc: [u8; 4] = lc[4..8].try_into().map_err(|_| bad("block"))?;
        if len == 0 {
            let mut n = [0u8; 8];
            r.read_exact(&mut n).map_err(|_| bad("truncated trailer"))?;
            if crc32fast::hash(&n).to_be_bytes() != crc || u64::from_be_bytes(n) != count {
                return Err(bad("trailer does not match the records"));
            }
            return Ok((index, count));
        }
        if len > MAX_BLOCK_BYTES {
            return Err(bad("block length out of range"));
        }
        let mut block = vec![0u8; len as usize];
        r.read_exact(&mut block).map_err(|_| bad("truncated block"))?;
        if crc32fast::hash(&block).to_be_bytes() != crc {
            return Err(bad("block checksum mismatch"));
        }
        let mut b = block.as_slice();
        while !b.is_empty() {
            let k = take_field(&mut b).ok_or_else(|| bad("malformed record"))?;
            let v = take_field(&mut b).ok_or_else(|| bad("malformed record"))?;
            f(k, v)?;
            count += 1;
        }
    }
}

/// A u32-BE-length-prefixed field at the front of `b`.
fn take_field<'a>(b: &mut &'a [u8]) -> Option<&'a [u8]> {
    let len = u32::from_be_bytes(b.get(..4)?.try_into().ok()?) as usize;
    let field = b.get(4..4 + len)?;
    *b = &b[4 + len..];
    Some(field)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(n: usize) -> Vec<(sled::IVec, sled::IVec)> {
        (0..n).map(|i| (sled::IVec::from(format!("key{i:06}").as_bytes()), sled::IVec::from(vec![(i % 251) as u8; i % 700]))).collect()
    }

    #[test]
    fn round_trip_list_and_remove_older() {
        let dir = tempfile::tempdir().unwrap();
        let recs = records(5_000);
        let (s, n) = write(dir.path(), 42, recs.iter().cloned().map(Ok)).unwrap();
        assert_eq!((s.index, n), (42, 5_000));
        write(dir.path(), 7, std::iter::empty()).unwrap();
        assert_eq!(list(dir.path()).unwrap().iter().map(|s| s.index).collect::<Vec<_>>(), vec![42, 7]);
        let mut got = Vec::new();
        let (index, count) = read(&s.path, |k, v| {
            got.push((sled::IVec::from(k), sled::IVec::from(v)));
            Ok(())
        })
        .unwrap();
        assert_eq!((index, count), (42, 5_000));
        assert_eq!(got, recs);
        remove_older(dir.path(), 42).unwrap();
        assert_eq!(list(dir.path()).unwrap(), vec![s]);
    }

    /// Every truncation and every flipped byte is refused, never a panic or a wrong result.
    #[test]
    fn damage_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = write(dir.path(), 9, records(300).into_iter().map(Ok)).unwrap();
        let good = std::fs::read(&s.path).unwrap();
        let p = dir.path().join("x.snap");
        for cut in (0..good.len()).step_by(97) {
            std::fs::write(&p, &good[..cut]).unwrap();
            assert!(read(&p, |_, _| Ok(())).is_err(), "cut at {cut}");
        }
        for at in (0..good.len()).step_by(89) {
            let mut b = good.clone();
            b[at] ^= 0x40;
            std::fs::write(&p, &b).unwrap();
            assert!(read(&p, |_, _| Ok(())).is_err(), "flipped byte {at}");
        }
    }
}
