//! Human-readable rendering of API answers. JSON output is the answer itself.

use std::process::ExitCode;
use vmrepl_types::api::{ErrorCode, Response, VmSummary};
use vmrepl_types::replication::ReplicationStatus;
use vmrepl_types::HostInfo;

/// Exit code per error class: 1 = refused (bad input, wrong state), 3 = not found,
/// 4 = environment (I/O, QEMU, peer), 5 = internal.
pub fn exit_code(code: ErrorCode) -> ExitCode {
    ExitCode::from(match code {
        ErrorCode::InvalidInput
        | ErrorCode::AlreadyExists
        | ErrorCode::WrongState
        | ErrorCode::Unsupported
        | ErrorCode::PermissionDenied => 1,
        ErrorCode::NotFound => 3,
        ErrorCode::Io | ErrorCode::Qemu | ErrorCode::Peer => 4,
        ErrorCode::Internal => 5,
    })
}

pub fn response(r: &Response) -> ExitCode {
    match r {
        Response::Ok { message } => println!("{message}"),
        Response::HostInfo(h) => host_info(h),
        Response::Vm(v) => vm(v),
        Response::VmList { vms } => vm_list(vms),
        Response::Console { text } => print!("{}", printable(text)),
        Response::ReplicaServer {
            listen,
            settings: s,
            revoked,
        } => {
            println!(
                "Replica server:      {}",
                if s.enabled { "enabled" } else { "disabled" }
            );
            println!("Authentication:      certificate (mutual TLS)");
            println!("Listener:            {listen}");
            if s.allow_any {
                println!(
                    "Authorization:       any authenticated host -> {} (trust group DEFAULT)",
                    s.default_storage
                        .as_ref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default()
                );
            } else {
                println!("Authorization:       listed hosts only");
            }
            println!(
                "Removed replicas:    {}",
                if s.allow_remote_delete {
                    "a primary may delete their data here"
                } else {
                    "their data is kept here (only this host's admin deletes it)"
                }
            );
            for e in &s.entries {
                println!(
                    "  {:<30} -> {} (trust group {})",
                    e.primary,
                    e.storage.display(),
                    e.trust_group
                );
                if let Some(i) = &e.issuer {
                    println!("  {:<30}    issuer CA SHA-256 {i}", "");
                }
                if let Some(p) = &e.pin {
                    println!("  {:<30}    pinned certificate SHA-256 {p}", "");
                }
            }
            revocations(revoked);
        }
        Response::Certificates(c) => {
            println!(
                "Certificate:         {} (SHA-256 {})",
                c.host_name, c.fingerprint
            );
            println!("Trusted CAs:");
            for ca in &c.trusted_cas {
                println!("  {} (SHA-256 {})", ca.subject, ca.fingerprint);
            }
            revocations(&c.revoked);
        }
        Response::Replication { relationships } => replication(relationships),
        Response::RecoveryPoints { vm, points } => {
            println!("Recovery points of {vm} (oldest first):");
            println!("  {:>8}  {:<25}  {:<15}", "POINT", "TIME (UTC)", "KIND");
            for p in points {
                println!(
                    "  {:>8}  {:<25}  {:<15}{}",
                    p.seq,
                    utc(p.unix_ms),
                    vmrepl_types::wire_name(&p.consistency),
                    if p.latest { "  latest" } else { "" }
                );
            }
        }
        Response::ReplicaNetworks { vm, adapters } => {
            println!("Networks of {vm}'s adapters on this host:");
            println!(
                "  {:>7}  {:<17}  {:<22}  {:<22}  FAILOVER TCP/IP",
                "ADAPTER", "MAC", "FAILOVER", "TEST FAILOVER"
            );
            for a in adapters {
                println!(
                    "  {:>7}  {:<17}  {:<22}  {:<22}  {}",
                    a.adapter,
                    a.mac,
                    nic_text(&a.failover),
                    nic_text(&a.test),
                    a.failover_ip
                        .as_ref()
                        .map_or("-".to_string(), |ip| ip.to_string())
                );
            }
        }
        Response::Doctor { findings: f } => findings(f),
        Response::Measure { relationships } => relationships.iter().for_each(measure),
        Response::Events { events } => {
            if events.is_empty() {
                println!("No events.");
            }
            for e in events {
                event_line(e);
            }
        }
        Response::Error(e) => {
            eprintln!("error: {}", e.message);
            return exit_code(e.code);
        }
    }
    ExitCode::SUCCESS
}

fn nic_text(m: &vmrepl_types::NicMode) -> String {
    use vmrepl_types::NicMode;
    match m {
        NicMode::User => "user".into(),
        NicMode::NotConnected => "not connected".into(),
        NicMode::Tap { ifname } => format!("tap:{ifname}"),
        NicMode::Bridge { bridge } => format!("bridge:{bridge}"),
    }
}

fn revocations(revoked: &[vmrepl_types::replication::RevokedCert]) {
    if revoked.is_empty() {
        println!("Revoked certificates: none");
        return;
    }
    println!("Revoked certificates:");
    for r in revoked {
        println!(
            "  {}  {}{}{}",
            r.fingerprint,
            utc(r.revoked_at_unix.saturating_mul(1000) as i64),
            r.subject
                .as_ref()
                .map(|s| format!("  {s}"))
                .unwrap_or_default(),
            r.reason
                .as_ref()
                .map(|s| format!("  ({s})"))
                .unwrap_or_default()
        );
    }
}

/// Where a firmware entry comes from: its QEMU descriptor and machine types, or a fixed path.
fn firmware_source(f: &vmrepl_types::FirmwareVariant) -> String {
    match &f.descriptor {
        Some(d) => format!(
            "from descriptor {}, machine types {}",
            d.display(),
            f.machines.join(" ")
        ),
        None if f.id == vmrepl_types::vm::FirmwareVariantId::Seabios => {
            "fixed path (seabios_dir)".to_string()
        }
        None => "fixed path (ovmf_dir): no firmware descriptor gives it".to_string(),
    }
}

fn host_info(h: &HostInfo) {
    println!("Host:                {}", h.host_name);
    println!("vmrepl release:      {}", h.release);
    println!(
        "Protocol versions:   {}..{}",
        h.protocol_versions.0, h.protocol_versions.1
    );
    println!("QEMU:                {}", h.qemu_version);
    println!(
        "Metrics:             {}",
        h.metrics_url
            .as_deref()
            .unwrap_or("not served (see `metrics` in the configuration file)")
    );
    println!(
        "Dashboard:           {}",
        h.dashboard_url
            .as_deref()
            .unwrap_or("not served (see `dashboard` in the configuration file)")
    );
    println!(
        "KVM:                 {}",
        if h.kvm_usable {
            "usable".to_string()
        } else {
            format!("not usable ({})", h.kvm_reason.clone().unwrap_or_default())
        }
    );
    println!(
        "Config versions:     {} to {}",
        h.config_versions.0, h.config_versions.1
    );
    println!("Firmware:");
    for f in &h.firmware {
        println!("  {:<22} {}", f.id.as_str(), f.code.display());
        println!("  {:<22} {}", "", firmware_source(f));
    }
    println!("Machine types:       {}", h.machine_types.join(", "));
    println!("Storage:");
    for s in &h.storage {
        println!(
            "  {:<40} {:>8.1} GiB free of {:.1} GiB",
            s.path.display(),
            s.free_bytes as f64 / (1u64 << 30) as f64,
            s.total_bytes as f64 / (1u64 << 30) as f64
        );
    }
}

fn vm(v: &VmSummary) {
    let d = &v.definition;
    println!("Name:          {}", d.name);
    println!("UUID:          {}", d.uuid);
    println!(
        "State:         {}{}",
        v.state,
        v.note
            .as_ref()
            .map(|n| format!(" ({n})"))
            .unwrap_or_default()
    );
    if let Some(p) = v.pid {
        println!("QEMU pid:      {p}");
    }
    println!("Generation:    {}", d.generation);
    println!("Firmware:      {}", d.firmware);
    println!("Machine type:  {}", d.machine_type);
    println!("Config ver.:   {}", d.config_version);
    println!("vCPUs:         {}", d.vcpus);
    println!("Memory:        {} MiB", d.memory_mib);
    for disk in &d.disks {
        println!(
            "Disk {:<8} {} ({} MiB)",
            disk.id,
            disk.path.display(),
            disk.size_bytes >> 20
        );
    }
    for (i, n) in d.nics.iter().enumerate() {
        println!("NIC {i}:         {} {:?}", n.mac, n.mode);
    }
    if let Some(k) = &d.kernel {
        println!("Kernel:        {} ({})", k.kernel.display(), k.cmdline);
    }
    if let Some(r) = &v.replication {
        println!("Replication:   {r}");
    }
}

fn vm_list(vms: &[VmSummary]) {
    println!(
        "{:<24} {:<20} {:<4} {:<16} {:<8} ROLE",
        "NAME", "STATE", "GEN", "MACHINE", "PID"
    );
    for v in vms {
        println!(
            "{:<24} {:<20} {:<4} {:<16} {:<8} {}",
            v.definition.name.as_str(),
            v.state.to_string(),
            v.definition.generation.number(),
            v.definition.machine_type,
            v.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            v.replication.as_deref().unwrap_or("-")
        );
    }
}

/// The lines `replication status` and `measure` both start a relationship with: the VM and
/// its role, state, health with its reasons, and both servers; labels padded to `width`.
fn relationship_head(r: &ReplicationStatus, width: usize) {
    let line = |label: &str, value: String| println!("{:<width$}{value}", format!("{label}:"));
    line("VM", format!("{} ({:?})", r.vm, r.role));
    line("State", r.state.to_string());
    line("Health", format!("{:?}", r.health));
    for d in &r.health_details {
        println!("{:<width$}{d}", "");
    }
    line("Primary server", r.primary_host.clone());
    line("Replica server", r.replica_host.clone());
}

fn replication(rs: &[ReplicationStatus]) {
    if rs.is_empty() {
        println!("No VM on this host is replicating.");
        return;
    }
    for r in rs {
        relationship_head(r, 17);
        if let Some(f) = r.frequency_secs {
            println!("Frequency:       {f} s");
        }
        if let Some(p) = r.resync {
            println!("Resynchronize:   {p}");
        }
        if let (Some(k), Some(i)) = (r.recovery_points, r.recovery_point_interval_secs) {
            println!("Recovery points: {k} additional, one every {i} s");
        }
        if let Some(c) = r.compression {
            println!(
                "Compression:     {}; bandwidth {}",
                if c { "on" } else { "off" },
                r.bandwidth_limit
                    .map_or("not limited".to_string(), |b| format!(
                        "at most {} KiB/s",
                        b / 1024
                    ))
            );
        }
        if let Some(h) = r.app_consistent_hours {
            println!(
                "App-consistent:  every {h} h; {} point(s) could not freeze the guest",
                r.stats.app_consistent_failure_count
            );
        }
        println!("Last sequence:   {}", r.last_sequence);
        if let Some(w) = &r.waiting_on {
            println!("Waiting on:      {w}");
        }
        if let Some(e) = &r.last_error {
            println!("Last error:      {e}");
        }
        if let Some(n) = &r.note {
            println!("Note:            {n}");
        }
        for w in &r.warnings {
            println!("Warning:         {w}");
        }
        if let Some(p) = &r.progress {
            let pct = if p.bytes_total > 0 {
                p.bytes_done as f64 * 100.0 / p.bytes_total as f64
            } else {
                100.0
            };
            let filled = (pct / 5.0) as usize;
            println!(
                "Progress:        [{}{}] {:.0}% {} / {} MiB at {:.1} MiB/s ({})",
                "#".repeat(filled),
                ".".repeat(20 - filled.min(20)),
                pct,
                p.bytes_done >> 20,
                p.bytes_total >> 20,
                p.rate_bytes_per_sec / (1u64 << 20) as f64,
                p.what
            );
            if let Some(n) = p.blocks_differing {
                println!("                 {n} block(s) differ so far");
            }
            if let Some(eta) = p.eta_secs() {
                println!("                 about {eta} s left");
            }
        }
        let s = &r.stats;
        println!(
            "Statistics:      {} ok, {} missed, {} failed; {} MiB sent (largest {} MiB); avg latency {:.1} s",
            s.success_count,
            s.miss_count,
            s.failure_count,
            s.total_bytes >> 20,
            s.max_bytes >> 20,
            s.avg_latency_secs
        );
        println!();
    }
}

/// One relationship's statistics, laid out as Measure-VMReplication shows them.
fn measure(r: &ReplicationStatus) {
    let s = &r.stats;
    let mib = |b: u64| format!("{:.1} MiB", b as f64 / 1_048_576.0);
    let when = |t: Option<u64>| {
        t.map(|t| utc(t as i64 * 1000))
            .unwrap_or_else(|| "never".into())
    };
    let cycles = s.success_count.max(1);
    relationship_head(r, 22);
    println!(
        "Monitoring window:    {} to {}",
        when(s.window_from_unix),
        when(s.window_to_unix)
    );
    println!("Average size:         {}", mib(s.total_bytes / cycles));
    println!("Maximum size:         {}", mib(s.max_bytes));
    println!("Average latency:      {:.1} s", s.avg_latency_secs);
    println!("Maximum latency:      {:.1} s", s.max_latency_secs);
    println!(
        "Cycles:               {} successful, {} missed, {} failed ({} network failures)",
        s.success_count, s.miss_count, s.failure_count, s.network_failure_count
    );
    if s.app_consistent_failure_count > 0 {
        println!(
            "App-consistent:       {} points could not freeze the guest",
            s.app_consistent_failure_count
        );
    }
    println!("Pending size:         {}", mib(s.pending_bytes));
    println!("Last successful:      {}", when(s.last_replication_unix));
    println!("Last app-consistent:  {}", when(s.last_app_consistent_unix));
    if r.role != vmrepl_types::replication::Role::Primary {
        println!("Last test failover:   {}", when(s.last_test_failover_unix));
    }
    println!("Last sequence:        {}", r.last_sequence);
    println!();
}

/// `vmrepl doctor`'s findings: status, check, what was found, and the fix under it.
pub fn findings(list: &[vmrepl_types::api::Finding]) {
    use vmrepl_types::api::FindingStatus as S;
    for f in list {
        let status = match f.status {
            S::Ok => "ok",
            S::Warning => "WARNING",
            S::Fail => "FAIL",
        };
        println!("{status:<7}  {:<16}  {}", f.check, printable(&f.message));
        if let Some(fix) = &f.fix {
            if f.status != S::Ok {
                println!("{:<7}  {:<16}  fix: {}", "", "", printable(fix));
            }
        }
    }
    let fails = list.iter().filter(|f| f.status == S::Fail).count();
    let warnings = list.iter().filter(|f| f.status == S::Warning).count();
    println!(
        "{}",
        match (fails, warnings) {
            (0, 0) => "Nothing blocks replication.".to_string(),
            (0, w) => format!("Nothing blocks replication; {w} warning(s)."),
            (n, _) => format!("{n} finding(s) block replication."),
        }
    );
}

/// One journal entry on one line: time (UTC), severity, code, VM, message.
pub fn event_line(e: &vmrepl_types::api::EventRecord) {
    println!(
        "{}  {:<7}  {}  {:<16}  {}",
        utc(e.unix_ms as i64),
        e.severity.as_str(),
        e.code,
        e.vm.as_deref().unwrap_or("-"),
        printable(&e.message)
    );
}

/// A Unix time in milliseconds as `2026-11-25 23:55:57.123`.
fn utc(unix_ms: i64) -> String {
    let fmt = time::macros::format_description!(
        "[year]-[month]-[day] [hour]:[minute]:[second].[subsecond digits:3]"
    );
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(unix_ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&fmt).ok())
        .unwrap_or_else(|| format!("{unix_ms} ms"))
}

/// Prints what `host init` made.
pub fn init_report(r: &vmrepl_host::init::InitReport) {
    println!("Created host {} in {}", r.host_name, r.data.display());
    println!(
        "  config:       {} (yours: vmrepl reads it, never rewrites it)",
        r.config.display()
    );
    println!("  peer API:     {}", r.listen);
    println!("  certificate:  {} ({})", r.cert.display(), r.cert_source);
    println!(
        "  storage:      {}",
        r.storage
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let config = if r.config_given {
        format!(" --config {}", r.config.display())
    } else {
        String::new()
    };
    println!(
        "Start it with: vmrepl --data {}{config} daemon --background",
        r.data.display()
    );
}

/// A guest's console output made safe for the admin's terminal: line ends and tabs stay,
/// every other control character (escape sequences above all, which could rewrite the
/// terminal or what the admin sees) is shown as `^X` or `\u{..}` instead of acted on.
pub fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\n' | '\t' => out.push(c),
            '\r' if chars.peek() == Some(&'\n') => {}
            c if (c as u32) < 0x20 => {
                out.push('^');
                out.push(char::from(b'@' + c as u8));
            }
            '\u{7f}' => out.push_str("^?"),
            c if ('\u{80}'..='\u{9f}').contains(&c) => {
                out.push_str(&format!("\\u{{{:x}}}", c as u32));
            }
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::printable;

    #[test]
    fn console_text_keeps_its_lines_and_shows_control_characters_instead_of_acting_on_them() {
        assert_eq!(
            printable("VMREPL READY\r\nok\tdone\n"),
            "VMREPL READY\nok\tdone\n"
        );
        assert_eq!(printable("\u{1b}[2J\u{1b}]0;evil\u{7}"), "^[[2J^[]0;evil^G");
        assert_eq!(printable("over\rwrite"), "over^Mwrite");
        assert_eq!(printable("\u{9b}31m\u{7f}é"), "\\u{9b}31m^?é");
    }
}
