//! Resynchronization: bringing a replica whose latest state may differ from the primary's
//! anywhere back to it, sending only the blocks that differ.
//!
//! **In parts** (replicas that answer `RangeDigests`), read top-down in [`Cycle::resync`]:
//!
//! 1. *Start.* Change tracking restarts: one transaction starts a recording bitmap and takes a
//!    point in time `P` of every disk ([`BlockNodes::begin_full`]). The disks are cut into
//!    ranges ([`Plan`]); the sweep is recorded in the relationship's row ([`ResyncSweep`]).
//! 2. *Each range `i`* (in disk order): the primary reads the range of `P` once, only what
//!    holds data, digests it in 64 KiB blocks and compares each block with the replica's
//!    digest of its latest state as it goes by, keeping the differing blocks' data (up to
//!    [`KEEP_PER_RANGE`]; past it they are read again). The differing blocks go out as log
//!    `base + 1 + i` of kind `ResyncPart`, which the replica acknowledges once durable (and
//!    applies as a part: its latest state is not a point until the end, and the newest whole
//!    state before the first part stays as a recovery point). The replica's digests come
//!    from its digest map and are asked for a few ranges ahead; the reading runs on its own
//!    thread, so the disk is read without pauses while parts are sent.
//! 3. *End.* An ordinary delta from the bitmap started at `P` (every block written since,
//!    at a new instant `P'`) makes the replica equal to the primary at `P'`: a whole point
//!    again. The relationship replicates.
//!
//! **A cut sweep continues.** A daemon restart, a lost link or a reboot stops it after some
//! parts were acknowledged. The next attempt finds the sweep recorded and the replica's last
//! applied part, checks that change tracking held (one recording bitmap, saved cleanly), takes
//! a new point `P2` without touching the bitmap ([`BlockNodes::begin_point`]) and goes on with
//! the next range. The ranges done before the cut were compared as of `P`; whatever changed in
//! them since is in the bitmap and goes out with the final delta. When tracking was lost
//! (QEMU killed, a disk edited while the VM was off) the record is forgotten and the sweep
//! starts from the first range; it still sends only what differs.
//!
//! **Replicas of older releases** refuse `RangeDigests`; they get the whole-disk compare in
//! one log ([`Cycle::resync_whole`]), which starts over when cut.

use crate::db::now_ms;
use crate::db::ResyncSweep;
use crate::peer::client::{LogGrowth, PeerError};
use crate::peer::proto::{DigestRange, PeerResponse, RefusalCode};
use crate::primary::build_part;
use crate::primary::classify;
use crate::primary::decode_digests;
use crate::primary::BlockHasher;
use crate::primary::BlockNodes;
use crate::primary::Compared;
use crate::primary::Cycle;
use crate::primary::CycleError;
use crate::primary::Digests;
use crate::primary::GuestAgent;
use crate::primary::PartBlocks;
use crate::primary::PointImage;
use crate::primary::ReplicaPeer;
use vmrepl_log::LogKind;
use vmrepl_tracking::{CycleHandle, ReconcileOutcome};
use vmrepl_types::replication::Progress;

/// The block a resynchronization compares and sends: the granularity of the bitmaps, so one
/// changed guest block costs one block on the wire.
pub(crate) const RESYNC_BLOCK: u64 = 64 * 1024;
/// The smallest range one part covers by default.
pub(crate) const MIN_RANGE: u64 = 256 << 20;
/// About how many parts a resynchronization has at most by default (larger disks get larger
/// ranges, up to 4 GiB: the most digests a replica gives in one answer).
pub(crate) const MAX_PARTS: u64 = 1024;

/// One range of one disk: a part of a resynchronization.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Range {
    /// The disk's index in the cycle's disks.
    pub(crate) disk: usize,
    pub(crate) offset: u64,
    pub(crate) len: u64,
}

/// How the disks are cut into ranges, one part each, in disk order. Deterministic: the same
/// disks and range size give the same plan, which is how a sweep that continues finds its place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Plan {
    pub(crate) range_bytes: u64,
    pub(crate) ranges: Vec<Range>,
}

impl Plan {
    /// The plan for `disks` (id, size): ranges of `range_bytes` (rounded up to whole blocks),
    /// or by default 256 MiB, larger when the disks hold more than 256 GiB together.
    pub(crate) fn new(disks: &[(String, u64)], range_bytes: Option<u64>) -> Plan {
        let total: u64 = disks.iter().map(|(_, s)| *s).sum();
        let range_bytes = match range_bytes {
            Some(r) => r.max(1).div_ceil(RESYNC_BLOCK) * RESYNC_BLOCK,
            None => total.div_ceil(MAX_PARTS).next_power_of_two().max(MIN_RANGE),
        }
        .min(vmrepl_store::MAX_RANGE_DIGESTS * RESYNC_BLOCK);
        let mut ranges = Vec::new();
        for (disk, (_, size)) in disks.iter().enumerate() {
            let mut offset = 0;
            while offset < *size {
                let len = range_bytes.min(size - offset);
                ranges.push(Range { disk, offset, len });
                offset += len;
            }
        }
        Plan {
            range_bytes,
            ranges,
        }
    }

    fn parts(&self) -> u64 {
        self.ranges.len() as u64
    }

    /// Whether a recorded sweep was made with this plan, and the replica's last applied log
    /// `l` is one of its parts (or the log before the first): then it continues at part
    /// `l - base`.
    pub(crate) fn continues(&self, s: &ResyncSweep, l: u64) -> Option<u64> {
        (s.parts == self.parts()
            && s.range_bytes == self.range_bytes
            && s.base <= l
            && l <= s.base + s.parts)
            .then(|| l - s.base)
    }
}

/// Where a sweep starts: the replica's log before its first part, the part to do next, and
/// the point in time to read (None when every part is done and only the final delta is left).
struct Start {
    base: u64,
    next: u64,
    point: Option<CycleHandle>,
}

/// Why a sweep stopped.
enum SweepError {
    /// The replica does not answer `RangeDigests` (an older release).
    OldReplica,
    Cycle(CycleError),
}

impl From<CycleError> for SweepError {
    fn from(e: CycleError) -> Self {
        SweepError::Cycle(e)
    }
}

/// How many ranges past the one being sent the replica's digests are asked for.
const DIGESTS_AHEAD: usize = 2;
/// The most data of differing blocks a range's compare keeps for its part (more is read
/// again from the point): 1 % of a 256 MiB range is 2.6 MiB. Three ranges at most are in
/// hand at once (one sent, one done, one being read).
pub(crate) const KEEP_PER_RANGE: u64 = 8 << 20;

/// One range compared by the digester, and how long reading and digesting it took.
struct RangeCompared {
    compared: Compared,
    took: std::time::Duration,
}

/// The digester of a sweep (on a blocking thread): for each range in turn, takes the
/// replica's digests from `theirs`, reads the range from its disk's image and compares it
/// block by block, keeping up to `keep` bytes of differing data; stops at the first error or once either channel closes.
fn compare_ranges(
    mut images: Vec<Option<Box<dyn PointImage>>>,
    ranges: Vec<Range>,
    keep: u64,
    mut theirs: tokio::sync::mpsc::Receiver<Vec<[u8; 32]>>,
    done: tokio::sync::mpsc::Sender<Result<RangeCompared, String>>,
) {
    for r in ranges {
        let Some(t) = theirs.blocking_recv() else {
            return;
        };
        let t0 = std::time::Instant::now();
        let res = (|| {
            let image = images[r.disk]
                .as_mut()
                .ok_or_else(|| "the image of the disk was lost".to_string())?;
            let mut h = BlockHasher::new(r.offset, r.len, RESYNC_BLOCK, t, keep)
                .ok_or_else(|| "the replica's digests do not fit the range".to_string())?;
            image.digest_range(&mut h)?;
            Ok(h.finish())
        })();
        let failed = res.is_err();
        let res = res.map(|compared| RangeCompared {
            compared,
            took: t0.elapsed(),
        });
        if done.blocking_send(res).is_err() || failed {
            return;
        }
    }
}

impl<'a, P: ReplicaPeer, N: BlockNodes, G: GuestAgent> Cycle<'a, P, N, G> {
    /// A resynchronization (see the module docs): returns the last log the replica
    /// acknowledged (the final delta's) and the bytes sent.
    pub(crate) async fn resync(&mut self) -> Result<(u64, u64), CycleError> {
        let (l, _) = self.replica_state().await?;
        let plan = Plan::new(&self.disks, self.resync_range);
        if let Some(s) = self.rel.resync_sweep {
            if l == s.base + s.parts + 1 && plan.continues(&s, s.base + s.parts).is_some() {
                // The final delta was acknowledged, but its end was not recorded.
                self.record_sweep(None)?;
                return Ok((l, 0));
            }
        }
        let start = self.start_sweep(&plan, l).await?;
        let (base, parts) = (start.base, plan.parts());
        let swept = match start.point {
            Some(h) => {
                let r = self.sweep(&plan, base, start.next, &h).await;
                self.release_point(&h).await;
                r
            }
            None => Ok(0),
        };
        let sent = match swept {
            Ok(bytes) => bytes,
            Err(SweepError::OldReplica) => {
                tracing::info!(target: "vmrepl::replication", vm = %self.vm.uuid, "the replica compares whole disks only (an older release)");
                self.record_sweep(None)?;
                return self.resync_whole().await;
            }
            Err(SweepError::Cycle(e)) => return Err(e),
        };
        // The final delta: whatever was written since the sweep's point in time.
        let (seq, more) = self.delta_on(base + parts).await?;
        self.record_sweep(None)?;
        Ok((seq, sent + more))
    }

    /// Continues the recorded sweep when it still can, or starts a new one.
    async fn start_sweep(&mut self, plan: &Plan, l: u64) -> Result<Start, CycleError> {
        let (nodes, tag) = (self.endpoint, self.tag);
        let staging = self.staging.dir.clone();
        if let Some(next) = self.rel.resync_sweep.and_then(|s| plan.continues(&s, l)) {
            let base = l - next;
            // Tracking must have held since the sweep began: the bitmap it started, alone and
            // saved cleanly (a frozen one of a cut final delta is merged back into it).
            match nodes
                .reconcile(tag, &self.nodes(), Some(&staging), |_| false)
                .await
            {
                Ok(ReconcileOutcome::Ready { recording, .. }) => {
                    tracing::info!(target: "vmrepl::replication", vm = %self.vm.uuid, part = next + 1, parts = plan.parts(), "the resynchronization continues where it stopped");
                    if next == plan.parts() {
                        return Ok(Start {
                            base,
                            next,
                            point: None,
                        });
                    }
                    let h = nodes
                        .begin_point(tag, &self.disks, recording, &self.staging)
                        .await
                        .map_err(|e| {
                            CycleError::Other(format!(
                                "cannot take a point in time to continue the resynchronization: {e}"
                            ))
                        })?;
                    return Ok(Start {
                        base,
                        next,
                        point: Some(h),
                    });
                }
                Ok(ReconcileOutcome::ResyncRequired { reason }) => {
                    tracing::info!(target: "vmrepl::replication", vm = %self.vm.uuid, %reason, "the resynchronization starts again from the first range: change tracking did not hold");
                }
                Err(e) => {
                    return Err(CycleError::Other(format!(
                        "cannot check change tracking: {e}"
                    )))
                }
            }
        }
        nodes
            .stop_tracking(tag, &self.nodes(), Some(staging.as_path()))
            .await
            .map_err(|e| CycleError::Other(format!("cannot reset change tracking: {e}")))?;
        let h = nodes
            .begin_full(tag, &self.disks, l + 1, &self.staging, None)
            .await
            .map_err(|e| CycleError::Other(format!("cannot stage the resynchronization: {e}")))?;
        let sweep = ResyncSweep {
            base: l,
            parts: plan.parts(),
            range_bytes: plan.range_bytes,
            started_ms: now_ms(),
        };
        if let Err(e) = self.record_sweep(Some(&sweep)) {
            self.release_point(&h).await;
            let _ = nodes.stop_tracking(tag, &self.nodes(), None).await;
            return Err(e);
        }
        Ok(Start {
            base: l,
            next: 0,
            point: Some(h),
        })
    }

    /// Compares and sends parts `next..` of the plan from the point `h`; returns the bytes
    /// sent. A digester thread reads the ranges in order, without pauses, and compares each
    /// block with the replica's digest as it goes by, keeping the differing blocks' data; the
    /// replica's digests are asked for up to [`DIGESTS_AHEAD`] ranges ahead of the part being
    /// sent, between parts on the one connection. So the primary's disk is read once, and
    /// the parts go out while the next ranges are read.
    async fn sweep(
        &mut self,
        plan: &Plan,
        base: u64,
        next: u64,
        h: &CycleHandle,
    ) -> Result<u64, SweepError> {
        let open = || {
            let (reader, point) = (self.endpoint.reader(), h.clone());
            async move {
                tokio::task::spawn_blocking(move || reader.open(&point))
                    .await
                    .map_err(|e| CycleError::Other(e.to_string()))?
                    .map(|v| v.into_iter().map(Some).collect::<Vec<_>>())
            }
        };
        let digesting = open().await?;
        let mut sending = open().await?;
        let todo = plan.ranges[next as usize..].to_vec();
        let keep = self.resync_keep;
        let (theirs_tx, theirs_rx) = tokio::sync::mpsc::channel(DIGESTS_AHEAD + 1);
        let (done_tx, done_rx) = tokio::sync::mpsc::channel(1);
        let digester = tokio::task::spawn_blocking(move || {
            compare_ranges(digesting, todo, keep, theirs_rx, done_tx)
        });
        let r = self
            .send_parts(plan, base, next, h, &mut sending, theirs_tx, done_rx)
            .await;
        // The digester stops once its channels close (it holds connections to the point,
        // which the caller releases next).
        let _ = digester.await;
        r
    }

    /// The coordinating half of [`sweep`](Self::sweep): asks for the replica's digests ahead,
    /// takes each range's comparison from the digester, and sends its part.
    #[allow(clippy::too_many_arguments)]
    async fn send_parts(
        &mut self,
        plan: &Plan,
        base: u64,
        next: u64,
        h: &CycleHandle,
        sending: &mut [Option<Box<dyn PointImage>>],
        theirs_tx: tokio::sync::mpsc::Sender<Vec<[u8; 32]>>,
        mut done_rx: tokio::sync::mpsc::Receiver<Result<RangeCompared, String>>,
    ) -> Result<u64, SweepError> {
        let total: u64 = self.disks.iter().map(|(_, s)| *s).sum();
        let mut compared: u64 = plan.ranges[..next as usize].iter().map(|r| r.len).sum();
        let (mut sent, mut differing) = (0u64, 0u64);
        let t0 = std::time::Instant::now();
        let from = compared;
        let n = plan.ranges.len();
        let mut asked = next as usize;
        for (i, r) in plan.ranges.iter().enumerate().skip(next as usize) {
            let (id, _) = self.disks[r.disk].clone();
            let offset = r.offset;
            // The replica's digests of this range and the next few, before this part goes
            // out: the digester never waits for them.
            let t_digest = std::time::Instant::now();
            while asked < n && asked <= i + DIGESTS_AHEAD {
                let theirs = self
                    .replica_digests(&plan.ranges[asked], asked == 0)
                    .await?;
                if theirs_tx.send(theirs).await.is_err() {
                    break; // the digester stopped: why comes next
                }
                asked += 1;
            }
            let theirs_t = t_digest.elapsed();
            let done = done_rx.recv().await.ok_or_else(|| {
                CycleError::Other(format!(
                    "the compare of disk {id} at {offset} stopped unexpectedly"
                ))
            })?;
            let done = done.map_err(|e| {
                CycleError::Other(format!("cannot compare disk {id} at {offset}: {e}"))
            })?;
            let (count, ours_t) = (done.compared.count, done.took);
            let read_again = done.compared.kept.is_none();
            let blocks = match done.compared.kept {
                Some(kept) => PartBlocks::Kept(kept),
                None => PartBlocks::Read(done.compared.blocks),
            };
            // The part: the differing blocks, as log base + 1 + i.
            let seq = base + 1 + i as u64;
            let image = sending[r.disk]
                .take()
                .ok_or_else(|| CycleError::Other(format!("the image of disk {id} was lost")))?;
            let t_send = std::time::Instant::now();
            let (image, bytes) = self.send_part(h, image, r.disk, blocks, seq).await;
            let send_t = t_send.elapsed();
            sending[r.disk] = image;
            sent += bytes?;
            compared += r.len;
            differing += count;
            let secs = t0.elapsed().as_secs_f64().max(0.001);
            *crate::locks::unpoisoned(self.progress) = Some(Progress {
                what: format!(
                    "resynchronization: comparing with the replica (part {} of {})",
                    i + 1,
                    plan.parts()
                ),
                bytes_done: compared,
                bytes_total: total,
                rate_bytes_per_sec: (compared - from) as f64 / secs,
                blocks_differing: Some(differing),
            });
            tracing::info!(target: "vmrepl::replication", vm = %self.vm.uuid, part = i + 1, parts = plan.parts(), disk = %id, offset, differing = count, read_again,
                digest_ms = ours_t.as_millis() as u64, replica_digest_ms = theirs_t.as_millis() as u64, send_ms = send_t.as_millis() as u64,
                "resynchronization part acknowledged");
        }
        Ok(sent)
    }

    /// The replica's digests of range `r` of its latest state. `first`: the sweep's very
    /// first ask, whose refusal as a bad request means an older replica.
    async fn replica_digests(
        &mut self,
        r: &Range,
        first: bool,
    ) -> Result<Vec<[u8; 32]>, SweepError> {
        let id = self.disks[r.disk].0.clone();
        let range = DigestRange {
            disk: id.clone(),
            offset: r.offset,
            len: r.len,
            block_size: RESYNC_BLOCK,
        };
        match self.client.range_digests(self.vm.uuid, range).await {
            Ok(PeerResponse::RangeDigests { digests }) => digests.decode().ok_or_else(|| {
                CycleError::Other(format!(
                    "the replica's digests of disk {id} at {} do not fit the range",
                    r.offset
                ))
                .into()
            }),
            Err(PeerError::Refused {
                code: RefusalCode::BadRequest,
                ..
            }) if first => Err(SweepError::OldReplica),
            Err(e) => Err(classify(e).into()),
            Ok(other) => Err(CycleError::Other(format!(
                "unexpected answer to the digests of disk {id} at {}: {other:?}",
                r.offset
            ))
            .into()),
        }
    }

    /// Encodes part `seq` (the `blocks` of disk number `disk`) while it is sent; returns the
    /// image and the bytes sent once the replica acknowledged it.
    async fn send_part(
        &mut self,
        h: &CycleHandle,
        image: Box<dyn PointImage>,
        disk: usize,
        blocks: PartBlocks,
        seq: u64,
    ) -> (Option<Box<dyn PointImage>>, Result<u64, CycleError>) {
        let (tx, rx) = tokio::sync::watch::channel(LogGrowth::default());
        let (chunks_tx, chunks) = tokio::sync::mpsc::channel(4);
        let build = build_part(
            (self.vm, self.rel),
            h,
            image,
            disk as u16,
            blocks,
            (seq, seq - 1),
            chunks_tx,
            tx,
        );
        let send = self
            .client
            .send_log_stream(self.vm.uuid, (seq, seq - 1), chunks, rx, |_| {});
        let ((image, built), sent) = tokio::join!(build, send);
        // A lost link also stops the encoder: the link's error is the one that says why.
        let r = match (built, sent) {
            (_, Err(e)) => Err(classify(e)),
            (Err(e), Ok(_)) => Err(e),
            (Ok(total), Ok(r)) => crate::primary::acked(r, seq, total),
        };
        (image, r)
    }

    /// Lets the endpoint drop a point in time read for the sweep, and its staging files.
    async fn release_point(&self, h: &CycleHandle) {
        self.release(h, h.seq).await;
        let _ = h.remove_files();
    }

    fn record_sweep(&self, sweep: Option<&ResyncSweep>) -> Result<(), CycleError> {
        self.sweeps.record(sweep).map_err(|e| {
            CycleError::Other(format!(
                "cannot record the resynchronization's progress: {e}"
            ))
        })
    }

    /// The whole-disk compare, for replicas that do not compare by range: the replica's
    /// digests of its state `l` per block of every disk; tracking restarts (bitmap l+1 from
    /// one instant) and log l+1 on base l carries every block of that instant that differs,
    /// the unallocated ranges included as zeros: applied on top of `l` it makes the replica
    /// equal to the primary, and deltas follow. The recovery points the replica kept stay.
    pub(crate) async fn resync_whole(&mut self) -> Result<(u64, u64), CycleError> {
        let (nodes, tag) = (self.endpoint, self.tag);
        let (l, _) = self.replica_state().await?;
        // The replica's digests of its state `l` (a replica that cannot give them gets every
        // block).
        let digests = match self.client.block_digests(self.vm.uuid).await {
            Ok(PeerResponse::BlockDigests { disks }) => decode_digests(disks, &self.disks),
            _ => Digests::new(),
        };
        let staging = self.staging.dir.clone();
        nodes
            .stop_tracking(tag, &self.nodes(), Some(staging.as_path()))
            .await
            .map_err(|e| CycleError::Other(format!("cannot reset change tracking: {e}")))?;
        let h = nodes
            .begin_full(tag, &self.disks, l + 1, &self.staging, self.vars)
            .await
            .map_err(|e| CycleError::Other(format!("cannot stage the resynchronization: {e}")))?;
        let path = self.log_path(l + 1);
        let res = async {
            let (built, sent) = self
                .build_and_send(
                    &h,
                    &path,
                    (l + 1, l),
                    LogKind::Resync,
                    Some(&digests),
                    "resynchronization",
                )
                .await;
            built?;
            sent
        }
        .await;
        let _ = h.remove_files();
        let _ = std::fs::remove_file(&path);
        match res {
            Ok(bytes) => Ok((l + 1, bytes)),
            Err(e) => {
                let _ = nodes.stop_tracking(tag, &self.nodes(), None).await;
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disks(sizes: &[u64]) -> Vec<(String, u64)> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, s)| (format!("d{i}"), *s))
            .collect()
    }

    #[test]
    fn a_plan_cuts_each_disk_into_ranges_in_order_and_larger_disks_get_larger_ranges() {
        const M: u64 = 1 << 20;
        let p = Plan::new(&disks(&[600 * M, 100 * M]), None);
        assert_eq!(p.range_bytes, MIN_RANGE);
        let shape: Vec<(usize, u64, u64)> =
            p.ranges.iter().map(|r| (r.disk, r.offset, r.len)).collect();
        assert_eq!(
            shape,
            vec![
                (0, 0, 256 * M),
                (0, 256 * M, 256 * M),
                (0, 512 * M, 88 * M),
                (1, 0, 100 * M)
            ]
        );
        // 2 TiB: about 1024 parts of 2 GiB, not 8192 of 256 MiB.
        let big = Plan::new(&disks(&[2 << 40]), None);
        assert_eq!(big.range_bytes, 2 << 30);
        assert_eq!(big.ranges.len(), 1024);
        // 16 TiB: ranges of 4 GiB at most, as many digests as a replica gives in one answer.
        let huge = Plan::new(&disks(&[16 << 40]), None);
        assert_eq!(huge.range_bytes, 4 << 30);
        assert_eq!(huge.ranges.len(), 4096);
        // A set size is rounded up to whole blocks.
        let set = Plan::new(&disks(&[10 * M]), Some(3 * M + 1));
        assert_eq!(set.range_bytes, 3 * M + RESYNC_BLOCK);
        assert_eq!(set.ranges.len(), 4);
        assert!(Plan::new(&disks(&[0]), None).ranges.is_empty());
    }

    #[test]
    fn a_recorded_sweep_continues_only_with_the_same_plan_and_a_replica_inside_it() {
        let p = Plan::new(&disks(&[1 << 30]), None); // 4 parts
        let s = ResyncSweep {
            base: 10,
            parts: 4,
            range_bytes: MIN_RANGE,
            started_ms: 0,
        };
        assert_eq!(p.continues(&s, 10), Some(0), "no part applied yet");
        assert_eq!(p.continues(&s, 12), Some(2));
        assert_eq!(p.continues(&s, 14), Some(4), "only the final delta is left");
        assert_eq!(p.continues(&s, 15), None, "the replica is past the sweep");
        assert_eq!(p.continues(&s, 9), None, "the replica is behind the sweep");
        let other = Plan::new(&disks(&[2 << 30]), None);
        assert_eq!(other.continues(&s, 12), None, "the disks changed");
    }
}
