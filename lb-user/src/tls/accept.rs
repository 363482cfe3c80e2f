//! The client-side TLS handshake of a listener with `tls:` (HAProxy's `bind ... ssl`): the
//! certificate chosen by SNI, ALPN, the minimum version, `timeouts.tls_handshake`, and why a
//! handshake failed, counted by reason; certificates swapped on reload without touching live
//! sessions (each holds the configuration it started with); then the session handed to the
//! kernel's TLS where it has it ([`super::ktls`]).
use prometheus_client::metrics::counter::Counter;
use rustls::{
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
    ServerConfig,
};
use std::sync::{Arc, RwLock};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use super::{
    certs::{self, CertError, CertSet},
    io::TlsIo,
    ktls::{self, Ciphers, HandOff},
};
use crate::{config::ListenerTls, stream::Stream};

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
    /// The handshake was over, but the kernel's TLS refused the session's keys (counted in
    /// `lb_ktls_handoffs_total{result="failed"}`, not with the handshake failures).
    Kernel,
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
            Failure::Kernel => "ktls",
        }
    }

    /// Which failure the error of a failed handshake is.
    fn of(e: &std::io::Error) -> Failure {
        match e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            Some(tls) => Failure::of_error(tls),
            None => Failure::Closed,
        }
    }

    /// Which failure a TLS error is.
    pub fn of_error(tls: &rustls::Error) -> Failure {
        use rustls::{Error, InvalidMessage};
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
    /// The application protocol agreed in ALPN.
    pub alpn: Option<Vec<u8>>,
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
    /// The ciphers of the kernel's TLS, when sessions are handed to it.
    kernel: Option<Ciphers>,
    /// `lb_ktls_handoffs_total{listener,result}`, in [`HandOffResult::ALL`]'s order.
    pub handoffs: [Counter; 3],
}

/// What became of a session offered to the kernel's TLS (`lb_ktls_handoffs_total{result}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandOffResult {
    /// The kernel encrypts and decrypts it.
    Kernel,
    /// It stayed with rustls: a cipher the kernel lacks, part of a record already read, records
    /// still to send, or a client that closed or misbehaved right after its handshake.
    Kept,
    /// The keys were out of rustls when the kernel refused them (or reading what rustls held
    /// failed): the session was closed.
    Failed,
}

impl HandOffResult {
    pub const ALL: [HandOffResult; 3] = [HandOffResult::Kernel, HandOffResult::Kept, HandOffResult::Failed];

    pub fn name(self) -> &'static str {
        match self {
            HandOffResult::Kernel => "kernel",
            HandOffResult::Kept => "kept",
            HandOffResult::Failed => "failed",
        }
    }
}

impl Terminator {
    /// `kernel`: the kernel's TLS ciphers, when it has kTLS (used unless `ktls: false`).
    pub fn new(
        settings: &ListenerTls,
        handshakes: Counter,
        failures: [Counter; 7],
        kernel: Option<Ciphers>,
        handoffs: [Counter; 3],
    ) -> Terminator {
        let kernel = kernel.filter(|_| settings.ktls);
        let resolver = Arc::new(SniResolver {
            set: RwLock::new(settings.certs.clone()),
        });
        let mut config = ServerConfig::builder_with_provider(super::provider())
            .with_protocol_versions(settings.min_version.versions())
            .expect("aws-lc-rs offers TLS 1.2 and 1.3")
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        config.alpn_protocols = settings.alpn.clone();
        // rustls lets its keys out only when asked to at the start.
        config.enable_secret_extraction = kernel.is_some();
        Terminator {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            resolver,
            settings: settings.clone(),
            handshakes,
            failures,
            kernel,
            handoffs,
        }
    }

    /// The TLS handshake with an accepted client, within `timeouts.tls_handshake`; then the
    /// session goes to the kernel's TLS where it can. A failure is counted; rustls has sent the
    /// alert that describes it, where there is one.
    pub async fn handshake(&self, tcp: TcpStream) -> Result<(Stream, Handshaken), Failure> {
        let io = match self.kernel {
            Some(_) => TlsIo::whole_records(tcp),
            None => TlsIo::plain(tcp),
        };
        let accepted = tokio::time::timeout(self.settings.handshake_timeout, self.acceptor.accept(io)).await;
        let failure = match accepted {
            Ok(Ok(stream)) => {
                self.handshakes.inc();
                let conn = stream.get_ref().1;
                let info = Handshaken {
                    // Lowercase already (rustls lowercases the name it received).
                    sni: conn.server_name().map(str::to_owned),
                    alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
                };
                let Some(ciphers) = &self.kernel else {
                    return Ok((Stream::Tls(Box::new(stream.into())), info));
                };
                let (result, stream) = match ktls::hand_off(stream, ciphers) {
                    HandOff::Kernel(k) => (HandOffResult::Kernel, Stream::Ktls(Box::new(k))),
                    HandOff::Kept(tls, why) => {
                        tracing::debug!(sni = ?info.sni, "TLS session kept in userspace: {why}");
                        (HandOffResult::Kept, Stream::Tls(Box::new((*tls).into())))
                    }
                    HandOff::Failed(e) => {
                        // The socket was closed with the session.
                        tracing::warn!(sni = ?info.sni, "handing a TLS session to the kernel failed: {e}");
                        self.handoffs[HandOffResult::Failed as usize].inc();
                        return Err(Failure::Kernel);
                    }
                };
                self.handoffs[result as usize].inc();
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
