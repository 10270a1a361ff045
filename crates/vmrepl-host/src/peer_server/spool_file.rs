//! Where a received log's bytes go: its partial spool file, written past the page cache when
//! the file system allows it.
//!
//! A large log (an initial copy, a whole-disk resynchronization) is gigabytes that the replica
//! reads once, to apply it, and never again. Copying them into the page cache first cost more
//! CPU on the development machine than TLS, the verifier and the apply's writes together
//! (`docs/benchmarks.md`). A fresh spool file is therefore written with `O_DIRECT` from
//! page-aligned buffers, by a helper thread while the next buffer fills; the unaligned tail at
//! the end goes through an ordinary descriptor, whose fsync then makes the whole file durable.
//! A resumed file (appended at an unaligned offset) and file systems without direct I/O
//! (tmpfs) take the buffered path, with early write-back.

use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use tokio::io::AsyncWriteExt;

/// Bytes per direct write.
const CHUNK: usize = 4 << 20;
/// The alignment direct I/O needs for offsets, lengths and memory (4 KiB covers every
/// block size Linux file systems use here).
const ALIGN: usize = 4096;

/// A page-aligned buffer of [`CHUNK`] bytes: a slice of a larger vector, which never moves.
struct Aligned {
    v: Vec<u8>,
    off: usize,
}

impl Aligned {
    fn new() -> Aligned {
        let v = vec![0u8; CHUNK + ALIGN];
        let off = v.as_ptr().align_offset(ALIGN);
        Aligned { v, off }
    }
    fn bytes(&self) -> &[u8] {
        &self.v[self.off..self.off + CHUNK]
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.v[self.off..self.off + CHUNK]
    }
}

/// Appends to a fresh file with direct I/O (see the module docs).
pub(super) struct Direct {
    path: PathBuf,
    cur: Aligned,
    fill: usize,
    /// File offset of `cur`'s first byte.
    at: u64,
    to_writer: Option<tokio::sync::mpsc::Sender<(Aligned, u64)>>,
    free: tokio::sync::mpsc::Receiver<Aligned>,
    writer: Option<tokio::task::JoinHandle<io::Result<()>>>,
}

impl Direct {
    /// None when the file system refuses direct I/O.
    fn create(path: &Path) -> io::Result<Option<Direct>> {
        let file = match std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_DIRECT)
            .open(path)
        {
            Ok(f) => f,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(None),
            Err(e) => return Err(e),
        };
        let (to_writer, mut jobs) = tokio::sync::mpsc::channel::<(Aligned, u64)>(1);
        let (give_back, free) = tokio::sync::mpsc::channel::<Aligned>(2);
        give_back
            .try_send(Aligned::new())
            .expect("an empty pool has room");
        let writer = tokio::task::spawn_blocking(move || {
            while let Some((buf, at)) = jobs.blocking_recv() {
                file.write_all_at(buf.bytes(), at)?;
                // The appender may be gone (a failed transfer): then the buffer is dropped.
                let _ = give_back.blocking_send(buf);
            }
            Ok(())
        });
        Ok(Some(Direct {
            path: path.to_path_buf(),
            cur: Aligned::new(),
            fill: 0,
            at: 0,
            to_writer: Some(to_writer),
            free,
            writer: Some(writer),
        }))
    }

    async fn append(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let n = data.len().min(CHUNK - self.fill);
            self.cur.bytes_mut()[self.fill..self.fill + n].copy_from_slice(&data[..n]);
            self.fill += n;
            data = &data[n..];
            if self.fill == CHUNK {
                let next = match self.free.recv().await {
                    Some(b) => b,
                    None => return Err(self.writer_error().await),
                };
                let full = std::mem::replace(&mut self.cur, next);
                let sent = match &self.to_writer {
                    Some(tx) => tx.send((full, self.at)).await.is_ok(),
                    None => false,
                };
                if !sent {
                    return Err(self.writer_error().await);
                }
                self.at += CHUNK as u64;
                self.fill = 0;
            }
        }
        Ok(())
    }

    /// The writer thread's error, once it stopped.
    async fn writer_error(&mut self) -> io::Error {
        self.to_writer = None;
        match self.writer.take() {
            Some(w) => match w.await {
                Ok(Err(e)) => e,
                Ok(Ok(())) => io::Error::other("the spool writer stopped"),
                Err(e) => io::Error::other(format!("the spool writer failed: {e}")),
            },
            None => io::Error::other("the spool writer stopped"),
        }
    }

    /// Writes what is buffered (the unaligned tail through an ordinary descriptor) and makes
    /// the file durable.
    async fn finish(mut self) -> io::Result<()> {
        self.to_writer = None;
        if let Some(w) = self.writer.take() {
            w.await.map_err(|e| io::Error::other(e.to_string()))??;
        }
        let (path, cur, fill, at) = (self.path, self.cur, self.fill, self.at);
        tokio::task::spawn_blocking(move || {
            let f = std::fs::OpenOptions::new().write(true).open(&path)?;
            f.write_all_at(&cur.bytes()[..fill], at)?;
            f.sync_all()
        })
        .await
        .map_err(|e| io::Error::other(e.to_string()))?
    }
}

/// The partial spool file of a log being received.
pub(super) enum SpoolFile {
    Direct(Box<Direct>),
    Buffered {
        file: tokio::fs::File,
        writeback: vmrepl_store::EarlyWriteback,
    },
}

impl SpoolFile {
    /// A new, empty spool file at `path`.
    pub(super) async fn create(path: &Path) -> io::Result<SpoolFile> {
        let p = path.to_path_buf();
        let direct = tokio::task::spawn_blocking(move || Direct::create(&p))
            .await
            .map_err(|e| io::Error::other(e.to_string()))??;
        if let Some(d) = direct {
            return Ok(SpoolFile::Direct(Box::new(d)));
        }
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .await?;
        Ok(SpoolFile::buffered(file, path))
    }

    /// An existing spool file opened for appending (a resumed transfer).
    pub(super) fn buffered(file: tokio::fs::File, path: &Path) -> SpoolFile {
        SpoolFile::Buffered {
            file,
            writeback: vmrepl_store::EarlyWriteback::new(path),
        }
    }

    pub(super) async fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            SpoolFile::Direct(d) => d.append(data).await,
            SpoolFile::Buffered { file, writeback } => {
                file.write_all(data).await?;
                writeback.wrote(data.len() as u64);
                Ok(())
            }
        }
    }

    /// Makes everything written durable, through the descriptors that wrote it: a write-back
    /// error is reported once only, so an fsync on another descriptor could succeed for bytes
    /// that are not on disk (I1).
    pub(super) async fn finish(self) -> io::Result<()> {
        match self {
            SpoolFile::Direct(d) => d.finish().await,
            SpoolFile::Buffered {
                mut file,
                mut writeback,
            } => {
                let early = tokio::task::spawn_blocking(move || writeback.finish())
                    .await
                    .unwrap_or_else(|e| Err(io::Error::other(e.to_string())));
                file.flush().await?;
                early?;
                file.sync_all().await
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_spool_file_holds_every_byte_appended_in_pieces_of_any_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.partial");
        let mut f = SpoolFile::create(&path).await.unwrap();
        let mut want = Vec::new();
        let mut x: u32 = 7;
        // Pieces that cross the 4 MiB chunks at odd places, ending with an unaligned tail.
        for len in [1usize, 4095, 70_000, 3 << 20, 5 << 20, 12_345, 1 << 20, 333] {
            let piece: Vec<u8> = (0..len)
                .map(|_| {
                    x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                    (x >> 16) as u8
                })
                .collect();
            f.write_all(&piece).await.unwrap();
            want.extend_from_slice(&piece);
        }
        f.finish().await.unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), want);
    }
}
