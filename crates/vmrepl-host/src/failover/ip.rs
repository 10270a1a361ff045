//! Failover TCP/IP (Hyper-V's per-adapter "Failover TCP/IP"): once a failed-over VM is
//! started, the static address, gateway and DNS servers the replica host's admin set for an
//! adapter (`replication network VM --adapter N --failover-ip ...`) are set in the guest
//! through the QEMU guest agent, on the interface whose hardware address is the adapter's.
//! The outcome, read back from the guest, is journaled; a guest without an agent keeps its
//! own settings, and the journal says so.

use crate::host::Host;
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;
use vmrepl_types::api::FailoverIp;

/// How long to wait for the guest agent after the start (a guest under emulation boots slowly).
const AGENT_WAIT: Duration = Duration::from_secs(240);
/// How long one command in the guest may take.
const COMMAND_LIMIT: Duration = Duration::from_secs(30);

/// One adapter to set: its index, hardware address and settings.
pub(crate) type Wanted = (usize, String, FailoverIp);

/// Sets the failover TCP/IP of `want` in VM `vm` (named `name`) in the background, and
/// journals the outcome.
pub(crate) fn spawn(d: Arc<Host>, vm: Uuid, name: String, want: Vec<Wanted>) {
    if want.is_empty() {
        return;
    }
    tokio::spawn(async move {
        let msg = match apply(&d, vm, &want).await {
            Ok(done) => format!("failover TCP/IP set in the guest of {name}: {}", done.join("; ")),
            Err(why) => format!(
                "failover TCP/IP not set in the guest of {name}: {why}; set the address in the guest by hand"
            ),
        };
        tracing::info!(target: "vmrepl::failover", %vm, "{msg}");
        let _ = d.db().event(Some(vm), &msg);
    });
}

/// The shell command that gives interface `dev` the settings `ip` (every value was checked to
/// be an IP address; the interface name comes from the guest and is quoted).
pub(crate) fn script(dev: &str, ip: &FailoverIp) -> Result<String, String> {
    if dev.is_empty() || dev.contains(['\'', '/']) || dev.chars().any(char::is_whitespace) {
        return Err(format!(
            "the guest names the interface {dev:?}, which vmrepl does not quote"
        ));
    }
    ip.validate()?;
    let mut s = format!(
        "PATH=/usr/sbin:/usr/bin:/sbin:/bin; set -e; ip addr flush dev '{dev}'; ip addr add {} dev '{dev}'; ip link set '{dev}' up",
        ip.address
    );
    if let Some(g) = &ip.gateway {
        s.push_str(&format!("; ip route replace default via {g} dev '{dev}'"));
    }
    if !ip.dns.is_empty() {
        let lines: Vec<String> = ip.dns.iter().map(|d| format!("nameserver {d}")).collect();
        s.push_str(&format!(
            "; printf '%s\\n' {} > /etc/resolv.conf",
            lines
                .iter()
                .map(|l| format!("'{l}'"))
                .collect::<Vec<_>>()
                .join(" ")
        ));
    }
    Ok(s)
}

async fn apply(d: &Host, vm: Uuid, want: &[Wanted]) -> Result<Vec<String>, String> {
    let sock = vmrepl_qemu::cmdline::RunPaths::in_dir(&d.dd.run_dir(vm)).qga_sock;
    let start = Instant::now();
    let qga = loop {
        if let Ok(q) = vmrepl_qemu::Qga::connect(&sock, Duration::from_secs(5)).await {
            if q.ping().await.is_ok() {
                break q;
            }
        }
        if start.elapsed() > AGENT_WAIT {
            return Err(format!(
                "its guest agent did not answer within {} s (is qemu-ga installed and running in the guest?)",
                AGENT_WAIT.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let ifs = qga.network_interfaces().await.map_err(|e| e.to_string())?;
    let mut done = Vec::new();
    for (adapter, mac, ip) in want {
        let mac = mac.to_ascii_lowercase();
        let dev = ifs
            .iter()
            .find(|i| i.mac == mac)
            .map(|i| i.name.clone())
            .ok_or_else(|| format!("the guest has no interface with the hardware address {mac} of adapter {adapter}"))?;
        let sh = script(&dev, ip)?;
        let (code, err) = qga
            .exec("/bin/sh", &["-c", &sh], COMMAND_LIMIT)
            .await
            .map_err(|e| e.to_string())?;
        if code != 0 {
            return Err(format!(
                "setting adapter {adapter} ({dev}) failed with exit code {code}: {err}"
            ));
        }
        // What the guest reports now, not what was asked.
        let now = qga.network_interfaces().await.map_err(|e| e.to_string())?;
        let has = now
            .iter()
            .find(|i| i.name == dev)
            .is_some_and(|i| i.addresses.contains(&ip.address));
        if !has {
            return Err(format!(
                "the guest does not report {} on {dev} afterwards",
                ip.address
            ));
        }
        done.push(format!("adapter {adapter} ({dev}) has {ip}"));
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_script_sets_address_route_and_dns_and_refuses_names_it_cannot_quote() {
        let ip = FailoverIp {
            address: "10.0.2.15/24".into(),
            gateway: Some("10.0.2.2".into()),
            dns: vec!["10.0.2.3".into(), "10.0.2.4".into()],
        };
        let s = script("eth0", &ip).unwrap();
        assert!(s.contains("ip addr add 10.0.2.15/24 dev 'eth0'"), "{s}");
        assert!(
            s.contains("ip route replace default via 10.0.2.2 dev 'eth0'"),
            "{s}"
        );
        assert!(
            s.contains("'nameserver 10.0.2.3' 'nameserver 10.0.2.4' > /etc/resolv.conf"),
            "{s}"
        );
        assert!(script("e'th0", &ip).is_err());
        assert!(script("eth 0", &ip).is_err());
        let bad = FailoverIp {
            address: "10.0.2.15/24; reboot".into(),
            gateway: None,
            dns: vec![],
        };
        assert!(
            script("eth0", &bad).is_err(),
            "values are checked again before use"
        );
    }
}
