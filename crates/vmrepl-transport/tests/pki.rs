//! The built-in CA and host identity validation, with real files.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use time::OffsetDateTime;
use vmrepl_transport::pki::{CA_CERT_FILE, CA_KEY_FILE};
use vmrepl_transport::{describe, Ca, CertProblem, HostCertSpec, HostIdentity, PkiError};

const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn ca_create_load_and_permissions() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    let ca = Ca::create(&ca_dir, "Lab CA").unwrap();
    let key_mode = std::fs::metadata(ca_dir.join(CA_KEY_FILE))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600);
    assert!(ca.summary().is_ca);
    assert_eq!(ca.summary().subject, "CN=Lab CA, O=vmrepl");
    assert_eq!(ca.cert_path(), ca_dir.join(CA_CERT_FILE));

    // Refuses to overwrite.
    let err = Ca::create(&ca_dir, "Again").unwrap_err();
    assert!(matches!(err, PkiError::AlreadyExists { .. }), "{err}");
    assert!(err.to_string().contains("refusing to overwrite"), "{err}");

    // A loaded CA issues certificates that chain to the same ca.pem.
    let loaded = Ca::load(&ca_dir).unwrap();
    assert_eq!(loaded.summary(), ca.summary());
    let c = loaded.issue_host("hv1.example.org", YEAR).unwrap();
    let id = HostIdentity::from_pem(None, &c.cert_pem, &c.key_pem, &[ca.cert_pem()]).unwrap();
    assert_eq!(id.host_name(), "hv1.example.org");
}

#[test]
fn a_private_key_is_created_0600_and_never_written_over_or_through_an_existing_path() {
    use vmrepl_transport::pki::write_private_key;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("host-key.pem");
    write_private_key(&key, "KEY").unwrap();
    let mode = std::fs::metadata(&key).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    // An existing file is kept as it is.
    let err = write_private_key(&key, "OTHER").unwrap_err();
    assert!(matches!(err, PkiError::KeyExists { .. }), "{err}");
    assert!(err.to_string().contains("remove it"), "{err}");
    assert_eq!(std::fs::read_to_string(&key).unwrap(), "KEY");
    // A symbolic link planted at the key path is not followed: its target stays untouched,
    // and so does a dangling link's missing target.
    let target = write(dir.path(), "victim", "precious");
    let link = dir.path().join("link-key.pem");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let err = write_private_key(&link, "KEY").unwrap_err();
    assert!(matches!(err, PkiError::KeyExists { .. }), "{err}");
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious");
    let dangling = dir.path().join("dangling-key.pem");
    std::os::unix::fs::symlink(dir.path().join("nowhere"), &dangling).unwrap();
    assert!(write_private_key(&dangling, "KEY").is_err());
    assert!(!dir.path().join("nowhere").exists());
}

#[test]
fn ca_load_detects_foreign_key() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    Ca::create(&a, "A").unwrap();
    Ca::create(&b, "B").unwrap();
    std::fs::copy(b.join(CA_KEY_FILE), a.join(CA_KEY_FILE)).unwrap();
    let err = Ca::load(&a).unwrap_err();
    assert!(matches!(err, PkiError::KeyMismatch { .. }), "{err}");
    assert!(err
        .to_string()
        .contains("does not belong to the certificate"));
    let err = Ca::load(&dir.path().join("missing")).unwrap_err();
    assert!(
        err.to_string()
            .contains("could not read the CA certificate"),
        "{err}"
    );
}

#[test]
fn issued_host_certificate_has_names_ekus_and_dates() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::create(dir.path(), "Lab CA").unwrap();
    let mut spec = HostCertSpec::new("HV1.Example.org", YEAR);
    spec.ip_addrs = vec!["192.0.2.7".parse().unwrap(), "2001:db8::1".parse().unwrap()];
    spec.extra_dns_names = vec!["broker.example.org".into()];
    let c = ca.issue(&spec).unwrap();
    let s = describe(&c.cert_pem).unwrap();
    assert_eq!(s.subject, "CN=hv1.example.org, O=vmrepl");
    assert_eq!(
        s.sans,
        vec![
            "hv1.example.org",
            "broker.example.org",
            "192.0.2.7",
            "2001:db8::1"
        ]
    );
    assert_eq!(s.issuer, "CN=Lab CA, O=vmrepl");
    assert_eq!(s.extended_key_usages, vec!["serverAuth", "clientAuth"]);
    assert!(!s.is_ca);
    assert_eq!(s.fingerprint_sha256.len(), 64);
    let now = OffsetDateTime::now_utc();
    assert!(s.not_before <= now && now < s.not_after);
    assert!(s.not_after - now > time::Duration::days(364));
    // JSON for `host info --json`
    let json = serde_json::to_string(&s).unwrap();
    assert!(json.contains("\"not_after\":\""), "{json}");

    // Empty validity refused.
    let mut bad = HostCertSpec::new("hv1.example.org", YEAR);
    bad.not_after = bad.not_before;
    assert!(matches!(
        ca.issue(&bad),
        Err(PkiError::EmptyValidity { .. })
    ));
    // Bad host name refused.
    let err = ca.issue_host("a..b", YEAR).unwrap_err().to_string();
    assert!(err.contains("empty label"), "{err}");
}

#[test]
fn load_and_import_from_files() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::create(&dir.path().join("ca"), "Lab CA").unwrap();
    let c = ca.issue_host("hv1.example.org", YEAR).unwrap();
    let cert = dir.path().join("host.pem");
    let key = dir.path().join("host-key.pem");
    c.write(&cert, &key).unwrap();
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let trust = vec![ca.cert_path()];
    let id = HostIdentity::load(&cert, &key, &trust).unwrap();
    assert_eq!(id.host_name(), "hv1.example.org");
    assert_eq!(id.trusted_ca_names(), ["CN=Lab CA, O=vmrepl"]);
    let id = HostIdentity::import("HV1.example.org", &cert, &key, &trust).unwrap();
    assert_eq!(id.host_name(), "hv1.example.org");
    assert_eq!(
        id.fingerprint(),
        describe(&c.cert_pem).unwrap().fingerprint_sha256
    );
}

fn import_err(host: &str, cert_pem: &str, key_pem: &str, trust: &[&str]) -> (PkiError, String) {
    let err = HostIdentity::from_pem(Some(host), cert_pem, key_pem, trust).unwrap_err();
    let msg = err.to_string();
    println!("{msg}");
    (err, msg)
}

#[test]
fn import_says_which_eku_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::create(dir.path(), "Lab CA").unwrap();
    for (server, client, missing) in [(true, false, "clientAuth"), (false, true, "serverAuth")] {
        let mut spec = HostCertSpec::new("hv1.example.org", YEAR);
        spec.server_auth = server;
        spec.client_auth = client;
        let c = ca.issue(&spec).unwrap();
        let (err, msg) = import_err("hv1.example.org", &c.cert_pem, &c.key_pem, &[ca.cert_pem()]);
        assert!(
            matches!(
                err,
                PkiError::Invalid {
                    problem: CertProblem::MissingEku { .. },
                    ..
                }
            ),
            "{msg}"
        );
        assert!(msg.contains(&format!("lacks the {missing}")), "{msg}");
    }
}

#[test]
fn import_says_which_names_the_certificate_has() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::create(dir.path(), "Lab CA").unwrap();
    let mut spec = HostCertSpec::new("hv2.example.org", YEAR);
    spec.extra_dns_names = vec!["alias.example.org".into()];
    let c = ca.issue(&spec).unwrap();
    let (_, msg) = import_err("hv1.example.org", &c.cert_pem, &c.key_pem, &[ca.cert_pem()]);
    assert!(
        msg.contains("expected host name is hv1.example.org"),
        "{msg}"
    );
    assert!(
        msg.contains("names hv2.example.org, alias.example.org"),
        "{msg}"
    );

    // A wildcard certificate names every host one label under it.
    let mut spec = HostCertSpec::new("hv2.example.org", YEAR);
    spec.extra_dns_names = vec!["*.example.org".into()];
    let c = ca.issue(&spec).unwrap();
    let id = HostIdentity::from_pem(
        Some("hv9.example.org"),
        &c.cert_pem,
        &c.key_pem,
        &[ca.cert_pem()],
    )
    .unwrap();
    assert_eq!(id.host_name(), "hv9.example.org");
}

#[test]
fn import_refuses_expired_not_yet_valid_mismatched_and_untrusted() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::create(&dir.path().join("a"), "Lab CA").unwrap();
    let other = Ca::create(&dir.path().join("b"), "Other CA").unwrap();
    let now = OffsetDateTime::now_utc();
    let day = time::Duration::days(1);

    let mut spec = HostCertSpec::new("hv1.example.org", YEAR);
    spec.not_before = now - 3 * day;
    spec.not_after = now - day;
    let c = ca.issue(&spec).unwrap();
    let (_, msg) = import_err("hv1.example.org", &c.cert_pem, &c.key_pem, &[ca.cert_pem()]);
    assert!(msg.contains("expired at"), "{msg}");

    spec.not_before = now + day;
    spec.not_after = now + 3 * day;
    let c = ca.issue(&spec).unwrap();
    let (_, msg) = import_err("hv1.example.org", &c.cert_pem, &c.key_pem, &[ca.cert_pem()]);
    assert!(msg.contains("is not valid until"), "{msg}");

    let c1 = ca.issue_host("hv1.example.org", YEAR).unwrap();
    let c2 = ca.issue_host("hv1.example.org", YEAR).unwrap();
    let cert = write(dir.path(), "c1.pem", &c1.cert_pem);
    let key = write(dir.path(), "c2-key.pem", &c2.key_pem);
    let err = HostIdentity::load(&cert, &key, &[ca.cert_path()]).unwrap_err();
    assert!(matches!(err, PkiError::KeyMismatch { .. }), "{err}");
    assert!(err.to_string().contains("c2-key.pem"), "{err}");

    let (_, msg) = import_err(
        "hv1.example.org",
        &c1.cert_pem,
        &c1.key_pem,
        &[other.cert_pem()],
    );
    assert!(msg.contains("unknown CA"), "{msg}");
    assert!(msg.contains("CN=Lab CA"), "{msg}");

    let (err, _) = import_err("hv1.example.org", &c1.cert_pem, &c1.key_pem, &[]);
    assert!(matches!(err, PkiError::NoTrust));

    // A host certificate given as a trusted CA is refused.
    let (err, msg) = import_err(
        "hv1.example.org",
        &c1.cert_pem,
        &c1.key_pem,
        &[&c2.cert_pem],
    );
    assert!(matches!(err, PkiError::NotCa { .. }), "{msg}");

    // Not PEM at all.
    let (err, _) = import_err("hv1.example.org", "hello", &c1.key_pem, &[ca.cert_pem()]);
    assert!(matches!(err, PkiError::NoCertificate { .. }));
    let (err, _) = import_err("hv1.example.org", &c1.cert_pem, "nope", &[ca.cert_pem()]);
    assert!(matches!(err, PkiError::NoKey { .. }));
}
