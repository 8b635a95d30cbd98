//! TLS for both sides: the certificate regtee serves, and the roots it trusts as a client.
//!
//! One crypto provider (ring) is installed at start-up; everything here builds configs from it so
//! no code path can end up with a second provider or none.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// TLS settings for connections regtee makes to a registry.
#[derive(Clone, Debug, Default)]
pub struct ClientTls {
    /// Extra CA certificates (PEM) trusted besides the system roots.
    pub ca_file: Option<std::path::PathBuf>,
    /// Accept any certificate: for labs only.
    pub insecure_skip_verify: bool,
}

/// A certificate, key or trust store that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file that is missing or malformed.
    #[error("{path}: {message}")]
    Pem {
        /// The file.
        path: String,
        /// What is wrong with it.
        message: String,
    },
    /// rustls refused the combination.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Installs the process-wide crypto provider (ring). Safe to call more than once.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn provider() -> Arc<CryptoProvider> {
    install_crypto_provider();
    CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()))
}

fn pem_error(path: &Path, message: impl ToString) -> TlsError {
    TlsError::Pem {
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, e))?;
    if certs.is_empty() {
        return Err(pem_error(path, "no CERTIFICATE block found"));
    }
    Ok(certs)
}

/// The server side: a certificate chain and key, offering HTTP/2 and HTTP/1.1 via ALPN.
pub(crate) fn server_config(cert: &Path, key: &Path) -> Result<rustls::ServerConfig, TlsError> {
    let chain = load_certs(cert)?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| pem_error(key, e))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// The client side: system roots plus `ca_file`, or no verification when asked.
pub(crate) fn client_config(settings: &ClientTls) -> Result<rustls::ClientConfig, TlsError> {
    let provider = provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let mut config = if settings.insecure_skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(
                provider.signature_verification_algorithms,
            )))
            .with_no_client_auth()
    } else {
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_native_certs::load_native_certs().certs {
            // A broken system certificate should not take the others down with it.
            let _ = roots.add(cert);
        }
        if let Some(ca) = &settings.ca_file {
            for cert in load_certs(ca)? {
                roots.add(cert).map_err(|e| pem_error(ca, e))?;
            }
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    // The connector sets ALPN itself; upstream connections speak HTTP/1.1 so that a large
    // upload gets a TCP connection of its own instead of sharing HTTP/2 flow control.
    config.alpn_protocols.clear();
    Ok(config)
}

/// `insecure_skip_verify`: checks handshake signatures but trusts any certificate.
#[derive(Debug)]
struct AcceptAnyCertificate(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

/// Why a TLS connection to a registry failed, decided from rustls' own error, in words a person
/// can act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TlsFailure {
    /// The server presents a CA certificate as its own certificate: what `openssl req -x509`
    /// one-liners make. webpki refuses it even when that CA is trusted.
    CaUsedAsEndEntity,
    /// Signed by a CA regtee does not trust.
    UnknownIssuer,
    /// Valid, but not for the name regtee connected to.
    WrongName {
        /// The names the certificate is valid for.
        presented: Vec<String>,
    },
    /// Outside its validity period.
    Expired,
    /// Another certificate problem (rustls' words).
    Certificate(String),
    /// The handshake failed for a reason other than the certificate (rustls' words).
    Handshake(String),
}

impl TlsFailure {
    /// Finds rustls' error in an error chain (it travels inside `std::io::Error`s).
    pub fn find(error: &(dyn std::error::Error + 'static)) -> Option<TlsFailure> {
        let mut current = Some(error);
        while let Some(e) = current {
            if let Some(r) = e.downcast_ref::<rustls::Error>() {
                return Some(TlsFailure::from_rustls(r));
            }
            // `io::Error::source` skips the error it wraps: step into it instead.
            current = match e.downcast_ref::<std::io::Error>() {
                Some(io) => io
                    .get_ref()
                    .map(|inner| inner as &(dyn std::error::Error + 'static)),
                None => e.source(),
            };
        }
        None
    }

    fn from_rustls(error: &rustls::Error) -> TlsFailure {
        use rustls::CertificateError as C;
        let rustls::Error::InvalidCertificate(cert) = error else {
            return TlsFailure::Handshake(error.to_string());
        };
        match cert {
            C::UnknownIssuer => TlsFailure::UnknownIssuer,
            C::Expired
            | C::ExpiredContext { .. }
            | C::NotValidYet
            | C::NotValidYetContext { .. } => TlsFailure::Expired,
            C::NotValidForName => TlsFailure::WrongName {
                presented: Vec::new(),
            },
            C::NotValidForNameContext { presented, .. } => TlsFailure::WrongName {
                presented: presented.clone(),
            },
            C::Other(other)
                if other.0.downcast_ref::<webpki::Error>()
                    == Some(&webpki::Error::CaUsedAsEndEntity) =>
            {
                TlsFailure::CaUsedAsEndEntity
            }
            other => TlsFailure::Certificate(format!("{other:?}")),
        }
    }

    /// Whether the certificate itself is at fault: retrying cannot help, the configuration can.
    pub(crate) fn is_certificate(&self) -> bool {
        !matches!(self, TlsFailure::Handshake(_))
    }

    /// What to do about it; `section` names the config section (`[upstream]`, or
    /// `[[targets]] "tcr"`).
    pub fn fix(&self, section: &str) -> String {
        match self {
            TlsFailure::CaUsedAsEndEntity => format!(
                "issue a server certificate signed by a CA and give regtee the CA as ca_file in {section} (see certs/README.md), or set insecure_skip_verify = true there"
            ),
            TlsFailure::UnknownIssuer => format!(
                "set ca_file in {section} to the CA that signed it (or insecure_skip_verify = true for labs)"
            ),
            TlsFailure::WrongName { .. } => format!(
                "put a host name the certificate names in the url of {section}, or reissue the certificate for the one in use"
            ),
            TlsFailure::Expired => {
                "renew the server's certificate (and check this host's clock)".into()
            }
            TlsFailure::Certificate(_) => format!(
                "fix the server's certificate, or set insecure_skip_verify = true in {section} for labs"
            ),
            TlsFailure::Handshake(_) => format!(
                "check that the url in {section} speaks TLS on that port (http:// for a plain port)"
            ),
        }
    }
}

impl std::fmt::Display for TlsFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TlsFailure::CaUsedAsEndEntity => {
                f.write_str("the server presents a CA certificate as its own (CaUsedAsEndEntity)")
            }
            TlsFailure::UnknownIssuer => f.write_str(
                "the certificate is signed by a CA regtee does not trust (UnknownIssuer)",
            ),
            TlsFailure::WrongName { presented } if presented.is_empty() => {
                f.write_str("the certificate is not valid for this host name")
            }
            TlsFailure::WrongName { presented } => write!(
                f,
                "the certificate is not valid for this host name; it names {}",
                presented.join(", ")
            ),
            TlsFailure::Expired => f.write_str("the certificate is expired or not yet valid"),
            TlsFailure::Certificate(m) => write!(f, "certificate refused: {m}"),
            TlsFailure::Handshake(m) => write!(f, "TLS handshake failed: {m}"),
        }
    }
}
