//! The one error type of the codec. Every message says what was wrong, with the values, and what
//! happens next. Record numbers are 0-based positions in the log body.

use std::path::PathBuf;

/// Everything that can go wrong while writing, reading, verifying or scanning a replication log.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error(
        "not a vmrepl log: it starts with {found:02x?} instead of the magic {expected:02x?}; \
         the file is rejected and nothing from it is applied"
    )]
    BadMagic { found: Vec<u8>, expected: [u8; 8] },

    #[error(
        "unsupported log format version {found}: this build reads versions 1 to {supported}; \
         the log is rejected and nothing is applied (upgrade this host to read it)"
    )]
    UnsupportedVersion { found: u16, supported: u16 },

    #[error(
        "the log header sets format flags {flags:#06x} that this build does not know \
         (unknown incompatible bits {unknown:#06x}); the log is rejected and nothing is applied"
    )]
    UnsupportedFlags { flags: u16, unknown: u16 },

    #[error(
        "log header checksum mismatch: stored crc32c {stored:#010x}, computed {computed:#010x} \
         over {header_len} header bytes; the header is corrupt, the log is rejected and must be resent"
    )]
    HeaderChecksum {
        stored: u32,
        computed: u32,
        header_len: u32,
    },

    #[error("invalid log header: {reason}; the log is rejected and nothing is applied")]
    InvalidHeader { reason: String },

    #[error(
        "record #{record} (at byte {at_byte}): the {part} checksum does not match \
         (stored crc32c {stored:#010x}, computed {computed:#010x}); the record is corrupt, \
         the log is rejected from this record on and must be resent from here"
    )]
    FrameChecksum {
        record: u64,
        at_byte: u64,
        part: &'static str,
        stored: u32,
        computed: u32,
    },

    #[error(
        "extent checksum mismatch in record #{record}: disk {disk} (index {disk_index}), \
         offset {offset}, length {len}; the decoded data is not what the primary sent, \
         the log is rejected and nothing from it is applied"
    )]
    ExtentChecksum {
        record: u64,
        disk_index: u16,
        disk: String,
        offset: u64,
        len: u32,
    },

    #[error(
        "record #{record} writes beyond the end of disk {disk}: offset {offset} + length {len} \
         exceeds the disk size {size} bytes; the log is rejected and nothing is applied"
    )]
    ExtentBeyondDisk {
        record: u64,
        disk: String,
        offset: u64,
        len: u64,
        size: u64,
    },

    #[error(
        "record #{record} is out of order or overlaps: disk index {disk_index} offset {offset} \
         comes after disk index {prev_disk_index} up to offset {prev_end}; extents must be in \
         strictly increasing (disk, offset) order without overlap, so the log is rejected"
    )]
    OutOfOrder {
        record: u64,
        disk_index: u16,
        offset: u64,
        prev_disk_index: u16,
        prev_end: u64,
    },

    #[error(
        "record #{record} names disk index {disk_index} but the log header lists only {disks} \
         disk(s); the log is rejected and nothing is applied"
    )]
    UnknownDisk {
        record: u64,
        disk_index: u16,
        disks: usize,
    },

    #[error(
        "record #{record} is an oversized {kind} extent of {len} bytes (the limit is {max}); \
         the log is rejected and nothing is applied"
    )]
    OversizedExtent {
        record: u64,
        kind: &'static str,
        len: u64,
        max: u32,
    },

    #[error(
        "record #{record} (at byte {at_byte}) is malformed: {reason}; the log is rejected \
         from this record on"
    )]
    MalformedRecord {
        record: u64,
        at_byte: u64,
        reason: String,
    },

    #[error(
        "record #{record} (disk {disk}, offset {offset}) decompresses to {actual} bytes \
         instead of {expected}; the log is rejected and nothing is applied"
    )]
    DecompressedSize {
        record: u64,
        disk: String,
        offset: u64,
        expected: u32,
        actual: u64,
    },

    #[error(
        "the log is truncated: it ends at byte {at_byte} after {records} whole record(s) without \
         a valid trailer, so it is incomplete; nothing from it may be applied until the transfer \
         is resumed from the last whole record or the log is resent"
    )]
    Truncated { at_byte: u64, records: u64 },

    #[error(
        "trailer mismatch: the trailer records {what} {expected} but the log holds {actual}; \
         records were lost, added or reordered, so the log is rejected and must be resent"
    )]
    TrailerMismatch {
        what: &'static str,
        expected: String,
        actual: String,
    },

    #[error(
        "unexpected bytes follow the trailer at byte {at_byte}; a complete log ends at its \
         trailer, so the file is rejected (truncate it to {at_byte} bytes to keep the log)"
    )]
    TrailingData { at_byte: u64 },

    #[error("cannot {op}: {reason}; nothing was written for this call")]
    InvalidWrite { op: &'static str, reason: String },

    #[error("cannot open the log file {path}: {source}; nothing was verified")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "I/O error on the log stream: {0}; the log is incomplete and must be resumed or resent"
    )]
    Io(#[from] std::io::Error),
}

impl LogError {
    /// True when the error only says the stream stopped early: the valid prefix can be kept and
    /// the transfer resumed (see [`crate::scan_valid_prefix`]).
    pub fn is_truncation(&self) -> bool {
        matches!(self, LogError::Truncated { .. })
    }
}
