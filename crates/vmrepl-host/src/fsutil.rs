//! Small file-system helpers: atomic writes, durable renames and lexical path normalisation.

use std::io::Write;
use std::path::{Component, Path, PathBuf};

/// Writes `data` to `path` atomically: temp file in the same folder, fsync, rename, fsync dir.
pub fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file")
    ));
    std::fs::File::create(&tmp)?.write_all(data)?;
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
