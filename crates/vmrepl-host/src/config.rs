//! The host's TOML configuration file: parse, validate, and write it once (`host init`).
//!
//! The file is the admin's (`--config FILE`, by default `DATA/config.toml`; see
//! `docs/configuration.md`): the daemon reads it and never writes it. The settings commands
//! change at run time (replica server, revoked certificates) live in the state database
//! ([`crate::host_settings`]); [`HostConfig`] carries them in force, filled from there.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use vmrepl_types::name::validate_host_name;
use vmrepl_types::replication::{ReplicaServerSettings, RevokedCert};
use vmrepl_types::Accel;

/// Default port of the peer API (Hyper-V uses 443 for certificate authentication; we pick an
/// unprivileged port of our own).
pub const DEFAULT_PEER_PORT: u16 = 7443;

/// Errors reading or checking the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("Cannot read the host configuration {path}: {source}. Name the right file with --config, or run `vmrepl host init` to create a host.")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("The host configuration {path} is not valid TOML for vmrepl: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("The host configuration is invalid: {0}")]
    Invalid(String),
    #[error("Cannot write the host configuration {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A host's configuration: the file's keys, plus the settings commands change
/// (`replica_server`, `revoked_certs`) as they are in force.
///
/// Those two are filled from the state database by the daemon
/// ([`crate::host_settings::HostSettings::apply`]). In the file they are only read once, when
/// the database holds no host settings yet (a host made before they moved there, or one
/// prepared by a script before its first start): they are imported then, and ignored after.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostConfig {
    /// The host's DNS name; its certificate names it and peers authorize it by it.
    pub host_name: String,
    /// Address the peer API (mutual TLS) listens on, e.g. `127.0.0.2:7443`.
    pub listen: String,
    /// Where other hosts reach this host's peer API, `HOST:PORT` (a DNS name or an address):
    /// what this host tells a replica server so that it can call back (failover checks,
    /// reverse replication). Unset: the listen address, unless that is a wildcard such as
    /// `0.0.0.0`, which no other host can dial.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise: Option<String>,
    /// The most bytes per second this host sends to replica servers, all relationships
    /// together (a QoS policy), such as `"100M"`; unset: no host limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_limit: Option<String>,
    /// The daily window (UTC, `HH:MM-HH:MM`, may wrap midnight) in which `bandwidth_limit`
    /// holds; unset: always.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_hours: Option<String>,
    /// QEMU accelerator preference.
    #[serde(default)]
    pub accel: Accel,
    /// Folders VM disks may live in; the first is the default for new disks.
    pub storage: Vec<PathBuf>,
    /// QEMU system emulator binary.
    #[serde(default = "default_qemu")]
    pub qemu_binary: PathBuf,
    /// Folders of QEMU's firmware descriptors (`*.json`), the most general first; UEFI firmware
    /// is found through them (docs/install.md, "How firmware is found"). Unset: QEMU's
    /// `/usr/share/qemu/firmware`, `/etc/qemu/firmware` and `$XDG_CONFIG_HOME/qemu/firmware`.
    /// Empty: the fixed paths of `ovmf_dir` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware_descriptor_dirs: Option<Vec<PathBuf>>,
    /// Folder holding OVMF (UEFI) firmware at fixed paths: `OVMF_CODE_4M.fd` and friends, for the
    /// machine types no firmware descriptor covers.
    #[serde(default = "default_ovmf_dir")]
    pub ovmf_dir: PathBuf,
    /// Folder holding SeaBIOS (`bios-256k.bin`).
    #[serde(default = "default_seabios_dir")]
    pub seabios_dir: PathBuf,
    /// Replica server settings in force (kept in the state database; see the type's doc).
    /// Written to the file only when set, by a program preparing a host before its first start.
    #[serde(default, skip_serializing_if = "is_default")]
    pub replica_server: ReplicaServerSettings,
    /// Limits and timeouts of the peer listener (`[peer_limits]`).
    #[serde(default)]
    pub peer_limits: PeerLimits,
    /// Peer certificates refused at every handshake, inbound and outbound
    /// (`vmrepl host revoke-cert`), in force (kept in the state database; see the type's doc).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub revoked_certs: Vec<RevokedCert>,
    /// The size (MiB) of the ranges a resynchronization compares and sends as one part, each
    /// acknowledged on its own (a cut resynchronization continues from the last one). Unset:
    /// 256 MiB, more when the disks hold over 256 GiB together (about 1024 parts at most).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resync_range_mib: Option<u64>,
    /// Address of the Prometheus metrics page (`GET /metrics`, plain HTTP, not authenticated:
    /// keep it on loopback or a management network). Empty: off.
    #[serde(default = "default_metrics")]
    pub metrics: String,
    /// Address of the web dashboard (HTTPS with the host's certificate; a client certificate
    /// from a trusted CA or the token `vmrepl dashboard` prints). Empty: off.
    #[serde(default = "default_dashboard")]
    pub dashboard: String,
    /// Hours of history health and statistics look at (Hyper-V's monitoring window, 12 by
    /// default; 1 to 168).
    #[serde(default = "default_window_hours")]
    pub monitoring_window_hours: u32,
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// What the configuration file says of the settings commands change, section by section
/// (None: the file has no such section). See [`crate::host_settings`] for when they count.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct FileSettings {
    #[serde(default)]
    pub replica_server: Option<ReplicaServerSettings>,
    #[serde(default)]
    pub revoked_certs: Option<Vec<RevokedCert>>,
}

fn default_window_hours() -> u32 {
    12
}

fn default_metrics() -> String {
    crate::metrics::DEFAULT_LISTEN.to_string()
}

fn default_dashboard() -> String {
    crate::dashboard::DEFAULT_LISTEN.to_string()
}

/// Limits and timeouts of the peer listener (review M1). Every field has a default, so a
/// `[peer_limits]` table may name only what it changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PeerLimits {
    /// Peer connections open at once (handshaking or established); a new one over the limit
    /// is closed at once. Default 256.
    pub max_connections: usize,
    /// TLS handshakes in progress at once (unauthenticated clients). Default 32.
    pub max_handshakes: usize,
    /// TLS handshakes in progress at once from one IP address. Default 8.
    pub max_handshakes_per_ip: usize,
    /// Seconds a client gets from TCP connect to the end of the TLS handshake and the
    /// protocol-version exchange. Default 10.
    pub handshake_timeout_secs: u64,
    /// Seconds an established connection may stay silent between two requests before the
    /// replica server closes it. Default 300.
    pub idle_timeout_secs: u64,
}

impl Default for PeerLimits {
    fn default() -> Self {
        let l = vmrepl_transport::tls::Limits::default();
        PeerLimits {
            max_connections: l.max_connections,
            max_handshakes: l.max_handshakes,
            max_handshakes_per_ip: l.max_handshakes_per_ip,
            handshake_timeout_secs: l.handshake_timeout.as_secs(),
            idle_timeout_secs: 300,
        }
    }
}

impl PeerLimits {
    /// The listener's limits.
    pub fn listener(&self) -> vmrepl_transport::tls::Limits {
        vmrepl_transport::tls::Limits {
            max_handshakes: self.max_handshakes,
            max_handshakes_per_ip: self.max_handshakes_per_ip,
            max_connections: self.max_connections,
            handshake_timeout: std::time::Duration::from_secs(self.handshake_timeout_secs),
        }
    }

    /// How long an established connection may stay silent between requests.
    pub fn idle_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.idle_timeout_secs)
    }
}

fn default_qemu() -> PathBuf {
    PathBuf::from("qemu-system-x86_64")
}

fn default_ovmf_dir() -> PathBuf {
    PathBuf::from("/usr/share/OVMF")
}

fn default_seabios_dir() -> PathBuf {
    PathBuf::from("/usr/share/seabios")
}

/// Checks `HOST:PORT` (a name, an IPv4 address, or `[IPv6]`); says what is wrong.
fn check_host_port(s: &str) -> Result<(), String> {
    let (host, port) = s.rsplit_once(':').ok_or("is not HOST:PORT")?;
    port.parse::<u16>()
        .ok()
        .filter(|p| *p > 0)
        .ok_or("has no port number")?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c == '/') {
        return Err("has no host".into());
    }
    Ok(())
}

impl HostConfig {
    /// Where other hosts reach this host's peer API: `advertise`, else the listen address
    /// when it is not a wildcard. Err: a sentence saying what to set.
    pub fn advertised(&self) -> Result<String, String> {
        if let Some(a) = &self.advertise {
            return Ok(a.clone());
        }
        match self.listen.parse::<std::net::SocketAddr>() {
            Ok(sa) if sa.ip().is_unspecified() => Err(format!(
                "this host listens on {}, an address no other host can dial back; set `advertise = \"HOST:PORT\"` in the configuration file (or `host init --advertise`) to where the replica server reaches this host",
                self.listen
            )),
            _ => Ok(self.listen.clone()),
        }
    }

    /// The host's bandwidth limit in bytes per second and the window it holds in (None: no
    /// limit). Err: which key is wrong and what to give.
    #[allow(clippy::type_complexity)]
    pub fn host_bandwidth(
        &self,
    ) -> Result<Option<(u64, Option<vmrepl_types::replication::ResyncPolicy>)>, String> {
        let rate = match &self.bandwidth_limit {
            None => None,
            Some(r) => vmrepl_types::replication::parse_bandwidth(r)
                .map_err(|e| format!("bandwidth_limit: {e}"))?,
        };
        let window = match &self.bandwidth_hours {
            None => None,
            Some(h) => match vmrepl_types::replication::ResyncPolicy::parse(h) {
                Ok(w @ vmrepl_types::replication::ResyncPolicy::Window { .. }) => Some(w),
                _ => {
                    return Err(format!(
                        "bandwidth_hours {h:?} is not a daily window HH:MM-HH:MM in UTC (for example 08:00-18:00)"
                    ))
                }
            },
        };
        if let Some(r) = rate {
            if r < vmrepl_types::replication::MIN_BANDWIDTH {
                return Err(format!(
                    "bandwidth_limit of {r} bytes/s is too low to replicate; give at least 64K"
                ));
            }
        } else if window.is_some() {
            return Err("bandwidth_hours is set without bandwidth_limit".into());
        }
        Ok(rate.map(|r| (r, window)))
    }

    /// A new configuration with defaults.
    pub fn new(host_name: &str, listen: &str, storage: Vec<PathBuf>) -> Self {
        HostConfig {
            host_name: host_name.to_string(),
            listen: listen.to_string(),
            advertise: None,
            bandwidth_limit: None,
            bandwidth_hours: None,
            accel: Accel::Auto,
            storage,
            qemu_binary: default_qemu(),
            firmware_descriptor_dirs: None,
            ovmf_dir: default_ovmf_dir(),
            seabios_dir: default_seabios_dir(),
            replica_server: ReplicaServerSettings::default(),
            peer_limits: PeerLimits::default(),
            revoked_certs: Vec::new(),
            resync_range_mib: None,
            metrics: default_metrics(),
            dashboard: default_dashboard(),
            monitoring_window_hours: default_window_hours(),
        }
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let cfg: HostConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Loads `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Ok(Self::load_with_file_settings(path)?.0)
    }

    /// Loads `path`, and says which of the settings commands change it has sections for.
    pub fn load_with_file_settings(path: &Path) -> Result<(Self, FileSettings), ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let cfg = Self::parse(&text, path)?;
        let file: FileSettings = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Ok((cfg, file))
    }

    /// Cross-field checks.
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_host_name(&self.host_name).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        self.listen.parse::<std::net::SocketAddr>().map_err(|_| {
            ConfigError::Invalid(format!(
                "listen address {:?} is not IP:PORT (for example 127.0.0.2:{DEFAULT_PEER_PORT})",
                self.listen
            ))
        })?;
        if let Some(a) = &self.advertise {
            check_host_port(a).map_err(|why| {
                ConfigError::Invalid(format!(
                    "advertise address {a:?} {why}; give HOST:PORT where other hosts reach this one (for example hosta.example.org:{DEFAULT_PEER_PORT})"
                ))
            })?;
        }
        self.host_bandwidth().map_err(ConfigError::Invalid)?;
        if !(1..=168).contains(&self.monitoring_window_hours) {
            return Err(ConfigError::Invalid(format!(
                "monitoring_window_hours is {}; give 1 to 168 (hours of history health and \
                 statistics look at; Hyper-V uses 12)",
                self.monitoring_window_hours
            )));
        }
        if !self.metrics.is_empty() && self.metrics.parse::<std::net::SocketAddr>().is_err() {
            return Err(ConfigError::Invalid(format!(
                "metrics address {:?} is not IP:PORT (for example {}; \"\" serves no metrics)",
                self.metrics,
                crate::metrics::DEFAULT_LISTEN
            )));
        }
        if !self.dashboard.is_empty() && self.dashboard.parse::<std::net::SocketAddr>().is_err() {
            return Err(ConfigError::Invalid(format!(
                "dashboard address {:?} is not IP:PORT (for example {}; \"\" serves no dashboard)",
                self.dashboard,
                crate::dashboard::DEFAULT_LISTEN
            )));
        }
        if self.storage.is_empty() {
            return Err(ConfigError::Invalid(
                "no storage folder is configured; add at least one to `storage`".into(),
            ));
        }
        for s in &self.storage {
            if !s.is_absolute() {
                return Err(ConfigError::Invalid(format!(
                    "storage folder {} is not an absolute path",
                    s.display()
                )));
            }
        }
        let l = &self.peer_limits;
        for (name, v) in [
            ("max_connections", l.max_connections as u64),
            ("max_handshakes", l.max_handshakes as u64),
            ("max_handshakes_per_ip", l.max_handshakes_per_ip as u64),
            ("handshake_timeout_secs", l.handshake_timeout_secs),
            ("idle_timeout_secs", l.idle_timeout_secs),
        ] {
            if v == 0 {
                return Err(ConfigError::Invalid(format!(
                    "peer_limits.{name} is 0; it must be at least 1 (or left out for the default)"
                )));
            }
        }
        for r in &self.revoked_certs {
            let canonical = vmrepl_transport::cert::normalize_fingerprint(&r.fingerprint)
                .map_err(|e| ConfigError::Invalid(format!("in revoked_certs: {e}")))?;
            if canonical != r.fingerprint {
                return Err(ConfigError::Invalid(format!(
                    "in revoked_certs: write the fingerprint {:?} as {canonical} (64 upper-case \
                     hex digits, no colons)",
                    r.fingerprint
                )));
            }
        }
        if self.replica_server.allow_any && self.replica_server.default_storage.is_none() {
            return Err(ConfigError::Invalid(
                "replica server allows any authenticated host but has no default storage folder; set one".into(),
            ));
        }
        Ok(())
    }

    /// Writes the configuration atomically (temp file, fsync, rename). Only `host init` (and
    /// programs preparing a host) do: the daemon never writes the file.
    pub fn save(&self, path: &Path) -> Result<(), ConfigError> {
        let text = toml::to_string_pretty(self).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        crate::fsutil::write_atomic(path, text.as_bytes()).map_err(|source| ConfigError::Write {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Whether `p` lies inside one of the storage folders (after normalising `..`).
    pub fn in_storage(&self, p: &Path) -> bool {
        let Some(p) = crate::fsutil::normalize(p) else {
            return false;
        };
        self.storage.iter().any(|s| {
            crate::fsutil::normalize(s)
                .map(|s| p.starts_with(&s) && p != s)
                .unwrap_or(false)
        })
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn the_host_bandwidth_limit_is_a_rate_with_an_optional_daily_window() {
        let mut c = HostConfig::new("a.example.org", "127.0.0.2:7443", vec!["/s".into()]);
        assert_eq!(c.host_bandwidth(), Ok(None));
        c.bandwidth_limit = Some("100M".into());
        assert_eq!(c.host_bandwidth(), Ok(Some((100 << 20, None))));
        c.bandwidth_hours = Some("08:00-18:00".into());
        assert!(matches!(c.host_bandwidth(), Ok(Some((_, Some(_))))));
        c.bandwidth_hours = Some("manual".into());
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("bandwidth_hours"));
        c.bandwidth_hours = None;
        c.bandwidth_limit = Some("1K".into());
        assert!(c.validate().unwrap_err().to_string().contains("64K"));
        c.bandwidth_limit = None;
        c.bandwidth_hours = Some("08:00-18:00".into());
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("without bandwidth_limit"));
    }

    #[test]
    fn the_advertised_address_is_the_listen_address_unless_that_is_a_wildcard() {
        let mut c = HostConfig::new("a.example.org", "127.0.0.2:7443", vec!["/s".into()]);
        assert_eq!(c.advertised().unwrap(), "127.0.0.2:7443");
        c.listen = "0.0.0.0:7443".into();
        let e = c.advertised().unwrap_err();
        assert!(e.contains("0.0.0.0:7443") && e.contains("advertise"), "{e}");
        c.listen = "[::]:7443".into();
        assert!(c.advertised().is_err());
        c.advertise = Some("hosta.example.org:7443".into());
        assert_eq!(c.advertised().unwrap(), "hosta.example.org:7443");
        assert!(c.validate().is_ok());
        for bad in ["hosta.example.org", "hosta:0", ":7443", "a b:1"] {
            c.advertise = Some(bad.into());
            let e = c.validate().unwrap_err().to_string();
            assert!(
                e.contains("advertise") && e.contains("HOST:PORT"),
                "{bad}: {e}"
            );
        }
        c.advertise = Some("[fd00::1]:7443".into());
        assert!(c.validate().is_ok());
    }
    use super::*;

    fn sample() -> HostConfig {
        HostConfig::new("hosta.example", "127.0.0.1:7443", vec!["/srv/vms".into()])
    }

    #[test]
    fn a_saved_config_loads_back_identically() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("config.toml");
        sample().save(&p).unwrap();
        assert_eq!(HostConfig::load(&p).unwrap(), sample());
    }

    #[test]
    fn the_file_says_which_settings_commands_change_it_holds_and_a_new_one_holds_none() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("vmrepl.toml");
        sample().save(&p).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(!text.contains("replica_server") && !text.contains("revoked_certs"));
        let (_, f) = HostConfig::load_with_file_settings(&p).unwrap();
        assert_eq!(f, FileSettings::default());

        // A host prepared by a script (or made by an older release) holds them: read, so
        // that they can be imported once.
        let fp = "AB".repeat(32);
        std::fs::write(
            &p,
            format!(
                "# the admin's comment\n{text}\n[replica_server]\nenabled = true\n\
                 allow_any = false\nentries = []\n\n[[revoked_certs]]\nfingerprint = \"{fp}\"\n"
            ),
        )
        .unwrap();
        let (cfg, f) = HostConfig::load_with_file_settings(&p).unwrap();
        assert!(f.replica_server.as_ref().unwrap().enabled);
        assert_eq!(f.revoked_certs.as_ref().unwrap()[0].fingerprint, fp);
        assert_eq!(cfg.replica_server, f.replica_server.unwrap());
        let mut prepared = sample();
        prepared.replica_server.enabled = true;
        prepared.save(&p).unwrap();
        let (_, f) = HostConfig::load_with_file_settings(&p).unwrap();
        assert!(f.replica_server.unwrap().enabled);
    }

    #[test]
    fn unknown_keys_are_refused() {
        let text = "bogus = 1\n".to_string() + &toml::to_string(&sample()).unwrap();
        let e = HostConfig::parse(&text, Path::new("c.toml")).unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
    }

    #[test]
    fn a_bad_listen_address_is_refused_with_an_example() {
        let mut c = sample();
        c.listen = "nowhere".into();
        assert!(c.validate().unwrap_err().to_string().contains("IP:PORT"));
    }

    #[test]
    fn a_bad_dashboard_address_is_refused_an_empty_one_is_off_and_old_configs_get_the_default() {
        let mut c = sample();
        c.dashboard = "localhost:9470".into();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("dashboard") && e.contains("IP:PORT"), "{e}");
        c.dashboard = String::new();
        assert!(c.validate().is_ok());
        let old = "host_name = \"h.example\"\nlisten = \"127.0.0.1:7443\"\nstorage = [\"/srv\"]\n";
        let c = HostConfig::parse(old, Path::new("c.toml")).unwrap();
        assert_eq!(c.dashboard, crate::dashboard::DEFAULT_LISTEN);
    }

    #[test]
    fn a_bad_metrics_address_and_window_are_refused_with_what_to_give() {
        let mut c = sample();
        c.metrics = "localhost".into();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("metrics") && e.contains("IP:PORT"), "{e}");
        c.metrics = String::new();
        assert!(c.validate().is_ok(), "an empty address turns the page off");
        c.monitoring_window_hours = 0;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("1 to 168"), "{e}");
        // A config written before these settings existed gets their defaults.
        let old = "host_name = \"h.example\"\nlisten = \"127.0.0.1:7443\"\nstorage = [\"/srv\"]\n";
        let c = HostConfig::parse(old, Path::new("c.toml")).unwrap();
        assert_eq!(c.metrics, crate::metrics::DEFAULT_LISTEN);
        assert_eq!(c.monitoring_window_hours, 12);
    }

    #[test]
    fn relative_storage_folders_are_refused() {
        let mut c = sample();
        c.storage = vec!["rel".into()];
        assert!(c.validate().is_err());
    }

    #[test]
    fn paths_are_inside_storage_only_after_normalising() {
        let c = sample();
        assert!(c.in_storage(Path::new("/srv/vms/a.qcow2")));
        assert!(!c.in_storage(Path::new("/srv/vms/../etc/passwd")));
        assert!(!c.in_storage(Path::new("/srv/vmsx/a")));
        assert!(!c.in_storage(Path::new("/srv/vms")));
    }

    #[test]
    fn a_config_without_the_new_tables_loads_with_default_limits() {
        let text = "host_name = \"hosta.example\"\nlisten = \"127.0.0.1:7443\"\nstorage = [\"/srv/vms\"]\n";
        let c = HostConfig::parse(text, Path::new("c.toml")).unwrap();
        assert_eq!(c.peer_limits, PeerLimits::default());
        assert_eq!(c.peer_limits.max_connections, 256);
        assert!(c.revoked_certs.is_empty());
        let c = HostConfig::parse(
            &format!("{text}[peer_limits]\nmax_connections = 10\n"),
            Path::new("c.toml"),
        )
        .unwrap();
        assert_eq!(c.peer_limits.max_connections, 10);
        assert_eq!(c.peer_limits.idle_timeout_secs, 300);
    }

    #[test]
    fn a_revoked_fingerprint_must_be_canonical() {
        let mut c = sample();
        c.revoked_certs.push(RevokedCert {
            fingerprint: "ab".repeat(32),
            reason: None,
            subject: None,
            revoked_at_unix: 0,
        });
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains(&"AB".repeat(32)), "{e}");
    }

    #[test]
    fn allow_any_without_default_storage_is_refused() {
        let mut c = sample();
        c.replica_server.allow_any = true;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("default storage"));
    }
}
