//! The client-side TLS handshake of a listener with `tls:` (HAProxy's `bind ... ssl`): the
//! certificate chosen by SNI, ALPN, the minimum version, `timeouts.tls_handshake`, and why a
//! handshake failed, counted by reason; certificates swapped on reload without touching live
//! sessions (each holds the configuration it started with).
use prometheus_client::metrics::counter::Counter;
use rustls::{
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
    ServerConfig,
};
use std::sync::{Arc, RwLock};
use tokio::net::TcpStream;
use tokio_rustls::{server::TlsStream, TlsAcceptor};

use super::certs::{self, CertError, CertSet};
use crate::config::ListenerTls;

/// Why a client's handshake failed (`lb_tls_handshake_failures_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The first bytes were not a TLS record: plain HTTP or garbage on a TLS port.
    NotTls,
    /// The client asked for a name no certificate has, and `strict_sni` is on.
    UnknownSni,
    /// No shared version, cipher suite, signature scheme or ALPN protocol.
    Incompatible,
    /// The client sent an alert (it refused lb's certificate, say).
    ClientAlert,
    /// The handshake was not over within `timeouts.tls_handshake`.
    Timeout,
    /// The client closed or reset the connection within the handshake.
    Closed,
    /// Any other violation of the protocol.
    Protocol,
}

impl Failure {
    pub const ALL: [Failure; 7] = [
        Failure::NotTls,
        Failure::UnknownSni,
        Failure::Incompatible,
        Failure::ClientAlert,
        Failure::Timeout,
        Failure::Closed,
        Failure::Protocol,
    ];

    /// The metric label.
    pub fn name(self) -> &'static str {
        match self {
            Failure::NotTls => "not_tls",
            Failure::UnknownSni => "unknown_sni",
            Failure::Incompatible => "incompatible",
            Failure::ClientAlert => "client_alert",
            Failure::Timeout => "timeout",
            Failure::Closed => "closed",
            Failure::Protocol => "protocol",
        }
    }

    /// Which failure the error of a failed handshake is.
    fn of(e: &std::io::Error) -> Failure {
        use rustls::{Error, InvalidMessage};
        let Some(tls) = e.get_ref().and_then(|inner| inner.downcast_ref::<Error>()) else {
            return Failure::Closed;
        };
        match tls {
            Error::InvalidMessage(
                InvalidMessage::InvalidContentType | InvalidMessage::UnknownProtocolVersion,
            ) => Failure::NotTls,
            Error::General(why) if why == NO_CERTIFICATE => Failure::UnknownSni,
            Error::PeerIncompatible(_) | Error::NoApplicationProtocol => Failure::Incompatible,
            Error::AlertReceived(_) => Failure::ClientAlert,
            _ => Failure::Protocol,
        }
    }
}

/// What rustls reports when the resolver found no certificate.
const NO_CERTIFICATE: &str = "no server certificate chain resolved";

/// Picks each handshake's certificate from the listener's current set.
#[derive(Debug)]
struct SniResolver {
    set: RwLock<Arc<CertSet>>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let set = self.set.read().unwrap_or_else(|e| e.into_inner()).clone();
        set.pick(hello.server_name(), hello.signature_schemes())
    }
}

/// What a completed handshake tells about the client.
#[derive(Debug, Clone, Default)]
pub struct Handshaken {
    /// The name the client asked for (SNI), lowercase.
    pub sni: Option<String>,
}

/// A listener's TLS termination.
pub struct Terminator {
    acceptor: TlsAcceptor,
    resolver: Arc<SniResolver>,
    settings: ListenerTls,
    /// `lb_tls_handshakes_total{listener}`.
    pub handshakes: Counter,
    /// `lb_tls_handshake_failures_total{listener,reason}`, in [`Failure::ALL`]'s order.
    pub failures: [Counter; 7],
}

impl Terminator {
    pub fn new(settings: &ListenerTls, handshakes: Counter, failures: [Counter; 7]) -> Terminator {
        let resolver = Arc::new(SniResolver {
            set: RwLock::new(settings.certs.clone()),
        });
        let mut config = ServerConfig::builder_with_provider(super::provider())
            .with_protocol_versions(settings.min_version.versions())
            .expect("aws-lc-rs offers TLS 1.2 and 1.3")
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        config.alpn_protocols = settings.alpn.clone();
        Terminator {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            resolver,
            settings: settings.clone(),
            handshakes,
            failures,
        }
    }

    /// The TLS handshake with an accepted client, within `timeouts.tls_handshake`. A failure
    /// is counted; rustls has sent the alert that describes it, where there is one.
    pub async fn handshake(&self, tcp: TcpStream) -> Result<(TlsStream<TcpStream>, Handshaken), Failure> {
        let accepted = tokio::time::timeout(self.settings.handshake_timeout, self.acceptor.accept(tcp)).await;
        let failure = match accepted {
            Ok(Ok(stream)) => {
                self.handshakes.inc();
                let conn = stream.get_ref().1;
                let info = Handshaken {
                    // Lowercase already (rustls lowercases the name it received).
                    sni: conn.server_name().map(str::to_owned),
                };
                return Ok((stream, info));
            }
            Ok(Err(e)) => Failure::of(&e),
            Err(_) => Failure::Timeout,
        };
        self.failures[failure as usize].inc();
        Err(failure)
    }

    /// The certificates handshakes get now.
    pub fn current(&self) -> Arc<CertSet> {
        self.resolver
            .set
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Reads the listener's certificate files again; the set is not in use until
    /// [`Terminator::install`].
    pub fn reread(&self) -> Result<CertSet, Vec<(usize, CertError)>> {
        load_set(&self.settings)
    }

    /// New handshakes get `set`; sessions already under way keep what they had.
    pub fn install(&self, set: CertSet) {
        *self.resolver.set.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(set);
    }
}

/// Loads and checks every certificate of a listener: the set, or every problem found, with
/// the index of its `certificates:` entry.
pub fn load_set(settings: &ListenerTls) -> Result<CertSet, Vec<(usize, CertError)>> {
    let provider = super::provider();
    let now = certs::now();
    let mut loaded = Vec::new();
    let mut errors = Vec::new();
    for (i, files) in settings.certificates.iter().enumerate() {
        match certs::load(files, &provider, now) {
            Ok(cert) if cert.names.is_empty() && !cert.has_address => errors.push((
                i,
                CertError::NoName {
                    path: files.cert.clone(),
                },
            )),
            Ok(cert) => loaded.push(cert),
            Err(e) => errors.push((i, e)),
        }
    }
    if errors.is_empty() {
        Ok(CertSet::new(loaded, settings.strict_sni))
    } else {
        Err(errors)
    }
}
