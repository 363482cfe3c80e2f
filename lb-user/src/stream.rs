//! A connection as the stages after the accept (or the connect) see it: a plain TCP socket, or
//! the same socket under a TLS session lb terminates (a client's, [`crate::tls::accept`]) or
//! originates (to a server, [`crate::tls::connect`]).
//!
//! The HTTP session reads and writes any of them through [`Stream`]. Only a plain socket can go
//! to the kernel forwarding path: a flow with a TLS side is copied in userspace to its end
//! ([`crate::forward::streams`]): decrypted and encrypted by rustls, or, for a client session
//! handed to the kernel's TLS ([`crate::tls::ktls`]), by the kernel, lb moving plaintext.
use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd},
    pin::Pin,
    task::{Context, Poll},
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tokio_rustls::TlsStream;

use crate::tls::{io::TlsIo, ktls::KtlsStream};

/// One side's connection.
pub enum Stream {
    Tcp(TcpStream),
    /// Boxed: a TLS session's state is a few KiB and most connections have none.
    Tls(Box<TlsStream<TlsIo>>),
    /// A TLS session the kernel encrypts and decrypts (kTLS).
    Ktls(Box<KtlsStream>),
}

impl Stream {
    /// The TCP socket under it.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Tcp(s) => s,
            Stream::Tls(s) => s.get_ref().0.tcp(),
            Stream::Ktls(s) => s.tcp(),
        }
    }

    /// The plain socket, for the kernel path; `Err(self)` when a TLS session runs on it.
    pub fn into_tcp(self) -> Result<TcpStream, Stream> {
        match self {
            Stream::Tcp(s) => Ok(s),
            tls => Err(tls),
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_) | Stream::Ktls(_))
    }

    /// Whether the TLS layer holds input lb has not read: decrypted bytes, or the peer's
    /// close_notify (a peek at the socket cannot see what rustls already took from it).
    pub fn tls_holds_input(&mut self) -> bool {
        let tls = match self {
            Stream::Tcp(_) => return false,
            Stream::Ktls(k) => return k.holds_input(),
            Stream::Tls(tls) => tls,
        };
        // Only records already read are processed here: nothing is read from the socket.
        let state = match tls.as_mut() {
            TlsStream::Client(c) => c.get_mut().1.process_new_packets(),
            TlsStream::Server(s) => s.get_mut().1.process_new_packets(),
        };
        state.map_or(true, |s| s.plaintext_bytes_to_read() > 0 || s.peer_has_closed())
    }
}

impl From<TcpStream> for Stream {
    fn from(s: TcpStream) -> Stream {
        Stream::Tcp(s)
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.tcp().as_fd()
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        self.tcp().as_raw_fd()
    }
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::Ktls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::Ktls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            Stream::Ktls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Tcp(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
            Stream::Ktls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::Ktls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    /// For TLS (rustls or the kernel's): a close_notify alert, then the TCP write side is shut.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::Ktls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
