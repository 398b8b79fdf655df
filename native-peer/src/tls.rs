//! Which servers we trust over TLS: the signaling server (`wss://`) and TURN servers reached
//! over TLS (`turns:`). By default the Mozilla root certificates (`webpki-roots`, as the
//! signaling WebSocket and webrtc-rs use on their own); `--ca-cert` adds certificates of
//! one's own CA, or a server's self-signed certificate, on top of them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// Why `--ca-cert` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// The file could not be read, or is not PEM.
    #[error("cannot read certificates from {path}: {source}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: rustls::pki_types::pem::Error,
    },
    /// The file holds no certificate.
    #[error("no certificate found in {0}")]
    NoCertificate(PathBuf),
    /// rustls refused a certificate or the configuration.
    #[error("certificate rejected: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The TLS client configuration trusting the Mozilla roots and the certificates (PEM) in
/// `extra`; they must name the host of the URL they serve (`wss://HOST`, `turns:HOST`).
pub fn trusting(extra: &Path) -> Result<Arc<rustls::ClientConfig>, TrustError> {
    let pem = |source| TrustError::Pem { path: extra.to_path_buf(), source };
    let certificates = CertificateDer::pem_file_iter(extra)
        .map_err(pem)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem)?;
    if certificates.is_empty() {
        return Err(TrustError::NoCertificate(extra.to_path_buf()));
    }
    let mut roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    for certificate in certificates {
        roots.add(certificate)?;
    }
    // The provider named outright: rustls's process default panics when the build has more
    // than one.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}

/// A `--ca-cert` value: the path, read and checked while the command line is parsed.
#[derive(Debug, Clone)]
pub struct ExtraTrust(pub Arc<rustls::ClientConfig>);

/// clap's parser of `--ca-cert`.
pub fn parse_extra_trust(path: &str) -> Result<ExtraTrust, TrustError> {
    trusting(Path::new(path)).map(ExtraTrust)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn a_file_without_certificates_is_refused() {
        let dir = std::env::temp_dir().join(format!("weft-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        assert!(matches!(trusting(&empty), Err(TrustError::NoCertificate(_))));
        assert!(matches!(trusting(&dir.join("missing.pem")), Err(TrustError::Pem { .. })));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
