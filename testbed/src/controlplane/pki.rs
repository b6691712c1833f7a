//! The control plane's keys and certificates, made fresh for each sandbox (pure Rust, rcgen):
//! a CA, the API server's serving certificate for every name clients use, and the key that
//! signs service-account tokens.
use std::{net::IpAddr, path::Path};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose,
    SanType,
};

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("generating the control plane's {what}: {source}")]
    Generate {
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Writes into `dir`: `ca.crt`, `apiserver.crt`/`apiserver.key` (valid for `ips` and the
/// names of the `kubernetes` Service), `sa.key`/`sa.pub` (the service-account signing key).
pub fn write(dir: &Path, ips: &[IpAddr]) -> Result<(), PkiError> {
    let failed = |what| move |source| PkiError::Generate { what, source };
    let ca_key = KeyPair::generate().map_err(failed("CA key"))?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(failed("CA"))?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.distinguished_name = name("sluice-sandbox-ca");
    let ca_cert = ca.self_signed(&ca_key).map_err(failed("CA"))?;

    let names = [
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local",
        "localhost",
    ];
    let mut server =
        CertificateParams::new(names.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
            .map_err(failed("serving certificate"))?;
    server
        .subject_alt_names
        .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
    server.distinguished_name = name("kube-apiserver");
    let server_key = KeyPair::generate().map_err(failed("serving key"))?;
    let issuer = rcgen::Issuer::from_params(&ca, &ca_key);
    let server_cert = server
        .signed_by(&server_key, &issuer)
        .map_err(failed("serving certificate"))?;

    let sa = KeyPair::generate().map_err(failed("service-account key"))?;
    for (file, text) in [
        ("ca.crt", ca_cert.pem()),
        ("apiserver.crt", server_cert.pem()),
        ("apiserver.key", server_key.serialize_pem()),
        ("sa.key", sa.serialize_pem()),
        ("sa.pub", sa.public_key_pem()),
    ] {
        let path = dir.join(file);
        std::fs::write(&path, text).map_err(|source| PkiError::Write {
            path: path.display().to_string(),
            source,
        })?;
    }
    Ok(())
}

fn name(cn: &str) -> DistinguishedName {
    let mut n = DistinguishedName::new();
    n.push(DnType::CommonName, cn);
    n
}
