//! The `disk_fingerprints` table (migration 9): what each disk file of a VM looked like when
//! vmrepl last closed it (see `crate::fingerprint`), so that a change made while the VM was off
//! and outside vmrepl is caught before the file is opened again; and, while vmrepl has it open,
//! what it was when opened, so that a file put in its place meanwhile is caught at the close.

use super::{now_ms, Db, DbError};
use rusqlite::params;
use std::path::PathBuf;
use uuid::Uuid;

/// What identifies a disk file's content without reading it: its device and inode (a file
/// copied or moved over it is another inode), its size, and its modification and status-change
/// times in nanoseconds (the status-change time cannot be set back by any tool).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskFingerprint {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
}

/// A recorded fingerprint of one disk of a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredFingerprint {
    pub disk_id: String,
    /// The disk file it was taken of.
    pub path: PathBuf,
    pub fingerprint: DiskFingerprint,
    /// Taken when vmrepl opened the file (QEMU or qemu-storage-daemon holds it now), not when
    /// it closed it.
    pub opened: bool,
    /// When it was recorded, Unix milliseconds.
    pub recorded_ms: u64,
}

impl Db {
    /// Records (or replaces) the fingerprint of disk `disk_id` of `vm`, taken of `path` when
    /// vmrepl `opened` it (else when it closed it).
    pub fn record_disk_fingerprint(
        &self,
        vm: Uuid,
        disk_id: &str,
        path: &std::path::Path,
        f: &DiskFingerprint,
        opened: bool,
    ) -> Result<(), DbError> {
        self.conn.execute(
            "INSERT OR REPLACE INTO disk_fingerprints \
             (vm_uuid, disk_id, path, dev, ino, size, mtime_ns, ctime_ns, recorded_ms, opened) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![
                vm.to_string(),
                disk_id,
                path.to_string_lossy(),
                f.dev as i64,
                f.ino as i64,
                f.size as i64,
                f.mtime_ns,
                f.ctime_ns,
                now_ms() as i64,
                opened
            ],
        )?;
        Ok(())
    }

    /// The recorded fingerprints of the disks of `vm`, by disk id.
    pub fn disk_fingerprints(&self, vm: Uuid) -> Result<Vec<StoredFingerprint>, DbError> {
        let mut st = self.conn.prepare(
            "SELECT disk_id, path, dev, ino, size, mtime_ns, ctime_ns, recorded_ms, opened \
             FROM disk_fingerprints WHERE vm_uuid = ?1 ORDER BY disk_id",
        )?;
        let rows = st.query_map(params![vm.to_string()], |r| {
            Ok(StoredFingerprint {
                disk_id: r.get(0)?,
                path: PathBuf::from(r.get::<_, String>(1)?),
                fingerprint: DiskFingerprint {
                    dev: r.get::<_, i64>(2)? as u64,
                    ino: r.get::<_, i64>(3)? as u64,
                    size: r.get::<_, i64>(4)? as u64,
                    mtime_ns: r.get(5)?,
                    ctime_ns: r.get(6)?,
                },
                recorded_ms: r.get::<_, i64>(7)? as u64,
                opened: r.get(8)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Forgets the fingerprints of the disks of `vm` (its files are about to be opened, or the
    /// VM is deleted).
    pub fn forget_disk_fingerprints(&self, vm: Uuid) -> Result<(), DbError> {
        self.conn.execute(
            "DELETE FROM disk_fingerprints WHERE vm_uuid = ?1",
            params![vm.to_string()],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_round_trip_are_replaced_per_disk_and_forgotten_per_vm() {
        let d = tempfile::tempdir().unwrap();
        let db = Db::open(&d.path().join("s.db")).unwrap();
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        assert!(db.disk_fingerprints(a).unwrap().is_empty());
        let f = DiskFingerprint {
            dev: u64::MAX - 1,
            ino: 12,
            size: 1 << 40,
            mtime_ns: 1_700_000_000_123_456_789,
            ctime_ns: 1_700_000_001_000_000_001,
        };
        let p = std::path::Path::new("/vms/a-0.qcow2");
        db.record_disk_fingerprint(a, "disk0", p, &f, false)
            .unwrap();
        db.record_disk_fingerprint(b, "disk0", p, &f, false)
            .unwrap();
        let g = DiskFingerprint { size: 7, ..f };
        db.record_disk_fingerprint(a, "disk0", p, &g, true).unwrap();
        let got = db.disk_fingerprints(a).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].disk_id, "disk0");
        assert_eq!(got[0].path, p);
        assert!(got[0].opened);
        assert_eq!(got[0].fingerprint, g, "u64 fields survive the i64 columns");
        assert!(!db.disk_fingerprints(b).unwrap()[0].opened);
        db.forget_disk_fingerprints(a).unwrap();
        assert!(db.disk_fingerprints(a).unwrap().is_empty());
        assert_eq!(db.disk_fingerprints(b).unwrap()[0].fingerprint, f);
    }
}
