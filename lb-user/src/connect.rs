//! The connect stage: opens the connection to the chosen server within the backend's connect
//! timeout, with the listener's socket flags.
use socket2::{Domain, Protocol, Socket, Type};
use std::{io, os::fd::AsFd, time::Duration};
use tokio::net::TcpStream;

use crate::{config::Server, sockopt};

/// Why a server could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("server {server} ({address}) did not accept within {timeout:?}")]
    Timeout {
        server: String,
        address: std::net::SocketAddr,
        timeout: Duration,
    },
    #[error("server {server} ({address}): {source}")]
    Io {
        server: String,
        address: std::net::SocketAddr,
        source: io::Error,
    },
}

/// Connects to `server`; `rcvbuf`: SO_RCVBUF, set before the handshake (see
/// [`crate::accept::bind`]).
///
/// The connection is checked at once after the non-blocking connect (HAProxy's speculative
/// I/O): when the server is near, the handshake is often over by then, and the session goes on
/// without a turn of the event loop (tokio would first wait for the socket's initial
/// writability event, a wait that grows with the load on every connection's critical path).
pub async fn connect(
    server: &Server,
    timeout: Duration,
    nodelay: bool,
    rcvbuf: Option<u32>,
) -> Result<TcpStream, ConnectError> {
    let io_err = |source| ConnectError::Io {
        server: server.name.clone(),
        address: server.address,
        source,
    };
    let socket = Socket::new(
        Domain::for_address(server.address),
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )
    .map_err(io_err)?;
    socket.set_nodelay(nodelay).map_err(io_err)?;
    if let Some(bytes) = rcvbuf {
        socket.set_recv_buffer_size(bytes as usize).map_err(io_err)?;
    }
    let done = match socket.connect(&server.address.into()) {
        Ok(()) => true,
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {
            sockopt::connect_done(socket.as_fd()).map_err(io_err)?
        }
        Err(e) => return Err(io_err(e)),
    };
    let stream = TcpStream::from_std(socket.into()).map_err(io_err)?;
    if done {
        return Ok(stream);
    }
    match tokio::time::timeout(timeout, stream.writable()).await {
        Ok(Ok(())) => match stream.take_error() {
            Ok(None) => Ok(stream),
            Ok(Some(e)) | Err(e) => Err(io_err(e)),
        },
        Ok(Err(e)) => Err(io_err(e)),
        Err(_) => Err(ConnectError::Timeout {
            server: server.name.clone(),
            address: server.address,
            timeout,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::server;
    use std::{net::SocketAddr, time::Instant};

    /// A listener whose accept queue is full drops SYNs, so a connect is still in progress
    /// when the stage first looks at it and completes with the SYN's retransmission (after
    /// about a second): the stage must wait for it rather than take it as done.
    #[tokio::test]
    async fn a_handshake_that_completes_late_is_waited_for() {
        let listener = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        listener
            .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        listener.listen(0).unwrap();
        let addr = listener.local_addr().unwrap().as_socket().unwrap();
        // Fill the queue (backlog 0 holds one connection).
        let filler = std::net::TcpStream::connect(addr).unwrap();
        let started = Instant::now();
        let target = server(addr);
        let connecting = connect(&target, Duration::from_secs(5), true, None);
        tokio::pin!(connecting);
        // Polled once: the connect is issued, its SYN dropped, and the stage waits.
        tokio::select! {
            biased;
            r = &mut connecting => panic!("done at once with the queue full: {r:?}"),
            _ = std::future::ready(()) => {}
        }
        // Make room: the retransmitted SYN is then accepted.
        let (first, _) = listener.accept().unwrap();
        let stream = connecting.await.expect("connected late");
        assert!(
            started.elapsed() >= Duration::from_millis(500),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(stream.peer_addr().unwrap(), addr);
        drop((filler, first));
    }

    #[tokio::test]
    async fn a_refused_connect_is_an_error_at_once() {
        // A port nothing listens on any more: its listener was just closed.
        let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = socket.local_addr().unwrap();
        drop(socket);
        let err = connect(&server(addr), Duration::from_secs(5), true, None)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, ConnectError::Io { source, .. } if source.kind() == io::ErrorKind::ConnectionRefused),
            "{err}"
        );
    }
}
