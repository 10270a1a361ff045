//! Replication vocabulary: settings, Hyper-V's states and health, the status tree.

use crate::name::VmName;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::PathBuf;
use uuid::Uuid;

/// How the first full copy reaches the replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(tag = "method", rename_all = "kebab-case")]
pub enum InitialReplication {
    /// Over the network, now.
    #[default]
    NetworkNow,
    /// Over the network at a set time (Unix seconds, at most 7 days ahead).
    NetworkAt { unix_secs: u64 },
    /// Export to a folder (external media) to be imported on the replica.
    Export { folder: PathBuf },
    /// Use a copy that already exists on the replica; reconciled by checksum compare.
    ExistingCopy,
}

/// When a relationship whose changes cannot be tracked any more (resynchronization required)
/// is resynchronized: Hyper-V's "Resynchronization" setting of a replicated VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(tag = "mode", rename_all = "kebab-case")]
pub enum ResyncPolicy {
    /// At once (after the cycle that found it, one interval later at most).
    #[default]
    Automatic,
    /// Only inside a daily window, in minutes after midnight UTC; the window may wrap midnight
    /// (18:30-06:00 is `start_minute` 1110, `end_minute` 360).
    Window { start_minute: u16, end_minute: u16 },
    /// Only when an operator runs `replication resume --resynchronize`.
    Manual,
}

impl ResyncPolicy {
    const DAY_MINUTES: u64 = 24 * 60;

    /// Parses `automatic`, `manual` or a window `HH:MM-HH:MM` (UTC).
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.trim() {
            "automatic" | "auto" => return Ok(ResyncPolicy::Automatic),
            "manual" => return Ok(ResyncPolicy::Manual),
            _ => {}
        }
        let bad = || {
            format!(
                "resynchronization policy {s:?} is not automatic, manual or a daily window \
                 HH:MM-HH:MM in UTC (for example 18:30-06:00)"
            )
        };
        let minute = |t: &str| -> Option<u16> {
            let (h, m) = t.trim().split_once(':')?;
            let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
            (h < 24 && m < 60).then_some(h * 60 + m)
        };
        let (a, b) = s.split_once('-').ok_or_else(bad)?;
        let (start_minute, end_minute) = (minute(a).ok_or_else(bad)?, minute(b).ok_or_else(bad)?);
        if start_minute == end_minute {
            return Err(format!(
                "the resynchronization window {s:?} starts when it ends; give a window of at \
                 least a minute, or `automatic`"
            ));
        }
        Ok(ResyncPolicy::Window {
            start_minute,
            end_minute,
        })
    }

    /// How long, from `now_unix_ms`, until a resynchronization may start: `Some(0)` now,
    /// `None` never by itself (manual).
    pub fn wait_ms(&self, now_unix_ms: u64) -> Option<u64> {
        match *self {
            ResyncPolicy::Automatic => Some(0),
            ResyncPolicy::Manual => None,
            ResyncPolicy::Window {
                start_minute,
                end_minute,
            } => {
                let day_ms = Self::DAY_MINUTES * 60_000;
                let into_day = now_unix_ms % day_ms;
                let (start, end) = (
                    u64::from(start_minute) * 60_000,
                    u64::from(end_minute) * 60_000,
                );
                let inside = if start < end {
                    (start..end).contains(&into_day)
                } else {
                    into_day >= start || into_day < end
                };
                Some(if inside {
                    0
                } else {
                    (start + day_ms - into_day) % day_ms
                })
            }
        }
    }
}

impl fmt::Display for ResyncPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ResyncPolicy::Automatic => f.write_str("automatic"),
            ResyncPolicy::Manual => f.write_str("manual"),
            ResyncPolicy::Window {
                start_minute,
                end_minute,
            } => write!(
                f,
                "daily {:02}:{:02}-{:02}:{:02} UTC",
                start_minute / 60,
                start_minute % 60,
                end_minute / 60,
                end_minute % 60
            ),
        }
    }
}

/// Per-VM replication settings (Hyper-V's Enable-VMReplication parameters).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicationSettings {
    /// Replica server address, host:port.
    pub replica_server: String,
    /// The replica server's host name as its certificate names it (defaults to the host part).
    pub replica_host_name: Option<String>,
    /// Seconds between cycles: 30, 300 (default), 900, or any value down to 5.
    pub frequency_secs: u32,
    /// Additional recovery points kept, 0..=24.
    pub recovery_points: u32,
    /// Seconds between recovery points (Hyper-V: hourly).
    pub recovery_point_interval_secs: u32,
    /// App-consistent point every N hours (1..=12); None = off.
    pub app_consistent_hours: Option<u32>,
    pub compression: bool,
    /// Disk ids not replicated.
    pub exclude_disks: Vec<String>,
    /// Disks added to the VM after replication was enabled and not included yet (each is in
    /// `exclude_disks` too): like Hyper-V, a new disk is not replicated until `replication set
    /// --include-disk` names it; `replication status` warns about each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub new_disks: Vec<String>,
    /// Disks included after the replica was created whose initial copy the replica has not
    /// acknowledged yet: the next cycle copies each of them whole, in the same log (and point
    /// in time) as the other disks' changes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks_awaiting_copy: Vec<String>,
    pub initial: InitialReplication,
    /// When a resynchronization starts once one is required (default: automatically).
    #[serde(default)]
    pub resync: ResyncPolicy,
    /// Most bytes per second this relationship sends (None: no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_limit: Option<u64>,
}

impl ReplicationSettings {
    pub const DEFAULT_FREQUENCY: u32 = 300;
    pub const MIN_FREQUENCY: u32 = 5;
    pub const MAX_RECOVERY_POINTS: u32 = 24;

    /// The settings `replication enable` starts from, as Hyper-V's defaults: every 5 minutes,
    /// the latest point only, compressed, every disk, initial replication over the network now.
    pub fn new(replica_server: &str) -> Self {
        ReplicationSettings {
            replica_server: replica_server.to_string(),
            replica_host_name: None,
            frequency_secs: Self::DEFAULT_FREQUENCY,
            recovery_points: 0,
            recovery_point_interval_secs: 3600,
            app_consistent_hours: None,
            compression: true,
            exclude_disks: vec![],
            new_disks: vec![],
            disks_awaiting_copy: vec![],
            initial: InitialReplication::NetworkNow,
            resync: ResyncPolicy::Automatic,
            bandwidth_limit: None,
        }
    }

    /// Checks ranges; the error names the field, the value and the allowed range.
    pub fn validate(&self) -> Result<(), String> {
        if self.frequency_secs < Self::MIN_FREQUENCY || self.frequency_secs > 3600 {
            return Err(format!(
                "replication frequency {} s is out of range; use 30, 300 or 900 (or any value from 5 to 3600)",
                self.frequency_secs
            ));
        }
        if self.recovery_points > Self::MAX_RECOVERY_POINTS {
            return Err(format!(
                "{} additional recovery points asked; Hyper-V keeps 0 to 24",
                self.recovery_points
            ));
        }
        if self.recovery_point_interval_secs < self.frequency_secs {
            return Err(format!(
                "recovery point interval {} s is shorter than the replication frequency {} s",
                self.recovery_point_interval_secs, self.frequency_secs
            ));
        }
        if let Some(h) = self.app_consistent_hours {
            if !(1..=12).contains(&h) {
                return Err(format!(
                    "app-consistent points every {h} h; use 1 to 12 hours"
                ));
            }
            if self.recovery_points == 0 {
                return Err("app-consistent points need at least one additional recovery point (as in Hyper-V)".into());
            }
        }
        if let Some(b) = self.bandwidth_limit {
            if b < MIN_BANDWIDTH {
                return Err(format!(
                    "a bandwidth limit of {b} bytes/s is too low to replicate; give at least 64K (or 0 for no limit)"
                ));
            }
        }
        Ok(())
    }
}

/// The lowest bandwidth limit a relationship takes (64 KiB/s).
pub const MIN_BANDWIDTH: u64 = 64 * 1024;

/// Parses a rate such as `50M`, `800K`, `1G` or `123456` (bytes per second, powers of 1024);
/// `0`, `none` or `off` is no limit (None).
pub fn parse_bandwidth(s: &str) -> Result<Option<u64>, String> {
    let t = s.trim();
    if matches!(t.to_ascii_lowercase().as_str(), "0" | "none" | "off") {
        return Ok(None);
    }
    let t = t
        .trim_end_matches("/s")
        .trim_end_matches(['B', 'b'])
        .trim_end_matches('i');
    let (num, mult) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 1u64 << 10),
        Some('m' | 'M') => (&t[..t.len() - 1], 1 << 20),
        Some('g' | 'G') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    num.trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .map(Some)
        .ok_or_else(|| {
            format!(
                "{s:?} is not a rate; give bytes per second such as 50M, 800K or 0 for no limit"
            )
        })
}

/// What `replication set` changes in a relationship (Set-VMReplication); a field left out
/// stays as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettingsChange {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frequency_secs: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_points: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_point_interval_secs: Option<u32>,
    /// App-consistent points every N hours; 0 turns them off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_consistent_hours: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resync: Option<ResyncPolicy>,
    /// Bytes per second; 0 removes the limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_limit: Option<u64>,
    /// A new replica server (HOST:PORT): the replica starts over there with a new initial copy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica_server: Option<String>,
    /// The new replica server's name as its certificate gives it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica_host_name: Option<String>,
    /// The disks not replicated, as a whole new list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exclude_disks: Option<Vec<String>>,
    /// Disks to replicate from now on (Set-VMReplication -ReplicatedDisks): each gets its own
    /// initial copy with the next cycle, no other disk is copied again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub include_disk: Vec<String>,
    /// Disks to stop replicating (-ExcludedVhd): later logs leave them out, the replica drops
    /// its copy, and their change-tracking bitmaps are released.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude_disk: Vec<String>,
}

impl SettingsChange {
    /// `s` with this change, validated, and a phrase per setting that changed value.
    pub fn apply(
        &self,
        s: &ReplicationSettings,
    ) -> Result<(ReplicationSettings, Vec<String>), String> {
        let mut n = s.clone();
        if let Some(v) = self.frequency_secs {
            n.frequency_secs = v;
        }
        if let Some(v) = self.recovery_points {
            n.recovery_points = v;
        }
        if let Some(v) = self.recovery_point_interval_secs {
            n.recovery_point_interval_secs = v;
        }
        if let Some(v) = self.app_consistent_hours {
            n.app_consistent_hours = (v > 0).then_some(v);
        }
        if let Some(v) = self.compression {
            n.compression = v;
        }
        if let Some(v) = self.resync {
            n.resync = v;
        }
        if let Some(v) = self.bandwidth_limit {
            n.bandwidth_limit = (v > 0).then_some(v);
        }
        if let Some(v) = &self.replica_server {
            n.replica_server = v.clone();
            n.replica_host_name = self.replica_host_name.clone();
        } else if let Some(v) = &self.replica_host_name {
            n.replica_host_name = Some(v.clone());
        }
        if let Some(v) = &self.exclude_disks {
            let mut v = v.clone();
            v.sort();
            v.dedup();
            n.exclude_disks = v;
        }
        if let Some(both) = self
            .include_disk
            .iter()
            .find(|d| self.exclude_disk.contains(d))
        {
            return Err(format!(
                "disk {both} is both included and excluded; give it once"
            ));
        }
        for d in &self.exclude_disk {
            if !n.exclude_disks.contains(d) {
                n.exclude_disks.push(d.clone());
            }
            n.new_disks.retain(|x| x != d);
            n.disks_awaiting_copy.retain(|x| x != d);
        }
        for d in &self.include_disk {
            if n.exclude_disks.contains(d) {
                n.exclude_disks.retain(|x| x != d);
                if !n.disks_awaiting_copy.contains(d) {
                    n.disks_awaiting_copy.push(d.clone());
                }
            }
            n.new_disks.retain(|x| x != d);
        }
        n.exclude_disks.sort();
        n.disks_awaiting_copy.sort();
        n.validate()?;
        let rate =
            |b: Option<u64>| b.map_or("no limit".to_string(), |b| format!("{} KiB/s", b / 1024));
        let mut what = Vec::new();
        let mut note = |changed: bool, text: String| {
            if changed {
                what.push(text)
            }
        };
        note(
            s.frequency_secs != n.frequency_secs,
            format!("frequency {} s", n.frequency_secs),
        );
        note(
            s.recovery_points != n.recovery_points,
            format!("{} additional recovery points", n.recovery_points),
        );
        note(
            s.recovery_point_interval_secs != n.recovery_point_interval_secs,
            format!(
                "a recovery point every {} s",
                n.recovery_point_interval_secs
            ),
        );
        note(
            s.app_consistent_hours != n.app_consistent_hours,
            match n.app_consistent_hours {
                Some(h) => format!("an app-consistent point every {h} h"),
                None => "no app-consistent points".into(),
            },
        );
        note(
            s.compression != n.compression,
            format!("compression {}", if n.compression { "on" } else { "off" }),
        );
        note(
            s.resync != n.resync,
            format!("resynchronization {}", n.resync),
        );
        note(
            s.bandwidth_limit != n.bandwidth_limit,
            format!("bandwidth {}", rate(n.bandwidth_limit)),
        );
        note(
            s.replica_server != n.replica_server || s.replica_host_name != n.replica_host_name,
            format!("replica server {}", n.replica_server),
        );
        // The disks in `a` and not in `b`.
        fn minus<'x>(a: &'x [String], b: &[String]) -> Vec<&'x str> {
            a.iter()
                .filter(|d| !b.contains(d))
                .map(String::as_str)
                .collect()
        }
        let included = minus(&s.exclude_disks, &n.exclude_disks);
        let excluded = minus(&n.exclude_disks, &s.exclude_disks);
        note(
            !included.is_empty() && self.exclude_disks.is_none(),
            format!(
                "disk {} replicated from the next cycle (its own initial copy, no other disk copied again)",
                included.join(", ")
            ),
        );
        note(
            !excluded.is_empty() && self.exclude_disks.is_none(),
            format!(
                "disk {} no longer replicated (the replica drops its copy)",
                excluded.join(", ")
            ),
        );
        note(
            s.exclude_disks != n.exclude_disks && self.exclude_disks.is_some(),
            if n.exclude_disks.is_empty() {
                "every disk replicated".into()
            } else {
                format!("disks not replicated: {}", n.exclude_disks.join(", "))
            },
        );
        Ok((n, what))
    }
}

/// Hyper-V's replication states (Msvm_ComputerSystem ReplicationState), as vmrepl uses them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReplicationState {
    NotEnabled,
    ReadyForInitialReplication,
    WaitingForInitialReplication,
    InitialReplicationInProgress,
    Replicating,
    /// Primary after a planned-failover prepare: last changes sent, VM locked.
    SyncedReplicationComplete,
    /// Replica failed over to a point, waiting for complete or cancel.
    FailedOverWaitingCompletion,
    FailedOver,
    Suspended,
    Error,
    ResynchronizationRequired,
    Resynchronizing,
}

impl fmt::Display for ReplicationState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            ReplicationState::NotEnabled => "Not enabled",
            ReplicationState::ReadyForInitialReplication => "Ready for initial replication",
            ReplicationState::WaitingForInitialReplication => "Waiting for initial replication",
            ReplicationState::InitialReplicationInProgress => "Initial replication in progress",
            ReplicationState::Replicating => "Replicating",
            ReplicationState::SyncedReplicationComplete => "Prepared for planned failover",
            ReplicationState::FailedOverWaitingCompletion => "Failed over, waiting completion",
            ReplicationState::FailedOver => "Failed over",
            ReplicationState::Suspended => "Suspended",
            ReplicationState::Error => "Error",
            ReplicationState::ResynchronizationRequired => "Resynchronization required",
            ReplicationState::Resynchronizing => "Resynchronizing",
        };
        f.write_str(s)
    }
}

/// Hyper-V's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Health {
    NotApplicable,
    Normal,
    Warning,
    Critical,
}

/// Which side of a relationship this host is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    Primary,
    Replica,
    TestReplica,
}

/// Kind of point in time a log or recovery point represents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Consistency {
    Crash,
    AppConsistent,
    Planned,
}

/// One recovery point of a replica VM, as `vmrepl replication points` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryPointInfo {
    /// Sequence of the last log in the point; pass it to `failover start --point`.
    pub seq: u64,
    /// The primary's point in time, Unix milliseconds.
    pub unix_ms: i64,
    pub consistency: Consistency,
    /// The latest applied state (it moves with every log) rather than a kept point.
    pub latest: bool,
}

/// One authorization entry on a replica server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthorizationEntry {
    /// Primary host-name pattern; `*` only as the whole first label (`*.example.org`).
    pub primary: String,
    pub storage: PathBuf,
    pub trust_group: String,
    /// SHA-256 fingerprint of a CA certificate (hex, colons allowed): the primary's
    /// certificate must chain through it (its issuer, an intermediate or the trusted root).
    /// Scopes the entry to one CA when several are trusted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    /// SHA-256 fingerprint of the primary's certificate itself (the whole DER certificate,
    /// as `vmrepl host info` and the daemon log print it): only that certificate matches.
    /// A renewed certificate needs the new fingerprint here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin: Option<String>,
}

/// A peer certificate this host refuses at every handshake, in and out
/// (`vmrepl host revoke-cert`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokedCert {
    /// SHA-256 of the certificate, 64 upper-case hex digits.
    pub fingerprint: String,
    /// Why it was revoked (free text), if given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The certificate's subject, when it was revoked from a file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// When it was revoked (Unix seconds).
    #[serde(default)]
    pub revoked_at_unix: u64,
}

/// Replica server settings (Set-VMReplicationServer).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
/// Authentication is always certificate-based (mutual TLS) on the host's peer listener
/// (`listen` in the host configuration).
pub struct ReplicaServerSettings {
    pub enabled: bool,
    pub allow_any: bool,
    pub default_storage: Option<PathBuf>,
    pub entries: Vec<AuthorizationEntry>,
    /// Whether a primary that removes its replication may also delete the replica's data
    /// here. Off by default: the replica host's admin keeps the disaster-recovery copy (a
    /// compromised primary cannot wipe it) and deletes it when they choose.
    #[serde(default)]
    pub allow_remote_delete: bool,
}

/// Per-cycle statistics and health, as Hyper-V's Measure-VMReplication reports them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ReplicationStats {
    pub success_count: u64,
    pub miss_count: u64,
    pub failure_count: u64,
    pub network_failure_count: u64,
    pub app_consistent_failure_count: u64,
    pub total_bytes: u64,
    pub max_bytes: u64,
    pub avg_latency_secs: f64,
    pub max_latency_secs: f64,
    pub last_replication_unix: Option<u64>,
    pub pending_bytes: u64,
    /// The monitoring window these figures cover (Unix seconds): from the later of its
    /// length ago, the relationship's start and the last `replication measure --reset`, to now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_from_unix: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_to_unix: Option<u64>,
    /// When the last app-consistent point of the window was acknowledged (Unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_app_consistent_unix: Option<u64>,
    /// When the last test failover of this replica started (Unix seconds; replica side).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_test_failover_unix: Option<u64>,
}

/// Progress of a transfer in flight.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    pub what: String,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub rate_bytes_per_sec: f64,
    /// A resynchronization by compare: the blocks found different so far (the bytes are the
    /// bytes compared, of every disk's size).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocks_differing: Option<u64>,
}

impl Progress {
    /// Seconds left at the current rate, when it can be told.
    pub fn eta_secs(&self) -> Option<u64> {
        (self.rate_bytes_per_sec > 0.0 && self.bytes_total > self.bytes_done).then(|| {
            ((self.bytes_total - self.bytes_done) as f64 / self.rate_bytes_per_sec).ceil() as u64
        })
    }
}

/// One relationship's status, the unit `vmrepl replication status` renders.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicationStatus {
    pub vm: VmName,
    pub vm_uuid: Uuid,
    pub role: Role,
    pub state: ReplicationState,
    pub health: Health,
    pub health_details: Vec<String>,
    pub primary_host: String,
    pub replica_host: String,
    /// How often the primary sends changes (primary side; a replica is not told).
    pub frequency_secs: Option<u32>,
    /// App-consistent points every N hours (primary side), if asked.
    #[serde(default)]
    pub app_consistent_hours: Option<u32>,
    /// When a required resynchronization starts (primary side).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resync: Option<ResyncPolicy>,
    /// Additional recovery points kept, and seconds between them (the replica's policy as it
    /// was told, on either side).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_points: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_point_interval_secs: Option<u32>,
    /// Whether logs are compressed (primary side).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<bool>,
    /// The bandwidth limit in bytes per second (primary side), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_limit: Option<u64>,
    pub last_sequence: u64,
    pub waiting_on: Option<String>,
    pub last_error: Option<String>,
    /// A remark on the relationship, e.g. why reverse replication needed a full copy.
    #[serde(default)]
    pub note: Option<String>,
    /// Warnings that need the admin, each a sentence with the command that settles it (a disk
    /// added to the VM and not replicated yet).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    pub progress: Option<Progress>,
    pub stats: ReplicationStats,
}

#[cfg(test)]
mod tests {

    #[test]
    fn including_a_new_disk_queues_its_own_copy_and_excluding_one_forgets_it() {
        let mut s = ReplicationSettings::new("b:7443");
        // `vm disk add` on a replicated VM: excluded, and noted as new.
        s.exclude_disks = vec!["disk1".into(), "disk2".into()];
        s.new_disks = vec!["disk2".into()];
        let inc = SettingsChange {
            include_disk: vec!["disk2".into()],
            ..Default::default()
        };
        let (n, what) = inc.apply(&s).unwrap();
        assert_eq!(n.exclude_disks, ["disk1"]);
        assert!(n.new_disks.is_empty());
        assert_eq!(n.disks_awaiting_copy, ["disk2"]);
        assert_eq!(what.len(), 1, "{what:?}");
        assert!(
            what[0].contains("disk disk2 replicated from the next cycle"),
            "{what:?}"
        );
        // Including a disk that replicates already changes nothing.
        let (again, what) = inc.apply(&n).unwrap();
        assert_eq!(again, n);
        assert!(what.is_empty(), "{what:?}");
        // Excluding it before its copy went out forgets the copy.
        let exc = SettingsChange {
            exclude_disk: vec!["disk2".into()],
            ..Default::default()
        };
        let (m, what) = exc.apply(&n).unwrap();
        assert_eq!(m.exclude_disks, ["disk1", "disk2"]);
        assert!(m.disks_awaiting_copy.is_empty());
        assert!(
            what[0].contains("disk disk2 no longer replicated"),
            "{what:?}"
        );
        // Both at once is refused by name.
        let both = SettingsChange {
            include_disk: vec!["disk1".into()],
            exclude_disk: vec!["disk1".into()],
            ..Default::default()
        };
        assert!(both.apply(&s).unwrap_err().contains("disk1 is both"));
        // Settings stored before these fields read as empty lists.
        let old = serde_json::to_value(ReplicationSettings::new("b:7443")).unwrap();
        assert!(old.get("new_disks").is_none());
        let back: ReplicationSettings = serde_json::from_value(old).unwrap();
        assert!(back.new_disks.is_empty() && back.disks_awaiting_copy.is_empty());
    }

    #[test]
    fn a_settings_change_keeps_what_it_leaves_out_names_what_it_changes_and_is_validated() {
        let s = ReplicationSettings::new("b:7443");
        let c = SettingsChange {
            frequency_secs: Some(30),
            recovery_points: Some(4),
            bandwidth_limit: Some(1 << 20),
            ..Default::default()
        };
        let (n, what) = c.apply(&s).unwrap();
        assert_eq!((n.frequency_secs, n.recovery_points), (30, 4));
        assert_eq!(n.bandwidth_limit, Some(1 << 20));
        assert_eq!(n.compression, s.compression);
        assert_eq!(n.replica_server, "b:7443");
        assert_eq!(
            what,
            vec![
                "frequency 30 s",
                "4 additional recovery points",
                "bandwidth 1024 KiB/s"
            ]
        );
        // Nothing that differs: nothing named.
        assert!(c.apply(&n).unwrap().1.is_empty());
        // 0 turns a limit and app-consistent points off.
        let off = SettingsChange {
            bandwidth_limit: Some(0),
            app_consistent_hours: Some(0),
            ..Default::default()
        };
        let (n2, _) = off.apply(&n).unwrap();
        assert_eq!((n2.bandwidth_limit, n2.app_consistent_hours), (None, None));
        // The result is validated as a whole.
        let bad = SettingsChange {
            app_consistent_hours: Some(2),
            ..Default::default()
        };
        assert!(bad.apply(&s).unwrap_err().contains("recovery point"));
        let slow = SettingsChange {
            bandwidth_limit: Some(1000),
            ..Default::default()
        };
        assert!(slow.apply(&s).unwrap_err().contains("64K"));
        // An old request with only the resynchronization policy still reads.
        let old: SettingsChange = serde_json::from_str(r#"{"resync":{"mode":"manual"}}"#).unwrap();
        assert_eq!(old.resync, Some(ResyncPolicy::Manual));
    }

    #[test]
    fn bandwidth_is_given_in_bytes_per_second_with_binary_suffixes() {
        assert_eq!(parse_bandwidth("50M"), Ok(Some(50 << 20)));
        assert_eq!(parse_bandwidth("800K"), Ok(Some(800 << 10)));
        assert_eq!(parse_bandwidth("1GiB/s"), Ok(Some(1 << 30)));
        assert_eq!(parse_bandwidth("123456"), Ok(Some(123456)));
        assert_eq!(parse_bandwidth("0"), Ok(None));
        assert_eq!(parse_bandwidth("off"), Ok(None));
        assert!(parse_bandwidth("fast").unwrap_err().contains("50M"));
    }

    use super::*;

    #[test]
    fn progress_tells_the_seconds_left_at_its_rate_once_it_has_one() {
        let mut p = Progress {
            what: "resynchronization: comparing with the replica".into(),
            bytes_done: 100 << 20,
            bytes_total: 400 << 20,
            rate_bytes_per_sec: (50 << 20) as f64,
            blocks_differing: Some(3),
        };
        assert_eq!(p.eta_secs(), Some(6));
        p.rate_bytes_per_sec = 0.0;
        assert_eq!(p.eta_secs(), None);
    }

    #[test]
    fn resync_policies_parse_from_what_an_admin_types_and_print_back() {
        assert_eq!(
            ResyncPolicy::parse("automatic"),
            Ok(ResyncPolicy::Automatic)
        );
        assert_eq!(ResyncPolicy::parse("manual"), Ok(ResyncPolicy::Manual));
        let w = ResyncPolicy::parse("18:30-06:00").unwrap();
        assert_eq!(
            w,
            ResyncPolicy::Window {
                start_minute: 18 * 60 + 30,
                end_minute: 6 * 60
            }
        );
        assert_eq!(w.to_string(), "daily 18:30-06:00 UTC");
        for bad in [
            "sometimes",
            "25:00-01:00",
            "18:30",
            "10:00-10:00",
            "1:60-2:00",
        ] {
            assert!(ResyncPolicy::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_resync_window_opens_inside_its_hours_and_otherwise_says_how_long_until_it_does() {
        const MIN: u64 = 60_000;
        let day = 24 * 60 * MIN;
        let at = |h: u64, m: u64| 20_000 * day + (h * 60 + m) * MIN;
        let night = ResyncPolicy::parse("18:30-06:00").unwrap();
        assert_eq!(night.wait_ms(at(23, 0)), Some(0));
        assert_eq!(night.wait_ms(at(5, 59)), Some(0));
        assert_eq!(night.wait_ms(at(6, 0)), Some((12 * 60 + 30) * MIN));
        assert_eq!(night.wait_ms(at(18, 29)), Some(MIN));
        let lunch = ResyncPolicy::parse("12:00-13:00").unwrap();
        assert_eq!(lunch.wait_ms(at(12, 30)), Some(0));
        assert_eq!(lunch.wait_ms(at(13, 0)), Some(23 * 60 * MIN));
        assert_eq!(ResyncPolicy::Automatic.wait_ms(at(3, 0)), Some(0));
        assert_eq!(ResyncPolicy::Manual.wait_ms(at(3, 0)), None);
    }

    #[test]
    fn settings_stored_before_the_resync_policy_existed_read_as_automatic() {
        let mut v = serde_json::to_value(ReplicationSettings::new("h:1")).unwrap();
        v.as_object_mut().unwrap().remove("resync");
        let s: ReplicationSettings = serde_json::from_value(v).unwrap();
        assert_eq!(s.resync, ResyncPolicy::Automatic);
    }

    fn settings() -> ReplicationSettings {
        ReplicationSettings {
            replica_server: "127.0.0.2:7443".into(),
            replica_host_name: None,
            frequency_secs: 300,
            recovery_points: 4,
            recovery_point_interval_secs: 3600,
            app_consistent_hours: None,
            compression: true,
            exclude_disks: vec![],
            new_disks: vec![],
            disks_awaiting_copy: vec![],
            initial: InitialReplication::NetworkNow,
            resync: ResyncPolicy::Automatic,
            bandwidth_limit: None,
        }
    }

    #[test]
    fn default_like_settings_are_valid() {
        settings().validate().unwrap();
    }

    #[test]
    fn frequency_below_five_seconds_is_refused_with_the_allowed_values() {
        let mut s = settings();
        s.frequency_secs = 4;
        assert!(s.validate().unwrap_err().contains("30, 300 or 900"));
    }

    #[test]
    fn more_than_24_recovery_points_are_refused() {
        let mut s = settings();
        s.recovery_points = 25;
        assert!(s.validate().unwrap_err().contains("0 to 24"));
    }

    #[test]
    fn app_consistent_points_need_history_and_a_sane_interval() {
        let mut s = settings();
        s.app_consistent_hours = Some(13);
        assert!(s.validate().is_err());
        s.app_consistent_hours = Some(1);
        s.recovery_points = 0;
        assert!(s.validate().is_err());
    }
}
