//! A small built-in certificate authority, and the host identity (certificate,
//! key and trusted CAs) that the TLS layer uses.
//!
//! Hyper-V's certificate authentication needs a PKI; without a domain that is
//! the hardest part of setting it up. `vmrepl` ships a CA that fits in a
//! folder: `Ca::create` writes `ca.pem` and `ca-key.pem` (mode 0600), and
//! `Ca::issue_host` issues host certificates with the DNS name of the host
//! and both extended key usages (serverAuth and clientAuth), as Hyper-V
//! requires. Certificates from any other CA can be imported with
//! [`HostIdentity::import`] as long as they meet the same rules.

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use ring::rand::SecureRandom;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use time::OffsetDateTime;

use crate::authz::{normalize_host_name, HostPattern};
use crate::cert::{
    describe_subject, diagnose, fmt_time, present_ekus, summarize_der, CertProblem, CertSummary,
    DiagnoseCtx, NameList, Role,
};

pub use crate::cert::fingerprint_sha256;

/// File name of the CA certificate inside a CA directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the CA private key inside a CA directory (mode 0600).
pub const CA_KEY_FILE: &str = "ca-key.pem";

/// Validity of a CA created by [`Ca::create`].
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// A sensible default validity for host certificates (two years).
pub const HOST_VALIDITY: Duration = Duration::from_secs(2 * 365 * 24 * 3600);
/// Certificates start this long before "now", so that a peer whose clock is a
/// little behind still accepts them.
const BACKDATE: time::Duration = time::Duration::minutes(10);

/// Errors of the certificate and identity layer.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("could not read the {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("could not write {path}: {source}; check that the directory exists and is writable")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} already exists; refusing to overwrite an existing CA (its key signed the \
         certificates hosts hold): load it instead, or choose an empty directory"
    )]
    AlreadyExists { path: PathBuf },
    #[error(
        "{path} already exists (as a file or a symbolic link); refusing to write a private key \
         over it or through it: remove it, or choose another folder"
    )]
    KeyExists { path: PathBuf },
    #[error(
        "{path} holds no PEM certificate (expected a -----BEGIN CERTIFICATE----- block); give \
         the certificate file in PEM form"
    )]
    NoCertificate { path: PathBuf },
    #[error(
        "{path} holds no PEM private key (expected -----BEGIN PRIVATE KEY-----, -----BEGIN EC \
         PRIVATE KEY----- or -----BEGIN RSA PRIVATE KEY-----): {detail}"
    )]
    NoKey { path: PathBuf, detail: String },
    #[error("{path} is not a valid certificate: {detail}")]
    BadCertificate { path: PathBuf, detail: String },
    #[error(
        "the private key in {key_path} does not belong to the certificate in {cert_path} \
         ({subject}); use the key file that was created together with that certificate"
    )]
    KeyMismatch {
        cert_path: PathBuf,
        key_path: PathBuf,
        subject: String,
    },
    #[error("the private key in {path} cannot be used: {detail}")]
    UnusableKey { path: PathBuf, detail: String },
    #[error("{path} cannot be used as this host's certificate: {problem}")]
    Invalid { path: PathBuf, problem: CertProblem },
    #[error(
        "the certificate {path} ({subject}) names no DNS host name (it has: {names}); a host \
         certificate needs the host's FQDN as a DNS subject alternative name"
    )]
    NoHostName {
        path: PathBuf,
        subject: String,
        names: NameList,
    },
    #[error(
        "no trusted CA certificate was given; pass at least one CA certificate (for the \
         built-in CA, its ca.pem) that issued the certificates of this host and its peers"
    )]
    NoTrust,
    #[error(
        "{path} is not a CA certificate (its basicConstraints do not say cA=true); give the \
         certificate of the CA itself, not a host certificate"
    )]
    NotCa { path: PathBuf },
    #[error("invalid host name: {0}")]
    HostName(#[from] crate::authz::AuthzError),
    #[error(
        "the requested validity is empty: not_after {not_after} is not later than not_before \
         {not_before}"
    )]
    EmptyValidity {
        not_before: String,
        not_after: String,
    },
    #[error("could not create the {what}: {source}")]
    Generate {
        what: &'static str,
        source: rcgen::Error,
    },
    #[error("the certificate could not be parsed: {detail}")]
    Parse { detail: String },
}

fn read_to_string(what: &'static str, path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(|source| PkiError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// Writes `contents` to a new file `path` (refusing to replace one) with `mode`.
fn write_new(path: &Path, contents: &str, mode: u32) -> Result<(), PkiError> {
    write_new_or(path, contents, mode, |path| PkiError::AlreadyExists {
        path,
    })
}

/// Writes a private key (PEM) to the new file `path`: mode 0600 from creation
/// (`O_CREAT|O_EXCL|O_NOFOLLOW`), fsynced. Refuses an existing file or a symbolic link at
/// `path` with [`PkiError::KeyExists`], so the key can neither be read through a file
/// someone else created first nor be written through a link to somewhere else.
pub fn write_private_key(path: &Path, key_pem: &str) -> Result<(), PkiError> {
    write_new_or(path, key_pem, 0o600, |path| PkiError::KeyExists { path })
}

/// Writes a public file (a certificate, mode 0644) through a temporary file and a rename,
/// so an existing file or symbolic link at `path` is replaced, never written through.
pub fn write_public_replace(path: &Path, pem: &str) -> Result<(), PkiError> {
    write_replace(path, pem, 0o644)
}

fn write_new_or(
    path: &Path,
    contents: &str,
    mode: u32,
    exists: impl FnOnce(PathBuf) -> PkiError,
) -> Result<(), PkiError> {
    let werr = |source| PkiError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| {
            // O_EXCL already refuses a symbolic link (EEXIST); O_NOFOLLOW makes it ELOOP on
            // systems that check it first.
            if e.kind() == std::io::ErrorKind::AlreadyExists
                || e.raw_os_error() == Some(libc::ELOOP)
            {
                exists(path.to_path_buf())
            } else {
                werr(e)
            }
        })?;
    f.write_all(contents.as_bytes()).map_err(werr)?;
    f.sync_all().map_err(werr)
}

/// Writes `contents` to `path` through a temporary file and a rename, with `mode`.
fn write_replace(path: &Path, contents: &str, mode: u32) -> Result<(), PkiError> {
    let tmp = path.with_extension("tmp-vmrepl");
    let _ = fs::remove_file(&tmp);
    write_new(&tmp, contents, mode)?;
    fs::rename(&tmp, path).map_err(|source| PkiError::Write {
        path: path.to_path_buf(),
        source,
    })
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    // SystemRandom only fails if the OS has no randomness; fall back to time.
    if ring::rand::SystemRandom::new().fill(&mut bytes).is_err() {
        let nanos = OffsetDateTime::now_utc().unix_timestamp_nanos();
        bytes = nanos.to_be_bytes();
    }
    bytes[0] &= 0x7f; // positive
    bytes[0] |= 0x01; // no leading zero byte
    SerialNumber::from_slice(&bytes)
}

fn to_time_duration(d: Duration) -> time::Duration {
    time::Duration::try_from(d).unwrap_or(time::Duration::MAX)
}

/// A host certificate and its private key, both PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct IssuedCert {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedCert")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

impl IssuedCert {
    /// Writes the certificate (mode 0644) and the key (mode 0600), replacing
    /// existing files atomically.
    pub fn write(&self, cert_path: &Path, key_path: &Path) -> Result<(), PkiError> {
        write_replace(key_path, &self.key_pem, 0o600)?;
        write_replace(cert_path, &self.cert_pem, 0o644)
    }

    /// What the certificate says.
    pub fn summary(&self) -> Result<CertSummary, PkiError> {
        describe(&self.cert_pem)
    }
}

/// What to put into a host certificate. [`HostCertSpec::new`] gives the
/// normal one; tests and special cases may change any field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostCertSpec {
    /// The host's FQDN; the first DNS SAN and the common name.
    pub host_name: String,
    /// More DNS names (aliases, a cluster broker name, `*.domain`).
    pub extra_dns_names: Vec<String>,
    /// IP addresses to name as well.
    pub ip_addrs: Vec<IpAddr>,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    /// Include the serverAuth EKU (normally yes).
    pub server_auth: bool,
    /// Include the clientAuth EKU (normally yes).
    pub client_auth: bool,
}

impl HostCertSpec {
    /// A certificate for `host_name`, valid from (nearly) now for `validity`,
    /// with both EKUs.
    pub fn new(host_name: &str, validity: Duration) -> Self {
        let now = OffsetDateTime::now_utc();
        HostCertSpec {
            host_name: host_name.to_string(),
            extra_dns_names: Vec::new(),
            ip_addrs: Vec::new(),
            not_before: now - BACKDATE,
            not_after: now + to_time_duration(validity),
            server_auth: true,
            client_auth: true,
        }
    }
}

/// The built-in CA: a directory with `ca.pem` and `ca-key.pem`.
pub struct Ca {
    dir: PathBuf,
    cert_pem: String,
    summary: CertSummary,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("dir", &self.dir)
            .field("subject", &self.summary.subject)
            .field("fingerprint", &self.summary.fingerprint_sha256)
            .finish()
    }
}

impl Ca {
    /// Creates a new CA in `dir` (created if missing) named `common_name`.
    /// Refuses to overwrite an existing CA.
    pub fn create(dir: &Path, common_name: &str) -> Result<Ca, PkiError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        for p in [&cert_path, &key_path] {
            if p.exists() {
                return Err(PkiError::AlreadyExists { path: p.clone() });
            }
        }
        fs::create_dir_all(dir).map_err(|source| PkiError::Write {
            path: dir.to_path_buf(),
            source,
        })?;
        let key = KeyPair::generate().map_err(|source| PkiError::Generate {
            what: "CA key",
            source,
        })?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        dn.push(DnType::OrganizationName, "vmrepl");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + to_time_duration(CA_VALIDITY);
        params.serial_number = Some(random_serial());
        let cert = params
            .self_signed(&key)
            .map_err(|source| PkiError::Generate {
                what: "CA certificate",
                source,
            })?;
        let cert_pem = cert.pem();
        write_new(&key_path, &key.serialize_pem(), 0o600)?;
        write_new(&cert_path, &cert_pem, 0o644)?;
        let summary = summarize_der(cert.der()).map_err(|detail| PkiError::Parse { detail })?;
        Ok(Ca {
            dir: dir.to_path_buf(),
            cert_pem,
            summary,
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads the CA in `dir`, checking that the key belongs to the certificate.
    pub fn load(dir: &Path) -> Result<Ca, PkiError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let cert_pem = read_to_string("CA certificate", &cert_path)?;
        let key_pem = read_to_string("CA key", &key_path)?;
        let der = first_cert(&cert_path, cert_pem.as_bytes())?;
        let summary = summarize_der(&der).map_err(|detail| PkiError::BadCertificate {
            path: cert_path.clone(),
            detail,
        })?;
        if !summary.is_ca {
            return Err(PkiError::NotCa { path: cert_path });
        }
        let key_der = parse_key(&key_path, key_pem.as_bytes())?;
        check_key_matches(&cert_path, &key_path, &der, key_der, &summary)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| PkiError::UnusableKey {
            path: key_path.clone(),
            detail: e.to_string(),
        })?;
        let issuer = Issuer::from_ca_cert_der(&der, key).map_err(|e| PkiError::BadCertificate {
            path: cert_path.clone(),
            detail: e.to_string(),
        })?;
        Ok(Ca {
            dir: dir.to_path_buf(),
            cert_pem,
            summary,
            issuer,
        })
    }

    /// The CA certificate (PEM): what every host must trust.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Path of `ca.pem`.
    pub fn cert_path(&self) -> PathBuf {
        self.dir.join(CA_CERT_FILE)
    }

    pub fn summary(&self) -> &CertSummary {
        &self.summary
    }

    /// Issues a host certificate for `host_name`, valid from now for
    /// `validity`, with SAN DNS = host name and EKU serverAuth + clientAuth.
    pub fn issue_host(&self, host_name: &str, validity: Duration) -> Result<IssuedCert, PkiError> {
        self.issue(&HostCertSpec::new(host_name, validity))
    }

    /// Issues a host certificate exactly as `spec` says.
    pub fn issue(&self, spec: &HostCertSpec) -> Result<IssuedCert, PkiError> {
        if spec.not_after <= spec.not_before {
            return Err(PkiError::EmptyValidity {
                not_before: fmt_time(spec.not_before),
                not_after: fmt_time(spec.not_after),
            });
        }
        let host = normalize_host_name(&spec.host_name)?;
        let mut sans = vec![dns_san(&host)?];
        for extra in &spec.extra_dns_names {
            let name = match extra.strip_prefix("*.") {
                Some(rest) => format!("*.{}", normalize_host_name(rest)?),
                None => normalize_host_name(extra)?,
            };
            sans.push(dns_san(&name)?);
        }
        sans.extend(spec.ip_addrs.iter().copied().map(SanType::IpAddress));

        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, host.as_str());
        dn.push(DnType::OrganizationName, "vmrepl");
        params.distinguished_name = dn;
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        if spec.server_auth {
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ServerAuth);
        }
        if spec.client_auth {
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ClientAuth);
        }
        params.use_authority_key_identifier_extension = true;
        params.not_before = spec.not_before;
        params.not_after = spec.not_after;
        params.serial_number = Some(random_serial());
        let key = KeyPair::generate().map_err(|source| PkiError::Generate {
            what: "host key",
            source,
        })?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|source| PkiError::Generate {
                what: "host certificate",
                source,
            })?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

fn dns_san(name: &str) -> Result<SanType, PkiError> {
    let ia5 = name.try_into().map_err(|source| PkiError::Generate {
        what: "DNS name",
        source,
    })?;
    Ok(SanType::DnsName(ia5))
}

/// Summarizes the first certificate in `cert_pem`.
pub fn describe(cert_pem: &str) -> Result<CertSummary, PkiError> {
    let der = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .next()
        .ok_or_else(|| PkiError::Parse {
            detail: "no -----BEGIN CERTIFICATE----- block found".to_string(),
        })?
        .map_err(|e| PkiError::Parse {
            detail: e.to_string(),
        })?;
    summarize_der(&der).map_err(|detail| PkiError::Parse { detail })
}

fn parse_certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PkiError::BadCertificate {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(PkiError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

fn first_cert(path: &Path, pem: &[u8]) -> Result<CertificateDer<'static>, PkiError> {
    Ok(parse_certs(path, pem)?.swap_remove(0))
}

fn parse_key(path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, PkiError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| PkiError::NoKey {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn check_key_matches(
    cert_path: &Path,
    key_path: &Path,
    cert: &CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
    summary: &CertSummary,
) -> Result<(), PkiError> {
    let signing =
        provider()
            .key_provider
            .load_private_key(key)
            .map_err(|e| PkiError::UnusableKey {
                path: key_path.to_path_buf(),
                detail: e.to_string(),
            })?;
    let ck = rustls::sign::CertifiedKey::new(vec![cert.clone()], signing);
    match ck.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(()),
        Err(rustls::Error::InconsistentKeys(_)) => Err(PkiError::KeyMismatch {
            cert_path: cert_path.to_path_buf(),
            key_path: key_path.to_path_buf(),
            subject: summary.subject.clone(),
        }),
        Err(e) => Err(PkiError::BadCertificate {
            path: cert_path.to_path_buf(),
            detail: e.to_string(),
        }),
    }
}

/// This host's identity on the wire: its certificate chain and key, and the
/// CAs it trusts for its peers' certificates.
pub struct HostIdentity {
    host_name: String,
    cert_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    /// The trusted CAs; shared by every clone and replaced as a whole by
    /// [`HostIdentity::reload_trust`].
    trust: Arc<RwLock<Arc<Trust>>>,
    summary: CertSummary,
    /// Fingerprints of peer certificates refused at every handshake, in and
    /// out (`vmrepl host revoke-cert`). Shared by every clone, so the daemon
    /// can change it while connections use the identity.
    revoked: Arc<RwLock<BTreeSet<String>>>,
}

impl Clone for HostIdentity {
    fn clone(&self) -> Self {
        HostIdentity {
            host_name: self.host_name.clone(),
            cert_chain: self.cert_chain.clone(),
            key: self.key.clone_key(),
            trust: self.trust.clone(),
            summary: self.summary.clone(),
            revoked: self.revoked.clone(),
        }
    }
}

impl std::fmt::Debug for HostIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostIdentity")
            .field("host_name", &self.host_name)
            .field("subject", &self.summary.subject)
            .field("fingerprint", &self.summary.fingerprint_sha256)
            .field("trusted", &self.trust().names)
            .finish()
    }
}

impl HostIdentity {
    /// Loads this host's certificate (PEM, leaf first, intermediates may
    /// follow), its private key, and the trusted CA certificates. The host
    /// name is the certificate's first DNS name. Checks everything
    /// [`HostIdentity::import`] checks except the expected name.
    pub fn load(
        cert_path: &Path,
        key_path: &Path,
        trust: &[PathBuf],
    ) -> Result<HostIdentity, PkiError> {
        Self::load_files(None, cert_path, key_path, trust)
    }

    /// Imports existing PEM files (from any CA) as the identity of the host
    /// `host_name`, validating that the key matches the certificate, that the
    /// certificate carries both serverAuth and clientAuth, names `host_name`
    /// (directly or by a wildcard), is within its validity period and chains
    /// to one of the trusted CAs.
    pub fn import(
        host_name: &str,
        cert_path: &Path,
        key_path: &Path,
        trust: &[PathBuf],
    ) -> Result<HostIdentity, PkiError> {
        Self::load_files(Some(host_name), cert_path, key_path, trust)
    }

    fn load_files(
        host_name: Option<&str>,
        cert_path: &Path,
        key_path: &Path,
        trust: &[PathBuf],
    ) -> Result<HostIdentity, PkiError> {
        let cert_pem = read_to_string("host certificate", cert_path)?;
        let key_pem = read_to_string("host key", key_path)?;
        let mut trust_pems = Vec::new();
        for p in trust {
            trust_pems.push((p.clone(), read_to_string("trusted CA certificate", p)?));
        }
        Self::build(
            host_name,
            cert_path,
            &cert_pem,
            key_path,
            &key_pem,
            &trust_pems,
        )
    }

    /// Like [`HostIdentity::import`] from PEM text already in memory
    /// (`host_name` None: take it from the certificate).
    pub fn from_pem(
        host_name: Option<&str>,
        cert_pem: &str,
        key_pem: &str,
        trust_pems: &[&str],
    ) -> Result<HostIdentity, PkiError> {
        let trust: Vec<(PathBuf, String)> = trust_pems
            .iter()
            .enumerate()
            .map(|(i, p)| {
                (
                    PathBuf::from(format!("<trusted CA #{}>", i + 1)),
                    p.to_string(),
                )
            })
            .collect();
        Self::build(
            host_name,
            Path::new("<certificate>"),
            cert_pem,
            Path::new("<key>"),
            key_pem,
            &trust,
        )
    }

    /// Builds an identity from PEM text **without** the local checks (validity,
    /// EKUs, name, chain to the trusted CAs); only the key/certificate match is
    /// checked. The peer still verifies everything. Meant for tests that
    /// present deliberately bad certificates and for diagnostic tools that
    /// want to see what a peer says about a certificate.
    pub fn from_pem_unvalidated(
        cert_pem: &str,
        key_pem: &str,
        trust_pems: &[&str],
    ) -> Result<HostIdentity, PkiError> {
        let cert_path = Path::new("<certificate>");
        let chain = parse_certs(cert_path, cert_pem.as_bytes())?;
        let summary = summarize_der(&chain[0]).map_err(|detail| PkiError::BadCertificate {
            path: cert_path.to_path_buf(),
            detail,
        })?;
        let key = parse_key(Path::new("<key>"), key_pem.as_bytes())?;
        check_key_matches(
            cert_path,
            Path::new("<key>"),
            &chain[0],
            key.clone_key(),
            &summary,
        )?;
        let mut trust = Trust::default();
        for pem in trust_pems {
            for der in parse_certs(Path::new("<trusted CA>"), pem.as_bytes())? {
                let name = summarize_der(&der)
                    .map(|s| s.subject)
                    .unwrap_or_else(|_| "(unparsable)".into());
                trust.push(der, name);
            }
        }
        Ok(HostIdentity {
            host_name: summary.host_name().unwrap_or_default().to_ascii_lowercase(),
            cert_chain: chain,
            key,
            trust: Arc::new(RwLock::new(Arc::new(trust))),
            summary,
            revoked: Arc::default(),
        })
    }

    fn build(
        host_name: Option<&str>,
        cert_path: &Path,
        cert_pem: &str,
        key_path: &Path,
        key_pem: &str,
        trust_pems: &[(PathBuf, String)],
    ) -> Result<HostIdentity, PkiError> {
        let chain = parse_certs(cert_path, cert_pem.as_bytes())?;
        let summary = summarize_der(&chain[0]).map_err(|detail| PkiError::BadCertificate {
            path: cert_path.to_path_buf(),
            detail,
        })?;
        let key = parse_key(key_path, key_pem.as_bytes())?;
        check_key_matches(cert_path, key_path, &chain[0], key.clone_key(), &summary)?;

        let subject = describe_subject(&summary);
        let invalid = |problem| PkiError::Invalid {
            path: cert_path.to_path_buf(),
            problem,
        };
        let now = OffsetDateTime::now_utc();
        if now > summary.not_after {
            return Err(invalid(CertProblem::Expired {
                subject,
                not_after: fmt_time(summary.not_after),
                now: fmt_time(now),
            }));
        }
        if now < summary.not_before {
            return Err(invalid(CertProblem::NotYetValid {
                subject,
                not_before: fmt_time(summary.not_before),
                now: fmt_time(now),
            }));
        }
        for (has, name) in [
            (summary.has_server_auth(), "serverAuth (1.3.6.1.5.5.7.3.1)"),
            (summary.has_client_auth(), "clientAuth (1.3.6.1.5.5.7.3.2)"),
        ] {
            if !has {
                return Err(invalid(CertProblem::MissingEku {
                    subject,
                    missing: name.to_string(),
                    present: present_ekus(Some(&summary)),
                }));
            }
        }
        let host_name = match host_name {
            Some(expected) => {
                let expected = normalize_host_name(expected)?;
                let named = summary.dns_names().any(|n| {
                    HostPattern::parse(n)
                        .map(|p| p.matches(&expected))
                        .unwrap_or(false)
                });
                if !named {
                    return Err(invalid(CertProblem::NameMismatch {
                        expected,
                        subject,
                        presented: NameList(summary.sans.clone()),
                    }));
                }
                expected
            }
            None => match summary.host_name() {
                Some(n) if !n.starts_with('*') => n.to_ascii_lowercase(),
                _ => {
                    return Err(PkiError::NoHostName {
                        path: cert_path.to_path_buf(),
                        subject: summary.subject.clone(),
                        names: NameList(summary.sans.clone()),
                    })
                }
            },
        };

        let trust = parse_trust(trust_pems)?;
        let identity = HostIdentity {
            host_name,
            cert_chain: chain,
            key,
            trust: Arc::new(RwLock::new(Arc::new(trust))),
            summary,
            revoked: Arc::default(),
        };
        identity
            .verify_own_chain(&identity.trust())
            .map_err(invalid)?;
        Ok(identity)
    }

    /// Replaces the trusted CAs with the certificates in `trust` (PEM files),
    /// for every clone of this identity: outgoing connections use them from
    /// the next connection on, a [`crate::tls::Listener`] after its
    /// [`crate::tls::Listener::reload`]. Refused, with the old list kept, if a
    /// file is not a CA certificate or our own certificate would no longer
    /// chain to a trusted CA.
    pub fn reload_trust(&self, trust: &[PathBuf]) -> Result<(), PkiError> {
        let mut pems = Vec::new();
        for p in trust {
            pems.push((p.clone(), read_to_string("trusted CA certificate", p)?));
        }
        let next = parse_trust(&pems)?;
        self.verify_own_chain(&next)
            .map_err(|problem| PkiError::Invalid {
                path: PathBuf::from("<this host's certificate>"),
                problem,
            })?;
        *self.trust.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(next);
        Ok(())
    }

    /// The trusted CAs as they are now.
    pub(crate) fn trust(&self) -> Arc<Trust> {
        self.trust.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Checks that our own certificate chains to one of the CAs in `trust`,
    /// so a misconfiguration shows at load time rather than at the peer.
    fn verify_own_chain(&self, trust: &Trust) -> Result<(), CertProblem> {
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(trust.root_store()),
            provider(),
        )
        .build()
        .map_err(|e| CertProblem::Other {
            subject: self.summary.subject.clone(),
            detail: e.to_string(),
        })?;
        let name =
            ServerName::try_from(self.host_name.clone()).map_err(|e| CertProblem::Other {
                subject: self.summary.subject.clone(),
                detail: e.to_string(),
            })?;
        use rustls::client::danger::ServerCertVerifier;
        verifier
            .verify_server_cert(
                &self.cert_chain[0],
                &self.cert_chain[1..],
                &name,
                &[],
                UnixTime::now(),
            )
            .map(|_| ())
            .map_err(|e| {
                diagnose(
                    &self.cert_chain[0],
                    &e,
                    &DiagnoseCtx {
                        trusted: &trust.names,
                        expected_name: Some(&self.host_name),
                        role: Role::Server,
                    },
                )
            })
    }

    /// The host name this identity stands for (lower case).
    pub fn host_name(&self) -> &str {
        &self.host_name
    }

    /// What our certificate says.
    pub fn summary(&self) -> &CertSummary {
        &self.summary
    }

    /// SHA-256 fingerprint of our certificate.
    pub fn fingerprint(&self) -> &str {
        &self.summary.fingerprint_sha256
    }

    /// Subjects of the trusted CAs.
    pub fn trusted_ca_names(&self) -> Vec<String> {
        self.trust().names.clone()
    }

    /// SHA-256 fingerprints of the trusted CAs (upper-case hex), in the
    /// order of [`HostIdentity::trusted_ca_names`].
    pub fn trusted_ca_fingerprints(&self) -> Vec<String> {
        self.trust().fingerprints.clone()
    }

    /// Replaces the list of revoked peer-certificate fingerprints (any form
    /// [`crate::cert::normalize_fingerprint`] accepts; others are ignored).
    /// Takes effect at the next handshake, in both directions, for every
    /// clone of this identity.
    pub fn set_revoked<I, S>(&self, fingerprints: I)
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let set: BTreeSet<String> = fingerprints
            .into_iter()
            .filter_map(|f| crate::cert::normalize_fingerprint(f.as_ref()).ok())
            .collect();
        *self.revoked.write().unwrap_or_else(|p| p.into_inner()) = set;
    }

    /// Whether the certificate with this fingerprint (upper-case hex) is revoked.
    pub fn is_revoked(&self, fingerprint: &str) -> bool {
        self.revoked
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(fingerprint)
    }

    pub(crate) fn cert_chain(&self) -> &[CertificateDer<'static>] {
        &self.cert_chain
    }

    pub(crate) fn key(&self) -> PrivateKeyDer<'static> {
        self.key.clone_key()
    }

    pub(crate) fn root_store(&self) -> rustls::RootCertStore {
        self.trust().root_store()
    }
}

/// A host's trusted CAs: certificates, subjects and SHA-256 fingerprints, in
/// the same order.
#[derive(Debug, Clone, Default)]
pub(crate) struct Trust {
    pub(crate) roots: Vec<CertificateDer<'static>>,
    pub(crate) names: Vec<String>,
    pub(crate) fingerprints: Vec<String>,
}

impl Trust {
    fn push(&mut self, der: CertificateDer<'static>, name: String) {
        self.fingerprints
            .push(crate::cert::fingerprint_sha256(&der));
        self.names.push(name);
        self.roots.push(der);
    }

    pub(crate) fn root_store(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        // Already parsed as CA certificates; a root webpki cannot use is
        // skipped here and then shows up as "unknown CA" at the peer.
        let _ = roots.add_parsable_certificates(self.roots.iter().cloned());
        roots
    }
}

/// Parses trusted CA certificates (PEM, several per file allowed); each must be a CA.
fn parse_trust(trust_pems: &[(PathBuf, String)]) -> Result<Trust, PkiError> {
    if trust_pems.is_empty() {
        return Err(PkiError::NoTrust);
    }
    let mut trust = Trust::default();
    for (path, pem) in trust_pems {
        for der in parse_certs(path, pem.as_bytes())? {
            let s = summarize_der(&der).map_err(|detail| PkiError::BadCertificate {
                path: path.clone(),
                detail,
            })?;
            if !s.is_ca {
                return Err(PkiError::NotCa { path: path.clone() });
            }
            trust.push(der, s.subject);
        }
    }
    Ok(trust)
}
