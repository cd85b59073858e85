//! A private certificate authority and the node certificates it signs.
//!
//! Every Understudy node (`primary`, `backup`, `witness`) authenticates with one certificate that
//! serves both as a TLS client and a TLS server certificate. All of them are signed by one private
//! CA that the operator creates once with `understudy certs init` and keeps in a directory:
//!
//! ```text
//! DIR/
//!   ca.pem        CA certificate (public; every node needs it to verify its peers)
//!   ca.key        CA private key (0600; needed only to issue node certificates)
//!   primary.pem   node certificate, DNS SAN `primary`, signed by the CA
//!   primary.key   node private key (0600)
//!   backup.pem    ...
//! ```
//!
//! The node name is the certificate's only DNS subject alternative name (and its common name).
//! It is the name a client connects to (`connect(addr, "backup")` verifies that the server's
//! certificate names `backup`) and the name a server reads from the client's certificate to
//! learn who connected (see [`crate::Connection::peer_name`]).
//!
//! Keys are ECDSA P-256, generated with `ring`. Private keys are written with mode 0600, and
//! every file is written to a temporary name first and renamed into place, so a crash never
//! leaves half a key behind.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use thiserror::Error;

/// File name of the CA certificate inside a certificate directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the CA private key inside a certificate directory.
pub const CA_KEY_FILE: &str = "ca.key";

/// Common name of the CA certificate.
const CA_COMMON_NAME: &str = "Understudy private CA";
/// Organisation written into every certificate, so `openssl x509 -text` says whose it is.
const ORGANIZATION: &str = "Understudy";
/// Allowed clock difference between nodes: certificates start being valid this long before "now".
const CLOCK_SKEW: Duration = Duration::from_secs(60 * 60);
const DAY: Duration = Duration::from_secs(24 * 60 * 60);

/// When a certificate is valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    /// First instant the certificate is valid.
    pub not_before: SystemTime,
    /// Last instant the certificate is valid.
    pub not_after: SystemTime,
}

impl Validity {
    /// Valid from one hour ago (to absorb clock differences between nodes) until `days` from now.
    pub fn days_from_now(days: u32) -> Self {
        let now = SystemTime::now();
        Self {
            not_before: now - CLOCK_SKEW,
            not_after: now + DAY * days,
        }
    }

    /// Valid between two explicit instants (tests use this to make an expired certificate).
    pub fn between(not_before: SystemTime, not_after: SystemTime) -> Self {
        Self {
            not_before,
            not_after,
        }
    }

    /// Default lifetime of a CA: ten years.
    pub fn ca_default() -> Self {
        Self::days_from_now(3650)
    }

    /// Default lifetime of a node certificate: one year.
    pub fn node_default() -> Self {
        Self::days_from_now(365)
    }
}

/// Options for [`init_ca`].
#[derive(Debug, Clone)]
pub struct CaOptions {
    /// Lifetime of the CA certificate.
    pub validity: Validity,
    /// Replace an existing CA. Every node certificate signed by the old CA stops being accepted.
    pub overwrite: bool,
}

impl Default for CaOptions {
    fn default() -> Self {
        Self {
            validity: Validity::ca_default(),
            overwrite: false,
        }
    }
}

/// Paths of a certificate and its private key, as written by [`init_ca`] or [`issue`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertKeyPaths {
    /// The PEM certificate.
    pub cert: PathBuf,
    /// The PEM private key (mode 0600).
    pub key: PathBuf,
}

/// Why [`init_ca`] failed.
#[derive(Debug, Error)]
pub enum InitCaError {
    /// A CA already exists and `overwrite` was not set.
    #[error(
        "a CA already exists at {}; replacing it invalidates every node certificate \
         (pass --force to replace it anyway)",
        path.display()
    )]
    AlreadyExists {
        /// The existing CA file.
        path: PathBuf,
    },
    /// The validity period is empty or out of range.
    #[error("invalid CA validity period")]
    Validity(#[source] ValidityError),
    /// Generating the key or the certificate failed.
    #[error("cannot generate the CA certificate")]
    Generate(#[source] rcgen::Error),
    /// Writing a file failed.
    #[error("cannot write {}", path.display())]
    Write {
        /// The file being written.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
}

/// Why [`issue`] failed.
#[derive(Debug, Error)]
pub enum IssueError {
    /// The node name is not usable as a DNS name or file name.
    #[error(
        "invalid node name `{name}`: use 1-63 lowercase letters, digits or '-', not starting \
         or ending with '-', and not `ca` (e.g. `primary`, `backup`, `witness`)"
    )]
    InvalidName {
        /// The rejected name.
        name: String,
    },
    /// The CA could not be loaded.
    #[error("cannot load the CA that signs node certificates")]
    LoadCa(#[source] LoadError),
    /// `ca.key` does not belong to `ca.pem`.
    #[error(
        "{} does not belong to {}: the CA files are from different CAs \
         (re-create the CA with `understudy certs init --force`)",
        key.display(),
        cert.display()
    )]
    CaKeyMismatch {
        /// The CA certificate.
        cert: PathBuf,
        /// The CA key.
        key: PathBuf,
    },
    /// The validity period is empty or out of range.
    #[error("invalid certificate validity period")]
    Validity(#[source] ValidityError),
    /// Generating the key or the certificate failed.
    #[error("cannot generate the certificate for `{name}`")]
    Generate {
        /// The node name.
        name: String,
        /// The rcgen error.
        #[source]
        source: rcgen::Error,
    },
    /// Writing a file failed.
    #[error("cannot write {}", path.display())]
    Write {
        /// The file being written.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
}

/// A validity period that cannot be written into a certificate.
#[derive(Debug, Error)]
pub enum ValidityError {
    /// `not_after` is not after `not_before`.
    #[error("not_after must be later than not_before")]
    Empty,
    /// An instant is outside what X.509 can encode.
    #[error("a validity instant is outside the range a certificate can hold")]
    OutOfRange,
}

/// What a file was supposed to contain; used to suggest how to create it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileRole {
    /// `ca.pem`.
    CaCert,
    /// `ca.key`.
    CaKey,
    /// A node's `NAME.pem`.
    NodeCert,
    /// A node's `NAME.key`.
    NodeKey,
}

impl FileRole {
    fn what(self) -> &'static str {
        match self {
            Self::CaCert => "CA certificate",
            Self::CaKey => "CA private key",
            Self::NodeCert => "node certificate",
            Self::NodeKey => "node private key",
        }
    }
}

/// Why loading a certificate or key file failed.
#[derive(Debug, Error)]
pub enum LoadError {
    /// The file does not exist.
    #[error("{} {} does not exist; {}", role.what(), path.display(), hint(*role, path))]
    Missing {
        /// The missing file.
        path: PathBuf,
        /// What the file should have contained.
        role: FileRole,
    },
    /// The file exists but cannot be read.
    #[error("cannot read {} {}", role.what(), path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the file should contain.
        role: FileRole,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The file is not PEM of the expected kind.
    #[error("{} is not a PEM {}; {}", path.display(), role.what(), hint(*role, path))]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the file should contain.
        role: FileRole,
        /// The PEM error.
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    /// The file is PEM but its content is not a usable certificate or key.
    #[error("{} holds an unusable {}: {reason}", path.display(), role.what())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What the file should contain.
        role: FileRole,
        /// What is wrong with it.
        reason: String,
    },
}

/// How an operator creates the file `path` that should have held `role`.
fn hint(role: FileRole, path: &Path) -> String {
    let dir = path.parent().unwrap_or(Path::new("."));
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    match role {
        FileRole::CaCert | FileRole::CaKey => {
            format!(
                "create the CA with `understudy certs init --dir {}`",
                dir.display()
            )
        }
        FileRole::NodeCert | FileRole::NodeKey => {
            let name = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "NAME".to_owned());
            format!(
                "issue it with `understudy certs issue --dir {} --name {name}`",
                dir.display()
            )
        }
    }
}

/// Paths of the CA inside `dir`.
pub fn ca_paths(dir: &Path) -> CertKeyPaths {
    CertKeyPaths {
        cert: dir.join(CA_CERT_FILE),
        key: dir.join(CA_KEY_FILE),
    }
}

/// Paths of node `name`'s certificate and key inside `dir`.
pub fn node_paths(dir: &Path, name: &str) -> CertKeyPaths {
    CertKeyPaths {
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}.key")),
    }
}

/// Creates a private CA in `dir` (`ca.pem`, and `ca.key` with mode 0600).
///
/// Creates `dir` (mode 0700) if it does not exist. Refuses to replace an existing CA unless
/// `opts.overwrite` is set, because every node certificate signed by the old CA would stop being
/// accepted.
pub fn init_ca(dir: &Path, opts: &CaOptions) -> Result<CertKeyPaths, InitCaError> {
    let paths = ca_paths(dir);
    if !opts.overwrite {
        for path in [&paths.cert, &paths.key] {
            if path.exists() {
                return Err(InitCaError::AlreadyExists { path: path.clone() });
            }
        }
    }
    let mut params = CertificateParams::default();
    set_validity(&mut params, &opts.validity).map_err(InitCaError::Validity)?;
    let key = KeyPair::generate().map_err(InitCaError::Generate)?;
    // Every CA gets its own subject name. Verifiers look a trust anchor up by name: two CAs with
    // one name would make a certificate from the other CA fail as "bad signature" instead of
    // "unknown CA", and the operator would be told the wrong thing.
    let tag: String = key.public_key_raw()[key.public_key_raw().len() - 6..]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    params.distinguished_name = distinguished_name(&format!("{CA_COMMON_NAME} {tag}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key).map_err(InitCaError::Generate)?;

    create_dir(dir).map_err(|source| InitCaError::Write {
        path: dir.to_owned(),
        source,
    })?;
    // Key first: a CA certificate without its key would block a retry for nothing.
    write_atomic(&paths.key, key.serialize_pem().as_bytes(), 0o600).map_err(|source| {
        InitCaError::Write {
            path: paths.key.clone(),
            source,
        }
    })?;
    write_atomic(&paths.cert, cert.pem().as_bytes(), 0o644).map_err(|source| {
        InitCaError::Write {
            path: paths.cert.clone(),
            source,
        }
    })?;
    Ok(paths)
}

/// Issues a certificate for node `name`, signed by the CA in `dir`, and writes `NAME.pem` and
/// `NAME.key` (mode 0600) next to it.
///
/// The certificate carries `name` as its DNS subject alternative name and common name, and both
/// the client-auth and server-auth extended key usages, so one certificate serves a node as a
/// QUIC client and as a server. An existing certificate for `name` is replaced (re-issuing is
/// how an expiring certificate is renewed); the node must then be restarted to load it.
pub fn issue(dir: &Path, name: &str, validity: Validity) -> Result<CertKeyPaths, IssueError> {
    if !is_valid_node_name(name) {
        return Err(IssueError::InvalidName {
            name: name.to_owned(),
        });
    }
    let ca = ca_paths(dir);
    let ca_cert = load_certs(&ca.cert, FileRole::CaCert).map_err(IssueError::LoadCa)?;
    let ca_key_pem = read_file(&ca.key, FileRole::CaKey).map_err(IssueError::LoadCa)?;
    let ca_key_pem = String::from_utf8(ca_key_pem).map_err(|_| {
        IssueError::LoadCa(LoadError::Invalid {
            path: ca.key.clone(),
            role: FileRole::CaKey,
            reason: "not UTF-8 text".to_owned(),
        })
    })?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|e| {
        IssueError::LoadCa(LoadError::Invalid {
            path: ca.key.clone(),
            role: FileRole::CaKey,
            reason: e.to_string(),
        })
    })?;
    let ca_spki = spki_of(&ca_cert[0]).ok_or_else(|| {
        IssueError::LoadCa(LoadError::Invalid {
            path: ca.cert.clone(),
            role: FileRole::CaCert,
            reason: "not an X.509 certificate".to_owned(),
        })
    })?;
    if ca_spki != ca_key.subject_public_key_info() {
        return Err(IssueError::CaKeyMismatch {
            cert: ca.cert,
            key: ca.key,
        });
    }
    let issuer = Issuer::from_ca_cert_der(&ca_cert[0], ca_key).map_err(|e| {
        IssueError::LoadCa(LoadError::Invalid {
            path: ca.cert.clone(),
            role: FileRole::CaCert,
            reason: e.to_string(),
        })
    })?;

    let generate = |source| IssueError::Generate {
        name: name.to_owned(),
        source,
    };
    let mut params = CertificateParams::new(vec![name.to_owned()]).map_err(generate)?;
    set_validity(&mut params, &validity).map_err(IssueError::Validity)?;
    params.distinguished_name = distinguished_name(name);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate().map_err(generate)?;
    let cert = params.signed_by(&key, &issuer).map_err(generate)?;

    let paths = node_paths(dir, name);
    write_atomic(&paths.key, key.serialize_pem().as_bytes(), 0o600).map_err(|source| {
        IssueError::Write {
            path: paths.key.clone(),
            source,
        }
    })?;
    write_atomic(&paths.cert, cert.pem().as_bytes(), 0o644).map_err(|source| {
        IssueError::Write {
            path: paths.cert.clone(),
            source,
        }
    })?;
    Ok(paths)
}

/// Whether `name` can be a node name: a lowercase DNS label that is not `ca`.
pub fn is_valid_node_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && name != "ca"
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
}

/// Loads every certificate from a PEM file (at least one).
pub fn load_certs(path: &Path, role: FileRole) -> Result<Vec<CertificateDer<'static>>, LoadError> {
    let pem = read_file(path, role)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| LoadError::Parse {
            path: path.to_owned(),
            role,
            source,
        })?;
    if certs.is_empty() {
        return Err(LoadError::Parse {
            path: path.to_owned(),
            role,
            source: rustls_pki_types::pem::Error::NoItemsFound,
        });
    }
    Ok(certs)
}

/// Loads a private key from a PEM file (PKCS#8, SEC1 or PKCS#1).
pub fn load_key(path: &Path, role: FileRole) -> Result<PrivateKeyDer<'static>, LoadError> {
    let pem = read_file(path, role)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|source| LoadError::Parse {
        path: path.to_owned(),
        role,
        source,
    })
}

/// Where a node's TLS material lives: the CA certificate, the node certificate and its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The CA certificate that signs every peer (`ca.pem`).
    pub ca_cert: PathBuf,
    /// This node's certificate (`NAME.pem`).
    pub cert: PathBuf,
    /// This node's private key (`NAME.key`).
    pub key: PathBuf,
}

impl TlsFiles {
    /// The files `ca.pem`, `NAME.pem` and `NAME.key` in `dir`, as `init_ca` and `issue` lay
    /// them out.
    pub fn in_dir(dir: &Path, name: &str) -> Self {
        let node = node_paths(dir, name);
        Self {
            ca_cert: dir.join(CA_CERT_FILE),
            cert: node.cert,
            key: node.key,
        }
    }
}

/// A node's loaded TLS identity: its certificate chain and key, the CA it trusts, and its name.
#[derive(Debug)]
pub struct Identity {
    name: String,
    cert_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    ca_certs: Vec<CertificateDer<'static>>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Self {
            name: self.name.clone(),
            cert_chain: self.cert_chain.clone(),
            key: self.key.clone_key(),
            ca_certs: self.ca_certs.clone(),
        }
    }
}

impl Identity {
    /// Loads the three files. The node name is read from the certificate.
    pub fn load(files: &TlsFiles) -> Result<Self, LoadError> {
        let ca_certs = load_certs(&files.ca_cert, FileRole::CaCert)?;
        let cert_chain = load_certs(&files.cert, FileRole::NodeCert)?;
        let key = load_key(&files.key, FileRole::NodeKey)?;
        let name = cert_name(&cert_chain[0]).ok_or_else(|| LoadError::Invalid {
            path: files.cert.clone(),
            role: FileRole::NodeCert,
            reason: "the certificate names no node (no DNS subject alternative name)".to_owned(),
        })?;
        Ok(Self {
            name,
            cert_chain,
            key,
            ca_certs,
        })
    }

    /// This node's name, from its certificate (e.g. `primary`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// This node's certificate, followed by any intermediates.
    pub fn cert_chain(&self) -> &[CertificateDer<'static>] {
        &self.cert_chain
    }

    /// This node's private key.
    pub fn key(&self) -> &PrivateKeyDer<'static> {
        &self.key
    }

    /// The CA certificates whose signatures this node accepts on peer certificates.
    pub fn ca_certs(&self) -> &[CertificateDer<'static>] {
        &self.ca_certs
    }
}

/// The node name a certificate was issued for: its first DNS subject alternative name, or, if it
/// has none, its common name.
pub fn cert_name(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert).ok()?;
    if let Ok(Some(san)) = x509.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(dns) = name {
                return Some((*dns).to_owned());
            }
        }
    }
    let common_name = x509
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned);
    common_name
}

/// The DER SubjectPublicKeyInfo of a certificate.
fn spki_of(cert: &CertificateDer<'_>) -> Option<Vec<u8>> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert).ok()?;
    Some(x509.public_key().raw.to_vec())
}

fn distinguished_name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, ORGANIZATION);
    dn.push(DnType::CommonName, common_name);
    dn
}

fn set_validity(params: &mut CertificateParams, validity: &Validity) -> Result<(), ValidityError> {
    if validity.not_after <= validity.not_before {
        return Err(ValidityError::Empty);
    }
    params.not_before = to_offset(validity.not_before)?;
    params.not_after = to_offset(validity.not_after)?;
    Ok(())
}

fn to_offset(t: SystemTime) -> Result<time::OffsetDateTime, ValidityError> {
    // X.509 GeneralizedTime holds years 0000-9999; `time` panics outside its own range, so
    // convert through a checked Unix timestamp instead of `From<SystemTime>`.
    let secs = match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).map_err(|_| ValidityError::OutOfRange)?,
        Err(e) => -i64::try_from(e.duration().as_secs()).map_err(|_| ValidityError::OutOfRange)?,
    };
    let t =
        time::OffsetDateTime::from_unix_timestamp(secs).map_err(|_| ValidityError::OutOfRange)?;
    if !(0..=9999).contains(&t.year()) {
        return Err(ValidityError::OutOfRange);
    }
    Ok(t)
}

fn read_file(path: &Path, role: FileRole) -> Result<Vec<u8>, LoadError> {
    fs::read(path).map_err(|source| {
        if source.kind() == io::ErrorKind::NotFound {
            LoadError::Missing {
                path: path.to_owned(),
                role,
            }
        } else {
            LoadError::Read {
                path: path.to_owned(),
                role,
                source,
            }
        }
    })
}

fn create_dir(dir: &Path) -> io::Result<()> {
    if dir.as_os_str().is_empty() || dir.is_dir() {
        return Ok(());
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Writes `contents` to a temporary file next to `path` with `mode`, syncs it, and renames it over
/// `path`.
fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let file_name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!(".tmp{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let _ = fs::remove_file(&tmp);
    let result = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names() {
        for ok in ["primary", "backup", "witness", "node-2", "a", "0"] {
            assert!(is_valid_node_name(ok), "{ok}");
        }
        for bad in [
            "",
            "ca",
            "-a",
            "a-",
            "Primary",
            "a.b",
            "a/b",
            "..",
            &"a".repeat(64),
        ] {
            assert!(!is_valid_node_name(bad), "{bad}");
        }
    }

    #[test]
    fn missing_file_hints_at_the_command() {
        let err = read_file(
            Path::new("/nonexistent/certs/backup.key"),
            FileRole::NodeKey,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("/nonexistent/certs/backup.key"), "{err}");
        assert!(err.contains("understudy certs issue"), "{err}");
        assert!(err.contains("--name backup"), "{err}");
        let err = read_file(Path::new("/nonexistent/certs/ca.pem"), FileRole::CaCert)
            .unwrap_err()
            .to_string();
        assert!(err.contains("understudy certs init"), "{err}");
    }

    #[test]
    fn empty_validity_is_rejected() {
        let now = SystemTime::now();
        let mut params = CertificateParams::default();
        assert!(matches!(
            set_validity(&mut params, &Validity::between(now, now)),
            Err(ValidityError::Empty)
        ));
    }
}
