//! The replica server's side: its rules for a log, its faults, and the disks it applies to.

use super::*;
use crate::peer::client::LogGrowth;
use crate::peer::client::PeerError;
use crate::peer::proto::{BootFile, DiskDigests};
use crate::peer::proto::{PeerResponse, RefusalCode, Resume};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use uuid::Uuid;
use vmrepl_log::LogHeader;
use vmrepl_types::VmDefinition;

/// The replica server's side of one replica VM.
pub(crate) struct ReplicaSide {
    pub(crate) vm: Uuid,
    pub(crate) last_applied: u64,
    pub(crate) failed_over: bool,
    /// What arrived of a cut log: (sequence, bytes), as held durably.
    pub(crate) partial: Option<(u64, Vec<u8>)>,
    /// Every log made durable, by sequence.
    pub(crate) logs: BTreeMap<u64, Vec<u8>>,
    /// The replica's disks as of its last applied log (the NVRAM under its id).
    pub(crate) disks: BTreeMap<String, Vec<u8>>,
    /// Answers `BlockDigests` (else refuses it).
    pub(crate) gives_digests: bool,
    /// Answers `RangeDigests` (else refuses it as a replica of an older release does).
    pub(crate) gives_range_digests: bool,
    /// Once the replica applied this log, every `RangeDigests` and `SendLog` finds the link
    /// cut (until cleared).
    pub(crate) link_lost_at: Option<u64>,
    /// The boot files it holds.
    pub(crate) boot: Vec<(BootFile, String)>,
    /// Every request, in order.
    pub(crate) requests: Vec<String>,
    /// What `ExpectImport` announced: (bytes, BLAKE3 hex).
    pub(crate) expected_import: Option<(u64, String)>,
    /// Faults. `unreachable` lasts until cleared; the others are used once.
    pub(crate) unreachable: bool,
    /// The transfer is cut once this many bytes of it arrived (zrepl's `PartialSender`).
    pub(crate) cut_after: Option<u64>,
    /// The log is made durable but the answer is lost (zrepl's `FailSendCompletedSender`).
    pub(crate) lose_ack: bool,
    /// The next log is refused with this code, after it was read.
    pub(crate) refuse: Option<RefusalCode>,
    /// The next log is answered with this, after it was read.
    pub(crate) answer: Option<PeerResponse>,
    /// The next `ReplicaState` is answered with this.
    pub(crate) state_answer: Option<PeerResponse>,
    /// The boot files cannot be sent.
    pub(crate) boot_files_fail: Option<String>,
}

impl ReplicaSide {
    fn link_lost(&self) -> bool {
        self.link_lost_at.is_some_and(|l| self.last_applied >= l)
    }
}

/// The replica server, scripted. Clones share one replica.
#[derive(Clone)]
pub(crate) struct FakeReplica {
    pub(crate) s: Arc<Mutex<ReplicaSide>>,
    journal: Journal,
}

fn lost() -> PeerError {
    PeerError::Connect {
        host: "replica.test".into(),
        addr: "replica.test:7443".into(),
        detail: "the connection was lost: injected".into(),
    }
}

fn refusal(code: RefusalCode, message: impl Into<String>) -> PeerResponse {
    PeerResponse::Refused {
        code,
        message: message.into(),
    }
}

impl FakeReplica {
    pub(crate) fn new(vm: Uuid, journal: &Journal) -> FakeReplica {
        FakeReplica {
            s: Arc::new(Mutex::new(ReplicaSide {
                vm,
                last_applied: 0,
                failed_over: false,
                partial: None,
                logs: BTreeMap::new(),
                disks: BTreeMap::new(),
                gives_digests: true,
                gives_range_digests: true,
                link_lost_at: None,
                boot: Vec::new(),
                requests: Vec::new(),
                expected_import: None,
                unreachable: false,
                cut_after: None,
                lose_ack: false,
                refuse: None,
                answer: None,
                state_answer: None,
                boot_files_fail: None,
            })),
            journal: journal.clone(),
        }
    }

    pub(crate) fn state(&self) -> std::sync::MutexGuard<'_, ReplicaSide> {
        self.s.lock().unwrap()
    }

    pub(crate) fn requests(&self) -> Vec<String> {
        self.state().requests.clone()
    }

    /// The records of log `seq` as (disk id, offset, length, zero).
    pub(crate) fn records(&self, seq: u64) -> Vec<(String, u64, u64, bool)> {
        let log = self.state().logs[&seq].clone();
        let r = vmrepl_log::LogReader::new(&log[..]).unwrap();
        let ids: Vec<String> = r.header().disks.iter().map(|d| d.id.clone()).collect();
        r.map(|x| {
            let x = x.unwrap();
            (
                ids[x.disk_index as usize].clone(),
                x.offset,
                u64::from(x.len()),
                matches!(x.content, vmrepl_log::Content::Zero(_)),
            )
        })
        .collect()
    }

    /// The header of log `seq`.
    pub(crate) fn header(&self, seq: u64) -> LogHeader {
        let log = self.state().logs[&seq].clone();
        vmrepl_log::LogReader::new(&log[..])
            .unwrap()
            .header()
            .clone()
    }

    /// Where a cut log resumes: the valid prefix of what arrived, if any.
    fn resume_point(bytes: &[u8]) -> Option<Resume> {
        let p = vmrepl_log::scan_valid_prefix(bytes).ok()?;
        (p.bytes > 0).then_some(Resume {
            records: p.records,
            bytes: p.bytes,
        })
    }

    /// A transfer of log `seq` on `base` delivered `data` (from `resume` on); `cut` when the
    /// connection went before its end. The replica server's rules for a log.
    fn receive(
        &self,
        (seq, base): (u64, u64),
        resume: Option<Resume>,
        data: Vec<u8>,
        cut: bool,
    ) -> Result<PeerResponse, PeerError> {
        let mut s = self.state();
        if cut {
            // No answer: what arrived is held, a prefix to resume from when it is the next log.
            if seq == s.last_applied + 1 && base == s.last_applied {
                let held = match (resume, s.partial.take()) {
                    (Some(r), Some((q, p))) if q == seq && p.len() as u64 >= r.bytes => {
                        p[..r.bytes as usize].to_vec()
                    }
                    _ => Vec::new(),
                };
                s.partial = Some((seq, [held, data].concat()));
            }
            drop(s);
            self.journal
                .push(format!("replica: log {seq} cut, its prefix held"));
            return Err(lost());
        }
        if seq <= s.last_applied {
            return Ok(PeerResponse::LogAck {
                sequence: seq,
                bytes: 0,
            });
        }
        if base != s.last_applied {
            return Ok(refusal(
                RefusalCode::OutOfOrder,
                format!(
                    "replica has applied {}, log {seq} builds on {base}; resynchronization required",
                    s.last_applied
                ),
            ));
        }
        let held = match (resume, &s.partial) {
            (None, _) => Vec::new(),
            (Some(r), Some((q, p))) if *q == seq && p.len() as u64 >= r.bytes && r.bytes > 0 => {
                p[..r.bytes as usize].to_vec()
            }
            (Some(r), _) => {
                return Ok(refusal(
                    RefusalCode::BadRequest,
                    format!("cannot resume log at byte {}: not held here", r.bytes),
                ))
            }
        };
        let whole = [held, data].concat();
        if let Some(a) = s.answer.take() {
            return Ok(a);
        }
        if let Some(code) = s.refuse.take() {
            s.partial = None;
            return Ok(refusal(code, "injected refusal"));
        }
        match vmrepl_log::verify_reader(&whole[..]) {
            Ok((h, _)) if h.vm_id == s.vm && h.sequence == seq && h.base_sequence == base => {}
            Ok((h, _)) => {
                return Ok(refusal(
                    RefusalCode::BadLog,
                    format!("header of another log: {h:?}"),
                ))
            }
            Err(e) => return Ok(refusal(RefusalCode::BadLog, e.to_string())),
        }
        // Durable, then applied.
        let bytes = whole.len() as u64;
        s.partial = None;
        apply(&mut s.disks, &whole);
        s.logs.insert(seq, whole);
        s.last_applied = seq;
        let lose = std::mem::take(&mut s.lose_ack);
        drop(s);
        self.journal.push(format!("replica: log {seq} durable"));
        if lose {
            return Err(lost());
        }
        Ok(PeerResponse::LogAck {
            sequence: seq,
            bytes,
        })
    }
}

/// Applies a verified log to `disks`.
fn apply(disks: &mut BTreeMap<String, Vec<u8>>, log: &[u8]) {
    let r = vmrepl_log::LogReader::new(log).unwrap();
    let info = r.header().disks.clone();
    for d in &info {
        disks
            .entry(d.id.clone())
            .or_default()
            .resize(d.virtual_size as usize, 0);
    }
    for rec in r {
        let rec = rec.unwrap();
        let disk = disks.get_mut(&info[rec.disk_index as usize].id).unwrap();
        let at = rec.offset as usize;
        match rec.content {
            vmrepl_log::Content::Data(b) => disk[at..at + b.len()].copy_from_slice(&b),
            vmrepl_log::Content::Zero(n) => disk[at..at + n as usize].fill(0),
        }
    }
}

impl ReplicaPeer for FakeReplica {
    async fn replica_state(&mut self, vm_uuid: Uuid) -> Result<PeerResponse, PeerError> {
        let mut s = self.state();
        s.requests.push("replica-state".into());
        assert_eq!(vm_uuid, s.vm);
        if s.unreachable {
            return Err(lost());
        }
        if let Some(a) = s.state_answer.take() {
            return Ok(a);
        }
        let partial = s
            .partial
            .as_ref()
            .filter(|(q, _)| *q == s.last_applied + 1)
            .and_then(|(q, p)| Some((*q, FakeReplica::resume_point(p)?)));
        Ok(PeerResponse::ReplicaState {
            last_applied: s.last_applied,
            partial,
            points: vec![],
            failed_over: s.failed_over,
            boot: s.boot.clone(),
        })
    }

    async fn block_digests(&mut self, _vm_uuid: Uuid) -> Result<PeerResponse, PeerError> {
        let mut s = self.state();
        s.requests.push("block-digests".into());
        if !s.gives_digests {
            return Err(PeerError::Refused {
                code: RefusalCode::BadRequest,
                message: "no digests here".into(),
            });
        }
        let disks = s
            .disks
            .iter()
            .filter(|(id, _)| *id != crate::peer::proto::NVRAM_DISK_ID)
            .map(|(id, data)| {
                let bs = vmrepl_store::block_size(data.len() as u64);
                let ds: Vec<[u8; 32]> = data
                    .chunks(bs as usize)
                    .map(|b| *blake3::hash(b).as_bytes())
                    .collect();
                DiskDigests::new(id.clone(), bs, &ds)
            })
            .collect();
        Ok(PeerResponse::BlockDigests { disks })
    }

    async fn range_digests(
        &mut self,
        _vm_uuid: Uuid,
        r: crate::peer::proto::DigestRange,
    ) -> Result<PeerResponse, PeerError> {
        let mut s = self.state();
        s.requests
            .push(format!("range-digests {} {}+{}", r.disk, r.offset, r.len));
        if s.unreachable || s.link_lost() {
            return Err(lost());
        }
        if !s.gives_range_digests {
            return Err(PeerError::Refused {
                code: RefusalCode::BadRequest,
                message: "unknown variant `range-digests`".into(),
            });
        }
        let data = s.disks.get(&r.disk).cloned().unwrap_or_default();
        let mut range = vec![0u8; r.len as usize];
        let from = (r.offset as usize).min(data.len());
        let to = ((r.offset + r.len) as usize).min(data.len());
        range[..to - from].copy_from_slice(&data[from..to]);
        let ds: Vec<[u8; 32]> = range
            .chunks(r.block_size as usize)
            .map(|b| *blake3::hash(b).as_bytes())
            .collect();
        Ok(PeerResponse::RangeDigests {
            digests: DiskDigests::new(r.disk, r.block_size, &ds),
        })
    }

    async fn expect_import(
        &mut self,
        _vm_uuid: Uuid,
        bytes: u64,
        blake3: String,
    ) -> Result<PeerResponse, PeerError> {
        let mut s = self.state();
        s.requests.push("expect-import".into());
        s.expected_import = Some((bytes, blake3));
        Ok(PeerResponse::Ok)
    }

    async fn send_boot_files(
        &mut self,
        _vm: &VmDefinition,
        _held: &[(BootFile, String)],
    ) -> Result<(), String> {
        let mut s = self.state();
        s.requests.push("boot-files".into());
        match s.boot_files_fail.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    async fn send_log_stream(
        &mut self,
        _vm_uuid: Uuid,
        (seq, base): (u64, u64),
        mut chunks: tokio::sync::mpsc::Receiver<Vec<u8>>,
        mut growth: tokio::sync::watch::Receiver<LogGrowth>,
        mut progress: impl FnMut(u64),
    ) -> Result<PeerResponse, PeerError> {
        let cut_after = {
            let mut s = self.state();
            s.requests.push(format!("send-log {seq} on {base}"));
            if s.link_lost() {
                return Err(lost());
            }
            s.cut_after.take()
        };
        let mut got = Vec::new();
        while let Some(chunk) = chunks.recv().await {
            got.extend_from_slice(&chunk);
            if let Some(n) = cut_after.filter(|n| got.len() as u64 >= *n) {
                // The connection goes: the encoder finds nobody to write to.
                got.truncate(n as usize);
                progress(n);
                return self.receive((seq, base), None, got, true);
            }
            progress(got.len() as u64);
        }
        let ok = growth
            .wait_for(|g| g.done.is_some())
            .await
            .map(|g| g.done == Some(true))
            .unwrap_or(false);
        if !ok {
            // Abandoned without the end frame: what arrived stays a partial log there.
            let _ = self.receive((seq, base), None, got, true);
            return Err(PeerError::Io {
                action: "build",
                path: PathBuf::from(format!("log {seq}")),
                source: std::io::Error::other("the log could not be encoded"),
            });
        }
        self.receive((seq, base), None, got, false)
    }

    async fn send_log(
        &mut self,
        _vm_uuid: Uuid,
        (seq, base): (u64, u64),
        resume: Option<Resume>,
        log_file: &Path,
        mut progress: impl FnMut(u64),
    ) -> Result<PeerResponse, PeerError> {
        let from = resume.map_or(0, |r| r.bytes);
        let cut_after = {
            let mut s = self.state();
            s.requests
                .push(format!("send-log {seq} on {base} from {from}"));
            s.cut_after.take()
        };
        let file = std::fs::read(log_file).map_err(|source| PeerError::Io {
            action: "read",
            path: log_file.to_path_buf(),
            source,
        })?;
        let mut data = file[from as usize..].to_vec();
        match cut_after.filter(|n| (data.len() as u64) > *n) {
            Some(n) => {
                data.truncate(n as usize);
                progress(n);
                self.receive((seq, base), resume, data, true)
            }
            None => {
                progress(data.len() as u64);
                self.receive((seq, base), resume, data, false)
            }
        }
    }
}
