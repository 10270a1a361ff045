//! Enabling replication of a VM: settings, reaching the replica server, the replica's view
//! of the VM, boot files, and the export folder of an initial copy sent out of band.

use crate::db::now_ms;
use crate::db::NewRelationship;
use crate::error::HostError;
use crate::host::Host;
use crate::lifecycle::PrimaryEvent;
use crate::peer::client::PeerClient;
use crate::peer::proto::{PeerRequest, PeerResponse, PointPolicy};
use crate::primary::insert;
use crate::primary::load;
use crate::primary::spawn;
use crate::primary::{BootFileError, EnableError};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use uuid::Uuid;
use vmrepl_types::replication::{InitialReplication, ReplicationSettings};
use vmrepl_types::{VmDefinition, VmName};

/// Splits `host:port` and gives the name the replica's certificate must carry.
pub(crate) fn replica_target(s: &ReplicationSettings) -> Result<(String, String), EnableError> {
    let (host, port) =
        s.replica_server
            .rsplit_once(':')
            .ok_or_else(|| EnableError::NotHostPort {
                server: s.replica_server.clone(),
            })?;
    port.parse::<u16>().map_err(|_| EnableError::BadPort {
        port: port.to_string(),
    })?;
    let name = s
        .replica_host_name
        .clone()
        .unwrap_or_else(|| host.to_string());
    Ok((s.replica_server.clone(), name))
}

pub(crate) async fn connect(
    d: &Host,
    s: &ReplicationSettings,
) -> Result<(PeerClient, vmrepl_types::HostInfo), String> {
    let (addr, name) = replica_target(s).map_err(|e| e.to_string())?;
    PeerClient::connect(&d.identity, d.vmm.caps(), &addr, &name)
        .await
        .map_err(|e| e.to_string())
}

/// The disks a relationship replicates, as (node, size).
pub(crate) fn replicated_disks(vm: &VmDefinition, s: &ReplicationSettings) -> Vec<(String, u64)> {
    vm.disks
        .iter()
        .filter(|d| !s.exclude_disks.contains(&d.id))
        .map(|d| (d.id.clone(), d.size_bytes))
        .collect()
}

/// Refuses a disk id among `ids` that `vm` (named `name`) does not have, naming the ones it has.
pub(crate) fn disks_exist<'a>(
    vm: &VmDefinition,
    name: &str,
    ids: impl IntoIterator<Item = &'a String>,
) -> Result<(), EnableError> {
    match ids.into_iter().find(|x| vm.disk(x).is_none()) {
        None => Ok(()),
        Some(x) => Err(EnableError::NoSuchDisk {
            vm: name.to_string(),
            disk: x.clone(),
            disks: vm
                .disks
                .iter()
                .map(|d| d.id.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

/// The VM as its replica keeps it: without the excluded disks.
pub fn replica_view(vm: &VmDefinition, s: &ReplicationSettings) -> VmDefinition {
    let mut out = vm.clone();
    out.disks.retain(|x| !s.exclude_disks.contains(&x.id));
    out
}

/// The recovery-point policy the replica is asked to keep.
pub(crate) fn point_policy(s: &ReplicationSettings) -> PointPolicy {
    PointPolicy {
        keep: s.recovery_points,
        interval_secs: s.recovery_point_interval_secs,
    }
}

/// Enables replication of a VM (Hyper-V's Enable-VMReplication).
pub async fn enable(
    d: &Arc<Host>,
    name: &VmName,
    settings: ReplicationSettings,
) -> Result<String, HostError> {
    settings
        .validate()
        .map_err(|why| EnableError::InvalidSettings { why })?;
    let vm = d.vmm.show(name)?.definition;
    if load(d, vm.uuid)?.is_some() {
        return Err(EnableError::AlreadyEnabled {
            vm: name.to_string(),
        }
        .into());
    }
    disks_exist(&vm, name.as_str(), &settings.exclude_disks)?;
    if replicated_disks(&vm, &settings).is_empty() {
        return Err(EnableError::NoDiskLeft {
            vm: name.to_string(),
        }
        .into());
    }
    match &settings.initial {
        InitialReplication::NetworkNow => {}
        InitialReplication::NetworkAt { unix_secs } => {
            let now = now_ms() / 1000;
            if *unix_secs > now + 7 * 86400 {
                return Err(EnableError::ScheduledTooFar.into());
            }
        }
        InitialReplication::Export { folder } => check_export_folder(folder)?,
        InitialReplication::ExistingCopy => {}
    }
    let (mut client, theirs) = check_replica_server(d, &settings, &vm).await?;
    let replica_vm = replica_view(&vm, &settings);
    let ask = |r: PeerResponse, what: &'static str| answer(&theirs, r, what);
    let rel_id = Uuid::new_v4();
    let policy = point_policy(&settings);
    let my_addr = d
        .cfg()
        .advertised()
        .map_err(|why| crate::primary::EnableError::NoAdvertisedAddress { why })?;
    let existing_copy = settings.initial == InitialReplication::ExistingCopy;
    let r = client
        .request(&PeerRequest::CreateReplica {
            vm: Box::new(replica_vm),
            relationship: rel_id,
            policy,
            primary_server: Some(my_addr),
            existing_copy,
        })
        .await
        .map_err(EnableError::Request)?;
    ask(
        r,
        if existing_copy {
            "take its existing copy of the VM as the replica"
        } else {
            "create the replica VM"
        },
    )?;
    if let Err(e) = send_boot_files(&mut client, &vm, &[]).await {
        // Every cycle tries again; a failover on the replica waits for them and says so.
        tracing::warn!(target: "vmrepl::replication", vm = %name, "boot files not sent yet: {e}");
    }
    // An existing copy on the replica is brought to this VM's state by block compare: the
    // resynchronization algorithm, from sequence 0.
    let note = matches!(settings.initial, InitialReplication::ExistingCopy).then(|| {
        format!(
            "Initial replication from the existing copy on {}: only the blocks that differ are sent.",
            theirs.host_name
        )
    });
    insert(
        d,
        NewRelationship {
            vm: vm.uuid,
            rel_id,
            settings: &settings,
            replica_name: &theirs.host_name,
            acked_seq: 0,
            note: note.as_deref(),
        },
        PrimaryEvent::Enabled {
            initial: (&settings.initial).into(),
        },
    )?;
    spawn(d, vm.uuid);
    Ok(format!(
        "Replication of {name} to {} enabled ({}); initial replication {}.",
        theirs.host_name,
        settings.replica_server,
        match &settings.initial {
            InitialReplication::NetworkAt { unix_secs } =>
                format!("scheduled at unix time {unix_secs}"),
            InitialReplication::Export { folder } => format!(
                "is being exported to {}; carry it to {} and run `vmrepl replication import {name} --from {}` there",
                export_file(folder, name).display(),
                theirs.host_name,
                export_file(folder, name).display()
            ),
            InitialReplication::ExistingCopy => format!(
                "compares the copy on {} with this VM and sends only the blocks that differ",
                theirs.host_name
            ),
            InitialReplication::NetworkNow => "starts now".into(),
        }
    ))
}

/// Connects to the replica server `settings` name and checks that its QEMU runs `vm` exactly
/// as it is (I7), before a relationship is set up towards it (enable, reverse).
/// The replica server's answer to a step: Ok, or its refusal as the error that names it.
fn answer(
    theirs: &vmrepl_types::HostInfo,
    r: PeerResponse,
    what: &'static str,
) -> Result<(), EnableError> {
    match r {
        PeerResponse::Ok => Ok(()),
        PeerResponse::Refused { message, .. } => Err(EnableError::Refused {
            replica: theirs.host_name.clone(),
            what,
            message,
        }),
        other => Err(EnableError::UnexpectedAnswer {
            answer: format!("{other:?}"),
        }),
    }
}

/// Reaches the replica server of `settings` and asks whether it would host `vm` (runs it,
/// authorizes this host, has room): before anything is created, on enable and when
/// `replication set` moves a replica there.
pub(crate) async fn check_replica_server(
    d: &Host,
    settings: &ReplicationSettings,
    vm: &VmDefinition,
) -> Result<(PeerClient, vmrepl_types::HostInfo), HostError> {
    let (mut client, theirs) = reach_replica(d, settings, vm).await?;
    let r = client
        .request(&PeerRequest::CheckReplica {
            vm: Box::new(replica_view(vm, settings)),
        })
        .await
        .map_err(EnableError::Request)?;
    answer(&theirs, r, "host this VM")?;
    Ok((client, theirs))
}

pub(crate) async fn reach_replica(
    d: &Host,
    settings: &ReplicationSettings,
    vm: &VmDefinition,
) -> Result<(PeerClient, vmrepl_types::HostInfo), HostError> {
    let (addr, name) = replica_target(settings)?;
    let (client, theirs) = PeerClient::connect(&d.identity, d.vmm.caps(), &addr, &name)
        .await
        .map_err(|source| HostError::Peer {
            server: settings.replica_server.clone(),
            doing: format!("replicate VM {}", vm.name),
            source,
        })?;
    theirs
        .check_runs(vm)
        .map_err(|why| EnableError::ReplicaCannotRun {
            replica: theirs.host_name.clone(),
            vm: vm.name.to_string(),
            why,
        })?;
    Ok((client, theirs))
}

/// A VM that boots a kernel directly: its kernel and initrd travel to the replica like its
/// disks (the replica never boots a path this host names), sent at enable and reverse and
/// again by any cycle that finds the replica's copy different (`held`: what the replica
/// holds, with digests).
pub(crate) async fn send_boot_files(
    client: &mut PeerClient,
    vm: &VmDefinition,
    held: &[(crate::peer::proto::BootFile, String)],
) -> Result<(), BootFileError> {
    use crate::peer::proto::BootFile;
    let Some(k) = &vm.kernel else {
        return Ok(());
    };
    let files = [
        (BootFile::Kernel, Some(&k.kernel)),
        (BootFile::Initrd, k.initrd.as_ref()),
    ];
    for (file, path) in files {
        let Some(path) = path else { continue };
        let p = path.clone();
        let sum = tokio::task::spawn_blocking(move || boot_file_digest(&p))
            .await
            .map_err(BootFileError::Task)?
            .map_err(|source| BootFileError::Read {
                file: file.file_name(),
                path: path.clone(),
                source,
            })?;
        if held
            .iter()
            .any(|(f, h)| *f == file && h.eq_ignore_ascii_case(&sum.1))
        {
            continue;
        }
        match client
            .put_boot_file(vm.uuid, file, path, sum)
            .await
            .map_err(BootFileError::Send)?
        {
            PeerResponse::Ok => {
                tracing::info!(target: "vmrepl::replication", vm = %vm.name, file = file.file_name(), "boot file sent to the replica");
            }
            other => {
                return Err(BootFileError::NotKept {
                    file: file.file_name(),
                    answer: format!("{other:?}"),
                })
            }
        }
    }
    Ok(())
}

/// Size and BLAKE3 digest (hex) of a boot file, remembered while its size and modification
/// time stay the same (a kernel is read once, not every cycle).
pub(crate) fn boot_file_digest(path: &Path) -> std::io::Result<(u64, String)> {
    type Seen = HashMap<PathBuf, (u64, std::time::SystemTime, String)>;
    static SEEN: std::sync::OnceLock<Mutex<Seen>> = std::sync::OnceLock::new();
    let meta = std::fs::metadata(path)?;
    let (len, mtime) = (meta.len(), meta.modified()?);
    let seen = SEEN.get_or_init(Default::default);
    if let Some((l, m, h)) = crate::locks::unpoisoned(seen).get(path) {
        if *l == len && *m == mtime {
            return Ok((len, h.clone()));
        }
    }
    let mut hasher = blake3::Hasher::new();
    hasher.update_reader(std::fs::File::open(path)?)?;
    let hex = hasher.finalize().to_hex().to_string();
    crate::locks::unpoisoned(seen).insert(path.to_path_buf(), (len, mtime, hex.clone()));
    Ok((len, hex))
}

/// Where the initial copy of VM `name` goes when exported to `folder` (external media).
pub fn export_file(folder: &Path, name: &VmName) -> PathBuf {
    folder.join(format!("{name}.vmrlog"))
}

/// An export folder must be an existing, writable directory given by an absolute path.
pub(crate) fn check_export_folder(folder: &Path) -> Result<(), EnableError> {
    if !folder.is_absolute() {
        return Err(EnableError::ExportNotAbsolute {
            folder: folder.to_path_buf(),
        });
    }
    if !folder.is_dir() {
        return Err(EnableError::ExportNotAFolder {
            folder: folder.to_path_buf(),
        });
    }
    let probe = folder.join(format!(".vmrepl-probe-{}", std::process::id()));
    std::fs::write(&probe, b"").map_err(|source| EnableError::ExportNotWritable {
        folder: folder.to_path_buf(),
        source,
    })?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replica_targets_need_a_port_and_default_to_the_host_part_as_name() {
        let s = ReplicationSettings::new("hostb.example:7443");
        assert_eq!(replica_target(&s).unwrap().1, "hostb.example");
        assert!(replica_target(&ReplicationSettings::new("nohost")).is_err());
        assert!(replica_target(&ReplicationSettings::new("h:xx")).is_err());
    }
}
