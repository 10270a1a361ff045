//! The peer protocol: typed control messages exchanged over a mutually authenticated TLS
//! connection after `vmrepl_transport::frame::Framed::negotiate`. Every request is one
//! Control frame; every answer is one Control frame. A log transfer (`SendLog`) is followed by
//! Data frames carrying the encoded replication log (see `vmrepl-log`), ended by an empty Data
//! frame; the replica answers `LogAck` only once the log is durable and verified (I1, I4).
//!
//! Rules of a log transfer (what both sides rely on):
//!
//! * The replica always reads the Data frames up to the empty one before it answers, even when
//!   it refuses (so the primary can stream without reading); it answers exactly once.
//! * `sequence <= last_applied` is acknowledged again without re-applying (I3);
//!   `base_sequence != last_applied` is refused with [`RefusalCode::OutOfOrder`]
//!   ("resynchronization required").
//! * The replica writes the bytes to its spool file for `sequence`, fsyncs it, verifies the whole
//!   log (checksums, header: VM id, sequence, base, disks and their sizes, every extent within
//!   its disk) and only then answers `LogAck`; it applies the log afterwards. A cut transfer
//!   leaves a partial file: `ReplicaState.partial` tells the primary where to resume
//!   (`Resume`, see `vmrepl_log::scan_valid_prefix` / `LogWriter::resume`); the primary then
//!   sends `SendLog { resume: Some(..) }` followed by the log bytes from `resume.bytes` on.
//!   An initial copy (log 1 on 0, kind initial) sent whole to a replica that holds nothing yet
//!   is applied into the replica's images as it arrives instead, and answered `LogAck` once
//!   that apply committed; it leaves no partial file, and a cut one is sent again whole.
//! * **NVRAM**: a generation 2 VM's UEFI variable store travels as a pseudo-disk with id
//!   [`NVRAM_DISK_ID`] in the log header (its `virtual_size` = the store's size, at most
//!   [`MAX_NVRAM_BYTES`]). A log that lists it carries the NVRAM *whole*: the replica builds a
//!   buffer of `virtual_size` zero bytes, fills in the log's data records for it and stores the
//!   result as the VM's NVRAM as of that log. A log without it leaves the NVRAM unchanged. No
//!   real disk may use the id `nvram`.
//!
//! Compatibility rule: fields may be added with `#[serde(default)]`; removing or renaming one
//! needs a new protocol version (`vmrepl_types::PROTOCOL_VERSIONS`).

use serde::{Deserialize, Serialize};
use uuid::Uuid;
use vmrepl_types::{HostInfo, VmDefinition};

/// Disk id under which the UEFI NVRAM travels in a log (see the module docs).
pub const NVRAM_DISK_ID: &str = "nvram";

/// Largest NVRAM pseudo-disk a replica accepts.
pub const MAX_NVRAM_BYTES: u64 = 64 * 1024 * 1024;

/// Where an interrupted log transfer resumes (mirrors `vmrepl_log::ResumePoint`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resume {
    pub records: u64,
    pub bytes: u64,
}

/// A file a direct-kernel-boot VM boots from. It travels with the VM like its disks, so that
/// the replica host never boots a path the primary named (docs/security.md): the replica keeps
/// its own copy, verified by size and BLAKE3, in the replica's store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BootFile {
    Kernel,
    Initrd,
}

impl BootFile {
    /// The file's name in the replica's store and in a failed-over VM's folder.
    pub fn file_name(self) -> &'static str {
        match self {
            BootFile::Kernel => "vmlinuz",
            BootFile::Initrd => "initrd.img",
        }
    }
}

/// Largest boot file a replica accepts (512 MiB).
pub const MAX_BOOT_FILE_BYTES: u64 = 512 << 20;

/// Recovery-point policy the primary asks the replica to keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointPolicy {
    /// Additional recovery points kept (0..=24).
    pub keep: u32,
    /// Seconds between recovery points.
    pub interval_secs: u32,
}

/// A replica server's refusal of a request: its code and a sentence for the primary's admin.
/// Flows that answer peers return it; the peer server sends it as [`PeerResponse::Refused`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: RefusalCode,
    pub message: String,
}

impl Refusal {
    pub fn new(code: RefusalCode, message: impl Into<String>) -> Self {
        Refusal {
            code,
            message: message.into(),
        }
    }
}

impl From<Refusal> for PeerResponse {
    fn from(r: Refusal) -> Self {
        PeerResponse::Refused {
            code: r.code,
            message: r.message,
        }
    }
}

/// A request from a primary (the TLS client) to a replica server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum PeerRequest {
    /// First message on every connection: who we are and what we can run.
    Hello { host_info: Box<HostInfo> },
    /// Can this replica server host this VM? (authorization, capabilities, room)
    CheckReplica { vm: Box<VmDefinition> },
    /// Where would this replica server keep this primary's replicas? (authorization: its
    /// storage folder, free space and trust group). Asked by `vmrepl doctor`; releases before
    /// it refuse the request as malformed.
    MyGrant,
    /// Could the VM designated here as the existing copy of this VM become its replica (same
    /// generation and disks, stopped, not replicated)? Asked by `vmrepl doctor`; releases before
    /// it refuse the request as malformed.
    CheckExistingCopy { vm: Box<VmDefinition> },
    /// Create the replica VM (idempotent for the same primary and relationship).
    CreateReplica {
        vm: Box<VmDefinition>,
        relationship: Uuid,
        policy: PointPolicy,
        /// The primary's own peer address (`host:port`), where the replica asks it whether the
        /// VM runs before a failover and where reverse replication goes by default.
        #[serde(default)]
        primary_server: Option<String>,
        /// Initial replication from a copy that already exists on the replica server: the
        /// stopped VM of the same name there becomes the replica at sequence 0, and the
        /// primary resynchronizes it by block compare.
        #[serde(default)]
        existing_copy: bool,
    },
    /// Where does the replica of this VM stand?
    ReplicaState { vm_uuid: Uuid },
    /// A log follows as Data frames (ended by an empty Data frame).
    SendLog {
        vm_uuid: Uuid,
        sequence: u64,
        base_sequence: u64,
        /// Set when the primary resumes a cut transfer from what the replica said it holds.
        resume: Option<Resume>,
    },
    /// A boot file of the VM follows as Data frames (ended by an empty Data frame); the
    /// replica keeps it once its size and BLAKE3 digest (hex) match.
    PutBootFile {
        vm_uuid: Uuid,
        file: BootFile,
        size: u64,
        blake3: String,
    },
    /// The primary wrote the initial copy of a VM to external media: its size and BLAKE3
    /// digest (hex). The replica imports that file only (a copy altered or forged on the way
    /// is refused, however valid a log it is).
    ExpectImport {
        vm_uuid: Uuid,
        bytes: u64,
        blake3: String,
    },
    /// Update the recovery-point policy.
    SetPolicy { vm_uuid: Uuid, policy: PointPolicy },
    /// The primary changed the VM (vCPUs, memory, adapters, ...): the replica keeps the new
    /// definition, so that a failover starts the VM as it is now. Its disks must be the same.
    /// Releases before it refuse the request as malformed.
    UpdateDefinition { vm: Box<VmDefinition> },
    /// Remove the replica relationship; the replica VM's data is kept unless `delete`.
    RemoveReplica { vm_uuid: Uuid, delete: bool },
    /// Digests of the replica's latest state, per block of every disk (resynchronization by
    /// compare: the primary then sends only the blocks that differ).
    BlockDigests { vm_uuid: Uuid },
    /// Digests of one range of one disk of the replica's latest state (a resynchronization in
    /// parts compares the disks range by range). Replicas of releases before it refuse the
    /// request as malformed, and the primary falls back to `BlockDigests`.
    RangeDigests { vm_uuid: Uuid, range: DigestRange },
    /// Asked by the replica of a VM before a failover: does the VM run on your side (the
    /// one-host-at-a-time guard, I6), and was it prepared for a planned failover?
    PrimaryState { vm_uuid: Uuid },
    /// Asked by a host that failed a VM over from this host: become its replica. When this
    /// host prepared the VM for a planned failover at `base_sequence` its disks hold exactly
    /// that point, and they become the replica's base (deltas flow at once); otherwise the
    /// replica starts empty and needs a full copy.
    ReverseReplica {
        vm: Box<VmDefinition>,
        relationship: Uuid,
        policy: PointPolicy,
        base_sequence: u64,
        primary_server: Option<String>,
        /// The relationship the VM was replicated under from this host to the asking host
        /// (the replica's record of it). This host takes over its own VM only when it
        /// replicates that VM to the asker under exactly this relationship; without it the
        /// request is refused.
        #[serde(default)]
        old_relationship: Option<Uuid>,
    },
}

/// How a replica refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RefusalCode {
    /// The replica server is disabled.
    Disabled,
    /// This primary is not authorized (no matching entry).
    NotAuthorized,
    /// The primary is authorized, but not in the replica VM's trust group.
    WrongTrustGroup,
    /// The replica host's QEMU cannot run this VM (I7).
    Incompatible,
    /// No such replica VM.
    UnknownVm,
    /// A replica of this VM exists for another primary/relationship.
    Conflict,
    /// The log does not follow the last applied one: resynchronization required (I3).
    OutOfOrder,
    /// The log failed verification (checksums, bounds, truncation) (I4).
    BadLog,
    /// Not enough space on the replica storage.
    DiskFull,
    /// The request is malformed or unexpected.
    BadRequest,
    /// The replica VM has failed over: it takes no more logs from the old primary.
    FailedOver,
    /// The VM runs on this host, so it cannot become a replica here (I6).
    VmRunning,
    /// Anything else on the replica side.
    Internal,
}

/// One range of one disk, digested per `block_size` bytes (`PeerRequest::RangeDigests`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DigestRange {
    pub disk: String,
    pub offset: u64,
    pub len: u64,
    pub block_size: u64,
}

/// The digests of one replica disk (see `PeerRequest::BlockDigests`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskDigests {
    pub id: String,
    pub block_size: u64,
    /// 64 hex digits per block, in order.
    pub digests: String,
}

impl DiskDigests {
    /// Encodes one BLAKE3 digest per block.
    pub fn new(id: String, block_size: u64, digests: &[[u8; 32]]) -> DiskDigests {
        let mut hex = String::with_capacity(digests.len() * 64);
        for d in digests {
            hex.push_str(&blake3::Hash::from(*d).to_hex());
        }
        DiskDigests {
            id,
            block_size,
            digests: hex,
        }
    }

    /// The digests, or None when the text is not whole 64-digit hex digests.
    pub fn decode(&self) -> Option<Vec<[u8; 32]>> {
        if !self.digests.len().is_multiple_of(64) {
            return None;
        }
        self.digests
            .as_bytes()
            .chunks(64)
            .map(|h| blake3::Hash::from_hex(h).ok().map(|h| *h.as_bytes()))
            .collect()
    }
}

/// A replica's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum PeerResponse {
    Hello {
        host_info: Box<HostInfo>,
    },
    Ok,
    /// The answer to `MyGrant`.
    Granted {
        storage: std::path::PathBuf,
        trust_group: String,
        free_bytes: Option<u64>,
        /// The authorization entry that matched (its host-name pattern).
        #[serde(default)]
        entry: String,
    },
    ReplicaState {
        /// Last applied (and acknowledged) sequence; 0 = nothing yet.
        last_applied: u64,
        /// A partially received log the primary may resume: (sequence, resume point).
        partial: Option<(u64, Resume)>,
        /// Frozen recovery points (sequence, unix ms).
        points: Vec<(u64, i64)>,
        /// The replica has failed over: it takes no more logs.
        #[serde(default)]
        failed_over: bool,
        /// The boot files the replica holds, with their BLAKE3 digests (hex).
        #[serde(default)]
        boot: Vec<(BootFile, String)>,
    },
    /// Log `sequence` is durable and verified on the replica (the primary may drop its bitmap).
    LogAck {
        sequence: u64,
        bytes: u64,
    },
    PrimaryState {
        running: bool,
        /// Set when the VM was prepared for a planned failover: the sequence of its final log.
        prepared_seq: Option<u64>,
    },
    /// Per disk: the block size and the BLAKE3 digests of its blocks, hex, concatenated.
    BlockDigests {
        disks: Vec<DiskDigests>,
    },
    /// The digests of the range asked for (`PeerRequest::RangeDigests`).
    RangeDigests {
        digests: DiskDigests,
    },
    /// Answer to `ReverseReplica`: whether the old primary's disks became the replica's base.
    Reversed {
        delta: bool,
        /// The old primary kept its disks as the replica's base at sequence 0, but they may
        /// differ anywhere: the new primary resynchronizes them by compare.
        #[serde(default)]
        resync: bool,
        /// Why a full copy is needed, when it is.
        full_copy_reason: Option<String>,
    },
    Refused {
        code: RefusalCode,
        message: String,
    },
}
