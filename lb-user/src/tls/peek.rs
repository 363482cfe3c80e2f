//! SNI without termination: on a `tcp` listener with `route_by_sni:` and no `tls:`, the
//! client's ClientHello is read with MSG_PEEK, so the name it asks for picks the backend while
//! every byte stays in the socket for the server (HAProxy's `req_ssl_sni`). rustls's
//! [`Acceptor`] parses it: lb never answers, the server does the handshake.
use rustls::server::Acceptor;
use std::{io, os::fd::AsFd, time::Duration};
use tokio::{io::Interest, net::TcpStream};

use super::accept::Failure;

/// The most lb reads before giving up on a ClientHello: a record's largest body and header.
/// (ClientHellos with post-quantum key shares take about 1.8 KiB.)
const MOST: usize = 16 * 1024 + 5;

/// The name the client asks for in its ClientHello (`None`: it sends none), peeked within
/// `limit`.
pub async fn client_hello_sni(tcp: &TcpStream, limit: Duration) -> Result<Option<String>, Failure> {
    match tokio::time::timeout(limit, peek_sni(tcp)).await {
        Ok(found) => found,
        Err(_) => Err(Failure::Timeout),
    }
}

async fn peek_sni(tcp: &TcpStream) -> Result<Option<String>, Failure> {
    let mut buf = vec![0u8; MOST];
    let mut seen = 0;
    loop {
        let ready = tcp.ready(Interest::READABLE).await.map_err(|_| Failure::Closed)?;
        // A peek sees the same bytes until more arrive: nothing new is a WouldBlock, which
        // clears the socket's readiness so that the next segment is awaited, not spun on.
        let peeked = tcp.try_io(Interest::READABLE, || {
            match crate::sockopt::peek_nowait(tcp.as_fd(), &mut buf)? {
                n if n == seen && n > 0 => Err(io::ErrorKind::WouldBlock.into()),
                n => Ok(n),
            }
        });
        let n = match peeked {
            Ok(0) => return Err(Failure::Closed),
            Ok(n) => n,
            // The client closed with the ClientHello unfinished (readiness stays then).
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && ready.is_read_closed() => {
                return Err(Failure::Closed)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(_) => return Err(Failure::Closed),
        };
        seen = n;
        // Parsed from the start each time: the Acceptor takes bytes once.
        let mut acceptor = Acceptor::default();
        let mut bytes = &buf[..n];
        while !bytes.is_empty() {
            acceptor.read_tls(&mut bytes).map_err(|_| Failure::Protocol)?;
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => {
                return Ok(accepted.client_hello().server_name().map(str::to_ascii_lowercase))
            }
            Ok(None) if n == MOST => return Err(Failure::Protocol),
            Ok(None) => {}
            Err((e, _alert)) => return Err(Failure::of_error(&e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A real ClientHello, as a rustls client sends it for `name`.
    fn client_hello(name: &str) -> Vec<u8> {
        let config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let mut conn =
            rustls::ClientConnection::new(std::sync::Arc::new(config), name.to_string().try_into().unwrap())
                .unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    /// The name comes out of a ClientHello sent in two parts, and every byte is still there to
    /// read afterwards.
    #[tokio::test]
    async fn the_name_is_read_and_the_bytes_stay() {
        let (mut client, server) = crate::test_support::loopback_pair().await;
        let hello = client_hello("Api.Example.COM");
        client.write_all(&hello[..20]).await.unwrap();
        let (sni, ()) = tokio::join!(client_hello_sni(&server, Duration::from_secs(5)), async {
            tokio::task::yield_now().await;
            client.write_all(&hello[20..]).await.unwrap();
        });
        assert_eq!(sni, Ok(Some("api.example.com".to_string())));
        let mut server = server;
        let mut all = vec![0u8; hello.len()];
        server.read_exact(&mut all).await.unwrap();
        assert_eq!(all, hello);
    }

    /// Half a ClientHello, then the client's FIN: closed at once (no spinning until the time
    /// limit).
    #[tokio::test(start_paused = true)]
    async fn half_a_hello_then_a_close_is_closed() {
        let (mut client, server) = crate::test_support::loopback_pair().await;
        client.write_all(&client_hello("a.test")[..30]).await.unwrap();
        client.shutdown().await.unwrap();
        let started = tokio::time::Instant::now();
        assert_eq!(
            client_hello_sni(&server, Duration::from_secs(5)).await,
            Err(Failure::Closed)
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn plain_http_is_not_tls() {
        let (mut client, server) = crate::test_support::loopback_pair().await;
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(
            client_hello_sni(&server, Duration::from_secs(5)).await,
            Err(Failure::NotTls)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn half_a_hello_times_out() {
        let (mut client, server) = crate::test_support::loopback_pair().await;
        client.write_all(&client_hello("a.test")[..30]).await.unwrap();
        assert_eq!(
            client_hello_sni(&server, Duration::from_secs(5)).await,
            Err(Failure::Timeout)
        );
    }
}
