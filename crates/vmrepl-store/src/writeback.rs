//! Starting a file's write-back early, so that the fsync that makes it durable finds little
//! left to write.

use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

/// Bytes written between two early write-backs.
pub const WRITEBACK_EVERY: u64 = 8 << 20;

/// While a large file is being written (a received log, a log applied into a layer), flushes
/// what is written so far on a helper thread every [`WRITEBACK_EVERY`] bytes, one flush at a
/// time. The disk then works while the writer goes on, instead of all at once in the final
/// fsync. It guarantees nothing by itself: durability still comes from that final fsync.
/// A failed early flush is kept and reported by [`EarlyWriteback::finish`]: since Linux
/// reports a write-back error to the first fsync that sees it only, a later fsync on another
/// descriptor could otherwise succeed for data that never reached the disk.
#[derive(Debug)]
pub struct EarlyWriteback {
    path: PathBuf,
    since: u64,
    running: Option<JoinHandle<std::io::Result<()>>>,
    failed: Option<std::io::Error>,
}

impl EarlyWriteback {
    pub fn new(path: &Path) -> EarlyWriteback {
        EarlyWriteback {
            path: path.to_path_buf(),
            since: 0,
            running: None,
            failed: None,
        }
    }

    fn collect(&mut self) {
        if let Some(t) = self.running.take() {
            let r = t
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("the write-back thread panicked")));
            if let (Err(e), None) = (r, &self.failed) {
                self.failed = Some(e);
            }
        }
    }

    /// Notes `n` more bytes written; starts a flush when enough piled up and none is running.
    pub fn wrote(&mut self, n: u64) {
        self.since += n;
        if self.since < WRITEBACK_EVERY || self.running.as_ref().is_some_and(|t| !t.is_finished()) {
            return;
        }
        self.since = 0;
        self.collect();
        let path = self.path.clone();
        self.running = std::thread::Builder::new()
            .name("vmrepl-writeback".into())
            .spawn(move || {
                match std::fs::File::open(&path) {
                    Ok(f) => f.sync_data(),
                    // A file that is not there (yet) has nothing to flush.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    Err(e) => Err(e),
                }
            })
            .ok();
    }

    /// Waits for a flush still running (before the final fsync, on a thread that may block)
    /// and returns the first error any early flush met: the file's data may not be on disk
    /// then, whatever a later fsync says. Dropped without it, a running flush finishes on its
    /// own.
    pub fn finish(&mut self) -> std::io::Result<()> {
        self.collect();
        match self.failed.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn flushes_start_only_after_enough_bytes_and_one_at_a_time() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        let mut f = std::fs::File::create(&p).unwrap();
        let mut wb = EarlyWriteback::new(&p);
        wb.wrote(WRITEBACK_EVERY - 1);
        assert!(wb.running.is_none());
        f.write_all(&[1u8; 4096]).unwrap();
        wb.wrote(1);
        assert!(wb.running.is_some());
        assert_eq!(wb.since, 0);
        wb.finish().unwrap();
        assert!(wb.running.is_none());
        // A missing file is not an error here: the final fsync reports problems.
        let mut gone = EarlyWriteback::new(&d.path().join("missing"));
        gone.wrote(WRITEBACK_EVERY);
        gone.finish().unwrap();
    }

    #[test]
    fn an_early_flush_that_fails_is_reported_by_finish_and_only_once() {
        // A path whose open fails for another reason than absence: a name too long for the
        // file system stands in for an I/O error of the flush.
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x".repeat(300));
        let mut wb = EarlyWriteback::new(&p);
        wb.wrote(WRITEBACK_EVERY);
        let e = wb.finish().unwrap_err();
        assert!(e.to_string().to_lowercase().contains("name"), "{e}");
        assert!(wb.finish().is_ok());
    }
}
