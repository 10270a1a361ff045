//! Writing a large apply's data on a helper thread, beside the apply.
//!
//! An initial copy is gigabytes of data extents of up to 1 MiB. Written one after the other from
//! the apply's thread, each direct write waits for the disk while nothing else happens there:
//! on the development machine that wait was three quarters of an initial copy's time
//! (`docs/benchmarks.md`). So for a large apply the top layer's clusters are allocated on the
//! apply's thread (imago's `ensure_data_mapping`, which keeps the qcow2 metadata in order) and
//! the data goes to a writer thread, through a few page-aligned buffers, with direct I/O; the
//! apply verifies and maps the next extent meanwhile.
//!
//! Nothing changes for durability: the commit drains the writer and reports its first error
//! before it flushes and syncs the layers, and only then records the log as applied.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

/// Bytes per buffer: the largest data extent of a log.
pub(crate) const BUF: usize = 1 << 20;
/// Buffers in flight.
const DEPTH: usize = 4;
/// Alignment of offsets, lengths and memory for direct I/O.
pub(crate) const ALIGN: u64 = 4096;

/// A page-aligned buffer of [`BUF`] bytes: a slice of a larger vector, which never moves.
struct Aligned {
    v: Vec<u8>,
    off: usize,
}

impl Aligned {
    fn new() -> Aligned {
        let v = vec![0u8; BUF + ALIGN as usize];
        let off = v.as_ptr().align_offset(ALIGN as usize);
        Aligned { v, off }
    }
    fn slice(&self, len: usize) -> &[u8] {
        &self.v[self.off..self.off + len]
    }
    fn slice_mut(&mut self, len: usize) -> &mut [u8] {
        &mut self.v[self.off..self.off + len]
    }
}

struct Job {
    file: Arc<File>,
    at: u64,
    len: usize,
    buf: Aligned,
}

/// The writer thread and its buffers (see the module docs).
pub(crate) struct BulkWriter {
    jobs: Option<SyncSender<Job>>,
    /// Buffers the thread is done with.
    done: Receiver<Aligned>,
    /// Buffers ready for the next data.
    pool: Vec<Aligned>,
    /// Buffers handed to the thread and not back yet.
    in_flight: usize,
    thread: Option<JoinHandle<io::Result<()>>>,
}

impl BulkWriter {
    pub(crate) fn new() -> io::Result<BulkWriter> {
        let (jobs, rx) = std::sync::mpsc::sync_channel::<Job>(DEPTH);
        let (give_back, done) = std::sync::mpsc::sync_channel::<Aligned>(DEPTH);
        let thread = std::thread::Builder::new()
            .name("vmrepl-bulk-write".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    job.file.write_all_at(job.buf.slice(job.len), job.at)?;
                    // The apply may be gone (a failed apply): the buffer is dropped then.
                    let _ = give_back.send(job.buf);
                }
                Ok(())
            })?;
        Ok(BulkWriter {
            jobs: Some(jobs),
            done,
            pool: (0..DEPTH).map(|_| Aligned::new()).collect(),
            in_flight: 0,
            thread: Some(thread),
        })
    }

    /// Whether `data` at file offset `at` can be written with direct I/O.
    pub(crate) fn fits(at: u64, data: &[u8]) -> bool {
        at.is_multiple_of(ALIGN)
            && (data.len() as u64).is_multiple_of(ALIGN)
            && !data.is_empty()
            && data.len() <= BUF
    }

    /// A buffer back from the thread (waiting for one).
    fn take_back(&mut self) -> io::Result<Aligned> {
        match self.done.recv() {
            Ok(b) => {
                self.in_flight -= 1;
                Ok(b)
            }
            Err(_) => Err(self.stopped()),
        }
    }

    /// Queues `data` (see [`BulkWriter::fits`]) for `file` at `at`; waits for a free buffer.
    pub(crate) fn submit(&mut self, file: &Arc<File>, at: u64, data: &[u8]) -> io::Result<()> {
        let mut buf = match self.pool.pop() {
            Some(b) => b,
            None => self.take_back()?,
        };
        buf.slice_mut(data.len()).copy_from_slice(data);
        let job = Job {
            file: Arc::clone(file),
            at,
            len: data.len(),
            buf,
        };
        let sent = match &self.jobs {
            Some(tx) => tx.send(job).is_ok(),
            None => false,
        };
        if !sent {
            return Err(self.stopped());
        }
        self.in_flight += 1;
        Ok(())
    }

    /// Waits until everything queued is written; the first error the writer met, if any.
    pub(crate) fn drain(&mut self) -> io::Result<()> {
        while self.in_flight > 0 {
            let b = self.take_back()?;
            self.pool.push(b);
        }
        Ok(())
    }

    /// The writer thread's error, once it stopped.
    fn stopped(&mut self) -> io::Error {
        self.jobs = None;
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(Err(e))) => e,
            Some(Ok(Ok(()))) | None => io::Error::other("the bulk writer stopped"),
            Some(Err(_)) => io::Error::other("the bulk writer panicked"),
        }
    }
}

impl Drop for BulkWriter {
    /// Waits for the writes queued (an apply dropped without commit): none may land after the
    /// next apply of the same layer began.
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queued_writes_land_where_they_were_sent_and_a_failed_one_is_reported() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        let f = Arc::new(
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(true)
                .read(true)
                .write(true)
                .open(&p)
                .unwrap(),
        );
        let mut w = BulkWriter::new().unwrap();
        // More writes than buffers, out of order.
        for i in (0..10u64).rev() {
            let data = vec![i as u8 + 1; 8192];
            assert!(BulkWriter::fits(i * 8192, &data));
            w.submit(&f, i * 8192, &data).unwrap();
        }
        w.drain().unwrap();
        let got = std::fs::read(&p).unwrap();
        assert_eq!(got.len(), 10 * 8192);
        for i in 0..10usize {
            assert!(got[i * 8192..(i + 1) * 8192]
                .iter()
                .all(|b| *b == i as u8 + 1));
        }
        assert!(!BulkWriter::fits(100, &[0u8; 4096]));
        assert!(!BulkWriter::fits(0, &[0u8; 100]));
        // A file opened read-only: the write fails, and the error comes out.
        let ro = Arc::new(std::fs::File::open(&p).unwrap());
        w.submit(&ro, 0, &[7u8; 4096]).unwrap();
        let e = w.drain().unwrap_err();
        assert!(e.raw_os_error().is_some(), "{e}");
    }
}
