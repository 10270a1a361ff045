//! Reading a staged delta: its extents and their bytes, with bounded memory.

use crate::{TrackingError, LOG_TARGET};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use vmrepl_qemu::img::QemuImg;

/// The largest data chunk [`ExtentReader`] yields.
pub const MAX_CHUNK: usize = 1 << 20;

/// What one extent of a delta holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentKind {
    /// Bytes stored in the staging qcow2 file at `file_offset` (host offset).
    Data { file_offset: u64 },
    /// Explicit zeroes (a guest zero-write or discard).
    Zero,
}

/// One changed range of a disk (guest offsets).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
    pub kind: ExtentKind,
}

/// The changed extents of a staging image, in order. Unallocated ranges are not part of the
/// delta and are left out. Adjacent extents of the same kind (and, for data, contiguous in
/// the file) are merged by qemu-img already.
pub async fn extents(qemu_img: &QemuImg, staging: &Path) -> Result<Vec<Extent>, TrackingError> {
    let map = qemu_img
        .map(staging)
        .await
        .map_err(TrackingError::img(format!(
            "map the staging image {}",
            staging.display()
        )))?;
    let bad = |detail: String| TrackingError::BadStaging {
        path: staging.to_path_buf(),
        detail,
    };
    let mut out = Vec::new();
    for e in map {
        if e.depth != 0 {
            return Err(bad(format!(
                "range {}+{} comes from a backing file (depth {}); staging images must have none",
                e.start, e.length, e.depth
            )));
        }
        if !e.present || e.length == 0 {
            continue;
        }
        let kind = if e.zero {
            ExtentKind::Zero
        } else if e.data {
            match e.offset {
                Some(file_offset) => ExtentKind::Data { file_offset },
                None => {
                    return Err(bad(format!(
                        "data range {}+{} has no host offset (compressed?); staging images must be plain qcow2",
                        e.start, e.length
                    )))
                }
            }
        } else {
            // Present, neither data nor zero cannot happen without a backing file; it would
            // read as zeroes.
            ExtentKind::Zero
        };
        out.push(Extent {
            offset: e.start,
            len: e.length,
            kind,
        });
    }
    tracing::debug!(target: LOG_TARGET, path = %staging.display(), extents = out.len(), "delta mapped");
    Ok(out)
}

/// Reads `buf.len()` bytes of a data extent at `file_offset` of the staging file.
pub fn read_extent(file: &File, file_offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
    file.read_exact_at(buf, file_offset)
}

/// What a chunk carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkData {
    Data(Vec<u8>),
    /// `len` bytes of zeroes (not materialised).
    Zero(u64),
}

/// One piece of a delta at guest offset `offset`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub offset: u64,
    pub data: ChunkData,
}

impl Chunk {
    pub fn len(&self) -> u64 {
        match &self.data {
            ChunkData::Data(d) => d.len() as u64,
            ChunkData::Zero(n) => *n,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Iterates over a staged delta as chunks: data chunks of at most `chunk` bytes (one buffer
/// at a time), zero extents whole. Blocking file I/O: run it on a blocking thread.
#[derive(Debug)]
pub struct ExtentReader {
    path: PathBuf,
    file: File,
    extents: std::vec::IntoIter<Extent>,
    current: Option<Extent>,
    chunk: usize,
}

impl ExtentReader {
    /// Opens the staging file behind `extents` (from [`extents`]).
    pub fn open(path: &Path, extents: Vec<Extent>) -> Result<ExtentReader, TrackingError> {
        ExtentReader::with_chunk(path, extents, MAX_CHUNK)
    }

    /// Like [`ExtentReader::open`] with a smaller chunk size (at most [`MAX_CHUNK`]).
    pub fn with_chunk(
        path: &Path,
        extents: Vec<Extent>,
        chunk: usize,
    ) -> Result<ExtentReader, TrackingError> {
        let file = File::open(path).map_err(|source| TrackingError::Io {
            action: "open the staging image",
            path: path.to_path_buf(),
            source,
        })?;
        Ok(ExtentReader {
            path: path.to_path_buf(),
            file,
            extents: extents.into_iter(),
            current: None,
            chunk: chunk.clamp(1, MAX_CHUNK),
        })
    }
}

impl Iterator for ExtentReader {
    type Item = Result<Chunk, TrackingError>;

    fn next(&mut self) -> Option<Self::Item> {
        let e = match self.current.take() {
            Some(e) => e,
            None => self.extents.next()?,
        };
        match e.kind {
            ExtentKind::Zero => Some(Ok(Chunk {
                offset: e.offset,
                data: ChunkData::Zero(e.len),
            })),
            ExtentKind::Data { file_offset } => {
                let n = e.len.min(self.chunk as u64);
                let mut buf = vec![0u8; n as usize];
                if let Err(source) = read_extent(&self.file, file_offset, &mut buf) {
                    return Some(Err(TrackingError::Io {
                        action: "read the staging image",
                        path: self.path.clone(),
                        source,
                    }));
                }
                if n < e.len {
                    self.current = Some(Extent {
                        offset: e.offset + n,
                        len: e.len - n,
                        kind: ExtentKind::Data {
                            file_offset: file_offset + n,
                        },
                    });
                }
                Some(Ok(Chunk {
                    offset: e.offset,
                    data: ChunkData::Data(buf),
                }))
            }
        }
    }
}
