//! Byte layout of the header, record and trailer (see FORMAT.md). All integers are little-endian.

use crate::error::LogError;
use uuid::Uuid;

/// Magic bytes at offset 0 of every replication log. DO NOT CHANGE: frozen forever, every version.
/// The `\r\n` catches text-mode (CRLF) mangling in transit, as in PNG.
pub const MAGIC: [u8; 8] = *b"VMRLOG\r\n";

/// The format version this build writes, and the newest it reads. Readers refuse anything newer.
pub const FORMAT_VERSION: u16 = 1;

/// Largest data extent, in uncompressed bytes. Bounds a reader's memory to one extent.
pub const MAX_DATA_EXTENT: u32 = 1 << 20;
/// Largest zero extent (no payload; the applier writes zeroes or discards).
pub const MAX_ZERO_EXTENT: u32 = 1 << 30;
/// Most disks one log may carry (data disks plus the UEFI NVRAM pseudo-disk).
pub const MAX_DISKS: usize = 256;
/// Longest disk id, in bytes.
pub const MAX_DISK_ID_LEN: usize = 32;
/// Largest header a reader accepts (frozen with the first 16 header bytes).
pub const MAX_HEADER_LEN: u32 = 64 * 1024;

/// Flag bits 8..=15 are "incompatible": a reader that does not know a set bit must refuse the log.
/// Bits 0..=7 are "compatible": unknown ones are ignored (they may only announce extra header
/// bytes, which `header_len` lets old readers skip). Version 1 defines no flags.
pub const FLAGS_INCOMPATIBLE_MASK: u16 = 0xff00;
/// Flags this build understands.
pub const KNOWN_FLAGS: u16 = 0;

pub(crate) const HEADER_FIXED_LEN: usize = 64;
pub(crate) const HEADER_PREFIX_LEN: usize = 16;
pub(crate) const MIN_HEADER_LEN: usize = HEADER_FIXED_LEN + 1 + 1 + 8 + 4;
pub(crate) const RECORD_HEADER_LEN: usize = 48;
pub(crate) const TRAILER_LEN: usize = 68;

pub(crate) const TAG_EXTENT: u8 = b'E';
pub(crate) const TAG_TRAILER: u8 = b'T';
pub(crate) const KIND_DATA: u8 = b'D';
pub(crate) const KIND_ZERO: u8 = b'Z';
pub(crate) const ENC_RAW: u8 = 0;
pub(crate) const ENC_ZSTD: u8 = 1;
/// First 8 bytes of the trailer (its first byte is the trailer tag).
pub(crate) const END_MARKER: [u8; 8] = *b"TLOGEND\n";

/// What the log carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LogKind {
    /// Initial replication: every allocated block of every disk (base sequence 0).
    Initial,
    /// One cycle's changes on top of `base_sequence`.
    Delta,
    /// Blocks that differed in a checksum compare (resynchronization).
    Resync,
    /// One range of a resynchronization done in parts: the blocks of that range that differed
    /// in a checksum compare. It leaves the replica's latest state incomplete (not a point in
    /// time) until a log of another kind follows; the parts already applied survive a cut, so
    /// the resynchronization continues where it stopped.
    ResyncPart,
}

impl LogKind {
    fn code(self) -> u8 {
        match self {
            LogKind::Initial => 1,
            LogKind::Delta => 2,
            LogKind::Resync => 3,
            LogKind::ResyncPart => 4,
        }
    }
    fn from_code(c: u8) -> Option<Self> {
        Some(match c {
            1 => LogKind::Initial,
            2 => LogKind::Delta,
            3 => LogKind::Resync,
            4 => LogKind::ResyncPart,
            _ => return None,
        })
    }
}

/// The kind of point in time the log captures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Consistency {
    Crash,
    /// Guest filesystems were frozen through the guest agent.
    AppConsistent,
    /// The VM was shut down (planned failover): zero data loss.
    Planned,
}

impl Consistency {
    fn code(self) -> u8 {
        match self {
            Consistency::Crash => 1,
            Consistency::AppConsistent => 2,
            Consistency::Planned => 3,
        }
    }
    fn from_code(c: u8) -> Option<Self> {
        Some(match c {
            1 => Consistency::Crash,
            2 => Consistency::AppConsistent,
            3 => Consistency::Planned,
            _ => return None,
        })
    }
}

/// How data payloads may be stored. With `Zstd` each data extent is compressed on its own and
/// stored raw when compression does not make it smaller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Compression {
    None,
    Zstd,
}

impl Compression {
    fn code(self) -> u8 {
        match self {
            Compression::None => 0,
            Compression::Zstd => 1,
        }
    }
    fn from_code(c: u8) -> Option<Self> {
        Some(match c {
            0 => Compression::None,
            1 => Compression::Zstd,
            _ => return None,
        })
    }
}

/// One replicated disk (or the UEFI NVRAM pseudo-disk) as listed in the header. Records name it
/// by its index in [`LogHeader::disks`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DiskInfo {
    /// 1..=32 bytes of `[A-Za-z0-9._-]`, starting with a letter or digit, no `..` (safe as a path
    /// component and as a QEMU node-name stem; I5).
    pub id: String,
    /// Virtual size in bytes; every extent must end at or before it.
    pub virtual_size: u64,
}

/// The self-describing header of a log.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LogHeader {
    pub vm_id: Uuid,
    /// Sequence number of this log (≥ 1).
    pub sequence: u64,
    /// The sequence this log applies on top of: 0 for an initial copy, otherwise < `sequence`.
    /// Lets the replica detect gaps and reordering (I3).
    pub base_sequence: u64,
    /// The point in time, unix milliseconds.
    pub timestamp_unix_ms: u64,
    pub kind: LogKind,
    pub consistency: Consistency,
    pub compression: Compression,
    pub disks: Vec<DiskInfo>,
}

/// Checks a disk id: see [`DiskInfo::id`].
pub fn validate_disk_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_DISK_ID_LEN {
        return Err(format!(
            "disk id {id:?} is {} bytes long; it must be 1 to {MAX_DISK_ID_LEN} bytes",
            id.len()
        ));
    }
    let first = id.as_bytes()[0];
    if !first.is_ascii_alphanumeric() {
        return Err(format!(
            "disk id {id:?} starts with {:?}; it must start with a letter or digit",
            first as char
        ));
    }
    if let Some(c) = id
        .bytes()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-')))
    {
        return Err(format!(
            "disk id {id:?} contains the byte {c:#04x}; only letters, digits, '.', '_' and '-' are allowed"
        ));
    }
    if id.contains("..") {
        return Err(format!("disk id {id:?} contains '..'"));
    }
    Ok(())
}

impl LogHeader {
    /// Checks every rule a reader enforces, so a writer never produces a log it would refuse.
    pub fn validate(&self) -> Result<(), LogError> {
        let bad = |reason: String| Err(LogError::InvalidHeader { reason });
        if self.sequence == 0 {
            return bad("the sequence number is 0; sequences start at 1".into());
        }
        if self.base_sequence >= self.sequence {
            return bad(format!(
                "the base sequence {} is not below the sequence {}",
                self.base_sequence, self.sequence
            ));
        }
        if self.kind == LogKind::Initial && self.base_sequence != 0 {
            return bad(format!(
                "an initial log must have base sequence 0, not {}",
                self.base_sequence
            ));
        }
        if self.disks.is_empty() || self.disks.len() > MAX_DISKS {
            return bad(format!(
                "the log lists {} disks; it must list 1 to {MAX_DISKS}",
                self.disks.len()
            ));
        }
        for (i, d) in self.disks.iter().enumerate() {
            if let Err(reason) = validate_disk_id(&d.id) {
                return bad(reason);
            }
            if d.virtual_size == 0 {
                return bad(format!("disk {} has a virtual size of 0 bytes", d.id));
            }
            if self.disks[..i].iter().any(|e| e.id == d.id) {
                return bad(format!("disk id {} is listed twice", d.id));
            }
        }
        Ok(())
    }

    /// The exact encoded header (deterministic: same header, same bytes).
    pub(crate) fn encode(&self) -> Result<Vec<u8>, LogError> {
        self.validate()?;
        let disks_len: usize = self.disks.iter().map(|d| 1 + d.id.len() + 8).sum();
        let header_len = HEADER_FIXED_LEN + disks_len + 4;
        let mut b = Vec::with_capacity(header_len);
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        b.extend_from_slice(&0u16.to_le_bytes()); // flags
        b.extend_from_slice(&(header_len as u32).to_le_bytes());
        b.extend_from_slice(self.vm_id.as_bytes());
        b.extend_from_slice(&self.sequence.to_le_bytes());
        b.extend_from_slice(&self.base_sequence.to_le_bytes());
        b.extend_from_slice(&self.timestamp_unix_ms.to_le_bytes());
        b.push(self.kind.code());
        b.push(self.consistency.code());
        b.push(self.compression.code());
        b.push(0);
        b.extend_from_slice(&(self.disks.len() as u16).to_le_bytes());
        b.extend_from_slice(&[0, 0]);
        debug_assert_eq!(b.len(), HEADER_FIXED_LEN);
        for d in &self.disks {
            b.push(d.id.len() as u8);
            b.extend_from_slice(d.id.as_bytes());
            b.extend_from_slice(&d.virtual_size.to_le_bytes());
        }
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        debug_assert_eq!(b.len(), header_len);
        Ok(b)
    }

    /// Decodes a whole header whose checksum, version and flags were already checked.
    pub(crate) fn decode_checked(b: &[u8]) -> Result<LogHeader, LogError> {
        let bad = |reason: String| LogError::InvalidHeader { reason };
        let body = &b[..b.len() - 4];
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&body[16..32]);
        let kind = LogKind::from_code(body[56])
            .ok_or_else(|| bad(format!("unknown log kind code {}", body[56])))?;
        let consistency = Consistency::from_code(body[57])
            .ok_or_else(|| bad(format!("unknown consistency code {}", body[57])))?;
        let compression = Compression::from_code(body[58])
            .ok_or_else(|| bad(format!("unknown compression code {}", body[58])))?;
        if body[59] != 0 || body[62] != 0 || body[63] != 0 {
            return Err(bad("reserved header bytes are not zero".into()));
        }
        let count = u16_at(body, 60) as usize;
        let mut disks = Vec::with_capacity(count.min(MAX_DISKS));
        let mut p = HEADER_FIXED_LEN;
        for i in 0..count {
            let need = |p: usize, n: usize| {
                if p + n > body.len() {
                    Err(bad(format!(
                        "the disk list ({count} disks) does not fit the {}-byte header (disk #{i})",
                        b.len()
                    )))
                } else {
                    Ok(())
                }
            };
            need(p, 1)?;
            let n = body[p] as usize;
            p += 1;
            need(p, n + 8)?;
            let id = std::str::from_utf8(&body[p..p + n])
                .map_err(|_| bad(format!("disk #{i} has an id that is not UTF-8")))?
                .to_string();
            p += n;
            let virtual_size = u64_at(body, p);
            p += 8;
            disks.push(DiskInfo { id, virtual_size });
        }
        // Bytes between the disk list and the checksum are extension fields announced by
        // compatible flags; version 1 readers skip them (they are covered by the checksum).
        let flags = u16_at(body, 10);
        if p != body.len() && flags & !FLAGS_INCOMPATIBLE_MASK == 0 {
            return Err(bad(format!(
                "{} unexplained bytes follow the disk list",
                body.len() - p
            )));
        }
        let h = LogHeader {
            vm_id: Uuid::from_bytes(uuid),
            sequence: u64_at(body, 32),
            base_sequence: u64_at(body, 40),
            timestamp_unix_ms: u64_at(body, 48),
            kind,
            consistency,
            compression,
            disks,
        };
        h.validate()?;
        Ok(h)
    }
}

pub(crate) fn u16_at(b: &[u8], p: usize) -> u16 {
    u16::from_le_bytes([b[p], b[p + 1]])
}
pub(crate) fn u32_at(b: &[u8], p: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[p..p + 4]);
    u32::from_le_bytes(a)
}
pub(crate) fn u64_at(b: &[u8], p: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[p..p + 8]);
    u64::from_le_bytes(a)
}

/// The fixed 48-byte header of an extent record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RecordHeader {
    pub kind: u8,
    pub disk_index: u16,
    pub offset: u64,
    pub len: u32,
    pub encoding: u8,
    pub stored_len: u32,
    pub checksum: [u8; 16],
    pub payload_crc: u32,
}

impl RecordHeader {
    /// The 16 bytes of logical fields (tag, kind, disk, offset, len) the content checksum covers.
    pub fn logical_bytes(kind: u8, disk_index: u16, offset: u64, len: u32) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0] = TAG_EXTENT;
        b[1] = kind;
        b[2..4].copy_from_slice(&disk_index.to_le_bytes());
        b[4..12].copy_from_slice(&offset.to_le_bytes());
        b[12..16].copy_from_slice(&len.to_le_bytes());
        b
    }

    /// BLAKE3 over the logical fields and the uncompressed data, truncated to 16 bytes. Zero
    /// extents hash only their fields (the zeros are implied by kind and length).
    pub fn content_checksum(
        kind: u8,
        disk_index: u16,
        offset: u64,
        len: u32,
        data: &[u8],
    ) -> [u8; 16] {
        let mut h = blake3::Hasher::new();
        h.update(&Self::logical_bytes(kind, disk_index, offset, len));
        h.update(data);
        let mut out = [0u8; 16];
        out.copy_from_slice(&h.finalize().as_bytes()[..16]);
        out
    }

    pub fn encode(&self) -> [u8; RECORD_HEADER_LEN] {
        let mut b = [0u8; RECORD_HEADER_LEN];
        b[..16].copy_from_slice(&Self::logical_bytes(
            self.kind,
            self.disk_index,
            self.offset,
            self.len,
        ));
        b[16] = self.encoding;
        b[20..24].copy_from_slice(&self.stored_len.to_le_bytes());
        b[24..40].copy_from_slice(&self.checksum);
        b[40..44].copy_from_slice(&self.payload_crc.to_le_bytes());
        let crc = crc32c::crc32c(&b[..44]);
        b[44..48].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parses the fields; the caller has checked the header crc. Returns the reason on bad values.
    pub fn decode(b: &[u8; RECORD_HEADER_LEN]) -> Result<RecordHeader, String> {
        if b[0] != TAG_EXTENT {
            return Err(format!("unknown record tag {:#04x}", b[0]));
        }
        if b[17..20] != [0, 0, 0] {
            return Err("reserved record bytes are not zero".into());
        }
        let mut checksum = [0u8; 16];
        checksum.copy_from_slice(&b[24..40]);
        Ok(RecordHeader {
            kind: b[1],
            disk_index: u16_at(b, 2),
            offset: u64_at(b, 4),
            len: u32_at(b, 12),
            encoding: b[16],
            stored_len: u32_at(b, 20),
            checksum,
            payload_crc: u32_at(b, 40),
        })
    }
}

/// The 68-byte trailer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Trailer {
    pub records: u64,
    pub data_bytes: u64,
    pub zero_bytes: u64,
    pub digest: [u8; 32],
}

impl Trailer {
    pub fn encode(&self) -> [u8; TRAILER_LEN] {
        let mut b = [0u8; TRAILER_LEN];
        b[..8].copy_from_slice(&END_MARKER);
        b[8..16].copy_from_slice(&self.records.to_le_bytes());
        b[16..24].copy_from_slice(&self.data_bytes.to_le_bytes());
        b[24..32].copy_from_slice(&self.zero_bytes.to_le_bytes());
        b[32..64].copy_from_slice(&self.digest);
        let crc = crc32c::crc32c(&b[..64]);
        b[64..68].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; TRAILER_LEN]) -> Trailer {
        let mut digest = [0u8; 32];
        digest.copy_from_slice(&b[32..64]);
        Trailer {
            records: u64_at(b, 8),
            data_bytes: u64_at(b, 16),
            zero_bytes: u64_at(b, 24),
            digest,
        }
    }
}

/// What a finished or verified log holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Summary {
    /// Extent records in the body.
    pub records: u64,
    /// Uncompressed bytes of data extents.
    pub data_bytes: u64,
    /// Bytes covered by zero extents.
    pub zero_bytes: u64,
    /// Total encoded size of the log: header, records and trailer.
    pub encoded_bytes: u64,
}
