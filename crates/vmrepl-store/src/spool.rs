//! The received-log spool of a replica VM, in `<vm dir>/logs/`.
//!
//! A log in transfer is written to `<seq>.partial` (20-digit sequence). A cut transfer leaves it
//! there so the primary can resume from its longest valid prefix. Once every byte has arrived,
//! the receiver fsyncs it through the descriptor that wrote it, verifies it completely (I4)
//! and [`accept`]s it: rename to `<seq>.log`, fsync of the folder. Only then is it
//! acknowledged (I1). Because only verified logs ever
//! carry the `.log` name, applying (and re-applying after a crash, I3) never verifies again.

use crate::error::{Result, StoreError};
use crate::fsutil;
use std::path::{Path, PathBuf};

pub use crate::fsutil::{free_bytes, is_no_space};

fn logs(vm_dir: &Path) -> PathBuf {
    vm_dir.join("logs")
}

/// Where log `seq` is received (resumable, not yet verified).
pub fn partial_path(vm_dir: &Path, seq: u64) -> PathBuf {
    logs(vm_dir).join(format!("{seq:020}.partial"))
}

/// Where the durable, verified log `seq` waits to be applied.
pub fn log_path(vm_dir: &Path, seq: u64) -> PathBuf {
    logs(vm_dir).join(format!("{seq:020}.log"))
}

/// Marks the received log `seq` as durable and verified: renames the partial file to its
/// `.log` name and fsyncs the folder. Call only after the whole log verified, and after its
/// writer fsynced it through its own descriptor: Linux reports a write-back error to one fsync
/// only, so an fsync here, on a new descriptor, could succeed for bytes not on disk.
pub fn accept(vm_dir: &Path, seq: u64) -> Result<PathBuf> {
    let from = partial_path(vm_dir, seq);
    let to = log_path(vm_dir, seq);
    std::fs::rename(&from, &to).map_err(|e| StoreError::io("rename into place", &to, e))?;
    fsutil::sync_dir(&logs(vm_dir))?;
    Ok(to)
}

/// Parses a spool file name into its sequence and whether it is verified (`.log`).
pub(crate) fn parse_name(name: &str) -> Option<(u64, bool)> {
    let (num, verified) = match (name.strip_suffix(".log"), name.strip_suffix(".partial")) {
        (Some(n), _) => (n, true),
        (None, Some(n)) => (n, false),
        _ => return None,
    };
    if num.len() != 20 || !num.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    num.parse().ok().map(|s| (s, verified))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spool_names_round_trip_and_strangers_are_ignored() {
        let d = Path::new("/x");
        let p = partial_path(d, 7);
        let l = log_path(d, 7);
        let name = |p: &Path| p.file_name().unwrap().to_str().unwrap().to_string();
        assert_eq!(parse_name(&name(&p)), Some((7, false)));
        assert_eq!(parse_name(&name(&l)), Some((7, true)));
        for bad in [
            "7.log",
            "x.log",
            "00000000000000000007.tmp",
            "../00000000000000000007.log",
        ] {
            assert_eq!(parse_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn accepting_a_log_renames_it_to_its_verified_name() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir(t.path().join("logs")).unwrap();
        std::fs::write(partial_path(t.path(), 3), b"whole log").unwrap();
        let p = accept(t.path(), 3).unwrap();
        assert_eq!(p, log_path(t.path(), 3));
        assert_eq!(std::fs::read(&p).unwrap(), b"whole log");
        assert!(!partial_path(t.path(), 3).exists());
        assert!(accept(t.path(), 3).is_err(), "nothing left to accept");
    }
}
