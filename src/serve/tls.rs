//! TLS credentials in QEMU's `tls-creds-x509` folder layout, so one folder serves QEMU,
//! qemu-nbd and us: `server-cert.pem` (the chain, leaf first), `server-key.pem`, and
//! `ca-cert.pem`, which client certificates must chain to when peers are verified.
//!
//! rustls with the ring provider: memory-safe, no system OpenSSL, and it links into the static
//! `qmprestore`. Protocol versions are rustls's safe defaults (TLS 1.2 and 1.3).

use super::error::ServeError;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use std::path::Path;
use std::sync::Arc;

fn problem(path: &Path, e: impl std::fmt::Display) -> ServeError {
    ServeError::Tls(path.to_path_buf(), e.to_string())
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, ServeError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| problem(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| problem(path, e))?;
    if certs.is_empty() {
        return Err(problem(path, "no certificate in the file"));
    }
    Ok(certs)
}

/// The server's TLS configuration from the credentials folder `dir`; with `verify_peer`,
/// clients must present a certificate that chains to `ca-cert.pem`.
pub fn server_config(dir: &Path, verify_peer: bool) -> Result<Arc<ServerConfig>, ServeError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cert_path = dir.join("server-cert.pem");
    let certs = certificates(&cert_path)?;
    let key_path = dir.join("server-key.pem");
    let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| problem(&key_path, e))?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| problem(dir, e))?;
    let builder = if verify_peer {
        let ca_path = dir.join("ca-cert.pem");
        let mut roots = RootCertStore::empty();
        for c in certificates(&ca_path)? {
            roots.add(c).map_err(|e| problem(&ca_path, e))?;
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| problem(&ca_path, e))?;
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let config = builder
        .with_single_cert(certs, key)
        .map_err(|e| problem(&cert_path, e))?;
    Ok(Arc::new(config))
}
