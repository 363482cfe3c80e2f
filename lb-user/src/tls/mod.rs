//! The TLS stage (rustls): on a listener with `tls:`, between the accept and the session's
//! protocol (the design notes' "TCP socket plus a TLS reader": the request buffer exists only
//! once the handshake is over), and on a backend with `tls:`, right after the connect.
//!
//! - [`certs`]: certificate files, checked as `lb check` reports them, and the SNI index;
//! - [`accept`]: the client-side handshake (SNI, ALPN, minimum version, its timeout, the
//!   reasons a handshake fails) and certificate reloads;
//! - [`connect`]: TLS to servers (SNI, a private CA or the system's, client certificates);
//! - [`ktls`]: whether the kernel can take TLS records over (kTLS), and handing a client's
//!   session to it after the handshake;
//! - [`peek`]: the SNI of a ClientHello lb does not answer (`route_by_sni` without `tls:`);
//! - [`io`]: the socket under a session, read whole records at a time while a hand-off to the
//!   kernel may follow.
//!
//! The crypto provider is aws-lc-rs (rustls's default): its RSA signatures take half the time
//! of ring's (0.3 against 0.66 ms for RSA 2048 here; OpenSSL 0.26 ms), which is most of a full
//! handshake's cost with an RSA certificate. It builds with the C compiler alone.
/// `AsyncWrite`'s writes and flush, passed to the type's `tcp` socket (for [`io::TlsIo`] and
/// [`ktls::KtlsStream`], which differ only in how they read and how they shut down).
macro_rules! writes_to_tcp {
    () => {
        fn poll_write(
            self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            std::pin::Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
        }

        fn poll_write_vectored(
            self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            bufs: &[std::io::IoSlice<'_>],
        ) -> std::task::Poll<std::io::Result<usize>> {
            std::pin::Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, bufs)
        }

        fn is_write_vectored(&self) -> bool {
            self.tcp.is_write_vectored()
        }

        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
        }
    };
}

pub mod accept;
pub mod certs;
pub mod connect;
pub mod io;
pub mod ktls;
pub mod peek;

use std::sync::{Arc, OnceLock};

/// The crypto provider every TLS configuration uses.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    static PROVIDER: OnceLock<Arc<rustls::crypto::CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .clone()
}

static TLS13_ONLY: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

/// The TLS versions lb accepts at least (`min_version`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MinVersion {
    Tls12,
    Tls13,
}

impl MinVersion {
    pub fn versions(self) -> &'static [&'static rustls::SupportedProtocolVersion] {
        match self {
            MinVersion::Tls12 => rustls::ALL_VERSIONS,
            MinVersion::Tls13 => TLS13_ONLY,
        }
    }

    /// `1.2`, `1.3`, or as HAProxy writes them, `TLSv1.2`, `TLSv1.3`.
    pub fn parse(text: &str) -> Option<MinVersion> {
        match text.strip_prefix("TLSv").unwrap_or(text) {
            "1.2" => Some(MinVersion::Tls12),
            "1.3" => Some(MinVersion::Tls13),
            _ => None,
        }
    }
}
