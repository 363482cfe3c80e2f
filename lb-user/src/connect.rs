//! The connect stage: opens the connection to the chosen server within the backend's connect
//! timeout, with the listener's socket flags.
use std::{io, time::Duration};
use tokio::net::{TcpSocket, TcpStream};

use crate::config::Server;

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
/// [`crate::accept::configure`]).
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
    let socket = if server.address.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(io_err)?;
    socket.set_nodelay(nodelay).map_err(io_err)?;
    if let Some(bytes) = rcvbuf {
        socket.set_recv_buffer_size(bytes).map_err(io_err)?;
    }
    match tokio::time::timeout(timeout, socket.connect(server.address)).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => Err(io_err(e)),
        Err(_) => Err(ConnectError::Timeout {
            server: server.name.clone(),
            address: server.address,
            timeout,
        }),
    }
}
