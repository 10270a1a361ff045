//! Replica-server authorization, as Hyper-V does it: which primary hosts may
//! replicate to this host, where their replicas are stored and which trust
//! group they belong to.
//!
//! A primary is identified by the host name in its (verified) certificate,
//! see [`crate::tls::PeerIdentity`]. Patterns are an exact FQDN
//! (`hv1.example.org`) or a wildcard as the whole first label
//! (`*.example.org`, which matches exactly one more label: `a.example.org`,
//! but neither `example.org` nor `a.b.example.org`). Matching is
//! case-insensitive.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::cert::normalize_fingerprint;
use crate::tls::PeerIdentity;

/// Why a pattern, a host name or an authorization decision was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthzError {
    #[error("the host-name pattern {pattern:?} is not valid: {reason}")]
    InvalidPattern { pattern: String, reason: String },
    #[error("the host name {name:?} is not valid: {reason}")]
    InvalidHostName { name: String, reason: String },
    #[error(
        "replication from any server is enabled but no default storage location is set; set \
         the default storage location (where replicas of unlisted primaries are kept), or turn \
         off replication from any server and add authorization entries"
    )]
    AllowAnyWithoutStorage,
    #[error(
        "the authorization entry for {pattern} has an empty trust group; give it a trust group \
         name (primaries in the same trust group may replicate the same VMs)"
    )]
    EmptyTrustGroup { pattern: String },
    #[error(
        "there are two authorization entries for {pattern}; remove one (each primary pattern may \
         appear once)"
    )]
    DuplicatePattern { pattern: String },
    #[error(
        "the {field} of the authorization entry for {pattern} is not valid: {detail}; give the \
         SHA-256 fingerprint as `vmrepl host trust` (CA) or `vmrepl host info` (host \
         certificate) prints it"
    )]
    InvalidFingerprint {
        pattern: String,
        field: &'static str,
        detail: String,
    },
    #[error(
        "the primary server {host} is not authorized to replicate to this host: the \
         authorization entry {pattern} accepts only certificates issued through the CA with \
         SHA-256 {expected}, and {host}'s certificate chains through {presented}; give {host} a \
         certificate from that CA, or change the entry's issuer"
    )]
    WrongIssuer {
        host: String,
        pattern: String,
        expected: String,
        presented: String,
    },
    #[error(
        "the primary server {host} is not authorized to replicate to this host: the \
         authorization entry {pattern} is pinned to the certificate with SHA-256 {expected}, \
         and {host} presented {presented}; if {host} got a new certificate, authorize it again \
         with --pin {presented}"
    )]
    PinMismatch {
        host: String,
        pattern: String,
        expected: String,
        presented: String,
    },
    #[error(
        "the primary server {host} matches the authorization entry {pattern}, which checks the \
         certificate's issuer or fingerprint, but no certificate details were given to check; \
         this is a bug in the caller, the request is refused"
    )]
    NoCertificateToCheck { host: String, pattern: String },
    #[error(
        "the primary server {host} is not authorized to replicate to this host: no \
         authorization entry matches it (entries: {patterns}) and replication from any server \
         is off; add an authorization entry for {host} (or a *.domain pattern that covers it)"
    )]
    NotAuthorized { host: String, patterns: String },
}

const MAX_NAME: usize = 253;
const MAX_LABEL: usize = 63;

fn check_label(label: &str) -> Result<(), String> {
    if label.is_empty() {
        return Err(
            "it has an empty label (two dots in a row, or a leading or trailing dot)".into(),
        );
    }
    if label.len() > MAX_LABEL {
        return Err(format!(
            "the label {label:?} is {} characters long; at most {MAX_LABEL} are allowed",
            label.len()
        ));
    }
    if label.contains('*') {
        return Err(format!(
            "the label {label:?} contains `*`; a wildcard is allowed only as the whole first \
             label, as in *.example.org"
        ));
    }
    if let Some(c) = label
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-'))
    {
        return Err(format!(
            "the label {label:?} contains {c:?}; host names use only letters, digits and `-`"
        ));
    }
    if label.starts_with('-') || label.ends_with('-') {
        return Err(format!(
            "the label {label:?} starts or ends with `-`, which host names do not allow"
        ));
    }
    Ok(())
}

fn check_labels(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("it is empty".into());
    }
    if name.len() > MAX_NAME {
        return Err(format!(
            "it is {} characters long; at most {MAX_NAME} are allowed",
            name.len()
        ));
    }
    name.split('.').try_for_each(check_label)
}

/// Drops one trailing dot (the DNS root), so `a.example.org.` equals `a.example.org`.
fn strip_root(name: &str) -> &str {
    name.strip_suffix('.').unwrap_or(name)
}

/// Validates a host name (FQDN or single label) and returns it in lower case.
/// A single trailing dot is dropped.
pub fn normalize_host_name(name: &str) -> Result<String, AuthzError> {
    let lower = strip_root(name).to_ascii_lowercase();
    check_labels(&lower).map_err(|reason| AuthzError::InvalidHostName {
        name: name.to_string(),
        reason,
    })?;
    Ok(lower)
}

/// A primary-server host-name pattern.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HostPattern {
    /// Exactly this host name (lower case).
    Exact(String),
    /// `*.suffix`: any host name of exactly one more label than `suffix` (lower case).
    Wildcard(String),
}

impl HostPattern {
    /// Parses `hv1.example.org` or `*.example.org`.
    pub fn parse(pattern: &str) -> Result<Self, AuthzError> {
        let invalid = |reason: String| AuthzError::InvalidPattern {
            pattern: pattern.to_string(),
            reason,
        };
        let lower = strip_root(pattern.trim()).to_ascii_lowercase();
        if lower == "*" {
            return Err(invalid(
                "a bare `*` would admit every host; to accept any primary, turn on replication \
                 from any server (with a default storage location) instead"
                    .into(),
            ));
        }
        if let Some(suffix) = lower.strip_prefix("*.") {
            check_labels(suffix).map_err(invalid)?;
            return Ok(HostPattern::Wildcard(suffix.to_string()));
        }
        if lower.starts_with('*') {
            return Err(invalid(
                "a wildcard must be the whole first label followed by a dot, as in *.example.org"
                    .into(),
            ));
        }
        check_labels(&lower).map_err(invalid)?;
        Ok(HostPattern::Exact(lower))
    }

    /// Whether `host` (any case, optional trailing dot) matches.
    pub fn matches(&self, host: &str) -> bool {
        let host = strip_root(host).to_ascii_lowercase();
        match self {
            HostPattern::Exact(name) => host == *name,
            HostPattern::Wildcard(suffix) => match host.split_once('.') {
                Some((first, rest)) => {
                    !first.is_empty() && !first.contains('*') && rest == suffix.as_str()
                }
                None => false,
            },
        }
    }

    /// Higher is more specific: an exact name beats any wildcard; a wildcard
    /// with more labels beats one with fewer.
    pub fn specificity(&self) -> usize {
        match self {
            HostPattern::Exact(_) => usize::MAX,
            HostPattern::Wildcard(suffix) => suffix.split('.').count(),
        }
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Exact(n) => f.write_str(n),
            HostPattern::Wildcard(s) => write!(f, "*.{s}"),
        }
    }
}

impl std::str::FromStr for HostPattern {
    type Err = AuthzError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        HostPattern::parse(s)
    }
}

/// One authorization entry: primaries matching `pattern` may replicate here;
/// their replicas go under `storage`; they belong to `trust_group`.
///
/// With `issuer`, a matching primary's certificate must also chain through the
/// CA certificate with that SHA-256 fingerprint (its issuer, an intermediate
/// or the trusted root): this scopes the entry to one CA when the host trusts
/// several. With `pin`, the primary's certificate must be exactly the one
/// with that SHA-256 fingerprint (of the whole DER certificate, not of its
/// public key, so a renewed certificate needs a new pin). A primary that
/// matches an entry's pattern but fails its issuer or pin is refused; it does
/// not fall through to a less specific entry or to "allow any".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthzEntry {
    pub pattern: HostPattern,
    pub storage: PathBuf,
    pub trust_group: String,
    /// SHA-256 of a CA certificate on the peer's verified path (upper-case hex).
    pub issuer: Option<String>,
    /// SHA-256 of the peer's certificate (upper-case hex).
    pub pin: Option<String>,
}

impl TryFrom<&vmrepl_types::replication::AuthorizationEntry> for AuthzEntry {
    type Error = AuthzError;
    fn try_from(e: &vmrepl_types::replication::AuthorizationEntry) -> Result<Self, AuthzError> {
        let pattern = HostPattern::parse(&e.primary)?;
        if e.trust_group.trim().is_empty() {
            return Err(AuthzError::EmptyTrustGroup {
                pattern: pattern.to_string(),
            });
        }
        let fingerprint = |field: &'static str, v: &Option<String>| {
            v.as_deref()
                .map(|f| {
                    normalize_fingerprint(f).map_err(|detail| AuthzError::InvalidFingerprint {
                        pattern: pattern.to_string(),
                        field,
                        detail,
                    })
                })
                .transpose()
        };
        Ok(AuthzEntry {
            issuer: fingerprint("issuer", &e.issuer)?,
            pin: fingerprint("pin", &e.pin)?,
            pattern,
            storage: e.storage.clone(),
            trust_group: e.trust_group.clone(),
        })
    }
}

/// The trust group given to primaries admitted by "replication from any server".
pub const DEFAULT_TRUST_GROUP: &str = "DEFAULT";

/// What an authorized primary is granted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// Where this primary's replicas are stored.
    pub storage: PathBuf,
    /// The primary's trust group: a replica VM accepts replication only from
    /// primaries of the trust group it was created under.
    pub trust_group: String,
    /// The authorization entry that granted it: its host-name pattern, or
    /// "any trusted primary" when the server allows any.
    #[serde(default)]
    pub entry: String,
}

/// The replica server's authorization settings.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Authorization {
    /// Accept any primary whose certificate we trust (Hyper-V's
    /// "ReplicationAllowedFromAnyServer"); requires `default_storage`.
    pub allow_any: bool,
    pub default_storage: Option<PathBuf>,
    pub entries: Vec<AuthzEntry>,
}

impl Authorization {
    /// Checks the settings as a whole: allow_any needs a default storage,
    /// patterns appear once, trust groups are not empty.
    pub fn validate(&self) -> Result<(), AuthzError> {
        if self.allow_any && self.default_storage.is_none() {
            return Err(AuthzError::AllowAnyWithoutStorage);
        }
        for (i, e) in self.entries.iter().enumerate() {
            if e.trust_group.trim().is_empty() {
                return Err(AuthzError::EmptyTrustGroup {
                    pattern: e.pattern.to_string(),
                });
            }
            if self.entries[..i].iter().any(|o| o.pattern == e.pattern) {
                return Err(AuthzError::DuplicatePattern {
                    pattern: e.pattern.to_string(),
                });
            }
        }
        Ok(())
    }

    /// Decides whether the primary `peer_host` may replicate here, by host
    /// name alone. An entry that checks the certificate (`issuer` or `pin`)
    /// refuses here: use [`Authorization::authorize_peer`].
    pub fn authorize(&self, peer_host: &str) -> Result<Grant, AuthzError> {
        self.decide(peer_host, None)
    }

    /// Decides whether the primary `peer` (its verified certificate) may
    /// replicate here. The most specific matching entry wins (an exact name
    /// beats a wildcard) and its `issuer` and `pin`, if any, must match the
    /// certificate; without a match, "allow any" admits the host into the
    /// default storage with trust group `DEFAULT`.
    pub fn authorize_peer(&self, peer: &PeerIdentity) -> Result<Grant, AuthzError> {
        self.decide(&peer.host_name, Some(peer))
    }

    fn decide(&self, peer_host: &str, cert: Option<&PeerIdentity>) -> Result<Grant, AuthzError> {
        self.validate()?;
        let host = normalize_host_name(peer_host)?;
        let best = self
            .entries
            .iter()
            .filter(|e| e.pattern.matches(&host))
            .max_by_key(|e| e.pattern.specificity());
        if let Some(e) = best {
            if e.issuer.is_some() || e.pin.is_some() {
                let Some(cert) = cert else {
                    return Err(AuthzError::NoCertificateToCheck {
                        host,
                        pattern: e.pattern.to_string(),
                    });
                };
                if let Some(issuer) = &e.issuer {
                    if !cert.ca_fingerprints.iter().any(|f| f == issuer) {
                        return Err(AuthzError::WrongIssuer {
                            host,
                            pattern: e.pattern.to_string(),
                            expected: issuer.clone(),
                            presented: if cert.ca_fingerprints.is_empty() {
                                "no known CA".into()
                            } else {
                                cert.ca_fingerprints.join(" -> ")
                            },
                        });
                    }
                }
                if let Some(pin) = &e.pin {
                    if cert.fingerprint != *pin {
                        return Err(AuthzError::PinMismatch {
                            host,
                            pattern: e.pattern.to_string(),
                            expected: pin.clone(),
                            presented: cert.fingerprint.clone(),
                        });
                    }
                }
            }
            return Ok(Grant {
                storage: e.storage.clone(),
                trust_group: e.trust_group.clone(),
                entry: e.pattern.to_string(),
            });
        }
        if self.allow_any {
            if let Some(storage) = &self.default_storage {
                return Ok(Grant {
                    storage: storage.clone(),
                    trust_group: DEFAULT_TRUST_GROUP.to_string(),
                    entry: "any trusted primary".to_string(),
                });
            }
        }
        let patterns: Vec<String> = self.entries.iter().map(|e| e.pattern.to_string()).collect();
        Err(AuthzError::NotAuthorized {
            host,
            patterns: if patterns.is_empty() {
                "none".to_string()
            } else {
                patterns.join(", ")
            },
        })
    }
}

impl TryFrom<&vmrepl_types::replication::ReplicaServerSettings> for Authorization {
    type Error = AuthzError;
    fn try_from(s: &vmrepl_types::replication::ReplicaServerSettings) -> Result<Self, AuthzError> {
        let a = Authorization {
            allow_any: s.allow_any,
            default_storage: s.default_storage.clone(),
            entries: s
                .entries
                .iter()
                .map(AuthzEntry::try_from)
                .collect::<Result<_, _>>()?,
        };
        a.validate()?;
        Ok(a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_matching_table() {
        let cases: &[(&str, &str, bool)] = &[
            ("*.example.org", "a.example.org", true),
            ("*.example.org", "A.Example.ORG", true),
            ("*.example.org", "a.example.org.", true),
            ("*.example.org", "example.org", false),
            ("*.example.org", "a.b.example.org", false),
            ("*.example.org", "a.example.com", false),
            ("*.example.org", "aexample.org", false),
            ("hv1.example.org", "hv1.example.org", true),
            ("HV1.Example.org", "hv1.EXAMPLE.org", true),
            ("hv1.example.org", "hv2.example.org", false),
            ("hv1.example.org", "x.hv1.example.org", false),
            ("hv1", "hv1", true),
        ];
        for (pattern, host, want) in cases {
            let p = HostPattern::parse(pattern).unwrap();
            assert_eq!(p.matches(host), *want, "{pattern} vs {host}");
        }
    }

    #[test]
    fn pattern_refusals_say_why() {
        let cases: &[(&str, &str)] = &[
            ("*", "bare `*`"),
            ("a*.example.org", "whole first label"),
            ("*a.example.org", "whole first label"),
            ("a.*.example.org", "contains `*`"),
            ("example.*", "contains `*`"),
            ("a..example.org", "empty label"),
            (".example.org", "empty label"),
            ("", "empty"),
            ("*.", "bare `*`"),
            ("example.org..", "empty label"),
            ("a_b.example.org", "contains '_'"),
            ("-a.example.org", "starts or ends with `-`"),
        ];
        for (pattern, why) in cases {
            let err = HostPattern::parse(pattern).unwrap_err().to_string();
            assert!(err.contains(why), "{pattern}: {err}");
            assert!(err.contains(&format!("{pattern:?}")), "{pattern}: {err}");
        }
    }

    fn entry(p: &str, storage: &str, group: &str) -> AuthzEntry {
        AuthzEntry {
            pattern: HostPattern::parse(p).unwrap(),
            storage: storage.into(),
            trust_group: group.into(),
            issuer: None,
            pin: None,
        }
    }

    fn peer(host: &str, fp: char, cas: &[char]) -> PeerIdentity {
        PeerIdentity {
            host_name: host.into(),
            fingerprint: fp.to_string().repeat(64),
            ca_fingerprints: cas.iter().map(|c| c.to_string().repeat(64)).collect(),
        }
    }

    #[test]
    fn an_entry_scoped_to_an_issuer_refuses_a_chain_through_another_ca() {
        let mut e = entry("*.example.org", "/srv/wild", "g1");
        e.issuer = Some("A".repeat(64));
        let a = Authorization {
            allow_any: true,
            default_storage: Some("/srv/any".into()),
            entries: vec![e],
        };
        assert!(a
            .authorize_peer(&peer("hv1.example.org", '1', &['A']))
            .is_ok());
        assert!(a
            .authorize_peer(&peer("hv1.example.org", '1', &['C', 'A']))
            .is_ok());
        let err = a
            .authorize_peer(&peer("hv1.example.org", '1', &['B']))
            .unwrap_err();
        assert!(matches!(err, AuthzError::WrongIssuer { .. }), "{err}");
        // It does not fall through to "allow any".
        assert!(err.to_string().contains(&"A".repeat(64)), "{err}");
        // By name alone, a scoped entry refuses (fails closed).
        assert!(matches!(
            a.authorize("hv1.example.org"),
            Err(AuthzError::NoCertificateToCheck { .. })
        ));
    }

    #[test]
    fn a_pinned_entry_accepts_only_its_certificate() {
        let mut e = entry("hv1.example.org", "/srv/hv1", "g1");
        e.pin = Some("D".repeat(64));
        let a = Authorization {
            allow_any: false,
            default_storage: None,
            entries: vec![e],
        };
        assert!(a
            .authorize_peer(&peer("hv1.example.org", 'D', &['A']))
            .is_ok());
        let err = a
            .authorize_peer(&peer("hv1.example.org", 'E', &['A']))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("pinned") && err.contains(&"E".repeat(64)),
            "{err}"
        );
    }

    #[test]
    fn entry_fingerprints_are_normalized_and_checked() {
        use vmrepl_types::replication::AuthorizationEntry;
        let colons = (0..32).map(|_| "ab").collect::<Vec<_>>().join(":");
        let e = AuthzEntry::try_from(&AuthorizationEntry {
            primary: "hv1.example.org".into(),
            storage: "/srv".into(),
            trust_group: "g".into(),
            issuer: Some(colons),
            pin: None,
        })
        .unwrap();
        assert_eq!(e.issuer, Some("AB".repeat(32)));
        let err = AuthzEntry::try_from(&AuthorizationEntry {
            primary: "hv1.example.org".into(),
            storage: "/srv".into(),
            trust_group: "g".into(),
            issuer: None,
            pin: Some("xyz".into()),
        })
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("pin") && err.contains("64 hex digits"),
            "{err}"
        );
    }

    #[test]
    fn exact_beats_wildcard_regardless_of_order() {
        let a = Authorization {
            allow_any: false,
            default_storage: None,
            entries: vec![
                entry("*.example.org", "/srv/wild", "g1"),
                entry("hv1.example.org", "/srv/hv1", "g2"),
            ],
        };
        let g = a.authorize("HV1.example.org").unwrap();
        assert_eq!(g.storage, PathBuf::from("/srv/hv1"));
        assert_eq!(g.trust_group, "g2");
        let g = a.authorize("hv2.example.org").unwrap();
        assert_eq!(g.storage, PathBuf::from("/srv/wild"));
        assert_eq!(g.trust_group, "g1");
    }

    #[test]
    fn refusal_names_host_and_patterns() {
        let a = Authorization {
            allow_any: false,
            default_storage: None,
            entries: vec![
                entry("*.example.org", "/srv/wild", "g1"),
                entry("hv9.other.net", "/srv/x", "g1"),
            ],
        };
        let err = a.authorize("a.b.example.org").unwrap_err().to_string();
        assert!(err.contains("a.b.example.org"), "{err}");
        assert!(err.contains("*.example.org, hv9.other.net"), "{err}");
        let empty = Authorization::default();
        let err = empty.authorize("x.y").unwrap_err().to_string();
        assert!(err.contains("entries: none"), "{err}");
    }

    #[test]
    fn allow_any_needs_default_storage_and_gives_default_group() {
        let mut a = Authorization {
            allow_any: true,
            default_storage: None,
            entries: vec![entry("hv1.example.org", "/srv/hv1", "g2")],
        };
        assert_eq!(
            a.authorize("x.example.org"),
            Err(AuthzError::AllowAnyWithoutStorage)
        );
        a.default_storage = Some("/srv/default".into());
        let g = a.authorize("x.example.org").unwrap();
        assert_eq!(g.trust_group, DEFAULT_TRUST_GROUP);
        assert_eq!(g.storage, PathBuf::from("/srv/default"));
        // a listed host still gets its own entry
        assert_eq!(a.authorize("hv1.example.org").unwrap().trust_group, "g2");
    }

    #[test]
    fn converts_from_types() {
        use vmrepl_types::replication::{AuthorizationEntry, ReplicaServerSettings};
        let s = ReplicaServerSettings {
            entries: vec![AuthorizationEntry {
                primary: "*.Lab.example.org".into(),
                storage: "/srv/lab".into(),
                trust_group: "lab".into(),
                issuer: None,
                pin: None,
            }],
            ..Default::default()
        };
        let a = Authorization::try_from(&s).unwrap();
        assert_eq!(
            a.entries[0].pattern,
            HostPattern::Wildcard("lab.example.org".into())
        );
        assert_eq!(
            a.authorize("hv3.lab.example.org").unwrap().trust_group,
            "lab"
        );

        let bad = AuthorizationEntry {
            primary: "a*.example.org".into(),
            storage: "/x".into(),
            trust_group: "g".into(),
            issuer: None,
            pin: None,
        };
        assert!(AuthzEntry::try_from(&bad).is_err());
        let dup = ReplicaServerSettings {
            entries: vec![
                AuthorizationEntry {
                    primary: "h.example.org".into(),
                    storage: "/a".into(),
                    trust_group: "g".into(),
                    issuer: None,
                    pin: None,
                },
                AuthorizationEntry {
                    primary: "H.example.org".into(),
                    storage: "/b".into(),
                    trust_group: "g".into(),
                    issuer: None,
                    pin: None,
                },
            ],
            ..Default::default()
        };
        assert!(matches!(
            Authorization::try_from(&dup),
            Err(AuthzError::DuplicatePattern { .. })
        ));
    }
}
