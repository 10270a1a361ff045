//! Streaming decoder, verifier and valid-prefix scanner. Memory: the header (≤ 64 KiB), one
//! stored payload (≤ 1 MiB) and one decompressed extent (≤ 1 MiB), whatever the log's size.

use std::io::{self, Read};
use std::path::Path;

use crate::error::LogError;
use crate::format::{
    u32_at, Compression, LogHeader, RecordHeader, Summary, Trailer, ENC_RAW, ENC_ZSTD, END_MARKER,
    FLAGS_INCOMPATIBLE_MASK, FORMAT_VERSION, HEADER_PREFIX_LEN, KIND_DATA, KIND_ZERO, KNOWN_FLAGS,
    MAGIC, MAX_DATA_EXTENT, MAX_HEADER_LEN, MAX_ZERO_EXTENT, MIN_HEADER_LEN, RECORD_HEADER_LEN,
    TAG_EXTENT, TAG_TRAILER, TRAILER_LEN,
};

/// What one extent record carries, owned.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Content {
    /// The uncompressed bytes (1..=1 MiB).
    Data(Vec<u8>),
    /// This many bytes read as zero.
    Zero(u32),
}

/// One extent record of a log, owned (what the iterator yields).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Record {
    /// Index into [`LogHeader::disks`].
    pub disk_index: u16,
    /// Byte offset in the disk.
    pub offset: u64,
    pub content: Content,
}

impl Record {
    /// Bytes of the disk this record covers.
    pub fn len(&self) -> u32 {
        match &self.content {
            Content::Data(d) => d.len() as u32,
            Content::Zero(n) => *n,
        }
    }
    /// Never true for a decoded record (empty extents are refused); here for clippy's sake.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// One past the last byte covered.
    pub fn end(&self) -> u64 {
        self.offset + u64::from(self.len())
    }
}

/// What one extent record carries, borrowed from the reader's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ContentRef<'a> {
    Data(&'a [u8]),
    Zero(u32),
}

/// One extent record, borrowed: valid until the next call on the reader. No allocation per record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RecordRef<'a> {
    pub disk_index: u16,
    pub offset: u64,
    pub content: ContentRef<'a>,
}

impl RecordRef<'_> {
    pub fn to_record(&self) -> Record {
        Record {
            disk_index: self.disk_index,
            offset: self.offset,
            content: match self.content {
                ContentRef::Data(d) => Content::Data(d.to_vec()),
                ContentRef::Zero(n) => Content::Zero(n),
            },
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Body,
    Done(Summary),
    Failed,
}

/// Reads a log one record at a time and validates everything on the way: header checksum and
/// version, every record's framing, bounds, order, payload and content checksums, and finally the
/// trailer (counts and whole-log digest) and that nothing follows it.
///
/// Records are handed out *before* the trailer is checked, so a consumer that changes a replica
/// image must first run [`verify`] over the stored log (I4), or stage what it reads. The iterator
/// ends (`None`) only after a valid trailer or after it has yielded an error.
pub struct LogReader<R: Read> {
    inner: R,
    header: LogHeader,
    pos: u64,
    valid_end: u64,
    digest: blake3::Hasher,
    records: u64,
    data_bytes: u64,
    zero_bytes: u64,
    last: Option<(u16, u64)>,
    state: State,
    trailer_valid: bool,
    payload: Vec<u8>,
    data: Vec<u8>,
    decompressor: Option<zstd::bulk::Decompressor<'static>>,
    /// Take each record's content checksum from its header instead of recomputing it (see
    /// [`LogReader::verified_before`]).
    trust_content: bool,
}

impl<R: Read> std::fmt::Debug for LogReader<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogReader")
            .field("header", &self.header)
            .field("pos", &self.pos)
            .field("records", &self.records)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

/// Reads until `buf` is full or the stream ends; returns how many bytes were read.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

impl<R: Read> LogReader<R> {
    /// Reads and validates the header. Pass a buffered reader: records are read in small pieces.
    pub fn new(mut inner: R) -> Result<Self, LogError> {
        let mut prefix = [0u8; HEADER_PREFIX_LEN];
        let n = read_full(&mut inner, &mut prefix)?;
        let m = n.min(MAGIC.len());
        if prefix[..m] != MAGIC[..m] {
            return Err(LogError::BadMagic {
                found: prefix[..m].to_vec(),
                expected: MAGIC,
            });
        }
        if n < HEADER_PREFIX_LEN {
            return Err(LogError::Truncated {
                at_byte: n as u64,
                records: 0,
            });
        }
        let header_len = u32_at(&prefix, 12);
        let version = u16::from_le_bytes([prefix[8], prefix[9]]);
        if (header_len as usize) < MIN_HEADER_LEN || header_len > MAX_HEADER_LEN {
            if version > FORMAT_VERSION {
                return Err(LogError::UnsupportedVersion {
                    found: version,
                    supported: FORMAT_VERSION,
                });
            }
            return Err(LogError::InvalidHeader {
                reason: format!(
                    "the header length field says {header_len} bytes; it must be \
                     {MIN_HEADER_LEN} to {MAX_HEADER_LEN}"
                ),
            });
        }
        let mut hdr = vec![0u8; header_len as usize];
        hdr[..HEADER_PREFIX_LEN].copy_from_slice(&prefix);
        let k = read_full(&mut inner, &mut hdr[HEADER_PREFIX_LEN..])?;
        if k < hdr.len() - HEADER_PREFIX_LEN {
            return Err(LogError::Truncated {
                at_byte: (HEADER_PREFIX_LEN + k) as u64,
                records: 0,
            });
        }
        let body_len = hdr.len() - 4;
        let stored = u32_at(&hdr, body_len);
        let computed = crc32c::crc32c(&hdr[..body_len]);
        if stored != computed {
            return Err(LogError::HeaderChecksum {
                stored,
                computed,
                header_len,
            });
        }
        if version == 0 || version > FORMAT_VERSION {
            return Err(LogError::UnsupportedVersion {
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        let flags = u16::from_le_bytes([hdr[10], hdr[11]]);
        let unknown = flags & FLAGS_INCOMPATIBLE_MASK & !KNOWN_FLAGS;
        if unknown != 0 {
            return Err(LogError::UnsupportedFlags { flags, unknown });
        }
        let header = LogHeader::decode_checked(&hdr)?;
        let mut digest = blake3::Hasher::new();
        digest.update(&hdr);
        let decompressor = match header.compression {
            Compression::None => None,
            Compression::Zstd => Some(zstd::bulk::Decompressor::new()?),
        };
        Ok(LogReader {
            inner,
            header,
            pos: u64::from(header_len),
            valid_end: u64::from(header_len),
            digest,
            records: 0,
            data_bytes: 0,
            zero_bytes: 0,
            last: None,
            state: State::Body,
            trailer_valid: false,
            payload: Vec::new(),
            data: Vec::new(),
            decompressor,
            trust_content: false,
        })
    }

    /// For a log this process verified whole moments ago (the replica verifies as it receives,
    /// then applies at once): every framing check, crc32c of headers and payloads, bounds,
    /// order, decompressed sizes and the trailer digest are still checked, but each record's
    /// BLAKE3 content checksum is taken from its header rather than recomputed over the data.
    /// The crc32c of the stored payload still catches bytes that changed since verification.
    pub fn verified_before(inner: R) -> Result<Self, LogError> {
        let mut r = LogReader::new(inner)?;
        r.trust_content = true;
        Ok(r)
    }

    pub fn header(&self) -> &LogHeader {
        &self.header
    }

    /// Whole valid records read so far.
    pub fn records(&self) -> u64 {
        self.records
    }

    /// Length of the longest valid prefix seen so far: the header plus whole valid records, plus
    /// the trailer once it has been validated.
    pub fn valid_bytes(&self) -> u64 {
        self.valid_end
    }

    /// The summary, once the trailer has been validated and nothing follows it.
    pub fn summary(&self) -> Option<Summary> {
        match self.state {
            State::Done(s) => Some(s),
            _ => None,
        }
    }

    /// The next record, borrowed; `Ok(None)` once the trailer has been validated (or after an
    /// error was returned). No allocation once the buffers have grown to the largest extent.
    pub fn next_record(&mut self) -> Result<Option<RecordRef<'_>>, LogError> {
        if self.state != State::Body {
            return Ok(None);
        }
        match self.step() {
            Ok(Some(meta)) => Ok(Some(self.record_ref(meta))),
            Ok(None) => Ok(None),
            Err(e) => {
                self.state = State::Failed;
                Err(e)
            }
        }
    }

    /// Reads every remaining record and the trailer; returns the summary or the first error.
    pub fn verify_rest(mut self) -> Result<Summary, LogError> {
        while self.next_record()?.is_some() {}
        self.summary().ok_or_else(|| LogError::MalformedRecord {
            record: self.records,
            at_byte: self.pos,
            reason: "the reader had already failed".into(),
        })
    }

    fn record_ref(&self, m: Meta) -> RecordRef<'_> {
        let content = match m.kind {
            Body::Zero(n) => ContentRef::Zero(n),
            Body::Raw => ContentRef::Data(&self.payload),
            Body::Decompressed => ContentRef::Data(&self.data),
        };
        RecordRef {
            disk_index: m.disk_index,
            offset: m.offset,
            content,
        }
    }

    fn disk_id(&self, i: usize) -> String {
        self.header.disks[i].id.clone()
    }

    fn read_or_truncated(&mut self, buf: &mut [u8]) -> Result<(), LogError> {
        let n = read_full(&mut self.inner, buf)?;
        self.pos += n as u64;
        if n < buf.len() {
            return Err(LogError::Truncated {
                at_byte: self.pos,
                records: self.records,
            });
        }
        Ok(())
    }

    fn step(&mut self) -> Result<Option<Meta>, LogError> {
        let start = self.pos;
        let mut tag = [0u8; 1];
        self.read_or_truncated(&mut tag)?;
        match tag[0] {
            TAG_EXTENT => self.extent(start).map(Some),
            TAG_TRAILER => {
                self.trailer(start)?;
                Ok(None)
            }
            other => Err(LogError::MalformedRecord {
                record: self.records,
                at_byte: start,
                reason: format!(
                    "it starts with the byte {other:#04x}, which is neither an extent record \
                     ({TAG_EXTENT:#04x}) nor the trailer ({TAG_TRAILER:#04x})"
                ),
            }),
        }
    }

    fn extent(&mut self, start: u64) -> Result<Meta, LogError> {
        let record = self.records;
        let mut hb = [0u8; RECORD_HEADER_LEN];
        hb[0] = TAG_EXTENT;
        self.read_or_truncated(&mut hb[1..])?;
        let stored = u32_at(&hb, 44);
        let computed = crc32c::crc32c(&hb[..44]);
        if stored != computed {
            return Err(LogError::FrameChecksum {
                record,
                at_byte: start,
                part: "record header",
                stored,
                computed,
            });
        }
        let malformed = |reason: String| LogError::MalformedRecord {
            record,
            at_byte: start,
            reason,
        };
        let rh = RecordHeader::decode(&hb).map_err(malformed)?;
        let (kind_name, max) = match rh.kind {
            KIND_DATA => ("data", MAX_DATA_EXTENT),
            KIND_ZERO => ("zero", MAX_ZERO_EXTENT),
            k => return Err(malformed(format!("unknown extent kind {k:#04x}"))),
        };
        let di = rh.disk_index as usize;
        let size = match self.header.disks.get(di) {
            Some(d) => d.virtual_size,
            None => {
                return Err(LogError::UnknownDisk {
                    record,
                    disk_index: rh.disk_index,
                    disks: self.header.disks.len(),
                })
            }
        };
        if rh.len == 0 {
            return Err(malformed("it is an empty extent (length 0)".into()));
        }
        if rh.len > max {
            return Err(LogError::OversizedExtent {
                record,
                kind: kind_name,
                len: u64::from(rh.len),
                max,
            });
        }
        let end = rh.offset.checked_add(u64::from(rh.len));
        if end.is_none_or(|e| e > size) {
            return Err(LogError::ExtentBeyondDisk {
                record,
                disk: self.disk_id(di),
                offset: rh.offset,
                len: u64::from(rh.len),
                size,
            });
        }
        if let Some((pd, pend)) = self.last {
            if (rh.disk_index, rh.offset) < (pd, pend) {
                return Err(LogError::OutOfOrder {
                    record,
                    disk_index: rh.disk_index,
                    offset: rh.offset,
                    prev_disk_index: pd,
                    prev_end: pend,
                });
            }
        }
        let body = match (rh.kind, rh.encoding) {
            (KIND_ZERO, ENC_RAW) if rh.stored_len == 0 => Body::Zero(rh.len),
            (KIND_DATA, ENC_RAW) if rh.stored_len == rh.len => Body::Raw,
            (KIND_DATA, ENC_ZSTD)
                if self.header.compression == Compression::Zstd
                    && rh.stored_len > 0
                    && rh.stored_len < rh.len =>
            {
                Body::Decompressed
            }
            (k, e) => {
                return Err(malformed(format!(
                    "a {} extent of {} bytes with encoding {e} and {} stored bytes is not a \
                     valid combination (log compression {:?})",
                    if k == KIND_DATA { "data" } else { "zero" },
                    rh.len,
                    rh.stored_len,
                    self.header.compression
                )))
            }
        };
        // Payload: bounded by MAX_DATA_EXTENT thanks to the checks above.
        let mut payload = std::mem::take(&mut self.payload);
        payload.resize(rh.stored_len as usize, 0);
        let res = self.read_or_truncated(&mut payload);
        self.payload = payload;
        res?;
        let computed = crc32c::crc32c(&self.payload);
        if computed != rh.payload_crc {
            return Err(LogError::FrameChecksum {
                record,
                at_byte: start,
                part: "payload",
                stored: rh.payload_crc,
                computed,
            });
        }
        let data: &[u8] = match body {
            Body::Zero(_) => &[],
            Body::Raw => &self.payload,
            Body::Decompressed => {
                self.data.clear();
                self.data.reserve(rh.len as usize);
                let dec = self
                    .decompressor
                    .as_mut()
                    .expect("zstd logs have a decompressor");
                match dec.decompress_to_buffer(&self.payload[..], &mut self.data) {
                    Ok(n) if n == rh.len as usize => {}
                    Ok(n) => {
                        return Err(LogError::DecompressedSize {
                            record,
                            disk: self.disk_id(di),
                            offset: rh.offset,
                            expected: rh.len,
                            actual: n as u64,
                        })
                    }
                    Err(e) => {
                        return Err(
                            match zstd::zstd_safe::get_frame_content_size(&self.payload) {
                                Ok(Some(size)) if size != u64::from(rh.len) => {
                                    LogError::DecompressedSize {
                                        record,
                                        disk: self.disk_id(di),
                                        offset: rh.offset,
                                        expected: rh.len,
                                        actual: size,
                                    }
                                }
                                _ => malformed(format!("its zstd payload does not decode: {e}")),
                            },
                        )
                    }
                }
                &self.data
            }
        };
        let sum = if self.trust_content {
            rh.checksum
        } else {
            RecordHeader::content_checksum(rh.kind, rh.disk_index, rh.offset, rh.len, data)
        };
        if sum != rh.checksum {
            return Err(LogError::ExtentChecksum {
                record,
                disk_index: rh.disk_index,
                disk: self.disk_id(di),
                offset: rh.offset,
                len: rh.len,
            });
        }
        self.digest.update(&sum);
        self.records += 1;
        match body {
            Body::Zero(n) => self.zero_bytes += u64::from(n),
            _ => self.data_bytes += u64::from(rh.len),
        }
        self.last = Some((rh.disk_index, rh.offset + u64::from(rh.len)));
        self.valid_end = self.pos;
        Ok(Meta {
            disk_index: rh.disk_index,
            offset: rh.offset,
            kind: body,
        })
    }

    fn trailer(&mut self, start: u64) -> Result<(), LogError> {
        let mut tb = [0u8; TRAILER_LEN];
        tb[0] = TAG_TRAILER;
        self.read_or_truncated(&mut tb[1..])?;
        if tb[..8] != END_MARKER {
            return Err(LogError::MalformedRecord {
                record: self.records,
                at_byte: start,
                reason: format!(
                    "the trailer starts with {:02x?} instead of the end marker {END_MARKER:02x?}",
                    &tb[..8]
                ),
            });
        }
        let stored = u32_at(&tb, 64);
        let computed = crc32c::crc32c(&tb[..64]);
        if stored != computed {
            return Err(LogError::FrameChecksum {
                record: self.records,
                at_byte: start,
                part: "trailer",
                stored,
                computed,
            });
        }
        let t = Trailer::decode(&tb);
        let mismatch = |what, expected: String, actual: String| {
            Err(LogError::TrailerMismatch {
                what,
                expected,
                actual,
            })
        };
        if t.records != self.records {
            return mismatch(
                "record count",
                t.records.to_string(),
                self.records.to_string(),
            );
        }
        if t.data_bytes != self.data_bytes {
            return mismatch(
                "data bytes",
                t.data_bytes.to_string(),
                self.data_bytes.to_string(),
            );
        }
        if t.zero_bytes != self.zero_bytes {
            return mismatch(
                "zero bytes",
                t.zero_bytes.to_string(),
                self.zero_bytes.to_string(),
            );
        }
        let digest = *self.digest.finalize().as_bytes();
        if t.digest != digest {
            return mismatch("log digest", hex(&t.digest), hex(&digest));
        }
        self.trailer_valid = true;
        self.valid_end = self.pos;
        let mut extra = [0u8; 1];
        if read_full(&mut self.inner, &mut extra)? != 0 {
            return Err(LogError::TrailingData { at_byte: self.pos });
        }
        self.state = State::Done(Summary {
            records: self.records,
            data_bytes: self.data_bytes,
            zero_bytes: self.zero_bytes,
            encoded_bytes: self.pos,
        });
        Ok(())
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[derive(Debug, Clone, Copy)]
enum Body {
    Zero(u32),
    Raw,
    Decompressed,
}

#[derive(Debug, Clone, Copy)]
struct Meta {
    disk_index: u16,
    offset: u64,
    kind: Body,
}

impl<R: Read> Iterator for LogReader<R> {
    type Item = Result<Record, LogError>;

    fn next(&mut self) -> Option<Self::Item> {
        match self.next_record() {
            Ok(Some(r)) => Some(Ok(r.to_record())),
            Ok(None) => None,
            Err(e) => Some(Err(e)),
        }
    }
}

/// Reads a whole log from `r` and checks everything without applying anything (I4).
pub fn verify_reader<R: Read>(r: R) -> Result<(LogHeader, Summary), LogError> {
    let reader = LogReader::new(r)?;
    let header = reader.header().clone();
    let summary = reader.verify_rest()?;
    Ok((header, summary))
}

/// The log header at the start of `bytes`, once they hold all of it: `None` while more bytes
/// are needed, else the header or why it is not valid. A receiver reads it ahead of a log's
/// records to decide where the log goes.
pub fn peek_header(bytes: &[u8]) -> Option<Result<LogHeader, LogError>> {
    match LogReader::new(bytes) {
        Ok(r) => Some(Ok(r.header)),
        Err(LogError::Truncated { .. }) => None,
        Err(e) => Some(Err(e)),
    }
}

/// Verifies the log file at `path` completely: the summary, or the first error.
pub fn verify(path: &Path) -> Result<(LogHeader, Summary), LogError> {
    let f = std::fs::File::open(path).map_err(|source| LogError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    verify_reader(io::BufReader::with_capacity(256 * 1024, f))
}

/// The longest valid prefix of a (possibly cut) log: see [`scan_valid_prefix`].
#[derive(Debug)]
pub struct ValidPrefix {
    /// Header plus whole valid records (plus the trailer when `complete`). 0 when the header
    /// itself is missing or invalid.
    pub bytes: u64,
    /// Whole valid records in the prefix.
    pub records: u64,
    /// The trailer is present and valid (the log is whole; anything after it is garbage).
    pub complete: bool,
    /// Why the scan stopped before a complete log: usually [`LogError::Truncated`]; anything
    /// else means corrupt bytes after the prefix. `None` when complete and nothing follows.
    pub stopped_by: Option<LogError>,
}

/// Finds the longest prefix of `r` made of a valid header and whole valid records (and the
/// trailer, if valid). The replica truncates its partial file to `bytes` and asks the primary to
/// resume from record `records` (see [`crate::LogWriter::resume`]). Only I/O errors are returned
/// as `Err`; every format problem ends the prefix and is reported in `stopped_by`.
pub fn scan_valid_prefix<R: Read>(r: R) -> Result<ValidPrefix, LogError> {
    let mut reader = match LogReader::new(r) {
        Ok(reader) => reader,
        Err(LogError::Io(e)) => return Err(LogError::Io(e)),
        Err(e) => {
            return Ok(ValidPrefix {
                bytes: 0,
                records: 0,
                complete: false,
                stopped_by: Some(e),
            })
        }
    };
    let stopped_by = loop {
        match reader.next_record() {
            Ok(Some(_)) => {}
            Ok(None) => break None,
            Err(LogError::Io(e)) => return Err(LogError::Io(e)),
            Err(e) => break Some(e),
        }
    };
    Ok(ValidPrefix {
        bytes: reader.valid_end,
        records: reader.records,
        complete: reader.trailer_valid,
        stopped_by,
    })
}
