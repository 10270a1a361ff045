//! The cycle engine: initial copy, resynchronization and delta, each sent to the replica and
//! settled against the bitmaps (I1: a bitmap is dropped only after the replica acknowledged).

use crate::peer::client::{LogGrowth, PeerClient};
use crate::peer::proto::{PeerResponse, RefusalCode, Resume};
use crate::primary::build_log;
use crate::primary::export_file;
use crate::primary::BlockNodes;
use crate::primary::Digests;
use crate::primary::Endpoint;
use crate::primary::GuestAgent;
use crate::primary::LogOut;
use crate::primary::Relationship;
use crate::primary::ReplicaPeer;
use crate::primary::SweepRecord;
use crate::primary::VmAgent;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use vmrepl_log::LogKind;
use vmrepl_tracking::{RelTag, Staging};
use vmrepl_types::replication::{InitialReplication, Progress};
use vmrepl_types::VmDefinition;

/// What a successful cycle achieved.
#[derive(Debug)]
pub(crate) enum Done {
    /// Log `seq` is durable on the replica; `bytes` of it went over the network.
    Acked { seq: u64, bytes: u64 },
    /// Log 1 was written whole to external media (`bytes`), for the replica to import.
    Exported { bytes: u64 },
}

impl Done {
    pub(crate) fn acked((seq, bytes): (u64, u64)) -> Done {
        Done::Acked { seq, bytes }
    }
}

/// Why a cycle failed, by what happens next: a network failure is retried at the next cycle;
/// the two that need a resynchronization say which event the relationship takes
/// ([`crate::lifecycle::PrimaryEvent::OutOfOrderRefused`], `TrackingLost`); anything else is
/// retried too.
#[derive(Debug)]
pub(crate) enum CycleError {
    /// The replica server could not be reached or the connection was lost.
    Network(String),
    /// The replica refused the log as out of order, or holds another log than expected.
    OutOfOrder(String),
    /// This host's change tracking cannot be trusted (a bitmap lost or inconsistent).
    TrackingLost(String),
    Other(String),
}

pub(crate) fn classify(e: crate::peer::client::PeerError) -> CycleError {
    use crate::peer::client::PeerError;
    match e {
        PeerError::Refused {
            code: RefusalCode::OutOfOrder,
            message,
        } => CycleError::OutOfOrder(format!(
            "the replica refused the log as out of order: {message}"
        )),
        PeerError::Connect { .. } => CycleError::Network(e.to_string()),
        other => CycleError::Other(other.to_string()),
    }
}

/// Where a log `seq` of relationship `rel` is kept while its transfer waits to be resumed: in
/// the staging folder `dir`.
pub(crate) fn log_file(dir: &Path, rel: RelTag, seq: u64) -> PathBuf {
    dir.join(format!("{}-{seq}.vmrlog", rel.as_str()))
}

/// Everything one cycle works with: the relationship, the VM and its replicated disks, the
/// peer connection, the endpoint that reaches the disks and the VM's guest agent.
///
/// The replica, the block nodes and the guest agent are reached through the traits of
/// [`super::ports`]; production uses [`PeerClient`], [`Endpoint`] and [`VmAgent`], the unit
/// tests scripted fakes.
pub(crate) struct Cycle<'a, P = PeerClient, N = Endpoint, G = VmAgent<'a>> {
    pub(crate) rel: &'a Relationship,
    pub(crate) vm: &'a VmDefinition,
    pub(crate) client: P,
    /// The VM's running QEMU, or the storage daemon that holds its disks while it is off.
    pub(crate) endpoint: &'a N,
    /// The guest agent that freezes a running guest for an app-consistent point.
    pub(crate) guest: G,
    pub(crate) tag: RelTag,
    /// Replicated disks as (node, size).
    pub(crate) disks: Vec<(String, u64)>,
    pub(crate) vars: Option<&'a str>,
    /// The staging folder (with the logs kept for a resume, [`log_file`]) and its settings.
    pub(crate) staging: Staging,
    /// Where the transfer's progress is published for `status`.
    pub(crate) progress: &'a Mutex<Option<Progress>>,
    /// What the log's point in time is (crash-consistent, app-consistent when the guest
    /// could be frozen, or planned for a failover).
    pub(crate) consistency: vmrepl_log::Consistency,
    /// For an app-consistent attempt: the filesystems the agent froze, or why it could not.
    pub(crate) app_freeze: Option<Result<u64, String>>,
    /// The size of the ranges a resynchronization compares as one part (None: by disk size,
    /// see [`super::resync::Plan`]).
    pub(crate) resync_range: Option<u64>,
    /// The most differing data a resynchronization keeps in memory per range
    /// ([`super::resync::KEEP_PER_RANGE`]; past it, the blocks are read again).
    pub(crate) resync_keep: u64,
    /// Where a resynchronization in parts records how far it got.
    pub(crate) sweeps: &'a (dyn SweepRecord + Sync),
    /// Replicated disks new to the replica (included after it was created): a delta cycle
    /// copies each of them whole, in the same point in time as the other disks' changes, and
    /// starts their change tracking there.
    pub(crate) fresh: Vec<String>,
    /// Set once a log carrying the fresh disks' initial copies was acknowledged.
    pub(crate) fresh_carried: bool,
}

impl<'a, P: ReplicaPeer, N: BlockNodes, G: GuestAgent> Cycle<'a, P, N, G> {
    pub(crate) fn nodes(&self) -> Vec<&str> {
        self.disks.iter().map(|(n, _)| n.as_str()).collect()
    }

    /// The disks that already replicate (change tracking running): every disk but the fresh.
    fn tracked_nodes(&self) -> Vec<&str> {
        self.nodes()
            .into_iter()
            .filter(|n| !self.fresh.iter().any(|f| f == n))
            .collect()
    }

    /// Where log `seq` is kept for a resume.
    pub(crate) fn log_path(&self, seq: u64) -> PathBuf {
        log_file(&self.staging.dir, self.tag, seq)
    }

    /// What the replica holds: its last applied log and a partial transfer to resume. A replica
    /// that failed over takes no more logs, so the cycle stops before anything is staged.
    pub(crate) async fn replica_state(
        &mut self,
    ) -> Result<(u64, Option<(u64, Resume)>), CycleError> {
        match self
            .client
            .replica_state(self.vm.uuid)
            .await
            .map_err(classify)?
        {
            PeerResponse::ReplicaState {
                failed_over: true, ..
            } => Err(CycleError::Other(
                "the replica has failed over; it takes no more logs".into(),
            )),
            PeerResponse::ReplicaState {
                last_applied,
                partial,
                boot,
                ..
            } => {
                self.client
                    .send_boot_files(self.vm, &boot)
                    .await
                    .map_err(CycleError::Other)?;
                Ok((last_applied, partial))
            }
            other => Err(CycleError::Other(format!("unexpected answer {other:?}"))),
        }
    }

    /// The initial copy: log 1, the whole of every disk as of one instant, with bitmap 1
    /// recording from that instant on. (The caller raises the relationship's events: the
    /// initial replication started before, the cycle's failure after.)
    pub(crate) async fn initial(&mut self) -> Result<Done, CycleError> {
        let (nodes, tag) = (self.endpoint, self.tag);
        // Start clean: no bitmap of this relationship may linger from an earlier attempt.
        nodes
            .stop_tracking(tag, &self.nodes(), Some(self.staging.dir.as_path()))
            .await
            .map_err(|e| CycleError::Other(format!("cannot reset change tracking: {e}")))?;
        let h = nodes
            .begin_full(tag, &self.disks, 1, &self.staging, self.vars)
            .await
            .map_err(|e| CycleError::Other(format!("cannot stage the initial copy: {e}")))?;
        let export = match &self.rel.settings.initial {
            InitialReplication::Export { folder } => Some(export_file(folder, &self.vm.name)),
            _ => None,
        };
        let path = match &export {
            Some(f) => f.with_extension("vmrlog.partial"),
            None => self.log_path(1),
        };
        let res = async {
            match &export {
                // On external media the log must be whole and durable under its final name.
                Some(f) => {
                    let hasher = Arc::new(Mutex::new(blake3::Hasher::new()));
                    let total = build_log(
                        self.spec(),
                        &h,
                        &nodes.reader(),
                        LogOut::Export(path.clone(), hasher.clone()),
                        (1, 0),
                        LogKind::Initial,
                        None,
                        None,
                    )
                    .await;
                    self.release(&h, 1).await;
                    let total = total?;
                    crate::fsutil::rename_durable(&path, f).map_err(|e| {
                        CycleError::Other(format!(
                            "cannot write the initial copy to {}: {e}",
                            f.display()
                        ))
                    })?;
                    // The replica imports exactly this file: tell it over TLS what it is.
                    let bytes = std::fs::metadata(f)
                        .map_err(|e| CycleError::Other(format!("{}: {e}", f.display())))?
                        .len();
                    let blake3 = crate::locks::unpoisoned(&hasher)
                        .finalize()
                        .to_hex()
                        .to_string();
                    match self
                        .client
                        .expect_import(self.vm.uuid, bytes, blake3)
                        .await
                        .map_err(classify)?
                    {
                        PeerResponse::Ok => Ok(Done::Exported { bytes: total }),
                        other => Err(CycleError::Other(format!(
                            "the replica did not take note of the export: {other:?}"
                        ))),
                    }
                }
                None => {
                    let (built, sent) = self
                        .build_and_send(
                            &h,
                            &path,
                            (1, 0),
                            LogKind::Initial,
                            None,
                            "initial replication",
                        )
                        .await;
                    built?;
                    sent.map(|bytes| Done::Acked { seq: 1, bytes })
                }
            }
        }
        .await;
        let _ = h.remove_files();
        let _ = std::fs::remove_file(&path);
        match res {
            Ok(done) => Ok(done),
            Err(e) => {
                // The cycle's failure (raised by the caller) takes the relationship back to
                // waiting for initial replication.
                let _ = nodes.stop_tracking(tag, &self.nodes(), None).await;
                Err(e)
            }
        }
    }

    /// A delta: log n+1 from bitmap n, or the rest of a log n+1 whose transfer was cut.
    pub(crate) async fn delta(&mut self) -> Result<(u64, u64), CycleError> {
        self.delta_on(self.rel.acked_seq).await
    }

    /// A delta on log `n`, the replica's last: log n+1 from the recording bitmap (the last
    /// step of a resynchronization in parts too).
    pub(crate) async fn delta_on(&mut self, n: u64) -> Result<(u64, u64), CycleError> {
        let (nodes, tag) = (self.endpoint, self.tag);
        let next = n + 1;
        let path = self.log_path(next);
        let (replica_applied, partial) = self.replica_state().await?;
        if path.exists() {
            // A built log is waiting: its transfer was cut. Its bitmap is the frozen one (if a
            // daemon restart merged it back meanwhile, its changes simply go out again later).
            let frozen = self.frozen_bitmap().await;
            if replica_applied >= next {
                // The acknowledgement was lost but the replica has it: finish the cycle.
                if let Some(f) = frozen {
                    let _ = nodes.commit_cycle(tag, &self.nodes(), f).await;
                }
                let _ = std::fs::remove_file(&path);
                return Ok((next, 0));
            }
            let resume = partial.filter(|(s, _)| *s == next).map(|(_, r)| r);
            let total = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            let sent = self
                .send(&path, (next, n), total, resume, "resumed transfer")
                .await;
            return self.settle(&path, next, frozen, sent).await;
        }
        // Bring the bitmaps back to one recording bitmap (after a daemon restart, say). Log
        // numbers and bitmap numbers need not match: a rolled-back cycle merges its frozen
        // bitmap into the next one, so the recording bitmap can be ahead of log n. At most one
        // cycle is in flight, so a frozen bitmap is always that of log n+1.
        let staging = self.staging.dir.as_path();
        let bitmap = match nodes
            .reconcile(tag, &self.tracked_nodes(), Some(staging), |_| {
                replica_applied > n
            })
            .await
        {
            Ok(vmrepl_tracking::ReconcileOutcome::Ready { recording, .. }) => recording,
            Ok(vmrepl_tracking::ReconcileOutcome::ResyncRequired { reason }) => {
                return Err(CycleError::TrackingLost(reason))
            }
            Err(e) => {
                return Err(CycleError::Other(format!(
                    "cannot check change tracking: {e}"
                )))
            }
        };
        if replica_applied == next {
            // The replica made log n+1 durable, but this host died before it recorded the
            // acknowledgement: the reconcile above released its frozen bitmap; the cycle is done.
            return Ok((next, 0));
        }
        if replica_applied != n {
            return Err(CycleError::OutOfOrder(format!(
                "the replica has applied log {replica_applied} but this host expected {n}"
            )));
        }
        let frozen = self.freeze_guest().await;
        let (on_point, point) = tokio::sync::oneshot::channel();
        if !self.fresh.is_empty() {
            tracing::info!(target: "vmrepl::replication", vm = %self.vm.uuid, seq = next, disks = ?self.fresh, "this log carries the initial copy of disks new to the replica");
        }
        let begin = nodes.begin_cycle(
            tag,
            &self.disks,
            &self.fresh,
            bitmap,
            &self.staging,
            self.vars,
            Some(on_point),
        );
        // Thaw a frozen guest the moment the transaction has taken the point (or failed),
        // while the backup jobs go on copying.
        let guest = &self.guest;
        let thaw = async move {
            if let Some(f) = frozen {
                let _ = point.await;
                guest.thaw(f).await;
            }
        };
        let h = tokio::join!(begin, thaw).0.map_err(|e| {
            if e.needs_resync() {
                CycleError::TrackingLost(e.to_string())
            } else {
                CycleError::Other(format!("cannot stage the changes: {e}"))
            }
        })?;
        crate::faults::crash_point(crate::faults::CrashPoint::PrimaryAfterTransaction);
        let (built, sent) = self
            .build_and_send(&h, &path, (next, n), LogKind::Delta, None, "delta")
            .await;
        let _ = h.remove_files();
        if let Err(e) = built {
            let _ = nodes.rollback_cycle(tag, &self.nodes(), bitmap).await;
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        let settled = self.settle(&path, next, Some(bitmap), sent).await;
        self.fresh_carried = settled.is_ok() && !self.fresh.is_empty();
        settled
    }

    /// The relationship's frozen bitmap, if any (that of a log whose transfer was cut).
    async fn frozen_bitmap(&self) -> Option<u64> {
        let owned = self
            .endpoint
            .list_owned(self.tag, &self.nodes())
            .await
            .ok()?;
        owned
            .values()
            .flatten()
            .filter(|b| !b.recording)
            .map(|b| b.seq)
            .min()
    }

    /// For an app-consistent point: freezes the guest through its agent and returns it to
    /// be thawed. A VM that is off has nothing to freeze, and its point stays crash-consistent;
    /// a running guest that cannot be frozen gives a crash-consistent point too, and the
    /// failure is recorded (Hyper-V's count of app-consistent failures).
    async fn freeze_guest(&mut self) -> Option<G::Frozen> {
        if self.consistency != vmrepl_log::Consistency::AppConsistent {
            return None;
        }
        if !self.endpoint.live() {
            self.consistency = vmrepl_log::Consistency::Crash;
            return None;
        }
        match self.guest.freeze().await {
            Ok((frozen, n)) => {
                self.app_freeze = Some(Ok(n));
                Some(frozen)
            }
            Err(e) => {
                self.consistency = vmrepl_log::Consistency::Crash;
                self.app_freeze = Some(Err(format!(
                    "The guest of VM {} could not be frozen for an app-consistent point, so the point is crash-consistent: {e}. Check that the QEMU guest agent runs in the guest.",
                    self.vm.name
                )));
                None
            }
        }
    }

    /// Settles the frozen `bitmap` of log `next` once it was sent: on the
    /// replica's acknowledgement it is dropped (I1); a cut transfer keeps both the log and the
    /// bitmap so that the next cycle resumes it; any other failure merges the bitmap back.
    async fn settle(
        &mut self,
        path: &Path,
        next: u64,
        bitmap: Option<u64>,
        sent: Result<u64, CycleError>,
    ) -> Result<(u64, u64), CycleError> {
        let (nodes, tag) = (self.endpoint, self.tag);
        match sent {
            Ok(bytes) => {
                crate::faults::crash_point(crate::faults::CrashPoint::PrimaryAfterAck);
                if let Some(b) = bitmap {
                    nodes
                        .commit_cycle(tag, &self.nodes(), b)
                        .await
                        .map_err(|e| CycleError::Other(e.to_string()))?;
                }
                let _ = std::fs::remove_file(path);
                Ok((next, bytes))
            }
            Err(CycleError::Network(m)) => Err(CycleError::Network(m)),
            Err(e) => {
                if let Some(b) = bitmap {
                    let _ = nodes.rollback_cycle(tag, &self.nodes(), b).await;
                }
                let _ = std::fs::remove_file(path);
                Err(e)
            }
        }
    }

    /// What a log of this cycle is about: the VM, the relationship and the point's kind.
    fn spec(&self) -> (&'a VmDefinition, &'a Relationship, vmrepl_log::Consistency) {
        (self.vm, self.rel, self.consistency)
    }

    /// Encodes log `seq` (on `base`) and streams it to the replica while it is being encoded, so
    /// that reading the disks, encoding, TLS and the replica's receiving overlap; nothing is
    /// written on this host. Only when the transfer is cut (a network failure) is the log encoded
    /// again, whole, into `path`, from the same point in time (the exports or staging images are
    /// still there, and encoding is deterministic): the next cycle resumes the transfer from
    /// that file. Returns the build's outcome (the log's size) and the transfer's (the bytes
    /// sent once the replica acknowledged it). A build that fails abandons the transfer.
    /// (Initial copies and resynchronizations start over instead, so they keep nothing.)
    pub(crate) async fn build_and_send(
        &mut self,
        h: &vmrepl_tracking::CycleHandle,
        path: &Path,
        (seq, base): (u64, u64),
        kind: LogKind,
        digests: Option<&Digests>,
        what: &str,
    ) -> (Result<u64, CycleError>, Result<u64, CycleError>) {
        let (tx, rx) = tokio::sync::watch::channel(LogGrowth::default());
        let (chunks_tx, chunks) = tokio::sync::mpsc::channel(4);
        let spec = self.spec();
        let reader = self.endpoint.reader();
        let build = build_log(
            spec,
            h,
            &reader,
            LogOut::Stream(chunks_tx),
            (seq, base),
            kind,
            digests,
            Some(tx),
        );
        let t0 = std::time::Instant::now();
        let sink = self.progress;
        let watch = rx.clone();
        // A resynchronization by compare shows how far the compare is (identical stretches
        // send nothing, so it is published as the encoder moves, not as bytes go out).
        let compare = |g: &LogGrowth| {
            let secs = t0.elapsed().as_secs_f64().max(0.001);
            *crate::locks::unpoisoned(sink) = Some(Progress {
                what: format!("{what}: comparing with the replica"),
                bytes_done: g.compared,
                bytes_total: g.compare_total,
                rate_bytes_per_sec: g.compared as f64 / secs,
                blocks_differing: Some(g.differing_blocks),
            });
        };
        let progress = |done: u64| {
            let g = *watch.borrow();
            if g.compare_total > 0 {
                return compare(&g);
            }
            let secs = t0.elapsed().as_secs_f64().max(0.001);
            *crate::locks::unpoisoned(sink) = Some(Progress {
                what: what.to_string(),
                bytes_done: done,
                bytes_total: g.written.max(done),
                rate_bytes_per_sec: done as f64 / secs,
                blocks_differing: None,
            });
        };
        let mut encoder = rx.clone();
        let compare_progress = async {
            while encoder.changed().await.is_ok() {
                let g = *encoder.borrow_and_update();
                if g.compare_total > 0 {
                    compare(&g);
                }
            }
        };
        let uuid = self.vm.uuid;
        let send = self
            .client
            .send_log_stream(uuid, (seq, base), chunks, rx, progress);
        let (built, sent, ()) = tokio::join!(build, send, compare_progress);
        tracing::info!(target: "vmrepl::replication", seq, ms = t0.elapsed().as_millis() as u64, "log built, sent and acknowledged");
        let sent = match (&built, sent) {
            // A cut transfer stops the encoder too (it has nowhere to write): the network
            // failure is what happened.
            (_, Err(e)) => Err(classify(e)),
            (Err(_), Ok(_)) => Err(CycleError::Other("the log could not be built".into())),
            (Ok(total), Ok(r)) => acked(r, seq, *total),
        };
        if kind == LogKind::Delta && matches!(sent, Err(CycleError::Network(_))) {
            // Keep the whole log for resuming the cut transfer.
            let kept = build_log(
                spec,
                h,
                &reader,
                LogOut::File(path.to_path_buf()),
                (seq, base),
                kind,
                digests,
                None,
            )
            .await;
            if let Ok(total) = kept {
                self.release(h, seq).await;
                return (Ok(total), sent);
            } else {
                // Without a whole local copy there is nothing to resume: the cycle fails as a
                // whole (its bitmap is merged back) and the next one starts over.
                let _ = std::fs::remove_file(path);
                let sent = match sent {
                    Err(CycleError::Network(m)) => Err(CycleError::Other(format!(
                        "{m}; the log could not be kept for a resume either"
                    ))),
                    other => other,
                };
                self.release(h, seq).await;
                return (built, sent);
            }
        }
        self.release(h, seq).await;
        (built, sent)
    }

    /// Pull mode: the point in time is in the log now; let QEMU drop it (the frozen bitmap
    /// stays until the replica acknowledges the log).
    pub(crate) async fn release(&self, h: &vmrepl_tracking::CycleHandle, seq: u64) {
        if let Err(e) = self.endpoint.release_exports(h).await {
            tracing::warn!(target: "vmrepl::replication", seq, error = %e, "cannot release the NBD exports");
        }
    }

    /// Streams log `seq` (on `base`) from `path`, from the resume point if any, publishing
    /// progress; returns the bytes sent once the replica acknowledged it.
    async fn send(
        &mut self,
        path: &Path,
        (seq, base): (u64, u64),
        total: u64,
        resume: Option<Resume>,
        what: &str,
    ) -> Result<u64, CycleError> {
        let from = resume.map(|r| r.bytes).unwrap_or(0);
        let t0 = std::time::Instant::now();
        let sink = self.progress;
        let progress = |done: u64| {
            let secs = t0.elapsed().as_secs_f64().max(0.001);
            *crate::locks::unpoisoned(sink) = Some(Progress {
                what: what.to_string(),
                bytes_done: from + done,
                bytes_total: total,
                rate_bytes_per_sec: done as f64 / secs,
                blocks_differing: None,
            });
        };
        let r = self
            .client
            .send_log(self.vm.uuid, (seq, base), resume, path, progress)
            .await
            .map_err(classify)?;
        acked(r, seq, total.saturating_sub(from))
    }
}

/// The replica's answer to log `seq`: `bytes` sent once it acknowledged the log.
pub(crate) fn acked(r: PeerResponse, seq: u64, bytes: u64) -> Result<u64, CycleError> {
    match r {
        PeerResponse::LogAck { sequence, .. } if sequence == seq => Ok(bytes),
        PeerResponse::Refused { code, message } => {
            Err(classify(crate::peer::client::PeerError::Refused {
                code,
                message,
            }))
        }
        other => Err(CycleError::Other(format!(
            "unexpected answer to log {seq}: {other:?}"
        ))),
    }
}
