//! Opening a disk's qcow2 chain with imago, explicitly and layer by layer (I5).
//!
//! Every layer is opened with [`imago::DenyImplicitOpenGate`], so imago itself never opens a file
//! named in an image header (backing file or external data file). The backing of each layer is
//! set explicitly to the layer below it that *we* opened, and the header's backing name is checked
//! against the name this store wrote (a bare file name in the same folder, format qcow2). Anything
//! else is refused before the image is used.

use crate::error::{Result, StoreError};
use imago::file::File;
use imago::qcow2::Qcow2;
use imago::{
    DenyImplicitOpenGate, FormatAccess, FormatDriverBuilder, Storage, StorageOpenOptions,
    SyncFormatAccess,
};
use std::path::Path;

/// Opens the layer file itself. (Passing a path to the qcow2 builder would route even this
/// explicit open through the gate, which the deny gate refuses.)
fn open_file(path: &Path, writable: bool) -> Result<File> {
    open_file_with(path, writable, false)
}

/// [`open_file`], with direct I/O (`O_DIRECT`, no page cache) when `direct` and the file
/// system offers it (tmpfs does not: the file is then opened for buffered I/O).
fn open_file_with(path: &Path, writable: bool, direct: bool) -> Result<File> {
    if direct {
        if let Ok(f) = File::open_sync(
            StorageOpenOptions::new()
                .filename(path)
                .write(writable)
                .direct(true),
        ) {
            return Ok(f);
        }
    }
    File::open_sync(StorageOpenOptions::new().filename(path).write(writable)).map_err(|e| {
        StoreError::Image {
            action: "open",
            path: path.into(),
            source: e,
        }
    })
}

/// Opens one layer. `backing` is the already opened lower layer (None for `base.qcow2`);
/// `expected_backing` is the backing file name its header must carry.
fn open_layer(
    path: &Path,
    (writable, direct): (bool, bool),
    backing: Option<FormatAccess<File>>,
    expected_backing: Option<&str>,
    size: u64,
) -> Result<Qcow2<File>> {
    if !path.is_file() {
        return Err(StoreError::BadLayer {
            layer: path.into(),
            reason: "the file is missing".into(),
        });
    }
    let file = open_file_with(path, writable, direct)?;
    let qcow2 = Qcow2::<File>::builder(file)
        .write(writable)
        .backing(backing)
        .open_sync(DenyImplicitOpenGate::default())
        .map_err(|e| StoreError::Image {
            action: "open",
            path: path.into(),
            source: e,
        })?;
    let named = qcow2.implicit_backing_file().cloned();
    if named.as_deref() != expected_backing {
        return Err(StoreError::UntrustedBacking {
            layer: path.into(),
            named,
            expected: expected_backing.map(str::to_string),
        });
    }
    if expected_backing.is_some()
        && qcow2.implicit_backing_format().map(String::as_str) != Some("qcow2")
    {
        return Err(StoreError::BadLayer {
            layer: path.into(),
            reason: format!(
                "backing format is {:?}, expected \"qcow2\"",
                qcow2.implicit_backing_format()
            ),
        });
    }
    if qcow2.requires_external_data_file() {
        return Err(StoreError::BadLayer {
            layer: path.into(),
            reason: "it needs an external data file".into(),
        });
    }
    // A disk grown since a layer was made leaves that layer smaller: what lies past its end
    // reads as zeros. A layer larger than the disk is damage.
    let got = imago::format::drivers::FormatDriverInstance::size(&qcow2);
    if got > size || got == 0 {
        return Err(StoreError::BadLayer {
            layer: path.into(),
            reason: format!("virtual size is {got} bytes, expected at most {size}"),
        });
    }
    Ok(qcow2)
}

/// Opens the chain `layers[0] ← layers[1] ← … ← layers[n-1]` in `dir` (file names, base first).
/// The top (last) layer is writable if `writable_top`.
pub(crate) fn open_chain(
    dir: &Path,
    layers: &[String],
    writable_top: bool,
    size: u64,
) -> Result<SyncFormatAccess<File>> {
    open_chain_with(dir, layers, (writable_top, false), size)
}

/// [`open_chain`]; the writable top layer with direct I/O where possible when `direct_top`.
pub(crate) fn open_chain_with(
    dir: &Path,
    layers: &[String],
    (writable_top, direct_top): (bool, bool),
    size: u64,
) -> Result<SyncFormatAccess<File>> {
    let mut lower: Option<FormatAccess<File>> = None;
    let mut lower_name: Option<&str> = None;
    let last = layers.len().saturating_sub(1);
    for (i, name) in layers.iter().enumerate() {
        let path = dir.join(name);
        let writable = writable_top && i == last;
        let q = open_layer(
            &path,
            (writable, writable && direct_top),
            lower.take(),
            lower_name,
            size,
        )?;
        if i == last {
            return SyncFormatAccess::new(q).map_err(|e| StoreError::Image {
                action: "prepare synchronous access to",
                path,
                source: e,
            });
        }
        lower = Some(FormatAccess::new(q));
        lower_name = Some(name.as_str());
    }
    Err(StoreError::BadLayer {
        layer: dir.into(),
        reason: "the chain has no layers".into(),
    })
}

/// The backing file name in `path`'s header, read without opening anything it names.
pub(crate) fn header_backing(path: &Path) -> Result<Option<String>> {
    let file = open_file(path, false)?;
    let qcow2 = Qcow2::<File>::builder(file)
        .write(false)
        .backing(None)
        .open_sync(DenyImplicitOpenGate::default())
        .map_err(|e| StoreError::Image {
            action: "read the header of",
            path: path.into(),
            source: e,
        })?;
    Ok(qcow2.implicit_backing_file().cloned())
}
