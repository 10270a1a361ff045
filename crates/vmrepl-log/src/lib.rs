//! `vmrepl-log`: the replication log, a pure, versioned, checksummed, streaming codec.
//!
//! A log carries one point in time of one VM from the primary to the replica: the changed extents
//! (data and explicit zeros) of each replicated disk, the UEFI NVRAM being a small disk of its
//! own. The primary encodes it with [`LogWriter`] straight from its staging images; the replica
//! stores the received bytes as a file, checks it whole with [`verify`] before touching any image
//! (I4), then applies it by iterating a [`LogReader`]. A cut transfer resumes with
//! [`scan_valid_prefix`] on the replica and [`LogWriter::resume`] on the primary.
//!
//! Layout, versioning rule, checksum choices and the resume rule: see `FORMAT.md` in this crate.
//!
//! ```
//! use vmrepl_log::*;
//! let header = LogHeader {
//!     vm_id: uuid::Uuid::nil(),
//!     sequence: 1,
//!     base_sequence: 0,
//!     timestamp_unix_ms: 1_700_000_000_000,
//!     kind: LogKind::Initial,
//!     consistency: Consistency::Crash,
//!     compression: Compression::Zstd,
//!     disks: vec![DiskInfo { id: "disk0".into(), virtual_size: 1 << 20 }],
//! };
//! let mut w = LogWriter::new(Vec::new(), header).unwrap();
//! w.write_data(0, 0, &[7u8; 4096]).unwrap();
//! w.write_zero(0, 4096, 8192).unwrap();
//! let (summary, bytes) = w.finish_into_inner().unwrap();
//! let (_, checked) = verify_reader(&bytes[..]).unwrap();
//! assert_eq!(summary, checked);
//! let records: Vec<Record> = LogReader::new(&bytes[..]).unwrap().collect::<Result<_, _>>().unwrap();
//! assert_eq!(records[1].content, Content::Zero(8192));
//! ```

mod error;
mod format;
#[doc(hidden)]
pub mod fuzzing;
mod reader;
mod writer;

pub use error::LogError;
pub use format::{
    validate_disk_id, Compression, Consistency, DiskInfo, LogHeader, LogKind, Summary,
    FLAGS_INCOMPATIBLE_MASK, FORMAT_VERSION, KNOWN_FLAGS, MAGIC, MAX_DATA_EXTENT, MAX_DISKS,
    MAX_DISK_ID_LEN, MAX_HEADER_LEN, MAX_ZERO_EXTENT,
};
pub use reader::{
    peek_header, scan_valid_prefix, verify, verify_reader, Content, ContentRef, LogReader, Record,
    RecordRef, ValidPrefix,
};
pub use writer::{LogWriter, ResumePoint, DEFAULT_ZSTD_LEVEL};
