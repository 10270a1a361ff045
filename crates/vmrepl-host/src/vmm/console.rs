//! The VM console: the serial log a VM writes, read from its tail and rotated when it
//! grows past its limit.

use crate::vmm::{VmError, Vmm};
use std::path::PathBuf;
use std::time::Duration;
use vmrepl_types::VmName;

/// What `vm console` returns without `--tail`: the last 64 KiB of the serial log.
pub const CONSOLE_TAIL_DEFAULT: u64 = 64 << 10;

/// The most `vm console --tail` returns (16 MiB).
pub const CONSOLE_TAIL_MAX: u64 = 16 << 20;

/// A VM's `serial.log` is cut when it grows past this (8 MiB): its last 8 MiB move to
/// `serial.log.1` and `serial.log` starts again empty.
pub const SERIAL_LOG_MAX: u64 = 8 << 20;

/// How often a running VM's serial log size is checked.
pub(super) const SERIAL_LOG_CHECK: Duration = Duration::from_secs(10);

/// The last `tail` bytes of the file `path` (empty if it does not exist), reading only those
/// bytes: the file may be large.
pub fn read_tail(path: &std::path::Path, tail: u64) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    let start = len.saturating_sub(tail);
    f.seek(SeekFrom::Start(start))?;
    let mut out = Vec::with_capacity((len - start) as usize);
    f.take(tail).read_to_end(&mut out)?;
    Ok(out)
}

/// `serial.log.1` beside `log`.
pub fn rotated_serial_log(log: &std::path::Path) -> PathBuf {
    let mut name = log.file_name().unwrap_or_default().to_os_string();
    name.push(".1");
    log.with_file_name(name)
}

/// Moves the last `keep` bytes of the serial log `log` to `serial.log.1` (replacing it) and
/// empties `log`, when `log` is longer than `over` bytes. QEMU opens the log with `append=on`,
/// so it goes on writing at the new end. Returns whether it rotated. Output the guest writes
/// between the copy and the truncation is lost.
pub fn rotate_serial_log(log: &std::path::Path, over: u64, keep: u64) -> std::io::Result<bool> {
    let len = match std::fs::metadata(log) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if len <= over {
        return Ok(false);
    }
    let tail = read_tail(log, keep)?;
    crate::fsutil::write_atomic(&rotated_serial_log(log), &tail)?;
    std::fs::OpenOptions::new()
        .write(true)
        .open(log)?
        .set_len(0)?;
    Ok(true)
}

impl Vmm {
    /// The last `tail` bytes of the serial console log of the current run (default
    /// [`CONSOLE_TAIL_DEFAULT`], at most [`CONSOLE_TAIL_MAX`]). Only those bytes are read.
    pub fn console(&self, name: &VmName, tail: Option<u64>) -> Result<String, VmError> {
        let tail = tail.unwrap_or(CONSOLE_TAIL_DEFAULT);
        if tail > CONSOLE_TAIL_MAX {
            return Err(VmError::TailTooLong {
                tail,
                max: CONSOLE_TAIL_MAX,
            });
        }
        let row = self.row(name)?;
        let p = self.run_paths(row.definition.uuid).serial_log;
        let data = read_tail(&p, tail).map_err(|source| VmError::SerialLog {
            path: p.clone(),
            source,
        })?;
        Ok(String::from_utf8_lossy(&data).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_big_serial_log_gives_only_its_tail() {
        let t = tempfile::tempdir().unwrap();
        let log = t.path().join("serial.log");
        let mut data = vec![b'a'; 3 << 20];
        data.extend_from_slice(b"the end\n");
        std::fs::write(&log, &data).unwrap();
        assert_eq!(read_tail(&log, 8).unwrap(), b"the end\n");
        let tail = read_tail(&log, CONSOLE_TAIL_DEFAULT).unwrap();
        assert_eq!(tail.len() as u64, CONSOLE_TAIL_DEFAULT);
        assert!(tail.ends_with(b"the end\n"));
        // Asking for more than there is gives the whole file; a missing log is empty.
        assert_eq!(read_tail(&log, 1 << 30).unwrap(), data);
        assert!(read_tail(&t.path().join("none"), 10).unwrap().is_empty());
    }

    #[test]
    fn a_serial_log_over_the_limit_moves_its_tail_to_serial_log_1_and_starts_again() {
        let t = tempfile::tempdir().unwrap();
        let log = t.path().join("serial.log");
        std::fs::write(&log, b"0123456789").unwrap();
        assert!(
            !rotate_serial_log(&log, 10, 4).unwrap(),
            "not over the limit"
        );
        assert_eq!(std::fs::read(&log).unwrap(), b"0123456789");
        std::fs::write(&log, b"0123456789ab").unwrap();
        assert!(rotate_serial_log(&log, 10, 4).unwrap());
        let old = rotated_serial_log(&log);
        assert_eq!(old, t.path().join("serial.log.1"));
        assert_eq!(std::fs::read(&old).unwrap(), b"89ab");
        assert_eq!(std::fs::metadata(&log).unwrap().len(), 0);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&old).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // A writer that appends goes on at the new end, with no hole before it.
        let mut w = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        std::io::Write::write_all(&mut w, b"more").unwrap();
        assert_eq!(std::fs::read(&log).unwrap(), b"more");
        // No log, nothing to do.
        assert!(!rotate_serial_log(&t.path().join("none"), 0, 4).unwrap());
    }
}
