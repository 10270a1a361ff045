//! Offline changes: a disk changed while its VM was off and outside vmrepl is caught before
//! vmrepl opens it again.
//!
//! Persistent dirty bitmaps only see writes made by a QEMU process that loaded them. A disk
//! replaced by a restore (`cp`, `qemu-img convert` over it), written as raw, or edited by a
//! tool that drops or ignores the bitmaps changes without a trace in them. So whenever vmrepl
//! closes a disk file itself (its VM's QEMU went away, or qemu-storage-daemon quit after a
//! cycle of a VM that is off) it records the file's [`DiskFingerprint`]: device, inode, size,
//! modification and status-change times in nanoseconds. Before it opens the file again (VM
//! start, a cycle of a VM that is off) it compares ([`judge`]). Any difference means the file
//! was touched by someone else: the relationship's change tracking cannot be trusted and it
//! takes the same event as lost tracking ([`PrimaryEvent::TrackingLost`]), with a cause that
//! names the VM, the disk file and what changed ([`cause`]). The resynchronization policy then
//! starts a resynchronization, which compares blocks and sends only the differing ones.
//!
//! The rule is conservative on purpose: an edit the bitmaps did see (`qemu-io` loads and
//! updates them) costs a resynchronization too, which sends only the blocks that differ. The
//! status-change time cannot be set back by any tool (`touch`, `cp -p` and `rsync -a` restore
//! the modification time, not it), so a restore that preserves times is caught as well. A
//! missing fingerprint (the first start after enabling, after an upgrade) is not a mismatch.
//! A QEMU that exited while the daemon was not running (a host shut down with its VMs
//! running) left its files unrecorded, and they may have been restored before the daemon came
//! back: a relationship that relies on tracking requires a resynchronization then too
//! ([`exited_unobserved`]).
//!
//! This is a base module: it reaches the database and the state machine, no flow.

use crate::db::{Db, DbError, DiskFingerprint, Marked, Relationship, StoredFingerprint};
use crate::lifecycle::PrimaryEvent;
use std::path::Path;
use uuid::Uuid;
use vmrepl_types::replication::ReplicationState;
use vmrepl_types::vm::DiskDef;
use vmrepl_types::VmDefinition;

/// Where this module logs.
const LOG_TARGET: &str = "vmrepl::replication";

/// The fingerprint of the file at `path` as it is now.
pub fn of(path: &Path) -> std::io::Result<DiskFingerprint> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path)?;
    let ns = |s: i64, n: i64| s.saturating_mul(1_000_000_000).saturating_add(n);
    Ok(DiskFingerprint {
        dev: m.dev(),
        ino: m.ino(),
        size: m.size(),
        mtime_ns: ns(m.mtime(), m.mtime_nsec()),
        ctime_ns: ns(m.ctime(), m.ctime_nsec()),
    })
}

/// One way a disk file differs from its recorded fingerprint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Another file is at the path now (copied or moved over it): device and inode, before
    /// and now.
    Replaced { from: (u64, u64), to: (u64, u64) },
    /// Its size changed (bytes).
    Size { from: u64, to: u64 },
    /// Its modification time changed (ns since the epoch).
    Modified { from: i64, to: i64 },
    /// Its status-change time changed (ns since the epoch): written, or its times set back.
    StatusChanged { from: i64, to: i64 },
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Change::Replaced { from, to } => write!(
                f,
                "it is another file now: device {} inode {}, was device {} inode {}",
                to.0, to.1, from.0, from.1
            ),
            Change::Size { from, to } => {
                write!(f, "its size changed from {from} to {to} bytes")
            }
            Change::Modified { from, to } => write!(
                f,
                "its modification time changed from {} to {}",
                utc(from),
                utc(to)
            ),
            Change::StatusChanged { from, to } => write!(
                f,
                "its status-change time changed from {} to {}",
                utc(from),
                utc(to)
            ),
        }
    }
}

/// Compares a disk file as it is `now` with what was `recorded` when vmrepl last closed it:
/// every difference, none when it is the same file untouched or nothing was recorded.
pub fn judge(recorded: Option<&DiskFingerprint>, now: &DiskFingerprint) -> Vec<Change> {
    let Some(r) = recorded else {
        return Vec::new();
    };
    let mut out = Vec::new();
    if (r.dev, r.ino) != (now.dev, now.ino) {
        out.push(Change::Replaced {
            from: (r.dev, r.ino),
            to: (now.dev, now.ino),
        });
    }
    if r.size != now.size {
        out.push(Change::Size {
            from: r.size,
            to: now.size,
        });
    }
    if r.mtime_ns != now.mtime_ns {
        out.push(Change::Modified {
            from: r.mtime_ns,
            to: now.mtime_ns,
        });
    }
    if r.ctime_ns != now.ctime_ns {
        out.push(Change::StatusChanged {
            from: r.ctime_ns,
            to: now.ctime_ns,
        });
    }
    out
}

/// The sentence that says the disk `path` of VM `vm` was changed while the VM was off, how,
/// and what vmrepl does about it.
pub fn cause(vm: &str, path: &Path, changes: &[Change]) -> String {
    let what: Vec<String> = changes.iter().map(|c| c.to_string()).collect();
    format!(
        "the disk {} of VM {vm} was modified while the VM was off, outside vmrepl ({}); \
         change tracking cannot see such a change, so the relationship needs a \
         resynchronization, which compares the disks block by block and sends only the \
         blocks that differ",
        path.display(),
        what.join("; ")
    )
}

/// The sentence that says the disk `path` of VM `vm` was replaced by another file (`change`,
/// a [`Change::Replaced`]) while QEMU had it open, and what vmrepl does about it.
pub fn cause_while_open(vm: &str, path: &Path, change: &Change) -> String {
    format!(
        "the disk {} of VM {vm} was replaced while QEMU had it open, outside vmrepl ({change}; \
         QEMU went on writing to the file it had opened, and the new one is what the VM \
         will see); change tracking cannot see such a change, so the relationship needs a \
         resynchronization, which compares the disks block by block and sends only the \
         blocks that differ",
        path.display()
    )
}

/// Whether the relationship, in `state`, relies on its bitmaps for the changes since the last
/// acknowledged log (`exported`: an initial copy went out on external media and bitmap 1
/// records since; `sweep`: a resynchronization in parts is recorded, whose ranges already
/// compared count on the bitmap for what changed in them since). An initial copy or a
/// resynchronization from the first range reads every block anyway, so a change before it
/// needs nothing more.
pub fn tracking_matters(state: ReplicationState, exported: bool, sweep: bool) -> bool {
    use ReplicationState as S;
    match state {
        S::Replicating | S::Suspended | S::Error => true,
        S::WaitingForInitialReplication => exported,
        S::ResynchronizationRequired | S::Resynchronizing => sweep,
        S::NotEnabled
        | S::ReadyForInitialReplication
        | S::InitialReplicationInProgress
        | S::SyncedReplicationComplete
        | S::FailedOverWaitingCompletion
        | S::FailedOver => false,
    }
}

/// Called before vmrepl opens the disks of `vm` (VM start, qemu-storage-daemon for a cycle),
/// with the VM's operation lock held: compares each replicated disk with the fingerprint
/// recorded when vmrepl last closed it, and raises [`PrimaryEvent::TrackingLost`] with the
/// cause when one was changed and the relationship relies on tracking. Then records each
/// file as it is opened ([`after_close`] checks that the same file is there when vmrepl
/// closes it). Returns the cause when tracking was declared lost.
pub fn before_open(db: &Db, vm: &VmDefinition) -> Result<Option<String>, DbError> {
    // A fingerprint taken at an open that was never followed by a close (the daemon died
    // meanwhile) says nothing of the file now: unknown, not a mismatch.
    let stored: Vec<StoredFingerprint> = db
        .disk_fingerprints(vm.uuid)?
        .into_iter()
        .filter(|s| !s.opened)
        .collect();
    let raised = match db.relationship(vm.uuid)? {
        Some(rel) if !stored.is_empty() => check(db, vm, &rel, &stored)?,
        _ => None,
    };
    record(db, vm, true);
    Ok(raised)
}

fn check(
    db: &Db,
    vm: &VmDefinition,
    rel: &Relationship,
    stored: &[StoredFingerprint],
) -> Result<Option<String>, DbError> {
    if !relies_on_tracking(db, vm.uuid, rel)? {
        return Ok(None);
    }
    let causes = changed(vm, stored, |d| !rel.settings.exclude_disks.contains(&d.id));
    if causes.is_empty() {
        return Ok(None);
    }
    Ok(lost(db, vm.uuid, causes.join(". ")))
}

/// The causes ([`cause`]) of the disks of `vm` that `keep` selects and that differ from the
/// fingerprint recorded for them in `stored`. A disk without one, or whose file cannot be
/// read (opening it fails too, and says why), has none.
fn changed(
    vm: &VmDefinition,
    stored: &[StoredFingerprint],
    keep: impl Fn(&DiskDef) -> bool,
) -> Vec<String> {
    let mut causes = Vec::new();
    for disk in vm.disks.iter().filter(|d| keep(d)) {
        let Some(rec) = stored
            .iter()
            .find(|s| s.disk_id == disk.id && s.path == disk.path)
        else {
            continue;
        };
        match of(&disk.path) {
            Ok(now) => {
                let changes = judge(Some(&rec.fingerprint), &now);
                if !changes.is_empty() {
                    causes.push(cause(vm.name.as_str(), &disk.path, &changes));
                }
            }
            Err(e) => {
                tracing::warn!(target: LOG_TARGET, vm = %vm.uuid, path = %disk.path.display(), "cannot read the disk file's fingerprint: {e}")
            }
        }
    }
    causes
}

/// Whether a disk of `vm` (which is off) was changed outside vmrepl since vmrepl last closed
/// it: the causes, joined. Nothing is raised or forgotten (the old primary of a planned
/// failover asks this before it offers its disks as the common base of a reverse).
pub fn changed_since_closed(db: &Db, vm: &VmDefinition) -> Result<Option<String>, DbError> {
    let mut stored = db.disk_fingerprints(vm.uuid)?;
    stored.retain(|s| !s.opened);
    let causes = changed(vm, &stored, |_| true);
    Ok((!causes.is_empty()).then(|| causes.join(". ")))
}

/// The sentence that says the QEMU of VM `vm` went away while the daemon was not running.
pub fn unobserved_cause(vm: &str) -> String {
    format!(
        "the QEMU of VM {vm} exited while the vmrepl daemon was not running, so vmrepl could \
         not record its disk files as QEMU left them and cannot tell whether they were \
         changed since (a restore, an edit); the relationship needs a resynchronization, \
         which compares the disks block by block and sends only the blocks that differ \
         (shut VMs down through vmrepl before stopping it to avoid this)"
    )
}

/// Called when the daemon starts and finds that the QEMU of `vm` exited while it was not
/// running: nothing recorded the disk files as QEMU left them, so whatever happened to them
/// since is unknown. When the relationship relies on tracking, it takes
/// [`PrimaryEvent::TrackingLost`] with [`unobserved_cause`]; returns that cause then.
pub fn exited_unobserved(db: &Db, vm: &VmDefinition) -> Result<Option<String>, DbError> {
    db.forget_disk_fingerprints(vm.uuid)?;
    let Some(rel) = db.relationship(vm.uuid)? else {
        return Ok(None);
    };
    if !relies_on_tracking(db, vm.uuid, &rel)? {
        return Ok(None);
    }
    Ok(lost(db, vm.uuid, unobserved_cause(vm.name.as_str())))
}

/// Whether `rel` relies on its bitmaps now ([`tracking_matters`], with whether an initial
/// copy went out on external media).
fn relies_on_tracking(db: &Db, vm: Uuid, rel: &Relationship) -> Result<bool, DbError> {
    let exported = rel.state == ReplicationState::WaitingForInitialReplication
        && db
            .last_marked_ms(vm, rel.created_ms, Marked::Exported)?
            .is_some();
    Ok(tracking_matters(
        rel.state,
        exported,
        rel.resync_sweep.is_some(),
    ))
}

/// Raises [`PrimaryEvent::TrackingLost`] with `cause`; returns the cause when it was recorded.
fn lost(db: &Db, vm: Uuid, cause: String) -> Option<String> {
    tracing::warn!(target: LOG_TARGET, %vm, "{cause}");
    match db.change_primary(vm, &PrimaryEvent::TrackingLost, Some(&cause), None) {
        Ok(t) => {
            tracing::info!(target: LOG_TARGET, %vm, from = %t.from, to = %t.to, "state changed");
            Some(cause)
        }
        Err(e) => {
            tracing::warn!(target: LOG_TARGET, %vm, "cannot record that tracking was lost: {e}");
            None
        }
    }
}

/// Called when vmrepl has closed the disks of `vm` (its QEMU is gone, qemu-storage-daemon
/// quit): a replicated disk file that is another file than the one opened (moved or renamed
/// over it meanwhile) raises [`PrimaryEvent::TrackingLost`] when the relationship relies on
/// tracking; then every disk file's fingerprint is recorded for the next open. A file that
/// cannot be read gets none.
pub fn after_close(db: &Db, vm: &VmDefinition) {
    if let Err(e) = replaced_while_open(db, vm) {
        tracing::warn!(target: LOG_TARGET, vm = %vm.uuid, "cannot compare the disk files with the ones opened: {e}");
    }
    record(db, vm, false);
}

/// The replicated disks of `vm` that are other files now than when vmrepl opened them.
fn replaced_while_open(db: &Db, vm: &VmDefinition) -> Result<Option<String>, DbError> {
    let opened: Vec<StoredFingerprint> = db
        .disk_fingerprints(vm.uuid)?
        .into_iter()
        .filter(|s| s.opened)
        .collect();
    if opened.is_empty() {
        return Ok(None);
    }
    let Some(rel) = db.relationship(vm.uuid)? else {
        return Ok(None);
    };
    if !relies_on_tracking(db, vm.uuid, &rel)? {
        return Ok(None);
    }
    let mut causes = Vec::new();
    for disk in vm
        .disks
        .iter()
        .filter(|d| !rel.settings.exclude_disks.contains(&d.id))
    {
        let (Some(rec), Ok(now)) = (
            opened
                .iter()
                .find(|s| s.disk_id == disk.id && s.path == disk.path),
            of(&disk.path),
        ) else {
            continue;
        };
        // QEMU itself changes size and times; only another file at the path tells.
        if let Some(c @ Change::Replaced { .. }) = judge(Some(&rec.fingerprint), &now).first() {
            causes.push(cause_while_open(vm.name.as_str(), &disk.path, c));
        }
    }
    if causes.is_empty() {
        return Ok(None);
    }
    Ok(lost(db, vm.uuid, causes.join(". ")))
}

/// `vmrepl vm trust-disks`: the admin says the disk files of `vm` (off) were changed only by
/// tools that kept its persistent dirty bitmaps (`qemu-io`, `qemu-nbd` with the bitmaps
/// loaded), so they are recorded as if vmrepl had just closed them. A wrong word here is a
/// silent divergence of the replica, so the event log keeps it.
pub fn trust(db: &Db, vm: &VmDefinition) {
    record(db, vm, false);
    tracing::warn!(target: LOG_TARGET, vm = %vm.uuid, "the admin declared the disk files as they are now trusted (changed only by tools that kept the bitmaps)");
    let _ = db.event(
        Some(vm.uuid),
        &format!(
            "the disks of {} were taken as they are now (vm trust-disks): changes made while it was off rely on its change-tracking bitmaps",
            vm.name
        ),
    );
}

/// Records every disk file of `vm` as it is now, as `opened` by vmrepl or closed.
fn record(db: &Db, vm: &VmDefinition, opened: bool) {
    for disk in &vm.disks {
        let r = of(&disk.path).map_err(|e| e.to_string()).and_then(|f| {
            db.record_disk_fingerprint(vm.uuid, &disk.id, &disk.path, &f, opened)
                .map_err(|e| e.to_string())
        });
        if let Err(e) = r {
            tracing::warn!(target: LOG_TARGET, vm = %vm.uuid, path = %disk.path.display(), "cannot record the disk file's fingerprint (a change made outside vmrepl may then go unnoticed): {e}");
        }
    }
}

/// `ns` since the epoch as UTC, `2026-12-06T01:02:03.123456789Z`.
fn utc(ns: i64) -> String {
    let (secs, sub) = (ns.div_euclid(1_000_000_000), ns.rem_euclid(1_000_000_000));
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{sub:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f() -> DiskFingerprint {
        DiskFingerprint {
            dev: 2049,
            ino: 131_075,
            size: 16 << 20,
            mtime_ns: 1_796_000_000_000_000_001,
            ctime_ns: 1_796_000_000_500_000_000,
        }
    }

    #[test]
    fn the_same_file_untouched_is_trusted() {
        assert!(judge(Some(&f()), &f()).is_empty());
    }

    #[test]
    fn a_disk_with_no_recorded_fingerprint_is_trusted() {
        // The first start after enabling, or after an upgrade: unknown is not a mismatch.
        assert!(judge(None, &f()).is_empty());
    }

    #[test]
    fn another_inode_at_the_path_is_a_mismatch_that_names_both() {
        let now = DiskFingerprint { ino: 99, ..f() };
        let c = judge(Some(&f()), &now);
        assert_eq!(
            c,
            vec![Change::Replaced {
                from: (2049, 131_075),
                to: (2049, 99)
            }]
        );
        assert_eq!(
            c[0].to_string(),
            "it is another file now: device 2049 inode 99, was device 2049 inode 131075"
        );
        let dev = DiskFingerprint { dev: 7, ..f() };
        assert!(matches!(
            judge(Some(&f()), &dev)[..],
            [Change::Replaced { .. }]
        ));
    }

    #[test]
    fn a_changed_size_is_a_mismatch_that_says_from_what_to_what() {
        let now = DiskFingerprint {
            size: 32 << 20,
            ..f()
        };
        let c = judge(Some(&f()), &now);
        assert_eq!(
            c[0].to_string(),
            "its size changed from 16777216 to 33554432 bytes"
        );
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn a_changed_modification_time_is_a_mismatch_with_both_times_in_utc() {
        let now = DiskFingerprint {
            mtime_ns: f().mtime_ns + 1,
            ..f()
        };
        let c = judge(Some(&f()), &now);
        assert_eq!(c.len(), 1);
        assert_eq!(
            c[0].to_string(),
            "its modification time changed from 2026-11-30T00:53:20.000000001Z to \
             2026-11-30T00:53:20.000000002Z"
        );
    }

    #[test]
    fn times_are_written_in_utc_to_the_nanosecond() {
        assert_eq!(utc(0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(
            utc(951_782_400_000_000_007),
            "2000-02-29T00:00:00.000000007Z"
        );
        assert_eq!(
            utc(1_796_000_000_000_000_000 - 1),
            "2026-11-30T00:53:19.999999999Z"
        );
    }

    #[test]
    fn a_changed_status_change_time_alone_is_a_mismatch() {
        // A restore that set the modification time back (`cp -p`, `touch -d`) still moves
        // the status-change time, which no tool can set.
        let now = DiskFingerprint {
            ctime_ns: f().ctime_ns + 1_000_000_000,
            ..f()
        };
        let c = judge(Some(&f()), &now);
        assert_eq!(c.len(), 1);
        assert!(
            c[0].to_string()
                .starts_with("its status-change time changed from 2026-11-30T00:53:20.5"),
            "{}",
            c[0]
        );
    }

    #[test]
    fn the_cause_names_the_vm_the_disk_file_and_every_change() {
        let now = DiskFingerprint {
            size: 1,
            mtime_ns: 0,
            ..f()
        };
        let c = cause("web", Path::new("/x/web-0.qcow2"), &judge(Some(&f()), &now));
        assert!(
            c.starts_with("the disk /x/web-0.qcow2 of VM web was modified while the VM was off"),
            "{c}"
        );
        assert!(c.contains("its size changed from 16777216 to 1 bytes; its modification time changed from 2026-11-30T00:53:20.000000001Z to 1970-01-01T00:00:00.000000000Z"), "{c}");
        assert!(c.contains("resynchronization"), "{c}");
    }

    #[test]
    fn only_states_that_rely_on_the_bitmaps_need_a_resynchronization_for_an_offline_change() {
        use ReplicationState as S;
        for s in [S::Replicating, S::Suspended, S::Error] {
            assert!(tracking_matters(s, false, false), "{s:?}");
        }
        assert!(tracking_matters(
            S::WaitingForInitialReplication,
            true,
            false
        ));
        assert!(!tracking_matters(
            S::WaitingForInitialReplication,
            false,
            false
        ));
        // A resynchronization that would continue counts on its bitmap for the ranges it
        // compared already; one that starts from the first range reads every block.
        for s in [S::ResynchronizationRequired, S::Resynchronizing] {
            assert!(tracking_matters(s, false, true), "{s:?}");
            assert!(!tracking_matters(s, true, false), "{s:?}");
        }
        for s in [
            S::NotEnabled,
            S::ReadyForInitialReplication,
            S::InitialReplicationInProgress,
            S::SyncedReplicationComplete,
            S::FailedOverWaitingCompletion,
            S::FailedOver,
        ] {
            assert!(!tracking_matters(s, true, true), "{s:?}");
        }
    }

    #[test]
    fn a_file_written_after_its_fingerprint_was_taken_no_longer_matches_it() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("disk.qcow2");
        std::fs::write(&p, b"one").unwrap();
        let before = of(&p).unwrap();
        assert!(judge(Some(&before), &of(&p).unwrap()).is_empty());
        // File times tick with the kernel's coarse clock (a few ms): the restore below comes
        // one tick later at least, as any real one does.
        std::thread::sleep(std::time::Duration::from_millis(30));
        // A restore: an older copy of the same size put over the file, with the modification
        // time the file had (as `cp -p` of a copy taken then would leave it).
        let old = d.path().join("old.qcow2");
        std::fs::write(&old, b"two").unwrap();
        std::fs::copy(&old, &p).unwrap();
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_nanos(before.mtime_ns as u64);
        std::fs::File::options()
            .write(true)
            .open(&p)
            .unwrap()
            .set_modified(t)
            .unwrap();
        let c = judge(Some(&before), &of(&p).unwrap());
        assert!(
            matches!(c[..], [Change::StatusChanged { .. }]),
            "only the status-change time tells: {c:?}"
        );
    }

    /// A VM with disks `disk0` (replicated) and `disk1` (excluded) in `dir`, whose relationship
    /// is in `state`.
    fn host_with(dir: &Path, state_by: &[PrimaryEvent]) -> (Db, VmDefinition) {
        use crate::db::NewRelationship;
        use vmrepl_types::*;
        let db = Db::open(&dir.join("s.db")).unwrap();
        let disks: Vec<vm::DiskDef> = (0..2)
            .map(|i| {
                let path = dir.join(format!("web-{i}.qcow2"));
                std::fs::write(&path, vec![0u8; 4096]).unwrap();
                vm::DiskDef {
                    id: format!("disk{i}"),
                    path,
                    size_bytes: 4096,
                }
            })
            .collect();
        let vm = VmDefinition {
            name: VmName::new("web").unwrap(),
            uuid: Uuid::new_v4(),
            generation: Generation::Bios,
            firmware: vm::FirmwareVariantId::Seabios,
            machine_type: "pc-i440fx-7.2".into(),
            config_version: ConfigVersion::CURRENT,
            vcpus: 1,
            memory_mib: 128,
            disks,
            nics: vec![],
            kernel: None,
            nvram: None,
        };
        db.insert_vm(&vm).unwrap();
        let mut s = replication::ReplicationSettings::new("replica.example:7443");
        s.exclude_disks = vec!["disk1".into()];
        let mut events = state_by.iter();
        db.insert_relationship(
            NewRelationship {
                vm: vm.uuid,
                rel_id: Uuid::new_v4(),
                settings: &s,
                replica_name: "replica.example",
                acked_seq: 3,
                note: None,
            },
            events.next().unwrap(),
            None,
        )
        .unwrap();
        for e in events {
            db.change_primary(vm.uuid, e, None, None).unwrap();
        }
        (db, vm)
    }

    fn later() {
        // File times tick with the kernel's coarse clock: the edit comes a tick later.
        std::thread::sleep(std::time::Duration::from_millis(30));
    }

    #[test]
    fn a_replicated_disk_written_while_off_makes_the_relationship_require_a_resynchronization() {
        use crate::lifecycle::ReverseStart;
        let d = tempfile::tempdir().unwrap();
        let replicating = [PrimaryEvent::ReverseReplicationStarted {
            start: ReverseStart::CommonPoint,
        }];
        let (db, vm) = host_with(d.path(), &replicating);
        // Nothing recorded yet (first start after enabling): trusted.
        assert_eq!(before_open(&db, &vm).unwrap(), None);
        after_close(&db, &vm);
        assert_eq!(db.disk_fingerprints(vm.uuid).unwrap().len(), 2);
        // Untouched: trusted, and the files are recorded as opened while vmrepl holds them.
        assert_eq!(before_open(&db, &vm).unwrap(), None);
        assert!(db
            .disk_fingerprints(vm.uuid)
            .unwrap()
            .iter()
            .all(|s| s.opened));
        after_close(&db, &vm);
        later();
        // The excluded disk changes: nothing to resynchronize.
        std::fs::write(&vm.disks[1].path, vec![1u8; 4096]).unwrap();
        assert_eq!(before_open(&db, &vm).unwrap(), None);
        after_close(&db, &vm);
        later();
        // The replicated one changes.
        std::fs::write(&vm.disks[0].path, vec![2u8; 4096]).unwrap();
        let cause = before_open(&db, &vm).unwrap().expect("caught");
        assert!(
            cause.contains(&format!(
                "the disk {} of VM web was modified while the VM was off",
                vm.disks[0].path.display()
            )),
            "{cause}"
        );
        assert!(cause.contains("modification time changed"), "{cause}");
        let rel = db.relationship(vm.uuid).unwrap().unwrap();
        assert_eq!(rel.state, ReplicationState::ResynchronizationRequired);
        assert_eq!(rel.last_error.as_deref(), Some(cause.as_str()));
        let t = &db.transitions(Some(vm.uuid), 1).unwrap()[0];
        assert_eq!(
            (t.event.as_str(), t.cause.as_deref()),
            ("tracking-lost", Some(cause.as_str()))
        );
        // Caught once: the next open finds only what the last one recorded as opened.
        assert_eq!(before_open(&db, &vm).unwrap(), None);
    }

    #[test]
    fn a_disk_changed_before_the_initial_copy_needs_nothing_more_than_the_copy() {
        use crate::lifecycle::InitialMethod;
        let d = tempfile::tempdir().unwrap();
        let waiting = [PrimaryEvent::Enabled {
            initial: InitialMethod::Network,
        }];
        let (db, vm) = host_with(d.path(), &waiting);
        after_close(&db, &vm);
        later();
        std::fs::write(&vm.disks[0].path, vec![2u8; 4096]).unwrap();
        assert_eq!(before_open(&db, &vm).unwrap(), None);
        let rel = db.relationship(vm.uuid).unwrap().unwrap();
        assert_eq!(rel.state, ReplicationState::WaitingForInitialReplication);
    }

    #[test]
    fn a_qemu_that_exited_while_the_daemon_was_down_makes_a_relationship_that_relies_on_tracking_require_a_resynchronization(
    ) {
        use crate::lifecycle::{InitialMethod, ReverseStart};
        let d = tempfile::tempdir().unwrap();
        let (db, vm) = host_with(
            d.path(),
            &[PrimaryEvent::ReverseReplicationStarted {
                start: ReverseStart::CommonPoint,
            }],
        );
        after_close(&db, &vm);
        let cause = exited_unobserved(&db, &vm).unwrap().expect("declared lost");
        assert!(
            cause.starts_with("the QEMU of VM web exited while the vmrepl daemon was not running"),
            "{cause}"
        );
        assert!(db.disk_fingerprints(vm.uuid).unwrap().is_empty());
        let rel = db.relationship(vm.uuid).unwrap().unwrap();
        assert_eq!(rel.state, ReplicationState::ResynchronizationRequired);
        assert_eq!(rel.last_error.as_deref(), Some(cause.as_str()));
        // Before the initial copy it reads everything anyway.
        let e = tempfile::tempdir().unwrap();
        let (db, vm) = host_with(
            e.path(),
            &[PrimaryEvent::Enabled {
                initial: InitialMethod::Network,
            }],
        );
        assert_eq!(exited_unobserved(&db, &vm).unwrap(), None);
    }

    #[test]
    fn a_disk_changed_since_vmrepl_closed_it_is_named_without_raising_or_forgetting_anything() {
        use crate::lifecycle::ReverseStart;
        let d = tempfile::tempdir().unwrap();
        let (db, vm) = host_with(
            d.path(),
            &[PrimaryEvent::ReverseReplicationStarted {
                start: ReverseStart::CommonPoint,
            }],
        );
        assert_eq!(
            changed_since_closed(&db, &vm).unwrap(),
            None,
            "none recorded"
        );
        after_close(&db, &vm);
        assert_eq!(changed_since_closed(&db, &vm).unwrap(), None, "untouched");
        later();
        // Even a disk excluded from replication counts: the whole copy is the common base.
        std::fs::write(&vm.disks[1].path, vec![9u8; 4096]).unwrap();
        let why = changed_since_closed(&db, &vm).unwrap().expect("changed");
        assert!(
            why.contains(&format!(
                "the disk {} of VM web",
                vm.disks[1].path.display()
            )),
            "{why}"
        );
        assert_eq!(db.disk_fingerprints(vm.uuid).unwrap().len(), 2);
        let rel = db.relationship(vm.uuid).unwrap().unwrap();
        assert_eq!(rel.state, ReplicationState::Replicating);
    }

    #[test]
    fn a_disk_file_replaced_while_qemu_had_it_open_is_caught_when_vmrepl_closes_it() {
        use crate::lifecycle::ReverseStart;
        let d = tempfile::tempdir().unwrap();
        let (db, vm) = host_with(
            d.path(),
            &[PrimaryEvent::ReverseReplicationStarted {
                start: ReverseStart::CommonPoint,
            }],
        );
        // QEMU writes the file it holds: sizes and times change, the file stays.
        assert_eq!(before_open(&db, &vm).unwrap(), None);
        later();
        std::fs::write(&vm.disks[0].path, vec![3u8; 8192]).unwrap();
        after_close(&db, &vm);
        let rel = db.relationship(vm.uuid).unwrap().unwrap();
        assert_eq!(rel.state, ReplicationState::Replicating);
        assert!(db
            .disk_fingerprints(vm.uuid)
            .unwrap()
            .iter()
            .all(|s| !s.opened));
        // Another file is moved over it while it is open (a restore into a running VM).
        assert_eq!(before_open(&db, &vm).unwrap(), None);
        let other = d.path().join("restored.qcow2");
        std::fs::write(&other, vec![4u8; 4096]).unwrap();
        std::fs::rename(&other, &vm.disks[0].path).unwrap();
        after_close(&db, &vm);
        let rel = db.relationship(vm.uuid).unwrap().unwrap();
        assert_eq!(rel.state, ReplicationState::ResynchronizationRequired);
        let cause = rel.last_error.unwrap();
        assert!(
            cause.starts_with(&format!(
                "the disk {} of VM web was replaced while QEMU had it open",
                vm.disks[0].path.display()
            )) && cause.contains("it is another file now"),
            "{cause}"
        );
        // The next open starts from the file as it is now.
        assert_eq!(before_open(&db, &vm).unwrap(), None);
    }

    #[test]
    fn an_open_that_was_never_closed_says_nothing_of_the_file_at_the_next_open() {
        use crate::lifecycle::ReverseStart;
        let d = tempfile::tempdir().unwrap();
        let (db, vm) = host_with(
            d.path(),
            &[PrimaryEvent::ReverseReplicationStarted {
                start: ReverseStart::CommonPoint,
            }],
        );
        // The daemon died while qemu-storage-daemon held the files; they changed since.
        assert_eq!(before_open(&db, &vm).unwrap(), None);
        later();
        std::fs::write(&vm.disks[0].path, vec![5u8; 8192]).unwrap();
        assert_eq!(before_open(&db, &vm).unwrap(), None);
        assert_eq!(
            db.relationship(vm.uuid).unwrap().unwrap().state,
            ReplicationState::Replicating,
            "the bitmaps' in-use flag tells the next cycle instead"
        );
    }
}
