//! Streaming encoder. Memory: one compression scratch buffer of at most `compress_bound(1 MiB)`.

use std::io::Write;

use crate::error::LogError;
use crate::format::{
    Compression, LogHeader, RecordHeader, Summary, Trailer, ENC_RAW, ENC_ZSTD, KIND_DATA,
    KIND_ZERO, MAX_DATA_EXTENT, MAX_ZERO_EXTENT, RECORD_HEADER_LEN,
};

/// zstd level used unless told otherwise. Level 1 is fast and, like every fixed level with the
/// same zstd library, deterministic.
pub const DEFAULT_ZSTD_LEVEL: i32 = 1;

/// Data records at least this long are sampled before they are compressed.
const SAMPLE_FROM: usize = 32 * 1024;
/// Bytes taken from each of the four places a record is sampled at.
const SAMPLE_SLICE: usize = 1024;

/// True when a large data record would not compress: four 1 KiB slices (at 0, ¼, ½ and ¾ of
/// it) compressed together save less than 1/64. Such records (encrypted or already compressed
/// guest data) are then stored raw without running zstd over all of them, which on random data
/// costs more CPU than everything else the encoder does. A record with any compressible
/// quarter, such as a few KiB of new data in a cluster of zeros, is still compressed. The
/// decision depends on the record's bytes alone, so encoding stays deterministic.
fn sample_is_incompressible(
    c: &mut zstd::bulk::Compressor<'static>,
    scratch: &mut Vec<u8>,
    data: &[u8],
) -> bool {
    if data.len() < SAMPLE_FROM {
        return false;
    }
    let mut sample = [0u8; 4 * SAMPLE_SLICE];
    for (i, part) in sample.chunks_mut(SAMPLE_SLICE).enumerate() {
        let at = data.len() / 4 * i;
        part.copy_from_slice(&data[at..at + SAMPLE_SLICE]);
    }
    scratch.clear();
    scratch.reserve(zstd::zstd_safe::compress_bound(sample.len()));
    match c.compress_to_buffer(&sample[..], scratch) {
        Ok(n) => n >= sample.len() - sample.len() / 64,
        // Let the full attempt report the error.
        Err(_) => false,
    }
}

/// Where a resumed transfer continues: the receiver already holds the header and the first
/// `records` records, `bytes` bytes in all (what [`crate::scan_valid_prefix`] reported).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ResumePoint {
    pub records: u64,
    pub bytes: u64,
}

impl From<crate::ValidPrefix> for ResumePoint {
    fn from(p: crate::ValidPrefix) -> Self {
        ResumePoint {
            records: p.records,
            bytes: p.bytes,
        }
    }
}

/// Writes one log to `W`, record by record; nothing is buffered beyond the current extent, so
/// pass a `BufWriter` (or a TLS stream that buffers) to avoid many small writes.
///
/// Encoding is deterministic: the same header and the same sequence of calls produce the same
/// bytes (with the same zstd level and library version). That is what makes [`LogWriter::resume`]
/// work: the sender replays the same extents and the writer skips what the receiver already has.
pub struct LogWriter<W: Write> {
    out: W,
    header: LogHeader,
    compressor: Option<zstd::bulk::Compressor<'static>>,
    scratch: Vec<u8>,
    digest: blake3::Hasher,
    records: u64,
    data_bytes: u64,
    zero_bytes: u64,
    encoded_bytes: u64,
    /// (disk index, end offset) of the last record: the next must start at or after it.
    last: Option<(u16, u64)>,
    /// Records the receiver already holds: hashed and counted but not emitted.
    skip_records: u64,
    failed: bool,
}

impl<W: Write> std::fmt::Debug for LogWriter<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogWriter")
            .field("header", &self.header)
            .field("records", &self.records)
            .field("encoded_bytes", &self.encoded_bytes)
            .field("skip_records", &self.skip_records)
            .finish_non_exhaustive()
    }
}

impl<W: Write> LogWriter<W> {
    /// Validates the header and writes it. zstd level [`DEFAULT_ZSTD_LEVEL`].
    pub fn new(out: W, header: LogHeader) -> Result<Self, LogError> {
        Self::build(out, header, DEFAULT_ZSTD_LEVEL, None)
    }

    /// As [`LogWriter::new`] with another zstd level (ignored without compression).
    pub fn with_zstd_level(out: W, header: LogHeader, level: i32) -> Result<Self, LogError> {
        Self::build(out, header, level, None)
    }

    /// A writer for the rest of a cut transfer. The caller passes the same header and then makes
    /// the same `write_*` calls as the first attempt; the writer emits nothing for the header and
    /// the first `from.records` records (it still hashes them for the trailer digest, but does
    /// not compress them) and writes the rest, then the trailer. The receiver appends these bytes
    /// to its prefix of `from.bytes` bytes. If the replayed input differs from the first attempt,
    /// the receiver detects it (record checks or the trailer digest) and asks for a full resend.
    pub fn resume(out: W, header: LogHeader, from: ResumePoint) -> Result<Self, LogError> {
        Self::build(out, header, DEFAULT_ZSTD_LEVEL, Some(from))
    }

    /// [`LogWriter::resume`] with another zstd level (use the level of the first attempt).
    pub fn resume_with_zstd_level(
        out: W,
        header: LogHeader,
        from: ResumePoint,
        level: i32,
    ) -> Result<Self, LogError> {
        Self::build(out, header, level, Some(from))
    }

    fn build(
        mut out: W,
        header: LogHeader,
        level: i32,
        resume: Option<ResumePoint>,
    ) -> Result<Self, LogError> {
        let hdr = header.encode()?;
        let compressor =
            match header.compression {
                Compression::None => None,
                Compression::Zstd => Some(zstd::bulk::Compressor::new(level).map_err(|e| {
                    LogError::InvalidWrite {
                        op: "start a log",
                        reason: format!("zstd level {level} is not usable: {e}"),
                    }
                })?),
            };
        let mut digest = blake3::Hasher::new();
        digest.update(&hdr);
        let from = resume.unwrap_or(ResumePoint {
            records: 0,
            bytes: 0,
        });
        let hlen = hdr.len() as u64;
        let bad_resume = |why: String| LogError::InvalidWrite {
            op: "resume the log",
            reason: why,
        };
        let encoded_bytes = if from.bytes == 0 {
            if from.records != 0 {
                return Err(bad_resume(format!(
                    "the resume point claims {} records in 0 bytes",
                    from.records
                )));
            }
            out.write_all(&hdr)?;
            hlen
        } else {
            if from.bytes < hlen || (from.records == 0 && from.bytes != hlen) {
                return Err(bad_resume(format!(
                    "the resume point ({} records, {} bytes) does not fit this log's {}-byte header",
                    from.records, from.bytes, hlen
                )));
            }
            from.bytes
        };
        Ok(LogWriter {
            out,
            header,
            compressor,
            scratch: Vec::new(),
            digest,
            records: 0,
            data_bytes: 0,
            zero_bytes: 0,
            encoded_bytes,
            last: None,
            skip_records: from.records,
            failed: false,
        })
    }

    /// The header this writer was started with.
    pub fn header(&self) -> &LogHeader {
        &self.header
    }

    /// Records so far (including skipped ones when resuming).
    pub fn records(&self) -> u64 {
        self.records
    }

    /// Appends a data extent, split into records of at most [`MAX_DATA_EXTENT`] bytes. Extents
    /// must come in strictly increasing (disk index, offset) order without overlap. An empty
    /// slice writes nothing.
    pub fn write_data(
        &mut self,
        disk_index: u16,
        offset: u64,
        data: &[u8],
    ) -> Result<(), LogError> {
        self.check("write a data extent", disk_index, offset, data.len() as u64)?;
        for (i, chunk) in data.chunks(MAX_DATA_EXTENT as usize).enumerate() {
            let off = offset + (i as u64) * u64::from(MAX_DATA_EXTENT);
            self.emit(KIND_DATA, disk_index, off, chunk.len() as u32, chunk)?;
        }
        Ok(())
    }

    /// Appends a zero extent (no payload), split into records of at most [`MAX_ZERO_EXTENT`]
    /// bytes. Same ordering rule as [`LogWriter::write_data`]; `len == 0` writes nothing.
    pub fn write_zero(&mut self, disk_index: u16, offset: u64, len: u64) -> Result<(), LogError> {
        self.check("write a zero extent", disk_index, offset, len)?;
        let max = u64::from(MAX_ZERO_EXTENT);
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(max);
            self.emit(KIND_ZERO, disk_index, offset + done, n as u32, &[])?;
            done += n;
        }
        Ok(())
    }

    /// Writes the trailer and flushes. Returns what the log holds; `encoded_bytes` is the full
    /// log length (for a resumed writer: the receiver's prefix plus what this writer emitted).
    pub fn finish(self) -> Result<Summary, LogError> {
        self.finish_into_inner().map(|(s, _)| s)
    }

    /// [`LogWriter::finish`], also handing back the output (e.g. to fsync a file).
    pub fn finish_into_inner(mut self) -> Result<(Summary, W), LogError> {
        self.not_failed("finish the log")?;
        if self.records < self.skip_records {
            return Err(LogError::InvalidWrite {
                op: "finish the resumed log",
                reason: format!(
                    "only {} records were replayed but the receiver already holds {}; \
                     the replayed input differs from the first attempt, resend the log from the start",
                    self.records, self.skip_records
                ),
            });
        }
        let trailer = Trailer {
            records: self.records,
            data_bytes: self.data_bytes,
            zero_bytes: self.zero_bytes,
            digest: *self.digest.finalize().as_bytes(),
        };
        let bytes = trailer.encode();
        self.out.write_all(&bytes)?;
        self.out.flush()?;
        self.encoded_bytes += bytes.len() as u64;
        Ok((
            Summary {
                records: self.records,
                data_bytes: self.data_bytes,
                zero_bytes: self.zero_bytes,
                encoded_bytes: self.encoded_bytes,
            },
            self.out,
        ))
    }

    fn not_failed(&self, op: &'static str) -> Result<(), LogError> {
        if self.failed {
            Err(LogError::InvalidWrite {
                op,
                reason: "an earlier write to the output failed, so the stream is incomplete; \
                         start the log again"
                    .into(),
            })
        } else {
            Ok(())
        }
    }

    /// Validates a whole extent (before it is split) against the header and the ordering rule.
    fn check(
        &self,
        op: &'static str,
        disk_index: u16,
        offset: u64,
        len: u64,
    ) -> Result<(), LogError> {
        self.not_failed(op)?;
        let record = self.records;
        let disk = self
            .header
            .disks
            .get(disk_index as usize)
            .ok_or(LogError::UnknownDisk {
                record,
                disk_index,
                disks: self.header.disks.len(),
            })?;
        if len == 0 {
            return Ok(());
        }
        if offset
            .checked_add(len)
            .is_none_or(|end| end > disk.virtual_size)
        {
            return Err(LogError::ExtentBeyondDisk {
                record,
                disk: disk.id.clone(),
                offset,
                len,
                size: disk.virtual_size,
            });
        }
        if let Some((pd, pend)) = self.last {
            if (disk_index, offset) < (pd, pend) {
                return Err(LogError::OutOfOrder {
                    record,
                    disk_index,
                    offset,
                    prev_disk_index: pd,
                    prev_end: pend,
                });
            }
        }
        Ok(())
    }

    fn emit(
        &mut self,
        kind: u8,
        disk_index: u16,
        offset: u64,
        len: u32,
        data: &[u8],
    ) -> Result<(), LogError> {
        let checksum = RecordHeader::content_checksum(kind, disk_index, offset, len, data);
        self.digest.update(&checksum);
        self.records += 1;
        if kind == KIND_DATA {
            self.data_bytes += u64::from(len);
        } else {
            self.zero_bytes += u64::from(len);
        }
        self.last = Some((disk_index, offset + u64::from(len)));
        if self.records <= self.skip_records {
            return Ok(()); // the receiver already holds this record
        }
        let mut encoding = ENC_RAW;
        let mut payload = data;
        if let Some(c) = self.compressor.as_mut() {
            if kind == KIND_DATA && !sample_is_incompressible(c, &mut self.scratch, data) {
                self.scratch.clear();
                self.scratch
                    .reserve(zstd::zstd_safe::compress_bound(data.len()));
                let n = match c.compress_to_buffer(data, &mut self.scratch) {
                    Ok(n) => n,
                    Err(e) => {
                        self.failed = true;
                        return Err(e.into());
                    }
                };
                if n < data.len() {
                    encoding = ENC_ZSTD;
                    payload = &self.scratch[..n];
                }
            }
        }
        let rh = RecordHeader {
            kind,
            disk_index,
            offset,
            len,
            encoding,
            stored_len: payload.len() as u32,
            checksum,
            payload_crc: crc32c::crc32c(payload),
        };
        let res = self
            .out
            .write_all(&rh.encode())
            .and_then(|()| self.out.write_all(payload));
        if let Err(e) = res {
            self.failed = true;
            return Err(e.into());
        }
        self.encoded_bytes += (RECORD_HEADER_LEN + payload.len()) as u64;
        Ok(())
    }
}
