//! TLS 1.3 (rustls, ring provider) from PEM files, offering h2 and http/1.1 by ALPN.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Certificate chain and private key, both PEM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The certificate chain, leaf first.
    pub cert: PathBuf,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

fn pem_error(path: &Path, what: &str, e: impl std::fmt::Display) -> Error {
    Error::Io {
        path: path.to_owned(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{what}: {e}")),
    }
}

/// Builds a TLS 1.3-only server configuration with ALPN `h2`, `http/1.1`.
pub fn server_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>> {
    let certs = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| pem_error(&files.cert, "cannot read the certificate chain", e))?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| pem_error(&files.cert, "bad PEM certificate", e))?;
    if certs.is_empty() {
        return Err(pem_error(&files.cert, "no certificate", "none found"));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| pem_error(&files.key, "cannot read the private key", e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::config("tls", e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            pem_error(
                &files.key,
                "certificate and key do not form a usable pair",
                e,
            )
        })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
