//! `GET /api/overview`: everything the dashboard page shows, in one JSON document, made from
//! the same values `vmrepl host info`, `vm list`, `replication status` and `events` show.

use crate::db::{CycleOutcome, CycleSample};
use crate::host::Host;
use serde::Serialize;
use std::sync::Arc;
use uuid::Uuid;
use vmrepl_types::api::EventRecord;
use vmrepl_types::replication::{ReplicationStatus, Role};
use vmrepl_types::VmRunState;

/// Events the page lists.
pub const EVENTS: u32 = 50;
/// Hours of lag history the chart covers.
pub const HISTORY_HOURS: u64 = 12;

/// The whole page's data.
#[derive(Debug, Serialize)]
pub struct Overview {
    pub host: HostSummary,
    /// When this was gathered (Unix milliseconds).
    pub generated_unix_ms: u64,
    pub history_hours: u64,
    pub vms: Vec<VmEntry>,
    pub relationships: Vec<ReplicationStatus>,
    /// The latest events, oldest first.
    pub events: Vec<EventRecord>,
    /// Per relationship: its cycles of the last [`HISTORY_HOURS`].
    pub history: Vec<History>,
}

#[derive(Debug, Serialize)]
pub struct HostSummary {
    pub name: String,
    pub release: String,
    pub qemu: String,
    pub kvm_usable: bool,
    pub metrics_url: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct VmEntry {
    pub name: String,
    pub uuid: Uuid,
    pub state: VmRunState,
    pub generation: u8,
    pub memory_mib: u64,
    /// This VM's replication role here, if any.
    pub replication: Option<String>,
    pub note: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct History {
    pub vm: String,
    pub vm_uuid: Uuid,
    pub role: Role,
    pub points: Vec<LagPoint>,
}

/// One cycle on the chart.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LagPoint {
    /// When the cycle ended (Unix milliseconds).
    pub t_ms: u64,
    /// How far behind the replica was just before this cycle ended: from the point of the
    /// previous successful cycle (its start) to now; for a failed cycle, the lag it left.
    pub lag_secs: f64,
    /// How long the cycle took.
    pub latency_secs: f64,
    pub bytes: u64,
    pub ok: bool,
}

/// The chart's points from a relationship's cycles (oldest first).
pub fn lag_points(samples: &[CycleSample]) -> Vec<LagPoint> {
    let mut last_ok_start: Option<u64> = None;
    samples
        .iter()
        .map(|s| {
            let end = s.start_ms.saturating_add(s.duration_ms);
            let ok = s.outcome == CycleOutcome::Ok;
            let since = last_ok_start.unwrap_or(s.start_ms);
            let p = LagPoint {
                t_ms: end,
                lag_secs: end.saturating_sub(since) as f64 / 1000.0,
                latency_secs: s.duration_ms as f64 / 1000.0,
                bytes: s.bytes,
                ok,
            };
            if ok {
                last_ok_start = Some(s.start_ms);
            }
            p
        })
        .collect()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Gathers the overview of `host` (reads the database: call off the async threads).
pub fn overview(host: &Arc<Host>) -> Overview {
    let caps = host.vmm.caps();
    let generated = now_ms();
    let mut relationships = crate::primary::statuses(host).unwrap_or_default();
    relationships.extend(crate::replica::statuses(host));
    let vms = host
        .vmm
        .list()
        .unwrap_or_default()
        .into_iter()
        .map(|v| VmEntry {
            name: v.definition.name.to_string(),
            uuid: v.definition.uuid,
            state: v.state,
            generation: v.definition.generation.into(),
            memory_mib: v.definition.memory_mib,
            replication: v.replication.or_else(|| {
                relationships
                    .iter()
                    .find(|r| r.vm_uuid == v.definition.uuid)
                    .map(|r| vmrepl_types::wire_name(&r.role))
            }),
            note: v.note,
        })
        .collect();
    let events = crate::daemon::events(host, None, None, None, Some(EVENTS)).unwrap_or_default();
    let since = generated.saturating_sub(HISTORY_HOURS * 3600 * 1000);
    let history = relationships
        .iter()
        .map(|r| History {
            vm: r.vm.to_string(),
            vm_uuid: r.vm_uuid,
            role: r.role,
            points: lag_points(&host.db().cycles_since(r.vm_uuid, since).unwrap_or_default()),
        })
        .collect();
    Overview {
        host: HostSummary {
            name: host.cfg().host_name.clone(),
            release: caps.release.clone(),
            qemu: caps.qemu_version.clone(),
            kvm_usable: caps.kvm_usable,
            metrics_url: host.metrics_url.get().cloned(),
        },
        generated_unix_ms: generated,
        history_hours: HISTORY_HOURS,
        vms,
        relationships,
        events,
        history,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(start_ms: u64, duration_ms: u64, outcome: CycleOutcome) -> CycleSample {
        CycleSample {
            outcome,
            bytes: 10,
            duration_ms,
            start_ms,
            app_freeze_ok: None,
        }
    }

    #[test]
    fn lag_runs_from_the_last_good_point_to_each_cycles_end() {
        let p = lag_points(&[
            sample(0, 2_000, CycleOutcome::Ok),
            sample(30_000, 1_000, CycleOutcome::Ok),
            sample(60_000, 5_000, CycleOutcome::NetworkFailure),
            sample(90_000, 3_000, CycleOutcome::Ok),
        ]);
        let lags: Vec<f64> = p.iter().map(|p| p.lag_secs).collect();
        assert_eq!(lags, vec![2.0, 31.0, 35.0, 63.0]);
        assert_eq!(p[2].latency_secs, 5.0);
        assert!(!p[2].ok && p[3].ok);
        assert_eq!(p[3].t_ms, 93_000);
        assert!(lag_points(&[]).is_empty());
    }

    #[test]
    fn the_overview_json_has_what_the_page_reads() {
        let o = Overview {
            host: HostSummary {
                name: "hv1".into(),
                release: "0.1.0".into(),
                qemu: "7.2.0".into(),
                kvm_usable: false,
                metrics_url: None,
            },
            generated_unix_ms: 1,
            history_hours: HISTORY_HOURS,
            vms: vec![VmEntry {
                name: "app".into(),
                uuid: Uuid::nil(),
                state: VmRunState::Off,
                generation: 1,
                memory_mib: 128,
                replication: Some("primary".into()),
                note: None,
            }],
            relationships: vec![],
            events: vec![],
            history: vec![History {
                vm: "app".into(),
                vm_uuid: Uuid::nil(),
                role: Role::Primary,
                points: lag_points(&[sample(0, 1_000, CycleOutcome::Ok)]),
            }],
        };
        let v = serde_json::to_value(&o).unwrap();
        for k in [
            "host",
            "generated_unix_ms",
            "history_hours",
            "vms",
            "relationships",
            "events",
            "history",
        ] {
            assert!(v.get(k).is_some(), "{k} missing: {v}");
        }
        assert_eq!(v["host"]["name"], "hv1");
        assert_eq!(v["host"]["qemu"], "7.2.0");
        assert_eq!(v["vms"][0]["name"], "app");
        assert_eq!(v["vms"][0]["state"], "off");
        assert_eq!(v["history"][0]["role"], "primary");
        let p = &v["history"][0]["points"][0];
        for k in ["t_ms", "lag_secs", "latency_secs", "bytes", "ok"] {
            assert!(p.get(k).is_some(), "{k} missing: {p}");
        }
    }
}
