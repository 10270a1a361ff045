//! The seams of the cycle engine ([`Cycle`]): what it asks the replica ([`ReplicaPeer`]), what
//! it does to the VM's block nodes ([`BlockNodes`]: the QMP endpoint with the tracking crate's
//! bitmap calls, and [`PointReader`]: how a staged point in time is read into a log) and the
//! guest agent it freezes an app-consistent point with ([`GuestAgent`]).
//!
//! The production types implement them here: [`PeerClient`] (TLS to the replica server),
//! [`Endpoint`] (the running QEMU or qemu-storage-daemon, through `vmrepl-tracking`),
//! [`StagedPoint`] (NBD exports and staged qcow2 images) and [`VmAgent`] (the QEMU guest agent).
//! The unit tests put scripted fakes in their place (`fakes.rs`), in the manner of zrepl's
//! `Sender`/`Receiver` interfaces and firecracker's mocked controllers, so the engine's
//! decisions are tested without QEMU, a network or root.
//!
//! The methods mirror the calls the engine made before the seams existed, one for one, so
//! that production behaves exactly as it did.

use crate::host::Host;
use crate::peer::client::PeerError;
use crate::peer::client::{LogGrowth, PeerClient};
use crate::peer::proto::BootFile;
use crate::peer::proto::{PeerRequest, PeerResponse, Resume};
use crate::primary::pull_disk;
use crate::primary::thaw_guest;
use crate::primary::write_differing;
use crate::primary::write_differing_pulled;
use crate::primary::write_ranges;
use crate::primary::CycleError;
use crate::primary::Endpoint;
use crate::primary::LogSink;
use crate::primary::AGENT_TIMEOUT;
use crate::primary::FREEZE_TIMEOUT;
use crate::primary::{
    reads_for, staged_chunks, write_chunks, BlockHasher, PULL_IO_TIMEOUT, PULL_WINDOW,
};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use uuid::Uuid;
use vmrepl_log::LogWriter;
use vmrepl_tracking::{CycleHandle, OwnedBitmap, PointSignal, ReconcileOutcome, TrackingError};
use vmrepl_tracking::{ExtentReader, RelTag, Staging};
use vmrepl_types::VmDefinition;

/// What a cycle asks of the replica server of its VM.
///
/// Answers are the wire's [`PeerResponse`]s: the engine decides what each means (a refusal,
/// an acknowledgement of another log and an unexpected answer included).
pub(crate) trait ReplicaPeer {
    /// `ReplicaState`: the replica's last applied log, a partial log it can resume, whether
    /// it failed over, and the boot files it holds.
    async fn replica_state(&mut self, vm_uuid: Uuid) -> Result<PeerResponse, PeerError>;

    /// `BlockDigests`: the digests of every block of the replica's latest state, for a
    /// resynchronization by compare (a whole-disk read there: a long deadline).
    async fn block_digests(&mut self, vm_uuid: Uuid) -> Result<PeerResponse, PeerError>;

    /// `RangeDigests`: the digests of one range of one disk of the replica's latest state,
    /// for one part of a resynchronization in parts.
    async fn range_digests(
        &mut self,
        vm_uuid: Uuid,
        range: crate::peer::proto::DigestRange,
    ) -> Result<PeerResponse, PeerError>;

    /// `ExpectImport`: the size and BLAKE3 digest (hex) of an initial copy exported to media.
    async fn expect_import(
        &mut self,
        vm_uuid: Uuid,
        bytes: u64,
        blake3: String,
    ) -> Result<PeerResponse, PeerError>;

    /// Sends the boot files (kernel, initrd) of a VM that boots a kernel directly, unless the
    /// replica already holds them (`held`: file and BLAKE3 digest).
    async fn send_boot_files(
        &mut self,
        vm: &VmDefinition,
        held: &[(BootFile, String)],
    ) -> Result<(), String>;

    /// `SendLog` of log `seq` on `base` while it is encoded: every chunk received on `chunks`,
    /// then the end of the log once `growth` says the encoder finished well; the replica's
    /// answer. `progress` gets the bytes sent so far.
    async fn send_log_stream(
        &mut self,
        vm_uuid: Uuid,
        seq_base: (u64, u64),
        chunks: tokio::sync::mpsc::Receiver<Vec<u8>>,
        growth: tokio::sync::watch::Receiver<LogGrowth>,
        progress: impl FnMut(u64),
    ) -> Result<PeerResponse, PeerError>;

    /// `SendLog` of log `seq` on `base` from the file `log_file`, from `resume.bytes` on when
    /// resuming a cut transfer; the replica's answer. `progress` gets the bytes sent so far.
    async fn send_log(
        &mut self,
        vm_uuid: Uuid,
        seq_base: (u64, u64),
        resume: Option<Resume>,
        log_file: &Path,
        progress: impl FnMut(u64),
    ) -> Result<PeerResponse, PeerError>;
}

/// Where a resynchronization in parts records how far it got (the relationship's row), so
/// that it continues after a cut ([`crate::db::ResyncSweep`]).
pub(crate) trait SweepRecord: Sync {
    /// Records the sweep under way, or that none is.
    fn record(&self, sweep: Option<&crate::db::ResyncSweep>) -> Result<(), String>;
}

/// The relationship's row in this host's database.
pub(crate) struct DbSweeps<'a> {
    pub(crate) d: &'a Host,
    pub(crate) vm: Uuid,
}

impl SweepRecord for DbSweeps<'_> {
    fn record(&self, sweep: Option<&crate::db::ResyncSweep>) -> Result<(), String> {
        self.d
            .db()
            .set_resync_sweep(self.vm, sweep)
            .map_err(|e| e.to_string())
    }
}

/// Where a cycle reaches the VM's block nodes, and the change tracking it does there (the
/// bitmap protocol of `vmrepl-tracking`, I1 and I2).
pub(crate) trait BlockNodes {
    /// Whether this is the VM's running QEMU (a guest to freeze for an app-consistent point),
    /// rather than qemu-storage-daemon over the disks of a VM that is off.
    fn live(&self) -> bool;

    /// [`vmrepl_tracking::reconcile`]: back to one recording bitmap; `replica_has(n)` says
    /// whether the replica holds log `n` (commit its frozen bitmap) or not (merge it back).
    async fn reconcile(
        &self,
        tag: RelTag,
        nodes: &[&str],
        staging_dir: Option<&Path>,
        replica_has: impl Fn(u64) -> bool,
    ) -> Result<ReconcileOutcome, TrackingError>;

    /// [`vmrepl_tracking::begin_cycle_with_new`]: freezes recording bitmap `seq` and takes the
    /// point in time of every disk in one transaction; the disks in `fresh` (new to the
    /// replica) start recording and are copied whole in the same instant; `on_point` is told
    /// the instant it is taken.
    #[allow(clippy::too_many_arguments)]
    async fn begin_cycle(
        &self,
        tag: RelTag,
        disks: &[(String, u64)],
        fresh: &[String],
        seq: u64,
        staging: &Staging,
        vars: Option<&str>,
        on_point: Option<PointSignal>,
    ) -> Result<CycleHandle, TrackingError>;

    /// [`vmrepl_tracking::begin_full`]: a full copy of every disk, and bitmap `seq0` recording
    /// from the same instant.
    async fn begin_full(
        &self,
        tag: RelTag,
        disks: &[(String, u64)],
        seq0: u64,
        staging: &Staging,
        vars: Option<&str>,
    ) -> Result<CycleHandle, TrackingError>;

    /// [`vmrepl_tracking::begin_point`]: a point in time of every disk, read as a full copy,
    /// with the bitmaps left alone (a resynchronization in parts that continues).
    async fn begin_point(
        &self,
        tag: RelTag,
        disks: &[(String, u64)],
        seq: u64,
        staging: &Staging,
    ) -> Result<CycleHandle, TrackingError>;

    /// [`vmrepl_tracking::commit_cycle`]: drops frozen bitmap `seq` (only after the replica's
    /// acknowledgement of its log, I1).
    async fn commit_cycle(
        &self,
        tag: RelTag,
        nodes: &[&str],
        seq: u64,
    ) -> Result<(), TrackingError>;

    /// [`vmrepl_tracking::rollback_cycle`]: merges frozen bitmap `seq` back into `seq + 1`.
    async fn rollback_cycle(
        &self,
        tag: RelTag,
        nodes: &[&str],
        seq: u64,
    ) -> Result<(), TrackingError>;

    /// [`vmrepl_tracking::stop_tracking`]: removes every bitmap of the relationship.
    async fn stop_tracking(
        &self,
        tag: RelTag,
        nodes: &[&str],
        staging_dir: Option<&Path>,
    ) -> Result<(), TrackingError>;

    /// [`vmrepl_tracking::list_owned`]: the relationship's bitmaps per node.
    async fn list_owned(
        &self,
        tag: RelTag,
        nodes: &[&str],
    ) -> Result<BTreeMap<String, Vec<OwnedBitmap>>, TrackingError>;

    /// [`vmrepl_tracking::release_exports`]: the point in time is in the log; its exports,
    /// jobs and fleecing images go (the frozen bitmap stays).
    async fn release_exports(&self, h: &CycleHandle) -> Result<(), TrackingError>;

    /// How the log builder reads the points in time this endpoint stages.
    fn reader(&self) -> Arc<dyn PointReader>;
}

/// How the log builder reads a staged point in time; called on a blocking thread.
pub(crate) trait PointReader: Send + Sync {
    /// The images of `h` ready to be read, in the order of [`CycleHandle::images`] (the disks,
    /// then the UEFI vars).
    fn open(&self, h: &CycleHandle) -> Result<Vec<Box<dyn PointImage>>, CycleError>;
}

/// One image of a staged point in time, written into a log (on a blocking thread).
pub(crate) trait PointImage: Send {
    /// Writes what the cycle carries of the image as disk `disk` of size `size`: the changed
    /// ranges of a delta, or the ranges holding data of a full copy; with `zero_gaps`, every
    /// range between them as zeroes (see [`write_ranges`]).
    fn write_ranges(
        &mut self,
        w: &mut LogWriter<LogSink>,
        disk: u16,
        size: u64,
        zero_gaps: bool,
    ) -> Result<(), String>;

    /// Feeds the range of `h` as of the point in time to `h`, in order (a resynchronization in
    /// parts digests it per block and compares with the replica's), reading only the
    /// stretches that hold data.
    fn digest_range(&mut self, h: &mut BlockHasher) -> Result<(), String>;

    /// Writes the byte ranges `blocks` (in order) of the point in time into the log as disk
    /// `disk`, all-zero stretches as zero records.
    fn write_blocks(
        &mut self,
        w: &mut LogWriter<LogSink>,
        disk: u16,
        blocks: &[(u64, u64)],
    ) -> Result<(), String>;

    /// Writes the blocks (of `bs` bytes) whose digest differs from the replica's `theirs`
    /// (see [`compare_blocks`]); returns how many. `report` hears of every block compared:
    /// its bytes, and whether it differed.
    fn write_differing(
        &mut self,
        w: &mut LogWriter<LogSink>,
        disk: u16,
        size: u64,
        bs: u64,
        theirs: &[[u8; 32]],
        report: &mut dyn FnMut(u64, bool),
    ) -> Result<u64, String>;
}

/// The guest agent of a running VM, for app-consistent points.
pub(crate) trait GuestAgent {
    /// A frozen guest, to be thawed.
    type Frozen;

    /// Freezes the guest's file systems (the guest runs its freeze hooks first): the guest to
    /// thaw and how many file systems it froze. A failed attempt has thawed again already.
    async fn freeze(&self) -> Result<(Self::Frozen, u64), String>;

    /// Thaws a frozen guest; a thaw that keeps failing is reported, not returned.
    async fn thaw(&self, frozen: Self::Frozen);
}

impl ReplicaPeer for PeerClient {
    async fn replica_state(&mut self, vm_uuid: Uuid) -> Result<PeerResponse, PeerError> {
        self.call(&PeerRequest::ReplicaState { vm_uuid }).await
    }

    async fn block_digests(&mut self, vm_uuid: Uuid) -> Result<PeerResponse, PeerError> {
        self.call_within(
            &PeerRequest::BlockDigests { vm_uuid },
            crate::peer::client::ANSWER_TO_DIGESTS,
        )
        .await
    }

    async fn range_digests(
        &mut self,
        vm_uuid: Uuid,
        range: crate::peer::proto::DigestRange,
    ) -> Result<PeerResponse, PeerError> {
        self.call_within(
            &PeerRequest::RangeDigests { vm_uuid, range },
            crate::peer::client::ANSWER_TO_DIGESTS,
        )
        .await
    }

    async fn expect_import(
        &mut self,
        vm_uuid: Uuid,
        bytes: u64,
        blake3: String,
    ) -> Result<PeerResponse, PeerError> {
        self.call(&PeerRequest::ExpectImport {
            vm_uuid,
            bytes,
            blake3,
        })
        .await
    }

    async fn send_boot_files(
        &mut self,
        vm: &VmDefinition,
        held: &[(BootFile, String)],
    ) -> Result<(), String> {
        super::send_boot_files(self, vm, held)
            .await
            .map_err(|e| e.to_string())
    }

    async fn send_log_stream(
        &mut self,
        vm_uuid: Uuid,
        seq_base: (u64, u64),
        chunks: tokio::sync::mpsc::Receiver<Vec<u8>>,
        growth: tokio::sync::watch::Receiver<LogGrowth>,
        progress: impl FnMut(u64),
    ) -> Result<PeerResponse, PeerError> {
        PeerClient::send_log_stream(self, vm_uuid, seq_base, chunks, growth, progress).await
    }

    async fn send_log(
        &mut self,
        vm_uuid: Uuid,
        seq_base: (u64, u64),
        resume: Option<Resume>,
        log_file: &Path,
        progress: impl FnMut(u64),
    ) -> Result<PeerResponse, PeerError> {
        PeerClient::send_log(self, vm_uuid, seq_base, resume, log_file, progress).await
    }
}

impl BlockNodes for Endpoint {
    fn live(&self) -> bool {
        matches!(self, Endpoint::Live(_))
    }

    async fn reconcile(
        &self,
        tag: RelTag,
        nodes: &[&str],
        staging_dir: Option<&Path>,
        replica_has: impl Fn(u64) -> bool,
    ) -> Result<ReconcileOutcome, TrackingError> {
        vmrepl_tracking::reconcile(self.qmp(), tag, nodes, staging_dir, replica_has).await
    }

    async fn begin_cycle(
        &self,
        tag: RelTag,
        disks: &[(String, u64)],
        fresh: &[String],
        seq: u64,
        staging: &Staging,
        vars: Option<&str>,
        on_point: Option<PointSignal>,
    ) -> Result<CycleHandle, TrackingError> {
        let fresh: Vec<&str> = fresh.iter().map(String::as_str).collect();
        vmrepl_tracking::begin_cycle_with_new(
            self.qmp(),
            tag,
            disks,
            &fresh,
            seq,
            staging,
            vars,
            on_point,
        )
        .await
    }

    async fn begin_full(
        &self,
        tag: RelTag,
        disks: &[(String, u64)],
        seq0: u64,
        staging: &Staging,
        vars: Option<&str>,
    ) -> Result<CycleHandle, TrackingError> {
        vmrepl_tracking::begin_full(self.qmp(), tag, disks, seq0, staging, vars).await
    }

    async fn begin_point(
        &self,
        tag: RelTag,
        disks: &[(String, u64)],
        seq: u64,
        staging: &Staging,
    ) -> Result<CycleHandle, TrackingError> {
        vmrepl_tracking::begin_point(self.qmp(), tag, disks, seq, staging).await
    }

    async fn commit_cycle(
        &self,
        tag: RelTag,
        nodes: &[&str],
        seq: u64,
    ) -> Result<(), TrackingError> {
        vmrepl_tracking::commit_cycle(self.qmp(), tag, nodes, seq).await
    }

    async fn rollback_cycle(
        &self,
        tag: RelTag,
        nodes: &[&str],
        seq: u64,
    ) -> Result<(), TrackingError> {
        vmrepl_tracking::rollback_cycle(self.qmp(), tag, nodes, seq).await
    }

    async fn stop_tracking(
        &self,
        tag: RelTag,
        nodes: &[&str],
        staging_dir: Option<&Path>,
    ) -> Result<(), TrackingError> {
        vmrepl_tracking::stop_tracking(self.qmp(), tag, nodes, staging_dir).await
    }

    async fn list_owned(
        &self,
        tag: RelTag,
        nodes: &[&str],
    ) -> Result<BTreeMap<String, Vec<OwnedBitmap>>, TrackingError> {
        vmrepl_tracking::list_owned(self.qmp(), tag, nodes).await
    }

    async fn release_exports(&self, h: &CycleHandle) -> Result<(), TrackingError> {
        vmrepl_tracking::release_exports(self.qmp(), h).await
    }

    fn reader(&self) -> Arc<dyn PointReader> {
        Arc::new(StagedPoint)
    }
}

/// Reads a point in time as `vmrepl-tracking` stages it: pulled over the NBD export of a
/// fleecing node, or mapped from a staged qcow2 image (push mode, the UEFI vars).
pub(crate) struct StagedPoint;

impl PointReader for StagedPoint {
    fn open(&self, h: &CycleHandle) -> Result<Vec<Box<dyn PointImage>>, CycleError> {
        h.images()
            .map(|i| -> Result<Box<dyn PointImage>, CycleError> {
                if let Some(x) = &i.export {
                    // Pulled: the changed ranges come from the export's bitmap context.
                    return Ok(Box::new(Pulled {
                        x: x.clone(),
                        data: None,
                    }));
                }
                let ex = vmrepl_tracking::extents(&i.path).map_err(|e| {
                    CycleError::Other(format!(
                        "cannot map staging image {}: {e}",
                        i.path.display()
                    ))
                })?;
                Ok(Box::new(Staged {
                    path: i.path.clone(),
                    ex,
                }))
            })
            .collect()
    }
}

/// A disk read over the NBD export of its fleecing node.
struct Pulled {
    x: vmrepl_tracking::NbdExport,
    /// The ranges holding data at the point in time, once asked (they do not change).
    data: Option<Vec<(u64, u64)>>,
}

impl Pulled {
    fn connect(&self, context: bool) -> Result<vmrepl_tracking::NbdClient, String> {
        let ctx = context.then_some(self.x.context.as_str());
        vmrepl_tracking::NbdClient::connect(&self.x.socket, &self.x.name, ctx, PULL_IO_TIMEOUT)
            .map_err(|e| e.to_string())
    }
}

impl PointImage for Pulled {
    fn digest_range(&mut self, h: &mut BlockHasher) -> Result<(), String> {
        let (offset, len, bs) = h.range();
        let mut c = self.connect(!self.x.delta())?;
        let data = match &self.data {
            Some(d) => d.clone(),
            None if self.x.delta() => vec![(0, c.size())],
            None => {
                let d = c.data_ranges().map_err(|e| e.to_string())?;
                self.data = Some(d.clone());
                d
            }
        };
        let reads = reads_for(&data, offset, len, bs);
        let mut reader = vmrepl_tracking::NbdRangeReader::new(
            c,
            &reads,
            vmrepl_tracking::MAX_CHUNK,
            PULL_WINDOW,
        );
        for chunk in reader.by_ref() {
            h.put_chunk(&chunk.map_err(|e| e.to_string())?)?;
        }
        reader.finish();
        Ok(())
    }

    fn write_blocks(
        &mut self,
        w: &mut LogWriter<LogSink>,
        disk: u16,
        blocks: &[(u64, u64)],
    ) -> Result<(), String> {
        if blocks.is_empty() {
            return Ok(());
        }
        let c = self.connect(false)?;
        let mut reader = vmrepl_tracking::NbdRangeReader::new(
            c,
            blocks,
            vmrepl_tracking::MAX_CHUNK,
            PULL_WINDOW,
        );
        write_chunks(
            w,
            disk,
            reader.by_ref().map(|c| c.map_err(|e| e.to_string())),
        )?;
        reader.finish();
        Ok(())
    }

    fn write_ranges(
        &mut self,
        w: &mut LogWriter<LogSink>,
        disk: u16,
        size: u64,
        zero_gaps: bool,
    ) -> Result<(), String> {
        pull_disk(w, disk, size, &self.x, zero_gaps)
    }

    fn write_differing(
        &mut self,
        w: &mut LogWriter<LogSink>,
        disk: u16,
        size: u64,
        bs: u64,
        theirs: &[[u8; 32]],
        report: &mut dyn FnMut(u64, bool),
    ) -> Result<u64, String> {
        write_differing_pulled(w, disk, size, &self.x, bs, theirs, report)
    }
}

/// A staged qcow2 image, mapped: its extents.
struct Staged {
    path: PathBuf,
    ex: Vec<vmrepl_tracking::Extent>,
}

impl PointImage for Staged {
    fn digest_range(&mut self, h: &mut BlockHasher) -> Result<(), String> {
        let (offset, len, bs) = h.range();
        let f =
            std::fs::File::open(&self.path).map_err(|e| format!("{}: {e}", self.path.display()))?;
        let data: Vec<(u64, u64)> = self
            .ex
            .iter()
            .filter(|e| matches!(e.kind, vmrepl_tracking::ExtentKind::Data { .. }))
            .map(|e| (e.offset, e.len))
            .collect();
        let reads = reads_for(&data, offset, len, bs);
        for chunk in staged_chunks((&f, &self.path), &self.ex, &reads) {
            h.put_chunk(&chunk?)?;
        }
        Ok(())
    }

    fn write_blocks(
        &mut self,
        w: &mut LogWriter<LogSink>,
        disk: u16,
        blocks: &[(u64, u64)],
    ) -> Result<(), String> {
        let f =
            std::fs::File::open(&self.path).map_err(|e| format!("{}: {e}", self.path.display()))?;
        write_chunks(w, disk, staged_chunks((&f, &self.path), &self.ex, blocks))
    }

    fn write_ranges(
        &mut self,
        w: &mut LogWriter<LogSink>,
        disk: u16,
        size: u64,
        zero_gaps: bool,
    ) -> Result<(), String> {
        let ex = std::mem::take(&mut self.ex);
        let ranges: Vec<(u64, u64)> = ex.iter().map(|e| (e.offset, e.len)).collect();
        let chunks = ExtentReader::open(&self.path, ex).map_err(|e| e.to_string())?;
        let chunks = chunks.map(|c| c.map_err(|e| e.to_string()));
        write_ranges(w, disk, size, &ranges, chunks, zero_gaps)
    }

    fn write_differing(
        &mut self,
        w: &mut LogWriter<LogSink>,
        disk: u16,
        size: u64,
        bs: u64,
        theirs: &[[u8; 32]],
        report: &mut dyn FnMut(u64, bool),
    ) -> Result<u64, String> {
        write_differing(w, disk, size, (&self.path, &self.ex), bs, theirs, report)
    }
}

/// The QEMU guest agent of a running VM, on its socket in the VM's run folder.
pub(crate) struct VmAgent<'a> {
    pub(crate) d: &'a Host,
    pub(crate) vm: Uuid,
}

impl GuestAgent for VmAgent<'_> {
    type Frozen = vmrepl_qemu::Qga;

    async fn freeze(&self) -> Result<(vmrepl_qemu::Qga, u64), String> {
        let sock = vmrepl_qemu::cmdline::RunPaths::in_dir(&self.d.dd.run_dir(self.vm)).qga_sock;
        let qga = vmrepl_qemu::Qga::connect(&sock, AGENT_TIMEOUT)
            .await
            .map_err(|e| e.to_string())?
            .with_timeout(FREEZE_TIMEOUT);
        match qga.fsfreeze_freeze().await {
            Ok(n) => Ok((qga, n)),
            Err(e) => {
                // A freeze that timed out may still complete in the guest: thaw anyway.
                thaw_guest(self.d, self.vm, qga).await;
                Err(e.to_string())
            }
        }
    }

    async fn thaw(&self, qga: vmrepl_qemu::Qga) {
        thaw_guest(self.d, self.vm, qga).await
    }
}
