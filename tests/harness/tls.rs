//! Certificates made at test time (rcgen): a CA, a server certificate for
//! the loopback address and client certificates, written as PEM files into
//! a temp dir. No openssl needed.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose,
};

/// A certificate authority and the files it signed.
pub struct TestCa {
    dir: tempfile::TempDir,
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate (PEM), what `tls_ca_file` / `ca_file` point at.
    pub ca_file: PathBuf,
}

/// A certificate and its private key, as PEM files.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

fn fail(what: &str) -> impl Fn(rcgen::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

impl TestCa {
    /// A new CA named `name`, with its own temp dir.
    pub fn new(name: &str) -> Self {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("temp dir: {e}"));
        let key = KeyPair::generate().unwrap_or_else(|e| panic!("{}", fail("CA key")(e)));
        let mut params = CertificateParams::new(Vec::<String>::new())
            .unwrap_or_else(|e| panic!("{}", fail("CA params")(e)));
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("runfleet test CA {name}"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).unwrap_or_else(|e| panic!("{}", fail("CA cert")(e)));
        let ca_file = dir.path().join(format!("{name}-ca.pem"));
        write(&ca_file, &cert.pem());
        Self { issuer: Issuer::new(params, key), dir, ca_file }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A server certificate for `127.0.0.1` and `localhost`.
    pub fn server(&self, name: &str) -> CertFiles {
        self.issue(name, &["127.0.0.1", "localhost"], ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client certificate with common name `name`.
    pub fn client(&self, name: &str) -> CertFiles {
        self.issue(name, &[], ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn issue(&self, name: &str, sans: &[&str], usage: ExtendedKeyUsagePurpose) -> CertFiles {
        let key = KeyPair::generate().unwrap_or_else(|e| panic!("{}", fail("key")(e)));
        let sans: Vec<String> = sans.iter().map(|s| (*s).to_owned()).collect();
        let mut params = CertificateParams::new(sans).unwrap_or_else(|e| panic!("{}", fail("params")(e)));
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &self.issuer).unwrap_or_else(|e| panic!("{}", fail("cert")(e)));
        let files = CertFiles {
            cert_file: self.dir.path().join(format!("{name}.pem")),
            key_file: self.dir.path().join(format!("{name}-key.pem")),
        };
        write(&files.cert_file, &cert.pem());
        write(&files.key_file, &key.serialize_pem());
        files
    }
}

fn write(path: &Path, contents: &str) {
    std::fs::write(path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}
