//! What arrives from the primary before it is applied: spooled logs accepted once verified,
//! and the boot files (UEFI variables) with their digests.

use crate::db::ReplicaRow;
use crate::replica::check_header;
use crate::replica::vm_dir;
use std::path::Path;

/// Why a spooled log was not accepted.
#[derive(Debug)]
pub enum Unaccepted {
    /// It failed verification and was removed.
    Bad(String),
    /// It verified but could not be made durable; it stays in the spool.
    NotDurable(String),
}

/// A log checked whole as it was received: its header, or why it is bad.
pub type Verified = Result<vmrepl_log::LogHeader, String>;

/// Verifies the partial log `seq` (on `base`) in the replica's spool whole: its checksums, then
/// VM, sequence, base, disks and sizes against the replica (I4), and its kind when `kind` is
/// given; then makes it durable under its verified name (I1). A log that fails verification is
/// removed. Logs received over the network and initial copies imported from external media
/// both come through here. `verified` is the result of checking the log while it arrived
/// ([`vmrepl_log::verify_reader`] over the received bytes); without it the file is verified
/// here.
pub async fn accept_spooled(
    row: &ReplicaRow,
    seq: u64,
    base: u64,
    kind: Option<vmrepl_log::LogKind>,
    verified: Option<Verified>,
) -> Result<(), Unaccepted> {
    let (dir, uuid) = (vm_dir(row), row.vm_uuid);
    let disks: Vec<(String, u64)> = row
        .definition
        .disks
        .iter()
        .map(|x| (x.id.clone(), x.size_bytes))
        .collect();
    tokio::task::spawn_blocking(move || {
        let partial = vmrepl_store::spool::partial_path(&dir, seq);
        let verified = verified
            .unwrap_or_else(|| {
                vmrepl_log::verify(&partial)
                    .map(|(h, _)| h)
                    .map_err(|e| e.to_string())
            })
            .and_then(|h| {
                check_header(&h, uuid, seq, base, &disks)?;
                match kind {
                    Some(k) if h.kind != k => Err(format!(
                        "it is a {:?} log where a {k:?} log was expected",
                        h.kind
                    )),
                    _ => Ok(()),
                }
            });
        if let Err(e) = verified {
            let _ = std::fs::remove_file(&partial);
            return Err(Unaccepted::Bad(e));
        }
        vmrepl_store::spool::accept(&dir, seq)
            .map(drop)
            .map_err(|e| Unaccepted::NotDurable(e.to_string()))
    })
    .await
    .unwrap_or_else(|e| Err(Unaccepted::NotDurable(e.to_string())))
}

/// Puts the received, verified boot file `tmp` in place as `file` in the replica's `boot`
/// folder, with its digest beside it (`NAME.b3`): durable before it is acknowledged.
pub fn place_boot_file(
    boot: &Path,
    file: crate::peer::proto::BootFile,
    tmp: &Path,
    hex: &str,
) -> Result<(), String> {
    let to = boot.join(file.file_name());
    let sum = boot.join(format!("{}.b3", file.file_name()));
    // The digest goes first: a crash between the two leaves a digest that does not match the
    // file, and the primary sends the file again.
    crate::fsutil::write_atomic(&sum, hex.as_bytes()).map_err(|e| e.to_string())?;
    std::fs::rename(tmp, &to).map_err(|e| format!("{}: {e}", to.display()))?;
    std::fs::File::open(boot)
        .and_then(|d| d.sync_all())
        .map_err(|e| format!("{}: {e}", boot.display()))
}

/// The boot files a replica keeps, with their digests (see [`place_boot_file`]).
pub fn boot_files(vm_dir: &Path) -> Vec<(crate::peer::proto::BootFile, String)> {
    use crate::peer::proto::BootFile;
    let boot = vm_dir.join("boot");
    [BootFile::Kernel, BootFile::Initrd]
        .into_iter()
        .filter(|f| boot.join(f.file_name()).is_file())
        .filter_map(|f| {
            let hex = std::fs::read_to_string(boot.join(format!("{}.b3", f.file_name()))).ok()?;
            Some((f, hex.trim().to_string()))
        })
        .collect()
}
