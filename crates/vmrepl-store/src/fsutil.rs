//! Durable file helpers: atomic replace (tmp + fsync + rename + directory fsync), free space.

use crate::error::{Result, StoreError};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Creates `dir` and missing parents with mode 0700 (existing folders keep their mode).
pub(crate) fn create_private_dir_all(dir: &Path) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| StoreError::io("create", dir, e))
}

/// Removes the group and other permission bits of `path`.
pub(crate) fn make_owner_only(path: &Path) -> Result<()> {
    let mode = fs::metadata(path)
        .map_err(|e| StoreError::io("read permissions of", path, e))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        fs::set_permissions(path, fs::Permissions::from_mode(mode & 0o7700))
            .map_err(|e| StoreError::io("change permissions of", path, e))?;
    }
    Ok(())
}

/// Writes `bytes` to `path` atomically: a temporary file beside it is written and fsynced, renamed
/// over `path`, and the directory is fsynced so the rename itself is durable.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| StoreError::io("create", &tmp, e))?;
        f.write_all(bytes)
            .map_err(|e| write_error(&tmp, bytes.len() as u64, e))?;
        f.sync_all()
            .map_err(|e| write_error(&tmp, bytes.len() as u64, e))?;
    }
    fs::rename(&tmp, path).map_err(|e| StoreError::io("rename into place", path, e))?;
    sync_dir(dir)
}

/// Fsyncs a directory so that entries created, renamed or removed in it are durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::io("fsync the directory", dir, e))
}

/// Maps a write error to [`StoreError::DiskFull`] when it is ENOSPC/EDQUOT.
pub(crate) fn write_error(path: &Path, needed: u64, e: std::io::Error) -> StoreError {
    if is_no_space(&e) {
        StoreError::DiskFull {
            path: path.to_path_buf(),
            needed,
            free: free_bytes(path).unwrap_or(0),
        }
    } else {
        StoreError::io("write", path, e)
    }
}

/// True for "no space left on device" and "disk quota exceeded".
pub fn is_no_space(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(c) if c == nix::errno::Errno::ENOSPC as i32 || c == nix::errno::Errno::EDQUOT as i32
    ) || e.kind() == std::io::ErrorKind::StorageFull
}

/// Bytes available to an unprivileged writer on the file system holding `path` (statvfs).
pub fn free_bytes(path: &Path) -> Result<u64> {
    let mut p = path;
    // statvfs needs an existing path; walk up to the nearest one.
    while !p.exists() {
        match p.parent() {
            Some(parent) => p = parent,
            None => break,
        }
    }
    let st = nix::sys::statvfs::statvfs(p)
        .map_err(|e| StoreError::io("query free space (statvfs) of", p, e.into()))?;
    #[allow(clippy::unnecessary_cast, clippy::useless_conversion)]
    let free = (st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64);
    Ok(free)
}
