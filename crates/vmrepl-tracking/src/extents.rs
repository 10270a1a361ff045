//! Reading a staged delta: its extents and their bytes, with bounded memory.

use crate::{TrackingError, LOG_TARGET};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

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
/// delta and are left out; adjacent extents of the same kind (and, for data, contiguous in the
/// file) are merged.
///
/// Reads the image's own qcow2 mapping tables in-process (imago) instead of running
/// `qemu-img map`: a staging image is ours, local and closed by QEMU before this is called.
/// Blocking file I/O: run it on a blocking thread. Every layer is opened without following
/// any backing file named in the header, and an image that names one is refused.
pub fn extents(staging: &Path) -> Result<Vec<Extent>, TrackingError> {
    use imago::{DenyImplicitOpenGate, FormatDriverBuilder, Mapping, Storage, StorageOpenOptions};
    let bad = |detail: String| TrackingError::BadStaging {
        path: staging.to_path_buf(),
        detail,
    };
    let file = imago::file::File::open_sync(StorageOpenOptions::new().filename(staging)).map_err(
        |source| TrackingError::Io {
            action: "open the staging image",
            path: staging.to_path_buf(),
            source,
        },
    )?;
    let qcow2 = imago::qcow2::Qcow2::<imago::file::File>::builder(file)
        .write(false)
        .backing(None)
        .open_sync(DenyImplicitOpenGate::default())
        .map_err(|e| bad(format!("it is not a readable qcow2 image: {e}")))?;
    if let Some(b) = qcow2.implicit_backing_file() {
        return Err(bad(format!(
            "it names backing file {b:?}; staging images must have none"
        )));
    }
    if qcow2.requires_external_data_file() {
        return Err(bad("it needs an external data file".into()));
    }
    let size = imago::format::drivers::FormatDriverInstance::size(&qcow2);
    let img = imago::SyncFormatAccess::new(qcow2)
        .map_err(|e| bad(format!("cannot access its mapping: {e}")))?;
    let mut out: Vec<Extent> = Vec::new();
    let mut at = 0u64;
    while at < size {
        let (mapping, len) = img
            .get_mapping_sync(at, size - at)
            .map_err(|e| bad(format!("cannot map offset {at}: {e}")))?;
        let len = len.min(size - at);
        let kind = match mapping {
            Mapping::Raw { offset, .. } => Some(ExtentKind::Data {
                file_offset: offset,
            }),
            Mapping::Zero { explicit: true, .. } => Some(ExtentKind::Zero),
            Mapping::Zero {
                explicit: false, ..
            } => None,
            Mapping::Eof { .. } => break,
            Mapping::Special { .. } => {
                return Err(bad(format!(
                "range {at}+{len} is compressed or encrypted; staging images must be plain qcow2"
            )))
            }
            _ => return Err(bad(format!("range {at}+{len} has an unknown mapping"))),
        };
        if len == 0 {
            return Err(bad(format!("the mapping at offset {at} has no length")));
        }
        if let Some(kind) = kind {
            let merged = match (out.last_mut(), kind) {
                (Some(last), ExtentKind::Zero)
                    if last.kind == ExtentKind::Zero && last.offset + last.len == at =>
                {
                    last.len += len;
                    true
                }
                (Some(last), ExtentKind::Data { file_offset })
                    if last.offset + last.len == at
                        && matches!(last.kind, ExtentKind::Data { file_offset: f } if f + last.len == file_offset) =>
                {
                    last.len += len;
                    true
                }
                _ => false,
            };
            if !merged {
                out.push(Extent {
                    offset: at,
                    len,
                    kind,
                });
            }
        }
        at += len;
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
