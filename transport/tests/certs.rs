//! The private CA and node certificates on disk.

use std::os::unix::fs::PermissionsExt;

use understudy_transport::certs::{self, CaOptions, InitCaError, IssueError};
use understudy_transport::{Identity, TlsFiles, Validity};
use x509_parser::prelude::*;

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn init_writes_ca_with_private_key_mode() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("certs");
    let paths = certs::init_ca(&ca_dir, &CaOptions::default()).unwrap();
    assert_eq!(paths.cert, ca_dir.join("ca.pem"));
    assert_eq!(mode(&paths.key), 0o600);
    assert_eq!(mode(&ca_dir), 0o700);
    let pem = std::fs::read(&paths.cert).unwrap();
    let (_, pem) = parse_x509_pem(&pem).unwrap();
    let cert = pem.parse_x509().unwrap();
    assert!(cert.is_ca());
}

#[test]
fn init_refuses_to_replace_a_ca_unless_told() {
    let dir = tempfile::tempdir().unwrap();
    certs::init_ca(dir.path(), &CaOptions::default()).unwrap();
    let before = std::fs::read(dir.path().join("ca.pem")).unwrap();
    let err = certs::init_ca(dir.path(), &CaOptions::default()).unwrap_err();
    assert!(matches!(err, InitCaError::AlreadyExists { .. }));
    assert!(err.to_string().contains("--force"), "{err}");
    assert_eq!(std::fs::read(dir.path().join("ca.pem")).unwrap(), before);

    let opts = CaOptions {
        overwrite: true,
        ..CaOptions::default()
    };
    certs::init_ca(dir.path(), &opts).unwrap();
    assert_ne!(std::fs::read(dir.path().join("ca.pem")).unwrap(), before);
}

#[test]
fn issued_certificate_names_the_node_and_serves_both_roles() {
    let dir = tempfile::tempdir().unwrap();
    certs::init_ca(dir.path(), &CaOptions::default()).unwrap();
    let paths = certs::issue(dir.path(), "witness", Validity::node_default()).unwrap();
    assert_eq!(paths.cert, dir.path().join("witness.pem"));
    assert_eq!(paths.key, dir.path().join("witness.key"));
    assert_eq!(mode(&paths.key), 0o600);

    let identity = Identity::load(&TlsFiles::in_dir(dir.path(), "witness")).unwrap();
    assert_eq!(identity.name(), "witness");

    let (_, cert) = parse_x509_certificate(&identity.cert_chain()[0]).unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap();
    assert_eq!(
        san.value.general_names,
        vec![GeneralName::DNSName("witness")]
    );
    let eku = cert.extended_key_usage().unwrap().unwrap();
    assert!(eku.value.server_auth && eku.value.client_auth);
    assert!(!cert.is_ca());
    let (_, ca) = parse_x509_certificate(&identity.ca_certs()[0]).unwrap();
    assert_eq!(cert.issuer(), ca.subject());
    assert!(cert.verify_signature(Some(ca.public_key())).is_ok());
}

#[test]
fn explicit_validity_is_written() {
    let dir = tempfile::tempdir().unwrap();
    certs::init_ca(dir.path(), &CaOptions::default()).unwrap();
    let not_before = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
    let not_after = not_before + std::time::Duration::from_secs(3600);
    certs::issue(
        dir.path(),
        "primary",
        Validity::between(not_before, not_after),
    )
    .unwrap();
    let identity = Identity::load(&TlsFiles::in_dir(dir.path(), "primary")).unwrap();
    let (_, cert) = parse_x509_certificate(&identity.cert_chain()[0]).unwrap();
    assert_eq!(cert.validity().not_before.timestamp(), 1_700_000_000);
    assert_eq!(cert.validity().not_after.timestamp(), 1_700_003_600);
}

#[test]
fn issue_checks_its_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let err = certs::issue(dir.path(), "primary", Validity::node_default()).unwrap_err();
    let text = understudy_transport::ErrorChain(&err).to_string();
    assert!(text.contains("ca.pem does not exist"), "{text}");
    assert!(text.contains("understudy certs init"), "{text}");

    certs::init_ca(dir.path(), &CaOptions::default()).unwrap();
    for bad in ["ca", "Primary", "../x", ""] {
        let err = certs::issue(dir.path(), bad, Validity::node_default()).unwrap_err();
        assert!(
            matches!(err, IssueError::InvalidName { .. }),
            "{bad}: {err}"
        );
    }

    // A CA key that does not belong to the CA certificate.
    let other = tempfile::tempdir().unwrap();
    certs::init_ca(other.path(), &CaOptions::default()).unwrap();
    std::fs::copy(other.path().join("ca.key"), dir.path().join("ca.key")).unwrap();
    let err = certs::issue(dir.path(), "primary", Validity::node_default()).unwrap_err();
    assert!(matches!(err, IssueError::CaKeyMismatch { .. }), "{err}");
}

#[test]
fn loading_missing_files_says_how_to_create_them() {
    let dir = tempfile::tempdir().unwrap();
    certs::init_ca(dir.path(), &CaOptions::default()).unwrap();
    let err = Identity::load(&TlsFiles::in_dir(dir.path(), "backup")).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("backup.pem does not exist"), "{text}");
    assert!(text.contains("understudy certs issue"), "{text}");
    assert!(text.contains("--name backup"), "{text}");

    std::fs::write(dir.path().join("backup.pem"), "not pem").unwrap();
    let err = Identity::load(&TlsFiles::in_dir(dir.path(), "backup")).unwrap_err();
    assert!(
        err.to_string().contains("is not a PEM node certificate"),
        "{err}"
    );
}
