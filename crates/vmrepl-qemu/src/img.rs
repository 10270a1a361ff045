//! `qemu-img` wrapper.
//!
//! Every call passes the format explicitly (`-f qcow2`) so that no image is ever probed.
//! Images that came from a peer are opened through the `*_untrusted` variants, which use
//! `--image-opts ...,backing=` (no backing file at all) or `-u` (unsafe rebase, which never
//! opens the old or new backing file), so a crafted header cannot make qemu-img open a
//! host file (I5). Relative paths are passed as `./x` so a name with a colon is never read
//! as a protocol prefix (`nbd:`, `json:`).

use crate::exec::{self, ExecError};
use serde::Deserialize;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Default timeout for one qemu-img call; converts and commits of big disks take longer,
/// see [`QemuImg::with_timeout`].
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3600);

/// qemu-img failures.
#[derive(Debug, thiserror::Error)]
pub enum ImgError {
    #[error(transparent)]
    Exec(#[from] ExecError),
    #[error("{cmd} failed (exit {code:?}): {stderr}")]
    Failed {
        cmd: String,
        code: Option<i32>,
        stderr: String,
    },
    #[error("could not parse the JSON output of {cmd}: {detail}")]
    Parse { cmd: String, detail: String },
}

/// One persistent bitmap as qemu-img reports it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct BitmapInfo {
    pub name: String,
    pub granularity: u64,
    /// `auto` (enabled), `in-use` (inconsistent: QEMU did not close the image cleanly).
    #[serde(default)]
    pub flags: Vec<String>,
}

impl BitmapInfo {
    /// Enabled (tracks writes).
    pub fn enabled(&self) -> bool {
        self.flags.iter().any(|f| f == "auto")
    }
    /// Left `in-use` by a QEMU that did not close the image: cannot be trusted.
    pub fn inconsistent(&self) -> bool {
        self.flags.iter().any(|f| f == "in-use")
    }
}

/// `qemu-img info --output=json`, the parts vmrepl uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    pub format: String,
    pub virtual_size: u64,
    pub actual_size: Option<u64>,
    pub cluster_size: Option<u64>,
    /// The backing file name as written in the header (not opened).
    pub backing_filename: Option<String>,
    pub backing_format: Option<String>,
    /// qcow2 `compat` ("1.1" for v3).
    pub compat: Option<String>,
    pub bitmaps: Vec<BitmapInfo>,
    pub corrupt: bool,
    pub dirty: bool,
}

#[derive(Deserialize)]
struct RawInfo {
    format: String,
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
    #[serde(rename = "actual-size")]
    actual_size: Option<u64>,
    #[serde(rename = "cluster-size")]
    cluster_size: Option<u64>,
    #[serde(rename = "backing-filename")]
    backing_filename: Option<String>,
    #[serde(rename = "backing-filename-format")]
    backing_format: Option<String>,
    #[serde(rename = "dirty-flag", default)]
    dirty: bool,
    #[serde(rename = "format-specific")]
    format_specific: Option<RawSpecific>,
}

#[derive(Deserialize)]
struct RawSpecific {
    data: Option<RawQcow2>,
}

#[derive(Deserialize)]
struct RawQcow2 {
    compat: Option<String>,
    #[serde(default)]
    bitmaps: Vec<BitmapInfo>,
    #[serde(default)]
    corrupt: bool,
}

/// Parses `qemu-img info --output=json`.
pub fn parse_info(json: &str) -> Result<ImageInfo, serde_json::Error> {
    let r: RawInfo = serde_json::from_str(json)?;
    let q = r.format_specific.and_then(|f| f.data);
    Ok(ImageInfo {
        format: r.format,
        virtual_size: r.virtual_size,
        actual_size: r.actual_size,
        cluster_size: r.cluster_size,
        backing_filename: r.backing_filename,
        backing_format: r.backing_format,
        compat: q.as_ref().and_then(|q| q.compat.clone()),
        bitmaps: q.as_ref().map(|q| q.bitmaps.clone()).unwrap_or_default(),
        corrupt: q.map(|q| q.corrupt).unwrap_or(false),
        dirty: r.dirty,
    })
}

/// One extent of `qemu-img map --output=json`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct MapEntry {
    pub start: u64,
    pub length: u64,
    /// 0 = this image; n = the n-th backing file.
    pub depth: u32,
    /// Allocated in the chain (false = reads come from nowhere: zeros, unallocated).
    #[serde(default = "yes")]
    pub present: bool,
    pub zero: bool,
    pub data: bool,
    pub offset: Option<u64>,
}

fn yes() -> bool {
    true
}

/// `qemu-img check --output=json`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
pub struct CheckReport {
    #[serde(rename = "check-errors", default)]
    pub check_errors: u64,
    #[serde(default)]
    pub corruptions: u64,
    #[serde(default)]
    pub leaks: u64,
    #[serde(rename = "image-end-offset")]
    pub image_end_offset: Option<u64>,
}

impl CheckReport {
    pub fn clean(&self) -> bool {
        self.check_errors == 0 && self.corruptions == 0 && self.leaks == 0
    }
}

/// Result of `qemu-img compare`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Comparison {
    Identical,
    /// qemu-img's message, e.g. `Content mismatch at offset 65536!`.
    Differ(String),
}

/// Options for [`QemuImg::create`].
#[derive(Debug, Clone, Default)]
pub struct CreateOpts {
    pub cluster_size: Option<u64>,
    /// Backing file and its format (written into the header; `-u`: not opened now).
    pub backing: Option<(PathBuf, String)>,
}

/// Bitmap operation for [`QemuImg::bitmap`].
#[derive(Debug, Clone)]
pub enum BitmapOp {
    /// Add; optional granularity; `disabled` adds it not tracking.
    Add {
        granularity: Option<u64>,
        disabled: bool,
    },
    Remove,
    Clear,
    Enable,
    Disable,
    /// Merge bitmap `source` of the same image into this one.
    Merge {
        source: String,
    },
}

/// `qemu-img` with a binary path and timeout.
#[derive(Debug, Clone)]
pub struct QemuImg {
    pub binary: PathBuf,
    pub timeout: Duration,
}

impl Default for QemuImg {
    fn default() -> Self {
        QemuImg {
            binary: "qemu-img".into(),
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

/// A path as a qemu-img argument: relative paths get `./` so `a:b` is not a protocol.
fn p(path: &Path) -> OsString {
    if path.is_absolute() || path.starts_with(".") {
        path.as_os_str().to_owned()
    } else {
        Path::new(".").join(path).into_os_string()
    }
}

/// `--image-opts` string for a qcow2 image with no backing file opened.
fn untrusted_opts(path: &Path) -> OsString {
    let abs = p(path).to_string_lossy().replace(',', ",,");
    format!("driver=qcow2,file.driver=file,file.filename={abs},backing=").into()
}

impl QemuImg {
    pub fn new(binary: impl Into<PathBuf>) -> QemuImg {
        QemuImg {
            binary: binary.into(),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    pub fn with_timeout(mut self, t: Duration) -> QemuImg {
        self.timeout = t;
        self
    }

    /// Runs qemu-img; exit codes in `ok` are success.
    async fn run(&self, args: Vec<OsString>, ok: &[i32]) -> Result<(i32, String), ImgError> {
        let out = exec::run(&self.binary, &args, self.timeout).await?;
        let code = out.status.code();
        match code {
            Some(c) if ok.contains(&c) => {
                Ok((c, String::from_utf8_lossy(&out.stdout).into_owned()))
            }
            _ => Err(ImgError::Failed {
                cmd: exec::render(&self.binary, &args),
                code,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            }),
        }
    }

    /// Runs `qemu-img ARGS` synchronously in `cwd` (relative names in the arguments, such as
    /// backing files named by bare file name, resolve there) and returns its stdout. For
    /// callers on the blocking pool; the caller chooses the arguments, so it must keep the
    /// same rules as the typed methods (`-f` always given, no implicit backing opens on
    /// images from a peer).
    pub fn run_blocking<A: AsRef<std::ffi::OsStr>>(
        &self,
        cwd: Option<&Path>,
        args: &[A],
    ) -> Result<String, ImgError> {
        let out = exec::run_blocking(&self.binary, args, cwd, self.timeout)?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(ImgError::Failed {
                cmd: exec::render(&self.binary, args),
                code: out.status.code(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            })
        }
    }

    async fn run0(&self, args: Vec<OsString>) -> Result<String, ImgError> {
        self.run(args, &[0]).await.map(|(_, s)| s)
    }

    /// `qemu-img create -f qcow2 -o compat=1.1[,cluster_size=N] [-b B -F fmt -u] PATH SIZE`.
    pub async fn create(&self, path: &Path, size: u64, opts: &CreateOpts) -> Result<(), ImgError> {
        let mut o = "compat=1.1".to_string();
        if let Some(c) = opts.cluster_size {
            o.push_str(&format!(",cluster_size={c}"));
        }
        let mut a: Vec<OsString> = vec![
            "create".into(),
            "-q".into(),
            "-f".into(),
            "qcow2".into(),
            "-o".into(),
            o.into(),
        ];
        if let Some((b, fmt)) = &opts.backing {
            a.extend(["-u".into(), "-b".into(), p(b), "-F".into(), fmt.into()]);
        }
        a.extend([p(path), size.to_string().into()]);
        self.run0(a).await.map(|_| ())
    }

    async fn info_args(&self, mut a: Vec<OsString>) -> Result<ImageInfo, ImgError> {
        let mut args: Vec<OsString> = vec!["info".into(), "--output=json".into()];
        args.append(&mut a);
        let cmd = exec::render(&self.binary, &args);
        let out = self.run0(args).await?;
        parse_info(&out).map_err(|e| ImgError::Parse {
            cmd,
            detail: e.to_string(),
        })
    }

    /// `qemu-img info -f qcow2` (takes the image lock: fails while QEMU has it open).
    pub async fn info(&self, path: &Path) -> Result<ImageInfo, ImgError> {
        self.info_args(vec!["-f".into(), "qcow2".into(), p(path)])
            .await
    }

    /// `qemu-img info -U -f qcow2`: readable while a running QEMU holds the image. The
    /// answer may be stale (e.g. bitmaps QEMU has not flushed yet).
    pub async fn info_shared(&self, path: &Path) -> Result<ImageInfo, ImgError> {
        self.info_args(vec!["-U".into(), "-f".into(), "qcow2".into(), p(path)])
            .await
    }

    /// Info of an image from a peer: qcow2 forced, backing never opened.
    pub async fn info_untrusted(&self, path: &Path) -> Result<ImageInfo, ImgError> {
        self.info_args(vec!["--image-opts".into(), untrusted_opts(path)])
            .await
    }

    /// Imports any image (format probed: use only on local, admin-provided files) into a
    /// new qcow2 v3 image.
    pub async fn convert(
        &self,
        src: &Path,
        src_format: Option<&str>,
        dst: &Path,
    ) -> Result<(), ImgError> {
        let mut a: Vec<OsString> = vec!["convert".into(), "-q".into()];
        if let Some(f) = src_format {
            a.extend(["-f".into(), f.into()]);
        }
        a.extend([
            "-O".into(),
            "qcow2".into(),
            "-o".into(),
            "compat=1.1".into(),
            p(src),
            p(dst),
        ]);
        self.run0(a).await.map(|_| ())
    }

    /// `qemu-img compare -f qcow2 -F qcow2 [-s] A B`: exit 0 identical, 1 differ, 2 error.
    /// Without `strict`, unallocated and zero ranges count as equal and a size difference
    /// is fine if the extra part reads as zeros.
    pub async fn compare(&self, a: &Path, b: &Path, strict: bool) -> Result<Comparison, ImgError> {
        let mut args: Vec<OsString> = vec![
            "compare".into(),
            "-f".into(),
            "qcow2".into(),
            "-F".into(),
            "qcow2".into(),
        ];
        if strict {
            args.push("-s".into());
        }
        args.extend([p(a), p(b)]);
        let (code, out) = self.run(args, &[0, 1]).await?;
        Ok(if code == 0 {
            Comparison::Identical
        } else {
            Comparison::Differ(out.trim().to_string())
        })
    }

    /// `qemu-img check --output=json -f qcow2`: exit 0 clean, 2 corrupt, 3 leaks are all
    /// reported as a [`CheckReport`]; 1 (could not check) is an error.
    pub async fn check(&self, path: &Path) -> Result<CheckReport, ImgError> {
        let args: Vec<OsString> = vec![
            "check".into(),
            "--output=json".into(),
            "-f".into(),
            "qcow2".into(),
            p(path),
        ];
        let cmd = exec::render(&self.binary, &args);
        let (_, out) = self.run(args, &[0, 2, 3]).await?;
        serde_json::from_str(&out).map_err(|e| ImgError::Parse {
            cmd,
            detail: e.to_string(),
        })
    }

    async fn map_args(&self, mut a: Vec<OsString>) -> Result<Vec<MapEntry>, ImgError> {
        let mut args: Vec<OsString> = vec!["map".into(), "--output=json".into()];
        args.append(&mut a);
        let cmd = exec::render(&self.binary, &args);
        let out = self.run0(args).await?;
        serde_json::from_str(&out).map_err(|e| ImgError::Parse {
            cmd,
            detail: e.to_string(),
        })
    }

    /// `qemu-img map --output=json -f qcow2` over the whole local chain.
    pub async fn map(&self, path: &Path) -> Result<Vec<MapEntry>, ImgError> {
        self.map_args(vec!["-f".into(), "qcow2".into(), p(path)])
            .await
    }

    /// Map of a peer's image alone: no backing file is opened, so unallocated ranges show
    /// as `present:false` rather than coming from a backing file.
    pub async fn map_untrusted(&self, path: &Path) -> Result<Vec<MapEntry>, ImgError> {
        self.map_args(vec!["--image-opts".into(), untrusted_opts(path)])
            .await
    }

    /// `qemu-img bitmap --<op> -f qcow2 PATH NAME`. The image must not be open in QEMU.
    pub async fn bitmap(&self, path: &Path, name: &str, op: &BitmapOp) -> Result<(), ImgError> {
        let mut a: Vec<OsString> = vec!["bitmap".into()];
        match op {
            BitmapOp::Add {
                granularity,
                disabled,
            } => {
                a.push("--add".into());
                if let Some(g) = granularity {
                    a.extend(["-g".into(), g.to_string().into()]);
                }
                if *disabled {
                    a.push("--disable".into());
                }
            }
            BitmapOp::Remove => a.push("--remove".into()),
            BitmapOp::Clear => a.push("--clear".into()),
            BitmapOp::Enable => a.push("--enable".into()),
            BitmapOp::Disable => a.push("--disable".into()),
            BitmapOp::Merge { source } => a.extend(["--merge".into(), source.into()]),
        }
        a.extend(["-f".into(), "qcow2".into(), p(path), name.into()]);
        self.run0(a).await.map(|_| ())
    }

    pub async fn bitmap_add(&self, path: &Path, name: &str) -> Result<(), ImgError> {
        self.bitmap(
            path,
            name,
            &BitmapOp::Add {
                granularity: None,
                disabled: false,
            },
        )
        .await
    }
    pub async fn bitmap_remove(&self, path: &Path, name: &str) -> Result<(), ImgError> {
        self.bitmap(path, name, &BitmapOp::Remove).await
    }
    pub async fn bitmap_enable(&self, path: &Path, name: &str) -> Result<(), ImgError> {
        self.bitmap(path, name, &BitmapOp::Enable).await
    }
    pub async fn bitmap_disable(&self, path: &Path, name: &str) -> Result<(), ImgError> {
        self.bitmap(path, name, &BitmapOp::Disable).await
    }
    /// Merges bitmap `source` into `target` (both in `path`).
    pub async fn bitmap_merge(
        &self,
        path: &Path,
        source: &str,
        target: &str,
    ) -> Result<(), ImgError> {
        self.bitmap(
            path,
            target,
            &BitmapOp::Merge {
                source: source.into(),
            },
        )
        .await
    }

    /// `qemu-img rebase -u -f qcow2 [-b B -F fmt | -b ""] PATH`: rewrites the backing link
    /// in the header only; neither the old nor the new backing file is opened.
    pub async fn rebase_unsafe(
        &self,
        path: &Path,
        backing: Option<(&Path, &str)>,
    ) -> Result<(), ImgError> {
        let mut a: Vec<OsString> = vec!["rebase".into(), "-u".into(), "-f".into(), "qcow2".into()];
        match backing {
            Some((b, fmt)) => a.extend(["-b".into(), p(b), "-F".into(), fmt.into()]),
            None => a.extend(["-b".into(), "".into()]),
        }
        a.push(p(path));
        self.run0(a).await.map(|_| ())
    }

    /// `qemu-img commit -f qcow2 [-d] PATH`: writes PATH's data into its backing file (a
    /// local, trusted chain). `skip_empty` (`-d`) leaves PATH as is (faster, for a layer that
    /// is deleted next).
    pub async fn commit(&self, path: &Path, skip_empty: bool) -> Result<(), ImgError> {
        let mut a: Vec<OsString> = vec!["commit".into(), "-q".into(), "-f".into(), "qcow2".into()];
        if skip_empty {
            a.push("-d".into());
        }
        a.push(p(path));
        self.run0(a).await.map(|_| ())
    }

    /// `qemu-img resize -f qcow2 PATH SIZE` (growing only is safe for a guest).
    pub async fn resize(&self, path: &Path, size: u64) -> Result<(), ImgError> {
        self.run0(vec![
            "resize".into(),
            "-q".into(),
            "-f".into(),
            "qcow2".into(),
            p(path),
            size.to_string().into(),
        ])
        .await
        .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_json_parses_bitmaps_and_flags() {
        let j = r#"{"virtual-size": 67108864, "filename": "a.qcow2", "cluster-size": 65536, "format": "qcow2",
          "actual-size": 200704, "format-specific": {"type": "qcow2", "data": {"compat": "1.1", "compression-type": "zlib",
          "lazy-refcounts": false, "bitmaps": [{"flags": ["in-use", "auto"], "name": "repl-0", "granularity": 65536}],
          "refcount-bits": 16, "corrupt": false, "extended-l2": false}}, "dirty-flag": false}"#;
        let i = parse_info(j).unwrap();
        assert_eq!(i.virtual_size, 64 << 20);
        assert_eq!(i.compat.as_deref(), Some("1.1"));
        assert!(i.bitmaps[0].enabled() && i.bitmaps[0].inconsistent());
        assert_eq!(i.backing_filename, None);
    }

    #[test]
    fn relative_paths_cannot_be_protocols() {
        assert_eq!(p(Path::new("nbd:x")), OsString::from("./nbd:x"));
        assert_eq!(p(Path::new("/a/b")), OsString::from("/a/b"));
        assert_eq!(
            untrusted_opts(Path::new("/a,b")),
            OsString::from("driver=qcow2,file.driver=file,file.filename=/a,,b,backing=")
        );
    }
}
