//! The store's qemu-img calls, through the one QEMU wrapper (`vmrepl-qemu`), which logs each
//! command with its duration and kills it after a timeout. Only the error is mapped here.

use crate::error::{Result, StoreError};
use std::ffi::OsString;
use std::path::Path;
use vmrepl_qemu::img::{ImgError, QemuImg};

/// Runs `qemu-img ARGS...` (in `cwd` if given) and returns its standard output.
pub(crate) fn run<I, A>(cwd: Option<&Path>, args: I) -> Result<String>
where
    I: IntoIterator<Item = A>,
    A: Into<OsString>,
{
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    QemuImg::default()
        .run_blocking(cwd, &args)
        .map_err(|e| match e {
            ImgError::Failed { cmd, code, stderr } => StoreError::QemuImg {
                command: cmd,
                status: code.map_or_else(
                    || "no exit code (killed)".into(),
                    |c| format!("exit status {c}"),
                ),
                stderr,
            },
            other => StoreError::QemuImg {
                command: "qemu-img".into(),
                status: "no exit status".into(),
                stderr: other.to_string(),
            },
        })
}

/// `qemu-img create` of a qcow2 v3 image at `path` (relative to `cwd` if given) of `size`
/// bytes, over the qcow2 image `backing` if given (named as given: a bare file name stays
/// relative to the new image's folder).
pub(crate) fn create_qcow2(
    cwd: Option<&Path>,
    path: &Path,
    size: u64,
    backing: Option<&Path>,
) -> Result<()> {
    let mut args: Vec<OsString> = ["create", "-q", "-f", "qcow2", "-o", "compat=1.1"]
        .map(OsString::from)
        .to_vec();
    if let Some(b) = backing {
        args.extend(["-b".into(), b.into(), "-F".into(), "qcow2".into()]);
    }
    args.extend([path.into(), size.to_string().into()]);
    run(cwd, args).map(drop)
}

/// `qemu-img check -r all` of the qcow2 layer `name` in folder `dir`, opened without its
/// backing chain (a layer's metadata is checked on its own, and no file named in its header is
/// opened, I5). Repairs what a process killed in the middle of writing the layer left behind:
/// clusters referenced by the mapping but not counted as allocated, or counted but unused, so
/// that the next allocation cannot hand out a cluster that is still in use.
pub(crate) fn repair_layer(dir: &Path, name: &str) -> Result<String> {
    let spec = serde_json::json!({
        "driver": "qcow2",
        "file": { "driver": "file", "filename": name },
        "backing": null,
    });
    run(
        Some(dir),
        [
            OsString::from("check"),
            "-q".into(),
            "-r".into(),
            "all".into(),
            format!("json:{spec}").into(),
        ],
    )
}

/// `qemu-img resize` of the qcow2 layer `path` to `size` bytes (growing only; its backing is
/// a layer of the same folder, opened read-only).
pub(crate) fn resize(path: &Path, size: u64) -> Result<()> {
    run(
        path.parent(),
        [
            OsString::from("resize"),
            "-q".into(),
            "-f".into(),
            "qcow2".into(),
            path.file_name().unwrap_or_default().into(),
            size.to_string().into(),
        ],
    )
    .map(drop)
}
