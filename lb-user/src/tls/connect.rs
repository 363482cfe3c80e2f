//! TLS to servers: the client configuration a backend's (or a server's) `tls:` describes, and
//! the handshake right after the TCP connect.
use rustls::{
    client::{
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        ResolvesClientCert,
    },
    crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider},
    pki_types::{CertificateDer, ServerName, UnixTime},
    sign::CertifiedKey,
    ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use std::{
    path::{Path, PathBuf},
    sync::{Arc, OnceLock},
    time::Duration,
};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::certs::{self, CertError, CertFiles};

/// TLS to one server, ready to connect with.
#[derive(Debug, Clone)]
pub struct ServerTls {
    pub config: Arc<ClientConfig>,
    /// Sent in SNI (a DNS name) and checked against the server's certificate.
    pub name: ServerName<'static>,
}

/// A `tls:` block of a backend or server that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ServerTlsError {
    #[error(transparent)]
    Cert(#[from] CertError),
    #[error("{}: certificate {index} cannot be a trust anchor: {reason}", path.display())]
    BadCa {
        path: PathBuf,
        index: usize,
        reason: String,
    },
    #[error("no system CA certificates found ({0}); name the CA with `ca:`")]
    NoSystemRoots(String),
    #[error("{0}")]
    Versions(String),
}

/// The system's CA store, read once (every server that names no `ca:` shares it).
fn system_roots() -> Result<Arc<RootCertStore>, ServerTlsError> {
    static ROOTS: OnceLock<Result<Arc<RootCertStore>, String>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            let mut store = RootCertStore::empty();
            let (added, _) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                let why = found
                    .errors
                    .first()
                    .map_or_else(|| "the store is empty".to_string(), |e| e.to_string());
                return Err(why);
            }
            Ok(Arc::new(store))
        })
        .clone()
        .map_err(ServerTlsError::NoSystemRoots)
}

/// Builds the client configuration: trust `ca` (else the system's store) unless `!verify`,
/// present `client_cert` when asked.
pub fn client_config(
    ca: Option<&Path>,
    verify: bool,
    client_cert: Option<&CertFiles>,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<ClientConfig>, ServerTlsError> {
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| ServerTlsError::Versions(e.to_string()))?;
    let builder = if verify {
        let roots = match ca {
            Some(path) => {
                let mut store = RootCertStore::empty();
                for (index, cert) in certs::load_chain(path)?.into_iter().enumerate() {
                    store.add(cert).map_err(|e| ServerTlsError::BadCa {
                        path: path.into(),
                        index,
                        reason: e.to_string(),
                    })?;
                }
                Arc::new(store)
            }
            None => system_roots()?,
        };
        builder.with_root_certificates(roots)
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider.clone())))
    };
    let config = match client_cert {
        // Checked as a listener's certificate is (readable, valid now, key matching).
        Some(files) => {
            let loaded = certs::load(files, &provider, certs::now())?;
            builder.with_client_cert_resolver(Arc::new(ClientCert(loaded.key)))
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// Why a TLS session to a server could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("no TLS handshake within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Failed(std::io::Error),
}

/// The TLS handshake on a connected server socket, within `timeout`.
pub async fn handshake(
    tls: &ServerTls,
    tcp: TcpStream,
    timeout: Duration,
) -> Result<tokio_rustls::client::TlsStream<super::io::TlsIo>, HandshakeError> {
    // Sessions to servers stay with rustls: plain reads.
    let connect =
        TlsConnector::from(tls.config.clone()).connect(tls.name.clone(), super::io::TlsIo::plain(tcp));
    match tokio::time::timeout(timeout, connect).await {
        Err(_) => Err(HandshakeError::Timeout(timeout)),
        Ok(Err(e)) => Err(HandshakeError::Failed(e)),
        Ok(Ok(s)) => Ok(s),
    }
}

/// `client_cert:`, presented whenever a server asks.
#[derive(Debug)]
struct ClientCert(Arc<CertifiedKey>);

impl ResolvesClientCert for ClientCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// `verify: false`: any certificate is accepted; the handshake's signatures are still checked
/// (they prove the server holds the key of the certificate it sent, whatever that is).
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
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
        verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
