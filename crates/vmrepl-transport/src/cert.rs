//! Certificate inspection: summaries for display, fingerprints, and the
//! diagnosis that turns a terse verifier error into a sentence naming the
//! exact cause (with dates, names and issuers) and the fix.

use std::fmt;
use std::net::IpAddr;

use rustls::pki_types::UnixTime;
use rustls::CertificateError;
use serde::{Deserialize, Serialize};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// What `host info` and the CLI show about a certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertSummary {
    /// Subject distinguished name, e.g. `CN=hv1.example.org, O=vmrepl`.
    pub subject: String,
    /// Subject alternative names: DNS names first, then IP addresses, in certificate order.
    pub sans: Vec<String>,
    /// Issuer distinguished name.
    pub issuer: String,
    #[serde(with = "time::serde::rfc3339")]
    pub not_before: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: OffsetDateTime,
    /// SHA-256 of the DER certificate, upper-case hex without separators.
    pub fingerprint_sha256: String,
    /// Extended key usages by name (`serverAuth`, `clientAuth`, or a dotted OID).
    /// Empty when the certificate has no EKU extension.
    pub extended_key_usages: Vec<String>,
    /// Whether the certificate is a CA (basicConstraints cA=true).
    pub is_ca: bool,
}

impl CertSummary {
    /// DNS names among the SANs.
    pub fn dns_names(&self) -> impl Iterator<Item = &str> {
        self.sans
            .iter()
            .map(String::as_str)
            .filter(|s| s.parse::<IpAddr>().is_err())
    }

    /// The host name this certificate identifies: its first DNS SAN that is not
    /// a wildcard, else its first DNS SAN.
    pub fn host_name(&self) -> Option<&str> {
        self.dns_names()
            .find(|n| !n.starts_with('*'))
            .or_else(|| self.dns_names().next())
    }

    pub fn has_server_auth(&self) -> bool {
        self.extended_key_usages
            .iter()
            .any(|e| e == EKU_SERVER_AUTH)
    }

    pub fn has_client_auth(&self) -> bool {
        self.extended_key_usages
            .iter()
            .any(|e| e == EKU_CLIENT_AUTH)
    }

    /// Whether `now` lies inside the validity period.
    pub fn is_valid_at(&self, now: OffsetDateTime) -> bool {
        self.not_before <= now && now <= self.not_after
    }
}

pub(crate) const EKU_SERVER_AUTH: &str = "serverAuth";
pub(crate) const EKU_CLIENT_AUTH: &str = "clientAuth";

/// Brings a SHA-256 fingerprint as people write it (any case, with or
/// without `:` or space separators, an optional `sha256:` prefix) to the form
/// vmrepl stores and compares: 64 upper-case hex digits without separators.
pub fn normalize_fingerprint(text: &str) -> Result<String, String> {
    let t = text.trim();
    let t = t
        .strip_prefix("sha256:")
        .or_else(|| t.strip_prefix("SHA256:"))
        .unwrap_or(t);
    let hex: String = t
        .chars()
        .filter(|c| *c != ':' && !c.is_whitespace())
        .collect::<String>()
        .to_ascii_uppercase();
    if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!(
            "{text:?} is not a SHA-256 fingerprint: it needs 64 hex digits (colons allowed), as \
             `vmrepl host trust` and the daemon log print them"
        ));
    }
    Ok(hex)
}

/// Upper-case hex SHA-256 of `der` (a SHA-256 "thumbprint").
pub fn fingerprint_sha256(der: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    digest.as_ref().iter().map(|b| format!("{b:02X}")).collect()
}

/// Formats a time as RFC 3339 (UTC), the form every message uses.
pub(crate) fn fmt_time(t: OffsetDateTime) -> String {
    t.to_offset(time::UtcOffset::UTC)
        .replace_nanosecond(0)
        .unwrap_or(t)
        .format(&Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

fn fmt_unix(t: UnixTime) -> String {
    let secs = i64::try_from(t.as_secs()).unwrap_or(i64::MAX);
    OffsetDateTime::from_unix_timestamp(secs)
        .map(fmt_time)
        .unwrap_or_else(|_| format!("unix time {secs}"))
}

/// Parses a DER certificate into a summary; the error is a short description
/// of why it is not a certificate.
pub(crate) fn summarize_der(der: &[u8]) -> Result<CertSummary, String> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
    Ok(summarize(&cert, der))
}

fn summarize(cert: &X509Certificate<'_>, der: &[u8]) -> CertSummary {
    let mut dns = Vec::new();
    let mut ips = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(n) => dns.push((*n).to_string()),
                GeneralName::IPAddress(raw) => {
                    if let Some(ip) = ip_from_bytes(raw) {
                        ips.push(ip.to_string());
                    }
                }
                _ => {}
            }
        }
    }
    let mut ekus = Vec::new();
    if let Ok(Some(eku)) = cert.extended_key_usage() {
        let e = eku.value;
        if e.server_auth {
            ekus.push(EKU_SERVER_AUTH.to_string());
        }
        if e.client_auth {
            ekus.push(EKU_CLIENT_AUTH.to_string());
        }
        if e.any {
            ekus.push("anyExtendedKeyUsage".to_string());
        }
        if e.code_signing {
            ekus.push("codeSigning".to_string());
        }
        if e.email_protection {
            ekus.push("emailProtection".to_string());
        }
        if e.time_stamping {
            ekus.push("timeStamping".to_string());
        }
        if e.ocsp_signing {
            ekus.push("OCSPSigning".to_string());
        }
        for oid in &e.other {
            ekus.push(oid.to_id_string());
        }
    }
    dns.extend(ips);
    CertSummary {
        subject: cert.subject().to_string(),
        sans: dns,
        issuer: cert.issuer().to_string(),
        not_before: cert.validity().not_before.to_datetime(),
        not_after: cert.validity().not_after.to_datetime(),
        fingerprint_sha256: fingerprint_sha256(der),
        extended_key_usages: ekus,
        is_ca: cert.is_ca(),
    }
}

fn ip_from_bytes(raw: &[u8]) -> Option<IpAddr> {
    match raw.len() {
        4 => <[u8; 4]>::try_from(raw).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(raw).ok().map(IpAddr::from),
        _ => None,
    }
}

/// A list of names for messages: `a, b, c`, or `(none)`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NameList(pub Vec<String>);

impl fmt::Display for NameList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            f.write_str("(none)")
        } else {
            f.write_str(&self.0.join(", "))
        }
    }
}

/// Exactly why a certificate was not accepted. Each message names the
/// certificate, carries the values that matter and says how to fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertProblem {
    #[error(
        "the certificate {subject} expired at {not_after} (it is now {now}); issue a new host \
         certificate from the CA and install it on that host"
    )]
    Expired {
        subject: String,
        not_after: String,
        now: String,
    },
    #[error(
        "the certificate {subject} is not valid until {not_before} (it is now {now}); wait until \
         then, or check that the clocks of both hosts are right (NTP)"
    )]
    NotYetValid {
        subject: String,
        not_before: String,
        now: String,
    },
    #[error(
        "the certificate {subject} is signed by an unknown CA: its issuer {issuer} is not one of \
         the trusted CAs ({trusted}); add the issuing CA's certificate (its ca.pem) to the trusted \
         CAs, or use a certificate issued by a trusted CA"
    )]
    UnknownIssuer {
        subject: String,
        issuer: String,
        trusted: NameList,
    },
    #[error(
        "name mismatch: the expected host name is {expected} but the certificate {subject} names \
         {presented}; connect using a name the certificate holds, or issue a certificate whose \
         DNS name is {expected}"
    )]
    NameMismatch {
        expected: String,
        subject: String,
        presented: NameList,
    },
    #[error(
        "the certificate {subject} lacks the {missing} extended key usage (it has: {present}); \
         every vmrepl host is both a TLS server and a TLS client, so its certificate needs both \
         serverAuth and clientAuth: issue one with both"
    )]
    MissingEku {
        subject: String,
        missing: String,
        present: NameList,
    },
    #[error(
        "the signature on the certificate {subject} does not verify against its issuer {issuer}; \
         it was altered, or signed by another key under the same CA name: issue it again from \
         the right CA"
    )]
    BadSignature { subject: String, issuer: String },
    #[error(
        "the certificate {subject} (SHA-256 {fingerprint}) is revoked on this host (`vmrepl host \
         revoke-cert`); issue that host a new certificate, or run `vmrepl host unrevoke-cert \
         {fingerprint}` if it was revoked by mistake"
    )]
    Revoked {
        subject: String,
        fingerprint: String,
    },
    #[error("the certificate {subject} was refused: {detail}")]
    Other { subject: String, detail: String },
}

/// Which extended key usage the verifying side requires of the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// We verify a server: it must carry serverAuth.
    Server,
    /// We verify a client: it must carry clientAuth.
    Client,
}

impl Role {
    fn eku(self) -> &'static str {
        match self {
            Role::Server => "serverAuth (1.3.6.1.5.5.7.3.1)",
            Role::Client => "clientAuth (1.3.6.1.5.5.7.3.2)",
        }
    }
}

pub(crate) struct DiagnoseCtx<'a> {
    pub trusted: &'a [String],
    pub expected_name: Option<&'a str>,
    pub role: Role,
}

/// Turns a verifier error about the end-entity certificate `ee` into a [`CertProblem`].
pub(crate) fn diagnose(ee: &[u8], err: &rustls::Error, ctx: &DiagnoseCtx<'_>) -> CertProblem {
    let summary = summarize_der(ee).ok();
    let subject = summary
        .as_ref()
        .map(describe_subject)
        .unwrap_or_else(|| "(unparsable certificate)".to_string());
    let now_str = || fmt_time(OffsetDateTime::now_utc());
    let rustls::Error::InvalidCertificate(ce) = err else {
        return CertProblem::Other {
            subject,
            detail: err.to_string(),
        };
    };
    match ce {
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
            let (not_after, now) = match ce {
                CertificateError::ExpiredContext { time, not_after } => {
                    (fmt_unix(*not_after), fmt_unix(*time))
                }
                _ => (
                    summary
                        .as_ref()
                        .map(|s| fmt_time(s.not_after))
                        .unwrap_or_default(),
                    now_str(),
                ),
            };
            CertProblem::Expired {
                subject,
                not_after,
                now,
            }
        }
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
            let (not_before, now) = match ce {
                CertificateError::NotValidYetContext { time, not_before } => {
                    (fmt_unix(*not_before), fmt_unix(*time))
                }
                _ => (
                    summary
                        .as_ref()
                        .map(|s| fmt_time(s.not_before))
                        .unwrap_or_default(),
                    now_str(),
                ),
            };
            CertProblem::NotYetValid {
                subject,
                not_before,
                now,
            }
        }
        CertificateError::UnknownIssuer => CertProblem::UnknownIssuer {
            subject,
            issuer: summary
                .as_ref()
                .map(|s| s.issuer.clone())
                .unwrap_or_default(),
            trusted: NameList(ctx.trusted.to_vec()),
        },
        CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
            CertProblem::NameMismatch {
                expected: ctx.expected_name.unwrap_or("(unknown)").to_string(),
                subject,
                presented: NameList(summary.map(|s| s.sans).unwrap_or_default()),
            }
        }
        CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
            CertProblem::MissingEku {
                subject,
                missing: ctx.role.eku().to_string(),
                present: present_ekus(summary.as_ref()),
            }
        }
        #[allow(deprecated)]
        CertificateError::BadSignature => CertProblem::BadSignature {
            subject,
            issuer: summary.map(|s| s.issuer).unwrap_or_default(),
        },
        other => CertProblem::Other {
            subject,
            detail: other.to_string(),
        },
    }
}

pub(crate) fn present_ekus(summary: Option<&CertSummary>) -> NameList {
    match summary {
        Some(s) if !s.extended_key_usages.is_empty() => NameList(s.extended_key_usages.clone()),
        _ => NameList(vec!["no extended key usage extension".to_string()]),
    }
}

/// `CN=x, O=y (fingerprint ABCD…)`: names a certificate unambiguously but briefly.
pub(crate) fn describe_subject(s: &CertSummary) -> String {
    let fp: String = s.fingerprint_sha256.chars().take(16).collect();
    format!("\"{}\" (SHA-256 {fp}…)", s.subject)
}
