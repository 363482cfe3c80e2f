//! The PROXY header stage of an `accept_proxy` listener, between the accept stage and the
//! listener's protocol: the header is peeked at (MSG_PEEK) until it is whole, then exactly its
//! bytes are read, so whatever the client sent after it stays in the socket for the next
//! stage (a TLS handshake, an HTTP request, bytes forwarded as they are) and no buffer of
//! ours has to follow the connection. HAProxy reads its header the same way.
use std::{io, os::fd::AsFd, time::Duration};
use tokio::{io::Interest, net::TcpStream};

use super::{parse, Header, HeaderError, Parsed, V2_MAX};

/// Why a connection was closed at its PROXY header (`lb_proxy_header_refused_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// From an address `accept_proxy` does not trust; nothing was read.
    Untrusted,
    /// The bytes start with neither signature.
    Missing,
    Malformed,
    /// Longer than the specification allows (v1) or than lb takes (v2).
    TooLong,
    /// Not whole within `timeouts.client`.
    Timeout,
    /// The client closed (or reset) before its header was whole.
    Closed,
}

impl Refusal {
    pub const ALL: [Refusal; 6] = [
        Refusal::Untrusted,
        Refusal::Missing,
        Refusal::Malformed,
        Refusal::TooLong,
        Refusal::Timeout,
        Refusal::Closed,
    ];

    /// The metric label.
    pub fn name(self) -> &'static str {
        match self {
            Refusal::Untrusted => "untrusted",
            Refusal::Missing => "missing",
            Refusal::Malformed => "malformed",
            Refusal::TooLong => "too_long",
            Refusal::Timeout => "timeout",
            Refusal::Closed => "closed",
        }
    }

    fn of(e: &HeaderError) -> Refusal {
        match e {
            HeaderError::Missing => Refusal::Missing,
            HeaderError::TooLong(_) => Refusal::TooLong,
            HeaderError::Malformed(_) => Refusal::Malformed,
        }
    }
}

/// A refused header: the reason, and what was wrong, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub reason: Refusal,
    pub detail: String,
}

impl Refused {
    fn new(reason: Refusal, detail: impl Into<String>) -> Refused {
        Refused {
            reason,
            detail: detail.into(),
        }
    }
}

/// Reads the PROXY header the connection starts with, whole within `limit` from now; the
/// socket is left at the first byte after it.
pub async fn receive(tcp: &TcpStream, limit: Duration) -> Result<Header, Refused> {
    match tokio::time::timeout(limit, read_header(tcp)).await {
        Ok(done) => done,
        Err(_) => Err(Refused::new(
            Refusal::Timeout,
            format!("no whole PROXY header within {limit:?}"),
        )),
    }
}

async fn read_header(tcp: &TcpStream) -> Result<Header, Refused> {
    let closed = |why: &str| Refused::new(Refusal::Closed, why);
    let mut buf = vec![0u8; V2_MAX];
    let mut seen = 0;
    let header = loop {
        let ready = tcp
            .ready(Interest::READABLE)
            .await
            .map_err(|e| closed(&format!("client connection: {e}")))?;
        // A peek sees the same bytes until more arrive: nothing new is a WouldBlock, which
        // clears the socket's readiness so that the next segment is awaited, not spun on.
        let peeked = tcp.try_io(Interest::READABLE, || {
            match crate::sockopt::peek_nowait(tcp.as_fd(), &mut buf)? {
                n if n == seen && n > 0 => Err(io::ErrorKind::WouldBlock.into()),
                n => Ok(n),
            }
        });
        let n = match peeked {
            Ok(0) => return Err(closed("client closed before its PROXY header")),
            Ok(n) => n,
            // Closed with the header unfinished (readiness stays then).
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && ready.is_read_closed() => {
                return Err(closed("client closed within its PROXY header"))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(closed(&format!("client connection: {e}"))),
        };
        seen = n;
        match parse(&buf[..n]) {
            Ok(Parsed::Complete(header)) => break header,
            Ok(Parsed::Incomplete) => {}
            Err(e) => return Err(Refused::new(Refusal::of(&e), e.to_string())),
        }
    };
    // The header's bytes are all queued (peeked): one read takes exactly them.
    match crate::sockopt::recv_nowait(tcp.as_fd(), &mut buf[..header.len]) {
        Ok(n) if n == header.len => Ok(header),
        Ok(n) => Err(closed(&format!("read {n} of the header's {} bytes", header.len))),
        Err(e) => Err(closed(&format!("client connection: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const V1: &[u8] = b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 443\r\n";

    /// A header sent in pieces with the client's first bytes behind it: the addresses come
    /// out, and the next read starts at the client's first byte.
    #[tokio::test]
    async fn the_header_is_taken_and_the_client_bytes_stay() {
        let (mut client, server) = crate::test_support::loopback_pair().await;
        let mut sent = V1.to_vec();
        sent.extend_from_slice(b"GET / HTTP/1.1\r\n");
        client.write_all(&sent[..10]).await.unwrap();
        let (header, ()) = tokio::join!(receive(&server, Duration::from_secs(5)), async {
            tokio::task::yield_now().await;
            client.write_all(&sent[10..]).await.unwrap();
        });
        let header = header.unwrap();
        let src: SocketAddr = "192.0.2.7:40000".parse().unwrap();
        let dst: SocketAddr = "198.51.100.1:443".parse().unwrap();
        assert_eq!(header.addresses, Some((src, dst)));
        let mut server = server;
        let mut rest = [0u8; 16];
        server.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"GET / HTTP/1.1\r\n");
    }

    /// Half a header then nothing: refused as a timeout at the limit (paused time).
    #[tokio::test(start_paused = true)]
    async fn a_slow_header_times_out() {
        let (mut client, server) = crate::test_support::loopback_pair().await;
        client.write_all(&V1[..20]).await.unwrap();
        let started = tokio::time::Instant::now();
        let refused = receive(&server, Duration::from_secs(3)).await.unwrap_err();
        assert_eq!(refused.reason, Refusal::Timeout);
        assert_eq!(started.elapsed(), Duration::from_secs(3));
        drop(client);
    }

    /// Half a header then the client's FIN: closed at once, not at the time limit.
    #[tokio::test(start_paused = true)]
    async fn half_a_header_then_a_close_is_closed() {
        let (mut client, server) = crate::test_support::loopback_pair().await;
        client.write_all(&V1[..20]).await.unwrap();
        client.shutdown().await.unwrap();
        let started = tokio::time::Instant::now();
        let refused = receive(&server, Duration::from_secs(30)).await.unwrap_err();
        assert_eq!(refused.reason, Refusal::Closed);
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    /// Bytes that are no header are refused by reason as soon as they are seen.
    #[tokio::test]
    async fn bad_headers_are_refused_by_reason() {
        let mut long = b"PROXY TCP4 ".to_vec();
        long.resize(120, b'1');
        let mut v2_long = super::super::V2_SIGNATURE.to_vec();
        v2_long.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        let cases: [(&[u8], Refusal); 5] = [
            (b"GET / HTTP/1.1\r\n\r\n", Refusal::Missing),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", Refusal::Malformed),
            (&long, Refusal::TooLong),
            (&v2_long, Refusal::TooLong),
            (b"\r\n\r\n\0\r\nQUIT\n\x31\x11\0\0", Refusal::Malformed),
        ];
        for (bytes, reason) in cases {
            let (mut client, server) = crate::test_support::loopback_pair().await;
            client.write_all(bytes).await.unwrap();
            let refused = receive(&server, Duration::from_secs(5)).await.unwrap_err();
            assert_eq!(
                refused.reason,
                reason,
                "{:?}: {}",
                String::from_utf8_lossy(bytes),
                refused.detail
            );
        }
    }
}
