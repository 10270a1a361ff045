//! The digest map: per disk, the BLAKE3 digest of every 64 KiB block of the latest state, kept
//! up to date by each apply, so that a resynchronization compares a range of the replica
//! without reading it (only the primary reads its disk; see docs/design/replication.md).
//!
//! `disks/<id>/digests.map`, version 1, little-endian:
//!
//! ```text
//! 0   8  magic "VMRDMAP\n"
//! 8   2  version (1)
//! 10  2  reserved (0)
//! 12  4  block size (65536)
//! 16  8  disk size in bytes
//! 24  8  applied: the catalog's last applied sequence these digests describe
//! 32 24  reserved (0)
//! 56  8  the first 8 bytes of BLAKE3 over bytes 0..56
//! 64 ..  32 bytes per block, in disk order; all zero = not known (computed when asked)
//! ```
//!
//! **The rule that keeps it true.** A map is used only when its header is intact, its geometry
//! is the disk's, its `applied` equals the catalog's last applied sequence and the latest state
//! is not torn (no apply in progress). An apply changes the map only after its commit recorded
//! the new sequence in the catalog: it writes the digests of the blocks it wrote (blocks it
//! wrote in part become "not known"), makes them durable, and only then stamps the header with
//! the new sequence. A crash anywhere in between leaves the header naming an older sequence,
//! so the map is not used, and the next comparison starts a fresh one. Entries that are not
//! known are zero bytes, so a fresh map is a sparse file and costs nothing until filled.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The map's file name in a disk's folder.
pub(crate) const MAP_FILE: &str = "digests.map";
/// The block each entry describes: the bitmaps' granularity, what a resynchronization compares.
pub const MAP_BLOCK: u64 = 64 * 1024;
const MAGIC: [u8; 8] = *b"VMRDMAP\n";
const VERSION: u16 = 1;
const HEADER_LEN: u64 = 64;
const ENTRY_LEN: u64 = 32;
/// An entry whose digest is not known.
pub(crate) const UNKNOWN: [u8; 32] = [0; 32];

fn header(size: u64, applied: u64) -> [u8; HEADER_LEN as usize] {
    let mut b = [0u8; HEADER_LEN as usize];
    b[..8].copy_from_slice(&MAGIC);
    b[8..10].copy_from_slice(&VERSION.to_le_bytes());
    b[12..16].copy_from_slice(&(MAP_BLOCK as u32).to_le_bytes());
    b[16..24].copy_from_slice(&size.to_le_bytes());
    b[24..32].copy_from_slice(&applied.to_le_bytes());
    let sum = blake3::hash(&b[..56]);
    b[56..64].copy_from_slice(&sum.as_bytes()[..8]);
    b
}

/// The geometry and sequence a header states, or why it cannot be used.
fn parse_header(b: &[u8; HEADER_LEN as usize]) -> Result<(u64, u64), String> {
    if b[..8] != MAGIC {
        return Err("it does not start with the digest map's magic".into());
    }
    if b[56..64] != blake3::hash(&b[..56]).as_bytes()[..8] {
        return Err("its header checksum does not match".into());
    }
    let version = u16::from_le_bytes([b[8], b[9]]);
    if version != VERSION {
        return Err(format!(
            "it is version {version}, this build reads {VERSION}"
        ));
    }
    let bs = u32::from_le_bytes(b[12..16].try_into().unwrap_or_default()) as u64;
    if bs != MAP_BLOCK {
        return Err(format!("its blocks are {bs} bytes, not {MAP_BLOCK}"));
    }
    let size = u64::from_le_bytes(b[16..24].try_into().unwrap_or_default());
    let applied = u64::from_le_bytes(b[24..32].try_into().unwrap_or_default());
    Ok((size, applied))
}

/// The length of block `k` of a disk of `size` bytes (the last may be short).
pub(crate) fn block_len(size: u64, k: u64) -> u64 {
    MAP_BLOCK.min(size.saturating_sub(k * MAP_BLOCK))
}

/// An open digest map that describes the latest state (see the module docs for when).
pub(crate) struct DigestMap {
    file: File,
    path: PathBuf,
    size: u64,
}

impl DigestMap {
    /// The map in disk folder `ddir`, if it describes a disk of `size` bytes as of sequence
    /// `applied`; None when it is missing, damaged, or about another state.
    pub(crate) fn open_valid(ddir: &Path, size: u64, applied: u64) -> Option<DigestMap> {
        let path = ddir.join(MAP_FILE);
        let file = OpenOptions::new().read(true).write(true).open(&path).ok()?;
        let mut b = [0u8; HEADER_LEN as usize];
        file.read_exact_at(&mut b, 0).ok()?;
        match parse_header(&b) {
            Ok((s, a)) if s == size && a == applied => Some(DigestMap { file, path, size }),
            Ok((s, a)) => {
                tracing::debug!(map = %path.display(), size = s, applied = a, want_size = size, want_applied = applied, "the digest map is about another state");
                None
            }
            Err(reason) => {
                tracing::warn!(map = %path.display(), "the digest map is not used: {reason}; a fresh one replaces it");
                None
            }
        }
    }

    /// A fresh map for a disk of `size` bytes as of sequence `applied`, every digest not
    /// known, in place of whatever was there (written beside it and renamed over it).
    pub(crate) fn fresh(ddir: &Path, size: u64, applied: u64) -> io::Result<DigestMap> {
        let path = ddir.join(MAP_FILE);
        let tmp = ddir.join(format!("{MAP_FILE}.tmp"));
        {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all_at(&header(size, applied), 0)?;
            f.set_len(HEADER_LEN + size.div_ceil(MAP_BLOCK) * ENTRY_LEN)?;
            f.sync_all()?;
        }
        fs::rename(&tmp, &path)?;
        File::open(ddir)?.sync_all()?;
        let file = OpenOptions::new().read(true).write(true).open(&path)?;
        Ok(DigestMap { file, path, size })
    }

    /// Removes the map of disk folder `ddir`, if any.
    pub(crate) fn remove(ddir: &Path) {
        let _ = fs::remove_file(ddir.join(MAP_FILE));
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The entries of blocks `first..first + n` (UNKNOWN where not known).
    pub(crate) fn read(&self, first: u64, n: u64) -> io::Result<Vec<[u8; 32]>> {
        let blocks = self.size.div_ceil(MAP_BLOCK);
        if first.saturating_add(n) > blocks {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("blocks {first}+{n} are outside the map's {blocks}"),
            ));
        }
        let mut raw = vec![0u8; (n * ENTRY_LEN) as usize];
        self.file
            .read_exact_at(&mut raw, HEADER_LEN + first * ENTRY_LEN)?;
        Ok(raw
            .chunks_exact(ENTRY_LEN as usize)
            .map(|c| c.try_into().unwrap_or(UNKNOWN))
            .collect())
    }

    /// Writes `entries` (block → digest, UNKNOWN to forget one), runs of neighbours in one
    /// write each, and makes them durable.
    pub(crate) fn write(&self, entries: &BTreeMap<u64, [u8; 32]>) -> io::Result<()> {
        let mut run: Vec<u8> = Vec::new();
        let mut start = 0u64;
        let mut next = None;
        for (&k, d) in entries {
            if next != Some(k) && !run.is_empty() {
                self.file
                    .write_all_at(&run, HEADER_LEN + start * ENTRY_LEN)?;
                run.clear();
            }
            if run.is_empty() {
                start = k;
            }
            run.extend_from_slice(d);
            next = Some(k + 1);
        }
        if !run.is_empty() {
            self.file
                .write_all_at(&run, HEADER_LEN + start * ENTRY_LEN)?;
        }
        self.file.sync_data()
    }

    /// Stamps the map as describing sequence `applied`, durably. Call only once its entries
    /// describe that state and are durable.
    pub(crate) fn stamp(&self, applied: u64) -> io::Result<()> {
        self.file.write_all_at(&header(self.size, applied), 0)?;
        self.file.sync_data()
    }
}

/// The digests one apply changes, per block, gathered as it writes.
#[derive(Debug, Default)]
pub(crate) struct Pending {
    pub(crate) blocks: BTreeMap<u64, [u8; 32]>,
}

impl Pending {
    /// `data` was written at `offset` of a disk of `size` bytes: the blocks it covers whole get
    /// their digests, the ones it covers in part are no longer known.
    pub(crate) fn wrote(&mut self, size: u64, offset: u64, data: &[u8]) {
        self.cover(size, offset, data.len() as u64, |from, len| {
            Some(*blake3::hash(&data[from as usize..(from + len) as usize]).as_bytes())
        });
    }

    /// `len` zero bytes were written at `offset`.
    pub(crate) fn zeroed(&mut self, size: u64, offset: u64, len: u64) {
        // Hashed once per process: an initial copy writes a zero extent per hole.
        static FULL: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
        let full = *FULL.get_or_init(|| *blake3::hash(&[0u8; MAP_BLOCK as usize]).as_bytes());
        self.cover(size, offset, len, |_, n| {
            Some(if n == MAP_BLOCK {
                full
            } else {
                *blake3::hash(&vec![0u8; n as usize]).as_bytes()
            })
        });
    }

    /// Calls `digest(offset in the write, block length)` for each block the write covers whole
    /// and records the result; blocks covered in part become UNKNOWN.
    fn cover(
        &mut self,
        size: u64,
        offset: u64,
        len: u64,
        mut digest: impl FnMut(u64, u64) -> Option<[u8; 32]>,
    ) {
        if len == 0 {
            return;
        }
        let end = offset + len;
        let mut k = offset / MAP_BLOCK;
        while k * MAP_BLOCK < end {
            let (b0, bl) = (k * MAP_BLOCK, block_len(size, k));
            let whole = b0 >= offset && b0 + bl <= end;
            let d = if whole { digest(b0 - offset, bl) } else { None };
            self.blocks.insert(k, d.unwrap_or(UNKNOWN));
            k += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: u64 = MAP_BLOCK;

    #[test]
    fn a_fresh_map_is_valid_only_for_its_disk_size_and_sequence_and_knows_nothing() {
        let t = tempfile::tempdir().unwrap();
        let m = DigestMap::fresh(t.path(), 10 * K + 512, 7).unwrap();
        assert_eq!(m.read(0, 11).unwrap(), vec![UNKNOWN; 11]);
        assert!(m.read(5, 7).is_err(), "past the last block");
        assert!(DigestMap::open_valid(t.path(), 10 * K + 512, 7).is_some());
        assert!(DigestMap::open_valid(t.path(), 10 * K + 512, 8).is_none());
        assert!(DigestMap::open_valid(t.path(), 20 * K, 7).is_none());
        // Sparse: 11 entries of 32 bytes after the header, none allocated.
        let meta = fs::metadata(t.path().join(MAP_FILE)).unwrap();
        assert_eq!(meta.len(), 64 + 11 * 32);
    }

    #[test]
    fn entries_are_written_in_runs_and_a_stamp_moves_the_map_to_the_next_sequence() {
        let t = tempfile::tempdir().unwrap();
        let m = DigestMap::fresh(t.path(), 8 * K, 1).unwrap();
        let mut e = BTreeMap::new();
        for k in [0u64, 1, 2, 6] {
            e.insert(k, [k as u8 + 1; 32]);
        }
        m.write(&e).unwrap();
        m.stamp(2).unwrap();
        assert!(DigestMap::open_valid(t.path(), 8 * K, 1).is_none());
        let m = DigestMap::open_valid(t.path(), 8 * K, 2).unwrap();
        let got = m.read(0, 8).unwrap();
        assert_eq!(got[0], [1; 32]);
        assert_eq!(got[2], [3; 32]);
        assert_eq!(got[3], UNKNOWN);
        assert_eq!(got[6], [7; 32]);
    }

    #[test]
    fn a_damaged_header_or_another_version_makes_the_map_unused() {
        let t = tempfile::tempdir().unwrap();
        DigestMap::fresh(t.path(), 4 * K, 3).unwrap();
        let p = t.path().join(MAP_FILE);
        let good = fs::read(&p).unwrap();
        let mut bad = good.clone();
        bad[25] ^= 1; // the sequence, without fixing the checksum
        fs::write(&p, &bad).unwrap();
        assert!(DigestMap::open_valid(t.path(), 4 * K, 3).is_none());
        let mut b: [u8; 64] = good[..64].try_into().unwrap();
        b[8] = 2;
        let sum = blake3::hash(&b[..56]);
        b[56..64].copy_from_slice(&sum.as_bytes()[..8]);
        assert!(parse_header(&b).unwrap_err().contains("version 2"));
        fs::write(&p, &good[..30]).unwrap();
        assert!(
            DigestMap::open_valid(t.path(), 4 * K, 3).is_none(),
            "a truncated header"
        );
    }

    #[test]
    fn a_write_gives_the_blocks_it_covers_whole_their_digest_and_forgets_the_ones_it_touches() {
        let size = 4 * K + 1024; // the last block is 1 KiB long
        let mut p = Pending::default();
        let data: Vec<u8> = (0..3 * K).map(|i| (i % 251) as u8).collect();
        // From the middle of block 0 to the middle of block 3: block 0 and 3 in part.
        p.wrote(size, K / 2, &data[..3 * K as usize]);
        assert_eq!(p.blocks[&0], UNKNOWN);
        assert_eq!(
            p.blocks[&1],
            *blake3::hash(&data[(K / 2) as usize..(K / 2 + K) as usize]).as_bytes()
        );
        assert_eq!(p.blocks[&3], UNKNOWN);
        // A later whole write of block 0 makes it known again.
        p.wrote(size, 0, &data[..K as usize]);
        assert_eq!(p.blocks[&0], *blake3::hash(&data[..K as usize]).as_bytes());
        // The short last block is whole when the write reaches the disk's end.
        p.zeroed(size, 4 * K, 1024);
        assert_eq!(p.blocks[&4], *blake3::hash(&[0u8; 1024]).as_bytes());
        p.zeroed(size, 2 * K, K);
        assert_eq!(p.blocks[&2], *blake3::hash(&[0u8; K as usize]).as_bytes());
    }
}
