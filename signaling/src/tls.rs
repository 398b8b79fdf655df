//! HTTPS and TURN over TLS: certificates from files, or a self-signed one for a LAN.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use axum_server::tls_rustls::RustlsConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use sha2::{Digest, Sha256};

/// Where the server's certificate comes from.
#[derive(Debug, Clone)]
pub enum TlsSource {
    /// PEM files: a certificate chain and its private key.
    Files {
        /// Certificate chain, PEM.
        cert: PathBuf,
        /// Private key, PEM.
        key: PathBuf,
    },
    /// A fresh self-signed certificate for `localhost`, this host's name and addresses.
    SelfSigned,
}

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or parsed.
    #[error("cannot read {what} from {path}: {source}")]
    Pem {
        /// "certificate" or "private key".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: rustls::pki_types::pem::Error,
    },
    /// The certificate file held no certificate.
    #[error("no certificate found in {0}")]
    NoCertificate(PathBuf),
    /// rustls refused the certificate or key.
    #[error("certificate or key rejected: {0}")]
    Rustls(#[from] rustls::Error),
    /// Generating a self-signed certificate failed.
    #[error("cannot generate a self-signed certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

/// A ready TLS configuration and the SHA-256 fingerprint of its leaf certificate, so
/// users of a self-signed certificate can check what their browser shows.
#[derive(Debug, Clone)]
pub struct TlsSetup {
    /// For axum-server (HTTPS).
    pub config: RustlsConfig,
    /// For TURN over TLS: the same certificate, without HTTPS's ALPN (a TURN client may
    /// offer `stun.turn`, or nothing).
    pub turn: Arc<rustls::ServerConfig>,
    /// Colon-separated hex SHA-256 of the leaf certificate.
    pub fingerprint: String,
    /// The names and addresses a self-signed certificate covers (empty for files).
    pub names: Vec<String>,
    /// The leaf certificate, DER.
    pub certificate: CertificateDer<'static>,
}

impl TlsSource {
    /// Loads or generates the certificate. `listen` picks the names a self-signed
    /// certificate covers.
    pub fn load(&self, listen: SocketAddr) -> Result<TlsSetup, TlsError> {
        let (certs, key, names) = match self {
            TlsSource::Files { cert, key } => {
                let pem =
                    |what, path: &PathBuf, e| TlsError::Pem { what, path: path.clone(), source: e };
                let certs = CertificateDer::pem_file_iter(cert)
                    .map_err(|e| pem("certificate", cert, e))?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| pem("certificate", cert, e))?;
                let private =
                    PrivateKeyDer::from_pem_file(key).map_err(|e| pem("private key", key, e))?;
                (certs, private, Vec::new())
            }
            TlsSource::SelfSigned => {
                let names = self_signed_names(listen);
                let generated = rcgen::generate_simple_self_signed(names.clone())?;
                let cert = generated.cert.der().clone();
                let key = PrivatePkcs8KeyDer::from(generated.signing_key.serialize_der());
                (vec![cert], PrivateKeyDer::Pkcs8(key), names)
            }
        };
        let leaf = certs.first().ok_or_else(|| match self {
            TlsSource::Files { cert, .. } => TlsError::NoCertificate(cert.clone()),
            TlsSource::SelfSigned => TlsError::NoCertificate(PathBuf::from("(generated)")),
        })?;
        let certificate = leaf.clone();
        let fingerprint = Sha256::digest(leaf.as_ref())
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect::<Vec<_>>()
            .join(":");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let turn = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(certs, key)?;
        let mut https = turn.clone();
        https.alpn_protocols = vec![b"http/1.1".to_vec()];
        let config = RustlsConfig::from_config(Arc::new(https));
        Ok(TlsSetup { config, turn: Arc::new(turn), fingerprint, names, certificate })
    }
}

impl TlsSetup {
    /// Whether the certificate names `host` (a DNS name or an IP address), as a client
    /// checking it against `host` requires.
    pub fn names(&self, host: &str) -> bool {
        let Ok(name) = ServerName::try_from(host) else { return false };
        rustls::server::ParsedCertificate::try_from(&self.certificate)
            .and_then(|cert| rustls::client::verify_server_name(&cert, &name))
            .is_ok()
    }
}

/// `localhost`, the loopback addresses, and, when listening on every interface, this
/// host's interface addresses (so a phone on the LAN can open `https://<ip>:port`).
fn self_signed_names(listen: SocketAddr) -> Vec<String> {
    let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()];
    let mut add = |ip: IpAddr| {
        let s = ip.to_string();
        if !names.contains(&s) {
            names.push(s);
        }
    };
    if listen.ip().is_unspecified() {
        for iface in if_addrs::get_if_addrs().unwrap_or_default() {
            add(iface.ip());
        }
    } else {
        add(listen.ip());
    }
    names
}
