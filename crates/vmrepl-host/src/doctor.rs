//! `vmrepl doctor`: the checks behind "why does replication not work", each a [`Finding`] that
//! names the cause and the fix, in the order an admin would look (the article's
//! troubleshooting steps): this host's own settings; then, towards a replica server, the name,
//! the port (a refused connection told apart from dropped packets by how it fails), the
//! mutual TLS handshake and certificates, the authorization, and whether that host's QEMU can
//! run each VM. A check that cannot pass stops the ones that depend on it.

use crate::host::Host;
use crate::peer::client::{PeerClient, PeerError};
use crate::peer::proto::{PeerRequest, PeerResponse, RefusalCode};
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;
use vmrepl_types::api::{ApiError, ErrorCode, Finding, FindingStatus};
use vmrepl_types::name::VmName;
use vmrepl_types::replication::{Health, Role};
use vmrepl_types::VmDefinition;

/// How long the TCP connection may take before the packets count as dropped.
pub const TCP_DEADLINE: Duration = Duration::from_secs(5);
/// How long the handshake and hello may take.
const TLS_DEADLINE: Duration = Duration::from_secs(15);
/// Clocks further apart than this are a warning.
const CLOCK_WARN_SECS: u64 = 60;
/// A certificate that ends sooner than this is a warning.
const CERT_WARN_DAYS: i64 = 30;

fn f(check: &str, status: FindingStatus, message: String, fix: Option<String>) -> Finding {
    Finding {
        check: check.to_string(),
        status,
        message,
        fix,
    }
}

fn ok(check: &str, message: String) -> Finding {
    f(check, FindingStatus::Ok, message, None)
}

fn warn(check: &str, message: String, fix: &str) -> Finding {
    f(
        check,
        FindingStatus::Warning,
        message,
        Some(fix.to_string()),
    )
}

fn fail(check: &str, message: String, fix: String) -> Finding {
    f(check, FindingStatus::Fail, message, Some(fix))
}

/// Runs the checks [`vmrepl_types::api::Request::Doctor`] asks for.
pub async fn run(
    host: &Arc<Host>,
    replica_server: Option<String>,
    replica_name: Option<String>,
    vm: Option<&VmName>,
) -> Result<Vec<Finding>, ApiError> {
    let vms = local_vms(host)?;
    let mut out = Vec::new();
    match (replica_server, vm) {
        (Some(server), vm) => {
            let chosen: Vec<VmDefinition> = match vm {
                Some(n) => vec![vms
                    .iter()
                    .find(|d| d.name == *n)
                    .cloned()
                    .ok_or_else(|| not_found(n))?],
                None => vms.clone(),
            };
            let name = replica_name.unwrap_or_else(|| host_part(&server).to_string());
            out.push(own_certificate(host));
            out.extend(towards(host, &server, &name, &chosen).await);
        }
        (None, Some(n)) => out.extend(relationship(host, n, &vms).await?),
        (None, None) => {
            out.extend(this_host(host));
            let mut servers: Vec<(String, String)> = Vec::new();
            for r in crate::primary::statuses(host).unwrap_or_default() {
                if let Some(target) = primary_target(host, r.vm_uuid) {
                    if !servers.contains(&target) {
                        servers.push(target);
                    }
                }
            }
            for (server, name) in servers {
                let theirs: Vec<VmDefinition> = vms
                    .iter()
                    .filter(|d| {
                        primary_target(host, d.uuid).as_ref().map(|t| &t.0) == Some(&server)
                    })
                    .cloned()
                    .collect();
                out.extend(towards(host, &server, &name, &theirs).await);
            }
        }
    }
    Ok(out)
}

fn not_found(n: &VmName) -> ApiError {
    ApiError::new(
        ErrorCode::NotFound,
        format!("No VM {n} on this host; `vmrepl vm list` shows the names."),
    )
}

fn local_vms(host: &Arc<Host>) -> Result<Vec<VmDefinition>, ApiError> {
    let db = host.db();
    db.list_vms()
        .map(|v| v.into_iter().map(|r| r.definition).collect())
        .map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))
}

fn host_part(server: &str) -> &str {
    server.rsplit_once(':').map_or(server, |(h, _)| h)
}

/// The replica server (`HOST:PORT`) and its certificate name of the primary relationship of
/// VM `vm`, if this host has one.
fn primary_target(host: &Arc<Host>, vm: Uuid) -> Option<(String, String)> {
    let db = host.db();
    let rel = db.relationship(vm).ok().flatten()?;
    let name = rel
        .settings
        .replica_host_name
        .clone()
        .unwrap_or_else(|| host_part(&rel.settings.replica_server).to_string());
    Some((rel.settings.replica_server.clone(), name))
}

/// This host's own certificate: expired (every peer refuses it), ending soon, or fine.
fn own_certificate(host: &Arc<Host>) -> Finding {
    let cert = host.identity.summary();
    let left = cert.not_after - time::OffsetDateTime::now_utc();
    if left.is_negative() {
        fail(
            "certificate",
            format!(
                "this host's certificate ({}) expired on {}",
                cert.subject,
                cert.not_after.date()
            ),
            "issue a new one (`vmrepl host issue-cert` on the CA host, then `host init --cert` \
             with it) and restart the daemon; every peer refuses an expired certificate"
                .into(),
        )
    } else if left.whole_days() < CERT_WARN_DAYS {
        warn(
            "certificate",
            format!(
                "this host's certificate ends in {} days ({})",
                left.whole_days(),
                cert.not_after.date()
            ),
            "renew it before it ends: replication stops the day it expires",
        )
    } else {
        ok(
            "certificate",
            format!(
                "this host's certificate names {} and is valid until {}",
                host.identity.host_name(),
                cert.not_after.date()
            ),
        )
    }
}

/// Where this host's UEFI firmware comes from: QEMU's firmware descriptors (each variant with
/// the descriptor file that gives it), the fixed paths of `ovmf_dir` (a warning: no descriptor
/// fits), or nowhere (generation 2 VMs cannot run here).
pub(crate) fn firmware_finding(caps: &vmrepl_types::HostInfo) -> Finding {
    use vmrepl_types::vm::FirmwareVariantId;
    let uefi: Vec<_> = caps
        .firmware
        .iter()
        .filter(|f| f.id != FirmwareVariantId::Seabios)
        .collect();
    if uefi.is_empty() {
        return warn(
            "firmware",
            "no UEFI firmware (OVMF) was found: generation 2 VMs cannot be created or run here"
                .into(),
            "install the distribution's ovmf package and restart the daemon",
        );
    }
    let describe = |f: &vmrepl_types::FirmwareVariant| match &f.descriptor {
        Some(d) => format!("{} from {}", f.id, d.display()),
        None => format!("{} at {}", f.id, f.code.display()),
    };
    let (described, fixed): (Vec<_>, Vec<_>) =
        uefi.into_iter().partition(|f| f.descriptor.is_some());
    let list = |v: &[&vmrepl_types::FirmwareVariant]| {
        v.iter().map(|f| describe(f)).collect::<Vec<_>>().join(", ")
    };
    if described.is_empty() {
        return warn(
            "firmware",
            format!(
                "UEFI firmware comes from fixed paths only ({}): no QEMU firmware descriptor fits",
                list(&fixed)
            ),
            "install the distribution's ovmf package, which ships descriptors in \
             /usr/share/qemu/firmware, or write one in /etc/qemu/firmware (docs/install.md)",
        );
    }
    let mut message = format!(
        "UEFI firmware from QEMU's firmware descriptors: {}",
        list(&described)
    );
    if !fixed.is_empty() {
        message.push_str(&format!(
            "; for the other machine types, fixed paths: {}",
            list(&fixed)
        ));
    }
    ok("firmware", message)
}

/// This host's own settings: certificate, storage, QEMU, firmware, metrics.
fn this_host(host: &Arc<Host>) -> Vec<Finding> {
    let mut out = vec![own_certificate(host)];
    let caps = host.vmm.caps();
    for s in host.cfg().storage.clone() {
        match vmrepl_qemu::caps::storage_info(&s) {
            Ok(i) if i.free_bytes < (1 << 30) || i.free_bytes < i.total_bytes / 20 => {
                out.push(warn(
                    "storage",
                    format!(
                        "storage folder {} has {} MiB free of {} MiB",
                        s.display(),
                        i.free_bytes >> 20,
                        i.total_bytes >> 20
                    ),
                    "free space there or add a storage folder: new disks, recovery points and \
                     received logs need room",
                ))
            }
            Ok(i) => out.push(ok(
                "storage",
                format!(
                    "storage folder {} has {} GiB free",
                    s.display(),
                    i.free_bytes >> 30
                ),
            )),
            Err(e) => out.push(fail(
                "storage",
                format!("storage folder {} cannot be read: {e}", s.display()),
                format!(
                    "create it or fix its permissions, or remove it from `storage` in {}",
                    host.dd.config().display()
                ),
            )),
        }
    }
    out.push(ok(
        "qemu",
        format!(
            "QEMU {} runs {} machine types",
            caps.qemu_version,
            caps.machine_types.len()
        ),
    ));
    out.push(firmware_finding(caps));
    if caps.kvm_usable {
        out.push(ok("kvm", "KVM is usable".into()));
    } else {
        out.push(warn(
            "kvm",
            format!(
                "KVM is not usable ({}): VMs run emulated (TCG), much slower",
                caps.kvm_reason.clone().unwrap_or_default()
            ),
            "load the kvm module and give the daemon /dev/kvm, or accept TCG (`--accel tcg`)",
        ));
    }
    match host.metrics_url.get() {
        Some(u) => out.push(ok("metrics", format!("metrics are served at {u}"))),
        None => out.push(warn(
            "metrics",
            "no metrics page is served".into(),
            &format!(
                "set `metrics` in {} to a free IP:PORT (see docs/metrics.md)",
                host.dd.config().display()
            ),
        )),
    }
    out
}

/// A VM's relationship, from the side this host is on.
async fn relationship(
    host: &Arc<Host>,
    n: &VmName,
    vms: &[VmDefinition],
) -> Result<Vec<Finding>, ApiError> {
    let mut all = crate::primary::statuses(host).unwrap_or_default();
    all.extend(crate::replica::statuses(host));
    let Some(st) = all.into_iter().find(|s| s.vm == *n) else {
        return Err(ApiError::new(
            ErrorCode::NotFound,
            format!(
                "VM {n} does not replicate from or to this host; check a replica server before \
                 enabling with `vmrepl doctor --replica-server HOST:PORT --vm {n}`"
            ),
        ));
    };
    let mut out = vec![health_finding(&st)];
    if st.role == Role::Primary {
        if let Some((server, name)) = primary_target(host, st.vm_uuid) {
            let vm: Vec<VmDefinition> = vms.iter().filter(|d| d.name == *n).cloned().collect();
            out.extend(towards(host, &server, &name, &vm).await);
        }
    } else {
        // On the replica server: can this host reach the primary back (failover checks,
        // reverse replication)?
        let addr = {
            let db = host.db();
            db.replica(st.vm_uuid)
                .ok()
                .flatten()
                .and_then(|r| r.primary_server)
        };
        if let Some(addr) = addr {
            out.extend(reach(&addr, &st.primary_host).await.0);
        }
    }
    Ok(out)
}

fn health_finding(st: &vmrepl_types::replication::ReplicationStatus) -> Finding {
    let why = if st.health_details.is_empty() {
        String::new()
    } else {
        format!(": {}", st.health_details.join("; "))
    };
    let msg = format!(
        "{} of {} is {:?} ({}){why}",
        role(st.role),
        st.vm,
        st.health,
        st.state
    );
    match st.health {
        Health::Critical => fail(
            "health",
            msg,
            "see `vmrepl events --vm` for what happened and `vmrepl replication status` for \
             what to run"
                .into(),
        ),
        Health::Warning => warn(
            "health",
            msg,
            "see `vmrepl replication status` for the reasons",
        ),
        _ => ok("health", msg),
    }
}

fn role(r: Role) -> &'static str {
    match r {
        Role::Primary => "replication",
        Role::Replica | Role::TestReplica => "the replica",
    }
}

/// Name, then TCP: returns the findings and whether the port answered.
async fn reach(server: &str, who: &str) -> (Vec<Finding>, bool) {
    let mut out = Vec::new();
    let Some((hostname, port)) = server
        .rsplit_once(':')
        .and_then(|(h, p)| p.parse::<u16>().ok().map(|p| (h, p)))
    else {
        out.push(fail(
            "address",
            format!("{server:?} is not HOST:PORT"),
            "give the replica server as HOST:PORT, e.g. hostb.example.org:7443".into(),
        ));
        return (out, false);
    };
    let addrs: Vec<std::net::SocketAddr> =
        match tokio::time::timeout(TCP_DEADLINE, tokio::net::lookup_host(server)).await {
            Ok(Ok(a)) => a.collect(),
            Ok(Err(e)) => {
                out.push(fail(
                    "resolve",
                    format!("the name {hostname} of {who} does not resolve: {e}"),
                    format!(
                        "fix DNS or /etc/hosts for {hostname}, or give its IP address \
                         (with --replica-name NAME-IN-ITS-CERTIFICATE)"
                    ),
                ));
                return (out, false);
            }
            Err(_) => {
                out.push(fail(
                    "resolve",
                    format!(
                        "resolving {hostname} took more than {} s",
                        TCP_DEADLINE.as_secs()
                    ),
                    "check the DNS servers in /etc/resolv.conf".into(),
                ));
                return (out, false);
            }
        };
    let Some(addr) = addrs.first().copied() else {
        out.push(fail(
            "resolve",
            format!("the name {hostname} has no address"),
            format!("fix DNS or /etc/hosts for {hostname}"),
        ));
        return (out, false);
    };
    out.push(ok(
        "resolve",
        format!("{hostname} resolves to {}", addr.ip()),
    ));
    let t0 = Instant::now();
    match tokio::time::timeout(TCP_DEADLINE, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(_)) => {
            out.push(ok(
                "tcp",
                format!(
                    "TCP port {port} of {} answers ({} ms)",
                    addr.ip(),
                    t0.elapsed().as_millis()
                ),
            ));
            (out, true)
        }
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            out.push(fail(
                "tcp",
                format!(
                    "{} refused the connection to port {port} at once ({} ms): the host is up but \
                     nothing listens there",
                    addr.ip(),
                    t0.elapsed().as_millis()
                ),
                format!(
                    "start the vmrepl daemon on {who} (`vmrepl daemon --background`), or check \
                     that `listen` in its configuration file is {server}"
                ),
            ));
            (out, false)
        }
        Ok(Err(e)) => {
            out.push(fail(
                "tcp",
                format!("{} port {port} is unreachable: {e}", addr.ip()),
                "check the route to that host (`ip route get`), and that it is up".into(),
            ));
            (out, false)
        }
        Err(_) => {
            out.push(fail(
                "tcp",
                format!(
                    "no answer from {} port {port} within {} s: the packets are dropped (a \
                     firewall rule) or the host is down",
                    addr.ip(),
                    TCP_DEADLINE.as_secs()
                ),
                format!(
                    "allow TCP port {port} in on {who}'s firewall (for example `nft add rule inet \
                     filter input tcp dport {port} accept`) and on the way there"
                ),
            ));
            (out, false)
        }
    }
}

/// Everything between this host and the replica server `server`, for `vms`.
async fn towards(host: &Arc<Host>, server: &str, name: &str, vms: &[VmDefinition]) -> Vec<Finding> {
    let who = format!("the replica server {name}");
    let (mut out, reached) = reach(server, &who).await;
    if !reached {
        return out;
    }
    let connected = tokio::time::timeout(
        TLS_DEADLINE,
        PeerClient::connect(&host.identity, host.vmm.caps(), server, name),
    )
    .await;
    let (mut client, theirs) =
        match connected {
            Ok(Ok(x)) => x,
            Ok(Err(PeerError::Tls(m))) => {
                out.push(fail(
                    "tls",
                    m,
                    "compare both hosts' `vmrepl host certificates`: each must trust the CA that \
                 issued the other's certificate (`vmrepl host trust CA.pem`), and the \
                 certificate must name the host as it is dialed (--replica-name)"
                        .into(),
                ));
                return out;
            }
            Ok(Err(PeerError::Refused { message, .. })) => {
                out.push(fail(
                    "tls",
                    format!("{who} refused this host at the handshake: {message}"),
                    "see the replica server's `vmrepl host certificates` and `replication server \
                 show`"
                        .into(),
                ));
                return out;
            }
            Ok(Err(e)) => {
                out.push(fail(
                    "tls",
                    format!("the handshake with {who} failed: {e}"),
                    "check the replica server's daemon log".into(),
                ));
                return out;
            }
            Err(_) => {
                out.push(fail(
                "tls",
                format!("the handshake with {who} took more than {} s", TLS_DEADLINE.as_secs()),
                "the port answers but the daemon does not: check that it is vmrepl, and its log"
                    .into(),
            ));
                return out;
            }
        };
    out.push(ok(
        "tls",
        format!(
            "mutual TLS with {} (certificate fingerprint {}); it runs vmrepl {} with QEMU {}, \
             protocol {}",
            client.peer().host_name,
            client.peer().fingerprint,
            theirs.release,
            theirs.qemu_version,
            client.version()
        ),
    ));
    // Clocks: vmrepl's correctness does not depend on them (sequences order everything), but
    // recovery point times, health's "behind by an hour" and certificates' validity do.
    if let Some(theirs_ms) = theirs.now_unix_ms {
        let ours = crate::db::now_ms();
        let skew = ours.abs_diff(theirs_ms) / 1000;
        if skew > CLOCK_WARN_SECS {
            out.push(warn(
                "clock",
                format!(
                    "{who}'s clock is {skew} s {} this host's",
                    if theirs_ms > ours {
                        "ahead of"
                    } else {
                        "behind"
                    }
                ),
                "run NTP (systemd-timesyncd or chrony) on both hosts: recovery point times, \
                 health and certificate validity read wrong across hosts otherwise",
            ));
        } else {
            out.push(ok(
                "clock",
                format!("{who}'s clock is within {CLOCK_WARN_SECS} s of this host's"),
            ));
        }
    }
    // Authorization: where the replica server would keep this host's replicas.
    match client.request(&PeerRequest::MyGrant).await {
        Ok(PeerResponse::Granted {
            storage,
            trust_group,
            free_bytes,
            entry,
        }) => out.push(ok(
            "authorization",
            format!(
                "{who} authorizes this host ({}) as a primary by its entry {entry:?}: replicas go \
                 to {} ({}), trust group {trust_group}",
                host.identity.host_name(),
                storage.display(),
                free_bytes.map_or("free space unknown".to_string(), |f| format!(
                    "{} GiB free",
                    f >> 30
                ))
            ),
        )),
        Ok(PeerResponse::Refused {
            code: RefusalCode::BadRequest,
            ..
        }) => out.extend(authorized_old(host, &mut client, &who).await),
        Ok(PeerResponse::Refused { message, .. }) => {
            out.push(fail(
                "authorization",
                format!("{who} does not take replicas from this host: {message}"),
                format!(
                    "on {name}: `vmrepl replication server set --enable` and `vmrepl replication \
                     server authorize --primary {} --storage DIR`",
                    host.identity.host_name()
                ),
            ));
            return out;
        }
        Ok(other) => out.push(warn(
            "authorization",
            format!("unexpected answer from {who}: {other:?}"),
            "run the same release on both hosts",
        )),
        Err(e) => {
            out.push(fail(
                "authorization",
                format!("asking {who} failed: {e}"),
                "check the replica server's daemon log".into(),
            ));
            return out;
        }
    }
    if out
        .last()
        .is_some_and(|f| f.check == "authorization" && f.status == FindingStatus::Fail)
    {
        return out;
    }
    for vm in vms {
        let check = format!("vm:{}", vm.name);
        if let Err(why) = theirs.check_runs(vm) {
            out.push(fail(
                &check,
                format!("{who} cannot run VM {}: {why}", vm.name),
                "install a QEMU there that provides it, or replicate to another host".into(),
            ));
            continue;
        }
        let replicating = primary_target(host, vm.uuid).is_some_and(|(s, _)| s == server);
        let answer = if replicating {
            client
                .request(&PeerRequest::ReplicaState { vm_uuid: vm.uuid })
                .await
        } else {
            let settings = vmrepl_types::replication::ReplicationSettings::new(server);
            client
                .request(&PeerRequest::CheckReplica {
                    vm: Box::new(crate::primary::replica_view(vm, &settings)),
                })
                .await
        };
        match answer {
            Ok(PeerResponse::Ok) => out.push(ok(
                &check,
                format!(
                    "{who} can run VM {} (machine type {}, generation {}) and has room for it",
                    vm.name, vm.machine_type, vm.generation
                ),
            )),
            Ok(PeerResponse::ReplicaState { last_applied, .. }) => out.push(ok(
                &check,
                format!(
                    "{who} keeps the replica of VM {}, at log {last_applied}",
                    vm.name
                ),
            )),
            Ok(PeerResponse::Refused { message, .. }) => out.push(fail(
                &check,
                format!("{who} would refuse VM {}: {message}", vm.name),
                "see the sentence for what to change; free space or authorize another storage \
                 folder on the replica server if it is room"
                    .into(),
            )),
            Ok(other) => out.push(warn(
                &check,
                format!("unexpected answer about VM {}: {other:?}", vm.name),
                "run the same release on both hosts",
            )),
            Err(e) => out.push(fail(
                &check,
                format!("asking {who} about VM {} failed: {e}", vm.name),
                "check the replica server's daemon log".into(),
            )),
        }
        if !replicating {
            out.extend(existing_copy(&mut client, &who, vm).await);
        }
    }
    out
}

/// A VM that the replica server's admin designated as the existing copy of `vm` for this
/// host (`--initial-existing-copy`): whether it could become the replica. Nothing is said
/// when none is designated, or when the replica server is of a release that cannot tell.
async fn existing_copy(client: &mut PeerClient, who: &str, vm: &VmDefinition) -> Option<Finding> {
    let check = format!("existing-copy:{}", vm.name);
    let settings = vmrepl_types::replication::ReplicationSettings::new("doctor:0");
    let answer = client
        .request(&PeerRequest::CheckExistingCopy {
            vm: Box::new(crate::primary::replica_view(vm, &settings)),
        })
        .await
        .ok()?;
    match answer {
        PeerResponse::Ok => Some(ok(
            &check,
            format!(
                "the VM designated on {who} as the existing copy of {} matches it (generation {}, \
                 disks); `replication enable --initial-existing-copy` can start from it",
                vm.name, vm.generation
            ),
        )),
        PeerResponse::Refused {
            code: RefusalCode::NotAuthorized | RefusalCode::BadRequest,
            ..
        } => None,
        PeerResponse::Refused { message, .. } => Some(fail(
            &check,
            format!(
                "{who} has a copy of {} that cannot become its replica: {message}",
                vm.name
            ),
            "give the copy the VM's generation (BIOS or UEFI) and disks, or replicate over the \
             network instead (without --initial-existing-copy)"
                .into(),
        )),
        _ => None,
    }
}

/// Authorization as a replica server of an earlier release can tell it: asking for a VM
/// nobody replicates is answered "unknown VM" only once the primary passed authorization.
async fn authorized_old(host: &Arc<Host>, client: &mut PeerClient, who: &str) -> Option<Finding> {
    match client
        .request(&PeerRequest::ReplicaState {
            vm_uuid: Uuid::nil(),
        })
        .await
    {
        Ok(PeerResponse::Refused {
            code: RefusalCode::UnknownVm,
            ..
        }) => Some(ok(
            "authorization",
            format!(
                "{who} authorizes this host ({}) as a primary",
                host.identity.host_name()
            ),
        )),
        Ok(PeerResponse::Refused { message, .. }) => Some(fail(
            "authorization",
            format!("{who} does not take replicas from this host: {message}"),
            format!(
                "on the replica server: `vmrepl replication server authorize --primary {} \
                 --storage DIR`",
                host.identity.host_name()
            ),
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmrepl_types::vm::FirmwareVariantId;
    use vmrepl_types::{FirmwareVariant, HostInfo};

    fn caps(firmware: Vec<FirmwareVariant>) -> HostInfo {
        let mut h: HostInfo = serde_json::from_value(serde_json::json!({
            "host_name": "h.test", "release": "test", "protocol_versions": [1, 1],
            "qemu_version": "7.2.0", "machine_types": [], "firmware": [],
            "kvm_usable": false, "kvm_reason": null,
            "config_versions": [{"major": 1, "minor": 0}, {"major": 1, "minor": 0}],
            "storage": [],
        }))
        .unwrap();
        h.firmware = firmware;
        h
    }

    #[test]
    fn the_firmware_finding_names_each_descriptor_and_warns_on_fixed_paths_alone_or_no_ovmf() {
        let described = FirmwareVariant {
            id: FirmwareVariantId::Ovmf4m,
            code: "/usr/share/OVMF/OVMF_CODE_4M.fd".into(),
            vars_template: Some("/usr/share/OVMF/OVMF_VARS_4M.fd".into()),
            descriptor: Some("/usr/share/qemu/firmware/60-edk2-x86_64.json".into()),
            machines: vec!["pc-q35-*".into()],
        };
        let fixed = FirmwareVariant::fixed(
            FirmwareVariantId::Ovmf4mSecureBoot,
            "/usr/share/OVMF/OVMF_CODE_4M.ms.fd".into(),
            Some("/usr/share/OVMF/OVMF_VARS_4M.ms.fd".into()),
        );
        let seabios = FirmwareVariant::fixed(
            FirmwareVariantId::Seabios,
            "/usr/share/seabios/bios-256k.bin".into(),
            None,
        );

        let f = firmware_finding(&caps(vec![seabios.clone(), described.clone()]));
        assert_eq!(f.status, FindingStatus::Ok, "{f:?}");
        assert!(f
            .message
            .contains("ovmf-4m from /usr/share/qemu/firmware/60-edk2-x86_64.json"));

        let f = firmware_finding(&caps(vec![described, fixed.clone()]));
        assert_eq!(f.status, FindingStatus::Ok, "{f:?}");
        assert!(
            f.message
                .contains("fixed paths: ovmf-4m-secure-boot at /usr/share/OVMF/OVMF_CODE_4M.ms.fd"),
            "{f:?}"
        );

        let f = firmware_finding(&caps(vec![seabios.clone(), fixed]));
        assert_eq!(f.status, FindingStatus::Warning, "{f:?}");
        assert!(f.message.contains("fixed paths only"), "{f:?}");
        assert!(f.fix.unwrap().contains("/etc/qemu/firmware"));

        let f = firmware_finding(&caps(vec![seabios]));
        assert_eq!(f.status, FindingStatus::Warning, "{f:?}");
        assert!(f.message.contains("generation 2 VMs cannot"), "{f:?}");
        assert!(f.fix.unwrap().contains("ovmf"));
    }
}
