//! Small file-system helpers: atomic writes, durable renames, owner-only files and folders,
//! and lexical path normalisation.

use std::fs::{DirBuilder, File, OpenOptions, Permissions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

/// The umask of every vmrepl process: files are created owner-only (0600, folders 0700)
/// unless the code asks for a wider mode on purpose.
pub const PRIVATE_UMASK: u32 = 0o077;

/// Sets the process umask to [`PRIVATE_UMASK`]; returns the previous one. Call it first
/// thing in `main`, before any thread starts: the umask is per process.
pub fn set_private_umask() -> u32 {
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(PRIVATE_UMASK));
    old.bits()
}

/// Creates `dir` and any missing parents with mode 0700. Folders that exist already keep
/// their mode (an admin-made storage root may be shared on purpose; what vmrepl creates
/// below it is owner-only).
pub fn create_private_dir_all(dir: &Path) -> std::io::Result<()> {
    DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// Opens a new file `path` for writing with mode 0600 from creation. Refuses an existing
/// file or a symbolic link in its place (`O_CREAT|O_EXCL|O_NOFOLLOW`).
pub fn create_private_new(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// Copies the regular file `from` to `to`, which must not exist, with mode 0600 (unlike
/// `std::fs::copy`, which gives the copy the source's mode), and fsyncs it.
pub fn copy_private(from: &Path, to: &Path) -> std::io::Result<u64> {
    let mut src = File::open(from)?;
    let mut dst = create_private_new(to)?;
    let n = std::io::copy(&mut src, &mut dst)?;
    dst.sync_all()?;
    Ok(n)
}

/// Removes the group and other permission bits of `path` (mode & 0700).
pub fn make_owner_only(path: &Path) -> std::io::Result<()> {
    let mode = std::fs::metadata(path)?.permissions().mode();
    if mode & 0o077 != 0 {
        std::fs::set_permissions(path, Permissions::from_mode(mode & 0o7700))?;
    }
    Ok(())
}

/// Writes `data` to `path` atomically: temp file in the same folder, fsync, rename, fsync dir.
pub fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file")
    ));
    let _ = std::fs::remove_file(&tmp);
    create_private_new(&tmp)?.write_all(data)?;
    rename_durable(&tmp, path)
}

/// Makes the file `from` durable and puts it at `to`: fsync, rename, fsync of `to`'s folder.
/// A crash leaves either no `to` or the whole of it.
pub fn rename_durable(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::File::open(from)?.sync_all()?;
    std::fs::rename(from, to)?;
    std::fs::File::open(to.parent().unwrap_or(Path::new(".")))?.sync_all()
}

/// Normalises an absolute path lexically (resolves `.` and `..`); `None` if relative or if
/// `..` would climb above the root.
pub fn normalize(p: &Path) -> Option<PathBuf> {
    if !p.is_absolute() {
        return None;
    }
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            Component::RootDir | Component::Prefix(_) => {}
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            Component::Normal(n) => out.push(n),
        }
    }
    Some(out)
}
