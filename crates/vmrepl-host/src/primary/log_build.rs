//! Building a log: pulling dirty extents over NBD (or comparing blocks with the replica's
//! digests) and encoding them, streamed to the sender.

use crate::peer::client::LogGrowth;
use crate::primary::CycleError;
use crate::primary::PointReader;
use crate::primary::Relationship;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use vmrepl_log::{Compression, DiskInfo, LogHeader, LogKind, LogWriter};
use vmrepl_tracking::ChunkData;
use vmrepl_types::VmDefinition;

/// The replica's block digests per disk id: (block size, one digest per block).
pub(crate) type Digests = std::collections::HashMap<String, (u64, Vec<[u8; 32]>)>;

/// Decodes a `BlockDigests` answer, keeping only disks whose block size and count fit.
pub(crate) fn decode_digests(
    disks: Vec<crate::peer::proto::DiskDigests>,
    sizes: &[(String, u64)],
) -> Digests {
    let mut out = Digests::new();
    for d in disks {
        let Some((_, size)) = sizes.iter().find(|(id, _)| *id == d.id) else {
            continue;
        };
        if d.block_size != vmrepl_store::block_size(*size) {
            continue;
        }
        match d.decode() {
            Some(p) if p.len() as u64 == size.div_ceil(d.block_size) => {
                out.insert(d.id, (d.block_size, p));
            }
            _ => {}
        }
    }
    out
}

/// Writes the blocks of a staged full copy whose digest differs from the replica's; returns
/// how many. Unallocated ranges of the staging image read as zeros.
pub(crate) fn write_differing<W: std::io::Write>(
    w: &mut LogWriter<W>,
    disk: u16,
    size: u64,
    (staging, ex): (&Path, &[vmrepl_tracking::Extent]),
    bs: u64,
    theirs: &[[u8; 32]],
    report: &mut dyn FnMut(u64, bool),
) -> Result<u64, String> {
    let f = std::fs::File::open(staging).map_err(|e| format!("{}: {e}", staging.display()))?;
    let mut first = 0usize;
    compare_blocks(w, disk, size, bs, theirs, report, |start, buf| {
        fill_from_extents((&f, staging), ex, &mut first, start, buf)
    })
}

/// Reads `[start, start + buf.len())` of a staged image into `buf` (zeroed by the caller):
/// the data extents it maps, the rest stays zeros. `first` remembers the first extent that
/// may still matter, for reads made in order.
pub(crate) fn fill_from_extents(
    (f, path): (&std::fs::File, &Path),
    ex: &[vmrepl_tracking::Extent],
    first: &mut usize,
    start: u64,
    buf: &mut [u8],
) -> Result<(), String> {
    let end = start + buf.len() as u64;
    while *first < ex.len() && ex[*first].offset + ex[*first].len <= start {
        *first += 1;
    }
    for e in ex[*first..].iter().take_while(|e| e.offset < end) {
        if let vmrepl_tracking::ExtentKind::Data { file_offset } = e.kind {
            let (s, t) = (e.offset.max(start), (e.offset + e.len).min(end));
            vmrepl_tracking::read_extent(
                f,
                file_offset + (s - e.offset),
                &mut buf[(s - start) as usize..(t - start) as usize],
            )
            .map_err(|e| format!("{}: {e}", path.display()))?;
        }
    }
    Ok(())
}

/// Reads the block ranges `blocks` (in order) of a staged image in pieces of at most 1 MiB,
/// as chunks for [`write_chunks`] or [`BlockHasher`].
pub(crate) fn staged_chunks<'a>(
    (f, path): (&'a std::fs::File, &'a Path),
    ex: &'a [vmrepl_tracking::Extent],
    blocks: &'a [(u64, u64)],
) -> impl Iterator<Item = Result<vmrepl_tracking::Chunk, String>> + 'a {
    let mut first = 0usize;
    blocks
        .iter()
        .flat_map(|&(o, l)| {
            (o..o + l)
                .step_by(vmrepl_tracking::MAX_CHUNK)
                .map(move |at| (at, (o + l - at).min(vmrepl_tracking::MAX_CHUNK as u64)))
        })
        .map(move |(at, n)| {
            let mut buf = vec![0u8; n as usize];
            fill_from_extents((f, path), ex, &mut first, at, &mut buf)?;
            Ok(vmrepl_tracking::Chunk {
                offset: at,
                data: ChunkData::Data(buf),
            })
        })
}

/// Compares every block of a disk (`fill` puts block `start` into a zeroed buffer) with the
/// replica's digest and writes the differing ones (all-zero blocks as zero records); returns
/// how many differed.
pub(crate) fn compare_blocks<W: std::io::Write>(
    w: &mut LogWriter<W>,
    disk: u16,
    size: u64,
    bs: u64,
    theirs: &[[u8; 32]],
    report: &mut dyn FnMut(u64, bool),
    mut fill: impl FnMut(u64, &mut [u8]) -> Result<(), String>,
) -> Result<u64, String> {
    let mut buf = vec![0u8; bs as usize];
    let mut differing = 0u64;
    for (b, digest) in theirs.iter().enumerate() {
        let start = b as u64 * bs;
        let end = (start + bs).min(size);
        let len = (end - start) as usize;
        buf[..len].fill(0);
        fill(start, &mut buf[..len])?;
        if blake3::hash(&buf[..len]).as_bytes() == digest {
            report(len as u64, false);
            continue;
        }
        report(len as u64, true);
        differing += 1;
        if buf[..len].iter().all(|x| *x == 0) {
            w.write_zero(disk, start, len as u64)
        } else {
            w.write_data(disk, start, &buf[..len])
        }
        .map_err(|e| e.to_string())?;
    }
    Ok(differing)
}

/// Where [`build_log`] puts the encoded log.
pub(crate) enum LogOut {
    /// A file (created or truncated).
    File(PathBuf),
    /// An exported initial copy: a file, and the BLAKE3 of every byte written to it (what the
    /// replica will take from the media), computed on the way instead of reading it back.
    Export(PathBuf, Arc<Mutex<blake3::Hasher>>),
    /// Chunks of at most 1 MiB for a sender ([`crate::peer::client::PeerClient::send_log_stream`]).
    Stream(tokio::sync::mpsc::Sender<Vec<u8>>),
}

/// What [`build_log`] writes a log into, behind the encoder: a buffer over the destination
/// that counts what was written.
pub(crate) type LogSink = std::io::BufWriter<Tally>;

/// Encodes the point in time `h` (read through `reader`) into log `seq` on `base`, into `out`;
/// returns its size. With the replica's digests, a disk carries only the blocks that differ.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn build_log(
    (vm, rel, consistency): (&VmDefinition, &Relationship, vmrepl_log::Consistency),
    h: &vmrepl_tracking::CycleHandle,
    reader: &Arc<dyn PointReader>,
    out: LogOut,
    (seq, base): (u64, u64),
    kind: LogKind,
    replica_digests: Option<&Digests>,
    growth: Option<tokio::sync::watch::Sender<LogGrowth>>,
) -> Result<u64, CycleError> {
    let digests = replica_digests.cloned().unwrap_or_default();
    // The images as the log lists them: the disks, then the UEFI vars as the NVRAM disk.
    let ids: Vec<(String, u64)> = h
        .disks
        .iter()
        .map(|i| (i.node.clone(), i.size))
        .chain(
            h.vars
                .iter()
                .map(|v| (crate::peer::proto::NVRAM_DISK_ID.to_string(), v.size)),
        )
        .collect();
    let (point, open) = (h.clone(), reader.clone());
    let images = tokio::task::spawn_blocking(move || open.open(&point))
        .await
        .map_err(|e| CycleError::Other(e.to_string()))??;
    debug_assert_eq!(images.len(), ids.len(), "one image read per image staged");
    let header = LogHeader {
        vm_id: vm.uuid,
        sequence: seq,
        base_sequence: base,
        timestamp_unix_ms: h.point_in_time_ms,
        kind,
        consistency,
        compression: if rel.settings.compression {
            Compression::Zstd
        } else {
            Compression::None
        },
        disks: ids
            .iter()
            .map(|(id, size)| DiskInfo {
                id: id.clone(),
                virtual_size: *size,
            })
            .collect(),
    };
    let growth = growth.map(Arc::new);
    let tally = growth.clone();
    let compared = growth.clone();
    if let Some(g) = &growth {
        // A resynchronization by compare reads every disk the replica gave digests of.
        let total: u64 = ids
            .iter()
            .filter(|(id, _)| digests.contains_key(id))
            .map(|(_, size)| size)
            .sum();
        g.send_modify(|g| g.compare_total = total);
    }
    let built = tokio::task::spawn_blocking(move || -> Result<u64, String> {
        let t0 = std::time::Instant::now();
        let inner: Box<dyn std::io::Write + Send> = match out {
            // A leftover of an earlier attempt is replaced; the new file is created 0600
            // (an export holds the whole of every disk), refusing a symbolic link.
            LogOut::File(path) => Box::new(new_log_file(&path)?),
            LogOut::Export(path, hasher) => Box::new(Hashing {
                inner: new_log_file(&path)?,
                hasher,
            }),
            LogOut::Stream(tx) => Box::new(Pipe { tx }),
        };
        let f = Tally { inner, growth: tally };
        let mut w = LogWriter::new(std::io::BufWriter::with_capacity(1 << 20, f), header)
            .map_err(|e| e.to_string())?;
        for (i, ((id, size), mut image)) in ids.into_iter().zip(images).enumerate() {
            let disk = i as u16;
            // A full resync leaves nothing out: ranges without data are sent as zeroes, or
            // the replica would keep whatever it held there.
            let zero_gaps = kind == LogKind::Resync && id != crate::peer::proto::NVRAM_DISK_ID;
            match digests.get(&id) {
                // Resynchronization by compare: only the blocks whose digest differs.
                Some((bs, theirs)) => {
                    let mut report = |bytes: u64, differs: bool| {
                        if let Some(g) = &compared {
                            g.send_modify(|g| {
                                g.compared += bytes;
                                g.differing_blocks += u64::from(differs);
                            });
                        }
                    };
                    let sent =
                        image.write_differing(&mut w, disk, size, *bs, theirs, &mut report)?;
                    tracing::info!(target: "vmrepl::replication", disk = %id, blocks = theirs.len(), differing = sent, "resynchronization compare");
                }
                None => image.write_ranges(&mut w, disk, size, zero_gaps)?,
            }
        }
        // No fsync: this file only serves to resume a cut transfer. After a host crash the
        // persistent bitmaps are untrustworthy anyway (resynchronization), so durability here
        // would buy nothing; the replica makes the log durable before acknowledging it (I1).
        let (summary, bw) = w.finish_into_inner().map_err(|e| e.to_string())?;
        bw.into_inner().map_err(|e| e.to_string())?;
        tracing::info!(target: "vmrepl::replication", seq, bytes = summary.encoded_bytes, ms = t0.elapsed().as_millis() as u64, "log built");
        Ok(summary.encoded_bytes)
    })
    .await
    .map_err(|e| CycleError::Other(e.to_string()))
    .and_then(|r| r.map_err(|e| CycleError::Other(format!("cannot encode log {seq}: {e}"))));
    if let Some(g) = growth {
        g.send_modify(|g| g.done = Some(built.is_ok()));
    }
    built
}

/// How many reads a pulled disk keeps in flight.
pub(crate) const PULL_WINDOW: usize = 16;
/// How long one NBD read or write may block before the cycle gives up.
pub(crate) const PULL_IO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// Writes a pulled disk into the log, reading it over NBD as of the cycle's point in time: the
/// changed ranges of a delta export, or the ranges holding data of a full-copy export (see
/// [`write_ranges`] for `zero_gaps`). Holes within what is read come out as zero records.
pub(crate) fn pull_disk<W: std::io::Write>(
    w: &mut LogWriter<W>,
    disk: u16,
    size: u64,
    x: &vmrepl_tracking::NbdExport,
    zero_gaps: bool,
) -> Result<(), String> {
    let mut c =
        vmrepl_tracking::NbdClient::connect(&x.socket, &x.name, Some(&x.context), PULL_IO_TIMEOUT)
            .map_err(|e| e.to_string())?;
    let ranges = if x.delta() {
        c.dirty_ranges()
    } else {
        c.data_ranges()
    }
    .map_err(|e| e.to_string())?;
    let mut reader =
        vmrepl_tracking::NbdRangeReader::new(c, &ranges, vmrepl_tracking::MAX_CHUNK, PULL_WINDOW);
    let chunks = reader.by_ref().map(|c| c.map_err(|e| e.to_string()));
    write_ranges(w, disk, size, &ranges, chunks, zero_gaps)?;
    reader.finish();
    Ok(())
}

/// Writes the chunks read from `ranges` of a disk (in order) into the log; with `zero_gaps`
/// every range between them, up to the disk's `size`, becomes a zero record in its place, so
/// that the log describes the whole disk and its records stay in order.
pub(crate) fn write_ranges<W: std::io::Write>(
    w: &mut LogWriter<W>,
    disk: u16,
    size: u64,
    ranges: &[(u64, u64)],
    chunks: impl Iterator<Item = Result<vmrepl_tracking::Chunk, String>>,
    zero_gaps: bool,
) -> Result<(), String> {
    let mut gaps: std::collections::VecDeque<(u64, u64)> = std::collections::VecDeque::new();
    if zero_gaps {
        let mut at = 0;
        for &(o, l) in ranges.iter().chain([(size, 0)].iter()) {
            if o > at {
                gaps.push_back((at, o - at));
            }
            at = at.max(o + l);
        }
    }
    let mut gap_before = |w: &mut LogWriter<W>, upto: u64| -> Result<(), String> {
        while let Some(&(o, l)) = gaps.front() {
            if o >= upto {
                break;
            }
            gaps.pop_front();
            w.write_zero(disk, o, l).map_err(|e| e.to_string())?;
        }
        Ok(())
    };
    for chunk in chunks {
        let c = chunk?;
        gap_before(w, c.offset)?;
        match c.data {
            ChunkData::Data(buf) => w.write_data(disk, c.offset, &buf),
            ChunkData::Zero(len) => w.write_zero(disk, c.offset, len),
        }
        .map_err(|e| e.to_string())?;
    }
    gap_before(w, u64::MAX)
}

/// [`write_differing`] for a pulled full copy: every block is read over NBD (1 MiB reads in
/// flight) and compared with the replica's digest.
pub(crate) fn write_differing_pulled<W: std::io::Write>(
    w: &mut LogWriter<W>,
    disk: u16,
    size: u64,
    x: &vmrepl_tracking::NbdExport,
    bs: u64,
    theirs: &[[u8; 32]],
    report: &mut dyn FnMut(u64, bool),
) -> Result<u64, String> {
    let c = vmrepl_tracking::NbdClient::connect(&x.socket, &x.name, None, PULL_IO_TIMEOUT)
        .map_err(|e| e.to_string())?;
    let reader = vmrepl_tracking::NbdRangeReader::new(
        c,
        &[(0, size)],
        vmrepl_tracking::MAX_CHUNK,
        PULL_WINDOW,
    );
    let mut chunks = reader.peekable();
    compare_blocks(w, disk, size, bs, theirs, report, |start, buf| {
        let end = start + buf.len() as u64;
        // The chunks of this block (reads are block-aligned), or the error that stops them.
        while let Some(c) = chunks.next_if(|c| c.as_ref().map_or(true, |c| c.offset < end)) {
            let c = c.map_err(|e| e.to_string())?;
            if let ChunkData::Data(d) = c.data {
                let at = (c.offset - start) as usize;
                buf[at..at + d.len()].copy_from_slice(&d);
            }
        }
        Ok(())
    })
}

/// Digests a range of a disk block by block from the pieces read of it, in order and of any
/// size or alignment (an NBD reply may split a read at a hole); the blocks no piece touches
/// read as zeros. Each digest is compared at once with the replica's (`RangeDigests`), and
/// the blocks that differ are kept as they go by, up to a cap: a resynchronization then sends
/// them without reading the disk a second time.
pub(crate) struct BlockHasher {
    offset: u64,
    len: u64,
    bs: u64,
    /// The replica's digests, one per block.
    theirs: Vec<[u8; 32]>,
    /// The digests of a whole block of zeros and of the range's last block of zeros.
    zero: [u8; 32],
    zero_last: [u8; 32],
    /// The block being filled, and its bytes.
    cur: Option<usize>,
    buf: Vec<u8>,
    /// The first block not digested yet: pieces come in order.
    next: usize,
    /// The differing blocks so far, adjacent ones merged, and how many.
    blocks: Vec<(u64, u64)>,
    count: u64,
    /// The differing blocks in order (data, or the zeros of a block no piece touched); None
    /// once their data passed `cap` bytes.
    kept: Option<Vec<vmrepl_tracking::Chunk>>,
    kept_bytes: u64,
    cap: u64,
}

/// A range compared with the replica's digests ([`BlockHasher::finish`]).
#[derive(Debug)]
pub(crate) struct Compared {
    /// The differing blocks as (offset, length) ranges, adjacent ones merged.
    pub(crate) blocks: Vec<(u64, u64)>,
    /// How many blocks differ.
    pub(crate) count: u64,
    /// Every differing block with its contents, in order, when their data fit under the cap
    /// (else they are read again).
    pub(crate) kept: Option<Vec<vmrepl_tracking::Chunk>>,
}

impl BlockHasher {
    /// For `[offset, offset + len)` in blocks of `bs` bytes (the last may be short), compared
    /// with the replica's digests `theirs`, keeping up to `cap` bytes of differing data; None
    /// when `theirs` does not hold one digest per block.
    pub(crate) fn new(
        offset: u64,
        len: u64,
        bs: u64,
        theirs: Vec<[u8; 32]>,
        cap: u64,
    ) -> Option<BlockHasher> {
        if theirs.len() as u64 != len.div_ceil(bs) {
            return None;
        }
        let zero = *blake3::hash(&vec![0u8; bs as usize]).as_bytes();
        let zero_last = match len % bs {
            0 => zero,
            short => *blake3::hash(&vec![0u8; short as usize]).as_bytes(),
        };
        Some(BlockHasher {
            offset,
            len,
            bs,
            theirs,
            zero,
            zero_last,
            cur: None,
            buf: vec![0u8; bs as usize],
            next: 0,
            blocks: Vec::new(),
            count: 0,
            kept: Some(Vec::new()),
            kept_bytes: 0,
            cap,
        })
    }

    /// The range digested: (offset, length, block size).
    pub(crate) fn range(&self) -> (u64, u64, u64) {
        (self.offset, self.len, self.bs)
    }

    fn block_len(&self, k: usize) -> usize {
        self.bs.min(self.len - k as u64 * self.bs) as usize
    }

    /// Whether block `k` of digest `ours` differs from the replica's; a differing block is
    /// counted and listed.
    fn differs(&mut self, k: usize, ours: &[u8; 32]) -> bool {
        if self.theirs[k] == *ours {
            return false;
        }
        self.count += 1;
        let (at, n) = (self.offset + k as u64 * self.bs, self.block_len(k) as u64);
        match self.blocks.last_mut() {
            Some(last) if last.0 + last.1 == at => last.1 += n,
            _ => self.blocks.push((at, n)),
        }
        true
    }

    /// Keeps `chunk` of a differing block, while the data kept stays under the cap.
    fn keep(&mut self, chunk: vmrepl_tracking::Chunk) {
        if let ChunkData::Data(d) = &chunk.data {
            self.kept_bytes += d.len() as u64;
            if self.kept_bytes > self.cap {
                self.kept = None;
            }
        }
        if let Some(kept) = &mut self.kept {
            kept.push(chunk);
        }
    }

    /// Digests the block being filled, after accounting for the blocks no piece touched
    /// before it.
    fn flush(&mut self) {
        if let Some(k) = self.cur.take() {
            self.untouched_until(k);
            let n = self.block_len(k);
            let ours = *blake3::hash(&self.buf[..n]).as_bytes();
            if self.differs(k, &ours) {
                self.keep(vmrepl_tracking::Chunk {
                    offset: self.offset + k as u64 * self.bs,
                    data: ChunkData::Data(self.buf[..n].to_vec()),
                });
            }
            self.next = k + 1;
        }
    }

    /// Blocks `next..k` were not touched: zeros, which cost nothing to keep.
    fn untouched_until(&mut self, k: usize) {
        let last = self.theirs.len().saturating_sub(1);
        for j in self.next..k {
            let zero = if j == last { self.zero_last } else { self.zero };
            if self.differs(j, &zero) {
                self.keep(vmrepl_tracking::Chunk {
                    offset: self.offset + j as u64 * self.bs,
                    data: ChunkData::Zero(self.block_len(j) as u64),
                });
            }
        }
        self.next = self.next.max(k);
    }

    /// `n` bytes at disk offset `at`: `data`, or zeros when None.
    pub(crate) fn put(&mut self, at: u64, data: Option<&[u8]>, n: u64) -> Result<(), String> {
        let end = self.offset + self.len;
        if at < self.offset || at.saturating_add(n) > end {
            return Err(format!(
                "read {n} bytes at {at}, outside the range {}+{} being compared",
                self.offset, self.len
            ));
        }
        let mut p = at;
        while p < at + n {
            let k = ((p - self.offset) / self.bs) as usize;
            if self.cur != Some(k) {
                if k < self.next || self.cur.is_some_and(|c| k < c) {
                    return Err(format!(
                        "read {n} bytes at {at} after the block at {} was digested: pieces must come in order",
                        self.offset + k as u64 * self.bs
                    ));
                }
                self.flush();
                self.cur = Some(k);
                let bl = self.block_len(k);
                self.buf[..bl].fill(0);
            }
            let in_block = (p - self.offset) % self.bs;
            let take = (self.bs - in_block).min(at + n - p);
            if let Some(d) = data {
                let from = (p - at) as usize;
                self.buf[in_block as usize..(in_block + take) as usize]
                    .copy_from_slice(&d[from..from + take as usize]);
            } else {
                self.buf[in_block as usize..(in_block + take) as usize].fill(0);
            }
            p += take;
        }
        Ok(())
    }

    /// A chunk read of the range: its data, or the zeros it stands for.
    pub(crate) fn put_chunk(&mut self, c: &vmrepl_tracking::Chunk) -> Result<(), String> {
        match &c.data {
            ChunkData::Data(d) => self.put(c.offset, Some(d), d.len() as u64),
            ChunkData::Zero(n) => self.put(c.offset, None, *n),
        }
    }

    /// The comparison with the replica's digests, once every piece was put.
    pub(crate) fn finish(mut self) -> Compared {
        self.flush();
        self.untouched_until(self.theirs.len());
        Compared {
            blocks: self.blocks,
            count: self.count,
            kept: self.kept,
        }
    }
}

/// The ranges to read for the digests of `[offset, offset + len)`: the ranges holding data
/// that meet it, widened to whole blocks of `bs` (the last ends with the range) and merged.
pub(crate) fn reads_for(data: &[(u64, u64)], offset: u64, len: u64, bs: u64) -> Vec<(u64, u64)> {
    let end = offset + len;
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &(o, l) in data {
        let (s, e) = (o.max(offset), (o + l).min(end));
        if s >= e {
            continue;
        }
        let s = offset + (s - offset) / bs * bs;
        let e = (offset + (e - offset).div_ceil(bs) * bs).min(end);
        match out.last_mut() {
            Some(last) if last.0 + last.1 >= s => last.1 = last.1.max(e - last.0),
            _ => out.push((s, e - s)),
        }
    }
    out
}

/// Writes the chunks read of some blocks into the log as disk `disk`: all-zero data as zero
/// records (they cost nothing on the wire).
pub(crate) fn write_chunks<W: std::io::Write>(
    w: &mut LogWriter<W>,
    disk: u16,
    chunks: impl Iterator<Item = Result<vmrepl_tracking::Chunk, String>>,
) -> Result<(), String> {
    for c in chunks {
        let c = c?;
        match c.data {
            ChunkData::Data(b) if b.iter().all(|x| *x == 0) => {
                w.write_zero(disk, c.offset, b.len() as u64)
            }
            ChunkData::Data(b) => w.write_data(disk, c.offset, &b),
            ChunkData::Zero(n) => w.write_zero(disk, c.offset, n),
        }
        .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// What one part of a resynchronization carries: the differing blocks with the data the
/// compare kept of them, or their ranges, read again from the point in time.
pub(crate) enum PartBlocks {
    Kept(Vec<vmrepl_tracking::Chunk>),
    Read(Vec<(u64, u64)>),
}

/// Encodes one part of a resynchronization in parts: log `seq` on `base` (kind
/// [`LogKind::ResyncPart`]) with the `blocks` of disk number `disk` as of the point `h`
/// (read from `image` unless kept), streamed to the sender on `out` (a part is never kept: a
/// cut one is compared again). Gives the image back with the log's size.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn build_part(
    (vm, rel): (&VmDefinition, &Relationship),
    h: &vmrepl_tracking::CycleHandle,
    mut image: Box<dyn crate::primary::PointImage>,
    disk: u16,
    blocks: PartBlocks,
    (seq, base): (u64, u64),
    out: tokio::sync::mpsc::Sender<Vec<u8>>,
    growth: tokio::sync::watch::Sender<LogGrowth>,
) -> (
    Option<Box<dyn crate::primary::PointImage>>,
    Result<u64, CycleError>,
) {
    let header = LogHeader {
        vm_id: vm.uuid,
        sequence: seq,
        base_sequence: base,
        timestamp_unix_ms: h.point_in_time_ms,
        kind: LogKind::ResyncPart,
        consistency: vmrepl_log::Consistency::Crash,
        compression: if rel.settings.compression {
            Compression::Zstd
        } else {
            Compression::None
        },
        disks: h
            .disks
            .iter()
            .map(|i| DiskInfo {
                id: i.node.clone(),
                virtual_size: i.size,
            })
            .collect(),
    };
    let growth = Arc::new(growth);
    let tally = Some(growth.clone());
    let built = tokio::task::spawn_blocking(move || {
        let r = (|| -> Result<u64, String> {
            let f = Tally {
                inner: Box::new(Pipe { tx: out }),
                growth: tally,
            };
            let mut w = LogWriter::new(std::io::BufWriter::with_capacity(1 << 20, f), header)
                .map_err(|e| e.to_string())?;
            match blocks {
                PartBlocks::Kept(chunks) => write_chunks(&mut w, disk, chunks.into_iter().map(Ok))?,
                PartBlocks::Read(blocks) => image.write_blocks(&mut w, disk, &blocks)?,
            }
            let (summary, bw) = w.finish_into_inner().map_err(|e| e.to_string())?;
            bw.into_inner().map_err(|e| e.to_string())?;
            Ok(summary.encoded_bytes)
        })();
        (image, r)
    })
    .await;
    let (image, r) = match built {
        Ok((i, r)) => (
            Some(i),
            r.map_err(|e| CycleError::Other(format!("cannot encode log {seq}: {e}"))),
        ),
        Err(e) => (None, Err(CycleError::Other(e.to_string()))),
    };
    growth.send_modify(|g| g.done = Some(r.is_ok()));
    (image, r)
}

/// Hands the encoded log to the sender in chunks (the writer's buffer, at most 1 MiB), waiting
/// while the sender is 4 chunks behind; fails once the sender has stopped.
pub(crate) struct Pipe {
    tx: tokio::sync::mpsc::Sender<Vec<u8>>,
}

impl std::io::Write for Pipe {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.tx.blocking_send(buf.to_vec()).map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the sender stopped")
        })?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A log file of its own: a leftover of an earlier attempt is replaced, and the new file is
/// created 0600 (an export holds the whole of every disk), refusing a symbolic link.
pub(crate) fn new_log_file(path: &Path) -> Result<std::fs::File, String> {
    let _ = std::fs::remove_file(path);
    crate::fsutil::create_private_new(path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))
}

/// Passes writes through and hashes what was written.
pub(crate) struct Hashing {
    inner: std::fs::File,
    hasher: Arc<Mutex<blake3::Hasher>>,
}

impl std::io::Write for Hashing {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        crate::locks::unpoisoned(&self.hasher).update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// A writer that reports every byte it has written (progress, and the end of the log).
pub(crate) struct Tally {
    inner: Box<dyn std::io::Write + Send>,
    growth: Option<Arc<tokio::sync::watch::Sender<LogGrowth>>>,
}

impl std::io::Write for Tally {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        if let Some(g) = &self.growth {
            g.send_modify(|g| g.written += n as u64);
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    #[test]
    fn zero_gaps_go_between_the_ranges_read_so_that_records_stay_in_order() {
        const K: u64 = 1024;
        let header = LogHeader {
            vm_id: Uuid::nil(),
            sequence: 2,
            base_sequence: 1,
            timestamp_unix_ms: 1,
            kind: LogKind::Resync,
            consistency: vmrepl_log::Consistency::Crash,
            compression: Compression::None,
            disks: vec![DiskInfo {
                id: "disk0".into(),
                virtual_size: 256 * K,
            }],
        };
        let mut w = LogWriter::new(Vec::new(), header).unwrap();
        let ranges = [(64 * K, 64 * K), (192 * K, 32 * K)];
        let chunks = [(64 * K, 7u8), (192 * K, 9u8)].map(|(o, b)| {
            Ok(vmrepl_tracking::Chunk {
                offset: o,
                data: ChunkData::Data(vec![b; if o == 64 * K { 64 * K } else { 32 * K } as usize]),
            })
        });
        write_ranges(&mut w, 0, 256 * K, &ranges, chunks.into_iter(), true).unwrap();
        let (_, bytes) = w.finish_into_inner().unwrap();
        let shape: Vec<(u64, u32, bool)> = vmrepl_log::LogReader::new(&bytes[..])
            .unwrap()
            .map(|r| {
                let r = r.unwrap();
                (
                    r.offset,
                    r.len(),
                    matches!(r.content, vmrepl_log::Content::Zero(_)),
                )
            })
            .collect();
        assert_eq!(
            shape,
            vec![
                (0, 64 * 1024, true),
                (64 * K, 64 * 1024, false),
                (128 * K, 64 * 1024, true),
                (192 * K, 32 * 1024, false),
                (224 * K, 32 * 1024, true),
            ]
        );
    }

    fn digest(b: &[u8]) -> [u8; 32] {
        *blake3::hash(b).as_bytes()
    }

    #[test]
    fn a_comparing_hasher_keeps_the_differing_blocks_in_order_holes_as_zeros() {
        const BS: u64 = 16;
        // Six blocks from offset 32. The replica holds: block 0 equal, 1 other, 2 other,
        // 3 zeros (equal to a hole), 4 other data (a hole here), 5 equal.
        let ours: Vec<Vec<u8>> = (0..6u8).map(|b| vec![b + 1; BS as usize]).collect();
        let zero = vec![0u8; BS as usize];
        let theirs = vec![
            digest(&ours[0]),
            digest(b"x"),
            digest(b"y"),
            digest(&zero),
            digest(b"z"),
            digest(&ours[5]),
        ];
        let mut h = BlockHasher::new(32, 6 * BS, BS, theirs, 1024).unwrap();
        // Pieces of any size: blocks 0-1 whole, block 2 in two pieces, 5 whole (3, 4 holes).
        let mut d = ours[0].clone();
        d.extend_from_slice(&ours[1]);
        h.put(32, Some(&d), 2 * BS).unwrap();
        h.put(64, Some(&ours[2][..5]), 5).unwrap();
        h.put(69, Some(&ours[2][5..]), BS - 5).unwrap();
        h.put(112, Some(&ours[5]), BS).unwrap();
        let c = h.finish();
        assert_eq!(c.count, 3);
        assert_eq!(c.blocks, vec![(48, 2 * BS), (96, BS)]);
        let kept: Vec<(u64, Option<Vec<u8>>, u64)> = c
            .kept
            .expect("under the cap")
            .into_iter()
            .map(|k| {
                let n = k.len();
                match k.data {
                    ChunkData::Data(b) => (k.offset, Some(b), n),
                    ChunkData::Zero(_) => (k.offset, None, n),
                }
            })
            .collect();
        assert_eq!(
            kept,
            vec![
                (48, Some(ours[1].clone()), BS),
                (64, Some(ours[2].clone()), BS),
                (96, None, BS)
            ]
        );
    }

    #[test]
    fn a_comparing_hasher_past_its_cap_keeps_nothing_but_still_lists_every_differing_block() {
        const BS: u64 = 16;
        let theirs = vec![digest(b"other"); 4];
        let mut h = BlockHasher::new(0, 4 * BS, BS, theirs, 2 * BS).unwrap();
        h.put(0, Some(&[7u8; 64]), 4 * BS).unwrap();
        let c = h.finish();
        assert_eq!((c.count, c.blocks), (4, vec![(0, 4 * BS)]));
        assert!(c.kept.is_none(), "4 blocks of data do not fit in 2");
        // The replica's digests must be one per block.
        assert!(BlockHasher::new(0, 4 * BS, BS, vec![[0; 32]; 3], 0).is_none());
    }

    #[test]
    fn a_hasher_refuses_pieces_that_go_back_to_a_block_already_digested() {
        let mut h = BlockHasher::new(0, 64, 16, vec![[0; 32]; 4], 64).unwrap();
        h.put(0, Some(&[1u8; 40]), 40).unwrap();
        let e = h.put(8, Some(&[2u8; 4]), 4).unwrap_err();
        assert!(e.contains("must come in order"), "{e}");
        // The block being filled may still get more pieces.
        h.put(40, Some(&[3u8; 4]), 4).unwrap();
    }

    #[test]
    fn replica_digests_decode_only_when_block_size_count_and_hex_fit() {
        use crate::peer::proto::DiskDigests;
        let size = 3 << 20; // three 1 MiB blocks
        let ds = [[1u8; 32], [2u8; 32], [0xab; 32]];
        let sizes = vec![("disk0".to_string(), size)];
        let got = decode_digests(vec![DiskDigests::new("disk0".into(), 1 << 20, &ds)], &sizes);
        assert_eq!(got["disk0"], (1 << 20, ds.to_vec()));
        // Another block size, a short list, text that is not hex, an unknown disk: left out,
        // so those disks are sent whole.
        let mut not_hex = DiskDigests::new("disk0".into(), 1 << 20, &ds);
        not_hex.digests.replace_range(0..1, "z");
        for bad in [
            DiskDigests::new("disk0".into(), 2 << 20, &ds),
            DiskDigests::new("disk0".into(), 1 << 20, &ds[..2]),
            not_hex,
            DiskDigests::new("disk9".into(), 1 << 20, &ds),
        ] {
            assert!(
                decode_digests(vec![bad.clone()], &sizes).is_empty(),
                "{bad:?}"
            );
        }
    }
}
