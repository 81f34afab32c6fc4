//! Test certificates (rcgen): a CA of the test's own and server certificates it signs, as
//! PEM files in a directory.
use std::path::{Path, PathBuf};

use anyhow::Result;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

pub struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
    /// The CA certificate's PEM file, for `curl --cacert`.
    pub pem: PathBuf,
}

impl Ca {
    pub fn new(dir: &Path, name: &str) -> Result<Self> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        let pem = dir.join(format!("{name}.pem"));
        std::fs::write(&pem, cert.pem())?;
        Ok(Self { cert, key, pem })
    }

    /// A server certificate for `names` (its CN the first), written to `<file>.crt` and
    /// `<file>.key` in `dir`; returns both paths.
    pub fn issue(&self, dir: &Path, file: &str, names: &[&str]) -> Result<(PathBuf, PathBuf)> {
        let mut params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
        params.distinguished_name.push(DnType::CommonName, names[0]);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        let (crt, keyf) = (dir.join(format!("{file}.crt")), dir.join(format!("{file}.key")));
        // Written next to the target and renamed: a reload never reads half a file.
        std::fs::write(dir.join(format!("{file}.crt.new")), cert.pem())?;
        std::fs::write(dir.join(format!("{file}.key.new")), key.serialize_pem())?;
        std::fs::rename(dir.join(format!("{file}.key.new")), &keyf)?;
        std::fs::rename(dir.join(format!("{file}.crt.new")), &crt)?;
        Ok((crt, keyf))
    }
}
