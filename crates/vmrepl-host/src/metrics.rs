//! Prometheus metrics: the status of every relationship on this host (primary and replica
//! side) in the text exposition format, served over plain HTTP at `GET /metrics` on the
//! address `metrics` in the configuration file (loopback by default; `docs/metrics.md` lists the
//! metrics, a Grafana-ready set and example alert rules).
//!
//! The page is made from the same [`ReplicationStatus`] values `vmrepl replication status`
//! shows, so the two never disagree. The server is deliberately tiny: one request per
//! connection, a bounded request head read within a deadline, nothing but `GET /metrics`.

use crate::host::Host;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use vmrepl_types::replication::{Health, ReplicationState, ReplicationStatus, Role};

/// The default address of the metrics page (on loopback only: it is not authenticated).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9469";
/// Time a client has to send its request head.
const READ_DEADLINE: Duration = Duration::from_secs(5);
/// The longest request head read.
const MAX_HEAD: usize = 8192;

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn role_name(r: Role) -> &'static str {
    match r {
        Role::Primary => "primary",
        Role::Replica => "replica",
        Role::TestReplica => "test-replica",
    }
}

/// Health as a number: 0 Normal (or not applicable), 1 Warning, 2 Critical (alert on `> 0` or
/// `== 2`).
pub fn health_value(h: Health) -> u8 {
    match h {
        Health::Normal | Health::NotApplicable => 0,
        Health::Warning => 1,
        Health::Critical => 2,
    }
}

/// The metrics page for `statuses` at `now_unix` (seconds), of host `host`.
pub fn render(host: &str, statuses: &[ReplicationStatus], now_unix: u64) -> String {
    let mut out = String::new();
    let labels = |s: &ReplicationStatus| {
        format!(
            "vm=\"{}\",vm_uuid=\"{}\",role=\"{}\"",
            esc(s.vm.as_str()),
            s.vm_uuid,
            role_name(s.role)
        )
    };
    let _ = writeln!(
        out,
        "# HELP vmrepl_up Whether the vmrepl daemon of this host answers (always 1 when read)."
    );
    let _ = writeln!(out, "# TYPE vmrepl_up gauge");
    let _ = writeln!(out, "vmrepl_up{{host=\"{}\"}} 1", esc(host));
    let _ = writeln!(
        out,
        "# HELP vmrepl_build_info The release of vmrepl this host runs."
    );
    let _ = writeln!(out, "# TYPE vmrepl_build_info gauge");
    let _ = writeln!(
        out,
        "vmrepl_build_info{{host=\"{}\",release=\"{}\"}} 1",
        esc(host),
        env!("CARGO_PKG_VERSION")
    );
    let _ = writeln!(
        out,
        "# HELP vmrepl_relationships Replication relationships on this host."
    );
    let _ = writeln!(out, "# TYPE vmrepl_relationships gauge");
    let _ = writeln!(out, "vmrepl_relationships {}", statuses.len());
    type Gauge = (
        &'static str,
        &'static str,
        &'static str,
        fn(&ReplicationStatus, u64) -> Option<f64>,
    );
    let gauges: &[Gauge] = &[
        ("vmrepl_health", "gauge", "Replication health as Hyper-V rates it: 0 Normal, 1 Warning, 2 Critical.", |s, _| Some(f64::from(health_value(s.health)))),
        ("vmrepl_last_sequence", "gauge", "The last log acknowledged (primary) or applied (replica).", |s, _| Some(s.last_sequence as f64)),
        ("vmrepl_seconds_since_last_success", "gauge", "Seconds since the last successful cycle; absent before the first.", |s, now| s.stats.last_replication_unix.map(|t| now.saturating_sub(t) as f64)),
        ("vmrepl_frequency_seconds", "gauge", "How often the primary sends changes (primary side).", |s, _| s.frequency_secs.map(f64::from)),
        ("vmrepl_lag_seconds", "gauge", "How far behind the replica is: seconds since the last successful cycle (whose point is at most that old).", |s, now| s.stats.last_replication_unix.map(|t| now.saturating_sub(t) as f64)),
        ("vmrepl_pending_bytes", "gauge", "Bytes of changes not yet replicated, as far as this host knows.", |s, _| Some(s.stats.pending_bytes as f64)),
        ("vmrepl_resync_progress_ratio", "gauge", "Of a resynchronization or transfer in flight: the share done (0 to 1); absent when none runs.", |s, _| s.progress.as_ref().filter(|p| p.bytes_total > 0).map(|p| p.bytes_done as f64 / p.bytes_total as f64)),
        ("vmrepl_resync_blocks_differing", "gauge", "Of a resynchronization in flight: the blocks found different so far.", |s, _| s.progress.as_ref().and_then(|p| p.blocks_differing).map(|b| b as f64)),
        ("vmrepl_latency_seconds_avg", "gauge", "Average cycle latency over the monitoring window.", |s, _| Some(s.stats.avg_latency_secs)),
        ("vmrepl_latency_seconds_max", "gauge", "Longest cycle latency over the monitoring window.", |s, _| Some(s.stats.max_latency_secs)),
        ("vmrepl_bytes_sent", "gauge", "Bytes sent (primary) or received (replica) by the cycles in the monitoring window.", |s, _| Some(s.stats.total_bytes as f64)),
        ("vmrepl_network_failures", "gauge", "Cycles that failed on the network in the monitoring window.", |s, _| Some(s.stats.network_failure_count as f64)),
    ];
    for (name, kind, help, f) in gauges {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for s in statuses {
            if let Some(v) = f(s, now_unix) {
                let _ = writeln!(out, "{name}{{{}}} {v}", labels(s));
            }
        }
    }
    let _ = writeln!(
        out,
        "# HELP vmrepl_cycles Cycles in the monitoring window, by outcome."
    );
    let _ = writeln!(out, "# TYPE vmrepl_cycles gauge");
    for s in statuses {
        for (outcome, n) in [
            ("ok", s.stats.success_count),
            ("missed", s.stats.miss_count),
            ("failed", s.stats.failure_count),
        ] {
            let _ = writeln!(
                out,
                "vmrepl_cycles{{{},outcome=\"{outcome}\"}} {n}",
                labels(s)
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP vmrepl_state The relationship's replication state (1 for the current one)."
    );
    let _ = writeln!(out, "# TYPE vmrepl_state gauge");
    for s in statuses {
        let _ = writeln!(
            out,
            "vmrepl_state{{{},state=\"{}\"}} 1",
            labels(s),
            esc(&state_name(s.state))
        );
    }
    out
}

fn state_name(s: ReplicationState) -> String {
    vmrepl_types::wire_name(&s)
}

/// Binds the metrics address of `cfg` (empty: off). A failure is logged, not fatal: replication
/// does not depend on the page. Returns the listener and its URL.
pub async fn bind(addr: &str) -> Option<(TcpListener, String)> {
    if addr.trim().is_empty() {
        return None;
    }
    match TcpListener::bind(addr).await {
        Ok(l) => {
            let url = l
                .local_addr()
                .map(|a| format!("http://{a}/metrics"))
                .unwrap_or_else(|_| format!("http://{addr}/metrics"));
            tracing::info!(target: "vmrepl::daemon", %url, "metrics served");
            Some((l, url))
        }
        Err(e) => {
            tracing::warn!(target: "vmrepl::daemon", "cannot serve metrics on {addr}: {e}; set another address as `metrics` in the configuration file (\"\" turns them off)");
            None
        }
    }
}

/// Serves the metrics page of `host` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, host: Arc<Host>) {
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            continue;
        };
        let host = host.clone();
        tokio::spawn(async move {
            let mut head = Vec::with_capacity(512);
            let mut buf = [0u8; 1024];
            let read = tokio::time::timeout(READ_DEADLINE, async {
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return false,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                true
            })
            .await;
            if !matches!(read, Ok(true)) {
                return;
            }
            let line = head.split(|b| *b == b'\r').next().unwrap_or_default();
            let line = String::from_utf8_lossy(line);
            let mut parts = line.split_whitespace();
            let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let (status, body) = if method == "GET" && (path == "/metrics" || path == "/") {
                ("200 OK", page(&host).await)
            } else {
                (
                    "404 Not Found",
                    "only GET /metrics is served here\n".to_string(),
                )
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(resp.as_bytes()).await;
            let _ = conn.shutdown().await;
        });
    }
}

async fn page(host: &Arc<Host>) -> String {
    let mut statuses = crate::primary::statuses_with_pending(host)
        .await
        .unwrap_or_default();
    statuses.extend(crate::replica::statuses(host));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let name = host.cfg().host_name.clone();
    render(&name, &statuses, now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmrepl_types::name::VmName;
    use vmrepl_types::replication::{Progress, ReplicationStats};

    fn status(vm: &str, role: Role, health: Health) -> ReplicationStatus {
        ReplicationStatus {
            warnings: vec![],
            vm: VmName::new(vm).unwrap(),
            vm_uuid: uuid::Uuid::nil(),
            role,
            state: ReplicationState::Resynchronizing,
            health,
            health_details: vec![],
            primary_host: "a".into(),
            replica_host: "b".into(),
            frequency_secs: Some(30),
            app_consistent_hours: None,
            resync: None,
            recovery_points: None,
            recovery_point_interval_secs: None,
            compression: None,
            bandwidth_limit: None,
            last_sequence: 7,
            waiting_on: None,
            last_error: None,
            note: None,
            progress: Some(Progress {
                what: "resynchronization".into(),
                bytes_done: 1 << 30,
                bytes_total: 4 << 30,
                rate_bytes_per_sec: 1.0,
                blocks_differing: Some(12),
            }),
            stats: ReplicationStats {
                success_count: 5,
                miss_count: 1,
                failure_count: 2,
                last_replication_unix: Some(1000),
                ..Default::default()
            },
        }
    }

    #[test]
    fn the_page_has_one_line_per_metric_and_relationship_with_its_labels() {
        let page = render(
            "hv1",
            &[
                status("web", Role::Primary, Health::Critical),
                status("db", Role::Replica, Health::Warning),
            ],
            1090,
        );
        let has = |l: &str| assert!(page.lines().any(|x| x == l), "no line {l:?} in:\n{page}");
        let web = r#"vm="web",vm_uuid="00000000-0000-0000-0000-000000000000",role="primary""#;
        let db = r#"vm="db",vm_uuid="00000000-0000-0000-0000-000000000000",role="replica""#;
        has(r#"vmrepl_up{host="hv1"} 1"#);
        has("vmrepl_relationships 2");
        has(&format!("vmrepl_health{{{web}}} 2"));
        has(&format!("vmrepl_health{{{db}}} 1"));
        has(&format!("vmrepl_seconds_since_last_success{{{web}}} 90"));
        has(&format!("vmrepl_resync_progress_ratio{{{web}}} 0.25"));
        has(&format!("vmrepl_resync_blocks_differing{{{db}}} 12"));
        has(&format!("vmrepl_cycles{{{web},outcome=\"missed\"}} 1"));
        has(&format!("vmrepl_cycles{{{web},outcome=\"failed\"}} 2"));
        has(&format!("vmrepl_state{{{db},state=\"resynchronizing\"}} 1"));
        // Every sample line belongs to a metric announced with HELP and TYPE.
        for l in page.lines().filter(|l| !l.starts_with('#')) {
            let name = l.split(['{', ' ']).next().unwrap();
            assert!(
                page.contains(&format!("# TYPE {name} ")),
                "{name} has no TYPE"
            );
        }
    }
}
