//! The data plane: boot files and logs arrive as frames, go to the spool while a verifier
//! thread checks them, and are acknowledged only once durable and verified (I4).

use super::spool_file::SpoolFile;
use super::Refusal;
use crate::host::Host;
use crate::peer::proto::{PeerResponse, RefusalCode, Resume};
use crate::peer_server::free_bytes;
use crate::peer_server::live_replica;
use crate::peer_server::refuse;
use crate::peer_server::Conn;
use crate::peer_server::T;
use crate::replica::{self, ReplicaRow};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::AsyncWriteExt;
use uuid::Uuid;
use vmrepl_transport::frame::{self, Frame, FrameError};

/// Receives a boot file of a replica VM into its store (`boot/`), verified by size and
/// BLAKE3 before it replaces the one kept there. No lock is held while the bytes arrive.
pub(super) async fn put_boot_file(
    daemon: &Arc<Host>,
    peer: &str,
    framed: &mut Conn,
    vm_uuid: Uuid,
    file: crate::peer::proto::BootFile,
    (size, digest): (u64, String),
) -> Result<Option<PeerResponse>, FrameError> {
    let wanted = live_replica(daemon, peer, vm_uuid).and_then(|r| {
        if size > crate::peer::proto::MAX_BOOT_FILE_BYTES {
            Err(refuse(
                RefusalCode::BadRequest,
                format!(
                    "a boot file of {size} bytes is larger than the {} bytes a replica keeps",
                    crate::peer::proto::MAX_BOOT_FILE_BYTES
                ),
            ))
        } else if r.definition.kernel.is_none() {
            Err(refuse(
                RefusalCode::BadRequest,
                format!(
                    "VM {} does not boot a kernel directly; it has no boot files",
                    r.name
                ),
            ))
        } else {
            Ok(r)
        }
    });
    let row = match wanted {
        Ok(r) => r,
        Err(r) => {
            drain(framed).await?;
            return Ok(Some(r.into()));
        }
    };
    let boot = replica::vm_dir(&row).join("boot");
    let tmp = boot.join(format!("{}.{}.tmp", file.file_name(), Uuid::new_v4()));
    let created = crate::fsutil::create_private_dir_all(&boot).and(
        tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .await,
    );
    let mut out = match created {
        Ok(f) => f,
        Err(e) => {
            drain(framed).await?;
            return Ok(Some(
                refuse(RefusalCode::Internal, format!("{}: {e}", tmp.display())).into(),
            ));
        }
    };
    let mut hasher = blake3::Hasher::new();
    let mut got = 0u64;
    let mut failure: Option<Refusal> = None;
    loop {
        let data = match framed.read_frame().await {
            Ok(Frame::Data(d)) => d,
            Ok(Frame::Control(_)) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                return Err(FrameError::UnexpectedKind {
                    expected: frame::FrameKind::Data,
                    got: frame::FrameKind::Control,
                    len: 0,
                });
            }
            Err(e) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                return Err(e);
            }
        };
        if data.is_empty() {
            break;
        }
        if failure.is_some() {
            continue;
        }
        got += data.len() as u64;
        if got > size {
            failure = Some(refuse(
                RefusalCode::BadRequest,
                format!("the boot file is longer than the {size} bytes announced"),
            ));
            continue;
        }
        hasher.update(&data);
        if let Err(e) = out.write_all(&data).await {
            failure = Some(refuse(
                RefusalCode::Internal,
                format!("cannot write {}: {e}", tmp.display()),
            ));
        }
    }
    let synced = out.sync_all().await;
    drop(out);
    let hex = hasher.finalize().to_hex().to_string();
    let failure = failure.or_else(|| {
        if got != size || !hex.eq_ignore_ascii_case(&digest) {
            Some(refuse(
                RefusalCode::BadLog,
                format!(
                    "the {} of {} arrived with {got} bytes and digest {hex}, not the {size} bytes \
                     and digest {digest} announced; discarded",
                    file.file_name(),
                    row.name
                ),
            ))
        } else {
            synced
                .err()
                .map(|e| refuse(RefusalCode::Internal, format!("{}: {e}", tmp.display())))
        }
    });
    if let Some(f) = failure {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Ok(Some(f.into()));
    }
    let lock = daemon.replica_locks.vm(&replica::vm_dir(&row));
    let _g = lock.lock().await;
    let placed = replica::place_boot_file(&boot, file, &tmp, &hex);
    if let Err(e) = placed {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Ok(Some(refuse(RefusalCode::Internal, e).into()));
    }
    tracing::info!(target: T, peer, vm = %vm_uuid, file = file.file_name(), bytes = size, "boot file kept");
    Ok(Some(PeerResponse::Ok))
}

/// Reads and discards Data frames up to the empty one.
pub(super) async fn drain(framed: &mut Conn) -> Result<(), FrameError> {
    loop {
        match framed.read_frame().await? {
            Frame::Data(d) if d.is_empty() => return Ok(()),
            Frame::Data(_) => {}
            Frame::Control(_) => {
                return Err(FrameError::UnexpectedKind {
                    expected: frame::FrameKind::Data,
                    got: frame::FrameKind::Control,
                    len: 0,
                })
            }
        }
    }
}

/// Largest log accepted for a VM: its disks' total size plus 1/8 for record overhead, plus
/// room for the NVRAM and the header.
pub(super) fn size_cap(row: &ReplicaRow) -> u64 {
    let total: u64 = row.definition.disks.iter().map(|d| d.size_bytes).sum();
    total
        .saturating_add(total / 8)
        .saturating_add(crate::peer::proto::MAX_NVRAM_BYTES)
        .saturating_add(1 << 20)
}

#[allow(clippy::too_many_arguments)]
pub(super) async fn send_log(
    daemon: &Arc<Host>,
    peer: &str,
    framed: &mut Conn,
    vm_uuid: Uuid,
    seq: u64,
    base: u64,
    resume: Option<Resume>,
) -> Result<Option<PeerResponse>, FrameError> {
    let row = match live_replica(daemon, peer, vm_uuid) {
        Ok(r) => r,
        Err(r) => {
            drain(framed).await?;
            return Ok(Some(r.into()));
        }
    };
    let dir = replica::vm_dir(&row);
    let lock = daemon.replica_locks.vm(&dir);
    // Logs received before but not applied (an apply that failed) go first. The VM's lock is
    // held for local work only, never while this host waits on the network (the frames below
    // arrive with no lock held), so a primary that stalls mid-log blocks no failover.
    let applied = {
        let _g = lock.lock().await;
        replica::apply_and_record(daemon, &row).await
    };
    let last = match applied {
        Ok(l) => l,
        Err(e) => {
            drain(framed).await?;
            let code = if e.is_disk_full() {
                RefusalCode::DiskFull
            } else {
                RefusalCode::Internal
            };
            return Ok(Some(
                refuse(
                    code,
                    format!("the replica of {} cannot apply its logs: {e}", row.name),
                )
                .into(),
            ));
        }
    };
    if seq <= last {
        drain(framed).await?;
        tracing::info!(target: T, peer, vm = %vm_uuid, seq, last_applied = last, "log already applied; acknowledged again");
        return Ok(Some(PeerResponse::LogAck {
            sequence: seq,
            bytes: 0,
        }));
    }
    if base != last {
        drain(framed).await?;
        let msg = format!(
            "replica of {} has applied {last}, log {seq} builds on {base}; resynchronization \
             required",
            row.name
        );
        let db = daemon.db();
        let _ = replica::change(
            &db,
            vm_uuid,
            crate::lifecycle::ReplicaEvent::OutOfOrderRefused,
            Some(&msg),
            crate::db::ReplicaUpdate::None,
        );
        return Ok(Some(refuse(RefusalCode::OutOfOrder, msg).into()));
    }
    // One transfer per VM at a time. A transfer cut without a close holds its slot only until
    // its next frame is overdue (`Framed`'s deadline); the primary resumes after that.
    let slot = daemon.replica_locks.receive_slot(&dir);
    let Ok(_receiving) = slot.try_lock() else {
        drain(framed).await?;
        return Ok(Some(
            refuse(
                RefusalCode::Internal,
                format!(
                    "another transfer of a log of {} is still in progress here; it ends when it \
                     completes or its connection times out ({} s), then send again",
                    row.name,
                    framed.timeout().as_secs()
                ),
            )
            .into(),
        ));
    };
    let path = vmrepl_store::spool::partial_path(&dir, seq);
    let t0 = std::time::Instant::now();
    // The initial copy of a replica that holds nothing yet is applied in place as it arrives.
    let how = receive_mode(framed, &row, (seq, base, last), resume).await?;
    let (received, verified, streamed) = match how {
        Mode::InPlace { ahead, vm } => match receive_in_place(framed, &row, seq, ahead, *vm).await?
        {
            Ok((n, h, a)) => (n, Some(Ok(h)), Some(a)),
            Err(r) => return Ok(Some(r.into())),
        },
        Mode::Spool { ahead } => match receive(framed, &row, &path, resume, ahead).await? {
            Ok((n, verified)) => (n, Some(verified), None),
            Err(r) => return Ok(Some(r.into())),
        },
    };
    let receive_ms = t0.elapsed().as_millis() as u64;
    let g = lock.lock().await;
    // The replica may have failed over, or been removed, while the log arrived.
    let current = live_replica(daemon, peer, vm_uuid).and_then(|r| {
        if r.relationship != row.relationship {
            Err(refuse(
                RefusalCode::Conflict,
                format!(
                    "the replica of {} was replaced while log {seq} arrived",
                    r.name
                ),
            ))
        } else {
            Ok(r)
        }
    });
    let row = match current {
        Ok(r) => r,
        Err(r) => {
            let _ = tokio::fs::remove_file(&path).await;
            return Ok(Some(r.into()));
        }
    };
    // Verified whole (I4) and durable under its verified name (I1) before the acknowledgement;
    // an initial copy applied in place is verified whole and committed already.
    let accepted = match (streamed, verified) {
        (Some(_), _) => Ok(()),
        (None, verified) => replica::accept_spooled(&row, seq, base, None, verified).await,
    };
    match accepted {
        Ok(()) => {}
        Err(replica::Unaccepted::Bad(reason)) => {
            return Ok(Some(
                refuse(
                    RefusalCode::BadLog,
                    format!(
                        "log {seq} of {} failed verification and was discarded: {reason}",
                        row.name
                    ),
                )
                .into(),
            ))
        }
        Err(replica::Unaccepted::NotDurable(e)) => {
            return Ok(Some(
                refuse(
                    RefusalCode::Internal,
                    format!("cannot make log {seq} of {} durable: {e}", row.name),
                )
                .into(),
            ))
        }
    }
    {
        let db = daemon.db();
        let _ = db.record_received(vm_uuid, received);
    }
    drop(g);
    crate::faults::crash_point(crate::faults::CrashPoint::ReplicaBeforeAck);
    tracing::info!(target: T, peer, vm = %vm_uuid, seq, bytes = received, receive_ms,
        accept_ms = t0.elapsed().as_millis() as u64 - receive_ms, "log durable and verified");
    framed
        .write_control(&PeerResponse::LogAck {
            sequence: seq,
            bytes: received,
        })
        .await?;
    // Apply now; the next log of this VM waits for it at its start (the VM's lock).
    let _g = lock.lock().await;
    let _ = replica::apply_verified(daemon, &row, seq, streamed).await;
    Ok(None)
}

/// Feeds received bytes to a verifier on a blocking thread: a [`std::io::Read`] over a channel
/// of frames, so the log is checked whole while it arrives instead of re-read afterwards.
pub(super) struct Incoming {
    rx: tokio::sync::mpsc::Receiver<Vec<u8>>,
    cur: Vec<u8>,
    pos: usize,
}

impl Incoming {
    pub(super) fn new(rx: tokio::sync::mpsc::Receiver<Vec<u8>>) -> Incoming {
        Incoming {
            rx,
            cur: Vec::new(),
            pos: 0,
        }
    }
}

impl std::io::Read for Incoming {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.cur.len() {
            match self.rx.blocking_recv() {
                Some(v) => {
                    self.cur = v;
                    self.pos = 0;
                }
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len() - self.pos);
        buf[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Starts verifying log `path` as it is received: the `held` bytes already in the file (a
/// resumed transfer) first, then whatever is sent on the returned channel until it closes.
pub(super) fn start_verifier(
    path: &Path,
    held: u64,
) -> (
    tokio::sync::mpsc::Sender<Vec<u8>>,
    tokio::task::JoinHandle<replica::Verified>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let path = path.to_path_buf();
    let task = tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let incoming = Incoming::new(rx);
        // The received frames are in memory already: only the file prefix needs a buffer.
        let prefix: Box<dyn Read + Send> = if held > 0 {
            match std::fs::File::open(&path) {
                Ok(f) => Box::new(std::io::BufReader::new(f.take(held))),
                Err(e) => return Err(format!("{}: {e}", path.display())),
            }
        } else {
            Box::new(std::io::empty())
        };
        vmrepl_log::verify_reader(prefix.chain(incoming))
            .map(|(h, _)| h)
            .map_err(|e| e.to_string())
    });
    (tx, task)
}

/// How a log is received.
pub(super) enum Mode {
    /// Into its spool file, verified on the way, applied once acknowledged.
    Spool { ahead: Ahead },
    /// An initial copy applied in place as it arrives ([`replica::apply_initial_in_place`]),
    /// into the replica as opened to decide so.
    InPlace {
        ahead: Ahead,
        vm: Box<vmrepl_store::ReplicaVm>,
    },
}

/// Data frames read ahead of the receive loop (to see the log's header), in order.
pub(super) type Ahead = std::collections::VecDeque<Vec<u8>>;

/// Chooses how log `seq` on `base` is received. Log 1 on 0, sent whole to a replica that
/// awaits its initial copy with nothing received, is applied in place when its header (read
/// ahead from the first frames) says it is that initial copy; everything else goes to the
/// spool (a resumed transfer too: it continues a partial spool file).
async fn receive_mode(
    framed: &mut Conn,
    row: &ReplicaRow,
    (seq, base, last): (u64, u64, u64),
    resume: Option<Resume>,
) -> Result<Mode, FrameError> {
    let candidate = if resume.is_none() && (seq, base, last) == (1, 0, 0) {
        let (root, uuid) = (row.storage_root.clone(), row.vm_uuid);
        tokio::task::spawn_blocking(move || replica::open_for_in_place(&root, uuid))
            .await
            .ok()
            .flatten()
    } else {
        None
    };
    let mut ahead = Ahead::new();
    let Some(vm) = candidate else {
        return Ok(Mode::Spool { ahead });
    };
    let mut head = Vec::new();
    let header = loop {
        let data = next_data(framed, &mut ahead).await?;
        let end = data.is_empty();
        if head.len() <= vmrepl_log::MAX_HEADER_LEN as usize {
            head.extend_from_slice(&data);
        }
        ahead.push_back(data);
        if end {
            break None;
        }
        match vmrepl_log::peek_header(&head) {
            Some(h) => break h.ok(),
            None if head.len() > vmrepl_log::MAX_HEADER_LEN as usize => break None,
            None => {}
        }
    };
    let initial = header.is_some_and(|h| {
        h.kind == vmrepl_log::LogKind::Initial
            && (h.sequence, h.base_sequence) == (1, 0)
            && h.vm_id == row.vm_uuid
    });
    if initial {
        // Nothing of an earlier, cut transfer of this log is resumed: drop its partial file.
        let dir = replica::vm_dir(row);
        let _ = tokio::fs::remove_file(vmrepl_store::spool::partial_path(&dir, seq)).await;
        return Ok(Mode::InPlace {
            ahead,
            vm: Box::new(vm),
        });
    }
    Ok(Mode::Spool { ahead })
}

/// The next Data frame: one read ahead, else the connection's.
async fn next_data(framed: &mut Conn, ahead: &mut Ahead) -> Result<Vec<u8>, FrameError> {
    if let Some(d) = ahead.pop_front() {
        return Ok(d);
    }
    match framed.read_frame().await? {
        Frame::Data(d) => Ok(d),
        Frame::Control(_) => Err(FrameError::UnexpectedKind {
            expected: frame::FrameKind::Data,
            got: frame::FrameKind::Control,
            len: 0,
        }),
    }
}

/// The checks every received piece of a log passes before it is kept: the log stays within
/// what the VM can need, and the replica storage keeps room (looked at every 64 MiB).
struct Room<'a> {
    row: &'a ReplicaRow,
    cap: u64,
    /// Where the bytes go (the spool file, or the replica's folder), for the messages.
    place: &'a Path,
    dir: &'a Path,
    since_check: u64,
}

impl<'a> Room<'a> {
    fn new(row: &'a ReplicaRow, place: &'a Path, dir: &'a Path) -> Room<'a> {
        Room {
            row,
            cap: size_cap(row),
            place,
            dir,
            since_check: u64::MAX,
        }
    }

    /// Whether `n` more bytes after `size` may be kept; the refusal otherwise.
    fn admit(&mut self, size: u64, n: u64) -> Result<(), Refusal> {
        if size + n > self.cap {
            return Err(refuse(
                RefusalCode::BadLog,
                format!(
                    "log is larger than {} bytes, more than VM {} can need; refused",
                    self.cap, self.row.name
                ),
            ));
        }
        if self.since_check >= 64 << 20 {
            self.since_check = 0;
            let free = free_bytes(self.dir).unwrap_or(u64::MAX);
            let needed = (64u64 << 20).saturating_add(vmrepl_store::SPACE_HEADROOM);
            if free < needed {
                return Err(refuse(
                    RefusalCode::DiskFull,
                    format!(
                        "{}: needed {needed} bytes, free {free} bytes on the replica storage",
                        self.place.display()
                    ),
                ));
            }
        }
        self.since_check += n;
        Ok(())
    }
}

/// Receives an initial copy applied in place as it arrives (see [`Mode::InPlace`]). Returns the
/// bytes received and the log, verified whole and committed, or a refusal (the frames drained).
/// A cut connection returns its error once the apply stopped (what it wrote is cleared by the
/// next initial copy).
async fn receive_in_place(
    framed: &mut Conn,
    row: &ReplicaRow,
    seq: u64,
    mut ahead: Ahead,
    vm: vmrepl_store::ReplicaVm,
) -> Result<Result<(u64, vmrepl_log::LogHeader, replica::Applied), Refusal>, FrameError> {
    let dir = replica::vm_dir(row);
    let mut room = Room::new(row, &dir, &dir);
    let mut size = 0u64;
    let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(8);
    let applier = {
        let root = row.storage_root.clone();
        tokio::task::spawn_blocking(move || {
            replica::apply_initial_in_place(&root, vm, Incoming::new(rx))
        })
    };
    let mut tx = Some(tx);
    let mut failure: Option<Refusal> = None;
    loop {
        let data = match next_data(framed, &mut ahead).await {
            Ok(d) => d,
            Err(e) => {
                // A cut transfer: the slot is free once the applier stopped.
                drop(tx);
                let _ = applier.await;
                return Err(e);
            }
        };
        if data.is_empty() {
            break;
        }
        if failure.is_some() {
            continue;
        }
        let n = data.len() as u64;
        if let Err(r) = room.admit(size, n) {
            failure = Some(r);
            // The applier stops at the end of what it got (its outcome is not used).
            tx = None;
            continue;
        }
        size += n;
        crate::faults::crash_point(crate::faults::CrashPoint::ReplicaReceiving);
        if let Some(t) = &tx {
            if t.send(data).await.is_err() {
                // The applier stopped: its outcome says why.
                tx = None;
            }
        }
    }
    drop(tx);
    let outcome = applier.await;
    let bad = |reason: String| {
        refuse(
            RefusalCode::BadLog,
            format!(
                "log {seq} of {} failed verification and was discarded: {reason}",
                row.name
            ),
        )
    };
    let refusal = match (failure, outcome) {
        (Some(f), _) => f,
        (None, Ok(replica::InPlace::Applied(h, a))) => return Ok(Ok((size, h, a))),
        (None, Ok(replica::InPlace::Bad(reason))) => bad(reason),
        (None, Ok(replica::InPlace::Store(e))) => refuse(
            if e.is_disk_full() {
                RefusalCode::DiskFull
            } else {
                RefusalCode::Internal
            },
            format!(
                "the initial copy of {} could not be applied as it arrived: {e}; nothing was \
                 acknowledged, and the primary sends a new initial copy",
                row.name
            ),
        ),
        (None, Err(e)) => refuse(
            RefusalCode::Internal,
            format!("the apply of the initial copy of {} failed: {e}", row.name),
        ),
    };
    Ok(Err(refusal))
}

/// Receives the Data frames of a log into its partial spool file `path` (fresh, or appended to
/// a partial file cut to `resume.bytes`), verifying it on the way. Returns the file's size and
/// the verification's outcome. A refusal has drained the frames already. The file is fsynced
/// here; [`vmrepl_store::spool::accept`] gives it its verified name after verification.
pub(super) async fn receive(
    framed: &mut Conn,
    row: &ReplicaRow,
    path: &PathBuf,
    resume: Option<Resume>,
    mut ahead: Ahead,
) -> Result<Result<(u64, replica::Verified), Refusal>, FrameError> {
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let opened: Result<(SpoolFile, u64), Refusal> = async {
        match resume {
            Some(r) => {
                let p = path.clone();
                let held = tokio::task::spawn_blocking(move || {
                    std::fs::File::open(&p)
                        .map_err(|e| e.to_string())
                        .and_then(|f| {
                            vmrepl_log::scan_valid_prefix(std::io::BufReader::new(f))
                                .map_err(|e| e.to_string())
                        })
                        .map(|v| v.bytes)
                })
                .await
                .unwrap_or_else(|e| Err(e.to_string()));
                match held {
                    Ok(b) if b >= r.bytes && r.bytes > 0 => {}
                    Ok(b) => {
                        return Err(refuse(
                            RefusalCode::BadRequest,
                            format!(
                            "cannot resume log at byte {}: the replica holds {b} valid bytes of \
                                 it; ask ReplicaState again",
                            r.bytes
                        ),
                        ))
                    }
                    Err(e) => {
                        return Err(refuse(
                            RefusalCode::BadRequest,
                            format!("cannot resume: no partial log here ({e}); send it whole"),
                        ))
                    }
                }
                let f = tokio::fs::OpenOptions::new()
                    .write(true)
                    .open(path)
                    .await
                    .map_err(|e| refuse(RefusalCode::Internal, e.to_string()))?;
                f.set_len(r.bytes)
                    .await
                    .map_err(|e| refuse(RefusalCode::Internal, e.to_string()))?;
                let mut f = f;
                use tokio::io::AsyncSeekExt;
                f.seek(std::io::SeekFrom::Start(r.bytes))
                    .await
                    .map_err(|e| refuse(RefusalCode::Internal, e.to_string()))?;
                Ok((SpoolFile::buffered(f, path), r.bytes))
            }
            None => SpoolFile::create(path)
                .await
                .map(|f| (f, 0))
                .map_err(|e| refuse(RefusalCode::Internal, format!("{}: {e}", path.display()))),
        }
    }
    .await;
    let (mut file, mut size) = match opened {
        Ok(x) => x,
        Err(r) => {
            drain(framed).await?;
            return Ok(Err(r));
        }
    };
    let (verify_tx, verifier) = start_verifier(path, size);
    let mut verify_tx = Some(verify_tx);
    let mut failure: Option<Refusal> = None;
    let mut room = Room::new(row, path, &dir);
    loop {
        let data = match next_data(framed, &mut ahead).await {
            Ok(d) => d,
            Err(e) => {
                // A cut transfer: keep what arrived for a resume.
                let _ = file.finish().await;
                return Err(e);
            }
        };
        if data.is_empty() {
            break;
        }
        if failure.is_some() {
            continue;
        }
        let n = data.len() as u64;
        if let Err(r) = room.admit(size, n) {
            failure = Some(r);
            continue;
        }
        if let Err(e) = file.write_all(&data).await {
            failure = Some(if vmrepl_store::spool::is_no_space(&e) {
                refuse(
                    RefusalCode::DiskFull,
                    format!(
                        "{}: needed {n} more bytes, free {} bytes",
                        path.display(),
                        free_bytes(&dir).unwrap_or(0)
                    ),
                )
            } else {
                refuse(
                    RefusalCode::Internal,
                    format!("cannot write {}: {e}", path.display()),
                )
            });
            continue;
        }
        size += n;
        crate::faults::crash_point(crate::faults::CrashPoint::ReplicaReceiving);
        if let Some(tx) = &verify_tx {
            if tx.send(data).await.is_err() {
                // The verifier stopped: the log is bad; its error comes out below.
                verify_tx = None;
            }
        }
    }
    drop(verify_tx);
    let checked = verifier
        .await
        .unwrap_or_else(|e| Err(format!("the verifier failed: {e}")));
    // Durable through the descriptors that wrote it ([`SpoolFile::finish`]); `spool::accept`
    // relies on this (I1).
    let flushed = file.finish().await;
    if let Some(f) = failure {
        if f.code == RefusalCode::BadLog {
            let _ = tokio::fs::remove_file(path).await;
        }
        return Ok(Err(f));
    }
    if let Err(e) = flushed {
        let code = if vmrepl_store::spool::is_no_space(&e) {
            RefusalCode::DiskFull
        } else {
            RefusalCode::Internal
        };
        return Ok(Err(refuse(
            code,
            format!(
                "cannot make {} durable: {e}; nothing was acknowledged",
                path.display()
            ),
        )));
    }
    Ok(Ok((size, checked)))
}
